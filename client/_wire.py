"""Between the wire's messages and the client's types: headers built, replies read."""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from typing import Any

import grpc
import torch

from adamd.client._types import ModelInfo, PushResult
from adamd.protocol.frames import dtype_from_pb, shape_of
from adamd.protocol.hyper import options_from_pb, options_to_pb
from adamd.v1 import adamd_pb2 as pb

# grpc's details for a call cancelled on this side (by the application, or because the request
# iterator raised): not transient.
_LOCAL_CANCEL = ("Locally cancelled", "Exception iterating requests", "Exception serializing")


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


def transient(err: grpc.RpcError) -> grpc.StatusCode | None:
    """The call's status code, with a cancel by the server counted as UNAVAILABLE: a server that
    stops past its grace period cancels the calls still in flight (adamd answers UNAVAILABLE
    itself first, but work running on its threads at that moment cannot be cut short). Every
    call is safe to repeat (pushes by their id), so a training loop never sees a restart."""
    code = err.code() if hasattr(err, "code") else None
    if code == grpc.StatusCode.CANCELLED:
        details = (err.details() if hasattr(err, "details") else None) or ""
        if not any(mark in details for mark in _LOCAL_CANCEL):
            return grpc.StatusCode.UNAVAILABLE
    return code


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


def on_cpu(tensors: Mapping[str, torch.Tensor]) -> bool:
    return all(t.device.type == "cpu" for t in tensors.values())


def push_result(r: pb.PushReply) -> PushResult:
    return PushResult(r.version, r.applied, r.found_inf, r.contributors, r.duplicate, r.partial)
