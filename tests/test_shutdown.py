"""SIGTERM while pushes stream: a real `adamd serve` process, workers pushing in threads.

A push the server had begun is either finished within the grace period (answered with its
version) or answered UNAVAILABLE by adamd itself, which Client and RemoteAdam retry: never
cancelled by grpc at the end of the grace (CANCELLED on some grpc versions, which the clients do
not retry and a training loop sees as a crash). After the stop, every acknowledged push is in the
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

from .test_cli import serve, stop

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
