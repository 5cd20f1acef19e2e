"""A hosted model: named parameters, a real torch.optim.Adam over them, its lock, step and seqlock.

No networking here. Adapters call `begin_push` with a push's header, write its chunks into the
returned ticket's sink, then call `finish_push`, which validates the whole gradient before
anything changes, then (sync) joins the current round or (async) steps at once. A push that fails
anywhere leaves parameters and optimizer state bitwise unchanged.

The model composes these pieces, each in its own module:
- rounds.py: the exactly-once ledger, sync rounds (rank-ordered mean), the async staleness bound
  and step observers (pushes.py: the push's data); a closed round comes back as `apply_round`;
- groups.py: param groups and hyperparameter edits, checked whole, applied with undo;
- stepping.py: the Adam step itself, gradients to the device, the bucketed step of STEP requests;
- reads.py: the seqlock and the host copies that lock-free readers make;
- state_io.py: torch-format optimizer state, the name <-> index mapping, load checks.

Versions (versions.py): a model starts at version 0 and gains 1 per applied step. Readers copy
parameters without the lock and use the seqlock (`read_begin` / `read_consistent`) to tell whether
a step ran meanwhile.

On CUDA every piece of device work on the model's tensors (uploads, steps, hyperparameter fills,
state loads, and every reader's copies and norms) is issued inside `on_device()`, on the model's
own step stream (cuda/step.py): readers then come after the step they read and before the next
one, and models do not wait for each other. Copies to the host go through `host_copy`.
"""

from __future__ import annotations

import contextlib
import functools
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future
from typing import Any

import torch

from adamd.server.core import options as adam_options
from adamd.server.core import state_io, versions
from adamd.server.core.groups import GroupEditor, Updates
from adamd.server.core.membership import DEFAULT_LEASE_S
from adamd.server.core.precision import Precision
from adamd.server.core.pushes import (
    ClosedRound,
    PendingPush,
    PushMeta,
    PushResult,
    PushTicket,
    StepRecord,
    land,
)
from adamd.server.core.reads import SeqLock, host_copies, host_copy
from adamd.server.core.rounds import ASYNC, SYNC, Rounds, check_settings
from adamd.server.core.staging import StagingPool
from adamd.server.core.stepping import ModelStep
from adamd.server.errors import InvalidArgument, NotFound

__all__ = [
    "ASYNC",
    "SYNC",
    "HostedModel",
    "PendingPush",
    "PushMeta",
    "PushResult",
    "PushTicket",
    "StepRecord",
]


class HostedModel:
    """One model's parameters and optimizer behind one lock; pushes, edits and state I/O go
    through the pieces it owns (`rounds`, `groups`, state_io) and come back here to step (through
    `stepper`, stepping.py)."""

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
        elastic: bool = False,
        lease_s: float = DEFAULT_LEASE_S,
        precision: Precision | None = None,
    ):
        """`precision`: master weights (precision.py); `params` are then already as held."""
        if elastic:
            world_size = 0  # the registered workers, whoever they are now
        check_settings(world_size, mode, elastic)
        self.name = name
        self.device = device
        self.params: dict[str, torch.Tensor] = dict(params)
        self.precision = precision or Precision()
        self.optimizer = torch.optim.Adam([torch.zeros(1, device=device)])  # replaced below
        self.optimizer.param_groups.clear()
        self.groups = GroupEditor(self.optimizer, self.params, device)
        for group in groups:
            self.groups.append(group)
        self.version = 0
        self.skipped_steps = 0
        self.layout = ""  # sharded: the layout record of the whole model, with this shard's index
        self.created_at = time.time()
        self.last_step_at: float | None = None
        # Called under the lock after an edit that is not a step (hyperparameters, a new param
        # group, loaded state): snapshots count these as changes too.
        self.edit_listeners: list[Callable[[], None]] = []
        self._lock = threading.RLock()
        self.closed = False  # deleted: no more steps
        self.seqlock = SeqLock()  # lock-free readers (reads.py)
        self.write_listeners = self.seqlock.listeners  # (seq, version) on every change
        self._version_waits = versions.VersionWaits()
        self.stepper = ModelStep(name, self.optimizer, self.params, device)  # stepping.py
        self.graphed = self.stepper.graphed  # on CUDA: the graph-captured step (cuda/step.py)
        self.staging = self.graphed.staging if self.graphed else StagingPool(self.params, pin=False)
        self.rounds = Rounds(
            name,
            self,
            self._lock,
            self.staging,
            world_size=world_size,
            mode=mode,
            max_staleness=max_staleness,
            round_timeout_s=round_timeout_s,
            lease_s=lease_s if elastic else None,
        )

    # The push protocol's settings live with the rounds; views and snapshots read them here.
    @property
    def world_size(self) -> int:
        return self.rounds.world_size

    @property
    def elastic(self) -> bool:
        return self.rounds.members is not None

    @property
    def lease_s(self) -> float:
        """Elastic: how long a worker stays registered without a push (0.0 otherwise)."""
        return 0.0 if self.rounds.members is None else self.rounds.members.lease_s

    @property
    def mode(self) -> str:
        return self.rounds.mode

    @property
    def max_staleness(self) -> int:
        return self.rounds.max_staleness

    @property
    def round_timeout_s(self) -> float:
        return self.rounds.round_timeout_s

    @property
    def observers(self) -> list[Callable[[StepRecord], None]]:
        """Called under the lock after every round or async push (append / remove)."""
        return self.rounds.observers

    @property
    def last_heard(self) -> dict[int, tuple[float, int]]:
        """rank -> (time of its last push that stepped, version it was computed from)."""
        return self.rounds.last_heard

    # --- param groups and hyperparameters (groups.py) ------------------------------------------

    @property
    def requested(self) -> list[dict[str, Any]]:
        """Options per group as clients asked for them."""
        return self.groups.requested

    def group_names(self) -> list[list[str]]:
        return self.groups.names()

    def add_param_group(
        self, new_params: Mapping[str, torch.Tensor], group: Mapping[str, Any], layout: str = ""
    ) -> None:
        """`layout`: a sharded model's new layout record, set with the group (one snapshot never
        holds the group without it)."""
        with self._lock:
            clash = [n for n in new_params if n in self.params]
            if clash:
                raise InvalidArgument(f"parameters {clash} exist already")
            new_params, precision = self.precision.hold(new_params)
            self.params.update(new_params)
            try:
                self.groups.append(group)
            except Exception:
                for n in new_params:
                    del self.params[n]
                raise
            self.precision = precision
            if layout:
                self.layout = layout
            if self.graphed is not None:
                self.graphed.invalidate()
            self._edited()

    def set_hyperparams(self, updates: Updates) -> None:
        with self._lock:
            self.groups.check(updates)
            with self.on_device():  # a device lr is filled in place, in order with the steps
                self.groups.apply(updates)
            self._edited()

    def _edited(self) -> None:
        for listener in list(self.edit_listeners):
            listener()

    # --- pushes (rounds.py) --------------------------------------------------------------------

    def begin_push(
        self,
        meta: PushMeta,
        specs: Sequence[tuple[str, tuple[int, ...], torch.dtype]],
        buffers: Callable[[list[str]], list[torch.Tensor]] | None = None,
    ) -> PushTicket:
        """Check a push's header and hand out buffers for its chunks. Changes nothing visible.

        `buffers`, when given, supplies gradients already in place (the same-host path) instead
        of pooled buffers to stream into."""
        if self.closed:
            raise NotFound(f"no model named {self.name!r} (it was deleted)")
        names = self.rounds.check_header(meta, specs, self.params)
        for name in names:
            p = self.params[name]
            refusal = p.is_complex() and adam_options.fused_refusal(self.groups.group_of(p), p)
            if refusal:  # torch refuses fused Adam for complex parameters at the step
                raise InvalidArgument(refusal)
        self.groups.check(meta.hyper_updates)
        ticket = self.rounds.open(meta, names)
        if ticket.cached is not None or ticket.joined is not None:
            return ticket
        sole = self.mode == ASYNC or self.world_size == 1  # copies to the device early if sole
        prefetch = self.graphed and functools.partial(self.graphed.prefetch, sole=sole)
        try:
            land(
                ticket,
                names,
                [d for _, _, d in specs],
                meta.blocks,
                buffers,
                self.staging,
                prefetch,
            )
        except Exception:
            self.abort_push(ticket)  # gives the staging set back too
            raise
        return ticket

    def abort_push(self, ticket: PushTicket) -> None:
        """The push's stream failed: forget it (a retry with the same id may come)."""
        self.rounds.abort(ticket)

    def finish_push(self, ticket: PushTicket) -> PendingPush:
        """Check the whole gradient, then step (async) or join the round (sync). Never blocks
        on other workers: the returned PendingPush says when the outcome is known."""
        return self.rounds.finish(ticket)

    def apply_round(self, closed: ClosedRound) -> None:
        """Rounds, lock held: the pushes' hyperparameter edits, then one step (none when a push
        found inf). Should anything raise, the edits are undone and nothing else changed."""
        with self.on_device():
            undo = self.groups.apply_all([t.meta.hyper_updates for t in closed.tickets])
        try:
            if not closed.found_inf:
                hooks = [t.on_stepped for t in closed.tickets if t.on_stepped is not None]
                self._step(closed.grads, hooks)
        except Exception:
            with self.on_device():
                undo()
            raise
        if closed.found_inf:
            self.skipped_steps += 1

    # --- the step and the seqlock --------------------------------------------------------------

    def _step(
        self,
        grads: Mapping[str, torch.Tensor],
        hooks: Sequence[Callable[[list[str]], None]] = (),
    ) -> None:
        """One torch.optim.Adam step with these gradients (params not named get no step), inside
        the seqlock's write. `hooks` (the bulk channel's STEP requests) hear of each bucket of
        parameters as soon as it is stepped (stepping.py)."""
        if self.closed:
            raise NotFound(f"no model named {self.name!r} (it was deleted)")
        on_device = self.stepper.to_device(grads)
        self.seqlock.begin_write(self.version)
        try:
            self.stepper.run(on_device, hooks)
            self.version += 1
        finally:
            self.seqlock.end_write(self.version)
        self.last_step_at = time.time()
        self._version_waits.wake(self.version)

    @property
    def write_seq(self) -> int:
        return self.seqlock.seq

    def read_begin(self) -> tuple[int, int]:
        """(seq, version) before reading parameters without the lock; waits out a step in progress."""
        with self._lock:
            return self.seqlock.seq, self.version

    def read_consistent(self, seq: int) -> bool:
        """True when no step ran since read_begin returned `seq`."""
        return self.seqlock.seq == seq

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the model still: no step, state load or hyperparameter edit runs meanwhile."""
        with self._lock:
            yield

    def on_device(self) -> contextlib.AbstractContextManager[None]:
        """Where device work on this model's tensors is issued: on CUDA its step stream (ordered
        after the last step and before the next); elsewhere nothing changes. Take the model
        lock first, if at all, never inside; and do not nest."""
        if self.graphed is None:
            return contextlib.nullcontext()
        return self.graphed.reading()

    def host_copy(self, t: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        """A copy of `t` (a parameter or state tensor) on the host, contiguous, in `dtype` if
        given; inside `on_device()` on CUDA (reads.py)."""
        return host_copy(self.graphed, t, dtype)

    def host_copies(
        self,
        names: Sequence[str],
        wire_dtypes: torch.dtype | Sequence[torch.dtype] | None = None,
    ) -> list[torch.Tensor]:
        """Parameters as host tensors ready for the wire (a pull), each to travel as its
        `wire_dtypes` entry; read under the seqlock, not the lock (reads.py)."""
        return host_copies(self.params, self.precision, self.graphed, names, wire_dtypes)

    def close(self) -> None:
        """The model was deleted: a push still in flight fails instead of stepping, and on CUDA
        the model's device work finishes before its tensors can be freed."""
        with self._lock:
            self.closed = True
            if self.graphed is not None:
                self.graphed.close()
            else:
                self.staging.close()

    # --- versions ------------------------------------------------------------------------------

    def version_reached(self, version: int) -> Future[None]:
        """A future done once the model is at `version` or later (cancel it to stop waiting)."""
        with self._lock:
            return self._version_waits.add(version, self.version)

    def wait_for_version(self, version: int, timeout: float) -> bool:
        """Block until the model is at `version` (True) or `timeout` seconds passed (False)."""
        return versions.wait(self.version_reached(version), timeout)

    def restore(
        self, version: int, skipped_steps: int, push_results: Mapping[str, PushResult]
    ) -> None:
        """Set counters after a snapshot was loaded (parameters and state loaded separately)."""
        with self._lock:
            self.seqlock.begin_write(self.version)
            self.version = version
            self.skipped_steps = skipped_steps
            self.rounds.ledger.results.update(push_results)
            self.seqlock.end_write(self.version)
            self._version_waits.wake(self.version)

    def recent_push_results(self) -> dict[str, PushResult]:
        """Push ids already applied and their results (kept in snapshots for exactly-once)."""
        with self._lock:
            return dict(self.rounds.ledger.results)

    # --- optimizer state (state_io.py) ---------------------------------------------------------

    def state_by_name(self) -> tuple[dict[str, dict[str, torch.Tensor]], list[dict[str, Any]], int]:
        """Optimizer state keyed by parameter name, requested group options, version. Copies."""
        with self._lock:
            groups = [
                {**opts, "params": names} for opts, names in zip(self.requested, self.group_names())
            ]
            if self.graphed is None:
                return state_io.state_by_name(self.optimizer), groups, self.version
            with self.on_device():
                state = state_io.host_state(self.optimizer, self.host_copy)
            return state, groups, self.version

    def load_state(
        self,
        state: Mapping[str, Mapping[str, torch.Tensor]],
        groups: Sequence[Mapping[str, Any]] | None,
    ) -> None:
        """torch's load_state_dict, keyed by name; hyperparameters from `groups`, implementation kept."""
        with self._lock:
            updates, sd = state_io.checked_load(
                state, groups, self.params, self.groups, self.optimizer
            )
            self.seqlock.begin_write(self.version)
            try:
                if self.graphed is not None:
                    # The old state is freed by load_state_dict, and captured addresses go stale:
                    # wait for the model's device work first.
                    self.graphed.invalidate()
                with self.on_device():  # the new state is made on the step stream, its user
                    self.optimizer.load_state_dict(sd)
            finally:
                self.seqlock.end_write(self.version)
            with self.on_device():
                self.groups.apply(updates)
            self._edited()

    def memory_bytes(self) -> dict[str, int]:
        with self._lock:
            return self.stepper.memory_bytes(self.staging.nbytes)
