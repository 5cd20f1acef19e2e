"""What CUDA-graph captures need from the rest of the process: per-stream locks and the
process-wide switch that turns graphs off after a broken capture (cuda_step.py uses both).

While a capture is open on a stream, nothing else may be issued to that stream (it would be
captured), so device work takes the stream's lock in shared mode and a capture in exclusive mode.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Iterator
from typing import Any

logger = logging.getLogger(__name__)


class SharedExclusive:
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


# Per CUDA stream (by handle): shared while issuing work to it, exclusive while capturing on it.
_STREAM_LOCKS: dict[int, SharedExclusive] = {}
_STREAM_LOCKS_GUARD = threading.Lock()


def stream_lock(stream: Any) -> SharedExclusive:
    key = int(stream.cuda_stream)
    with _STREAM_LOCKS_GUARD:
        lock = _STREAM_LOCKS.get(key)
        if lock is None:
            lock = _STREAM_LOCKS[key] = SharedExclusive()
        return lock


_PROCESS_DISABLED: list[str] = []  # why graphs are off in this process (a broken capture)


def graphs_disabled() -> str | None:
    """Why CUDA graphs are off for the whole process, or None while they are on."""
    return _PROCESS_DISABLED[0] if _PROCESS_DISABLED else None


def disable_graphs(reason: str) -> None:
    if not _PROCESS_DISABLED:
        _PROCESS_DISABLED.append(reason)
        logger.error("CUDA graphs turned off for this process: %s", reason)


class CaptureBroken(RuntimeError):
    """capture_begin or capture_end failed: torch's allocator may still count the capture."""
