"""The bulk-data channel's server side (adamd.protocol.bulk): pushes and pulls over plain sockets.

What a request does is the data plane's `push` and `pull` (server/dataplane.py), as over gRPC:
the same checks, transfer budget, exactly-once ledger, sync rounds and SIGTERM cut; only the
carrier differs.

No thread waits on a socket. Every connection's socket is non-blocking and watched by the gRPC
loop: the handshake (TLS, HELO and its ticket) runs on the loop itself, a byte at a time if the
peer sends them so; a request's frames are read and written by FrameSocket's steps on a small
pool of I/O threads that only move the bytes already there (the kernel copies straight between
the socket and tensor memory with the GIL released) and hand the connection back to the loop
when it has to wait. A peer that goes quiet, mid-handshake, mid-frame, after a FAIL or while not
reading a reply, costs a file descriptor and a timer. Deadlines: the handshake within
HANDSHAKE_S; each frame's prefix and header within --stream-idle-s of its start; data bytes,
replies and the pause between a request's frames no quieter than --stream-idle-s. Handshakes are
counted when accepted: past MAX_HANDSHAKES the oldest is shut. A sync worker waiting for its round
holds no thread either (its push awaits the outcome on the loop, as over gRPC).

A connection starts with HELO and a ticket from `OpenBulk`, which is authorized like every gRPC
call; without a valid ticket it is closed. The ticket carries the caller it was issued to, and
each request on the connection is checked for that caller (Operations.check, server/auth) against
the grants in force then. The socket speaks TLS when gRPC does (same certificate,
same client-certificate rule).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import secrets
import socket
import ssl
import threading
import time
from collections.abc import Awaitable, Callable, Generator
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from adamd.protocol import ProtocolError
from adamd.protocol.bulk import (
    DATA_READ,
    DONE,
    END,
    FAIL,
    HEAD,
    HELO,
    MORE,
    PULL,
    PUSH,
    READ,
    STEP,
    TICKET_BYTES,
    WRITE,
    Closed,
    FrameSocket,
    Prefix,
    RequestReader,
    Step,
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
MAX_TICKETS = 4096  # tickets outstanding at once (one more voids the oldest)
HANDSHAKE_S = 10.0  # TLS handshake and HELO in all, or the connection is shut
KEEPALIVE_S = 600.0  # a connection without a request this long is closed (clients reconnect)
IO_THREADS = 16  # connections moving bytes at once; a connection waiting for bytes holds none
MAX_CONNECTIONS = 1024  # open at once; more are closed at accept (clients fall back to gRPC)
MAX_HANDSHAKES = 256  # connections not past HELO yet, counted at accept; one more shuts the oldest
FAIL_LINGER_S = 1.0  # after a FAIL, what the client still sends is dropped while it keeps coming
# (no pause longer than this), so its send ends and it reads the FAIL; then the connection closes
FRAME = "frame"  # _frames: a frame ended, the next one's deadline starts now
# A frame's bytes, once its first --stream-idle-s are over, must average at least this (a peer
# that trickles a large tensor a byte at a time cannot hold its request's memory for days).
MIN_FRAME_BYTES_PER_S = 256 << 10


class Tickets:
    """One-use tickets for new connections, each valid for TICKET_S seconds, each carrying the
    caller it was issued to. At most MAX_TICKETS are outstanding: a new one voids the oldest, so
    a caller asking for tickets it never uses cannot lock others out (their tickets are used
    within a round trip)."""

    def __init__(self) -> None:
        self._open: collections.OrderedDict[bytes, tuple[float, Caller]] = collections.OrderedDict()
        self._lock = threading.Lock()

    def issue(self, caller: Caller) -> bytes:
        now = time.monotonic()
        with self._lock:
            while self._open:  # oldest first: expired ones, then the oldest past the cap
                oldest, (until, _) = next(iter(self._open.items()))
                if until >= now and len(self._open) < MAX_TICKETS:
                    break
                del self._open[oldest]
            ticket = secrets.token_bytes(TICKET_BYTES)
            self._open[ticket] = (now + TICKET_S, caller)
            return ticket

    def redeem(self, ticket: bytes) -> Caller | None:
        """The caller the ticket was issued to; None: unknown, expired or voided."""
        with self._lock:
            until, caller = self._open.pop(ticket, (0.0, None))
        return caller if until >= time.monotonic() else None

    def __len__(self) -> int:
        return len(self._open)


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
        sock.listen(1024)
        sock.setblocking(False)
        self._listener = sock
        self.port: int = sock.getsockname()[1]
        self._io = ThreadPoolExecutor(IO_THREADS, thread_name_prefix="adamd-bulk")
        self._loop: asyncio.AbstractEventLoop | None = None
        self._accepting: Any = None
        self._sockets: dict[asyncio.Task[None], socket.socket] = {}  # each connection's socket
        self._handshaking: collections.OrderedDict[asyncio.Task[None], None] = (
            collections.OrderedDict()
        )  # connections not past HELO, oldest first
        self._busy: dict[asyncio.Task[Any], socket.socket] = {}  # requests in flight
        self._callers: dict[FrameSocket, Caller] = {}  # whose ticket each connection redeemed
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
        self._io.shutdown(wait=True)

    async def _stop(self, grace: float) -> None:
        if self._accepting is not None:
            self._accepting.cancel()
        self._listener.close()
        busy = set(self._busy.values())
        for sock in list(self._sockets.values()):  # idle ones end now; busy ones after their
            if sock not in busy:  # request
                _shutdown(sock)
        if self._busy:
            _, pending = await asyncio.wait(set(self._busy), timeout=max(grace - 1.0, 0.1))
            if pending:
                self.plane.cut()
                await asyncio.wait(pending, timeout=1.0)
        for sock in list(self._sockets.values()):
            _shutdown(sock)
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
                _shutdown(self._sockets[oldest])  # it ends at its next read: no HELO here

    async def _serve(self, raw: socket.socket) -> None:
        task = asyncio.current_task()
        assert task is not None
        conn: FrameSocket | None = None
        try:
            try:
                conn = await self._handshake(task, raw)
            finally:
                self._handshaking.pop(task, None)
            while not self._closing and await self._ready(conn.sock, READ, KEEPALIVE_S):
                if self._closing:
                    break
                self._busy[task] = conn.sock
                try:
                    keep = await self._request(conn)
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
            await self._drive(sock, _tls_handshake(sock), deadline, HANDSHAKE_S, on_loop=True)
        conn = FrameSocket(sock, 0)
        try:
            first: Prefix = await self._drive(
                sock, conn.recv_steps(TICKET_BYTES), deadline, HANDSHAKE_S, on_loop=True
            )
            caller = self.tickets.redeem(check_ticket(first))
            if caller is None:
                raise ProtocolError("a bulk connection with an unknown or expired ticket")
            self._callers[conn] = caller
            # the client knows now that this connection serves it
            await self._drive(sock, conn.send_steps(HELO), deadline, HANDSHAKE_S, on_loop=True)
        except BaseException:
            self._callers.pop(conn, None)
            conn.close()
            raise
        return conn

    async def _ready(self, sock: socket.socket, want: str, timeout: float) -> bool:
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

    async def _drive(
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
                done, value, framed = _advance(steps)
            else:
                done, value, framed = await self._io_call(sock, _advance, steps)
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
            if not await self._ready(sock, value, wait):
                steps.close()
                what = {READ: "a frame", DATA_READ: "a frame's data"}.get(value, "the reply")
                raise DeadlineExceeded(
                    f"{what} did not come through in time: the request was ended (server"
                    f" --stream-idle-s {idle_s:g}, then {MIN_FRAME_BYTES_PER_S >> 10} KiB/s)"
                )

    async def _io_call(self, sock: socket.socket, fn: Callable[..., T], *args: Any) -> T:
        """Socket work on an I/O thread. Cancelled (the server cut the call), the connection is
        shut so the thread lets go at once, and its end is awaited: a thread never keeps writing
        into a buffer its request has given back."""
        work = asyncio.get_running_loop().run_in_executor(self._io, fn, *args)
        try:
            return await asyncio.shield(work)
        except asyncio.CancelledError:
            _shutdown(sock)
            with contextlib.suppress(Exception):
                await work
            raise

    def _frames(self, conn: FrameSocket, steps: Step[T]) -> Awaitable[T]:
        """Steps of a request's frames, on the I/O threads, under the per-frame deadlines."""
        idle_s = self.plane.idle_s
        deadline = asyncio.get_running_loop().time() + idle_s
        return self._drive(conn.sock, steps, deadline, idle_s, conn=conn)

    # --- requests -------------------------------------------------------------------------------

    async def _request(self, conn: FrameSocket) -> bool:
        """Serve one request; False when the connection must end (after a FAIL, or broken)."""
        t0, in0, out0 = time.perf_counter(), conn.bytes_in, conn.bytes_out
        method, outcome = "Bulk", "OK"
        try:
            try:
                frame: Prefix = await self._frames(
                    conn, conn.recv_steps(self.plane.limits.max_message_bytes)
                )
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
            with contextlib.suppress(OSError, ssl.SSLError, DeadlineExceeded):
                await self._fail(conn, error)
            return False
        finally:
            on_call = self.on_call
            if on_call is not None and conn.bytes_in != in0:
                n_in, n_out = conn.bytes_in - in0, conn.bytes_out - out0
                on_call(method, outcome, time.perf_counter() - t0, n_in, n_out)

    async def _fail(self, conn: FrameSocket, exc: ServerError) -> None:
        """Answer FAIL and end the connection: nothing more goes out; what the client still
        sends of its request is dropped, on the loop, while it keeps coming (pauses of
        FAIL_LINGER_S at most, the stream limit and --stream-idle-s in all), so that its send
        ends and it reads the FAIL rather than a reset. Then the caller closes it."""
        error = pb.BulkError(code=exc.code.value[0], kind=exc.kind, message=str(exc)[:8000])
        sock, linger = conn.sock, min(FAIL_LINGER_S, self.plane.idle_s)
        loop = asyncio.get_running_loop()
        until = loop.time() + self.plane.idle_s
        await self._drive(sock, conn.send_steps(FAIL, error.SerializeToString()), until, linger)
        with contextlib.suppress(OSError, ssl.SSLError):
            if not isinstance(sock, ssl.SSLSocket):
                sock.shutdown(socket.SHUT_WR)  # the client's read of the FAIL ends there
        left = self.plane.limits.stream_bytes
        scratch = bytearray(1 << 20)
        while left > 0 and loop.time() < until:
            try:
                n = sock.recv_into(scratch)
            except (BlockingIOError, ssl.SSLWantReadError, ssl.SSLWantWriteError):
                if not await self._ready(sock, READ, min(linger, until - loop.time())):
                    return
                continue
            if not n:
                return
            left -= n

    def _receiver(self, conn: FrameSocket, first: Prefix) -> Receive:
        """A push's `receive` (DataPlane.push): its frames into the sink on an I/O thread while
        bytes keep coming; when the client pauses (a push streamed during backward waits for
        backward) the loop waits for more, holding no thread, up to --stream-idle-s."""
        limits = self.plane.limits

        async def receive(sink: TensorSink | None) -> PushMeta | None:
            reader = conn.request(first, sink, limits.stream_bytes)
            try:
                out: object = await self._frames(
                    conn, _request_frames(reader, limits.max_message_bytes)
                )
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
        await self._frames(conn, conn.send_steps(DONE, reply.SerializeToString()))

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
                sender = _StepSender(self, conn, plan)
                try:
                    reply = await self._push_of(header, receive, sender.notify)
                finally:
                    await sender.stop()
                await self._frames(conn, sender.finish(reply))
            return
        reply = await self._push_of(header, receive)
        async with self.plane.pull(ask) as plan:
            await self._frames(conn, _send_pull(conn, plan, reply))

    async def _pull(self, conn: FrameSocket, first: Prefix) -> None:
        request = parse_request(pb.PullRequest, first.header)
        if first.nbytes:
            raise InvalidArgument("a PULL frame carries no data")
        self.plane.ops.check(self._callers[conn], "bulk PULL", request.model)
        async with self.plane.pull(messages.pull_ask_from_pb(request)) as plan:
            await self._frames(conn, _send_pull(conn, plan))


def _advance(steps: Step[T]) -> tuple[bool, Any, bool]:
    """Run I/O steps until they wait or end: (ended, what they wait for or their result, whether
    a frame ended on the way)."""
    framed = False
    try:
        while (want := next(steps)) == FRAME:
            framed = True
        return False, want, framed
    except StopIteration as stop:
        return True, stop.value, framed


def _request_frames(reader: RequestReader, max_header: int) -> Step[object]:
    """A request's frames through its END (END's header), FRAME between them."""
    while (out := (yield from reader.next_steps(max_header))) is MORE:
        yield FRAME
    return out


def _tls_handshake(sock: ssl.SSLSocket) -> Generator[str, None, None]:
    while True:
        try:
            sock.do_handshake()
            return
        except ssl.SSLWantReadError:
            yield READ
        except ssl.SSLWantWriteError:
            yield WRITE


def _send_pull(conn: FrameSocket, plan: PullPlan, reply: pb.PushReply | None = None) -> Step[None]:
    """HEAD, the parameters, END saying whether they are one version (and, for a STEP,
    carrying its push's reply)."""
    end = reply.SerializeToString() if reply is not None else b""
    if plan.tensors is None:
        header = pb.PullHeader(version=plan.version, not_modified=True)
        yield from conn.send_steps(HEAD, header.SerializeToString())
        yield from conn.send_steps(END, end, 1)
        return
    yield from conn.send_steps(HEAD, _pull_header(plan, plan.version))
    for index, (t, wire) in enumerate(zip(plan.tensors, plan.wires)):
        yield from conn.send_tensor_steps(index, t, wire, plan.chunk)
        yield FRAME
    yield from conn.send_steps(END, end, int(plan.consistent()))


def _pull_header(plan: PullPlan, version: int) -> bytes:
    assert plan.tensors is not None
    specs = [spec_of(n, t, w) for n, t, w in zip(plan.names, plan.tensors, plan.wires)]
    return pb.PullHeader(version=version, tensors=specs).SerializeToString()


class _StepSender:
    """A STEP's parameters, sent a bucket at a time as the step updates them.

    `notify` is the push's PushTicket.on_stepped: called mid-step under the model lock, it only
    queues the bucket for a task on the loop that sends the queue (on the I/O threads, as the
    socket takes it). After the push, `finish` sends what the step did not touch and END. When no
    step of this push ran (a duplicate, found_inf, a round stepped by another rank's thread),
    nothing was queued and `finish` sends everything as a pull would, read then."""

    def __init__(self, server: BulkServer, conn: FrameSocket, plan: PullPlan):
        self.server, self.conn, self.plan = server, conn, plan
        self.loop = asyncio.get_running_loop()
        self.index = {n: i for i, n in enumerate(plan.names)}
        self.queue: asyncio.Queue[int | list[str] | None] = asyncio.Queue()
        self.drain = self.loop.create_task(self._drain())
        self.started = False  # HEAD queued
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
                if not self.started:
                    # the version this step makes: HEAD
                    self.loop.call_soon_threadsafe(self.queue.put_nowait, model.version + 1)
                    self.started = True
                self.seq_after = model.write_seq + 1  # the seqlock once this step's write ends
                bucket = [n for n in names if n in self.index]
                self.loop.call_soon_threadsafe(self.queue.put_nowait, bucket)
            except RuntimeError:  # the loop is closed (the server is stopping)
                self._stopped = True

    async def _drain(self) -> None:
        while (item := await self.queue.get()) is not None:
            await self.server._frames(self.conn, self._item(item))

    def _item(self, item: int | list[str]) -> Step[None]:
        if isinstance(item, int):
            yield from self.conn.send_steps(HEAD, _pull_header(self.plan, item))
            return
        for name in item:
            yield from self._send(name)
            yield FRAME

    def _send(self, name: str) -> Step[None]:
        assert self.plan.tensors is not None
        i = self.index[name]
        yield from self.conn.send_tensor_steps(
            i, self.plan.tensors[i], self.plan.wires[i], self.plan.chunk
        )
        self.sent.add(name)

    async def stop(self) -> None:
        """No more buckets; wait until every queued one is sent (holding no thread)."""
        with self._lock:
            self._stopped = True
        # after every put notify scheduled (call_soon_threadsafe keeps their order)
        self.loop.call_soon(self.queue.put_nowait, None)
        await self.drain

    def finish(self, reply: pb.PushReply) -> Step[None]:
        """After the push and stop(): the rest, and END."""
        model = self.plan.model
        if not self.started:
            seq, version = model.read_begin()
            yield from self.conn.send_steps(HEAD, _pull_header(self.plan, version))
        else:
            seq = self.seq_after
        for name in self.plan.names:
            if name not in self.sent:
                yield from self._send(name)
                yield FRAME
        yield from self.conn.send_steps(
            END, reply.SerializeToString(), int(model.read_consistent(seq))
        )


def _shutdown(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
