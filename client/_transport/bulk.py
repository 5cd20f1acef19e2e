"""The bulk-data channel's client side (adamd.protocol.bulk): pushes and pulls over plain sockets.

A Client asks the server for the channel over gRPC on its first push or pull (`OpenBulk`, which
carries the Client's token like every call), connects to the host it reached gRPC at, on the port
the server names (TLS when the Client uses TLS, trusting the same CA and presenting the same client
certificate), and keeps the connection for later calls (one per thread calling at once). Gradients
go out of tensor memory and parameters land in their destination tensors with no copy but the
kernel's.

gRPC stays the fallback: a server that offers no channel, a port that cannot be reached (a
firewall, a proxy in between) or a first request that breaks turns the channel off for a minute
and the call goes over gRPC at once; so does a request whose bytes stop moving for STALL_S while
the Client's own deadline is not spent (Stalled: a pull is asked again over gRPC, a push resent
under the same push id, and the channel stays off for STALLED_OFF_S). Failures the server answers
come back as `BulkError`, a FailedCall (client/_failed_call.py) with gRPC's status code, details
and error kind, so Client.call retries them (pushes under the same push id: exactly once) and
raises them as it does gRPC's.
"""

from __future__ import annotations

import contextlib
import socket
import ssl
import threading
import time
import weakref
from collections.abc import Callable, Iterator, Sequence
from typing import NoReturn

import grpc
import torch

from adamd.client._failed_call import FailedCall
from adamd.client._transport.base import Tensors
from adamd.client._transport.landing import Finals, pull_result, pull_targets
from adamd.client._types import PullResult
from adamd.protocol import ProtocolError
from adamd.protocol.bulk import (
    DATA,
    DONE,
    END,
    FAIL,
    HEAD,
    HELO,
    PULL,
    PUSH,
    READ,
    STEP,
    FrameSocket,
    Prefix,
)
from adamd.protocol.frames import TensorSink, dtype_from_pb
from adamd.protocol.pinned import Landing
from adamd.v1 import adamd_pb2 as pb

CONNECT_S = 5.0  # to connect and hand over the ticket, or the channel is unreachable
OFF_S = 60.0  # how long a channel that could not be used stays off before it is tried again
STALL_S = 10.0  # a request's bytes, or a reply's once it began, not moving this long: Stalled
STALLED_OFF_S = 90.0  # how long the channel stays off after a stalled call
MAX_IDLE = 4  # connections kept for later calls
_CODES = {c.value[0]: c for c in grpc.StatusCode}


class BulkError(FailedCall):
    """A bulk request's failure, with a gRPC call's status code, details and error kind (not a
    grpc.RpcError: Client.call retries and maps it as a FailedCall)."""


class Unreachable(Exception):
    """The channel cannot be used from here (declined, or its port cannot be reached)."""


class DeadlineSpent(TimeoutError):
    """The Client's own deadline passed while it waited for the reply: DEADLINE_EXCEEDED."""


class Stalled(Unreachable):
    """A request whose bytes stopped moving (STALL_S without progress) before the Client's own
    deadline was spent: the call goes over gRPC instead (a push under the same push id, which
    the server's exactly-once ledger applies once) and the channel stays off for a while."""


class BulkChannel:
    def __init__(
        self,
        host: str,
        open_bulk: Callable[[], pb.OpenBulkReply],
        tls: ssl.SSLContext | None,
        timeout: float | None,
    ):
        """`host`: where gRPC was reached (the channel is on the same host); `open_bulk` asks
        for a ticket over gRPC; `timeout`: per-call deadline (None: none; dead peers are found
        by TCP keepalive)."""
        self.host = host
        self._open = open_bulk
        self._tls = tls
        self._timeout = timeout
        self._idle: list[FrameSocket] = []
        self._lock = threading.Lock()
        # A Client dropped without close() closes its idle connections when collected (even in
        # a reference cycle: the finalizer, not the garbage, holds the list), as a gRPC channel
        # does, instead of leaving sockets to the collector's ResourceWarning.
        self._finalizer = weakref.finalize(self, _close_all, self._idle)
        self._off_until = 0.0
        self.off_reason = ""

    def usable(self) -> bool:
        return time.monotonic() >= self._off_until

    def turn_off(self, reason: str, for_s: float = OFF_S) -> None:
        self.off_reason = reason
        self._off_until = time.monotonic() + for_s

    def close(self) -> None:
        with self._lock:
            self._finalizer()

    # --- connections ----------------------------------------------------------------------------

    def _connect(self) -> FrameSocket:
        """A new connection past its handshake (the server answers HELO once it took the
        ticket); Unreachable, and gRPC for a while, when that does not happen within CONNECT_S."""
        try:
            reply = self._open()
        except grpc.RpcError as err:
            code = err.code() if hasattr(err, "code") else None
            if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.UNAUTHENTICATED):
                raise  # what any gRPC call would meet now: retried, or raised
            forever = code == grpc.StatusCode.UNIMPLEMENTED  # a server without the channel
            self.turn_off(f"OpenBulk failed: {code}", float("inf") if forever else OFF_S)
            raise Unreachable(self.off_reason) from None
        if not reply.accepted:
            self.turn_off(f"the server declined: {reply.reason}")
            raise Unreachable(self.off_reason)
        try:
            sock = socket.create_connection((self.host, reply.port), timeout=CONNECT_S)
        except OSError as exc:
            self.turn_off(f"{self.host}:{reply.port} cannot be reached: {exc}")
            raise Unreachable(self.off_reason) from None
        try:
            _keepalive(sock)
            if self._tls is not None:
                sock = self._tls.wrap_socket(sock, server_hostname=self.host)
            conn = FrameSocket(sock, CONNECT_S)
            conn.send(HELO, reply.ticket)
            answer(conn, HELO)
            sock.settimeout(self._timeout)
        except (OSError, ssl.SSLError, ProtocolError, BulkError) as exc:
            sock.close()
            self.turn_off(f"{self.host}:{reply.port}: no handshake ({exc})")
            raise Unreachable(self.off_reason) from None
        return conn

    @contextlib.contextmanager
    def connection(self) -> Iterator[FrameSocket]:
        """A connection for one request (kept for the next when the request went through).
        A connection that breaks leaves as BulkError(UNAVAILABLE), retried by Client.call; a
        reply that does not arrive within the Client's `timeout` as DEADLINE_EXCEEDED, and one
        that does not decode as INTERNAL (AdamdError), as gRPC's would."""
        with self._lock:
            conn = self._idle.pop() if self._idle else None
        if conn is None:
            conn = self._connect()
        done = False
        started = time.monotonic()
        conn.sock.settimeout(self._stall_s())
        try:
            yield conn
            done = True
        except TimeoutError as exc:
            spent = self._timeout is not None and time.monotonic() - started >= self._timeout
            if not spent and not isinstance(exc, DeadlineSpent):
                self.turn_off(f"a bulk call to {self.host} stalled ({exc})", STALLED_OFF_S)
                raise Stalled(self.off_reason) from None
            raise BulkError(
                grpc.StatusCode.DEADLINE_EXCEEDED, f"no reply from {self.host} in time: {exc}"
            ) from None
        except ProtocolError as exc:
            raise BulkError(
                grpc.StatusCode.INTERNAL, f"malformed reply from {self.host}: {exc}"
            ) from None
        except (OSError, ssl.SSLError) as exc:
            raise BulkError(
                grpc.StatusCode.UNAVAILABLE, f"bulk connection to {self.host} lost: {exc}"
            ) from None
        finally:
            if done:
                with self._lock:
                    if len(self._idle) < MAX_IDLE:
                        self._idle.append(conn)
                        conn = None
            if conn is not None:
                conn.close()

    def _stall_s(self) -> float:
        return STALL_S if self._timeout is None else min(STALL_S, self._timeout)

    def await_reply(self, conn: FrameSocket, started: float) -> None:
        """Wait for the reply's first bytes for as long as the Client's deadline allows (a sync
        push waits for its round: no stall limit here; a dead server is found by TCP keepalive),
        then read it under the stall limit again."""
        left = None if self._timeout is None else self._timeout - (time.monotonic() - started)
        if left is not None and left <= 0:
            raise DeadlineSpent("the deadline was spent before the reply")
        if not conn.wait(READ, left):
            raise DeadlineSpent(f"no reply within {self._timeout:g}s")

    # --- requests -------------------------------------------------------------------------------

    def push(
        self,
        header: pb.PushHeader,
        tensors: Sequence[torch.Tensor],
        wire_dtype: torch.dtype | None,
        chunk_bytes: int,
    ) -> pb.PushReply:
        started = time.monotonic()
        with self.connection() as conn:
            conn.send(PUSH, header.SerializeToString())
            conn.send_tensors(tensors, wire_dtype, chunk_bytes)
            conn.send(END)
            self.await_reply(conn, started)
            frame = answer(conn, DONE)
            return pb.PushReply.FromString(frame.header)

    def pull(
        self,
        request: pb.PullRequest,
        targets: Callable[[pb.PullHeader], TensorSink],
    ) -> tuple[pb.PullHeader, bool]:
        """Send `request`; the reply's data goes into the sink `targets(header)` makes.
        Returns the header and whether the bytes are one version."""
        started = time.monotonic()
        with self.connection() as conn:
            conn.send(PULL, request.SerializeToString())
            self.await_reply(conn, started)
            header, consistent, _ = _receive_pull(conn, targets)
            return header, consistent

    def step(
        self,
        header: pb.PushHeader,
        tensors: Sequence[torch.Tensor],
        request: pb.PullRequest,
        targets: Callable[[pb.PullHeader], TensorSink],
        chunk_bytes: int,
    ) -> tuple[pb.PushReply, pb.PullHeader, bool]:
        """A push and then a pull in one exchange (STEP): the push's reply, the pull's header,
        and whether its bytes are one version."""
        wire = dtype_from_pb(request.wire_dtype) if request.wire_dtype else None
        started = time.monotonic()
        with self.connection() as conn:
            conn.send(STEP, pb.BulkStep(push=header, pull=request).SerializeToString())
            conn.send_tensors(tensors, wire, chunk_bytes)
            conn.send(END)
            self.await_reply(conn, started)
            pulled, consistent, end = _receive_pull(conn, targets)
            return pb.PushReply.FromString(end), pulled, consistent


def _receive_pull(
    conn: FrameSocket, targets: Callable[[pb.PullHeader], TensorSink]
) -> tuple[pb.PullHeader, bool, bytes]:
    """HEAD, DATA frames into `targets(header)`, END: (header, consistent, END's header)."""
    try:
        return _read_pull(conn, targets)
    except BaseException:
        conn.settle()
        raise


def _read_pull(
    conn: FrameSocket, targets: Callable[[pb.PullHeader], TensorSink]
) -> tuple[pb.PullHeader, bool, bytes]:
    header = pb.PullHeader.FromString(answer(conn, HEAD).header)
    sink = None if header.not_modified else targets(header)
    while True:
        frame = conn.recv()
        if frame.kind == END:
            break
        if frame.kind == FAIL:
            answer_fail(frame)
        if frame.kind != DATA:
            raise ProtocolError(f"a {frame.kind!r} frame inside a pull reply")
        conn.recv_data(frame, sink)
    conn.flush()
    if sink is not None:
        sink.check_complete()
    return header, frame.tensor == 1, frame.header


def answer(conn: FrameSocket, want: bytes) -> Prefix:
    """The reply frame of a request: `want`, or FAIL raised as a BulkError."""
    frame = conn.recv()
    if frame.kind == FAIL:
        answer_fail(frame)
    if frame.kind != want or frame.nbytes:
        raise ProtocolError(f"expected a {want!r} frame, got {frame.kind!r}")
    return frame


def answer_fail(frame: Prefix) -> NoReturn:
    error = pb.BulkError.FromString(frame.header)
    code = _CODES.get(error.code, grpc.StatusCode.UNKNOWN)
    raise BulkError(code, error.message, error.kind)  # the connection is not used again


def _close_all(conns: list[FrameSocket]) -> None:
    while conns:
        conns.pop().close()


def _keepalive(sock: socket.socket) -> None:
    """Find a peer that went away without a word (as gRPC's keepalive does) within ~1 min."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for name, value in (("TCP_KEEPIDLE", 30), ("TCP_KEEPINTVL", 10), ("TCP_KEEPCNT", 3)):
        option = getattr(socket, name, None)
        if option is not None:
            sock.setsockopt(socket.IPPROTO_TCP, option, value)


class BulkTransport:
    """The Transport over a BulkChannel: Unreachable while the channel is off."""

    def __init__(self, channel: BulkChannel, chunk_bytes: Callable[[], int]):
        self.channel, self.chunk_bytes = channel, chunk_bytes

    def usable(self) -> bool:
        return self.channel.usable()

    def _check(self) -> BulkChannel:
        if not self.channel.usable():
            raise Unreachable(self.channel.off_reason or "the bulk channel is off")
        return self.channel

    def push(
        self, header: pb.PushHeader, tensors: Sequence[torch.Tensor], wire: torch.dtype | None
    ) -> pb.PushReply:
        return self._check().push(header, tensors, wire, self.chunk_bytes())

    def pull(self, request: pb.PullRequest, out: Tensors | None) -> PullResult | None:
        finals: Finals = {}
        landing = Landing()

        def targets(header: pb.PullHeader) -> TensorSink:
            sink, made = pull_targets(header, out, landing)
            finals.update(made)
            return sink

        header, consistent = self._check().pull(request, targets)
        if header.not_modified:
            return PullResult(header.version, {}, True)
        if not consistent:
            landing.release()
            return None
        return pull_result(header, finals, landing)

    def step(
        self,
        header: pb.PushHeader,
        tensors: Sequence[torch.Tensor],
        request: pb.PullRequest,
        out: Tensors,
    ) -> tuple[pb.PushReply, PullResult | None]:
        finals: Finals = {}
        landing = Landing()

        def targets(pulled: pb.PullHeader) -> TensorSink:
            sink, made = pull_targets(pulled, out, landing)
            finals.update(made)
            return sink

        chunk = self.chunk_bytes()
        reply, pulled, consistent = self._check().step(header, tensors, request, targets, chunk)
        if consistent:
            return reply, pull_result(pulled, finals, landing)
        landing.release()
        return reply, None
