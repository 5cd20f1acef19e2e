"""The bulk channel's listener and its connections: accept (MAX_CONNECTIONS, MAX_HANDSHAKES), the
handshake on the event loop (TLS when on, HELO with a ticket from `OpenBulk`, within HANDSHAKE_S),
then one request at a time (requests.py) until the connection idles KEEPALIVE_S, fails or the
server stops (`stop`: requests in flight get the grace period, then the data plane's cut).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import socket
import ssl
from collections.abc import Callable, Generator
from typing import Any

from adamd.protocol import ProtocolError
from adamd.protocol.bulk import HELO, READ, TICKET_BYTES, WRITE, FrameSocket, Prefix, check_ticket
from adamd.server.auth import Caller
from adamd.server.dataplane import DataPlane
from adamd.server.errors import DeadlineExceeded
from adamd.server.transport.bulk.driving import FrameDriver, shutdown_socket
from adamd.server.transport.bulk.requests import BulkRequests
from adamd.server.transport.bulk.tickets import Tickets
from adamd.v1 import adamd_pb2 as pb

logger = logging.getLogger(__name__)

HANDSHAKE_S = 10.0  # TLS handshake and HELO in all, or the connection is shut
KEEPALIVE_S = 600.0  # a connection without a request this long is closed (clients reconnect)
MAX_CONNECTIONS = 1024  # open at once; more are closed at accept (clients fall back to gRPC)
MAX_HANDSHAKES = 256  # connections not past HELO yet, counted at accept; one more shuts the oldest


class BulkServer:
    def __init__(
        self,
        plane: DataPlane,
        host: str,
        port: int,
        tls: ssl.SSLContext | None = None,
        on_call: Callable[[str, str, float, int, int], None] | None = None,
    ):
        """Binds at once (port 0 picks a free one); serves from `start(loop)`. `on_call`
        records each request (method, outcome, seconds, bytes in, bytes out)."""
        self.plane = plane
        self.tls = tls
        self.tickets = Tickets()
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            sock.close()
            raise
        sock.listen(1024)
        sock.setblocking(False)
        self._listener = sock
        self.port: int = sock.getsockname()[1]
        self.driver = FrameDriver(plane)  # the I/O threads and the waits (driving.py)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._accepting: Any = None
        self._sockets: dict[asyncio.Task[None], socket.socket] = {}  # each connection's socket
        self._handshaking: collections.OrderedDict[asyncio.Task[None], None] = (
            collections.OrderedDict()
        )  # connections not past HELO, oldest first
        self._busy: dict[asyncio.Task[Any], socket.socket] = {}  # requests in flight
        self._callers: dict[FrameSocket, Caller] = {}  # whose ticket each connection redeemed
        self.requests = BulkRequests(plane, self.driver, self._callers, on_call)  # requests.py
        self.shed_handshakes = 0  # handshakes shut because MAX_HANDSHAKES newer ones came
        self._closing = False

    # --- gRPC's side: tickets -------------------------------------------------------------------

    def open(self, caller: Caller) -> pb.OpenBulkReply:
        if self._closing:
            return pb.OpenBulkReply(accepted=False, reason="the server is stopping")
        ticket = self.tickets.issue(caller)
        return pb.OpenBulkReply(accepted=True, port=self.port, ticket=ticket)

    # --- life -----------------------------------------------------------------------------------

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._accepting = asyncio.run_coroutine_threadsafe(self._accept(), loop)

    def stop(self, grace: float) -> None:
        """Take no new connection or request; let requests in flight finish for up to `grace`
        seconds (then they are cut: pushes answer UNAVAILABLE, retried by clients), close all."""
        if self._loop is None or self._closing:
            self._closing = True
            self._listener.close()
            return
        self._closing = True
        asyncio.run_coroutine_threadsafe(self._stop(grace), self._loop).result()
        self.driver.close()

    async def _stop(self, grace: float) -> None:
        if self._accepting is not None:
            self._accepting.cancel()
        self._listener.close()
        busy = set(self._busy.values())
        for sock in list(self._sockets.values()):  # idle ones end now; busy ones after their
            if sock not in busy:  # request
                shutdown_socket(sock)
        if self._busy:
            _, pending = await asyncio.wait(set(self._busy), timeout=max(grace - 1.0, 0.1))
            if pending:
                self.plane.cut()
                await asyncio.wait(pending, timeout=1.0)
        for sock in list(self._sockets.values()):
            shutdown_socket(sock)
        if self._sockets:  # their sockets are shut: they end now, before the pool does
            await asyncio.wait(set(self._sockets), timeout=2.0)

    @property
    def connections(self) -> int:
        return len(self._sockets)

    @property
    def handshakes(self) -> int:
        return len(self._handshaking)

    # --- connections ----------------------------------------------------------------------------

    async def _accept(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                raw, _ = await loop.sock_accept(self._listener)
            except asyncio.CancelledError:
                raise
            except OSError as exc:
                if self._closing:
                    return
                logger.warning("bulk accept failed: %s", exc)
                await asyncio.sleep(0.1)
                continue
            if self._closing:
                raw.close()
                return
            if len(self._sockets) >= MAX_CONNECTIONS:
                raw.close()  # the client's HELO goes unanswered: it falls back to gRPC
                continue
            raw.setblocking(False)
            task = loop.create_task(self._serve(raw))
            self._sockets[task] = raw
            self._handshaking[task] = None
            if len(self._handshaking) > MAX_HANDSHAKES:
                oldest, _ = self._handshaking.popitem(last=False)
                self.shed_handshakes += 1
                shutdown_socket(self._sockets[oldest])  # it ends at its next read: no HELO here

    async def _serve(self, raw: socket.socket) -> None:
        task = asyncio.current_task()
        assert task is not None
        conn: FrameSocket | None = None
        try:
            try:
                conn = await self._handshake(task, raw)
            finally:
                self._handshaking.pop(task, None)
            while not self._closing and await self.driver.ready(conn.sock, READ, KEEPALIVE_S):
                if self._closing:
                    break
                self._busy[task] = conn.sock
                try:
                    keep = await self.requests.serve(conn)
                finally:
                    del self._busy[task]
                if not keep:
                    break
        except (OSError, ProtocolError, ssl.SSLError, DeadlineExceeded) as exc:
            logger.debug("bulk connection ended: %s", exc)
        except Exception:
            logger.exception("bulk connection failed")
        finally:
            sock = self._sockets.pop(task, raw)
            if conn is not None:
                self._callers.pop(conn, None)
                conn.close()  # its socket and its conversion thread
            with contextlib.suppress(OSError):
                sock.close()
            with contextlib.suppress(OSError):
                raw.close()

    async def _handshake(self, task: asyncio.Task[None], raw: socket.socket) -> FrameSocket:
        """TLS (when on) and HELO with a valid ticket, answered HELO, within HANDSHAKE_S in all,
        on the loop (a few hundred bytes; each read takes what has arrived)."""
        deadline = asyncio.get_running_loop().time() + HANDSHAKE_S
        sock: socket.socket = raw
        if self.tls is not None:
            sock = self.tls.wrap_socket(raw, server_side=True, do_handshake_on_connect=False)
            self._sockets[task] = sock  # `raw` gave it its descriptor
            await self.driver.drive(sock, _tls_handshake(sock), deadline, HANDSHAKE_S, on_loop=True)
        conn = FrameSocket(sock, 0)
        try:
            first: Prefix = await self.driver.drive(
                sock, conn.recv_steps(TICKET_BYTES), deadline, HANDSHAKE_S, on_loop=True
            )
            caller = self.tickets.redeem(check_ticket(first))
            if caller is None:
                raise ProtocolError("a bulk connection with an unknown or expired ticket")
            self._callers[conn] = caller
            # the client knows now that this connection serves it
            await self.driver.drive(
                sock, conn.send_steps(HELO), deadline, HANDSHAKE_S, on_loop=True
            )
        except BaseException:
            self._callers.pop(conn, None)
            conn.close()
            raise
        return conn


def _tls_handshake(sock: ssl.SSLSocket) -> Generator[str, None, None]:
    while True:
        try:
            sock.do_handshake()
            return
        except ssl.SSLWantReadError:
            yield READ
        except ssl.SSLWantWriteError:
            yield WRITE
