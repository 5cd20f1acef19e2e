"""The transfer-memory budget: host bytes that pulls and pushes in flight may hold at once.

Each transfer holds host memory for as long as it runs: a pull its host copies of the parameters
(on CUDA, or when a wire dtype converts them) and the frames grpc has not sent yet; a push the
staging buffer its chunks are written into, until its step has used it. Without a bound, N
concurrent clients hold N times that. With one, a transfer reserves its bytes before allocating
anything and gives them back when its call ends (also on error or cancel); a transfer that does not
fit waits, in arrival order, until earlier ones finish: back-pressure, whatever the number of
clients. A waiting pull has read nothing yet; a waiting push has not read its stream, so gRPC flow
control holds its sender.

* A single transfer larger than the whole budget could never run: refused up front
  (LimitExceeded, RESOURCE_EXHAUSTED) when the budget was set (`--max-transfer-bytes N`). The
  automatic budget (the default) grows to fit it instead: it bounds how many transfers run at
  once, and never refuses a model that fits the machine, as a server without a budget would not.
* A wait is bounded by the stream-idle deadline (`--stream-idle-s`) and by the call's own
  deadline; past it the call answers UNAVAILABLE, which clients retry with backoff.
* A sync round holds world_size staging buffers until its last rank arrives, so a sync model
  whose round (plus one pull) cannot fit is refused at create and at join (`check_round`); the
  automatic budget grows to hold it.

The budget lives on the gRPC event loop: reserve and release are called from that loop only.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os

from adamd.server.errors import LimitExceeded, Unavailable

logger = logging.getLogger(__name__)

AUTO_SHARE = 4  # auto: a quarter of the memory this process may use
MIN_AUTO = 1 << 30  # ... but at least 1 GiB


def machine_memory() -> int:
    """Bytes of memory this process may use: physical memory, or the cgroup's limit (a k8s
    container's `resources.limits.memory`) when that is lower."""
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            with open(path) as f:
                raw = f.read().strip()
        except OSError:
            continue
        if raw.isdigit():
            total = min(total, int(raw))
    return total


def auto_budget() -> int:
    return max(MIN_AUTO, machine_memory() // AUTO_SHARE)


class TransferBudget:
    """A byte budget granted in FIFO order. `capacity` None: no budget (every reserve succeeds
    at once, but reserved bytes and their peak are still counted). `grows`: the automatic
    budget, raised to fit any single need (a transfer, a sync round) instead of refusing it."""

    def __init__(self, capacity: int | None, grows: bool = False):
        self.capacity = capacity
        self.grows = grows
        self.reserved = 0  # bytes held by transfers now
        self.peak = 0  # most bytes held at once since start
        self.waits = 0  # transfers that had to wait for budget, since start
        self._waiters: collections.deque[tuple[int, asyncio.Future[None]]] = collections.deque()

    @property
    def waiting(self) -> int:
        """Transfers waiting for budget now."""
        return len(self._waiters)

    def check(self, what: str, nbytes: int) -> None:
        """Refuse a transfer that could never fit (the automatic budget grows to fit it)."""
        if self.capacity is not None and nbytes > self.capacity and self.grows:
            logger.info(
                "transfer budget grows from %d to %d bytes to fit %s", self.capacity, nbytes, what
            )
            self.capacity = nbytes
            self._wake()
        if self.capacity is not None and nbytes > self.capacity:
            raise LimitExceeded(
                f"{what} needs {nbytes} bytes of transfer memory; this server lets all transfers"
                f" in flight hold {self.capacity} at most (--max-transfer-bytes)"
            )

    async def reserve(self, what: str, nbytes: int, timeout: float) -> bool:
        """Hold `nbytes`, waiting (FIFO) up to `timeout` seconds for earlier transfers to end;
        True if it had to wait. The caller must `release(nbytes)` once this returns, whatever
        happens next."""
        self.check(what, nbytes)
        if not self._waiters and self._fits(nbytes):
            self._grant(nbytes)
            return False
        self.waits += 1
        granted: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = (nbytes, granted)
        self._waiters.append(entry)
        try:
            await asyncio.wait_for(asyncio.shield(granted), timeout)
        except BaseException as exc:
            if granted.done():  # granted as the wait ended: hand the bytes back
                self.release(nbytes)
            else:
                self._waiters.remove(entry)
                self._wake()  # a large waiter leaving may let smaller ones behind it start
            if isinstance(exc, asyncio.TimeoutError):
                raise Unavailable(
                    f"{what} waited {timeout:g}s for {nbytes} bytes of transfer memory"
                    f" ({self.reserved} of {self.capacity} held by other transfers;"
                    " --max-transfer-bytes): the server is busy, retry"
                ) from None
            raise
        return True

    def release(self, nbytes: int) -> None:
        self.reserved -= nbytes
        self._wake()

    def _fits(self, nbytes: int) -> bool:
        return self.capacity is None or self.reserved + nbytes <= self.capacity

    def _grant(self, nbytes: int) -> None:
        self.reserved += nbytes
        self.peak = max(self.peak, self.reserved)

    def _wake(self) -> None:
        """Grant waiters in order while the first one fits (never one past another: FIFO, so a
        large transfer is not starved by a stream of small ones)."""
        while self._waiters and self._fits(self._waiters[0][0]):
            nbytes, granted = self._waiters.popleft()
            if granted.done():  # cancelled meanwhile; its reserve() removes nothing then
                continue
            self._grant(nbytes)
            granted.set_result(None)
