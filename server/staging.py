"""Preallocated gradient buffers that pushes stream into, reused from push to push.

A push gets a GradSet from the model's pool, its chunks are written straight into the set's
tensors, and the set goes back to the pool once the step has used it (or the push failed). Host
buffers are pinned when the model lives on CUDA, so host-to-device copies can run asynchronously.
"""

from __future__ import annotations

import threading
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
    """Free GradSets of one model. Grows to the number of pushes in flight at once, then stays."""

    def __init__(self, params: Mapping[str, torch.Tensor], pin: bool):
        self._params = params
        self._pin = pin
        self._free: list[GradSet] = []
        self._all: list[GradSet] = []
        self._lock = threading.Lock()

    def acquire(self) -> GradSet:
        with self._lock:
            if self._free:
                return self._free.pop()
            gs = GradSet(self._params, self._pin)
            self._all.append(gs)
            return gs

    def release(self, gs: GradSet) -> None:
        with self._lock:
            self._free.append(gs)

    def trim(self, keep: int = 1) -> None:
        """Drop idle sets beyond `keep` (after a burst of concurrent pushes)."""
        with self._lock:
            while len(self._free) > keep:
                gs = self._free.pop()
                self._all.remove(gs)

    @property
    def nbytes(self) -> int:
        with self._lock:
            return sum(gs.nbytes for gs in self._all)
