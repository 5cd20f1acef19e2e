"""Conversions between wire messages (adamd.v1) and the server core's plain Python values, for
every transport that speaks them (gRPC, and the bulk-data channel's protobuf headers)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from adamd.protocol import ProtocolError, quant
from adamd.protocol.frames import dtype_from_pb, dtype_to_pb, shape_of
from adamd.protocol.hyper import options_from_pb, options_to_pb
from adamd.server.core.model import ASYNC, SYNC, HostedModel, PushMeta, PushResult
from adamd.server.core.registry import ModelSpec
from adamd.server.dataplane import PullAsk
from adamd.server.errors import InvalidArgument
from adamd.v1 import adamd_pb2 as pb

MODE_TO_PB = {SYNC: pb.SYNC, ASYNC: pb.ASYNC}
MODE_FROM_PB = {pb.MODE_UNSPECIFIED: SYNC, pb.SYNC: SYNC, pb.ASYNC: ASYNC}


def specs_from_pb(specs: Sequence[pb.TensorSpec]) -> list[tuple[str, tuple[int, ...], torch.dtype]]:
    out = []
    for s in specs:
        try:
            dtype = dtype_from_pb(s.dtype)
        except ProtocolError as exc:
            raise InvalidArgument(f"tensor {s.name!r}: {exc}") from exc
        if any(d < 0 for d in s.shape):
            raise InvalidArgument(f"tensor {s.name!r} has a negative dimension {list(s.shape)}")
        out.append((s.name, shape_of(s), dtype))
    return out


def group_from_pb(g: pb.ParamGroup) -> dict[str, Any]:
    try:
        return {**options_from_pb(g.options), "params": list(g.params)}
    except (ValueError, TypeError, ProtocolError) as exc:
        raise InvalidArgument(f"bad param group options: {exc}") from exc


def group_to_pb(names: Sequence[str], options: Mapping[str, Any]) -> pb.ParamGroup:
    return pb.ParamGroup(params=list(names), options=options_to_pb(options))


def updates_from_pb(updates: Sequence[pb.GroupUpdate]) -> list[tuple[int, dict[str, Any]]]:
    try:
        return [(u.group, options_from_pb(u.options)) for u in updates]
    except (ValueError, TypeError, ProtocolError) as exc:
        raise InvalidArgument(f"bad hyperparameter update: {exc}") from exc


def model_spec_from_pb(cfg: pb.ModelConfig) -> ModelSpec:
    params = specs_from_pb(cfg.params)
    groups = [group_from_pb(g) for g in cfg.groups] or [{"params": [n for n, _, _ in params]}]
    world_size = cfg.world_size or 1
    if cfg.mode not in MODE_FROM_PB:
        raise InvalidArgument(f"mode {cfg.mode} is not a known mode (SYNC, ASYNC)")
    mode = MODE_FROM_PB[cfg.mode]
    if not (math.isfinite(cfg.round_timeout_s) and cfg.round_timeout_s >= 0):
        raise InvalidArgument(
            f"round_timeout_s must be a finite number >= 0 (0: the server's default),"
            f" got {cfg.round_timeout_s}"
        )
    if not (math.isfinite(cfg.lease_s) and cfg.lease_s >= 0):
        raise InvalidArgument(
            f"lease_s must be a finite number >= 0 (0: the default), got {cfg.lease_s}"
        )
    return ModelSpec(
        name=cfg.model,
        params=params,
        groups=groups,
        world_size=world_size,
        mode=mode,
        max_staleness=cfg.max_staleness,
        round_timeout_s=cfg.round_timeout_s,
        elastic=cfg.elastic,
        lease_s=cfg.lease_s,
        exist_ok=cfg.exist_ok,
        layout=cfg.layout,
        master_dtype=_master_from_pb(cfg.master_dtype),
    )


def _master_from_pb(code: int) -> torch.dtype | None:
    if code == pb.DTYPE_UNSPECIFIED:
        return None
    try:
        return dtype_from_pb(code)
    except ProtocolError as exc:
        raise InvalidArgument(f"master_dtype: {exc}") from exc


def model_info(model: HostedModel, created: bool = False) -> pb.ModelInfo:
    return pb.ModelInfo(
        model=model.name,
        version=model.version,
        mode=MODE_TO_PB[model.mode],
        world_size=model.world_size,
        device=str(model.device),
        params=[
            pb.TensorSpec(name=n, dtype=dtype_to_pb(p.dtype), shape=list(p.shape))
            for n, p in model.params.items()
        ],
        groups=[
            group_to_pb(names, opts) for names, opts in zip(model.group_names(), model.requested)
        ],
        max_staleness=model.max_staleness,
        round_timeout_s=model.round_timeout_s,
        created=created,
        skipped_steps=model.skipped_steps,
        elastic=model.elastic,
        lease_s=model.lease_s,
        layout=model.layout,
        master_dtype=dtype_to_pb(model.precision.master) if model.precision.master else 0,
        worker_dtypes=(
            [dtype_to_pb(model.precision.worker_dtype(n, p.dtype)) for n, p in model.params.items()]
            if model.precision.master
            else []
        ),
    )


def _blocks_from_pb(specs: Sequence[pb.TensorSpec]) -> tuple[int, ...]:
    """Each gradient's int8 block size (0: raw); () when every gradient travels raw."""
    blocks = []
    for s in specs:
        if s.encoding == pb.ENCODING_RAW:
            blocks.append(0)
            continue
        if s.encoding != quant.INT8:
            raise InvalidArgument(f"gradient {s.name!r}: unknown encoding {s.encoding}")
        try:
            quant.check_block(s.block)
        except ProtocolError as exc:
            raise InvalidArgument(f"gradient {s.name!r}: {exc}") from exc
        blocks.append(int(s.block))
    return tuple(blocks) if any(blocks) else ()


def push_meta_from_pb(header: pb.PushHeader) -> PushMeta:
    return PushMeta(
        blocks=_blocks_from_pb(header.grads),
        rank=header.rank,
        version=header.version if header.HasField("version") else None,
        push_id=header.push_id,
        found_inf=header.found_inf,
        loss=header.loss if header.HasField("loss") else None,
        scalars=dict(header.scalars),
        hyper_updates=updates_from_pb(header.hyper_updates),
    )


def push_reply(result: PushResult) -> pb.PushReply:
    return pb.PushReply(
        version=result.version,
        applied=result.applied,
        found_inf=result.found_inf,
        contributors=result.contributors,
        duplicate=result.duplicate,
        partial=result.partial,
    )


def closing_meta(raw: bytes | memoryview | None) -> PushMeta | None:
    """A push's closing header (sent after its gradients), when one came."""
    if raw is None:
        return None
    return push_meta_from_pb(parse_request(pb.PushHeader, bytes(raw)))


def pull_ask_from_pb(request: pb.PullRequest) -> PullAsk:
    try:
        wire = dtype_from_pb(request.wire_dtype) if request.wire_dtype else None
    except ProtocolError as exc:
        raise InvalidArgument(f"wire_dtype: {exc}") from exc
    return PullAsk(
        model=request.model,
        names=list(request.names),
        wire=wire,
        chunk_bytes=request.chunk_bytes,
        if_newer_than=request.if_newer_than if request.HasField("if_newer_than") else None,
        wait_for_version=(
            request.wait_for_version if request.HasField("wait_for_version") else None
        ),
        wait_timeout_s=request.wait_timeout_s,
    )


def parse_request(req_cls: Any, raw: bytes) -> Any:
    """`raw` as a `req_cls` message; bytes that are not one are the caller's INVALID_ARGUMENT."""
    try:
        return req_cls.FromString(raw)
    except Exception as exc:  # protobuf's DecodeError, or a RuntimeWarning-free ValueError
        raise InvalidArgument(
            f"the request is not a valid {req_cls.DESCRIPTOR.full_name}: {exc}"
        ) from None
