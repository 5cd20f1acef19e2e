"""The bulk-data channel against slow and hostile peers: raw sockets on loopback that
go silent mid-handshake, trickle a frame, stay silent after a FAIL, never read a reply or flood
the server with connections and tickets, beside a normal Client that must still be served over
the channel, fast; and a pull naming a parameter twice, refused the same way everywhere.

Each case here denied the channel (or answered half a reply) before the server stopped holding a
thread per waiting socket (server/transport/bulk/)."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING

import grpc
import pytest
import torch

from adamd.client import Client, InvalidArgument
from adamd.protocol.bulk import DATA, END, FAIL, HEAD, HELO, PREFIX, PULL, PUSH, STEP, FrameSocket
from adamd.server.auth import ANYONE
from adamd.server.transport import bulk as bulk_server
from adamd.v1 import adamd_pb2 as pb

from ..conftest import assert_bitwise_equal, running_daemon, snapshot

if TYPE_CHECKING:
    from adamd.server import Daemon

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def daemon() -> Iterator[Daemon]:
    with running_daemon(shm=False, http_port=-1, stream_idle_s=30.0) as d:
        yield d


@pytest.fixture
def model(daemon: Daemon, model_name: str) -> str:
    with Client(daemon.grpc_address, transport="grpc") as c:
        c.create_model(model_name, {"w": torch.zeros(64, 48), "b": torch.zeros(48)}, lr=0.1)
    return model_name


def _port(daemon: Daemon) -> int:
    assert daemon.bulk is not None
    return daemon.bulk.port


def _connect(daemon: Daemon, ticket: bool, rcvbuf: int = 0) -> FrameSocket:
    """A raw connection; past HELO (with a ticket got as a client would) when `ticket`."""
    raw = socket.socket()
    if rcvbuf:
        raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    raw.settimeout(10)
    raw.connect(("127.0.0.1", _port(daemon)))
    conn = FrameSocket(raw, 10)  # (closes `raw` when collected: keep it)
    if ticket:
        assert daemon.bulk is not None
        conn.send(HELO, daemon.bulk.open(ANYONE).ticket)
        assert conn.recv().kind == HELO
    return conn


@contextlib.contextmanager
def _held(conns: list[FrameSocket]) -> Iterator[list[FrameSocket]]:
    try:
        yield conns
    finally:
        for c in conns:
            c.close()


def _push_header(model: str, n: int = 48) -> bytes:
    spec = pb.TensorSpec(name="b", shape=[n], dtype=pb.FLOAT32)
    return pb.PushHeader(model=model, grads=[spec], push_id="hostile").SerializeToString()


def _served_fast(daemon: Daemon, model: str, limit_s: float = 1.0) -> None:
    """A normal Client pushes and pulls over the channel (no fallback to gRPC), each within
    `limit_s`; the model moves as one push says."""
    with Client(daemon.grpc_address, transport="bulk", timeout=8) as c:
        t0 = time.monotonic()
        before = c.pull(model).version
        took_pull = time.monotonic() - t0
        t0 = time.monotonic()
        after = c.push_grad(model, {"b": torch.ones(48)}).version
        took_push = time.monotonic() - t0
        assert c._bulk is not None and not c._bulk.off_reason, c._bulk.off_reason
    assert after == before + 1
    assert took_pull < limit_s and took_push < limit_s, (took_pull, took_push)


# --- the four reproduced cases -------------------------------------------------------------------


def test_silent_connections_do_not_stall_handshakes(daemon: Daemon, model: str) -> None:
    """Case 1: connections that send nothing (no ticket needed) held every handshake thread."""
    with _held([_connect(daemon, ticket=False) for _ in range(12)]):
        time.sleep(0.2)  # all accepted
        t0 = time.monotonic()
        _connect(daemon, ticket=True).close()
        assert time.monotonic() - t0 < 1.0
        _served_fast(daemon, model)


def test_slow_ticketed_pushes_do_not_deny_the_channel(daemon: Daemon, model: str) -> None:
    """Case 2: ticketed connections trickling a PUSH frame a byte at a time held every I/O
    thread."""
    frame = PREFIX.pack(PUSH, len(_push_header(model)), 0, 0, 0) + _push_header(model)
    stop = threading.Event()
    with _held([_connect(daemon, ticket=True) for _ in range(24)]) as socks:

        def trickle() -> None:
            for i in range(len(frame) - 1):  # never the whole frame
                if stop.wait(0.25):
                    return
                for s in socks:
                    with contextlib.suppress(OSError):
                        s.sock.send(frame[i : i + 1])

        t = threading.Thread(target=trickle, daemon=True)
        t.start()
        try:
            time.sleep(0.6)  # a few bytes in: every slow connection is mid-frame
            threads = threading.active_count()
            _served_fast(daemon, model)
            assert threading.active_count() <= threads + 2  # no thread per slow socket
        finally:
            stop.set()
            t.join()


def test_connections_silent_after_a_fail_are_closed(daemon: Daemon, model: str) -> None:
    """Case 3: after a FAIL the server read (and waited for) the rest of the request on an I/O
    thread until the client closed; now it closes the connection once the client goes quiet."""
    with _held([_connect(daemon, ticket=True) for _ in range(24)]) as socks:
        for s in socks:  # a push to a model that is not there: FAIL, then we say nothing more
            s.send(PUSH, _push_header("nope"))
        t0 = time.monotonic()
        for s in socks:
            assert s.recv().kind == FAIL
            assert s.sock.recv(1) == b""  # closed by the server, not held open
        assert time.monotonic() - t0 < 5.0
        _served_fast(daemon, model)


def test_a_pull_naming_a_parameter_twice_is_refused_everywhere(daemon: Daemon, model: str) -> None:
    """Case 4: a STEP whose pull named a parameter twice got HEAD ['w', 'w'] and half the bytes.
    gRPC Pull, the bulk PULL and STEP now answer INVALID_ARGUMENT and change nothing."""
    before = snapshot(daemon.registry.get(model))
    for transport in ("grpc", "bulk"):
        with (
            Client(daemon.grpc_address, transport=transport) as c,
            pytest.raises(InvalidArgument, match="more than once"),
        ):
            c.pull(model, ["w", "b", "w"])
    grad = torch.ones(48)
    step = pb.BulkStep(
        push=pb.PushHeader(
            model=model,
            grads=[pb.TensorSpec(name="b", shape=[48], dtype=pb.FLOAT32)],
            push_id="step-twice",
        ),
        pull=pb.PullRequest(model=model, names=["w", "w"]),
    )
    with _held([_connect(daemon, ticket=True)]) as (conn,):
        conn.send(STEP, step.SerializeToString())
        conn.send(DATA, b"", 0, 0, grad.numpy())
        conn.send(END)
        reply = conn.recv()
        assert reply.kind == FAIL
        error = pb.BulkError.FromString(reply.header)
        assert error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
        assert "more than once" in error.message
    with _held([_connect(daemon, ticket=True)]) as (conn,):
        conn.send(PULL, pb.PullRequest(model=model, names=["b", "b"]).SerializeToString())
        reply = conn.recv()
        assert reply.kind == FAIL
        assert (
            pb.BulkError.FromString(reply.header).code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
        )
    assert_bitwise_equal(snapshot(daemon.registry.get(model)), before)


# --- the suspected ones --------------------------------------------------------------------------


def test_handshakes_are_counted_at_accept_and_the_oldest_shed(daemon: Daemon, model: str) -> None:
    """A flood of connections that never send HELO: at most MAX_HANDSHAKES are held (counted
    when accepted, not when a handshake thread gets to them), the oldest shut first, and a new
    client still gets through."""
    cap = bulk_server.MAX_HANDSHAKES
    assert daemon.bulk is not None
    shed = daemon.bulk.shed_handshakes
    with _held([_connect(daemon, ticket=False) for _ in range(cap + 60)]) as socks:
        deadline = time.monotonic() + 5
        while daemon.bulk.shed_handshakes - shed < 60 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert daemon.bulk.handshakes <= cap
        assert daemon.bulk.shed_handshakes - shed >= 60
        socks[0].sock.settimeout(5)
        assert socks[0].sock.recv(1) == b""  # the oldest was shut
        _served_fast(daemon, model)


def test_a_ticket_flood_locks_no_one_out(daemon: Daemon, model: str) -> None:
    """One caller asking OpenBulk past the cap of outstanding tickets voids its own oldest ones
    rather than making the server decline everyone for TICKET_S."""
    assert daemon.bulk is not None
    for _ in range(bulk_server.MAX_TICKETS + 100):
        assert daemon.bulk.open(ANYONE).accepted
    assert len(daemon.bulk.tickets) <= bulk_server.MAX_TICKETS
    _served_fast(daemon, model)


def test_a_pull_never_read_holds_no_thread(daemon: Daemon, model_name: str) -> None:
    """Readers that ask for a large PULL and never read it: the reply waits for the socket to
    take it, holding no I/O thread, and a normal client is served meanwhile."""
    with Client(daemon.grpc_address, transport="grpc") as c:
        c.create_model(model_name, {"w": torch.zeros(1 << 20), "b": torch.zeros(48)}, lr=0.1)
    n = bulk_server.IO_THREADS + 4
    with _held([_connect(daemon, ticket=True, rcvbuf=4096) for _ in range(n)]) as conns:
        for conn in conns:
            conn.send(PULL, pb.PullRequest(model=model_name, names=["w"]).SerializeToString())
        time.sleep(0.5)  # every reply is stuck in its socket
        _served_fast(daemon, model_name)


def test_a_claimed_header_is_not_allocated_before_it_arrives(daemon: Daemon, model: str) -> None:
    """Frames that claim a header just under the message limit and send none of it cost the
    server no memory for it (the header grows as its bytes come)."""
    import tracemalloc

    hlen = daemon.config.max_message_bytes - 1
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        with _held([_connect(daemon, ticket=True) for _ in range(8)]) as socks:
            for s in socks:
                s.sock.sendall(PREFIX.pack(PUSH, hlen, 0, 0, 0) + b"\x0a")
            time.sleep(0.5)
            grown = tracemalloc.get_traced_memory()[0] - base
        assert grown < 8 * hlen // 4, grown
    finally:
        tracemalloc.stop()


# --- the client against a server that stops moving bytes -----------------------------------------


class _BlackHole:
    """A bulk peer that takes the handshake and then stalls: a PUSH is never read past its first
    frame, a PULL gets HEAD and half a DATA frame. (The server here is the hostile peer; the
    Client is what is tested.)"""

    def __init__(self, n: int):
        self.n = n
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.push_ids: list[str] = []
        self.conns: list[FrameSocket] = []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        with contextlib.suppress(OSError):
            while True:
                raw, _ = self.listener.accept()
                raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
                conn = FrameSocket(raw, 30)
                self.conns.append(conn)
                threading.Thread(target=self._stall, args=(conn,), daemon=True).start()

    def _stall(self, conn: FrameSocket) -> None:
        with contextlib.suppress(OSError):
            assert conn.recv().kind == HELO
            conn.send(HELO)
            first = conn.recv()
            if first.kind == PUSH:
                self.push_ids.append(pb.PushHeader.FromString(first.header).push_id)
                return  # nothing more is read
            spec = pb.TensorSpec(name="w", shape=[self.n], dtype=pb.FLOAT32)
            conn.send(HEAD, pb.PullHeader(version=1, tensors=[spec]).SerializeToString())
            conn.sock.sendall(PREFIX.pack(DATA, 0, 0, 0, 4 * self.n) + bytes(64))

    def close(self) -> None:
        self.listener.close()
        for c in self.conns:
            c.close()


def test_a_stalled_bulk_call_goes_over_grpc(
    daemon: Daemon, model_name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bulk call whose bytes stop moving (the client's default timeout=None: no deadline of its
    own) is not left hanging nor raised: a push goes over gRPC under the same push id (applied
    once), a pull is asked again over gRPC, and the channel is off for a while."""
    from adamd.client._transport import bulk as bulk_client

    monkeypatch.setattr(bulk_client, "STALL_S", 1.0, raising=False)
    n = 1 << 22  # 16 MiB: more than the socket buffers take
    hole = _BlackHole(n)
    try:
        with Client(daemon.grpc_address, transport="bulk") as c:
            c.create_model(model_name, {"w": torch.zeros(n)}, lr=0.1)
            assert c._bulk is not None
            c._bulk._open = lambda: pb.OpenBulkReply(  # type: ignore[method-assign]
                accepted=True, port=hole.port, ticket=bytes(32)
            )
            t0 = time.monotonic()
            assert c.push_grad(model_name, {"w": torch.ones(n)}, push_id="stalled-1").version == 1
            assert time.monotonic() - t0 < 10
            assert hole.push_ids == ["stalled-1"]
            assert "stalled" in c._bulk.off_reason and not c._bulk.usable()
            # the same push again: the server's ledger knows it (exactly once)
            c._bulk._off_until = 0.0
            again = c.push_grad(model_name, {"w": torch.ones(n)}, push_id="stalled-1")
            assert again.version == 1
            c._bulk._off_until = 0.0
            t0 = time.monotonic()
            pulled = c.pull(model_name)
            assert time.monotonic() - t0 < 10
            assert pulled.version == 1
            with Client(daemon.grpc_address, transport="grpc") as g:
                assert torch.equal(pulled.params["w"], g.pull(model_name).params["w"])
            assert "stalled" in c._bulk.off_reason
    finally:
        hole.close()


def test_a_frame_trickled_below_the_pace_is_ended(model_name: str) -> None:
    """A ticketed peer that keeps a DATA frame alive a few bytes at a time (never quiet for
    --stream-idle-s) is ended once the frame's first --stream-idle-s are over and it has not
    averaged MIN_FRAME_BYTES_PER_S: FAIL DEADLINE_EXCEEDED, the model unchanged."""
    with running_daemon(shm=False, http_port=-1, stream_idle_s=1.0) as d:
        with Client(d.grpc_address, transport="grpc") as c:
            c.create_model(model_name, {"b": torch.zeros(4096)}, lr=0.1)
        before = snapshot(d.registry.get(model_name))
        with _held([_connect(d, ticket=True)]) as (conn,):
            conn.send(PUSH, _push_header(model_name, 4096))
            conn.sock.sendall(PREFIX.pack(DATA, 0, 0, 0, 4 * 4096))
            t0 = time.monotonic()
            while time.monotonic() - t0 < 8 and not conn.readable_now():  # until the answer
                conn.sock.sendall(b"\0" * 4)
                time.sleep(0.25)
            reply = conn.recv()
            assert reply.kind == FAIL
            error = pb.BulkError.FromString(reply.header)
            assert error.code == grpc.StatusCode.DEADLINE_EXCEEDED.value[0], error
            assert time.monotonic() - t0 < 5
        assert_bitwise_equal(snapshot(d.registry.get(model_name)), before)
