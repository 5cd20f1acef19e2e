"""The data plane: what a push, a pull, a state read and a model's admission do, whatever
carries their bytes (gRPC, the bulk-data channel).

A transport decodes its request into the core's values (`PushMeta`, tensor specs, a `PullAsk`),
hands over a `receive(sink)` that writes the gradient's bytes where the core wants them, and
encodes what comes back. Everything else happens here, once: the operations layer's checks, the
transfer-memory budget, the exactly-once ledger and sync rounds (through the model), waits for a
version, and the SIGTERM cut that answers waiting calls UNAVAILABLE. Waits hold no thread (they
are awaited on the server's event loop); work that computes or takes a model lock runs on the
worker threads (`--grpc-workers`).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from concurrent.futures import Executor, ThreadPoolExecutor
from typing import Any, TypeVar

import torch

from adamd.protocol.frames import (
    DEFAULT_CHUNK_BYTES,
    FRAME_HEADROOM,
    TensorSink,
    reply_chunk_bytes,
)
from adamd.server.core.budget import TransferBudget
from adamd.server.core.limits import Limits
from adamd.server.core.model import HostedModel, PendingPush, PushMeta, PushResult
from adamd.server.core.registry import ModelSpec
from adamd.server.core.rounds import SYNC
from adamd.server.core.staging import ALIGN
from adamd.server.errors import DeadlineExceeded, InvalidArgument, NotFound, Unavailable
from adamd.server.operations import Operations, TensorSpecs

DEFAULT_IDLE_S = 60.0
# Frames of one reply that a transport may hold at once, unsent or unread (the one being written
# and what the transport has taken beyond the client's flow-control window): a pull reserves these.
FRAMES_IN_FLIGHT = 3
T = TypeVar("T")
# A push's bytes: writes the gradient into the sink (None: drains it) and returns the push's
# closing header, when one came after the gradients (gRPC: the stream's last frame; the bulk
# channel: its END frame).
Receive = Callable[[TensorSink | None], Awaitable[PushMeta | None]]


@dataclasses.dataclass(frozen=True)
class PullAsk:
    """A pull, as any transport asks it."""

    model: str
    names: Sequence[str] = ()  # empty: every parameter
    wire: torch.dtype | None = None  # narrower float dtype to send in (None: the params' own)
    chunk_bytes: int = 0  # 0: the server's --chunk-bytes
    if_newer_than: int | None = None  # answer "not modified" when the model is not newer
    wait_for_version: int | None = None  # first wait until the model reaches it
    wait_timeout_s: float = 0.0  # how long that wait may take (0: 60 s)


@dataclasses.dataclass
class PullPlan:
    model: HostedModel
    names: list[str]
    tensors: list[torch.Tensor] | None  # None: not modified since the client's version
    wire: torch.dtype | None  # the dtype the pull asked for (None: none)
    chunk: int  # bytes per frame where tensors are cut into chunks
    seq: int
    version: int
    # what each tensor travels as: `wire` where asked, else the worker's dtype (precision.py)
    wires: list[torch.dtype] = dataclasses.field(default_factory=list)

    def consistent(self) -> bool:
        """No step ran since the parameters were read (on the CPU they are sent as they are)."""
        return self.model.read_consistent(self.seq)


class DataPlane:
    def __init__(
        self,
        ops: Operations,
        *,
        executor: Executor | None = None,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
        idle_s: float = DEFAULT_IDLE_S,
        limits: Limits | None = None,
        budget: TransferBudget | None = None,
    ):
        self.ops = ops
        # Host memory of transfers in flight (server/core/budget.py); None here: counted, unbounded.
        self.budget = budget or TransferBudget(None)
        self.limits = limits or ops.limits
        self.executor = executor or ThreadPoolExecutor(4, thread_name_prefix="adamd-work")
        self.chunk_bytes = chunk_bytes
        self.idle_s = idle_s
        # Set when the server stops and its grace period is nearly over: pushes and long-polls
        # still waiting answer UNAVAILABLE themselves (retried by clients) instead of being
        # cancelled by their transport, whose status for a cancelled call differs.
        self._cut = asyncio.Event()

    def cut(self) -> None:
        """End, with UNAVAILABLE, the waits of calls still in flight (on the server's loop)."""
        self._cut.set()

    async def until_cut(self, work: Awaitable[T]) -> T:
        """`work`, unless the server cuts in-flight calls first (then Unavailable; `work` is
        cancelled, so a push's cleanup runs: all or nothing)."""
        task = asyncio.ensure_future(work)
        cut = asyncio.ensure_future(self._cut.wait())
        try:
            await asyncio.wait({task, cut}, return_when=asyncio.FIRST_COMPLETED)
        finally:  # also when the transport cancels this call: never leave `work` running
            cut.cancel()
            if not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        if task.cancelled():
            raise Unavailable("the server is stopping (SIGTERM); retry against its restart")
        return task.result()

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """Run blocking work (torch, model locks, files) on the worker threads."""
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)

    # --- pushes ---------------------------------------------------------------------------------

    async def push(
        self,
        model_name: str,
        meta: PushMeta,
        specs: TensorSpecs,
        receive: Receive,
        *,
        session: str = "",
        on_stepped: Callable[[list[str]], None] | None = None,
    ) -> PushResult:
        """One push: `receive(sink)` brings the gradient's bytes; `session`: a same-host push
        whose gradient lies in the session's file; `on_stepped`: see PushTicket.on_stepped."""
        # Its staging buffer (a whole gradient set), held until the step used it. Same-host
        # pushes write into their session's file instead; an unknown model is refused below.
        known = None if session else self._find(model_name)
        held = self._staging_of(known) if known is not None else 0
        if held:
            await self.until_cut(self.budget.reserve("the push", held, self.idle_s))
        try:
            model, ticket = await self.run(self.ops.begin_push, model_name, meta, specs, session)
            if ticket.grads is None:  # a duplicate or a retry joining its first copy
                self.budget.release(held)
                held = 0
            ticket.on_stepped = on_stepped
            try:
                closing = await self.until_cut(receive(ticket.sink))
                if closing is not None:
                    await self.run(self.ops.amend_push, model, ticket, closing)
            except BaseException:
                await self.run(model.abort_push, ticket)
                raise
            pending = await self.run(model.finish_push, ticket)
            # Cut while waiting: a sync round that will not complete (its other ranks are
            # refused now). If it does step after all, the push id is in the ledger the final
            # snapshot keeps, and the client's retry is answered as a duplicate: exactly once.
            result = await self.until_cut(self._outcome(pending))
        finally:
            if held:
                self.budget.release(held)
        await self.run(self.ops.pushed, model)
        return result

    async def _outcome(self, pending: PendingPush) -> PushResult:
        """Await a push's outcome; past the round's deadline, step with the ranks there are."""
        outcome = asyncio.wrap_future(pending.outcome)
        deadline = pending.deadline
        while True:
            timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                return await asyncio.wait_for(asyncio.shield(outcome), timeout)
            except asyncio.TimeoutError:
                # Elastic: a missing worker's lease is still good; wait until it lapses.
                deadline = await self.run(pending.expire) or deadline

    # --- pulls ----------------------------------------------------------------------------------

    def check_pull(self, ask: PullAsk) -> tuple[HostedModel, list[str], torch.dtype | None]:
        """A pull's model, parameter names and wire dtype, or the error it gets."""
        model = self.ops.model(ask.model)
        names = list(ask.names) or list(model.params)
        twice = sorted(n for n, k in collections.Counter(names).items() if k > 1)
        if twice:  # one tensor per name in the reply: a name asked twice is a client's bug
            raise InvalidArgument(f"a pull names parameters {twice} more than once")
        missing = [n for n in names if n not in model.params]
        if missing:
            raise InvalidArgument(f"model {model.name!r} has no parameters {missing}")
        if ask.wire is not None and not ask.wire.is_floating_point:
            raise InvalidArgument("wire_dtype must be a float dtype")
        return model, names, ask.wire

    @contextlib.asynccontextmanager
    async def pull(self, ask: PullAsk, reserve: bool = True) -> AsyncIterator[PullPlan]:
        """What a pull sends: checks the request, waits for the version asked, reserves the
        pull's transfer memory (given back on leaving the block; `reserve` False: the caller
        sends from the parameters' own memory and buffers of its own) and reads the parameters
        (under the seqlock: `plan.consistent()` after sending says whether a step ran
        meanwhile). `plan.tensors` is None when the client's copy is current."""
        model, names, wire = self.check_pull(ask)
        if ask.wait_for_version is not None:
            await self.until_cut(
                self._wait_for_version(model, ask.wait_for_version, ask.wait_timeout_s)
            )
        seq, version = await self.run(model.read_begin)
        chunk = reply_chunk_bytes(ask.chunk_bytes, self.chunk_bytes)
        if ask.if_newer_than is not None and version <= ask.if_newer_than:
            yield PullPlan(model, names, None, wire, chunk, seq, version)
            return
        held = self._pull_bytes(model, names, wire, chunk) if reserve else 0
        if held and await self.until_cut(self.budget.reserve("the pull", held, self.idle_s)):
            seq, version = await self.run(model.read_begin)  # waited: read what is there now
        wires = model.precision.pull_dtypes(model.params, names, wire)
        try:
            tensors = await self.run(model.host_copies, names, wires)
            yield PullPlan(model, names, tensors, wire, chunk, seq, version, wires)
        finally:  # also when the client went away or stopped reading (the idle deadline)
            tensors = []
            self.budget.release(held)

    async def _wait_for_version(self, model: HostedModel, version: int, timeout_s: float) -> None:
        if not math.isfinite(timeout_s) or timeout_s < 0:
            raise InvalidArgument(f"wait_timeout_s must be a finite number >= 0, got {timeout_s}")
        timeout = timeout_s or 60.0
        reached = await self.run(model.version_reached, version)
        try:
            await asyncio.wait_for(asyncio.wrap_future(reached), timeout)
        except asyncio.TimeoutError:
            raise DeadlineExceeded(
                f"model {model.name!r} did not reach version {version} within {timeout}s"
            ) from None

    # --- optimizer state ------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def state(
        self, name: str
    ) -> AsyncIterator[tuple[HostedModel, dict[str, dict[str, torch.Tensor]], list[Any], int]]:
        """The model's Adam state by parameter name, its param groups and version, with the
        transfer memory its copies and frames take held until the block is left."""
        model = self.ops.model(name)
        held = await self.run(self._state_bytes, model)
        await self.until_cut(self.budget.reserve("GetState", held, self.idle_s))
        try:
            state, groups, version = await self.run(model.state_by_name)
            yield model, state, groups, version
        finally:
            self.budget.release(held)

    # --- admission: what a sync round will hold -------------------------------------------------

    def check_create(self, spec: ModelSpec) -> None:
        """A sync model whose round cannot fit in the transfer budget is refused up front."""
        if spec.mode == SYNC and not spec.elastic:
            held = spec.precision.held_specs(spec.params)
            sizes = (math.prod(shape) * dtype.itemsize for _, shape, dtype in held)
            self._check_round(spec.world_size, _staging_bytes(sizes))

    def check_join(self, name: str, rank: int | None) -> None:
        """An elastic model's round grows with each new member: refuse one it cannot fit."""
        known = self._find(name)
        if known is None or not known.elastic:
            return
        members = known.rounds.members
        current = members.members if members is not None else {}
        live = len(current) + (1 if rank is None or rank not in current else 0)
        self._check_round(live, self._staging_of(known))

    def _check_round(self, world_size: int, staging: int) -> None:
        """A sync round of several ranks holds their staging buffers until the last one
        arrives: refuse a model whose round, plus one pull of it, cannot fit in the budget
        (its ranks would wait for bytes that only the round's step gives back)."""
        if world_size < 2:
            return  # one rank steps at once: its push never waits on another
        copies = staging if self.ops.registry.device.type != "cpu" else 0
        need = world_size * staging + copies + self.frames_bytes(staging)
        self.budget.check(
            f"a sync round of world_size {world_size} ({world_size} gradient buffers of"
            f" {staging} bytes, plus one pull)",
            need,
        )

    # --- the transfer budget (server/core/budget.py) --------------------------------------------

    def _find(self, name: str) -> HostedModel | None:
        try:
            return self.ops.model(name)
        except NotFound:
            return None

    def frames_bytes(self, payload: int, chunk: int | None = None) -> int:
        """Reply frames a transport may hold at once for a reply of `payload` bytes in
        `chunk`-byte frames (default: the server's --chunk-bytes)."""
        frame = (chunk or self.chunk_bytes) + FRAME_HEADROOM
        return min(payload + FRAME_HEADROOM, FRAMES_IN_FLIGHT * frame)

    def _pull_bytes(
        self, model: HostedModel, names: list[str], wire: torch.dtype | None, chunk: int
    ) -> int:
        """Host memory a pull holds: copies of the parameters where they are made (CUDA, a
        non-contiguous tensor; on the CPU a narrower wire dtype is converted a chunk at a time
        into one reused buffer), and its frames in flight."""
        copies = payload = 0
        for name, dtype in zip(names, model.precision.pull_dtypes(model.params, names, wire)):
            p = model.params[name]
            nbytes = p.numel() * dtype.itemsize
            payload += nbytes
            if model.graphed is not None or p.device.type != "cpu" or not p.is_contiguous():
                copies += nbytes
        return copies + self.frames_bytes(payload, chunk)

    def _state_bytes(self, model: HostedModel) -> int:
        """GetState copies every state tensor (two per stepped parameter, three with amsgrad),
        and frames them. Worker thread: counted under the model lock."""
        with model.locked():
            state = sum(
                t.numel() * t.element_size()
                for entry in model.optimizer.state.values()
                for t in entry.values()
                if isinstance(t, torch.Tensor)
            )
        return state + self.frames_bytes(state)

    def _staging_of(self, model: HostedModel) -> int:
        return _staging_bytes(p.numel() * p.element_size() for p in model.params.values())


def _staging_bytes(sizes: Iterable[int]) -> int:
    """Bytes of one staging buffer (server/core/staging.py layout): each tensor 256-byte aligned."""
    return sum((n + ALIGN - 1) // ALIGN * ALIGN for n in sizes)
