"""The one place a call's transport is chosen: same-host shared memory, else the bulk-data
channel, else gRPC streams; each falling back to the next where it cannot be used (Unreachable,
Stalled: the bulk channel turns itself off for a while) or, for a same-host session, where the
server says the session is no longer current (SessionExpired: the model streams from then on).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol, TypeVar

import grpc
import torch

from adamd.client._exceptions import AdamdError, SessionExpired
from adamd.client._tls import TLSConfig, socket_context
from adamd.client._transport.base import Tensors, Transport
from adamd.client._transport.bulk import BulkChannel, BulkTransport, Unreachable
from adamd.client._transport.shm import SameHostTransport
from adamd.client._transport.streams import SERVICE, GrpcTransport
from adamd.client._types import PullResult
from adamd.client._wire import host_of
from adamd.v1 import adamd_pb2 as pb

T = TypeVar("T")
PULL_TRIES = 8  # pulls that found the parameters changing (async steps) before giving up


class Call(Protocol):
    """Client.call: run one attempt, retrying transient failures, mapping errors to ours."""

    def __call__(self, fn: Callable[[], T]) -> T: ...


class Route:
    """The transports one Client has (`bulk`, `shm`: None where not offered) and the order
    they are tried in; `call` runs one attempt with the Client's retries."""

    def __init__(
        self,
        grpc: GrpcTransport,
        bulk: BulkTransport | None,
        shm: SameHostTransport | None,
        call: Call,
    ):
        self.grpc, self.bulk, self.shm, self._call = grpc, bulk, shm, call

    @classmethod
    def open(
        cls,
        channel: grpc.Channel,
        target: str,
        transport: str,
        tls: bool | TLSConfig | None,
        kw: Callable[[], dict[str, Any]],
        metadata: Sequence[tuple[str, str]],
        timeout: float | None,
        chunk_bytes: Callable[[], int],
        call: Call,
    ) -> Route:
        """The route over `channel` to `target`: gRPC always; the bulk-data channel unless
        `transport` is "grpc" (and `target` names a host); same-host sessions when "auto"."""
        streams = GrpcTransport(channel, kw, chunk_bytes)
        bulk = None
        host = host_of(target)
        if transport != "grpc" and host:
            ask = channel.unary_unary(
                SERVICE + "OpenBulk", lambda m: m.SerializeToString(), pb.OpenBulkReply.FromString
            )
            bulk_channel = BulkChannel(
                host,
                lambda: ask(pb.OpenBulkRequest(), metadata=metadata, timeout=10),
                socket_context(tls) if tls else None,
                timeout,
            )
            bulk = BulkTransport(bulk_channel, chunk_bytes)
        shm = SameHostTransport(channel, streams, kw, metadata) if transport == "auto" else None
        return cls(streams, bulk, shm, call)

    def network(self) -> list[Transport]:
        """The transports a call over the network tries now, in order (gRPC last, always)."""
        if self.bulk is not None and self.bulk.usable():
            return [self.bulk, self.grpc]
        return [self.grpc]

    def _first(self, op: Callable[[Transport], T]) -> T:
        *before, last = self.network()
        for transport in before:
            try:
                return op(transport)
            except Unreachable:
                pass  # the next one, now and for a while (BulkChannel.turn_off)
        return op(last)

    def push(
        self,
        header: pb.PushHeader,
        tensors: Sequence[torch.Tensor],
        wire: torch.dtype | None,
        grads: Mapping[str, torch.Tensor] | None = None,
    ) -> pb.PushReply:
        """One push with retries (under its push id: applied once). With `grads` (the tensors
        by name, raw) it goes through the model's same-host session where it fits."""
        if grads is not None and wire is None and self.shm is not None:
            shm = self.shm
            with shm.claim(header, grads) as claimed:
                if claimed is not None:
                    try:
                        return self._call(lambda: shm.push(claimed, (), None))
                    except SessionExpired:
                        # the session went stale (the model changed shape or was re-created)
                        shm.drop(header.model, reattach=False)
        return self._call(lambda: self._first(lambda t: t.push(header, tensors, wire)))

    def pull(self, request: pb.PullRequest, out: Tensors | None) -> PullResult:
        """One pull with retries: one consistent version, from shared memory where it can."""
        if self.shm is not None:
            try:
                return self.shm.pull(request, out)
            except Unreachable:
                pass
        for _ in range(PULL_TRIES):
            result = self._call(lambda: self._first(lambda t: t.pull(request, out)))
            if result is not None:
                return result
        raise AdamdError("parameters kept changing during the pull (async steps); try again")

    def one_exchange(
        self, model: str, grads: Tensors, out: Tensors, wire: torch.dtype | None
    ) -> bool:
        """Whether a step goes as one exchange (bulk STEP) rather than a push and then a pull:
        the bulk channel is usable and the step would not go through shared memory."""
        if self.bulk is None or not self.bulk.usable():
            return False
        cpu = all(t.device.type == "cpu" for t in [*grads.values(), *out.values()])
        return not (
            wire is None and cpu and self.shm is not None and self.shm.session(model) is not None
        )

    def step(
        self,
        header: pb.PushHeader,
        tensors: Sequence[torch.Tensor],
        request: pb.PullRequest,
        out: Tensors,
    ) -> tuple[pb.PushReply, PullResult | None]:
        """One step with retries; the pull's result is None where it must be pulled after."""
        return self._call(lambda: self._first(lambda t: t.step(header, tensors, request, out)))
