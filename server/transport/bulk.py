"""The bulk-data channel's server side (adamd.protocol.bulk): pushes and pulls over plain sockets.

What a request does is the data plane's `push` and `pull` (server/dataplane.py), as over gRPC:
the same checks, transfer budget, exactly-once ledger, sync rounds and SIGTERM cut; only the
carrier differs. Connections are accepted on the gRPC loop, and one waiting for its next request holds no
thread (the loop watches its socket). A request's frames are read and written on a small pool of
I/O threads with blocking sockets, so the kernel copies straight between the socket and tensor
memory with the GIL released; a sync worker waiting for its round holds no thread either (its push
awaits the outcome on the loop, as over gRPC).

A connection starts with HELO and a ticket from `OpenBulk`, which is authorized like every gRPC
call; without a valid ticket it is closed. The ticket carries the caller it was issued to, and
each request on the connection is checked for that caller (Operations.check, server/auth) against
the grants in force then. The socket speaks TLS when gRPC does (same certificate,
same client-certificate rule).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import secrets
import socket
import ssl
import threading
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, TypeVar

from adamd.protocol import ProtocolError
from adamd.protocol.bulk import (
    DONE,
    END,
    FAIL,
    HEAD,
    HELO,
    MORE,
    PULL,
    PUSH,
    STEP,
    TICKET_BYTES,
    Closed,
    FrameSocket,
    Prefix,
    check_ticket,
)
from adamd.protocol.frames import TensorSink, spec_of
from adamd.server.auth import Caller
from adamd.server.core.pushes import PushMeta
from adamd.server.dataplane import DataPlane, PullPlan, Receive
from adamd.server.errors import DeadlineExceeded, InvalidArgument, ServerError, as_server_error
from adamd.server.transport import messages
from adamd.server.transport.messages import parse_request
from adamd.v1 import adamd_pb2 as pb

logger = logging.getLogger(__name__)
T = TypeVar("T")

TICKET_S = 30.0  # a ticket not used within this is void
MAX_TICKETS = 4096  # tickets outstanding at once (more: OpenBulk answers not accepted)
HANDSHAKE_S = 10.0  # TLS handshake and HELO in all, or the connection is shut
KEEPALIVE_S = 600.0  # a connection without a request this long is closed (clients reconnect)
IO_THREADS = 16  # frames being read or written at once; waits between frames hold none
HANDSHAKE_THREADS = 4  # so connections that stall in their handshake cannot hold the I/O threads
MAX_CONNECTIONS = 1024  # open at once; more are closed at accept (clients fall back to gRPC)
MAX_HANDSHAKES = 64  # connections not past HELO yet; more are closed at accept


class Tickets:
    """One-use tickets for new connections, each valid for TICKET_S seconds, each carrying the
    caller it was issued to."""

    def __init__(self) -> None:
        self._open: dict[bytes, tuple[float, Caller]] = {}
        self._lock = threading.Lock()

    def issue(self, caller: Caller) -> bytes | None:
        now = time.monotonic()
        with self._lock:
            for t in [t for t, (until, _) in self._open.items() if until < now]:
                del self._open[t]
            if len(self._open) >= MAX_TICKETS:
                return None
            ticket = secrets.token_bytes(TICKET_BYTES)
            self._open[ticket] = (now + TICKET_S, caller)
            return ticket

    def redeem(self, ticket: bytes) -> Caller | None:
        """The caller the ticket was issued to; None: unknown or expired."""
        with self._lock:
            until, caller = self._open.pop(ticket, (0.0, None))
        return caller if until >= time.monotonic() else None


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
        self.on_call = on_call
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
        sock.listen(128)
        sock.setblocking(False)
        self._listener = sock
        self.port: int = sock.getsockname()[1]
        self._io = ThreadPoolExecutor(IO_THREADS, thread_name_prefix="adamd-bulk")
        self._handshakes = ThreadPoolExecutor(HANDSHAKE_THREADS, thread_name_prefix="adamd-bulk-hs")
        self._loop: asyncio.AbstractEventLoop | None = None
        self._accepting: Future[None] | None = None
        self._sockets: set[socket.socket] = set()
        self._connections: set[asyncio.Task[None]] = set()
        self._busy: dict[asyncio.Task[Any], socket.socket] = {}  # requests in flight
        self._callers: dict[FrameSocket, Caller] = {}  # whose ticket each connection redeemed
        self._handshaking = 0
        self._closing = False

    # --- gRPC's side: tickets -------------------------------------------------------------------

    def open(self, caller: Caller) -> pb.OpenBulkReply:
        if self._closing:
            return pb.OpenBulkReply(accepted=False, reason="the server is stopping")
        ticket = self.tickets.issue(caller)
        if ticket is None:
            return pb.OpenBulkReply(accepted=False, reason="too many bulk connections opening")
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
        self._io.shutdown(wait=True)
        self._handshakes.shutdown(wait=True)

    async def _stop(self, grace: float) -> None:
        if self._accepting is not None:
            self._accepting.cancel()
        self._listener.close()
        busy = set(self._busy.values())
        for sock in list(self._sockets):  # idle ones end now; busy ones end after their request
            if sock not in busy:
                _shutdown(sock)
        if self._busy:
            _, pending = await asyncio.wait(set(self._busy), timeout=max(grace - 1.0, 0.1))
            if pending:
                self.plane.cut()
                await asyncio.wait(pending, timeout=1.0)
        for sock in list(self._sockets):
            _shutdown(sock)
        if self._connections:  # their sockets are shut: they end now, before the pools do
            await asyncio.wait(set(self._connections), timeout=2.0)

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
            if len(self._connections) >= MAX_CONNECTIONS or self._handshaking >= MAX_HANDSHAKES:
                raw.close()  # the client's HELO goes unanswered: it falls back to gRPC
                continue
            task = loop.create_task(self._serve(raw))
            self._connections.add(task)
            task.add_done_callback(self._connections.discard)

    async def _serve(self, raw: socket.socket) -> None:
        self._sockets.add(raw)
        conn: FrameSocket | None = None
        try:
            conn = ready = await self._handshake(raw)
            self._sockets.discard(raw)
            self._sockets.add(ready.sock)
            while not self._closing and await self._readable(ready, KEEPALIVE_S):
                if self._closing:
                    break
                task = asyncio.current_task()
                assert task is not None
                self._busy[task] = ready.sock
                try:
                    keep = await self._request(ready)
                finally:
                    del self._busy[task]
                if not keep:
                    break
        except (OSError, ProtocolError, ssl.SSLError) as exc:
            logger.debug("bulk connection ended: %s", exc)
        except Exception:
            logger.exception("bulk connection failed")
        finally:
            self._sockets.discard(raw)
            if conn is not None:
                self._callers.pop(conn, None)
                self._sockets.discard(conn.sock)
                conn.close()  # its socket and its conversion thread
            with contextlib.suppress(OSError):
                raw.close()

    async def _handshake(self, raw: socket.socket) -> FrameSocket:
        """TLS (when on) and HELO with a valid ticket, answered HELO, within HANDSHAKE_S in all:
        a watchdog on the loop shuts the socket at the deadline, so a peer that trickles bytes
        cannot hold a handshake thread past it."""
        loop = asyncio.get_running_loop()
        guard = raw.dup()  # the same socket, for the watchdog (TLS takes `raw`'s descriptor)
        watchdog = loop.call_later(HANDSHAKE_S, _shutdown, guard)
        self._sockets.add(guard)  # and for stop()
        self._handshaking += 1
        try:
            return await loop.run_in_executor(self._handshakes, self._greet, raw)
        finally:
            self._handshaking -= 1
            watchdog.cancel()
            self._sockets.discard(guard)
            guard.close()

    def _greet(self, raw: socket.socket) -> FrameSocket:
        """Handshake thread: see _handshake."""
        raw.setblocking(True)
        raw.settimeout(HANDSHAKE_S)
        sock = raw
        if self.tls is not None:
            sock = self.tls.wrap_socket(raw, server_side=True, do_handshake_on_connect=False)
            try:
                sock.do_handshake()
            except BaseException:
                sock.close()
                raise
        conn = FrameSocket(sock, HANDSHAKE_S)
        try:
            caller = self.tickets.redeem(check_ticket(conn.recv(max_header=TICKET_BYTES)))
            if caller is None:
                raise ProtocolError("a bulk connection with an unknown or expired ticket")
            self._callers[conn] = caller
            conn.send(HELO)  # the client knows now that this connection serves it
            sock.settimeout(self.plane.idle_s)
        except BaseException:
            self._callers.pop(conn, None)
            conn.close()
            raise
        return conn

    async def _readable(self, conn: FrameSocket, timeout: float) -> bool:
        """Wait, holding no thread, until the connection has bytes to read; False when it
        stayed quiet for `timeout` seconds."""
        sock = conn.sock
        if isinstance(sock, ssl.SSLSocket) and sock.pending():
            return True
        loop = asyncio.get_running_loop()
        ready: asyncio.Future[None] = loop.create_future()

        def wake() -> None:
            if not ready.done():
                ready.set_result(None)

        loop.add_reader(sock.fileno(), wake)
        try:
            await asyncio.wait_for(ready, timeout)
            return True
        except asyncio.TimeoutError:
            return False
        finally:
            loop.remove_reader(sock.fileno())

    # --- requests -------------------------------------------------------------------------------

    async def _io_call(self, conn: FrameSocket, fn: Callable[..., T], *args: Any) -> T:
        """Blocking socket work on an I/O thread. Cancelled (the server cut the call), the
        connection is shut so the thread lets go at once, and its end is awaited: a thread never
        keeps writing into a buffer its request has given back."""
        work = asyncio.get_running_loop().run_in_executor(self._io, fn, *args)
        try:
            return await asyncio.shield(work)
        except asyncio.CancelledError:
            _shutdown(conn.sock)
            with contextlib.suppress(Exception):
                await work
            raise

    async def _request(self, conn: FrameSocket) -> bool:
        """Serve one request; False when the connection must end (after a FAIL, or broken)."""
        t0, in0, out0 = time.perf_counter(), conn.bytes_in, conn.bytes_out
        method, outcome = "Bulk", "OK"
        try:
            try:
                frame = await self._io_call(conn, conn.recv, self.plane.limits.max_message_bytes)
            except Closed:
                if conn.bytes_in == in0:
                    return False  # the client closed an idle connection: no call at all
                raise
            method = {PUSH: "PushGrad", PULL: "PullParams", STEP: "Step"}.get(frame.kind, method)
            if frame.kind == PUSH:
                await self._push(conn, frame)
            elif frame.kind == STEP:
                await self._step(conn, frame)
            elif frame.kind == PULL:
                await self._pull(conn, frame)
            else:
                raise InvalidArgument(
                    f"a bulk request starts with PUSH, PULL or STEP, not {frame.kind!r}"
                )
            return True
        except (OSError, ssl.SSLError):
            outcome = "broken"
            return False
        except Exception as exc:
            error = as_server_error(exc, "bulk request")
            outcome = error.kind
            with contextlib.suppress(OSError, ssl.SSLError):
                await self._io_call(conn, self._fail, conn, error)
            return False
        finally:
            on_call = self.on_call
            if on_call is not None and conn.bytes_in != in0:
                n_in, n_out = conn.bytes_in - in0, conn.bytes_out - out0
                on_call(method, outcome, time.perf_counter() - t0, n_in, n_out)

    def _fail(self, conn: FrameSocket, exc: ServerError) -> None:
        """I/O thread: answer FAIL, then drop what the client still sends of its request until it
        closes the connection (or goes quiet, or passes the stream limit)."""
        error = pb.BulkError(code=exc.code.value[0], kind=exc.kind, message=str(exc)[:8000])
        conn.send(FAIL, error.SerializeToString())
        left = self.plane.limits.stream_bytes
        scratch = bytearray(1 << 16)
        while left > 0:
            n = conn.sock.recv_into(scratch)
            if not n:
                return
            left -= n

    def _receiver(self, conn: FrameSocket, first: Prefix) -> Receive:
        """A push's `receive` (DataPlane.push): its frames into the sink, an I/O call
        reading for as long as bytes keep coming; when the client pauses (a push streamed during
        backward waits for backward) the loop waits for more, holding no thread, up to
        --stream-idle-s."""
        limits, idle_s = self.plane.limits, self.plane.idle_s

        async def receive(sink: TensorSink | None) -> PushMeta | None:
            reader = conn.request(first, sink, limits.stream_bytes)
            try:
                out = await self._io_call(conn, reader.next_ready, limits.max_message_bytes)
                while out is MORE:
                    if not await self._readable(conn, idle_s):
                        raise DeadlineExceeded(
                            f"no frame for {idle_s:g}s: the request was ended"
                            " (server --stream-idle-s)"
                        )
                    out = await self._io_call(conn, reader.next_ready, limits.max_message_bytes)
                return messages.closing_meta(out)  # type: ignore[arg-type]
            except BaseException as exc:
                reader.settle()  # no conversion writes into the sink after this returns
                if isinstance(exc, ProtocolError):
                    raise InvalidArgument(str(exc)) from exc
                raise

        return receive

    async def _push(self, conn: FrameSocket, first: Prefix) -> None:
        header = parse_request(pb.PushHeader, first.header)
        if first.nbytes:
            raise InvalidArgument("a PUSH frame carries no data")
        self.plane.ops.check(self._callers[conn], "bulk PUSH", header.model)
        reply = await self._push_of(header, self._receiver(conn, first))
        await self._io_call(conn, conn.send, DONE, reply.SerializeToString())

    def _push_of(
        self,
        header: pb.PushHeader,
        receive: Receive,
        on_stepped: Callable[[list[str]], None] | None = None,
    ) -> Awaitable[pb.PushReply]:
        async def push() -> pb.PushReply:
            result = await self.plane.push(
                header.model,
                messages.push_meta_from_pb(header),
                messages.specs_from_pb(header.grads),
                receive,
                session=header.session,
                on_stepped=on_stepped,
            )
            return messages.push_reply(result)

        return push()

    async def _step(self, conn: FrameSocket, first: Prefix) -> None:
        """A push, then the parameters in the same exchange. On a CPU model each bucket of
        parameters goes out as soon as the step has updated it (_StepSender)."""
        step = parse_request(pb.BulkStep, first.header)
        if first.nbytes:
            raise InvalidArgument("a STEP frame carries no data")
        self.plane.ops.check(self._callers[conn], "bulk STEP", step.push.model)
        header, request = step.push, step.pull
        if request.HasField("if_newer_than") or request.HasField("wait_for_version"):
            raise InvalidArgument("a STEP's pull takes no if_newer_than or wait_for_version")
        request.model = header.model
        ask = messages.pull_ask_from_pb(request)
        receive = self._receiver(conn, first)
        model, _, _ = self.plane.check_pull(ask)  # refused before the push, if at all
        if model.graphed is None and model.device.type == "cpu":
            # The tensors are the live parameters, sent from their own memory (conversions go
            # through the connection's two buffers): no transfer memory to reserve for them.
            async with self.plane.pull(ask, reserve=False) as plan:
                sender = _StepSender(conn, plan, self._io)
                try:
                    reply = await self._push_of(header, receive, sender.notify)
                finally:
                    await sender.stop()
                await self._io_call(conn, sender.finish, reply)
            return
        reply = await self._push_of(header, receive)
        async with self.plane.pull(ask) as plan:
            await self._io_call(conn, _send_pull, conn, plan, reply)

    async def _pull(self, conn: FrameSocket, first: Prefix) -> None:
        request = parse_request(pb.PullRequest, first.header)
        if first.nbytes:
            raise InvalidArgument("a PULL frame carries no data")
        self.plane.ops.check(self._callers[conn], "bulk PULL", request.model)
        async with self.plane.pull(messages.pull_ask_from_pb(request)) as plan:
            await self._io_call(conn, _send_pull, conn, plan)


def _send_pull(conn: FrameSocket, plan: PullPlan, reply: pb.PushReply | None = None) -> None:
    """I/O thread: HEAD, the parameters, END saying whether they are one version (and, for a
    STEP, carrying its push's reply)."""
    end = reply.SerializeToString() if reply is not None else b""
    if plan.tensors is None:
        header = pb.PullHeader(version=plan.version, not_modified=True)
        conn.send(HEAD, header.SerializeToString())
        conn.send(END, end, 1)
        return
    conn.send(HEAD, _pull_header(plan, plan.version))
    for index, (t, wire) in enumerate(zip(plan.tensors, plan.wires)):
        conn.send_tensor(index, t, wire, plan.chunk)
    conn.send(END, end, int(plan.consistent()))


def _pull_header(plan: PullPlan, version: int) -> bytes:
    assert plan.tensors is not None
    specs = [spec_of(n, t, w) for n, t, w in zip(plan.names, plan.tensors, plan.wires)]
    return pb.PullHeader(version=version, tensors=specs).SerializeToString()


class _StepSender:
    """A STEP's parameters, sent a bucket at a time as the step updates them.

    `notify` is the push's PushTicket.on_stepped: called mid-step under the model lock, it only
    queues the bucket (and, the first time, starts draining the queue on an I/O thread). After
    the push, `finish` sends what the step did not touch and END. When no step of this push ran
    (a duplicate, found_inf, a round stepped by another rank's thread), nothing was queued and
    `finish` sends everything as a pull would, read then."""

    def __init__(self, conn: FrameSocket, plan: PullPlan, io: ThreadPoolExecutor):
        self.conn, self.plan, self.io = conn, plan, io
        self.index = {n: i for i, n in enumerate(plan.names)}
        self.queue: queue.SimpleQueue[int | list[str] | None] = queue.SimpleQueue()
        self.drain: Future[None] | None = None
        self.sent: set[str] = set()
        self.seq_after = 0
        self._lock = threading.Lock()
        self._stopped = False  # the request is over: a late step (a round closed after a
        # cut) must not start sending

    def notify(self, names: list[str]) -> None:
        model = self.plan.model
        with self._lock:
            if self._stopped:
                return
            try:
                if self.drain is None:
                    self.queue.put(model.version + 1)  # the version this step makes: HEAD
                    self.drain = self.io.submit(self._drain)
            except RuntimeError:  # the I/O pool is shut (the server is stopping): send later
                self._stopped = True
                return
            self.seq_after = model.write_seq + 1  # the seqlock once this step's write ends
            self.queue.put([n for n in names if n in self.index])

    def _drain(self) -> None:
        while (item := self.queue.get()) is not None:
            if isinstance(item, int):
                self.conn.send(HEAD, _pull_header(self.plan, item))
            else:
                for name in item:
                    self._send(name)

    def _send(self, name: str) -> None:
        assert self.plan.tensors is not None
        i = self.index[name]
        self.conn.send_tensor(i, self.plan.tensors[i], self.plan.wires[i], self.plan.chunk)
        self.sent.add(name)

    async def stop(self) -> None:
        """No more buckets; wait until every queued one is sent (holding no thread)."""
        with self._lock:
            self._stopped = True
            drain = self.drain
        if drain is not None:
            self.queue.put(None)
            await asyncio.wrap_future(drain)

    def finish(self, reply: pb.PushReply) -> None:
        """I/O thread, after the push and stop(): the rest, and END."""
        model = self.plan.model
        if self.drain is None:
            seq, version = model.read_begin()
            self.conn.send(HEAD, _pull_header(self.plan, version))
        else:
            seq = self.seq_after
        for name in self.plan.names:
            if name not in self.sent:
                self._send(name)
        self.conn.send(END, reply.SerializeToString(), int(model.read_consistent(seq)))


def _shutdown(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
