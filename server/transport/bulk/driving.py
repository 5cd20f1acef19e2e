"""Running a bulk connection's I/O steps (adamd.protocol.bulk FrameSocket) without a thread
waiting on a socket: on a small pool of I/O threads while bytes move (the kernel copies straight
between the socket and tensor memory with the GIL released), on the event loop's watch while the
socket is not ready, under the per-frame deadlines and the pace floor.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from adamd.protocol.bulk import DATA_READ, READ, WRITE, FrameSocket, Step
from adamd.server.dataplane import DataPlane
from adamd.server.errors import DeadlineExceeded

T = TypeVar("T")

IO_THREADS = 16  # connections moving bytes at once; a connection waiting for bytes holds none
FRAME = "frame"  # frames: a frame ended, the next one's deadline starts now
# A frame's bytes, once its first --stream-idle-s are over, must average at least this (a peer
# that trickles a large tensor a byte at a time cannot hold its request's memory for days).
MIN_FRAME_BYTES_PER_S = 256 << 10


class FrameDriver:
    """The I/O threads of one BulkServer and the waits between them, on its event loop."""

    def __init__(self, plane: DataPlane):
        self.plane = plane
        self._io = ThreadPoolExecutor(IO_THREADS, thread_name_prefix="adamd-bulk")

    def close(self) -> None:
        """After every connection ended: the I/O threads go."""
        self._io.shutdown(wait=True)

    async def ready(self, sock: socket.socket, want: str, timeout: float) -> bool:
        """Wait, holding no thread, until the socket is ready to read (READ, DATA_READ) or write
        (WRITE); False when it was not within `timeout` seconds."""
        if want != WRITE and isinstance(sock, ssl.SSLSocket) and sock.pending():
            return True
        if timeout <= 0:
            return False
        loop = asyncio.get_running_loop()
        ready: asyncio.Future[None] = loop.create_future()

        def wake() -> None:
            if not ready.done():
                ready.set_result(None)

        fd = sock.fileno()
        if fd < 0:
            raise OSError("the bulk connection is closed")
        if want == WRITE:
            loop.add_writer(fd, wake)
        else:
            loop.add_reader(fd, wake)
        try:
            await asyncio.wait_for(ready, timeout)
            return True
        except asyncio.TimeoutError:
            return False
        finally:
            if want == WRITE:
                loop.remove_writer(fd)
            else:
                loop.remove_reader(fd)

    async def drive(
        self,
        sock: socket.socket,
        steps: Step[T],
        deadline: float | None,
        idle_s: float,
        on_loop: bool = False,
        conn: FrameSocket | None = None,
    ) -> T:
        """Run I/O steps (FrameSocket) to their end: on an I/O thread (or on the loop, for a
        handshake's few bytes) while bytes move, on the loop's watch while the socket is not
        ready. A frame's prefix and header (READ) must come by `deadline` (reset to `idle_s`
        ahead at each FRAME the steps yield); data bytes (DATA_READ) and writes (WRITE) may pause
        `idle_s` at most, and (with `conn`, whose byte counts tell) must average
        MIN_FRAME_BYTES_PER_S once a frame's first `idle_s` are over. Past any: DeadlineExceeded."""
        loop = asyncio.get_running_loop()
        began = loop.time()
        moved0 = 0 if conn is None else conn.bytes_in + conn.bytes_out
        while True:
            if on_loop:
                done, value, framed = advance(steps)
            else:
                done, value, framed = await self.io_call(sock, advance, steps)
            if done:
                return value  # type: ignore[return-value]
            now = loop.time()
            if framed:
                deadline, began = now + idle_s, now
                moved0 = 0 if conn is None else conn.bytes_in + conn.bytes_out
            if value == READ and deadline is not None:
                wait = deadline - now
            else:
                wait = idle_s
                if conn is not None:  # the pace: idle_s of grace, then the floor
                    moved = conn.bytes_in + conn.bytes_out - moved0
                    wait = min(wait, began + idle_s + moved / MIN_FRAME_BYTES_PER_S - now)
            if not await self.ready(sock, value, wait):
                steps.close()
                what = {READ: "a frame", DATA_READ: "a frame's data"}.get(value, "the reply")
                raise DeadlineExceeded(
                    f"{what} did not come through in time: the request was ended (server"
                    f" --stream-idle-s {idle_s:g}, then {MIN_FRAME_BYTES_PER_S >> 10} KiB/s)"
                )

    async def io_call(self, sock: socket.socket, fn: Callable[..., T], *args: Any) -> T:
        """Socket work on an I/O thread. Cancelled (the server cut the call), the connection is
        shut so the thread lets go at once, and its end is awaited: a thread never keeps writing
        into a buffer its request has given back."""
        work = asyncio.get_running_loop().run_in_executor(self._io, fn, *args)
        try:
            return await asyncio.shield(work)
        except asyncio.CancelledError:
            shutdown_socket(sock)
            with contextlib.suppress(Exception):
                await work
            raise

    def frames(self, conn: FrameSocket, steps: Step[T]) -> Awaitable[T]:
        """Steps of a request's frames, on the I/O threads, under the per-frame deadlines."""
        idle_s = self.plane.idle_s
        deadline = asyncio.get_running_loop().time() + idle_s
        return self.drive(conn.sock, steps, deadline, idle_s, conn=conn)


def advance(steps: Step[T]) -> tuple[bool, Any, bool]:
    """Run I/O steps until they wait or end: (ended, what they wait for or their result, whether
    a frame ended on the way)."""
    framed = False
    try:
        while (want := next(steps)) == FRAME:
            framed = True
        return False, want, framed
    except StopIteration as stop:
        return True, stop.value, framed


def shutdown_socket(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
