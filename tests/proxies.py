"""A loopback TCP proxy between a Client and a daemon that can hold replies back and cut every
connection: what a network failure after the server applied a push looks like to the client."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Callable, Iterator

from adamd.server import Daemon


class CuttingProxy:
    """Forwards loopback TCP to `upstream`; can hold replies back and cut every connection."""

    def __init__(self, upstream: str):
        host, port = upstream.rsplit(":", 1)
        self._upstream = (host, int(port))
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self._listener.getsockname()[1]}"
        self.hold_replies = threading.Event()
        self.upstream_bytes = 0  # client -> server bytes forwarded, all connections
        self.connections = 0
        self._socks: list[socket.socket] = []
        self._lock = threading.Lock()
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                down, _ = self._listener.accept()
            except OSError:
                return
            up = socket.create_connection(self._upstream)
            with self._lock:
                self._socks += [down, up]
                self.connections += 1
            threading.Thread(target=self._pump, args=(down, up, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(up, down, False), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, upstream: bool) -> None:
        try:
            while True:
                data = src.recv(1 << 16)
                if not data:
                    break
                if upstream:
                    with self._lock:
                        self.upstream_bytes += len(data)
                elif self.hold_replies.is_set():
                    continue  # swallowed: the reply never reaches the client
                dst.sendall(data)
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                dst.shutdown(socket.SHUT_RDWR)

    def cut(self) -> None:
        """Reset every open connection (new ones are accepted and forwarded as usual)."""
        with self._lock:
            socks, self._socks = self._socks, []
        for s in socks:
            with contextlib.suppress(OSError):
                s.setsockopt(
                    socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00"
                )
            # shutdown wakes the pump threads blocked in recv(); close alone would wait for them
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()
        self.hold_replies.clear()

    def close(self) -> None:
        self._listener.close()
        self.cut()


@contextlib.contextmanager
def proxy_to(daemon: Daemon) -> Iterator[CuttingProxy]:
    proxy = CuttingProxy(daemon.grpc_address)
    try:
        yield proxy
    finally:
        proxy.close()


def wait_until(cond: Callable[[], bool], timeout: float = 30) -> None:
    """Poll `cond` until it holds (a test's view of a server-side effect), at most `timeout` s."""
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.005)
