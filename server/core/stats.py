"""Training statistics per hosted model: a bounded step history and per-parameter norms.

`StatsBook` follows the registry: every model gets a `ModelStats` whose observer runs after each
step, under the model lock, on the step path. So the observer does as little as it can:

* every step: a few Python scalars (lr per group, loss, step time, workers, their lag) appended to
  a bounded deque;
* on a stats step, once the step's pushes are answered (StepRecord.later, still under the lock,
  so it delays the next step of the model, not this one's replies): the gradient norm (one batched `torch._foreach_norm` over the averaged
  gradients) and the update norm, recomputed from the Adam state the step just wrote
  (lr / (1 - beta1^t) * exp_avg / (sqrt(exp_avg_sq / (1 - beta2^t)) + eps), plus the decoupled
  weight decay term), one tensor at a time, so no copy of the parameters is ever kept. Results stay
  tensors (on the tensors' device) until someone reads them, so on CUDA the step path never waits:
  a hyperparameter or step count that lives on the device (capturable Adam's `step`, the device
  lr) enters the arithmetic as a 0-d tensor instead of being read with `.item()`, and the norms are
  computed on the model's stream (`HostedModel.on_device`), after the step they describe. So in
  auto mode the measured cost is the statistics' own host time, not the step's GPU time.

Which steps are stats steps: with `stats_every` N > 0, every Nth; with 0 (the default, "auto"), a
step whenever the latest statistics cost at most `BUDGET` (2%) of the wall-clock time since they
ran, so the more often steps come and the larger the model, the more steps go without; with N < 0,
never (norms of parameters and Adam state for `/params` are still computed on request, on the
reader's thread, outside the model lock, and retried if a step ran meanwhile).
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from adamd.server.core.model import HostedModel, StepRecord
from adamd.server.core.registry import ModelRegistry

logger = logging.getLogger(__name__)

HISTORY_LEN = 4096  # steps kept per model (a few hundred KiB)
_SLICE = 1 << 18  # elements per slice of the update-norm computation (1 MiB of fp32)
BUDGET = 0.02  # auto mode: share of wall-clock time the step-path statistics may take
_RATE_WINDOW_S = 30.0  # step rate is averaged over this much recent history


def _float(v: Any) -> float | None:
    if v is None:
        return None
    if isinstance(v, torch.Tensor):
        v = v.detach().reshape(-1)[0].item()
    f = float(v)
    return f if math.isfinite(f) else None


def _real(t: torch.Tensor) -> torch.Tensor:
    """A complex tensor as the real view Adam steps it as (norms of the two agree); others as is."""
    return torch.view_as_real(t) if t.is_complex() else t


def _norms(tensors: Sequence[torch.Tensor], ord: float = 2.0) -> torch.Tensor:
    """Per-tensor norms as one float32 vector on the tensors' device: one batched kernel per
    device/dtype instead of a Python loop. Empty input gives an empty vector. A complex tensor
    counts as its real view: the same 2-norm, and an L1 norm over its real and imaginary parts."""
    if not tensors:
        return torch.zeros(0)
    tensors = [_real(t) for t in tensors]
    # float64 norms are computed in float64 (torch refuses to narrow them in the kernel).
    by_kind: dict[tuple[torch.device, bool], list[int]] = {}
    for i, t in enumerate(tensors):
        by_kind.setdefault((t.device, t.dtype == torch.float64), []).append(i)

    def part(kind: tuple[torch.device, bool], idx: list[int]) -> torch.Tensor:
        group = [tensors[i] for i in idx]
        if kind[1]:
            return torch.stack(torch._foreach_norm(group, ord)).float()
        return torch.stack(torch._foreach_norm(group, ord, dtype=torch.float32))

    if len(by_kind) == 1:
        ((kind, idx),) = by_kind.items()
        return part(kind, idx)
    out = torch.zeros(len(tensors))
    for kind, idx in by_kind.items():
        out[idx] = part(kind, idx).cpu()
    return out


@dataclass
class StepEntry:
    """One step (or skipped step) as the history keeps it."""

    version: int
    time: float  # unix seconds when the step finished
    applied: bool  # False: skipped (found_inf)
    step_seconds: float
    contributors: int
    ranks: tuple[int, ...]
    partial: bool  # a sync round that timed out without every worker
    lr: tuple[float | None, ...]  # per param group
    loss: float | None  # mean of the losses the contributing workers reported
    scalars: dict[str, float]
    lag: dict[int, int]  # rank -> versions applied since the one its last gradient came from
    norms: tuple[torch.Tensor, torch.Tensor] | None = None  # (grad, update) norms until read
    grad_norm: float | None = None
    update_norm: float | None = None

    def resolve(self) -> None:
        if self.norms is not None:
            g, u = (float(t) for t in self.norms)  # the only device sync, on the reader's thread
            self.grad_norm, self.update_norm = _finite(g), _finite(u)
            self.norms = None

    def as_json(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "time": self.time,
            "applied": self.applied,
            "step_ms": self.step_seconds * 1e3,
            "workers": self.contributors,
            "ranks": list(self.ranks),
            "partial": self.partial,
            "lr": list(self.lr),
            "loss": self.loss,
            "scalars": self.scalars,
            "lag": {str(r): v for r, v in self.lag.items()},
            "grad_norm": self.grad_norm,
            "update_norm": self.update_norm,
        }


def _num(v: Any) -> Any:
    """A hyperparameter or step count as a float; one on an accelerator stays a 0-d tensor there
    (reading it would wait for the device)."""
    if isinstance(v, torch.Tensor):
        if v.device.type != "cpu":
            return v.detach().reshape(())
        return float(v.item())
    return float(v)


def _sqrt(x: Any) -> Any:
    return torch.sqrt(x) if isinstance(x, torch.Tensor) else math.sqrt(x)


def _finite(x: float) -> float | None:
    return x if math.isfinite(x) else None


@dataclass
class _Last:
    """Per-parameter norms from the latest stats step (device tensors until read)."""

    version: int = -1
    names: list[str] = field(default_factory=list)
    grad: torch.Tensor | None = None
    update_names: list[str] = field(default_factory=list)
    update: torch.Tensor | None = None


class ModelStats:
    """History and last statistics of one model; `observe` is its step observer."""

    def __init__(self, model: HostedModel, every: int, history_len: int = HISTORY_LEN):
        self.model = model
        self.every = every
        self.history: deque[StepEntry] = deque(maxlen=history_len)
        self.last = _Last()
        self._lock = threading.Lock()  # history and `last` between observer and readers
        self._computing = threading.Lock()  # held from a stats step's end until its norms exist
        self._scratch: tuple[torch.Tensor, torch.Tensor] | None = None  # for update norms
        self._last_cost = 0.0  # seconds the latest stats step spent on norms
        self._last_at = 0.0  # perf_counter when it ran

    def _due(self, version: int) -> bool:
        if self.every > 0:
            return version % self.every == 0
        if self.every < 0:
            return False
        return self._last_cost <= BUDGET * (time.perf_counter() - self._last_at)

    def observe(self, record: StepRecord) -> None:
        """Step observer (model lock held). Cheap scalars always, norms every `every` steps."""
        model = self.model
        lag = {r: max(0, record.version - pv - 1) for r, (_, pv) in model.last_heard.items()}
        entry = StepEntry(
            version=record.version,
            time=record.wall_time,
            applied=record.applied,
            step_seconds=record.step_seconds,
            contributors=record.contributors,
            ranks=record.ranks,
            partial=record.partial,
            lr=tuple(_float(g.get("lr")) for g in model.requested),
            loss=sum(record.losses) / len(record.losses) if record.losses else None,
            scalars=dict(record.scalars),
            lag=lag,
        )
        if record.applied and self._due(record.version):
            # The norms run once the pushes are answered (StepRecord.later): readers wait for
            # them (`_computing`), the workers do not.
            self._computing.acquire()
            record.later.append(lambda: self._norms_later(record, entry))
        with self._lock:
            self.history.append(entry)

    def _norms_later(self, record: StepRecord, entry: StepEntry) -> None:
        try:
            t0 = time.perf_counter()
            with self.model.on_device():
                norms, last = self._norms_of_step(record)
            self._last_at = time.perf_counter()
            self._last_cost = self._last_at - t0
            with self._lock:
                entry.norms = norms
                self.last = last
        finally:
            self._computing.release()

    def _norms_of_step(self, record: StepRecord) -> tuple[tuple[torch.Tensor, torch.Tensor], _Last]:
        names = list(record.grads)
        # The step's gradients are host buffers (pinned on CUDA), its state on the device: each
        # total stays where it was computed, so nothing here waits for a copy.
        grad = _norms([record.grads[n] for n in names])
        total_grad = torch.linalg.vector_norm(grad) if grad.numel() else torch.zeros(())
        last = _Last(record.version, names, grad)
        upd_names, upd = self._update_norms(names)
        last.update_names, last.update = upd_names, upd
        total_update = torch.linalg.vector_norm(upd) if upd.numel() else torch.zeros(())
        return (total_grad, total_update), last

    def _update_norms(self, names: list[str]) -> tuple[list[str], torch.Tensor]:
        """Norms of what the step just subtracted from each stepped parameter, from its Adam state:
        lr / (1 - beta1^t) * exp_avg / (sqrt(exp_avg_sq) / sqrt(1 - beta2^t) + eps), plus
        lr * wd * p_old with decoupled weight decay. Computed in slices through two small scratch
        buffers, so it allocates nothing parameter-sized and stays in cache."""
        model = self.model
        group_of = {p: g for g in model.optimizer.param_groups for p in g["params"]}
        done, norms = [], []
        for n in names:
            p = model.params.get(n)
            state = model.optimizer.state.get(p) if p is not None else None
            if p is None or not state or "exp_avg" not in state:
                continue
            g = group_of[p]
            lr, (beta1, beta2) = _num(g["lr"]), (_num(b) for b in g["betas"])
            eps, wd, t = _num(g["eps"]), _num(g["weight_decay"]), _num(state["step"])
            decoupled = bool(wd and g.get("decoupled_weight_decay"))
            # Complex parameters step as their real view (torch.view_as_real), and so do we.
            m = _real(state["exp_avg"].detach()).reshape(-1)
            v = _real(state["max_exp_avg_sq"] if g["amsgrad"] else state["exp_avg_sq"]).reshape(-1)
            new = _real(p.detach()).reshape(-1)
            step_size, bc2_sqrt = lr / (1 - beta1**t), _sqrt(1 - beta2**t)
            lr_wd = lr * wd
            scratch = self._scratch_for(m)
            total = torch.zeros((), dtype=torch.float32, device=m.device)
            for start in range(0, m.numel(), _SLICE):
                end = min(start + _SLICE, m.numel())
                u = scratch[0][: end - start]
                torch.sqrt(v[start:end], out=u).div_(bc2_sqrt).add_(eps)
                torch.div(m[start:end], u, out=u).mul_(step_size)
                if decoupled:  # p_new = p_old (1 - lr wd) - u  =>  p_old - p_new = lr wd p_old + u
                    old = scratch[1][: end - start]
                    torch.add(new[start:end], u, out=old).div_(1 - lr_wd)
                    if isinstance(lr_wd, torch.Tensor):  # a device lr: alpha takes numbers only
                        u.add_(old.mul_(lr_wd))
                    else:
                        u.add_(old, alpha=lr_wd)
                total += torch.dot(u, u) if u.dtype == torch.float32 else u.float().square().sum()
            norms.append(total.sqrt())
            done.append(n)
        return done, torch.stack(norms) if norms else torch.zeros(0)

    def _scratch_for(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        s = self._scratch
        if s is None or s[0].device != like.device or s[0].dtype != like.dtype:
            s = self._scratch = (
                torch.empty(_SLICE, dtype=like.dtype, device=like.device),
                torch.empty(_SLICE, dtype=like.dtype, device=like.device),
            )
        return s

    # --- reads (any thread) --------------------------------------------------------------------

    def entries(self, since: int | None = None, limit: int | None = None) -> list[StepEntry]:
        with self._computing:  # a step already answered has its norms
            pass
        with self.model.on_device(), self._lock:  # norms still on the device are read here
            items = list(self.history)
            if since is not None:
                items = [e for e in items if e.version > since]
            if limit is not None:
                items = items[-limit:] if limit > 0 else []
            for e in items:
                e.resolve()
        return items

    def step_rate(self) -> float:
        """Applied steps per second over the recent history (0 when idle or unknown)."""
        with self._lock:
            recent = [e for e in self.history if e.applied]
        if len(recent) < 2:
            return 0.0
        end = recent[-1].time
        window = [e for e in recent if e.time >= end - _RATE_WINDOW_S]
        if len(window) < 2 or window[-1].time <= window[0].time:
            return 0.0
        return (len(window) - 1) / (window[-1].time - window[0].time)

    def last_loss(self) -> float | None:
        with self._lock:
            for e in reversed(self.history):
                if e.loss is not None:
                    return e.loss
        return None

    def param_stats(self, attempts: int = 3) -> tuple[int, list[dict[str, Any]]]:
        """Per-parameter statistics of the current state: (version, rows).

        The norms run without the model lock so a reader never stalls training; if a step ran
        meanwhile the numbers may mix two versions, so we retry, and hold the lock on the last try.
        """
        for attempt in range(attempts):
            if attempt == attempts - 1:
                with self.model.locked():
                    return self._param_stats_once(check=False)
            result = self._param_stats_once(check=True)
            if result is not None:
                return result
        raise AssertionError("unreachable")

    def _param_stats_once(self, check: bool) -> Any:
        model = self.model
        with model.locked():  # refs only: state is created lazily by the first step
            seq, version = model.read_begin()
            names = list(model.params)
            params = [model.params[n] for n in names]
            group_of = {n: i for i, g in enumerate(model.group_names()) for n in g}
            states = [dict(model.optimizer.state.get(p, {})) for p in params]
        with self._lock:
            last = self.last
        has = [i for i, s in enumerate(states) if "exp_avg" in s]
        with model.on_device():  # on CUDA: after the last step, before the next
            rows_t = [_norms(params).float().cpu()]
            if has:
                avg = _norms([states[i]["exp_avg"] for i in has])
                sq_sum = _norms(
                    [states[i]["exp_avg_sq"] for i in has], ord=1
                )  # >= 0: L1 is the sum
                steps = torch.stack(
                    [states[i]["step"].detach().to(avg.device, torch.float32) for i in has]
                )
                rows_t.append(torch.stack([avg, sq_sum, steps]).cpu())
            grad = dict(zip(last.names, last.grad.tolist())) if last.grad is not None else {}
            update = (
                dict(zip(last.update_names, last.update.tolist()))
                if last.update is not None
                else {}
            )
        if check and not model.read_consistent(seq):
            return None
        norm = rows_t[0].tolist()
        extra = rows_t[1].tolist() if has else [[], [], []]
        per = {i: (extra[0][k], extra[1][k], extra[2][k]) for k, i in enumerate(has)}
        rows = []
        for i, (n, p) in enumerate(zip(names, params)):
            avg_n, sq_sum, step = per.get(i, (None, None, None))
            upd = update.get(n)
            rows.append(
                {
                    "name": n,
                    "group": group_of.get(n),
                    "shape": list(p.shape),
                    "numel": p.numel(),
                    "dtype": str(p.dtype).removeprefix("torch."),
                    "device": str(p.device),
                    "step": int(step) if step is not None else 0,
                    "norm": norm[i],
                    "grad_norm": grad.get(n),
                    "exp_avg_norm": avg_n,
                    # per real element: a complex parameter counts as its real view
                    "exp_avg_sq_mean": sq_sum / _real(p).numel()
                    if sq_sum is not None and p.numel()
                    else None,
                    "update_norm": upd,
                    "update_to_weight": upd / norm[i] if upd is not None and norm[i] > 0 else None,
                    "stats_version": last.version if n in grad else None,
                }
            )
        return version, rows


class StatsBook:
    """A ModelStats per model in the registry, kept in step with creates and deletes."""

    def __init__(self, registry: ModelRegistry, every: int):
        self.every = every
        self._stats: dict[str, ModelStats] = {}
        self._lock = threading.Lock()
        registry.on_create.append(self._on_create)
        registry.on_delete.append(self._on_delete)
        for model in registry.models():
            self._on_create(model)

    def _on_create(self, model: HostedModel) -> None:
        self.get(model)

    def _on_delete(self, name: str) -> None:
        with self._lock:
            stats = self._stats.pop(name, None)
        if stats is not None:
            with stats.model.locked():  # a push still in flight may be stepping it
                stats.model.observers.remove(stats.observe)

    def get(self, model: HostedModel) -> ModelStats:
        with self._lock:
            stats = self._stats.get(model.name)
            if stats is None or stats.model is not model:
                # First sight of this model: from on_create, or a read that raced it.
                stats = self._stats[model.name] = ModelStats(model, self.every)
                with model.locked():
                    model.observers.append(stats.observe)
        return stats
