"""A hosted model: named parameters, a real torch.optim.Adam over them, and its push semantics.

No networking here. Adapters call `begin_push` with a push's header, write its chunks into the
returned ticket's sink, then call `finish_push`, which validates the whole gradient before
anything changes, then (sync) joins the current round or (async) steps at once. A push that fails
anywhere leaves parameters and optimizer state bitwise unchanged.

Versions: a model starts at version 0 and gains 1 per applied step. Sync mode gathers one push per
rank for the current version, sums them in rank order (so the result does not depend on arrival
order), divides by the number of contributors and steps once. Async mode steps on every push whose
gradient is at most `max_staleness` versions old and rejects older ones (StalePush). A push id
seen before is never applied twice: its first result is returned again.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from typing import Any

import torch

from adamd.protocol import ProtocolError
from adamd.protocol.frames import TensorSink, trainable
from adamd.protocol.hyper import IMPLEMENTATION_KEYS, same_value

from . import options as adam_options
from .cuda_step import GraphedStep
from .errors import Aborted, DuplicatePush, InvalidArgument, NonFiniteGradient, StalePush
from .staging import GradSet, StagingPool

logger = logging.getLogger(__name__)

SYNC, ASYNC = "sync", "async"
_RESULTS_KEPT = 16384  # push ids remembered for exactly-once


@dataclass(frozen=True)
class PushMeta:
    rank: int = 0
    version: int | None = None  # the version the gradient was computed from
    push_id: str = ""
    found_inf: bool = False
    loss: float | None = None
    scalars: Mapping[str, float] = field(default_factory=dict)
    hyper_updates: Sequence[tuple[int, Mapping[str, Any]]] = ()


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
    ]  # the averaged gradients the step used (valid only during the callback)


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


@dataclass
class _Round:
    version: int
    started: float
    entries: dict[int, PushTicket] = field(default_factory=dict)


@dataclass(frozen=True)
class PendingPush:
    """A push accepted into a round (or already decided): its outcome (a failed step: Aborted),
    which callers await without holding a thread (asyncio.wrap_future) or block on with
    `wait()`, and when to give up waiting for missing ranks. Whoever waits calls `expire()` once `deadline` (time.monotonic)
    has passed; the round then steps with the ranks it has."""

    outcome: Future[PushResult]
    deadline: float | None = None
    expire: Callable[[], None] = lambda: None

    def wait(self) -> PushResult:
        """Block until the outcome is known (for callers that may hold a thread)."""
        while True:
            timeout = None if self.deadline is None else max(0.0, self.deadline - time.monotonic())
            try:
                return self.outcome.result(timeout)
            except FutureTimeout:
                self.expire()


class HostedModel:
    def __init__(
        self,
        name: str,
        params: Mapping[str, torch.Tensor],
        groups: Sequence[Mapping[str, Any]],
        *,
        device: torch.device,
        world_size: int = 1,
        mode: str = SYNC,
        max_staleness: int = 16,
        round_timeout_s: float = 60.0,
    ):
        if world_size < 1:
            raise InvalidArgument(f"world_size must be at least 1, got {world_size}")
        if mode not in (SYNC, ASYNC):
            raise InvalidArgument(f"mode must be 'sync' or 'async', got {mode!r}")
        self.name = name
        self.device = device
        self.world_size = world_size
        self.mode = mode
        self.max_staleness = max_staleness
        self.round_timeout_s = round_timeout_s
        self.params: dict[str, torch.Tensor] = dict(params)
        self.requested: list[dict[str, Any]] = []  # options as clients asked, per group
        self.optimizer = torch.optim.Adam([torch.zeros(1, device=device)])  # replaced below
        self.optimizer.param_groups.clear()
        for group in groups:
            self._append_group(group)
        self.version = 0
        self.skipped_steps = 0
        self.created_at = time.time()
        self.last_step_at: float | None = None
        self.observers: list[Callable[[StepRecord], None]] = []
        # Called under the lock after an edit that is not a step (hyperparameters, a new param
        # group, loaded state): snapshots count these as changes too.
        self.edit_listeners: list[Callable[[], None]] = []
        self._lock = threading.RLock()
        self._seq = 0  # odd while parameters are being written (readers retry)
        self.write_listeners: list[
            Callable[[int, int], None]
        ] = []  # (seq, version) on every change
        self._round: _Round | None = None
        self._results: OrderedDict[str, PushResult] = OrderedDict()
        # push id -> its outcome, while it streams or waits in a round (a retry joins it)
        self._inflight: dict[str, Future[PushResult]] = {}
        self._version_waiters: list[tuple[int, Future[None]]] = []
        # On CUDA: static device gradients, early uploads, graph-captured steps (cuda_step.py).
        self.graphed = (
            GraphedStep(self.optimizer, self.params, device) if device.type == "cuda" else None
        )
        self._pool = self.graphed.staging if self.graphed else StagingPool(self.params, pin=False)
        self._device_grads: dict[str, torch.Tensor] = self.graphed.grads if self.graphed else {}
        self.last_heard: dict[int, tuple[float, int]] = {}  # rank -> (time, version pushed from)

    # --- param groups and hyperparameters ------------------------------------------------------

    def _append_group(self, group: Mapping[str, Any]) -> None:
        names = list(group["params"])
        opts = {k: v for k, v in group.items() if k != "params"}
        adam_options.validate(opts, self.device)
        taken = {n for g in self.optimizer.param_groups for n in g["param_names"]}
        for n in names:
            if n not in self.params:
                raise InvalidArgument(f"param group names unknown parameter {n!r}")
            if n in taken:
                raise InvalidArgument(f"parameter {n!r} appears in more than one param group")
        params = [self.params[n] for n in names]
        eff = adam_options.effective(opts, self.device, params)
        unique = list(dict.fromkeys(names))
        try:
            self.optimizer.add_param_group(
                {"params": [self.params[n] for n in unique], "param_names": unique, **eff}
            )
        except (ValueError, RuntimeError, TypeError) as exc:
            raise InvalidArgument(str(exc)) from exc
        if len(unique) != len(names):
            # A parameter listed twice steps twice per step, as in torch.optim.Adam (which warns
            # and proceeds; the client warned already, and a warning here would go to the log).
            group = self.optimizer.param_groups[-1]
            group["params"], group["param_names"] = params, names
        self.requested.append({**adam_options.ADAM_DEFAULTS, **opts})

    def _group_options_of(self, p: torch.Tensor) -> Mapping[str, Any]:
        return next(g for g in self.optimizer.param_groups if any(q is p for q in g["params"]))

    def group_names(self) -> list[list[str]]:
        return [list(g["param_names"]) for g in self.optimizer.param_groups]

    def add_param_group(
        self, new_params: Mapping[str, torch.Tensor], group: Mapping[str, Any]
    ) -> None:
        with self._lock:
            clash = [n for n in new_params if n in self.params]
            if clash:
                raise InvalidArgument(f"parameters {clash} exist already")
            self.params.update(new_params)
            try:
                self._append_group(group)
            except Exception:
                for n in new_params:
                    del self.params[n]
                raise
            if self.graphed is not None:
                self.graphed.invalidate()
            self._edited()

    def _edited(self) -> None:
        for listener in list(self.edit_listeners):
            listener()

    def check_updates(self, updates: Sequence[tuple[int, Mapping[str, Any]]]) -> None:
        for index, opts in updates:
            if not 0 <= index < len(self.optimizer.param_groups):
                raise InvalidArgument(
                    f"param group {index} does not exist (model has {len(self.optimizer.param_groups)})"
                )
            merged = {**self.requested[index], **opts}
            adam_options.validate(merged, self.device)
            for key in opts:
                if key in IMPLEMENTATION_KEYS and not same_value(
                    opts[key], self.requested[index][key]
                ):
                    raise InvalidArgument(f"{key} cannot change after creation")
            if merged.get("amsgrad") and not self.requested[index].get("amsgrad"):
                group = self.optimizer.param_groups[index]
                if any(
                    self.optimizer.state.get(p) and "max_exp_avg_sq" not in self.optimizer.state[p]
                    for p in group["params"]
                ):
                    raise InvalidArgument(
                        f"amsgrad cannot be turned on in param group {index} after it has stepped"
                        " (torch.optim.Adam fails its next step the same way: no max_exp_avg_sq)"
                    )

    def _apply_updates(
        self, updates: Sequence[tuple[int, Mapping[str, Any]]]
    ) -> Callable[[], None]:
        """Apply checked hyperparameter updates; returns what puts the old values back."""
        old = [
            (
                index,
                {k: self.requested[index][k] for k in opts},
                {k: _value_copy(self.optimizer.param_groups[index].get(k)) for k in opts},
            )
            for index, opts in updates
        ]
        for index, opts in updates:
            group = self.optimizer.param_groups[index]
            for key, value in opts.items():
                self.requested[index][key] = value
                _set_group_value(group, key, value)

        def undo() -> None:
            for index, requested, values in reversed(old):
                self.requested[index].update(requested)
                for key, value in values.items():
                    _set_group_value(self.optimizer.param_groups[index], key, value)

        return undo

    def set_hyperparams(self, updates: Sequence[tuple[int, Mapping[str, Any]]]) -> None:
        with self._lock:
            self.check_updates(updates)
            self._apply_updates(updates)
            self._edited()

    # --- pushes --------------------------------------------------------------------------------

    def begin_push(
        self,
        meta: PushMeta,
        specs: Sequence[tuple[str, tuple[int, ...], torch.dtype]],
        buffers: Callable[[list[str]], list[torch.Tensor]] | None = None,
    ) -> PushTicket:
        """Check a push's header and hand out buffers for its chunks. Changes nothing visible.

        `buffers`, when given, supplies gradients already in place (the same-host path) instead
        of pooled buffers to stream into."""
        if self.mode == SYNC and not 0 <= meta.rank < self.world_size:
            raise InvalidArgument(
                f"rank {meta.rank} outside 0..{self.world_size - 1} for world_size {self.world_size}"
            )
        names = []
        for name, shape, dtype in specs:
            p = self.params.get(name)
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
            if p.is_complex():
                refusal = adam_options.fused_refusal(self._group_options_of(p), p)
                if refusal is not None:
                    raise InvalidArgument(refusal)
            names.append(name)
        if len(set(names)) != len(names):
            raise InvalidArgument("a push names the same parameter twice")
        self.check_updates(meta.hyper_updates)
        with self._lock:
            if meta.push_id and meta.push_id in self._results:
                return PushTicket(meta, names, None, None, cached=self._results[meta.push_id])
            if meta.push_id and meta.push_id in self._inflight:
                return PushTicket(meta, names, None, None, joined=self._joined(meta.push_id))
            outcome: Future[PushResult] = Future()
            if meta.push_id:
                self._inflight[meta.push_id] = outcome
        if buffers is not None:
            try:
                given = buffers(names)
            except Exception:
                self.abort_push(PushTicket(meta, names, None, None, outcome=outcome))
                raise
            return PushTicket(meta, names, None, None, given, outcome=outcome)
        grads = self._pool.acquire()
        targets = grads.take(names)
        early = None
        if self.graphed is not None:  # copy each gradient to the device as soon as it is complete
            sole = self.mode == ASYNC or self.world_size == 1
            early = self.graphed.prefetch(grads, names, targets, sole=sole)
        sink = TensorSink(targets, [d for _, _, d in specs], early)
        return PushTicket(meta, names, sink, grads, targets, outcome=outcome)

    def abort_push(self, ticket: PushTicket) -> None:
        """The push's stream failed: forget it (a retry with the same id may come)."""
        with self._lock:
            if ticket.cached is None and ticket.joined is None:
                self._inflight.pop(ticket.meta.push_id, None)
                _settle(
                    ticket.outcome,
                    error=StalePush(
                        f"push {ticket.meta.push_id} did not complete; push again with a new id"
                    ),
                )
            if ticket.grads is not None:
                self._pool.release(ticket.grads)
                ticket.grads = None

    def finish_push(self, ticket: PushTicket) -> PendingPush:
        """Check the whole gradient, then step (async) or join the round (sync). Never blocks
        on other workers: the returned PendingPush says when the outcome is known."""
        if ticket.cached is not None:
            return _decided(_as_duplicate(ticket.cached))
        if ticket.joined is not None:
            return PendingPush(ticket.joined)
        try:
            if ticket.sink is not None:
                ticket.sink.check_complete()
        except ProtocolError as exc:
            self.abort_push(ticket)
            raise InvalidArgument(str(exc)) from exc
        if not ticket.meta.found_inf:
            for name, buf in zip(ticket.names, ticket.buffers):
                if not all_finite(buf):
                    self.abort_push(ticket)
                    raise NonFiniteGradient(
                        f"gradient {name!r} holds inf or nan; the push was rejected and nothing changed"
                        " (AMP: unscale first, or send found_inf so the step is skipped)"
                    )
        try:
            if self.mode == ASYNC:
                return self._push_async(ticket)
            return self._push_sync(ticket)
        except Exception:
            self.abort_push(ticket)
            raise

    def _push_async(self, ticket: PushTicket) -> PendingPush:
        meta = ticket.meta
        with self._lock:
            if meta.version is not None and self.version - meta.version > self.max_staleness:
                raise StalePush(
                    f"gradient computed from version {meta.version}, model is at {self.version}:"
                    f" more than max_staleness={self.max_staleness} versions old; pull and recompute"
                )
            rnd = _Round(self.version, time.monotonic(), {meta.rank: ticket})
            self._complete(rnd, partial=False)
            return PendingPush(ticket.outcome)

    def _push_sync(self, ticket: PushTicket) -> PendingPush:
        meta = ticket.meta
        with self._lock:
            if meta.version is not None and meta.version != self.version:
                raise StalePush(
                    f"sync push computed from version {meta.version}, but the round is for version"
                    f" {self.version}; pull the current parameters and recompute"
                )
            rnd = self._round
            if rnd is None:
                rnd = self._round = _Round(self.version, time.monotonic())
            if meta.rank in rnd.entries:
                raise DuplicatePush(f"rank {meta.rank} already pushed for version {rnd.version}")
            rnd.entries[meta.rank] = ticket
            if len(rnd.entries) == self.world_size:
                self._complete(rnd, partial=False)
            return PendingPush(
                ticket.outcome, rnd.started + self.round_timeout_s, lambda: self._expire(rnd)
            )

    def _expire(self, rnd: _Round) -> None:
        """The round's deadline passed: step with the ranks it has (a no-op once it ended)."""
        with self._lock:
            if self._round is not rnd:
                return
            if time.monotonic() < rnd.started + self.round_timeout_s:
                return
            logger.warning(
                "model %s: round for version %d timed out after %.1fs with ranks %s of %d;"
                " stepping without the rest",
                self.name,
                rnd.version,
                self.round_timeout_s,
                sorted(rnd.entries),
                self.world_size,
            )
            self._complete(rnd, partial=True)

    def _joined(self, push_id: str) -> Future[PushResult]:
        """The outcome of a push id that is in a round now, answered as a duplicate. Lock held."""
        joined: Future[PushResult] = Future()

        def relay(done: Future[PushResult]) -> None:
            exc = done.exception()
            if exc is not None:
                joined.set_exception(exc)
            else:
                joined.set_result(_as_duplicate(done.result()))

        self._inflight[push_id].add_done_callback(relay)
        return joined

    def _complete(self, rnd: _Round, partial: bool) -> None:
        """Average the round's gradients in rank order, step once, release everyone. Lock held."""
        ranks = tuple(sorted(rnd.entries))
        tickets = [rnd.entries[r] for r in ranks]
        found_inf = any(t.meta.found_inf for t in tickets)
        t0 = time.perf_counter()
        summed: dict[str, torch.Tensor] = {}
        if not found_inf:
            counts: dict[str, int] = {}
            for t in tickets:
                for name, buf in zip(t.names, t.buffers):
                    if name in summed:
                        summed[name].add_(buf)
                        counts[name] += 1
                    else:
                        summed[name] = buf
                        counts[name] = 1
            for name, n in counts.items():
                if n > 1:
                    summed[name].div_(n)
        undo = []
        try:
            for t in tickets:
                undo.append(self._apply_updates(t.meta.hyper_updates))
            if not found_inf:
                self._step(summed)
        except Exception as exc:
            # Not expected (inputs are checked first), but never leave the round open: that would
            # answer every later push with DuplicatePush. The pushes fail and may be retried.
            logger.exception("model %s: step for version %d failed", self.name, rnd.version)
            for u in reversed(undo):
                u()
            self._end_round(rnd, tickets, error=exc)
            return
        if found_inf:
            self.skipped_steps += 1
        step_seconds = time.perf_counter() - t0
        result = PushResult(
            version=self.version,
            applied=not found_inf,
            found_inf=found_inf,
            contributors=len(tickets),
            partial=partial,
        )
        record = StepRecord(
            model=self.name,
            version=self.version,
            applied=not found_inf,
            wall_time=time.time(),
            step_seconds=step_seconds,
            contributors=len(tickets),
            partial=partial,
            ranks=ranks,
            losses=tuple(t.meta.loss for t in tickets if t.meta.loss is not None),
            scalars={k: v for t in tickets for k, v in t.meta.scalars.items()},
            grads=summed,
        )
        for t in tickets:
            self.last_heard[t.meta.rank] = (
                record.wall_time,
                t.meta.version if t.meta.version is not None else rnd.version,
            )
            if t.meta.push_id:
                self._results[t.meta.push_id] = result
        while len(self._results) > _RESULTS_KEPT:
            self._results.popitem(last=False)
        self._notify(record)
        self._end_round(rnd, tickets, result=result)

    def _end_round(
        self,
        rnd: _Round,
        tickets: Sequence[PushTicket],
        *,
        result: PushResult | None = None,
        error: BaseException | None = None,
    ) -> None:
        """Release the round's buffers and its waiters with `result` or `error`. Lock held."""
        for t in tickets:
            if t.grads is not None:
                self._pool.release(t.grads)
                t.grads = None
        if self._round is rnd:
            self._round = None
        failed = None
        if error is not None:
            failed = Aborted(
                f"the step for version {rnd.version} failed ({type(error).__name__}: {error});"
                " nothing was applied and the push may be sent again"
            )
        for t in tickets:
            self._inflight.pop(t.meta.push_id, None)
            _settle(t.outcome, result, failed)

    def _step(self, grads: Mapping[str, torch.Tensor]) -> None:
        """One torch.optim.Adam step with these gradients (params not named get no step)."""
        on_device = self._to_device(grads)
        self._begin_write()
        try:
            for name, p in self.params.items():
                p.grad = on_device.get(name)
            if self.graphed is not None:
                self.graphed.run(frozenset(on_device))  # eager, or a captured graph's replay
            else:
                self.optimizer.step()
            self.version += 1
        finally:
            for p in self.params.values():
                p.grad = None
            self._end_write()
        self.last_step_at = time.time()
        self._wake_version_waiters()

    @property
    def write_seq(self) -> int:
        return self._seq

    def _begin_write(self) -> None:
        self._seq += 1
        for listener in self.write_listeners:
            listener(self._seq, self.version)

    def _end_write(self) -> None:
        self._seq += 1
        for listener in self.write_listeners:
            listener(self._seq, self.version)

    def _to_device(self, grads: Mapping[str, torch.Tensor]) -> Mapping[str, torch.Tensor]:
        if self.device.type == "cpu":
            return grads
        if self.graphed is not None:
            return self.graphed.upload(grads)
        out = {}
        for name, g in grads.items():
            dev = self._device_grads.get(name)
            if dev is None:
                dev = self._device_grads[name] = torch.empty_like(self.params[name])
            dev.copy_(g, non_blocking=True)
            out[name] = dev
        return out

    def _notify(self, record: StepRecord) -> None:
        for observer in list(self.observers):
            try:
                observer(record)
            except Exception:
                logger.exception("observer of model %s failed", self.name)

    # --- reads ---------------------------------------------------------------------------------

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the model still: no step, state load or hyperparameter edit runs meanwhile."""
        with self._lock:
            yield

    def restore(
        self, version: int, skipped_steps: int, push_results: Mapping[str, PushResult]
    ) -> None:
        """Set counters after a snapshot was loaded (parameters and state loaded separately)."""
        with self._lock:
            self._begin_write()
            self.version = version
            self.skipped_steps = skipped_steps
            self._results.update(push_results)
            self._end_write()
            self._wake_version_waiters()

    def recent_push_results(self) -> dict[str, PushResult]:
        """Push ids already applied and their results (kept in snapshots for exactly-once)."""
        with self._lock:
            return dict(self._results)

    def read_begin(self) -> tuple[int, int]:
        """(seq, version) before reading parameters without the lock; waits out a step in progress."""
        with self._lock:
            return self._seq, self.version

    def read_consistent(self, seq: int) -> bool:
        """True when no step ran since read_begin returned `seq`."""
        return self._seq == seq

    def version_reached(self, version: int) -> Future[None]:
        """A future done once the model is at `version` or later (cancel it to stop waiting)."""
        done: Future[None] = Future()
        with self._lock:
            if self.version >= version:
                done.set_result(None)
            else:
                self._version_waiters = [w for w in self._version_waiters if not w[1].done()]
                self._version_waiters.append((version, done))
        return done

    def wait_for_version(self, version: int, timeout: float) -> bool:
        """Block until the model is at `version` (True) or `timeout` seconds passed (False)."""
        reached = self.version_reached(version)
        try:
            reached.result(timeout)
            return True
        except FutureTimeout:
            reached.cancel()
            return False

    def _wake_version_waiters(self) -> None:
        """Lock held: resolve every waiter whose version has come."""
        waiting = []
        for version, fut in self._version_waiters:
            if version <= self.version:
                if fut.set_running_or_notify_cancel():
                    fut.set_result(None)
            elif not fut.done():
                waiting.append((version, fut))
        self._version_waiters = waiting

    def state_by_name(self) -> tuple[dict[str, dict[str, torch.Tensor]], list[dict[str, Any]], int]:
        """Optimizer state keyed by parameter name, requested group options, version. Copies."""
        with self._lock:
            sd = self.optimizer.state_dict()
            order = [n for g in self.optimizer.param_groups for n in g["param_names"]]
            state = {
                order[i]: {
                    k: (v.detach().clone() if isinstance(v, torch.Tensor) else torch.tensor(v))
                    for k, v in s.items()
                }
                for i, s in sd["state"].items()
            }
            groups = [
                {**opts, "params": names} for opts, names in zip(self.requested, self.group_names())
            ]
            return state, [dict(g) for g in groups], self.version

    def load_state(
        self,
        state: Mapping[str, Mapping[str, torch.Tensor]],
        groups: Sequence[Mapping[str, Any]] | None,
    ) -> None:
        """torch's load_state_dict, keyed by name; hyperparameters from `groups`, implementation kept."""
        with self._lock:
            names = self.group_names()
            if groups is not None and len(groups) != len(names):
                raise InvalidArgument(
                    f"state has {len(groups)} param groups, model has {len(names)}"
                )
            for name, entry in state.items():
                p = self.params.get(name)
                if p is None:
                    raise InvalidArgument(f"state names unknown parameter {name!r}")
                for key, t in entry.items():
                    if key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq") and tuple(
                        t.shape
                    ) != tuple(p.shape):
                        raise InvalidArgument(
                            f"state {key} of {name!r} has shape {list(t.shape)}, parameter has {list(p.shape)}"
                        )
                    if key == "step" and t.numel() != 1:
                        raise InvalidArgument(f"state step of {name!r} must hold one number")
                    if key not in ("step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
                        raise InvalidArgument(f"unknown state key {key!r} for {name!r}")
                    if key != "step" and not trainable(t.dtype):
                        raise InvalidArgument(
                            f"state {key} of {name!r} has dtype {t.dtype}, need a float or complex dtype"
                        )
            updates = []
            if groups is not None:
                for i, (g, g_names) in enumerate(zip(groups, names)):
                    if list(g.get("params", g_names)) != g_names:
                        raise InvalidArgument(
                            f"param group {i} lists {list(g['params'])}, model has {g_names}"
                        )
                    opts = {
                        k: v
                        for k, v in g.items()
                        if k not in ("params", "param_names") and k not in IMPLEMENTATION_KEYS
                    }
                    updates.append((i, opts))
                self.check_updates(updates)
            amsgrad = [
                dict(updates).get(i, {}).get("amsgrad", r["amsgrad"])
                for i, r in enumerate(self.requested)
            ]
            for i, g_names in enumerate(names):
                needed = {"step", "exp_avg", "exp_avg_sq"} | (
                    {"max_exp_avg_sq"} if amsgrad[i] else set()
                )
                for name in g_names:
                    lacking = needed - set(state.get(name, needed))
                    if lacking:
                        raise InvalidArgument(
                            f"state of {name!r} lacks {sorted(lacking)} (param group {i} needs"
                            f" {sorted(needed)}; a parameter that never stepped has no state at all)"
                        )
            order = [n for g in names for n in g]
            sd = {
                "state": {order.index(n): dict(s) for n, s in state.items()},
                "param_groups": [
                    {
                        **{k: v for k, v in g.items() if k != "params"},
                        "params": [order.index(n) for n in g["param_names"]],
                    }
                    for g in self.optimizer.param_groups
                ],
            }
            self._begin_write()
            try:
                self.optimizer.load_state_dict(sd)
            finally:
                if self.graphed is not None:  # new state tensors: captured addresses are stale
                    self.graphed.invalidate()
                self._end_write()
            self._apply_updates(updates)
            self._edited()

    def memory_bytes(self) -> dict[str, int]:
        def size(ts: Any) -> int:
            return sum(t.numel() * t.element_size() for t in ts if isinstance(t, torch.Tensor))

        with self._lock:
            state = sum(size(s.values()) for s in self.optimizer.state.values())
            return {
                "params": size(self.params.values()),
                "optimizer_state": state,
                "staging": self._pool.nbytes + size(self._device_grads.values()),
            }


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


def _decided(result: PushResult) -> PendingPush:
    done: Future[PushResult] = Future()
    done.set_result(result)
    return PendingPush(done)


def all_finite(t: torch.Tensor) -> bool:
    """True when every element is finite. A finite sum proves it (inf and nan propagate through
    addition) at the cost of one read; only a non-finite sum, which may be an overflow of large
    finite values, pays for the exact check. A complex tensor is checked as its real view."""
    if t.is_complex():
        t = torch.view_as_real(t)
    if bool(torch.isfinite(t.sum(dtype=torch.float32))):
        return True
    return bool(torch.isfinite(t).all())


def _as_duplicate(result: PushResult) -> PushResult:
    return PushResult(
        version=result.version,
        applied=result.applied,
        found_inf=result.found_inf,
        contributors=result.contributors,
        duplicate=True,
        partial=result.partial,
    )


def _set_group_value(group: dict[str, Any], key: str, value: Any) -> None:
    """group[key] = value, but tensors the step reads (maybe in a captured graph) filled in place."""
    current = group.get(key)
    if isinstance(current, torch.Tensor) and isinstance(value, torch.Tensor):
        current.fill_(value.item())  # in place: a captured graph keeps reading it
    elif (
        isinstance(current, torch.Tensor)
        and current.device.type != "cpu"
        and isinstance(value, (int, float))
        and not isinstance(value, bool)
    ):
        current.fill_(float(value))  # the device lr options.effective made, likewise
    elif (
        key == "betas"
        and isinstance(current, tuple)
        and any(isinstance(b, torch.Tensor) for b in current)
    ):
        for cur, new in zip(current, value):
            if isinstance(cur, torch.Tensor):
                cur.fill_(float(new))
    else:
        group[key] = value


def _value_copy(value: Any) -> Any:
    """A copy of a group value that later in-place fills leave alone."""
    if isinstance(value, torch.Tensor):
        return value.clone()
    if isinstance(value, tuple):
        return tuple(_value_copy(v) for v in value)
    return value
