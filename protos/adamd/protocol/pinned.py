"""Tensors in device memory on the wire: through reused page-locked host buffers, never a
pageable copy.

A gradient on a GPU leaves in chunks: each chunk is copied device-to-host into one of two pinned
chunk buffers (asynchronously, on the current stream) while the previous chunk is being framed
and sent, so the DMA overlaps the send and no whole host copy of the tensor is ever made
(`device_chunks`, used by frames.wire_chunks for every non-CPU tensor). A narrower wire dtype is
converted on the device first (Tensor.to's rounding, the same bits as on the host).

Parameters pulled into a GPU tensor land in a pinned host buffer of the tensor's size, taken
from a pool (`Landing`), and go up with one asynchronous host-to-device copy each; the pull
waits for those copies before the buffers go back to the pool.

Page-locked copies run at the link's full speed and asynchronously; a copy from pageable memory
is staged by the driver through a pinned buffer of its own, a hidden extra host copy at a
fraction of the speed, and blocks. The pool keeps idle buffers for reuse (pinning is slow: a few
ms per MiB) up to `keep_bytes`. Without CUDA the same code runs over ordinary host memory (so it
is exercised by the CPU tests); `pinned` says which.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator

import numpy as np
import torch

_PAGE = 4096
KEEP_BYTES = 1 << 30  # idle buffers the pool keeps for later steps


def _size_class(nbytes: int) -> int:
    return max(_PAGE, (nbytes + _PAGE - 1) // _PAGE * _PAGE)


class HostBuffers:
    """Host byte buffers, page-locked when CUDA is available, reused from call to call."""

    def __init__(self, pin: bool | None = None, keep_bytes: int = KEEP_BYTES):
        self._pin = pin
        self.keep_bytes = keep_bytes
        self._free: dict[int, list[torch.Tensor]] = {}
        self._idle = 0  # bytes in _free
        self._lock = threading.Lock()
        self.allocated = 0  # buffers made so far (a reused one is not counted again)

    @property
    def pinned(self) -> bool:
        if self._pin is None:
            self._pin = torch.cuda.is_available()
        return self._pin

    def take(self, nbytes: int) -> torch.Tensor:
        """A flat uint8 buffer of at least `nbytes` (its first `nbytes` are the caller's)."""
        size = _size_class(nbytes)
        with self._lock:
            free = self._free.get(size)
            if free:
                self._idle -= size
                return free.pop()
            self.allocated += 1
        return torch.empty(size, dtype=torch.uint8, pin_memory=self.pinned)

    def give(self, buf: torch.Tensor) -> None:
        """Back to the pool (dropped when the pool holds `keep_bytes` idle already). The caller
        must be done with it, device copies included."""
        size = buf.numel()
        with self._lock:
            if self._idle + size > self.keep_bytes:
                return
            self._free.setdefault(size, []).append(buf)
            self._idle += size

    @property
    def idle_bytes(self) -> int:
        with self._lock:
            return self._idle


POOL = HostBuffers()


def _wait(event: torch.cuda.Event | None) -> None:
    if event is not None:
        event.synchronize()


def device_chunks(
    t: torch.Tensor, wire: torch.dtype, chunk_bytes: int, pool: HostBuffers = POOL
) -> Iterator[tuple[int, np.ndarray]]:
    """(byte offset, bytes) of `t` as `wire`, `chunk_bytes` at a time, through two pinned chunk
    buffers: chunk k+1's device-to-host copy runs while chunk k is handed out. Each chunk is
    valid only until the next one is asked for."""
    src = t.detach()
    if src.dtype != wire:
        src = src.to(wire)  # on the device: nothing wider crosses the link
    flat = src.contiguous().reshape(-1).view(torch.uint8)
    total = flat.numel()
    if not total:
        return
    step = max(min(chunk_bytes, total), 1)
    cuda = flat.device.type == "cuda"
    slots = [pool.take(step), pool.take(step)]
    events: list[torch.cuda.Event | None] = [None, None]

    def issue(k: int) -> None:
        start = k * step
        n = min(step, total - start)
        slots[k % 2][:n].copy_(flat[start : start + n], non_blocking=cuda)
        if cuda:
            events[k % 2] = torch.cuda.Event()
            events[k % 2].record()  # type: ignore[union-attr]

    count = (total + step - 1) // step
    try:
        issue(0)
        for k in range(count):
            if k + 1 < count:
                issue(k + 1)  # into the slot of chunk k-1, which the caller is done with
            _wait(events[k % 2])
            start = k * step
            n = min(step, total - start)
            yield start, slots[k % 2][:n].numpy()
    finally:
        for e in events:
            _wait(e)  # no copy may still write into a buffer the pool hands out again
        for s in slots:
            pool.give(s)


class Landing:
    """Where a pull into non-CPU tensors lands: a pooled host buffer per tensor, then one
    asynchronous host-to-device copy each (`finish`)."""

    def __init__(self, pool: HostBuffers = POOL):
        self.pool = pool
        self._taken: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def buffer_for(self, dst: torch.Tensor) -> torch.Tensor:
        """A host tensor shaped and typed like `dst` to receive its bytes."""
        nbytes = dst.numel() * dst.element_size()
        raw = self.pool.take(nbytes)
        host = raw[:nbytes].view(dst.dtype).view(dst.shape)
        self._taken.append((raw, host, dst))
        return host

    def finish(self) -> None:
        """Copy every landed buffer into its tensor and wait for the copies; the buffers go
        back to the pool."""
        streams = set()
        try:
            with torch.no_grad():
                for _, host, dst in self._taken:
                    cuda = dst.device.type == "cuda"
                    if cuda:
                        streams.add(torch.cuda.current_stream(dst.device))
                    dst.copy_(host, non_blocking=cuda and self.pool.pinned)
        finally:
            for stream in streams:
                stream.synchronize()
            for raw, _, _ in self._taken:
                self.pool.give(raw)
            self._taken = []

    def release(self) -> None:
        """The pull is not used (a step ran meanwhile; it is retried): the buffers go back."""
        for raw, _, _ in self._taken:
            self.pool.give(raw)
        self._taken = []
