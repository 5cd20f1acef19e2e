"""Futures that resolve once a model reaches a version, so a pull that waits for the next step
holds no thread: the adapter awaits the future (asyncio.wrap_future) or blocks on it with a
timeout, and cancels it to stop waiting. The model wakes them after each step, under its lock.
"""

from __future__ import annotations

from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout


class VersionWaits:
    """Pending "version >= v" futures of one model. Every call holds the model's lock."""

    def __init__(self) -> None:
        self._waiting: list[tuple[int, Future[None]]] = []

    def add(self, target: int, current: int) -> Future[None]:
        """A future done once the version is `target` or later (at once if `current` is)."""
        done: Future[None] = Future()
        if current >= target:
            done.set_result(None)
            return done
        # Waiters that gave up (cancelled) are dropped here too, not only when their version
        # comes: a client polling for a far-off version would otherwise pile them up.
        self._waiting = [w for w in self._waiting if not w[1].done()]
        self._waiting.append((target, done))
        return done

    def wake(self, current: int) -> None:
        """Resolve every waiter whose version has come."""
        waiting = []
        for target, fut in self._waiting:
            if target <= current:
                if fut.set_running_or_notify_cancel():
                    fut.set_result(None)
            elif not fut.done():
                waiting.append((target, fut))
        self._waiting = waiting


def wait(reached: Future[None], timeout: float) -> bool:
    """Block until `reached` is done (True) or `timeout` seconds passed (False: it is cancelled)."""
    try:
        reached.result(timeout)
        return True
    except FutureTimeout:
        reached.cancel()
        return False
