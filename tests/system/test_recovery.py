"""Crash recovery against a real `adamd serve` process: kill -9 at random moments during training,
restart, and check what survived; graceful SIGTERM writes a final snapshot; a shard of a sharded
model that comes back behind the others stops training with an error naming it.

The trainer pushes deterministic gradients (gradient k depends only on k), so the final parameters
of a run that applied every step exactly once, in order, equal a local fused torch.optim.Adam run
bitwise, however many times the server died in between.
"""

from __future__ import annotations

import os
import random
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

from adamd.client import Client, FailedPrecondition
from adamd.client._exceptions import (
    DeadlineExceeded,
    StalePush,
    Unavailable,
)
from adamd.server.storage import format as fmt

from ..processes import Server

SHAPES = {"w": (64, 32), "b": (32,)}
LR = 0.01


def _grads(k: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(k)
    return {n: torch.randn(s, generator=g) for n, s in SHAPES.items()}


def _init() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(12345)
    return {n: torch.randn(s, generator=g) for n, s in SHAPES.items()}


def _reference(steps: int) -> dict[str, torch.Tensor]:
    params = {n: t.clone() for n, t in _init().items()}
    opt = torch.optim.Adam(list(params.values()), lr=LR, fused=True)
    for k in range(steps):
        for n, p in params.items():
            p.grad = _grads(k)[n]
        opt.step()
    return params


@pytest.fixture
def server_factory(tmp_path: Path) -> Iterator[Callable[..., Server]]:
    made: list[Server] = []

    class Tracked(Server):
        def __init__(self, *flags: str):
            super().__init__(tmp_path / "data", *flags)
            made.append(self)

    yield Tracked
    for s in made:
        if s.proc is not None and s.proc.poll() is None:
            s.proc.kill()
            s.proc.wait()


def _crash_run(server: Server, rounds: int, steps_between: int, durable: bool) -> None:
    """Train while a killer thread kill -9s the server after a random number of acknowledged steps
    (plus a random sub-step delay, so kills land inside pushes and snapshot writes) and restarts
    it. Checks every restart came back from a valid snapshot and, in durable mode, with every
    acknowledged step; at the end, the run equals the uninterrupted reference bitwise."""
    total = rounds * steps_between + 5
    acked = 0  # highest version a push reply reported
    progress = threading.Condition()
    done = threading.Event()
    failures: list[str] = []
    rng = random.Random(os.getpid())

    def killer() -> None:
        for r in range(rounds):
            target = acked + rng.randint(1, steps_between)
            with progress:
                while acked < target and not done.is_set():
                    progress.wait(0.1)
            if done.is_set():
                failures.append(f"training finished before round {r}")
                return
            time.sleep(rng.uniform(0, 0.004))
            with progress:
                at_kill = acked
            server.kill()
            server.start()
            restored = server.restored_version()
            if restored is None:
                failures.append(f"round {r}: restart restored nothing")
            elif durable and restored < at_kill:
                failures.append(
                    f"round {r}: acknowledged version {at_kill} lost, came back at {restored}"
                )

    server.start()
    assert server.restored_version() is None  # waits until it serves
    # A fresh channel connects as soon as the server is back; a long-lived one backs off for
    # seconds after repeated refusals, so on Unavailable we reconnect instead of waiting.
    c = Client(server.address, retry_timeout=1.0, timeout=30)
    with Client(server.address, retry_timeout=30) as setup:  # waits out the first start
        setup.create_model("m", _init(), lr=LR)
    c.snapshot("m")  # the model itself survives the first crash in either mode
    thread = threading.Thread(target=killer)
    thread.start()
    try:
        k = 0
        while k < total:
            try:
                if durable:
                    # Push ids alone keep this exactly-once: a push applied and persisted
                    # before the crash, whose reply was lost, is answered from the snapshot.
                    r = c.push_grad("m", _grads(k), push_id=f"step-{k}")
                else:
                    # Periodic mode may lose the last steps: pushing from a version makes the
                    # server refuse a gradient for a state it no longer has, and we redo them.
                    r = c.push_grad("m", _grads(k), version=k, push_id=f"step-{k}")
            except StalePush:
                k = c.describe("m").version
                continue
            except (Unavailable, DeadlineExceeded):
                c.close()
                c = Client(server.address, retry_timeout=1.0, timeout=30)
                continue
            assert r.version == k + 1, (r, k)
            k = r.version
            with progress:
                acked = max(acked, k)
                progress.notify_all()
    finally:
        done.set()
        thread.join()
    assert not failures, failures
    final = c.pull_params("m")
    c.close()
    ref = _reference(total)
    for n in SHAPES:
        assert torch.equal(final[n], ref[n]), n
    assert len(server.logs) == rounds + 1


def test_kill9_durable_loses_no_acknowledged_step(server_factory: Callable[..., Server]) -> None:
    _crash_run(server_factory("--durable"), rounds=10, steps_between=6, durable=True)


def test_kill9_periodic_resumes_from_a_valid_snapshot(
    server_factory: Callable[..., Server],
) -> None:
    _crash_run(
        server_factory("--snapshot-every-steps", "3"), rounds=2, steps_between=8, durable=False
    )


@pytest.mark.slow
@pytest.mark.parametrize("durable", [True, False])
def test_kill9_many_rounds(server_factory: Callable[..., Server], durable: bool) -> None:
    flags = (
        ("--durable",) if durable else ("--snapshot-every-steps", "2", "--snapshot-every-s", "0.1")
    )
    _crash_run(server_factory(*flags), rounds=12, steps_between=10, durable=durable)


def test_sigterm_writes_final_snapshot_and_restart_resumes(
    server_factory: Callable[..., Server],
) -> None:
    server = server_factory()  # no periodic snapshots: only the final one can hold these steps
    server.start()
    assert server.restored_version() is None  # waits until it serves
    with Client(server.address, retry_timeout=60) as c:
        c.create_model("m", _init(), lr=LR)
        for k in range(7):
            c.push_grad("m", _grads(k), push_id=f"step-{k}")
        before = c.pull_params("m")
    assert server.kill(signal.SIGTERM) == 0
    assert fmt.list_snapshots(server.data_dir / "m")[-1].version == 7
    server.start()
    assert server.restored_version() == 7
    with Client(server.address, retry_timeout=60) as c:
        assert c.describe("m").version == 7
        after = c.pull_params("m")
        for n in SHAPES:
            assert torch.equal(before[n], after[n])
        assert c.push_grad("m", _grads(6), push_id="step-6").duplicate
        for k in range(7, 10):
            c.push_grad("m", _grads(k), push_id=f"step-{k}")
        final = c.pull_params("m")
    ref = _reference(10)
    for n in SHAPES:
        assert torch.equal(final[n], ref[n]), n
    assert server.kill(signal.SIGINT) == 0


def test_a_shard_restarted_behind_the_others_stops_training_naming_it(tmp_path: Path) -> None:
    """Periodic snapshots, no --durable: a shard killed with SIGKILL comes back at its last
    snapshot, behind the others. The next push and pull stop with an error naming that shard and
    the versions side by side, rather than train or serve a model mixed from two versions."""
    shards = []
    for k in range(3):
        (tmp_path / f"s{k}").mkdir()
        shards.append(
            Server(tmp_path / f"s{k}" / "data", "--snapshot-every-steps=2", "--snapshot-every-s=0")
        )
    try:
        for s in shards:
            s.start()
        for s in shards:
            s.wait_started()
        with Client([s.address for s in shards], slice_bytes=1024, retry_timeout=30) as c:
            c.create_model("m", _init(), lr=0.1)
            for step in range(5):
                c.push_grad("m", _grads(step), version=step)
            deadline = time.monotonic() + 60  # snapshots are written in the background
            while not list(shards[1].data_dir.rglob("snap-*-v4.json")):
                assert time.monotonic() < deadline, "shard 1 wrote no snapshot of version 4"
                time.sleep(0.05)
            shards[1].kill()
            shards[1].start()
            log = shards[1].wait_started()
            assert "model m: restored version 4" in log  # its last snapshot; the others are at 5
            behind = f"shard 1 \\({shards[1].address}\\) at version 4"
            with pytest.raises(FailedPrecondition, match=behind):
                c.push_grad("m", _grads(5), version=5)
            with pytest.raises(FailedPrecondition, match=r"shard 1 .* at version 4"):
                c.pull("m", wait_timeout=1.0)
    finally:
        for s in shards:
            if s.proc is not None and s.proc.poll() is None:
                s.proc.kill()
                s.proc.wait()
