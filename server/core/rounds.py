"""The exactly-once ledger and the rounds that turn pushes into steps (the data a push carries
on its way is in pushes.py).

A push travels: `Rounds.open` (header: a push id already decided is answered from the ledger, one
still in flight is joined, a new one gets its own outcome future), then `Rounds.finish` (the whole
gradient is checked, then sync pushes join the current round and async pushes form a round of one),
then, once the round is complete or its deadline passed, the round is closed: gradients are summed
in rank order and divided by their count, the host (HostedModel) applies one step, the ledger keeps
each push id's result, observers hear of the step, and every push's future is decided. A failed
step decides them with `Aborted` and changes nothing, so the same pushes may be sent again.

Elastic mode is sync mode over a changing set of workers (membership.py): a push renews its
rank's lease, a round is complete once every registered rank has pushed, and its deadline is the
first lease expiry among the ranks it still lacks (or the round timeout, if sooner): at that time
`expire()` drops lapsed ranks and closes the round if nobody live is missing.

Nothing here waits: callers get a `PendingPush` whose future they await (asyncio.wrap_future) or
block on, and call its `expire()` once its deadline has passed. Everything runs under the host's
lock, which `Rounds` shares.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field, replace
from typing import Protocol

import torch

from adamd.protocol import ProtocolError
from adamd.protocol.frames import all_finite, trainable
from adamd.server.core.gradients import rank_ordered_mean
from adamd.server.core.membership import Membership
from adamd.server.core.pushes import (
    ClosedRound,
    PendingPush,
    PushMeta,
    PushResult,
    PushTicket,
    StepRecord,
)
from adamd.server.core.staging import StagingPool
from adamd.server.errors import (
    Aborted,
    DuplicatePush,
    InvalidArgument,
    NonFiniteGradient,
    StalePush,
)

logger = logging.getLogger(__name__)

SYNC, ASYNC = "sync", "async"
RESULTS_KEPT = 16384  # push ids remembered for exactly-once


class RoundHost(Protocol):
    """What `Rounds` needs of the model it serves (HostedModel)."""

    @property
    def version(self) -> int: ...

    def apply_round(self, closed: ClosedRound) -> None:
        """Step with the round's gradients; on failure raise with nothing changed."""


@dataclass
class _Round:
    version: int
    started: float
    entries: dict[int, PushTicket] = field(default_factory=dict)


class Ledger:
    """Exactly-once bookkeeping: results of decided push ids (the newest RESULTS_KEPT) and the
    outcome futures of push ids still streaming or waiting in a round. Host lock held."""

    def __init__(self) -> None:
        self.results: OrderedDict[str, PushResult] = OrderedDict()
        self.inflight: dict[str, Future[PushResult]] = {}
        self.streaming: dict[str, PushTicket] = {}  # in flight and still receiving its gradient

    def record(self, push_id: str, result: PushResult) -> None:
        self.results[push_id] = result
        while len(self.results) > RESULTS_KEPT:
            self.results.popitem(last=False)

    def join(self, push_id: str) -> Future[PushResult]:
        """The outcome of an in-flight push id, answered as a duplicate (errors passed on)."""
        joined: Future[PushResult] = Future()

        def relay(done: Future[PushResult]) -> None:
            exc = done.exception()
            if exc is not None:
                joined.set_exception(exc)
            else:
                joined.set_result(replace(done.result(), duplicate=True))

        self.inflight[push_id].add_done_callback(relay)
        return joined


class Rounds:
    """The push protocol of one model: ledger, sync rounds or async pushes, round expiry."""

    def __init__(
        self,
        name: str,
        host: RoundHost,
        lock: threading.RLock,
        staging: StagingPool,
        *,
        world_size: int,
        mode: str,
        max_staleness: int,
        round_timeout_s: float,
        lease_s: float | None = None,
    ):
        check_settings(world_size, mode, elastic=lease_s is not None)
        self.name = name
        self.world_size = world_size
        self.mode = mode
        self.max_staleness = max_staleness
        self.round_timeout_s = round_timeout_s
        # Elastic mode: the live workers (None: a fixed world_size).
        self.members = None if lease_s is None else Membership(lease_s)
        self.ledger = Ledger()
        self._current: _Round | None = None  # the open sync round
        self.observers: list[Callable[[StepRecord], None]] = []  # told of every closed round
        self.last_heard: dict[int, tuple[float, int]] = {}  # rank -> (time, version pushed from)
        self._host = host
        self._lock = lock
        self._staging = staging

    def open_ranks(self) -> tuple[int, ...] | None:
        """Ranks waiting in the open sync round (None: no round is open)."""
        with self._lock:
            return None if self._current is None else tuple(sorted(self._current.entries))

    def check_header(
        self,
        meta: PushMeta,
        specs: Sequence[tuple[str, tuple[int, ...], torch.dtype]],
        params: Mapping[str, torch.Tensor],
    ) -> list[str]:
        """The names a push's header announces, once its rank and gradient specs are valid."""
        if self.mode == SYNC and self.members is None and not 0 <= meta.rank < self.world_size:
            raise InvalidArgument(
                f"rank {meta.rank} outside 0..{self.world_size - 1} for world_size {self.world_size}"
            )
        names = []
        for name, shape, dtype in specs:
            p = params.get(name)
            if p is None:
                raise InvalidArgument(f"model {self.name!r} has no parameter {name!r}")
            if tuple(p.shape) != tuple(shape):
                raise InvalidArgument(
                    f"gradient {name!r} has shape {list(shape)}, parameter has {list(p.shape)}"
                )
            if not trainable(dtype) or dtype.is_complex != p.dtype.is_complex:
                raise InvalidArgument(
                    f"gradient {name!r} has dtype {dtype}, parameter has {p.dtype}: need a"
                    " float dtype (complex for a complex parameter)"
                )
            names.append(name)
        if len(set(names)) != len(names):
            raise InvalidArgument("a push names the same parameter twice")
        return names

    def open(self, meta: PushMeta, names: list[str]) -> PushTicket:
        """A ticket for a push whose header was checked: answered from the ledger, joined to the
        same push id in flight, or new (its id now in flight; buffers still to be attached)."""
        with self._lock:
            if self.members is not None:
                self.members.renew(meta.rank)  # heard from: even a retry or a stale push
            pid = meta.push_id
            if pid and pid in self.ledger.results:
                return PushTicket(meta, names, None, None, cached=self.ledger.results[pid])
            if pid and pid in self.ledger.inflight:
                first = self.ledger.streaming.get(pid)
                if first is None:  # checked and queued or stepping: its outcome is the answer
                    return PushTicket(meta, names, None, None, joined=self.ledger.join(pid))
                # The first copy is still arriving, but a client sends again only after it lost
                # the connection: that copy will never finish well. The retry takes its place.
                first.superseded = True
            ticket = PushTicket(meta, names, None, None)
            if pid:
                self.ledger.inflight[pid] = ticket.outcome
                self.ledger.streaming[pid] = ticket
            return ticket

    def abort(self, ticket: PushTicket) -> None:
        """The push's stream failed: forget it (a retry with the same id may come)."""
        with self._lock:
            if ticket.cached is None and ticket.joined is None:
                self._forget(ticket)
                _settle(
                    ticket.outcome,
                    error=StalePush(
                        f"push {ticket.meta.push_id} did not complete; push again with a new id"
                    ),
                )
            self._release(ticket)

    def _forget(self, ticket: PushTicket) -> None:
        """Take the ticket's push id out of flight, unless a retry holds it now. Lock held."""
        pid = ticket.meta.push_id
        if self.ledger.inflight.get(pid) is ticket.outcome:
            del self.ledger.inflight[pid]
        if self.ledger.streaming.get(pid) is ticket:
            del self.ledger.streaming[pid]

    def finish(self, ticket: PushTicket) -> PendingPush:
        """Check the whole gradient, then step (async) or join the round (sync). Never blocks
        on other workers: the returned PendingPush says when the outcome is known."""
        if ticket.cached is not None:
            done: Future[PushResult] = Future()
            done.set_result(replace(ticket.cached, duplicate=True))
            return PendingPush(done)
        if ticket.joined is not None:
            return PendingPush(ticket.joined)
        pid = ticket.meta.push_id
        with self._lock:
            if self.ledger.streaming.get(pid) is ticket:
                del self.ledger.streaming[pid]
        if ticket.superseded:
            self.abort(ticket)
            raise StalePush(
                f"push {ticket.meta.push_id} was sent again while this copy still arrived;"
                " the newer copy counts"
            )
        try:
            self._check_gradient(ticket)
            if self.mode == ASYNC:
                return self._push_async(ticket)
            return self._push_sync(ticket)
        except Exception:
            self.abort(ticket)
            raise

    def _check_gradient(self, ticket: PushTicket) -> None:
        try:
            if ticket.sink is not None:
                ticket.sink.check_complete()
        except ProtocolError as exc:
            raise InvalidArgument(str(exc)) from exc
        if ticket.meta.found_inf:
            return  # the step is skipped whatever the values
        for name, buf in zip(ticket.names, ticket.buffers):
            if not all_finite(buf):
                raise NonFiniteGradient(
                    f"gradient {name!r} holds inf or nan; the push was rejected and nothing changed"
                    " (AMP: unscale first, or send found_inf so the step is skipped)"
                )

    def _push_async(self, ticket: PushTicket) -> PendingPush:
        meta = ticket.meta
        with self._lock:
            version = self._host.version
            if meta.version is not None and version - meta.version > self.max_staleness:
                raise StalePush(
                    f"gradient computed from version {meta.version}, model is at {version}:"
                    f" more than max_staleness={self.max_staleness} versions old; pull and recompute"
                )
            self._close(_Round(version, time.monotonic(), {meta.rank: ticket}), partial=False)
            return PendingPush(ticket.outcome)

    def _push_sync(self, ticket: PushTicket) -> PendingPush:
        meta = ticket.meta
        with self._lock:
            version = self._host.version
            if meta.version is not None and meta.version != version:
                raise StalePush(
                    f"sync push computed from version {meta.version}, but the round is for version"
                    f" {version}; pull the current parameters and recompute"
                )
            rnd = self._current
            if rnd is None:
                rnd = self._current = _Round(version, time.monotonic())
            if meta.rank in rnd.entries:
                raise DuplicatePush(f"rank {meta.rank} already pushed for version {rnd.version}")
            rnd.entries[meta.rank] = ticket
            if self._complete(rnd):
                self._close(rnd, partial=False)
            return PendingPush(ticket.outcome, self._deadline(rnd), lambda: self._expire(rnd))

    def _complete(self, rnd: _Round) -> bool:
        """Every worker has pushed: world_size ranks, or (elastic) every rank still live."""
        if self.members is None:
            return len(rnd.entries) == self.world_size
        return self.members.live() <= rnd.entries.keys()

    def _deadline(self, rnd: _Round) -> float:
        """When to stop waiting: the round timeout, or (elastic) the first lease to lapse among
        the ranks still missing, if sooner."""
        timeout = rnd.started + self.round_timeout_s
        if self.members is None:
            return timeout
        lapse = self.members.first_expiry(self.members.live() - rnd.entries.keys())
        return timeout if lapse is None else min(timeout, lapse)

    def join(self, rank: int | None) -> int:
        """Elastic mode: register a worker (a rank of its own when `rank` is None)."""
        with self._lock:
            if self.members is None:
                raise InvalidArgument(f"model {self.name!r} is not elastic; pass its rank")
            return self.members.join(rank)

    def leave(self, rank: int) -> bool:
        """Elastic mode: deregister `rank`; the open round closes if it waited only for it."""
        with self._lock:
            if self.members is None:
                raise InvalidArgument(f"model {self.name!r} is not elastic")
            left = self.members.leave(rank)
            rnd = self._current
            if rnd is not None and rnd.entries and self._complete(rnd):
                self._close(rnd, partial=False)
            return left

    def _expire(self, rnd: _Round) -> float | None:
        """The round's deadline passed: step with the ranks it has (a no-op once it ended).
        Elastic, before the round timeout: step once no live rank is missing, else return the
        next deadline."""
        with self._lock:
            if self._current is not rnd:
                return None
            if self.members is not None and time.monotonic() < rnd.started + self.round_timeout_s:
                if self._complete(rnd):
                    self._close(rnd, partial=True)
                    return None
                return self._deadline(rnd)
            if time.monotonic() < rnd.started + self.round_timeout_s:
                return None
            logger.warning(
                "model %s: round for version %d timed out after %.1fs with ranks %s of %d;"
                " stepping without the rest",
                self.name,
                rnd.version,
                self.round_timeout_s,
                sorted(rnd.entries),
                self.world_size,
            )
            self._close(rnd, partial=True)
            return None

    def _close(self, rnd: _Round, partial: bool) -> None:
        """Average in rank order, have the host step once, decide every push. Lock held."""
        t0 = time.perf_counter()
        ranks = tuple(sorted(rnd.entries))
        tickets = [rnd.entries[r] for r in ranks]
        found_inf = any(t.meta.found_inf for t in tickets)
        grads = {} if found_inf else rank_ordered_mean(tickets)
        closed = ClosedRound(rnd.version, ranks, tickets, grads, found_inf, partial)
        try:
            self._host.apply_round(closed)
        except Exception as exc:
            # Not expected (inputs are checked first), but never leave the round open: that would
            # answer every later push with DuplicatePush. The pushes fail and may be retried.
            logger.exception("model %s: step for version %d failed", self.name, rnd.version)
            self._end(rnd, tickets, error=exc)
            return
        result = PushResult(
            version=self._host.version,
            applied=not found_inf,
            found_inf=found_inf,
            contributors=len(tickets),
            partial=partial,
        )
        # Recorded before observers run: a snapshot taken by one must hold these push ids.
        for t in tickets:
            if t.meta.push_id:
                self.ledger.record(t.meta.push_id, result)
        record = self._observe(closed, result, time.perf_counter() - t0)
        try:
            self._end(rnd, tickets, result=result, release=False)
        finally:
            for work in record.later:  # statistics: after the replies, before the buffers go
                try:
                    work()
                except Exception:
                    logger.exception("deferred observer work of model %s failed", self.name)
            for t in tickets:
                self._release(t)

    def _observe(self, closed: ClosedRound, result: PushResult, seconds: float) -> StepRecord:
        """After the step and the ledger: note who was heard from, then tell observers."""
        record = StepRecord(
            model=self.name,
            version=result.version,
            applied=result.applied,
            wall_time=time.time(),
            step_seconds=seconds,
            contributors=result.contributors,
            partial=closed.partial,
            ranks=closed.ranks,
            losses=tuple(t.meta.loss for t in closed.tickets if t.meta.loss is not None),
            scalars={k: v for t in closed.tickets for k, v in t.meta.scalars.items()},
            grads=closed.grads,
        )
        for t in closed.tickets:
            pushed_from = t.meta.version if t.meta.version is not None else closed.version
            self.last_heard[t.meta.rank] = (record.wall_time, pushed_from)
        for observer in list(self.observers):
            try:
                observer(record)
            except Exception:
                logger.exception("observer of model %s failed", self.name)
        return record

    def _end(
        self,
        rnd: _Round,
        tickets: Sequence[PushTicket],
        *,
        result: PushResult | None = None,
        error: BaseException | None = None,
        release: bool = True,
    ) -> None:
        """Release the round's buffers (unless the caller still needs them) and decide its
        pushes with `result` or `error`. Lock held."""
        if release:
            for t in tickets:
                self._release(t)
        if self._current is rnd:
            self._current = None
        failed = None
        if error is not None:
            failed = Aborted(
                f"the step for version {rnd.version} failed ({type(error).__name__}: {error});"
                " nothing was applied and the push may be sent again"
            )
        for t in tickets:
            self._forget(t)
            _settle(t.outcome, result, failed)

    def _release(self, ticket: PushTicket) -> None:
        if ticket.grads is not None:
            self._staging.release(ticket.grads)
            ticket.grads = None


def check_settings(world_size: int, mode: str, elastic: bool = False) -> None:
    if elastic and mode != SYNC:
        raise InvalidArgument("elastic workers need sync mode (async pushes need no rounds)")
    if world_size < 1 and not elastic:
        raise InvalidArgument(f"world_size must be at least 1, got {world_size}")
    if mode not in (SYNC, ASYNC):
        raise InvalidArgument(f"mode must be 'sync' or 'async', got {mode!r}")


def _settle(
    fut: Future[PushResult], result: PushResult | None = None, error: BaseException | None = None
) -> None:
    """Decide a push's future, unless its waiter already cancelled it."""
    if not fut.set_running_or_notify_cancel():
        return
    if error is not None:
        fut.set_exception(error)
    else:
        fut.set_result(result)  # type: ignore[arg-type]
