"""SIGTERM while pushes stream: a real `adamd serve` process, workers pushing in threads.

A push the server had begun is either finished within the grace period (answered with its
version) or answered UNAVAILABLE by adamd itself, which Client and RemoteAdam retry. A call grpc
cancels itself (one that reaches the server as it shuts down gets CANCELLED) is retried too, so a
training loop never sees the stop. After the stop, every acknowledged push is in the
final snapshot, and a cut push left nothing behind.
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch

from adamd.client import AdamdError, Client, Unavailable
from adamd.protocol.frames import iter_frames, spec_of
from adamd.v1 import adamd_pb2 as pb

from ..processes import serve, stop

N = 1 << 20  # 4 MiB of gradients per push: a push is many frames, so SIGTERM lands mid-stream
WORKERS = 4


def _push_until_refused(address: str, acked: list[int], errors: list[AdamdError]) -> None:
    grads = {"w": torch.full((N,), 1e-3)}
    with Client(address, transport="grpc", retry_timeout=2.0) as c:
        while True:
            try:
                c.push_grad("m", grads)
            except AdamdError as exc:
                errors.append(exc)
                return
            acked.append(1)


@pytest.mark.parametrize("attempt", range(2))
def test_sigterm_never_answers_an_in_flight_push_cancelled(tmp_path: Path, attempt: int) -> None:
    acked: list[int] = []
    errors: list[AdamdError] = []
    with serve(tmp=tmp_path) as (proc, address, _http, lines):
        with Client(address) as c:
            c.create_model("m", {"w": torch.zeros(N)}, lr=1e-3, mode="async")
        workers = [
            threading.Thread(target=_push_until_refused, args=(address, acked, errors))
            for _ in range(WORKERS)
        ]
        for w in workers:
            w.start()
        deadline = time.monotonic() + 30
        while len(acked) < 8 and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.05 * attempt)  # land at different points of the streams
        assert stop(proc, signal.SIGTERM, lines) == 0, "".join(lines)
        for w in workers:
            w.join(60)
    assert len(errors) == WORKERS
    assert all(isinstance(e, Unavailable) for e in errors), [
        (type(e).__name__, getattr(e, "code", None), str(e)[:200]) for e in errors
    ]
    # Every acknowledged push reached the final snapshot.
    with serve(tmp=tmp_path) as (proc, address, _http, lines):
        with Client(address) as c:
            assert c.describe("m").version >= len(acked)
        assert stop(proc, signal.SIGTERM, lines) == 0


def _raw_push(address: str, model: str, rank: int, pause_s: float, out: dict[str, Any]) -> None:
    """One push on a raw channel (the first status is what we check, not the client's retries),
    pausing `pause_s` between its 64 KiB frames."""
    g = torch.ones(N)
    header = pb.PushHeader(model=model, grads=[spec_of("w", g)], rank=rank, push_id=f"p{rank}")

    def frames() -> Iterator[bytes]:
        for frame in iter_frames(header.SerializeToString(), [g], 1 << 16):
            yield frame
            time.sleep(pause_s)

    with grpc.insecure_channel(address) as ch:
        push = ch.stream_unary("/adamd.v1.Optimizer/PushGrad", lambda b: b, pb.PushReply.FromString)
        try:
            out["reply"] = push(frames())
        except grpc.RpcError as err:
            out["status"] = (err.code(), err.details())


def test_pushes_that_cannot_finish_in_the_grace_are_answered_unavailable(tmp_path: Path) -> None:
    """A push still streaming slowly and a sync push parked in a round whose other rank will never
    come: both outlast the grace, and both are answered UNAVAILABLE by adamd, changing nothing."""
    with serve(tmp=tmp_path) as (proc, address, _http, lines):
        with Client(address) as c:
            c.create_model("slow", {"w": torch.zeros(N)}, lr=1e-3, mode="async")
            c.create_model("round", {"w": torch.zeros(N)}, lr=1e-3, world_size=2)
        slow: dict[str, Any] = {}
        parked: dict[str, Any] = {}
        threads = [
            threading.Thread(target=_raw_push, args=(address, "slow", 0, 0.2, slow)),
            threading.Thread(target=_raw_push, args=(address, "round", 0, 0.0, parked)),
        ]
        for t in threads:
            t.start()
        time.sleep(1.5)  # the parked push has arrived; the slow one is mid-stream
        assert stop(proc, signal.SIGTERM, lines) == 0, "".join(lines)
        for t in threads:
            t.join(30)
    for out in (slow, parked):
        code, details = out["status"]
        assert code == grpc.StatusCode.UNAVAILABLE and "server is stopping" in details, out
    with serve(tmp=tmp_path) as (proc, address, _http, lines):
        with Client(address) as c:
            for model in ("slow", "round"):
                assert c.describe(model).version == 0
                assert torch.equal(c.pull_params(model)["w"], torch.zeros(N))
        assert stop(proc, signal.SIGTERM, lines) == 0


def _raw_server(handlers: dict[str, grpc.RpcMethodHandler]) -> tuple[grpc.Server, str]:
    from concurrent import futures

    server = grpc.server(futures.ThreadPoolExecutor(2))
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("t.T", handlers),))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    return server, f"127.0.0.1:{port}"


def test_a_call_cancelled_by_the_server_is_retried_one_cancelled_here_is_not() -> None:
    """grpc cancels a call that reaches a server already shutting down (status CANCELLED, no
    details, seen in CI as a push failing on SIGTERM): the client retries it like UNAVAILABLE.
    A call that failed on the client's own side (its request iterator raised) is not retried."""
    answered: list[int] = []

    def flaky(request: bytes, context: grpc.ServicerContext) -> bytes:
        answered.append(1)
        if len(answered) == 1:
            context.abort(grpc.StatusCode.CANCELLED, "")
        return request

    def failing() -> Iterator[bytes]:
        raise RuntimeError("bad request iterator")
        yield b""

    server, address = _raw_server(
        {
            "Flaky": grpc.unary_unary_rpc_method_handler(flaky),
            "In": grpc.stream_unary_rpc_method_handler(lambda it, ctx: b"".join(it)),
        }
    )
    try:
        with Client(address, transport="grpc", retry_timeout=10.0) as c:
            ch = grpc.insecure_channel(address)
            assert c.call(lambda: ch.unary_unary("/t.T/Flaky")(b"x")) == b"x"
            assert len(answered) == 2
            started = time.monotonic()
            with pytest.raises(AdamdError) as here:
                c.call(lambda: ch.stream_unary("/t.T/In")(failing()))
            assert "Exception iterating requests" in str(here.value)
            assert not isinstance(here.value, Unavailable)
            assert time.monotonic() - started < 5, "a local cancel must not be retried"
            ch.close()
    finally:
        server.stop(0)
