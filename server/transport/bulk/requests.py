"""The bulk channel's requests, one at a time per connection: PUSH, PULL and STEP (a push, then
the parameters in the same exchange), each the data plane's push or pull as over gRPC, checked for
the connection's caller; a refused or failed request is answered FAIL and ends the connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import time
from collections.abc import Awaitable, Callable

from adamd.protocol import ProtocolError
from adamd.protocol.bulk import (
    DONE,
    FAIL,
    MORE,
    PULL,
    PUSH,
    READ,
    STEP,
    Closed,
    FrameSocket,
    Prefix,
    RequestReader,
    Step,
)
from adamd.protocol.frames import TensorSink
from adamd.server.auth import Caller
from adamd.server.core.pushes import PushMeta
from adamd.server.dataplane import DataPlane, Receive
from adamd.server.errors import DeadlineExceeded, InvalidArgument, ServerError, as_server_error
from adamd.server.transport import messages
from adamd.server.transport.bulk.driving import FRAME, FrameDriver
from adamd.server.transport.bulk.replies import StepSender, send_pull
from adamd.server.transport.messages import parse_request
from adamd.v1 import adamd_pb2 as pb

FAIL_LINGER_S = 1.0  # after a FAIL, what the client still sends is dropped while it keeps coming
# (no pause longer than this), so its send ends and it reads the FAIL; then the connection closes


class BulkRequests:
    """One BulkServer's request handlers. `callers`: whose ticket each connection redeemed (the
    server's, filled at the handshake); `on_call` records each request (method, outcome,
    seconds, bytes in, bytes out)."""

    def __init__(
        self,
        plane: DataPlane,
        driver: FrameDriver,
        callers: dict[FrameSocket, Caller],
        on_call: Callable[[str, str, float, int, int], None] | None,
    ):
        self.plane = plane
        self.driver = driver
        self._callers = callers
        self.on_call = on_call

    async def serve(self, conn: FrameSocket) -> bool:
        """Serve one request; False when the connection must end (after a FAIL, or broken)."""
        t0, in0, out0 = time.perf_counter(), conn.bytes_in, conn.bytes_out
        method, outcome = "Bulk", "OK"
        try:
            try:
                frame: Prefix = await self.driver.frames(
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
        await self.driver.drive(
            sock, conn.send_steps(FAIL, error.SerializeToString()), until, linger
        )
        with contextlib.suppress(OSError, ssl.SSLError):
            if not isinstance(sock, ssl.SSLSocket):
                sock.shutdown(socket.SHUT_WR)  # the client's read of the FAIL ends there
        left = self.plane.limits.stream_bytes
        scratch = bytearray(1 << 20)
        while left > 0 and loop.time() < until:
            try:
                n = sock.recv_into(scratch)
            except (BlockingIOError, ssl.SSLWantReadError, ssl.SSLWantWriteError):
                if not await self.driver.ready(sock, READ, min(linger, until - loop.time())):
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
                out: object = await self.driver.frames(
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
        await self.driver.frames(conn, conn.send_steps(DONE, reply.SerializeToString()))

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
        parameters goes out as soon as the step has updated it (StepSender)."""
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
                sender = StepSender(self.driver, conn, plan)
                try:
                    reply = await self._push_of(header, receive, sender.notify)
                finally:
                    await sender.stop()
                await self.driver.frames(conn, sender.finish(reply))
            return
        reply = await self._push_of(header, receive)
        async with self.plane.pull(ask) as plan:
            await self.driver.frames(conn, send_pull(conn, plan, reply))

    async def _pull(self, conn: FrameSocket, first: Prefix) -> None:
        request = parse_request(pb.PullRequest, first.header)
        if first.nbytes:
            raise InvalidArgument("a PULL frame carries no data")
        self.plane.ops.check(self._callers[conn], "bulk PULL", request.model)
        async with self.plane.pull(messages.pull_ask_from_pb(request)) as plan:
            await self.driver.frames(conn, send_pull(conn, plan))


def _request_frames(reader: RequestReader, max_header: int) -> Step[object]:
    """A request's frames through its END (END's header), FRAME between them."""
    while (out := (yield from reader.next_steps(max_header))) is MORE:
        yield FRAME
    return out
