"""The gRPC transport: pushes and pulls as streams of frames (adamd.protocol.frames)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import grpc
import torch

from adamd.client._exceptions import AdamdError
from adamd.client._transport.base import Tensors
from adamd.client._transport.landing import pull_result, pull_targets
from adamd.client._types import PullResult
from adamd.protocol import ProtocolError
from adamd.protocol.frames import decode_frame, dtype_from_pb, identity, iter_frames
from adamd.protocol.pinned import Landing
from adamd.v1 import adamd_pb2 as pb

SERVICE = "/adamd.v1.Optimizer/"


class GrpcTransport:
    """Push and pull over the Client's gRPC channel; always reachable (the last fallback)."""

    def __init__(
        self,
        channel: grpc.Channel,
        kw: Callable[[], dict[str, Any]],
        chunk_bytes: Callable[[], int],
    ):
        """`kw`: the call options (metadata, timeout) now; `chunk_bytes`: bytes per frame now."""
        self.kw, self.chunk_bytes = kw, chunk_bytes
        self.push_stub = channel.stream_unary(
            SERVICE + "PushGrad", identity, pb.PushReply.FromString
        )
        self.pull_stub = channel.unary_stream(
            SERVICE + "PullParams", lambda m: m.SerializeToString(), identity
        )

    def push(
        self, header: pb.PushHeader, tensors: Sequence[torch.Tensor], wire: torch.dtype | None
    ) -> pb.PushReply:
        frames = iter_frames(header.SerializeToString(), tensors, self.chunk_bytes(), wire)
        return self.push_stub(frames, **self.kw())

    def pull(self, request: pb.PullRequest, out: Tensors | None) -> PullResult | None:
        call = self.pull_stub(request, **self.kw())
        frames = iter(call)
        try:
            first = decode_frame(next(frames))
            if first.header is None:
                raise AdamdError("pull reply without a header")
            header = pb.PullHeader.FromString(bytes(first.header))
            if header.not_modified:
                return PullResult(header.version, {}, True)
            landing = Landing()
            sink, finals = pull_targets(header, out, landing)
            if first.data.nbytes:
                sink.write(first.tensor, first.offset, first.data)
            for raw in frames:
                f = decode_frame(raw)
                sink.write(f.tensor, f.offset, f.data)
            sink.check_complete()
        except ProtocolError as exc:
            call.cancel()
            raise AdamdError(f"malformed pull reply: {exc}") from exc
        consistent = dict(call.trailing_metadata() or ()).get("adamd-consistent", "1") == "1"
        if not consistent:
            landing.release()
            return None
        return pull_result(header, finals, landing)

    def step(
        self,
        header: pb.PushHeader,
        tensors: Sequence[torch.Tensor],
        request: pb.PullRequest,
        out: Tensors,
    ) -> tuple[pb.PushReply, PullResult | None]:
        wire = _wire_of(request)
        return self.push(header, tensors, wire), None


def _wire_of(request: pb.PullRequest) -> torch.dtype | None:
    return dtype_from_pb(request.wire_dtype) if request.wire_dtype else None
