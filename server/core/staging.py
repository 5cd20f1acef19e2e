"""Preallocated gradient buffers that pushes stream into, reused from push to push; host memory
for copies between host and device.

A push gets a GradSet from the model's pool, its chunks are written straight into the set's
tensors, and the set goes back to the pool once the step has used it (or the push failed). A set is
one flat host buffer with a view per parameter (each starting on a 256-byte boundary), so a set
costs one allocation of the gradient's size. On CUDA it is page-locked, so host-to-device copies
run asynchronously.

Page-locked memory is pinned with `cudaHostRegister` on an ordinary host allocation (as torch's own
checkpoint stager does), not taken from torch's caching host allocator: that allocator rounds every
request up to a power of two (a set of 1.1 GB would pin 2 GB) and keeps freed blocks cached until
`torch._C._host_emptyCache()`, so a trimmed set would never go back to the system. A registered
buffer pins exactly its pages and is unregistered when its set is dropped. Where registering
fails, the buffer falls back to `pin_memory=True`.

The pool grows to the number of pushes in flight at once. So that a burst of N concurrent pushes
does not keep N full gradient copies for the model's lifetime, idle sets are trimmed once the pool
has been larger than recent use needs for `trim_after_s`: it keeps the most sets in use at once
during the last window, plus one so a push overlapping the steady load allocates nothing. A release
trims when a window has passed; when traffic stops inside a window, a timer trims at its end.

`copy_in_chunks` moves a tensor of any size between host and device through a small page-locked
bounce buffer, so staging a model's initial values or copying parameters out for a reader never
pins a full copy.
"""

from __future__ import annotations

import logging
import threading
import time
import weakref
from collections.abc import Iterable, Mapping

import torch

logger = logging.getLogger(__name__)

ALIGN = 256  # bytes: where each tensor's view starts in a flat buffer (DMA-friendly)
_PAGE = 4096
BOUNCE_BYTES = 32 << 20  # a bounce buffer for chunked copies: two halves of 16 MiB

_registered = 0  # bytes page-locked by cudaHostRegister through this module, live
_registered_lock = threading.Lock()


def registered_bytes() -> int:
    """Host bytes this module has page-locked with cudaHostRegister and not yet released."""
    return _registered


def _aligned(n: int, to: int) -> int:
    return (n + to - 1) // to * to


def _unregister(ptr: int, nbytes: int) -> None:
    global _registered
    try:
        err = int(torch.cuda.cudart().cudaHostUnregister(ptr))
        if err:
            logger.warning("cudaHostUnregister failed with cudaError %d", err)
    finally:
        with _registered_lock:
            _registered -= nbytes


def host_bytes(nbytes: int, pin: bool) -> torch.Tensor:
    """A flat uint8 host buffer of `nbytes`; with `pin`, page-locked for asynchronous copies.

    Pinned: page-aligned pages of an ordinary allocation registered with CUDA, unregistered when
    the returned tensor (the owner of the view) is garbage collected."""
    if not pin:
        return torch.empty(nbytes, dtype=torch.uint8)
    size = _aligned(max(nbytes, 1), _PAGE)
    raw = torch.empty(size + _PAGE, dtype=torch.uint8)
    start = (-raw.data_ptr()) % _PAGE
    buf = raw[start : start + size]
    try:
        err = int(torch.cuda.cudart().cudaHostRegister(buf.data_ptr(), size, 0))
    except Exception as exc:  # no cudart binding: torch's pinned allocator instead
        logger.warning("cudaHostRegister unavailable (%s); using pin_memory=True", exc)
        err = -1
    if err:
        if err > 0:
            logger.warning("cudaHostRegister failed (cudaError %d); using pin_memory=True", err)
        return torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    global _registered
    with _registered_lock:
        _registered += size
    out = buf[:nbytes]
    # Unregister once nothing can reach the pages through `out` (its views keep `out`'s storage
    # alive but not `out`; GradSet keeps `out` for as long as it hands out views).
    weakref.finalize(out, _unregister, buf.data_ptr(), size)
    return out


def layout(like: Mapping[str, torch.Tensor]) -> tuple[dict[str, int], int]:
    """Byte offset of each tensor in a flat buffer holding them all, and the buffer's size."""
    offsets, end = {}, 0
    for name, p in like.items():
        offsets[name] = end
        end = _aligned(end + p.numel() * p.element_size(), ALIGN)
    return offsets, end


def view_of(buffer: torch.Tensor, offset: int, like: torch.Tensor) -> torch.Tensor:
    """A tensor shaped like `like` over `buffer`'s bytes from `offset`."""
    nbytes = like.numel() * like.element_size()
    flat = buffer[offset : offset + nbytes].view(like.dtype)
    return flat.view(like.shape)


class GradSet:
    """One gradient buffer per parameter name: views into one flat host buffer."""

    def __init__(self, like: Mapping[str, torch.Tensor], pin: bool):
        self._like = like
        self._pin = pin
        offsets, total = layout(like)
        self._flat = host_bytes(total, pin)
        self.names = frozenset(offsets)
        self.buffers: dict[str, torch.Tensor] = {
            n: view_of(self._flat, o, like[n]) for n, o in offsets.items()
        }
        self._extra = 0  # bytes of buffers for parameters added after this set was laid out

    def take(self, names: Iterable[str]) -> list[torch.Tensor]:
        out = []
        for name in names:
            buf = self.buffers.get(name)
            if buf is None:  # a param group added since: a buffer of its own
                p = self._like[name]
                buf = torch.empty(p.shape, dtype=p.dtype, device="cpu", pin_memory=self._pin)
                self.buffers[name] = buf
                self._extra += buf.numel() * buf.element_size()
            out.append(buf)
        return out

    @property
    def nbytes(self) -> int:
        return self._flat.numel() + self._extra


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
        self._timer: threading.Timer | None = None
        self._closed = False

    def acquire(self) -> GradSet:
        with self._lock:
            self._in_use += 1
            self._window_peak = max(self._window_peak, self._in_use)
            # A set laid out before a param group was added lacks it: drop idle ones like that.
            stale = [gs for gs in self._free if len(gs.names) != len(self._params)]
            for gs in stale:
                self._free.remove(gs)
                self._all.remove(gs)
            if self._free:
                return self._free.pop()
        gs = GradSet(self._params, self._pin)  # allocated (and pinned) outside the lock
        with self._lock:
            self._all.append(gs)
        return gs

    def release(self, gs: GradSet) -> None:
        with self._lock:
            self._in_use -= 1
            if self._closed:  # the model is gone: nothing will take it again
                if gs in self._all:
                    self._all.remove(gs)
                return
            self._free.append(gs)
            now = time.monotonic()
            if now - self._window_start < self.trim_after_s:
                self._arm(self._window_start + self.trim_after_s - now)
                return
            self._end_window(now)

    def _end_window(self, now: float) -> None:
        """A window has passed: keep what it needed at most (+1), start the next one. Lock held."""
        self._trim(self._window_peak + 1)
        self._window_peak = self._in_use
        self._window_start = now
        self._arm(self.trim_after_s)  # more than the next window may need: look again then

    def _arm(self, delay: float) -> None:
        """Trim at the window's end even if no release comes then. Lock held."""
        if self._timer is not None or self._closed or len(self._all) <= self._in_use + 1:
            return
        timer = self._timer = threading.Timer(max(delay, 0.0) + 0.01, self._on_timer)
        timer.daemon = True
        timer.start()

    def _on_timer(self) -> None:
        with self._lock:
            self._timer = None
            now = time.monotonic()
            if now - self._window_start >= self.trim_after_s:
                self._end_window(now)
            else:
                self._arm(self._window_start + self.trim_after_s - now)

    def trim(self, keep: int = 1) -> None:
        """Drop idle sets until at most `keep` sets exist (sets in use are never dropped)."""
        with self._lock:
            self._trim(keep)

    def _trim(self, keep: int) -> None:
        while self._free and len(self._all) > keep:
            gs = self._free.pop(0)  # the longest idle: a recently used set may still be cached
            self._all.remove(gs)

    def close(self) -> None:
        """Drop every idle set and stop the trim timer (the model is going away)."""
        with self._lock:
            self._closed = True
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            self._trim(0)

    @property
    def sets(self) -> int:
        """GradSets allocated (in use or idle)."""
        with self._lock:
            return len(self._all)

    @property
    def nbytes(self) -> int:
        with self._lock:
            return sum(gs.nbytes for gs in self._all)


def _bytes(t: torch.Tensor) -> torch.Tensor:
    """A contiguous tensor's storage as a flat uint8 tensor (a view)."""
    return t.reshape(-1).view(torch.uint8)


def copy_in_chunks(
    src: torch.Tensor, dst: torch.Tensor, bounce: torch.Tensor, *, download: bool | None = None
) -> None:
    """dst.copy_(src) for contiguous tensors of one dtype and size, one of them on the host,
    through `bounce` (a flat uint8 host buffer, page-locked for asynchronous copies): its two halves
    take turns, so the host-side copy of one half overlaps the DMA of the other. Runs on the
    current stream and returns once `dst` holds every byte. `download` (device to host) is
    inferred from where `src` lives; both on the host (tests), it picks which side gets the
    asynchronous copy."""
    if src.dtype != dst.dtype or src.numel() != dst.numel():
        raise ValueError(
            f"copy_in_chunks: {src.dtype}[{src.numel()}] into {dst.dtype}[{dst.numel()}]"
        )
    s, d = _bytes(src.detach()), _bytes(dst.detach())
    half = bounce.numel() // 2
    if half < 1:
        raise ValueError("copy_in_chunks: the bounce buffer is empty")
    if download is None:
        download = src.device.type != "cpu"
    cuda = src.device.type == "cuda" or dst.device.type == "cuda"
    pending: dict[int, tuple[object, int, int]] = {}  # slot -> (event, start, n), oldest first

    def finish(slot: int) -> None:  # wait for the slot's DMA; a download then copies it out
        entry = pending.pop(slot, None)
        if entry is None:
            return
        event, start, n = entry
        if event is not None:
            event.synchronize()  # type: ignore[attr-defined]
        if download:
            d[start : start + n].copy_(bounce[slot * half : slot * half + n])

    for i, start in enumerate(range(0, s.numel(), half)):
        slot, n = i % 2, min(half, s.numel() - start)
        finish(slot)
        piece = bounce[slot * half : slot * half + n]
        if download:
            piece.copy_(s[start : start + n], non_blocking=cuda)
        else:
            piece.copy_(s[start : start + n])
            d[start : start + n].copy_(piece, non_blocking=cuda)
        event = None
        if cuda:
            event = torch.cuda.Event()
            event.record()
        pending[slot] = (event, start, n)
    for slot in list(pending):  # insertion order: the older slot first
        finish(slot)
