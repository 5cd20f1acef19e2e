"""The server side of the same-host fast path (see adamd.protocol.shared_files for the layout).

Attaching a CPU model moves its parameters into a file under /dev/shm (the optimizer keeps the
same tensor objects, only their storage moves), keeps the file's seqlock header in step with the
model, and gives each session a gradient file of the same layout. A push naming a session reads
its gradients straight from that file; a pull is a copy the client does itself.
"""

from __future__ import annotations

import logging
import os
import re
import secrets
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from adamd.protocol.frames import dtype_to_pb
from adamd.protocol.shared_files import (
    HEADER_BYTES,
    MAGIC,
    NONCE,
    SEQ,
    VERSION,
    SharedFile,
    host_id,
)
from adamd.server.core.model import HostedModel
from adamd.server.core.registry import ModelRegistry
from adamd.server.errors import InvalidArgument, SessionExpired
from adamd.v1 import adamd_pb2 as pb

logger = logging.getLogger(__name__)

ALIGN = 64
MAX_SESSIONS_PER_MODEL = 256


def _layout(model: HostedModel) -> tuple[list[str], list[int], int]:
    names, offsets, at = [], [], HEADER_BYTES
    for name, p in model.params.items():
        names.append(name)
        offsets.append(at)
        at += -(-p.numel() * p.element_size() // ALIGN) * ALIGN
    return names, offsets, max(at, HEADER_BYTES)


@dataclass
class _Shared:
    model: HostedModel
    file: SharedFile
    nonce: bytes
    names: list[str]
    offsets: list[int]
    listener: Callable[[int, int], None]
    sessions: dict[str, SharedFile] = field(default_factory=dict)
    grad_views: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)


class SameHost:
    def __init__(self, registry: ModelRegistry, root: str = "/dev/shm"):
        self.registry = registry
        self.root = root if os.path.isdir(root) else None
        self.host = host_id(root) if self.root else ""
        self._shared: dict[str, _Shared] = {}
        self._lock = threading.Lock()
        registry.on_delete.append(self.drop)

    def attach(self, req: pb.AttachRequest) -> pb.AttachReply:
        model = self.registry.get(req.model)
        if self.root is None or not self.host:
            return pb.AttachReply(accepted=False, reason="no /dev/shm on the server")
        if req.host_id != self.host:
            return pb.AttachReply(accepted=False, reason="client and server are on different hosts")
        if model.device.type != "cpu":
            return pb.AttachReply(accepted=False, reason=f"parameters live on {model.device}")
        with self._lock:
            shared = self._shared.get(model.name)
            try:  # both files are reserved in full here (a full tmpfs raises, never SIGBUS later)
                if (
                    shared is None
                    or shared.model is not model
                    or shared.names != list(model.params)
                ):
                    if shared is not None:
                        self._retire(shared)
                        del self._shared[model.name]
                    shared = self._shared[model.name] = self._share(model)
                if len(shared.sessions) >= MAX_SESSIONS_PER_MODEL:
                    return pb.AttachReply(
                        accepted=False, reason="too many same-host sessions on this model"
                    )
                session = secrets.token_hex(8)
                grads = SharedFile(self._path(model.name, session), shared.file.nbytes, create=True)
            except OSError as e:
                return pb.AttachReply(accepted=False, reason=f"no room in {self.root}: {e}")
            shared.sessions[session] = grads
            shared.grad_views[session] = {
                n: grads.view(o, model.params[n].shape, model.params[n].dtype)
                for n, o in zip(shared.names, shared.offsets)
            }
        return pb.AttachReply(
            accepted=True,
            session=session,
            params_path=shared.file.path,
            grads_path=grads.path,
            nbytes=shared.file.nbytes,
            offsets=shared.offsets,
            nonce=shared.nonce,
            tensors=[
                pb.TensorSpec(
                    name=n,
                    dtype=dtype_to_pb(model.params[n].dtype),
                    shape=list(model.params[n].shape),
                )
                for n in shared.names
            ],
            worker_dtypes=(
                [
                    dtype_to_pb(d)
                    for d in model.precision.pull_dtypes(model.params, shared.names, None)
                ]
                if model.precision.master
                else []
            ),
        )

    def grads(self, model: HostedModel, session: str, names: list[str]) -> list[torch.Tensor]:
        """The session's gradient views for a push (SessionExpired: attach again)."""
        shared = self._shared.get(model.name)
        views = (
            shared.grad_views.get(session) if shared is not None and shared.model is model else None
        )
        if views is None or shared is None or shared.names != list(model.params):
            raise SessionExpired(
                f"same-host session {session!r} is not current for model {model.name!r}; attach again"
            )
        missing = [n for n in names if n not in views]
        if missing:
            raise InvalidArgument(f"model {model.name!r} has no parameters {missing}")
        return [views[n] for n in names]

    def detach(self, req: pb.DetachRequest) -> pb.DetachReply:
        with self._lock:
            shared = self._shared.get(req.model)
            if shared is not None and req.session in shared.sessions:
                shared.grad_views.pop(req.session, None)
                _unlink(shared.sessions.pop(req.session).path)
        return pb.DetachReply()

    def session_count(self, model: str) -> int:
        """Same-host sessions attached to `model` now."""
        shared = self._shared.get(model)
        return len(shared.sessions) if shared is not None else 0

    def files(self) -> list[str]:
        """Paths of every shared-memory file this server holds now."""
        with self._lock:
            return [
                path
                for shared in self._shared.values()
                for path in (shared.file.path, *(g.path for g in shared.sessions.values()))
            ]

    def drop(self, name: str) -> None:
        with self._lock:
            shared = self._shared.pop(name, None)
            if shared is not None:
                self._retire(shared)

    def stop(self) -> None:
        with self._lock:
            for shared in self._shared.values():
                self._retire(shared)
            self._shared.clear()

    def start(self) -> None:
        self.remove_orphans()

    def remove_orphans(self) -> list[str]:
        """Unlink files that servers killed without a chance to clean up (kill -9, OOM) left in
        /dev/shm, where they would hold memory until reboot. Ours carry the server's pid."""
        if self.root is None:
            return []
        removed = []
        for entry in os.scandir(self.root):
            m = _FILE.match(entry.name)
            if m is None or _alive(int(m[1])):
                continue
            try:
                if entry.stat().st_uid != os.getuid():
                    continue
                os.unlink(entry.path)
                removed.append(entry.name)
            except OSError:
                continue
        if removed:
            logger.info("removed %d shared-memory files left by dead servers", len(removed))
        return removed

    # --- internals ------------------------------------------------------------------------------

    def _path(self, model: str, what: str) -> str:
        return os.path.join(self.root or "", f"adamd-{os.getpid()}-{model}-{what}")

    def _share(self, model: HostedModel) -> _Shared:
        names, offsets, nbytes = _layout(model)
        nonce = secrets.token_bytes(16)
        file = SharedFile(
            self._path(model.name, "params-" + secrets.token_hex(4)), nbytes, create=True
        )
        with model.locked():
            for name, offset in zip(names, offsets):
                p = model.params[name]
                view = file.view(offset, p.shape, p.dtype)
                view.copy_(p)
                p.data = view  # same tensor object (the optimizer's state stays keyed to it), new storage
            file.write_u64(SEQ, model.write_seq)
            file.write_u64(VERSION, model.version)
            file.map[NONCE : NONCE + len(nonce)] = nonce
            file.map[: len(MAGIC)] = MAGIC

            def mirror(seq: int, version: int, file: SharedFile = file) -> None:
                file.write_u64(VERSION, version)
                file.write_u64(SEQ, seq)

            model.write_listeners.append(mirror)
        logger.info(
            "model %s: parameters shared with same-host clients (%d bytes)", model.name, nbytes
        )
        return _Shared(model, file, nonce, names, offsets, mirror)

    def _retire(self, shared: _Shared) -> None:
        """Readers see the magic vanish and go back to gRPC; the files are unlinked."""
        shared.file.map[: len(MAGIC)] = b"\0" * len(MAGIC)
        if shared.listener in shared.model.write_listeners:
            shared.model.write_listeners.remove(shared.listener)
        _unlink(shared.file.path)
        for grads in shared.sessions.values():
            _unlink(grads.path)
        shared.sessions.clear()
        shared.grad_views.clear()


_FILE = re.compile(r"adamd-(\d+)-")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
