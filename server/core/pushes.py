"""What a push is while the server handles it: its metadata, ticket, pending outcome and result.

Plain data shared by rounds.py (which decides pushes), model.py (which steps) and the adapters
(which build a PushMeta from a request header and answer with a PushResult). No logic beyond
`PendingPush.wait` for callers that may block a thread.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from typing import Any

import torch

from adamd.protocol import ProtocolError
from adamd.protocol.frames import TensorSink
from adamd.protocol.quant import DecodingSink
from adamd.server.core.staging import GradSet, StagingPool
from adamd.server.errors import InvalidArgument


@dataclass(frozen=True)
class PushMeta:
    rank: int = 0
    version: int | None = None  # the version the gradient was computed from
    push_id: str = ""
    found_inf: bool = False
    loss: float | None = None
    scalars: Mapping[str, float] = field(default_factory=dict)
    hyper_updates: Sequence[tuple[int, Mapping[str, Any]]] = ()
    # Per gradient in the header's order: its int8 block size (adamd.protocol.quant), 0 where it
    # travels raw; empty: every gradient raw.
    blocks: tuple[int, ...] = ()


@dataclass(frozen=True)
class PushResult:
    version: int
    applied: bool
    found_inf: bool = False
    contributors: int = 1
    duplicate: bool = False
    partial: bool = False


@dataclass(frozen=True)
class StepRecord:
    """What observers (history, metrics, snapshots) learn after each round or async push."""

    model: str
    version: int
    applied: bool
    wall_time: float
    step_seconds: float
    contributors: int
    partial: bool
    ranks: tuple[int, ...]
    losses: tuple[float, ...]
    scalars: Mapping[str, float]
    grads: Mapping[
        str, torch.Tensor
    ]  # the averaged gradients the step used (valid only during the callback and `later`)
    # Work an observer leaves for after the pushes are answered (statistics): run at once, lock
    # still held and `grads` still valid, but no longer in the way of the replies.
    later: list[Callable[[], None]] = field(default_factory=list)


@dataclass
class PushTicket:
    """A push between its header and its last chunk."""

    meta: PushMeta
    names: list[str]
    sink: TensorSink | None  # where streamed chunks go (None: buffers were filled another way)
    grads: GradSet | None  # pooled buffers to give back (None: the caller owns `buffers`)
    buffers: list[torch.Tensor] = field(default_factory=list)  # the gradients, in `names` order
    cached: PushResult | None = None  # a push id already applied
    joined: Future[PushResult] | None = None  # the same push id is in a round now: its outcome
    outcome: Future[PushResult] = field(default_factory=Future)  # this push's, once it is decided
    superseded: bool = False  # a retry of the same id took over while this copy still streamed
    # The bulk channel's STEP: told of each bucket of parameters as soon as the step has updated
    # it (called under the model lock, mid-step: it must only hand the names on).
    on_stepped: Callable[[list[str]], None] | None = None


@dataclass(frozen=True)
class PendingPush:
    """A push accepted into a round (or already decided): its outcome (a failed step: Aborted),
    which callers await without holding a thread (asyncio.wrap_future) or block on with
    `wait()`, and when to give up waiting for missing ranks. Whoever waits calls `expire()` once
    `deadline` (time.monotonic) has passed; the round then steps with the ranks it has, or
    (elastic, a missing worker's lease still good) `expire()` returns the deadline to wait for."""

    outcome: Future[PushResult]
    deadline: float | None = None
    expire: Callable[[], float | None] = lambda: None

    def wait(self) -> PushResult:
        """Block until the outcome is known (for callers that may hold a thread)."""
        deadline = self.deadline
        while True:
            timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                return self.outcome.result(timeout)
            except FutureTimeout:
                deadline = self.expire() or deadline


@dataclass(frozen=True)
class ClosedRound:
    """A round ready to step: what the host applies and then reports to its observers."""

    version: int  # the version its pushes were for
    ranks: tuple[int, ...]  # ascending
    tickets: list[PushTicket]  # in `ranks` order
    grads: dict[str, torch.Tensor]  # the mean per parameter, in place of the first buffer
    found_inf: bool  # some push reported inf/nan: the step is skipped
    partial: bool  # closed by its deadline without some ranks (of world_size, or registered)


def land(
    ticket: PushTicket,
    names: list[str],
    wires: list[torch.dtype],
    blocks: Sequence[int],
    given: Callable[[list[str]], list[torch.Tensor]] | None,
    staging: StagingPool,
    prefetch: Callable[..., Callable[[int], None] | None] | None,
) -> None:
    """Where a push's gradients land: `given` (the same-host session's file, the gradients
    already in place), or a staging set's buffers they stream into through `ticket.sink`, an
    int8-encoded one (`blocks`) through a payload buffer dequantized into it once complete.
    `prefetch(grads, names, buffers)` may give a callback copying each to the device once
    complete. The caller aborts the ticket when this raises."""
    if given is not None:
        if any(blocks):
            raise InvalidArgument(
                "a same-host push carries its gradients raw in the session's file; int8-encoded"
                " gradients stream (gRPC or the bulk channel)"
            )
        ticket.buffers = given(names)
        return
    ticket.grads = staging.acquire()
    ticket.buffers = ticket.grads.take(names)
    early = prefetch(ticket.grads, names, ticket.buffers) if prefetch is not None else None
    if not blocks:
        ticket.sink = TensorSink(ticket.buffers, wires, early)
        return
    try:
        ticket.sink = DecodingSink(ticket.buffers, wires, blocks, early)
    except ProtocolError as exc:
        raise InvalidArgument(str(exc)) from exc
