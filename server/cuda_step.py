"""The Adam step of a model on CUDA: static device gradients, CUDA-graph replay, early uploads.

`GraphedStep` serves one HostedModel whose parameters live on a CUDA device:

* Uploads. Pushed gradients land in pinned host buffers (staging.py). When a push will be the
  only contributor of its step (async mode, or sync mode with world_size 1), each gradient is
  copied to the device on a copy stream as soon as its last chunk has arrived, into a "landing"
  buffer, so the copies overlap receiving the rest of the push (`prefetch`). Otherwise (a sync
  round sums several pushes on the host first) the summed gradient is copied at the step. Either
  way the step's gradients end up in static device buffers, one per parameter, that `p.grad`
  points at. A pinned buffer goes back to the pool only once the copies out of it are done.
* Steps. The first `warmup_steps` steps that carry gradients for a given set of parameters run
  eagerly on a side stream (the warm-up torch's CUDA-graphs notes ask for before a capture).
  They are real steps, each applied once: the warm-up is the set's first steps, not extra ones.
  The next step with that set captures `optimizer.step()` into a torch.cuda.CUDAGraph (capture
  runs nothing) and replays it once, which applies that step; later steps with the same set
  replay the graph. A push with another set of gradients (one missing, say) steps eagerly and
  starts that set's own warm-up; at most `max_graphs` graphs are kept, least recently used out.
* What a graph bakes in. A replay runs the captured kernels with the arguments they had at
  capture time and reads and writes the same addresses. A tensor hyperparameter on the device is
  read by the kernel when it runs (torch's fused and capturable Adam take lr that way), so an lr
  schedule that fills that tensor in place keeps the graph. Every other hyperparameter (betas,
  eps, weight_decay, amsgrad, ..., and a tensor lr kept on the host) is a number in the kernel's
  arguments: torch's `_fused_adam_` takes beta1 and beta2 only as floats, so tensor betas cannot
  be read at replay and are baked in too. Each step compares a fingerprint of all of that (values
  of baked options, identity of device tensors, the optimizer's state and param-group objects,
  which load_state_dict and add_param_group replace) with the graph's; on any difference the
  graph is dropped and the set warms up again. `invalidate()` drops everything at once.

Capture happens with capture_error_mode="thread_local" (as torch.compile's CUDA-graph trees do),
since other threads of the daemon keep serving, and under a process-wide lock that this module's
own device work (uploads, steps, replays, early copies of every model) takes in shared mode, so
no capture overlaps them and only one capture runs at a time. Work that does not go through this
module (a parameter pull, a snapshot copy) is not held off during a capture.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .staging import GradSet, StagingPool

logger = logging.getLogger(__name__)

WARMUP_STEPS = 3  # eager steps per gradient set before its capture (torch's examples use 3)
MAX_GRAPHS = 2  # captured graphs kept per model
_WARM_KEPT = 8  # gradient sets whose warm-up is being counted, per model
_NOT_OPTIONS = ("params", "param_names")


class _SharedExclusive:
    """A lock held by many in shared mode or by one in exclusive mode; a waiting exclusive holder
    keeps new shared holders out (captures are rare and must not starve)."""

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._shared = 0
        self._exclusive = False
        self._waiting = 0

    @contextlib.contextmanager
    def shared(self) -> Iterator[None]:
        with self._cond:
            while self._exclusive or self._waiting:
                self._cond.wait()
            self._shared += 1
        try:
            yield
        finally:
            with self._cond:
                self._shared -= 1
                if not self._shared:
                    self._cond.notify_all()

    @contextlib.contextmanager
    def exclusive(self) -> Iterator[None]:
        with self._cond:
            self._waiting += 1
            try:
                while self._exclusive or self._shared:
                    self._cond.wait()
            finally:
                self._waiting -= 1
            self._exclusive = True
        try:
            yield
        finally:
            with self._cond:
                self._exclusive = False
                self._cond.notify_all()


# Shared: issuing this module's device work. Exclusive: a capture (one per process at a time).
_DEVICE_WORK = _SharedExclusive()


def _token(value: Any, device: torch.device, keep: list[torch.Tensor]) -> Any:
    """What a captured step depends on in one option value: a tensor on the model's device by
    identity (the kernel reads it at replay; `keep` holds it so its id stays unique), anything
    else by value (baked into the kernel's arguments)."""
    if isinstance(value, torch.Tensor):
        if _on(value, device):
            keep.append(value)
            return ("read at replay", id(value))
        return ("baked", value.dtype, float(value.detach().reshape(-1)[0].item()))
    if isinstance(value, (tuple, list)):
        return tuple(_token(v, device, keep) for v in value)
    return value


def _on(t: torch.Tensor, device: torch.device) -> bool:
    """Whether `t` lives on `device` (a device without an index stands for the current one)."""
    if device.index is None:
        return t.device.type == device.type
    return t.device == device


class Fingerprint:
    """Everything of an optimizer that a captured step baked in or reads by address, besides the
    parameters, their gradients' buffers and the state tensors inside `optimizer.state`."""

    def __init__(self, optimizer: torch.optim.Optimizer, device: torch.device):
        self.state = optimizer.state  # load_state_dict replaces it (new state tensors)
        self.groups = tuple(optimizer.param_groups)  # ...and these dicts
        self.keep: list[torch.Tensor] = []
        self.values = tuple(
            (
                len(g["params"]),
                tuple(
                    (k, _token(v, device, self.keep)) for k, v in g.items() if k not in _NOT_OPTIONS
                ),
            )
            for g in self.groups
        )

    def same(self, other: Fingerprint) -> bool:
        return (
            self.state is other.state
            and len(self.groups) == len(other.groups)
            and all(a is b for a, b in zip(self.groups, other.groups))
            and self.values == other.values
        )


@dataclass
class _Graph:
    graph: Any  # torch.cuda.CUDAGraph (a stand-in in the CPU tests)
    fingerprint: Fingerprint
    replays: int = 0


@dataclass
class _Warmup:
    fingerprint: Fingerprint
    steps: int = 0


@dataclass
class _Prefetch:
    """One push's gradients being copied to the landing buffers as they complete."""

    owner: GradSet
    names: Sequence[str]
    sources: Sequence[torch.Tensor]  # the pinned host buffers, in `names` order
    ready: dict[str, tuple[torch.Tensor, Any]] = field(default_factory=dict)  # name -> (src, event)


class _Staging(StagingPool):
    """The model's pinned staging pool; a set is handed back only after its copies are done."""

    def __init__(
        self, params: Mapping[str, torch.Tensor], before_release: Callable[[GradSet], None]
    ):
        super().__init__(params, pin=True)
        self._before_release = before_release

    def release(self, gs: GradSet) -> None:
        self._before_release(gs)
        super().release(gs)


class GraphedStep:
    """Static device gradients, early uploads and graph-captured steps for one model on CUDA.

    The model calls, under its lock: `upload(grads)` (host gradients -> static device buffers,
    returned by name), then with each `p.grad` set to them `run(frozenset(names))`. It hands out
    `staging` as its staging pool, passes `prefetch(...)` to each push's TensorSink, and calls
    `invalidate()` after add_param_group and load_state.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        params: Mapping[str, torch.Tensor],
        device: torch.device,
        *,
        warmup_steps: int = WARMUP_STEPS,
        max_graphs: int = MAX_GRAPHS,
    ):
        self.optimizer = optimizer
        self.params = params  # the model's own dict: add_param_group adds to it
        self.device = device
        self.warmup_steps = warmup_steps
        self.max_graphs = max_graphs
        self.grads: dict[str, torch.Tensor] = {}  # static device gradient per parameter
        self.staging = _Staging(params, self._release_staging)
        self.disabled: str | None = None  # why graphs are off for this model (a failed capture)
        # counters, for tests and inspection
        self.eager_steps = 0
        self.captures = 0
        self.replays = 0  # including the replay right after each capture
        self.early_copies = 0  # gradients a step took from an early upload
        self._graphs: OrderedDict[frozenset[str], _Graph] = OrderedDict()
        self._warm: dict[frozenset[str], _Warmup] = {}
        self._landing: dict[str, torch.Tensor] = {}
        self._slot: _Prefetch | None = None
        self._slot_lock = threading.Lock()
        self._streams: tuple[Any, Any] | None = None  # (side, copy), made on first use
        self._streams_lock = threading.Lock()
        self._landing_free: Any = None  # event: the landing buffers were last read before it
        self._uploaded: Any = None  # event: the last upload's copies out of host memory are done
        # Warm-up and fallback steps run uncaptured on purpose: not worth torch's warning that
        # capturable=True without capture may be slow (it checks this attribute).
        optimizer._warned_capturable_if_run_uncaptured = True  # type: ignore[attr-defined]

    # --- graphs --------------------------------------------------------------------------------

    def graph_for(self, names: Any) -> Any:
        """The graph captured for this set of gradient names, or None."""
        entry = self._graphs.get(frozenset(names))
        return None if entry is None else entry.graph

    def invalidate(self) -> None:
        """Drop every graph and warm-up count (param groups or optimizer state were replaced)."""
        if self._graphs:
            self._quiesce()
        self._graphs.clear()
        self._warm.clear()

    def run(self, key: frozenset[str]) -> None:
        """One optimizer step over the parameters named in `key`, whose p.grad is set."""
        if (
            not key
            or self.disabled
            or not all(g["capturable"] for g in self.optimizer.param_groups)
        ):
            self._plain_step()
            self.eager_steps += 1
            return
        fp = Fingerprint(self.optimizer, self.device)
        entry = self._graphs.get(key)
        if entry is not None and not entry.fingerprint.same(fp):
            self._quiesce()
            del self._graphs[key]
            entry = None
        if entry is None and self._warmed_up(key, fp):
            try:
                graph = self._capture()
            except Exception as exc:  # capture runs nothing: the step is still to be taken
                logger.warning("CUDA graph capture failed, stepping eagerly from now on: %s", exc)
                self.disabled = f"capture failed: {exc}"
            else:
                self.captures += 1
                entry = self._graphs[key] = _Graph(graph, fp)
                self._warm.pop(key, None)
                while len(self._graphs) > self.max_graphs:
                    self._quiesce()
                    self._graphs.popitem(last=False)
        if entry is not None:
            self._graphs.move_to_end(key)
            self._replay(entry.graph)
            entry.replays += 1
            self.replays += 1
            return
        self._eager()
        self.eager_steps += 1
        warm = self._warm.get(key)
        if warm is None or not warm.fingerprint.same(fp):
            self._warm.pop(key, None)
            warm = self._warm[key] = _Warmup(fp)
            while len(self._warm) > _WARM_KEPT:
                del self._warm[next(iter(self._warm))]
        warm.steps += 1

    def _warmed_up(self, key: frozenset[str], fp: Fingerprint) -> bool:
        warm = self._warm.get(key)
        if warm is None or warm.steps < self.warmup_steps or not warm.fingerprint.same(fp):
            return False
        # Capture must find every state tensor in place: creating one would be captured (and
        # re-zeroed on every replay) instead of run.
        state = self.optimizer.state
        return all(len(state.get(self.params[n], {})) > 0 for n in key)

    # The device work (replaced by stand-ins in the CPU tests).

    def _plain_step(self) -> None:
        with _DEVICE_WORK.shared(), torch.cuda.device(self.device):
            self.optimizer.step()

    def _eager(self) -> None:
        with _DEVICE_WORK.shared(), torch.cuda.device(self.device):
            side, _ = self._get_streams()
            current = torch.cuda.current_stream()
            side.wait_stream(current)
            with torch.cuda.stream(side):
                self.optimizer.step()
            current.wait_stream(side)

    def _capture(self) -> Any:
        graph = torch.cuda.CUDAGraph()
        with _DEVICE_WORK.exclusive(), torch.cuda.device(self.device):
            side, _ = self._get_streams()
            current = torch.cuda.current_stream()
            side.wait_stream(current)
            try:
                # Same stream as the warm-up; torch.cuda.graph synchronizes the device first.
                with torch.cuda.graph(graph, stream=side, capture_error_mode="thread_local"):
                    self.optimizer.step()
            finally:
                # torch.cuda.graph leaves its stream current when capture_end raises
                torch.cuda.set_stream(current)
        return graph

    def _replay(self, graph: Any) -> None:
        with _DEVICE_WORK.shared(), torch.cuda.device(self.device):
            graph.replay()  # on the current stream, after this step's uploads

    def _quiesce(self) -> None:
        """Wait for replays in flight before a graph (and its memory pool) is let go."""
        with torch.cuda.device(self.device):
            torch.cuda.current_stream().synchronize()

    def _get_streams(self) -> tuple[Any, Any]:
        with self._streams_lock:
            if self._streams is None:
                self._streams = (torch.cuda.Stream(self.device), torch.cuda.Stream(self.device))
            return self._streams

    # --- uploads -------------------------------------------------------------------------------

    def prefetch(
        self, gs: GradSet, names: Sequence[str], sources: Sequence[torch.Tensor], *, sole: bool
    ) -> Callable[[int], None] | None:
        """A TensorSink callback copying each gradient of this push to the device once complete,
        or None: the push may share its step with others (its gradient will be summed on the
        host first), or another push holds the landing buffers."""
        if not sole:
            return None
        with self._slot_lock:
            if self._slot is not None:
                return None
            slot = self._slot = _Prefetch(gs, list(names), list(sources))
        return lambda index: self._copy_early(slot, index)

    def _copy_early(self, slot: _Prefetch, index: int) -> None:
        name, src = slot.names[index], slot.sources[index]
        try:
            with _DEVICE_WORK.shared(), torch.cuda.device(self.device):
                _, copy = self._get_streams()
                with torch.cuda.stream(copy):
                    if self._landing_free is not None:
                        copy.wait_event(self._landing_free)  # the last step read them
                    dst = self._landing.get(name)
                    if dst is None:
                        dst = self._landing[name] = torch.empty_like(self.params[name])
                    dst.copy_(src, non_blocking=True)
                    done = torch.cuda.Event()
                    done.record(copy)
            slot.ready[name] = (src, done)
        except Exception:  # the step copies this one itself
            logger.exception("early upload of %r failed", name)

    def upload(self, grads: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Copy the step's host gradients into the static device buffers (from the landing buffer
        where this push's gradient arrived early and unchanged)."""
        out = {}
        slot = self._slot
        with _DEVICE_WORK.shared(), torch.cuda.device(self.device):
            current = torch.cuda.current_stream()
            from_landing = False
            for name, g in grads.items():
                static = self.grads.get(name)
                if static is None:
                    static = self.grads[name] = torch.empty_like(self.params[name])
                early = slot.ready.get(name) if slot is not None else None
                if early is not None and early[0] is g:
                    current.wait_event(early[1])
                    static.copy_(self._landing[name])
                    from_landing = True
                    self.early_copies += 1
                else:
                    static.copy_(g, non_blocking=True)
                out[name] = static
            if from_landing:
                self._landing_free = torch.cuda.Event()
                self._landing_free.record(current)
            self._uploaded = torch.cuda.Event()
            self._uploaded.record(current)
        return out

    def _release_staging(self, gs: GradSet) -> None:
        """Before pinned buffers are reused: wait for every copy still reading them."""
        slot = self._slot
        if slot is not None and slot.owner is gs:
            for _, done in list(slot.ready.values()):
                done.synchronize()
            with self._slot_lock:
                self._slot = None
        uploaded = self._uploaded
        if uploaded is not None:
            uploaded.synchronize()

    @property
    def nbytes(self) -> int:
        """Device bytes of the static and landing gradient buffers."""
        return sum(
            t.numel() * t.element_size() for d in (self.grads, self._landing) for t in d.values()
        )
