"""Preallocated gradient buffers that pushes stream into, reused from push to push.

A push gets a GradSet from the model's pool, its chunks are written straight into the set's
tensors, and the set goes back to the pool once the step has used it (or the push failed). Host
buffers are pinned when the model lives on CUDA, so host-to-device copies can run asynchronously.

The pool grows to the number of pushes in flight at once. So that a burst of N concurrent pushes
does not keep N full gradient copies for the model's lifetime, a release trims idle sets once the
pool has been larger than recent use needs for `trim_after_s`: it keeps the most sets in use at
once during the last window, plus one so a push overlapping the steady load allocates nothing.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable, Mapping

import torch


class GradSet:
    """One gradient buffer per parameter name, allocated on first use."""

    def __init__(self, like: Mapping[str, torch.Tensor], pin: bool):
        self._like = like
        self._pin = pin
        self.buffers: dict[str, torch.Tensor] = {}

    def take(self, names: Iterable[str]) -> list[torch.Tensor]:
        out = []
        for name in names:
            buf = self.buffers.get(name)
            if buf is None:
                p = self._like[name]
                buf = torch.empty(p.shape, dtype=p.dtype, device="cpu", pin_memory=self._pin)
                self.buffers[name] = buf
            out.append(buf)
        return out

    @property
    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.buffers.values())


class StagingPool:
    """Free GradSets of one model: grows to the pushes in flight at once, trims after a burst."""

    def __init__(self, params: Mapping[str, torch.Tensor], pin: bool, trim_after_s: float = 10.0):
        self._params = params
        self._pin = pin
        self._free: list[GradSet] = []
        self._all: list[GradSet] = []
        self._lock = threading.Lock()
        self.trim_after_s = trim_after_s  # how long a window of use lasts before trimming to it
        self._in_use = 0
        self._window_peak = 0  # most sets in use at once since `_window_start`
        self._window_start = time.monotonic()

    def acquire(self) -> GradSet:
        with self._lock:
            self._in_use += 1
            self._window_peak = max(self._window_peak, self._in_use)
            if self._free:
                return self._free.pop()
            gs = GradSet(self._params, self._pin)
            self._all.append(gs)
            return gs

    def release(self, gs: GradSet) -> None:
        with self._lock:
            self._free.append(gs)
            self._in_use -= 1
            now = time.monotonic()
            if now - self._window_start < self.trim_after_s:
                return
            # A window has passed: keep what it needed at most (+1), start the next one.
            self._trim(self._window_peak + 1)
            self._window_peak = self._in_use
            self._window_start = now

    def trim(self, keep: int = 1) -> None:
        """Drop idle sets until at most `keep` sets exist (sets in use are never dropped)."""
        with self._lock:
            self._trim(keep)

    def _trim(self, keep: int) -> None:
        while self._free and len(self._all) > keep:
            gs = self._free.pop(0)  # the longest idle: a recently used set may still be cached
            self._all.remove(gs)

    @property
    def sets(self) -> int:
        """GradSets allocated (in use or idle)."""
        with self._lock:
            return len(self._all)

    @property
    def nbytes(self) -> int:
        with self._lock:
            return sum(gs.nbytes for gs in self._all)
