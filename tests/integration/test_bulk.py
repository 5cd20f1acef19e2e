"""The bulk-data channel (adamd.protocol.bulk, server/transport/bulk/, client/_transport/bulk.py) against a real
daemon on loopback: results bitwise equal to gRPC's, the gRPC fallback, auth, TLS, hostile frames.

Servers here run without the same-host path (shm=False), so a default Client takes the channel as
it would from another host."""

from __future__ import annotations

import secrets
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
import pytest
import torch
import trustme

from adamd.client import (
    Client,
    InvalidArgument,
    NonFiniteGradient,
    PullResult,
    PushResult,
    TLSConfig,
    Unauthenticated,
    Unavailable,
)
from adamd.protocol.bulk import DATA, END, FAIL, HELO, PREFIX, PULL, PUSH, FrameSocket
from adamd.server.auth import ANYONE
from adamd.v1 import adamd_pb2 as pb

from ..conftest import assert_bitwise_equal, running_daemon, snapshot

if TYPE_CHECKING:
    from adamd.server import Daemon


@pytest.fixture(scope="module")
def net_daemon() -> Iterator[Daemon]:
    with running_daemon(shm=False, http_port=-1) as d:
        yield d


def _bulk_in_use(daemon: Daemon, settle_to: int | None = None) -> int:
    """Connections the server holds (waiting up to 5 s for them to become `settle_to`: the
    server sees a client's close a moment later)."""
    assert daemon.bulk is not None
    deadline = time.monotonic() + 5
    while settle_to is not None and len(daemon.bulk._sockets) != settle_to:
        if time.monotonic() > deadline:
            break
        time.sleep(0.02)
    return len(daemon.bulk._sockets)


def _params() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "w": torch.randn(300, 70, generator=g),
        "b": torch.randn(70, generator=g),
        "z": torch.randn(3, 5, generator=g).to(torch.float64),
    }


def _grads(step: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + step)
    return {
        "w": torch.randn(300, 70, generator=g),
        "b": torch.randn(70, generator=g),
        "z": torch.randn(3, 5, generator=g).to(torch.float64),
    }


@pytest.mark.parametrize("wire", [None, torch.bfloat16, torch.float16])
def test_bulk_and_grpc_train_bitwise_alike(
    net_daemon: Daemon, model_name: str, wire: torch.dtype | None
) -> None:
    """The same pushes over the channel and over gRPC give the same bits (params and state), and
    the fp32 ones torch.optim.Adam's."""
    ref = {n: p.clone().requires_grad_() for n, p in _params().items()}
    adam = torch.optim.Adam(list(ref.values()), lr=0.01, fused=True)
    with (
        Client(net_daemon.grpc_address) as bulk,
        Client(net_daemon.grpc_address, transport="grpc") as plain,
    ):
        bulk.create_model(model_name + "-b", _params(), lr=0.01)
        plain.create_model(model_name + "-g", _params(), lr=0.01)
        for step in range(4):
            grads = _grads(step)
            bulk.push_grad(model_name + "-b", grads, wire_dtype=wire)
            plain.push_grad(model_name + "-g", grads, wire_dtype=wire)
            for n, p in ref.items():
                p.grad = grads[n]
            adam.step()
        assert bulk._bulk is not None and not bulk._bulk.off_reason
        got = bulk.pull(model_name + "-b", wire_dtype=wire).params
        want = plain.pull(model_name + "-g", wire_dtype=wire).params
        assert_bitwise_equal(got, want)
        out = {n: torch.empty_like(p) for n, p in _params().items()}
        assert bulk.pull(model_name + "-b", out=out).version == 4
        if wire is None:
            assert_bitwise_equal(out, {n: p.detach() for n, p in ref.items()})
    a = snapshot(net_daemon.registry.get(model_name + "-b"))
    b = snapshot(net_daemon.registry.get(model_name + "-g"))
    assert_bitwise_equal(a, b)


def test_a_default_client_uses_the_channel(net_daemon: Daemon, model_name: str) -> None:
    assert _bulk_in_use(net_daemon, settle_to=0) == 0
    with Client(net_daemon.grpc_address) as c:
        c.create_model(model_name, {"w": torch.zeros(10)}, lr=0.1)
        c.push_grad(model_name, {"w": torch.ones(10)})
        assert _bulk_in_use(net_daemon) == 1  # one connection, kept for later calls
        c.pull_params(model_name)
        assert _bulk_in_use(net_daemon) == 1
    assert _bulk_in_use(net_daemon, settle_to=0) == 0


def test_errors_come_back_as_grpc_would_answer_them(net_daemon: Daemon, model_name: str) -> None:
    with Client(net_daemon.grpc_address) as c:
        c.create_model(model_name, {"w": torch.zeros(10)}, lr=0.1)
        c.push_grad(model_name, {"w": torch.ones(10)})
        before = snapshot(net_daemon.registry.get(model_name))
        with pytest.raises(InvalidArgument, match="shape"):
            c.push_grad(model_name, {"w": torch.ones(3)})
        bad = torch.ones(10)
        bad[7] = float("nan")
        with pytest.raises(NonFiniteGradient):
            c.push_grad(model_name, {"w": bad})
        with pytest.raises(KeyError):
            c.pull_params(model_name + "-missing")
        assert_bitwise_equal(snapshot(net_daemon.registry.get(model_name)), before)
        # and the next call works (a new connection: the failed one ended)
        assert c.push_grad(model_name, {"w": torch.ones(10)}).version == 2


def test_the_same_push_id_is_applied_once_across_transports(
    net_daemon: Daemon, model_name: str
) -> None:
    with (
        Client(net_daemon.grpc_address) as bulk,
        Client(net_daemon.grpc_address, transport="grpc") as plain,
    ):
        bulk.create_model(model_name, {"w": torch.zeros(10)}, lr=0.1)
        first = bulk.push_grad(model_name, {"w": torch.ones(10)}, push_id="p-1")
        again = plain.push_grad(model_name, {"w": torch.ones(10)}, push_id="p-1")
        assert (first.version, first.duplicate) == (1, False)
        assert (again.version, again.duplicate) == (1, True)
        assert bulk.describe(model_name).version == 1


def test_a_sync_round_over_the_channel(net_daemon: Daemon, model_name: str) -> None:
    with Client(net_daemon.grpc_address) as c:
        c.create_model(model_name, {"w": torch.zeros(1000)}, lr=0.1, world_size=2)
    results = {}

    def worker(rank: int) -> None:
        with Client(net_daemon.grpc_address) as c:
            results[rank] = c.push_grad(
                model_name, {"w": torch.full((1000,), rank + 1.0)}, rank=rank
            )
            results[rank + 10] = c.pull(model_name, wait_for_version=1).params["w"]

    threads = [threading.Thread(target=worker, args=(r,)) for r in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert results[0].version == results[1].version == 1
    assert results[0].contributors == 2
    assert torch.equal(results[10], results[11])


def test_a_server_without_the_channel_is_reached_over_grpc(model_name: str) -> None:
    with running_daemon(shm=False, http_port=-1, bulk_port=-1) as d:
        assert d.bulk is None
        with Client(d.grpc_address) as c:
            c.create_model(model_name, {"w": torch.zeros(10)}, lr=0.1)
            assert c.push_grad(model_name, {"w": torch.ones(10)}).version == 1
            assert c._bulk is not None and "declined" in c._bulk.off_reason
            assert torch.allclose(c.pull_params(model_name)["w"], torch.full((10,), -0.1))


def test_a_channel_port_that_cannot_be_reached_falls_back_to_grpc(model_name: str) -> None:
    """A firewall between worker and server: the port refuses; the same call goes over gRPC."""
    with running_daemon(shm=False, http_port=-1) as d:
        assert d.bulk is not None
        d.bulk._listener.close()  # nothing listens there any more
        with Client(d.grpc_address) as c:
            c.create_model(model_name, {"w": torch.zeros(10)}, lr=0.1)
            assert c.push_grad(model_name, {"w": torch.ones(10)}).version == 1
            assert c._bulk is not None and "cannot be reached" in c._bulk.off_reason
            assert c.pull(model_name).version == 1


def test_the_channel_needs_the_token(model_name: str) -> None:
    with running_daemon(shm=False, http_port=-1, token="s3cret") as d:
        with Client(d.grpc_address, token="s3cret") as c:
            c.create_model(model_name, {"w": torch.zeros(10)}, lr=0.1)
            c.push_grad(model_name, {"w": torch.ones(10)})
            assert _bulk_in_use(d, settle_to=1) == 1
        with Client(d.grpc_address, token="wrong") as c, pytest.raises(Unauthenticated):
            c.push_grad(model_name, {"w": torch.ones(10)})
        # A connection with a made-up ticket is closed without a word, and changes nothing.
        before = snapshot(d.registry.get(model_name))
        assert d.bulk is not None
        with socket.create_connection(("127.0.0.1", d.bulk.port), timeout=10) as raw:
            conn = FrameSocket(raw, 10)
            conn.send(HELO, secrets.token_bytes(32))
            try:
                _send_push(conn, model_name, torch.ones(10))
                assert raw.recv(1) == b""
            except (BrokenPipeError, ConnectionResetError):
                pass  # closed already, or with our push unread
        assert_bitwise_equal(snapshot(d.registry.get(model_name)), before)


def test_the_channel_speaks_tls_with_client_certificates(tmp_path: Path, model_name: str) -> None:
    ca = trustme.CA()
    server, worker = ca.issue_cert("127.0.0.1", "localhost"), ca.issue_cert("worker@adamd.test")
    files = {
        "ca": ca.cert_pem,
        "cert": server.cert_chain_pems[0],
        "key": server.private_key_pem,
        "wcert": worker.cert_chain_pems[0],
        "wkey": worker.private_key_pem,
    }
    for name, blob in files.items():
        blob.write_to_path(str(tmp_path / f"{name}.pem"))
    with running_daemon(
        shm=False,
        http_port=-1,
        tls_cert=tmp_path / "cert.pem",
        tls_key=tmp_path / "key.pem",
        tls_client_ca=tmp_path / "ca.pem",
    ) as d:
        tls = TLSConfig(
            ca=tmp_path / "ca.pem", cert=tmp_path / "wcert.pem", key=tmp_path / "wkey.pem"
        )
        with Client(d.grpc_address, tls=tls) as c:
            c.create_model(model_name, {"w": torch.zeros(1 << 16)}, lr=0.1)
            c.push_grad(model_name, {"w": torch.ones(1 << 16)}, wire_dtype=torch.bfloat16)
            assert torch.allclose(c.pull_params(model_name)["w"], torch.full((1 << 16,), -0.1))
            assert c._bulk is not None and not c._bulk.off_reason
            assert _bulk_in_use(d, settle_to=1) == 1
        # Plain TCP to the TLS port gets nowhere.
        assert d.bulk is not None
        with socket.create_connection(("127.0.0.1", d.bulk.port), timeout=15) as raw:
            conn = FrameSocket(raw, 15)  # (closes `raw` when collected)
            conn.send(HELO, secrets.token_bytes(32))
            try:
                assert raw.recv(1) in (b"", b"\x15")  # closed, or a TLS alert
            except ConnectionResetError:
                pass


def _raw(daemon: Daemon) -> FrameSocket:
    """A connection past HELO, with a ticket got over gRPC as a client would."""
    assert daemon.bulk is not None
    ticket = daemon.bulk.open(ANYONE).ticket
    conn = FrameSocket(socket.create_connection(("127.0.0.1", daemon.bulk.port), timeout=10), 10)
    conn.send(HELO, ticket)
    assert conn.recv().kind == HELO  # the server took the ticket
    return conn


def _send_push(conn: FrameSocket, model: str, grad: torch.Tensor, push_id: str = "") -> None:
    header = pb.PushHeader(
        model=model,
        grads=[pb.TensorSpec(name="w", dtype=pb.FLOAT32, shape=list(grad.shape))],
        push_id=push_id or secrets.token_hex(8),
    )
    conn.send(PUSH, header.SerializeToString())
    conn.send(DATA, b"", 0, 0, grad.numpy())
    conn.send(END)


def _fail_of(conn: FrameSocket) -> pb.BulkError:
    frame = conn.recv()
    assert frame.kind == FAIL
    return pb.BulkError.FromString(frame.header)


def test_hostile_frames_are_refused_and_change_nothing(net_daemon: Daemon, model_name: str) -> None:
    with Client(net_daemon.grpc_address) as c:
        c.create_model(model_name, {"w": torch.zeros(10)}, lr=0.1)
        c.push_grad(model_name, {"w": torch.ones(10)})
    model = net_daemon.registry.get(model_name)
    before = snapshot(model)
    invalid = grpc.StatusCode.INVALID_ARGUMENT.value[0]
    spec = [pb.TensorSpec(name="w", dtype=pb.FLOAT32, shape=[10])]

    # more bytes than the tensor holds: refused before a byte is read into it
    with _raw(net_daemon) as conn:
        header = pb.PushHeader(model=model_name, grads=spec, push_id="h-1")
        conn.send(PUSH, header.SerializeToString())
        conn.send(DATA, b"", 0, 0, torch.ones(11).numpy())
        conn.send(END)
        err = _fail_of(conn)
        assert err.code == invalid and "more bytes" in err.message

    # a chunk out of order, a tensor the header did not declare, a stream that ends early
    for data_frames, words in (
        ([(0, 8, torch.ones(8))], "expected byte 0"),
        ([(3, 0, torch.ones(10))], "declared 1"),
        ([(0, 0, torch.ones(5))], "ended early"),
    ):
        with _raw(net_daemon) as conn:
            header = pb.PushHeader(model=model_name, grads=spec, push_id=secrets.token_hex(4))
            conn.send(PUSH, header.SerializeToString())
            for index, offset, t in data_frames:
                conn.send(DATA, b"", index, offset, t.numpy())
            conn.send(END)
            err = _fail_of(conn)
            assert err.code == invalid and words in err.message, err.message

    # a header that is not a PushHeader, a frame kind that opens no request, garbage bytes
    with _raw(net_daemon) as conn:
        conn.send(PUSH, b"\xff\xff\xff")
        conn.send(END)
        assert _fail_of(conn).code == invalid
    with _raw(net_daemon) as conn:
        conn.send(DATA, b"", 0, 0, torch.ones(4).numpy())
        assert _fail_of(conn).code == invalid
    with _raw(net_daemon) as conn:
        conn.sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" + bytes(PREFIX.size))
        assert _fail_of(conn).code == invalid
    # a pull of parameters the model does not have
    with _raw(net_daemon) as conn:
        conn.send(PULL, pb.PullRequest(model=model_name, names=["nope"]).SerializeToString())
        assert _fail_of(conn).code == invalid

    assert_bitwise_equal(snapshot(model), before)
    # the server serves on
    with Client(net_daemon.grpc_address) as c:
        assert c.push_grad(model_name, {"w": torch.ones(10)}).version == 2


def test_a_stopping_server_answers_a_waiting_push_unavailable(model_name: str) -> None:
    with running_daemon(shm=False, http_port=-1) as d:
        with Client(d.grpc_address) as c:
            c.create_model(model_name, {"w": torch.zeros(10)}, lr=0.1, world_size=2)
        errors: list[BaseException] = []

        def rank0() -> None:
            with Client(d.grpc_address, retry_timeout=0.5) as c:
                try:
                    c.push_grad(model_name, {"w": torch.ones(10)}, rank=0)
                except BaseException as exc:
                    errors.append(exc)

        t = threading.Thread(target=rank0)
        t.start()
        deadline = time.monotonic() + 10
        while not (d.bulk is not None and d.bulk._busy) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert d.bulk is not None and d.bulk._busy  # the push waits for rank 1, on the channel
        d.stop(grace=1.5)
        t.join(20)
        assert len(errors) == 1 and isinstance(errors[0], Unavailable), errors


def _big_net() -> torch.nn.Sequential:
    """Parameters of over 2 x MIN_STEP_BUCKET_BYTES, so a STEP's step runs in several buckets."""
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Embedding(3000, 1024),  # 12 MB
        torch.nn.Linear(1024, 1024),
        torch.nn.Linear(1024, 3000),  # 12 MB
    )


def _loss(net: torch.nn.Module, step: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(step)
    idx = torch.randint(0, 3000, (4, 8), generator=g)
    return torch.nn.functional.cross_entropy(net(idx).flatten(0, 1), idx.flatten())


@pytest.mark.parametrize("wire", [None, torch.bfloat16])
def test_remote_adam_steps_in_one_exchange_bitwise(
    net_daemon: Daemon, model_name: str, wire: torch.dtype | None
) -> None:
    """RemoteAdam.step() over the channel is one STEP: the server steps in buckets and streams
    each back as it is done; the bits are local fused Adam's (fp32 wire), and the same as the
    two calls over gRPC give (bf16 wire)."""
    from adamd.client import RemoteAdam
    from adamd.server.core.stepping import MIN_STEP_BUCKET_BYTES

    remote, over_grpc, local = _big_net(), _big_net(), _big_net()
    assert sum(p.numel() * 4 for p in remote.parameters()) > 2 * MIN_STEP_BUCKET_BYTES
    remote[1].weight.requires_grad_(False)  # a parameter the step leaves alone: sent after it
    over_grpc[1].weight.requires_grad_(False)
    local[1].weight.requires_grad_(False)
    opt = RemoteAdam(remote.parameters(), lr=1e-2, server=net_daemon.grpc_address,
                     model=model_name, wire_dtype=wire)  # fmt: skip
    plain = RemoteAdam(over_grpc.parameters(), lr=1e-2, server=net_daemon.grpc_address,
                       model=model_name + "-g", wire_dtype=wire, transport="grpc")  # fmt: skip
    ref = torch.optim.Adam(local.parameters(), lr=1e-2, fused=True)
    try:
        for step in range(3):
            for net, o in ((remote, opt), (over_grpc, plain), (local, ref)):
                o.zero_grad()
                _loss(net, step).backward()
                o.step()
            for a, b, c in zip(remote.parameters(), over_grpc.parameters(), local.parameters()):
                assert torch.equal(a, b), step
                if wire is None:
                    assert torch.equal(a, c), step
            assert opt.version == step + 1
        assert opt._client._bulk is not None and len(opt._client._bulk._idle) == 1
        assert_bitwise_equal(
            snapshot(net_daemon.registry.get(model_name)),
            snapshot(net_daemon.registry.get(model_name + "-g")),
        )
    finally:
        opt.close()
        plain.close()


def test_a_sync_round_of_steps_streams_to_every_rank(net_daemon: Daemon, model_name: str) -> None:
    with Client(net_daemon.grpc_address) as c:
        c.create_model(model_name, {"w": torch.zeros(3 << 20), "b": torch.zeros(10)}, lr=0.1,
                       world_size=2)  # fmt: skip
    got: dict[int, tuple[PushResult, PullResult]] = {}

    def worker(rank: int) -> None:
        out = {"w": torch.empty(3 << 20), "b": torch.empty(10)}
        grads = {"w": torch.full((3 << 20,), rank + 1.0)}  # b gets no gradient: sent after
        with Client(net_daemon.grpc_address) as c:
            got[rank] = c.step(model_name, grads, out, rank=rank)

    threads = [threading.Thread(target=worker, args=(r,)) for r in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    (p0, r0), (p1, r1) = got[0], got[1]
    assert p0.version == p1.version == r0.version == r1.version == 1
    assert p0.contributors == 2
    assert torch.equal(r0.params["w"], r1.params["w"]) and torch.equal(
        r0.params["b"], r1.params["b"]
    )
    want = net_daemon.registry.get(model_name).params["w"]
    assert torch.equal(r0.params["w"], want)


def test_a_handshake_that_trickles_is_shut_at_its_deadline(
    monkeypatch: pytest.MonkeyPatch, model_name: str
) -> None:
    """A peer sending its HELO a byte at a time is shut at the handshake deadline, however often
    it sends; clients meanwhile are served."""
    from adamd.server.transport.bulk import connections

    monkeypatch.setattr(connections, "HANDSHAKE_S", 1.0)
    with running_daemon(shm=False, http_port=-1) as d:
        assert d.bulk is not None
        tricklers = [socket.create_connection(("127.0.0.1", d.bulk.port)) for _ in range(8)]
        t0 = time.monotonic()
        closed: set[int] = set()
        while len(closed) < len(tricklers) and time.monotonic() - t0 < 8:
            for i, s in enumerate(tricklers):
                if i in closed:
                    continue
                try:
                    s.send(b"H")
                except OSError:
                    closed.add(i)
            time.sleep(0.1)
        assert len(closed) == len(tricklers) and time.monotonic() - t0 < 5
        with Client(d.grpc_address) as c:  # served all along
            c.create_model(model_name, {"w": torch.zeros(10)}, lr=0.1)
            assert c.push_grad(model_name, {"w": torch.ones(10)}).version == 1
            assert c._bulk is not None and not c._bulk.off_reason
        for s in tricklers:
            s.close()


def test_sync_steps_fit_the_budget_a_sync_round_is_allowed(model_name: str) -> None:
    """Two ranks stepping (STEP) under the smallest budget their round may have: a step's pull
    sends from the parameters themselves and holds no transfer memory while its push waits."""
    n = 1 << 20  # 4 MiB of fp32
    frames = (4 << 20) + (64 << 10)  # one reply's frames in flight, as the round check counts
    with running_daemon(
        shm=False, http_port=-1, max_transfer_bytes=2 * (4 << 20) + frames + 4096
    ) as d:
        with Client(d.grpc_address) as c:
            c.create_model(model_name, {"w": torch.zeros(n)}, lr=0.1, world_size=2)
        got: dict[int, PushResult] = {}

        def worker(rank: int) -> None:
            with Client(d.grpc_address, retry_timeout=5) as c:
                got[rank], _ = c.step(
                    model_name, {"w": torch.ones(n)}, {"w": torch.empty(n)}, rank=rank
                )

        threads = [threading.Thread(target=worker, args=(r,)) for r in (0, 1)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert got[0].version == got[1].version == 1 and got[0].contributors == 2


def test_a_client_deadline_is_not_a_broken_channel(net_daemon: Daemon, model_name: str) -> None:
    with Client(net_daemon.grpc_address) as c:
        c.create_model(model_name, {"w": torch.zeros(10)}, lr=0.1, world_size=2)
    with Client(net_daemon.grpc_address, timeout=0.5) as c:
        t0 = time.monotonic()
        with pytest.raises(TimeoutError):  # rank 1 never comes: DeadlineExceeded, not retried
            c.push_grad(model_name, {"w": torch.ones(10)}, rank=0)
        assert time.monotonic() - t0 < 5
        assert c._bulk is not None and c._bulk.off_reason == ""
