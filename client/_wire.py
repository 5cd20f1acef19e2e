"""Between the wire's messages and the client's types: headers built, replies read."""

from __future__ import annotations

import uuid
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch

from adamd.client._exceptions import InvalidArgument
from adamd.client._types import ModelInfo, PushResult
from adamd.protocol.frames import (
    TensorSink,
    decode_frame,
    dtype_from_pb,
    dtype_to_pb,
    shape_of,
    spec_of,
    to_wire,
)
from adamd.protocol.hyper import options_from_pb, options_to_pb
from adamd.v1 import adamd_pb2 as pb

_MODES = {"sync": pb.SYNC, "async": pb.ASYNC}


def host_of(address: str) -> str:
    """The host part of "host:port" / "[v6]:port" ("" for other target forms: no bulk channel)."""
    if "://" in address or address.startswith(("unix:", "dns:", "ipv4:", "ipv6:")):
        return ""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        return ""
    return host[1:-1] if host.startswith("[") and host.endswith("]") else host


def model_info(m: pb.ModelInfo) -> ModelInfo:
    return ModelInfo(
        name=m.model,
        version=m.version,
        mode="async" if m.mode == pb.ASYNC else "sync",
        world_size=m.world_size,
        device=m.device,
        params={s.name: (shape_of(s), dtype_from_pb(s.dtype)) for s in m.params},
        param_groups=[{**options_from_pb(g.options), "params": list(g.params)} for g in m.groups],
        max_staleness=m.max_staleness,
        round_timeout_s=m.round_timeout_s,
        created=m.created,
        skipped_steps=m.skipped_steps,
        elastic=m.elastic,
        lease_s=m.lease_s,
        layout=m.layout,
        master_dtype=dtype_from_pb(m.master_dtype) if m.master_dtype else None,
        worker_dtypes={s.name: dtype_from_pb(d) for s, d in zip(m.params, m.worker_dtypes)},
    )


def group_pb(names: Sequence[str], options: Mapping[str, Any]) -> pb.ParamGroup:
    return pb.ParamGroup(params=list(names), options=options_to_pb(options))


def pull_request(
    model: str,
    names: Sequence[str],
    chunk_bytes: int,
    wire: torch.dtype | None,
    *,
    wait_timeout_s: float = 0.0,
    if_newer_than: int | None = None,
    wait_for_version: int | None = None,
) -> pb.PullRequest:
    """A pull of `names` (none: every parameter), in `wire` dtype where one is given."""
    req = pb.PullRequest(
        model=model, names=list(names), wait_timeout_s=wait_timeout_s, chunk_bytes=chunk_bytes
    )
    if if_newer_than is not None:
        req.if_newer_than = if_newer_than
    if wait_for_version is not None:
        req.wait_for_version = wait_for_version
    if wire is not None:
        req.wire_dtype = dtype_to_pb(wire)
    return req


def closing_header(
    loss: float | None, hyper_updates: Sequence[tuple[int, Mapping[str, Any]]]
) -> pb.PushHeader:
    """A streamed push's closing header: its loss and hyperparameter edits replace the opening
    header's."""
    updates = [pb.GroupUpdate(group=i, options=options_to_pb(o)) for i, o in hyper_updates]
    closing = pb.PushHeader(hyper_updates=updates)
    if loss is not None:
        closing.loss = float(loss)
    return closing


def push_header(
    model: str,
    specs: Sequence[pb.TensorSpec],
    *,
    rank: int = 0,
    session: str = "",
    push_id: str | None = None,
    found_inf: bool = False,
    scalars: Mapping[str, float] | None = None,
    hyper_updates: Sequence[tuple[int, Mapping[str, Any]]] = (),
    version: int | None = None,
    loss: float | None = None,
) -> pb.PushHeader:
    header = pb.PushHeader(
        model=model,
        grads=specs,
        rank=rank,
        session=session,
        push_id=push_id or uuid.uuid4().hex,
        found_inf=found_inf,
        scalars=dict(scalars or {}),
        hyper_updates=[pb.GroupUpdate(group=i, options=options_to_pb(o)) for i, o in hyper_updates],
    )
    if version is not None:
        header.version = version
    if loss is not None:
        header.loss = float(loss)
    return header


def push_result(r: pb.PushReply) -> PushResult:
    return PushResult(r.version, r.applied, r.found_inf, r.contributors, r.duplicate, r.partial)


def model_config(
    model: str,
    params: Mapping[str, torch.Tensor],
    *,
    param_groups: Sequence[Mapping[str, Any]] | None,
    world_size: int | str,
    mode: str,
    max_staleness: int,
    round_timeout_s: float,
    lease_s: float,
    exist_ok: bool,
    layout: str,
    master_dtype: torch.dtype | None,
    adam_kwargs: Mapping[str, Any],
) -> tuple[pb.ModelConfig, list[torch.Tensor]]:
    """CreateModel's header (checked: InvalidArgument) and the initial values it streams."""
    if mode not in _MODES:
        raise InvalidArgument(f"mode must be 'sync' or 'async', got {mode!r}")
    elastic = world_size == "elastic"
    if not elastic and not (isinstance(world_size, int) and world_size >= 1):
        raise InvalidArgument(f"world_size must be at least 1 or 'elastic', got {world_size!r}")
    names = list(params)
    groups = param_groups or [{"params": names}]
    tensors = [to_wire(params[n]) for n in names]
    cfg = pb.ModelConfig(
        model=model,
        params=[spec_of(n, t) for n, t in zip(names, tensors)],
        groups=[
            group_pb(g["params"], {**adam_kwargs, **{k: v for k, v in g.items() if k != "params"}})
            for g in groups
        ],
        world_size=0 if elastic else int(world_size),
        mode=_MODES[mode],
        max_staleness=max_staleness,
        round_timeout_s=round_timeout_s,
        elastic=elastic,
        lease_s=lease_s,
        exist_ok=exist_ok,
        layout=layout,
    )
    if master_dtype is not None:
        if master_dtype not in (torch.float32, torch.float64):
            raise InvalidArgument(
                f"master_dtype must be torch.float32 or torch.float64, got {master_dtype}"
            )
        cfg.master_dtype = dtype_to_pb(master_dtype)
    return cfg, tensors


def read_state(frames: Iterator[bytes]) -> dict[str, Any]:
    """GetState's reply as get_state returns it."""
    first = decode_frame(next(frames))
    header = pb.StateHeader.FromString(bytes(first.header or b""))
    tensors = [torch.empty(shape_of(s), dtype=dtype_from_pb(s.dtype)) for s in header.tensors]
    sink = TensorSink(tensors, [t.dtype for t in tensors])
    if first.data.nbytes:
        sink.write(first.tensor, first.offset, first.data)
    for raw in frames:
        f = decode_frame(raw)
        sink.write(f.tensor, f.offset, f.data)
    sink.check_complete()
    return {
        "state": {e.param: {k: tensors[i] for k, i in e.tensors.items()} for e in header.states},
        "param_groups": [
            {**options_from_pb(g.options), "params": list(g.params)} for g in header.groups
        ],
        "version": header.version,
    }


def state_header(
    model: str,
    state: Mapping[str, Mapping[str, torch.Tensor]],
    param_groups: Sequence[Mapping[str, Any]] | None,
) -> tuple[pb.StateHeader, list[torch.Tensor]]:
    """LoadState's header and the tensors it streams."""
    tensors: list[torch.Tensor] = []
    specs, entries = [], []
    for name, entry in state.items():
        index = {}
        for key, value in entry.items():
            t = to_wire(value if isinstance(value, torch.Tensor) else torch.tensor(float(value)))
            index[key] = len(tensors)
            tensors.append(t)
            specs.append(spec_of(f"{name}/{key}", t))
        entries.append(pb.ParamState(param=name, tensors=index))
    groups = [
        group_pb(g["params"], {k: v for k, v in g.items() if k not in ("params", "param_names")})
        for g in (param_groups or ())
    ]
    header = pb.StateHeader(model=model, states=entries, tensors=specs, groups=groups)
    return header, tensors
