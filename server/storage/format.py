"""The on-disk snapshot of one hosted model: capture, atomic write, verified read, retention.

A snapshot is two files under `<data_dir>/<model>/`:

    snap-<seq>-v<version>.safetensors   parameters ("param/<name>") and Adam state
                                        ("state/<name>/<key>"), float tensors only: a
                                        complex tensor is stored as its real view
                                        (torch.view_as_real; safetensors has no complex128)
                                        and the manifest's "complex" names it
    snap-<seq>-v<version>.json          the manifest: version, counters, mode, hyperparameters,
                                        recent push ids, the tensor file's size and sha256, and a
                                        sha256 over the manifest itself

Nothing here is ever unpickled: tensors are safetensors, everything else JSON. Each file is written
to a hidden temp name, fsynced and renamed; the manifest goes last, then the directory is fsynced.
A snapshot counts only when its manifest parses, its own checksum holds and the tensor file has the
size and sha256 the manifest names, so a torn write or a flipped bit makes it invalid and the
reader falls back to the previous one. `seq` grows by one per snapshot of a model; newest = highest.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import safetensors.torch
import torch

from adamd.server.config import adamd_version
from adamd.server.core import state_io
from adamd.server.core.model import HostedModel, PushResult

logger = logging.getLogger(__name__)

FORMAT = "adamd-snapshot/1"
_NAME = re.compile(r"^snap-(\d{10})-v(\d+)\.json$")
_CHUNK = 8 << 20


class CorruptSnapshot(Exception):
    """A snapshot failed its checks (torn, truncated, bit-flipped or from an unknown format)."""


@dataclass(frozen=True)
class Capture:
    """A model's state copied out under its lock, ready to be written without holding it."""

    model: str
    version: int
    changes: int  # steps (applied or skipped) the model had seen; what durable waiters compare
    tensors: dict[str, torch.Tensor]  # CPU copies, keyed param/<name> and state/<name>/<key>
    meta: dict[str, Any]  # everything else, JSON-ready


@dataclass(frozen=True)
class SnapshotFile:
    """A written (or found) snapshot."""

    model: str
    seq: int
    version: int
    manifest: Path
    tensors: Path
    nbytes: int  # tensor file plus manifest
    seconds: float  # time to write it (0 when only found on disk)


@dataclass(frozen=True)
class Loaded:
    """A verified snapshot read back: its manifest and its tensors (CPU)."""

    file: SnapshotFile
    manifest: dict[str, Any]
    tensors: dict[str, torch.Tensor]


# --- capture -------------------------------------------------------------------------------------


def capture(model: HostedModel, changes: int = 0) -> Capture:
    """Copy everything a snapshot needs. Holds the model lock only for the memory copies."""
    with model.locked(), model.on_device():  # on CUDA, copies ordered with the model's steps
        tensors = {f"param/{n}": model.host_copy(p) for n, p in model.params.items()}
        for name, entry in state_io.named_state(model.optimizer):
            for key, value in entry.items():
                t = value if isinstance(value, torch.Tensor) else torch.tensor(float(value))
                tensors[f"state/{name}/{key}"] = model.host_copy(t)
        complex_keys = {
            k: str(t.dtype).removeprefix("torch.") for k, t in tensors.items() if t.is_complex()
        }
        for k in complex_keys:
            tensors[k] = torch.view_as_real(tensors[k])
        meta = {
            "model": model.name,
            "version": model.version,
            "skipped_steps": model.skipped_steps,
            "changes": changes,
            "mode": model.mode,
            "world_size": model.world_size,
            "max_staleness": model.max_staleness,
            "round_timeout_s": model.round_timeout_s,
            "elastic": model.elastic,  # membership itself does not survive a restart
            "lease_s": model.lease_s,
            "layout": model.layout,
            **model.precision.to_record(),  # master weights: master and worker dtypes
            "params": [
                {"name": n, "shape": list(p.shape), "dtype": str(p.dtype).removeprefix("torch.")}
                for n, p in model.params.items()
            ],
            "groups": [
                {"params": names, "options": {k: encode_value(v) for k, v in opts.items()}}
                for opts, names in zip(model.requested, model.group_names())
            ],
            "push_results": [
                [pid, r.version, r.applied, r.found_inf, r.contributors, r.partial]
                for pid, r in model.recent_push_results().items()
            ],
        }
        if complex_keys:
            meta["complex"] = complex_keys
        return Capture(model.name, model.version, changes, tensors, meta)


def encode_value(v: Any) -> Any:
    """A hyperparameter as JSON, keeping torch's Python types (tuple betas, tensor lr)."""
    if isinstance(v, torch.Tensor):
        return {
            "tensor": float(v.detach().cpu().reshape(-1)[0].item()),
            "shape": list(v.shape),
            "dtype": str(v.dtype).removeprefix("torch."),
        }
    if isinstance(v, tuple):
        return {"tuple": [encode_value(x) for x in v]}
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    raise TypeError(f"cannot store a hyperparameter of type {type(v).__name__}")


def decode_value(v: Any) -> Any:
    if isinstance(v, dict) and "tensor" in v:
        return torch.full(tuple(v["shape"]), v["tensor"], dtype=getattr(torch, v["dtype"]))
    if isinstance(v, dict) and "tuple" in v:
        return tuple(decode_value(x) for x in v["tuple"])
    return v


def push_results(manifest: Mapping[str, Any]) -> dict[str, PushResult]:
    return {
        pid: PushResult(
            version=v, applied=a, found_inf=f, contributors=c, duplicate=False, partial=p
        )
        for pid, v, a, f, c, p in manifest["push_results"]
    }


# --- write ---------------------------------------------------------------------------------------


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sha256_file(path: Path) -> tuple[str, int]:
    h = hashlib.sha256()
    n = 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
            n += len(chunk)
    return h.hexdigest(), n


def _manifest_digest(body: Mapping[str, Any]) -> str:
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(canonical).hexdigest()


def next_seq(model_dir: Path) -> int:
    return max((f.seq for f in list_snapshots(model_dir)), default=0) + 1


def write(cap: Capture, model_dir: Path, seq: int) -> SnapshotFile:
    """Write `cap` as snapshot number `seq`, atomically: a crash leaves the previous ones intact."""
    t0 = time.perf_counter()
    model_dir.mkdir(parents=True, exist_ok=True)
    stem = f"snap-{seq:010d}-v{cap.version}"
    tensors_path = model_dir / f"{stem}.safetensors"
    manifest_path = model_dir / f"{stem}.json"
    tmp_tensors = model_dir / f".tmp-{stem}.safetensors"
    tmp_manifest = model_dir / f".tmp-{stem}.json"
    try:
        safetensors.torch.save_file(cap.tensors, str(tmp_tensors))
        with open(tmp_tensors, "rb+") as f:
            os.fsync(f.fileno())
        # Hashing the file we wrote (hot in the page cache) rather than the tensors checks what
        # is on disk, not what we meant to write.
        digest, size = _sha256_file(tmp_tensors)
        os.replace(tmp_tensors, tensors_path)
        body = {
            "format": FORMAT,
            **cap.meta,
            "seq": seq,
            "adamd_version": adamd_version(),
            "torch_version": torch.__version__,
            "created_at": time.time(),
            "tensors_file": tensors_path.name,
            "tensors_bytes": size,
            "tensors_sha256": digest,
        }
        text = json.dumps({**body, "manifest_sha256": _manifest_digest(body)}, indent=1)
        with open(tmp_manifest, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_manifest, manifest_path)
        _fsync_dir(model_dir)
    except BaseException:
        for p in (tmp_tensors, tmp_manifest):
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
        raise
    return SnapshotFile(
        cap.model,
        seq,
        cap.version,
        manifest_path,
        tensors_path,
        size + len(text),
        time.perf_counter() - t0,
    )


def prune(model_dir: Path, keep: int) -> None:
    """Delete all but the `keep` newest snapshots (manifest first: a half-deleted one is invalid)."""
    for old in list_snapshots(model_dir)[: -max(keep, 1)]:
        for p in (old.manifest, old.tensors):
            with contextlib.suppress(FileNotFoundError):
                p.unlink()


def remove_temp_files(model_dir: Path) -> None:
    """Leftovers of writes a crash interrupted (never renamed, so never valid)."""
    for p in model_dir.glob(".tmp-*"):
        with contextlib.suppress(FileNotFoundError):
            p.unlink()


# --- read ----------------------------------------------------------------------------------------


def list_snapshots(model_dir: Path) -> list[SnapshotFile]:
    """Snapshots whose manifest file exists, oldest first (not verified: see load)."""
    out: list[SnapshotFile] = []
    if not model_dir.is_dir():
        return out
    for p in model_dir.iterdir():
        m = _NAME.match(p.name)
        if m:
            tensors = p.with_suffix(".safetensors")
            size = p.stat().st_size + (tensors.stat().st_size if tensors.exists() else 0)
            out.append(SnapshotFile(model_dir.name, int(m[1]), int(m[2]), p, tensors, size, 0.0))
    return sorted(out, key=lambda f: f.seq)


def model_dirs(data_dir: Path) -> list[Path]:
    if not data_dir.is_dir():
        return []
    return sorted(p for p in data_dir.iterdir() if p.is_dir() and not p.name.startswith("."))


def load(file: SnapshotFile) -> Loaded:
    """Read and verify one snapshot; CorruptSnapshot says what failed."""
    try:
        manifest = json.loads(file.manifest.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CorruptSnapshot(f"{file.manifest}: unreadable manifest ({exc})") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise CorruptSnapshot(f"{file.manifest}: not an {FORMAT} manifest")
    body = {k: v for k, v in manifest.items() if k != "manifest_sha256"}
    if manifest.get("manifest_sha256") != _manifest_digest(body):
        raise CorruptSnapshot(f"{file.manifest}: manifest checksum mismatch")
    try:
        data = (file.manifest.parent / manifest["tensors_file"]).read_bytes()
    except OSError as exc:
        raise CorruptSnapshot(f"{file.manifest}: tensor file unreadable ({exc})") from exc
    if len(data) != manifest["tensors_bytes"]:
        raise CorruptSnapshot(
            f"{file.tensors}: {len(data)} bytes, manifest says {manifest['tensors_bytes']} (torn write?)"
        )
    if hashlib.sha256(data).hexdigest() != manifest["tensors_sha256"]:
        raise CorruptSnapshot(f"{file.tensors}: sha256 mismatch (corrupted on disk)")
    try:
        tensors = safetensors.torch.load(data)
    except Exception as exc:  # checksum held, so this is a writer bug, still not fatal
        raise CorruptSnapshot(f"{file.tensors}: unreadable safetensors ({exc})") from exc
    for key, dtype in manifest.get("complex", {}).items():
        t = tensors.get(key)
        if (
            t is None
            or torch.view_as_real(torch.empty(0, dtype=getattr(torch, dtype))).dtype != t.dtype
        ):
            raise CorruptSnapshot(f"{file.manifest}: complex tensor {key!r} missing or mistyped")
        tensors[key] = torch.view_as_complex(t)
    return Loaded(file, manifest, tensors)


def newest_valid(model_dir: Path) -> Iterator[Loaded | CorruptSnapshot]:
    """Yield, newest first, each snapshot's verification failure until one loads, then it."""
    for file in reversed(list_snapshots(model_dir)):
        try:
            loaded = load(file)
        except CorruptSnapshot as exc:
            yield exc
            continue
        yield loaded
        return


def state_by_name(loaded: Loaded) -> dict[str, dict[str, torch.Tensor]]:
    """Adam state keyed by parameter name, as HostedModel.load_state takes it."""
    state: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in loaded.tensors.items():
        if key.startswith("state/"):
            name, _, sub = key[len("state/") :].rpartition("/")
            state.setdefault(name, {})[sub] = t
    return state


def params_of(loaded: Loaded) -> dict[str, torch.Tensor]:
    """Parameters in the order the model had them."""
    return {p["name"]: loaded.tensors[f"param/{p['name']}"] for p in loaded.manifest["params"]}


def groups_of(loaded: Loaded) -> list[dict[str, Any]]:
    """Requested options per group, with "params": [names]."""
    return [
        {**{k: decode_value(v) for k, v in g["options"].items()}, "params": list(g["params"])}
        for g in loaded.manifest["groups"]
    ]
