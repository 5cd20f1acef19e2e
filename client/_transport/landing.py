"""Where a pull's tensors land, for every transport that streams them (gRPC, the bulk channel)."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from adamd.client._exceptions import InvalidArgument
from adamd.client._types import PullResult
from adamd.protocol.frames import TensorSink, dtype_from_pb, shape_of
from adamd.protocol.pinned import Landing
from adamd.v1 import adamd_pb2 as pb

Finals = dict[str, tuple[torch.Tensor | None, torch.Tensor, bool]]


def pull_targets(
    header: pb.PullHeader, out: Mapping[str, torch.Tensor] | None, landing: Landing
) -> tuple[TensorSink, dict[str, tuple[torch.Tensor | None, torch.Tensor, bool]]]:
    """Where a pull's tensors land: `out`'s tensors themselves where they are contiguous CPU
    tensors, pinned host buffers from `landing` for device tensors (a GPU worker's parameters),
    else new ones (copied into `out` by pull_result)."""
    targets, finals = [], {}
    for s in header.tensors:
        shape, dtype = shape_of(s), dtype_from_pb(s.dtype)
        dst = out.get(s.name) if out is not None else None
        if dst is not None and tuple(dst.shape) != shape:
            raise InvalidArgument(
                f"out[{s.name!r}] has shape {list(dst.shape)}, server sent {list(shape)}"
            )
        direct = dst is not None and dst.device.type == "cpu" and dst.is_contiguous()
        if dst is not None and direct:
            buf = dst.detach()
        elif dst is not None and dst.device.type != "cpu":
            buf = landing.buffer_for(dst)  # copied up by landing.finish
            direct = True
        else:
            buf = torch.empty(shape, dtype=dst.dtype if dst is not None else dtype)
        targets.append(buf)
        finals[s.name] = (dst, buf, direct)
    return TensorSink(targets, [dtype_from_pb(s.dtype) for s in header.tensors]), finals


def pull_result(
    header: pb.PullHeader,
    finals: Mapping[str, tuple[torch.Tensor | None, torch.Tensor, bool]],
    landing: Landing,
) -> PullResult:
    landing.finish()
    params = {}
    with torch.no_grad():
        for s in header.tensors:
            dst, buf, direct = finals[s.name]
            if dst is not None and not direct:
                dst.copy_(buf)
            params[s.name] = dst if dst is not None else buf
    return PullResult(header.version, params)
