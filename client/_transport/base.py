"""The one interface every way of moving tensors implements: push, pull, step.

GrpcTransport (client/_transport/streams.py) streams frames over gRPC, BulkTransport
(client/_transport/bulk.py) uses the raw-socket bulk channel and SameHostTransport
(client/_transport/shm.py) the same-host shared-memory files. Which one a call uses, and what it
falls back to, is chosen in one place: client/_transport/route.py. A transport that cannot be
used for this call raises Unreachable (the route tries the next); every other failure is the
call's (grpc.RpcError, or a FailedCall such as BulkError, which Client.call retries or maps).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Protocol

import torch

from adamd.client._types import PullResult
from adamd.v1 import adamd_pb2 as pb

Tensors = Mapping[str, torch.Tensor]


class Transport(Protocol):
    def push(
        self, header: pb.PushHeader, tensors: Sequence[torch.Tensor], wire: torch.dtype | None
    ) -> pb.PushReply:
        """Send one push (header, then `tensors` in `wire` dtype); the server's reply."""
        ...

    def pull(self, request: pb.PullRequest, out: Tensors | None) -> PullResult | None:
        """One pull; None where the bytes were not one version (the route asks again)."""
        ...

    def step(
        self,
        header: pb.PushHeader,
        tensors: Sequence[torch.Tensor],
        request: pb.PullRequest,
        out: Tensors,
    ) -> tuple[pb.PushReply, PullResult | None]:
        """A push and then a pull of `request` into `out`: in one exchange where the transport
        has one (bulk STEP), else the push alone (None: the route pulls after)."""
        ...
