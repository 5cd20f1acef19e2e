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

Streams. Each model issues all its device work on its own two streams (from torch's pool):
uploads, steps, captures and replays on its step stream, early uploads on its copy stream. Readers
of its tensors (pulls, snapshots, state reads, statistics) run on the step stream too (`reading()`),
so they come after the step they read and before the next step writes, and a model's pulls and
replies wait only behind its own work. `step_done` is an event recorded after each step.

Captures. A capture runs `capture_begin`/`capture_end` on the step stream itself, with
capture_error_mode="thread_local" (as torch.compile's CUDA-graph trees do: other threads keep
serving). Not `torch.cuda.graph`: that synchronizes the whole device and empties both of torch's
caches (device and pinned) at every capture. While a capture is open, nothing else may be issued to
its stream (it would be captured), so each stream has a lock that device work takes in shared mode
and a capture in exclusive mode; streams are shared between models only beyond torch's pool (32 per
priority, 16 models), and then those models wait for each other's captures, nobody else does.
A key (set of gradient names) captured `max_captures` times steps eagerly from then on: a schedule
that changes a baked-in option (betas, eps, weight_decay) every few steps would otherwise recapture
over and over.

Failed captures. An error inside the captured step leaves a capture that `capture_end` closes; the
model then steps eagerly. An error from `capture_begin` or `capture_end` itself (a CUDA-level error
that invalidated the capture) leaves torch's caching allocator believing a capture is still under
way (`capture_end` raises before it ends the allocator's capture), so graphs are turned off for the
whole process (`graphs_disabled()`), and every model steps eagerly from then on.

Frees. The caching allocator reuses a freed block at once for work on the stream it was allocated
on. So before anything a step may still be using is let go (graphs, static and landing buffers,
replaced state, a deleted model's tensors) the model's streams are synchronized (`_quiesce`), and
state loaded into the optimizer is created on the step stream.
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

from adamd.server.core.staging import BOUNCE_BYTES, GradSet, StagingPool, copy_in_chunks, host_bytes
from adamd.server.cuda.graph_guards import (
    CaptureBroken,
    disable_graphs,
    graphs_disabled,
    stream_lock,
)

logger = logging.getLogger(__name__)

WARMUP_STEPS = 3  # eager steps per gradient set before its capture (torch's examples use 3)
MAX_GRAPHS = 2  # captured graphs kept per model
MAX_CAPTURES = 4  # captures of one gradient set before it steps eagerly for good
_WARM_KEPT = 8  # gradient sets whose warm-up is being counted, per model
_NOT_OPTIONS = ("params", "param_names")


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
    `staging` as its staging pool, passes `prefetch(...)` to each push's TensorSink, reads its
    tensors inside `reading()`, and calls `invalidate()` around add_param_group and load_state
    and `close()` when the model is deleted.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        params: Mapping[str, torch.Tensor],
        device: torch.device,
        *,
        warmup_steps: int = WARMUP_STEPS,
        max_graphs: int = MAX_GRAPHS,
        max_captures: int = MAX_CAPTURES,
    ):
        self.optimizer = optimizer
        self.params = params  # the model's own dict: add_param_group adds to it
        self.device = device
        self.warmup_steps = warmup_steps
        self.max_graphs = max_graphs
        self.max_captures = max_captures  # captures per key before it steps eagerly for good
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
        self._captured: dict[frozenset[str], int] = {}  # captures made per key
        self.given_up: set[frozenset[str]] = set()  # keys that changed too often: eager
        self._landing: dict[str, torch.Tensor] = {}
        self._slot: _Prefetch | None = None
        self._slot_lock = threading.Lock()
        self._streams: tuple[Any, Any] | None = None  # (step, copy), made on first use
        self._streams_lock = threading.Lock()
        self._landing_free: Any = None  # event: the landing buffers were last read before it
        self._uploaded: Any = None  # event: the last upload's copies out of host memory are done
        self.step_done: Any = None  # event recorded on the step stream after each step
        self._bounce: torch.Tensor | None = None  # pinned, for chunked copies to the host
        self._bounce_lock = threading.Lock()
        # Warm-up and fallback steps run uncaptured on purpose: not worth torch's warning that
        # capturable=True without capture may be slow (it checks this attribute).
        optimizer._warned_capturable_if_run_uncaptured = True  # type: ignore[attr-defined]

    # --- graphs --------------------------------------------------------------------------------

    def graph_for(self, names: Any) -> Any:
        """The graph captured for this set of gradient names, or None."""
        entry = self._graphs.get(frozenset(names))
        return None if entry is None else entry.graph

    def invalidate(self) -> None:
        """Drop every graph and warm-up count (param groups or optimizer state are replaced).
        Waits for the model's device work first: what it used may be freed next."""
        self._quiesce()
        self._graphs.clear()
        self._warm.clear()

    def close(self) -> None:
        """The model is deleted: wait for its device work, then let go of graphs and buffers."""
        self.invalidate()
        self.grads.clear()
        self._landing.clear()
        self.staging.close()

    def run(self, key: frozenset[str]) -> None:
        """One optimizer step over the parameters named in `key`, whose p.grad is set."""
        if (
            not key
            or self.disabled
            or graphs_disabled()
            or key in self.given_up
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
            if self._captured.get(key, 0) >= self.max_captures:
                self._give_up(key)  # and this step is eager
        if entry is None and key not in self.given_up and self._warmed_up(key, fp):
            entry = self._capture_key(key, fp)
        if entry is not None:
            self._graphs.move_to_end(key)
            self._replay(entry.graph)
            entry.replays += 1
            self.replays += 1
            return
        self._eager()
        self.eager_steps += 1
        if key in self.given_up or self.disabled or graphs_disabled():
            return
        warm = self._warm.get(key)
        if warm is None or not warm.fingerprint.same(fp):
            self._warm.pop(key, None)
            warm = self._warm[key] = _Warmup(fp)
            while len(self._warm) > _WARM_KEPT:
                del self._warm[next(iter(self._warm))]
        warm.steps += 1

    def _capture_key(self, key: frozenset[str], fp: Fingerprint) -> _Graph | None:
        """Capture the step for `key`, or None (this step is then taken eagerly)."""
        self._warm.pop(key, None)
        if self._captured.get(key, 0) >= self.max_captures:
            self._give_up(key)
            return None
        try:
            graph = self._capture()
        except CaptureBroken as exc:
            disable_graphs(f"capture failed at the CUDA level: {exc.__cause__ or exc}")
            self.disabled = f"capture failed: {exc.__cause__ or exc}"
            return None
        except Exception as exc:  # capture runs nothing: the step is still to be taken
            logger.warning("CUDA graph capture failed, stepping eagerly from now on: %s", exc)
            self.disabled = f"capture failed: {exc}"
            return None
        self.captures += 1
        self._captured[key] = self._captured.get(key, 0) + 1
        entry = self._graphs[key] = _Graph(graph, fp)
        while len(self._graphs) > self.max_graphs:
            self._quiesce()
            self._graphs.popitem(last=False)
        return entry

    def _give_up(self, key: frozenset[str]) -> None:
        logger.info(
            "a captured step for %d gradients went stale %d times: stepping it eagerly from now on",
            len(key),
            self.max_captures,
        )
        self.given_up.add(key)
        self._warm.pop(key, None)

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
        with self.reading():
            self.optimizer.step()
            self._record_step_done()

    def _eager(self) -> None:
        with self.reading():  # the warm-up runs on the stream the capture will use
            self.optimizer.step()
            self._record_step_done()

    def _capture(self) -> Any:
        graph = torch.cuda.CUDAGraph()
        step, _ = self._get_streams()
        with (
            stream_lock(step).exclusive(),
            torch.cuda.device(self.device),
            torch.cuda.stream(step),
        ):
            # No device sync and no cache flush (torch.cuda.graph does both): the step stream is
            # ours alone while the lock is held, and capture runs nothing.
            try:
                graph.capture_begin(capture_error_mode="thread_local")
            except Exception as exc:
                raise CaptureBroken(str(exc)) from exc
            try:
                self.optimizer.step()
            except BaseException:
                try:
                    graph.capture_end()
                except Exception as exc:
                    raise CaptureBroken(str(exc)) from exc
                raise
            try:
                graph.capture_end()
            except Exception as exc:
                raise CaptureBroken(str(exc)) from exc
        return graph

    def _replay(self, graph: Any) -> None:
        with self.reading():
            graph.replay()  # on the step stream, after this step's uploads
            self._record_step_done()

    def _record_step_done(self) -> None:
        done = torch.cuda.Event()
        done.record()
        self.step_done = done

    def _quiesce(self) -> None:
        """Wait for the model's device work (a replay, an upload, an early copy) to finish."""
        if self._streams is None:
            return
        for stream in self._streams:
            stream.synchronize()

    def _get_streams(self) -> tuple[Any, Any]:
        with self._streams_lock:
            if self._streams is None:
                self._streams = (torch.cuda.Stream(self.device), torch.cuda.Stream(self.device))
            return self._streams

    @contextlib.contextmanager
    def reading(self) -> Iterator[None]:
        """Issue device work on the model's step stream: after the last step, before the next.
        Not re-entrant (a capture waiting in between would deadlock it)."""
        step, _ = self._get_streams()
        with stream_lock(step).shared(), torch.cuda.device(self.device), torch.cuda.stream(step):
            yield

    def to_host(self, t: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        """A host copy of device tensor `t` (converted to `dtype` on the device first), copied on
        the step stream through a small pinned bounce buffer. Call inside `reading()`."""
        src = t.detach()
        if dtype is not None and dtype != src.dtype:
            src = src.to(dtype)
        src = src.contiguous()
        out = torch.empty(src.shape, dtype=src.dtype)
        if not src.numel():
            return out
        with self._bounce_lock:
            if self._bounce is None:
                self._bounce = host_bytes(BOUNCE_BYTES, pin=True)
            copy_in_chunks(src, out, self._bounce)
        return out

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
            _, copy = self._get_streams()
            with (
                stream_lock(copy).shared(),
                torch.cuda.device(self.device),
                torch.cuda.stream(copy),
            ):
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
        where this push's gradient arrived early and unchanged), on the step stream."""
        out = {}
        slot = self._slot
        with self.reading():
            current = torch.cuda.current_stream()
            from_landing = False
            for name, g in grads.items():
                static = self.grads.get(name)
                if static is None:  # allocated on the step stream, its only user
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
            t.numel() * t.element_size()
            for d in (self.grads, self._landing)
            for t in list(d.values())
        )
