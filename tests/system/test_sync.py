"""Sync parameter-server training with real worker processes against a real daemon.

Workers are separate processes started torchrun-style (tests.workers); they push seeded per-rank
gradients, so the test recomputes every round with a local fused torch.optim.Adam fed the mean
gradient ((g0 + g1) + g2) / 3.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
import torch

from adamd.client import Client, DuplicatePush, StalePush
from adamd.server import Daemon

from .. import workers


def _assert_close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for n in a:
        torch.testing.assert_close(a[n], b[n], rtol=1e-6, atol=1e-7, msg=n)


def test_three_workers_end_identical_and_equal_local_mean_gradient_adam(
    daemon: Daemon, model_name: str, tmp_path: Path
) -> None:
    steps = 5
    ranks = workers.run_all(3, daemon.grpc_address, model_name, tmp_path, "--steps", str(steps))

    model = daemon.registry.get(model_name)
    # The world size came from $WORLD_SIZE: one step per round, not one per push.
    assert model.world_size == 3 and model.mode == "sync"
    assert model.version == steps
    for r, got in enumerate(ranks):
        assert got["rank"] == r and got["world_size"] == 3  # from $RANK / $WORLD_SIZE
        assert got["version"] == steps
        assert [res["version"] for res in got["results"]] == list(range(1, steps + 1))
        assert all(res["contributors"] == 3 and res["applied"] for res in got["results"])
        assert not any(res["partial"] or res["duplicate"] for res in got["results"])
    # Every worker ends bitwise identical, with the server's parameters.
    server = {n: p.detach().clone() for n, p in model.params.items()}
    for got in ranks:
        for n, t in server.items():
            assert torch.equal(got["params"][n], t), n
    _assert_close(server, workers.reference([[0, 1, 2]] * steps))
    for state in model.optimizer.state.values():
        assert int(state["step"]) == steps


def test_killed_worker_rounds_step_partial_after_the_timeout(
    daemon: Daemon, model_name: str, tmp_path: Path
) -> None:
    """SIGKILL rank 2 mid-run: the policy is to step with the pushes received once the round
    timeout passes, marking the reply partial; the survivors finish the run."""
    # The workers take their first step together, once all have started, so the round timeout
    # measures rounds only (not torch's import on a busy machine).
    steps, stop_after, timeout_s = 5, 2, 4.0
    outs = {r: tmp_path / f"rank{r}.pt" for r in range(3)}
    go = tmp_path / "go"
    common = ("--steps", str(steps), "--round-timeout", str(timeout_s), "--start-when", str(go))
    procs = {
        r: workers.launch(
            r,
            3,
            daemon.grpc_address,
            model_name,
            outs[r],
            *common,
            *(("--stop-after", str(stop_after)) if r == 2 else ()),
        )
        for r in range(3)
    }
    try:
        workers.start_together(procs, outs, go)
        stopped = Path(str(outs[2]) + ".stopped")
        deadline = time.monotonic() + 120
        while not stopped.exists():
            assert procs[2].poll() is None, procs[2].communicate()[0].decode()
            assert time.monotonic() < deadline, "rank 2 never reached the kill point"
            time.sleep(0.05)
        os.kill(procs[2].pid, signal.SIGKILL)
        killed_at = time.monotonic()
        procs[2].communicate(timeout=10)  # reap it and close its pipe
        assert procs[2].returncode == -signal.SIGKILL
        survivors = {r: procs[r] for r in (0, 1)}
        workers.finish(survivors, timeout=60)
        elapsed = time.monotonic() - killed_at
    finally:
        workers.stop_all(procs)
    model = daemon.registry.get(model_name)
    assert model.round_timeout_s == timeout_s
    assert model.version == steps
    server = {n: p.detach().clone() for n, p in model.params.items()}

    got = [workers.load(outs[r]) for r in (0, 1)]
    for g in got:
        results = g["results"]
        assert [r["version"] for r in results] == list(range(1, steps + 1))
        for step, res in enumerate(results):
            full = step < stop_after
            assert res["partial"] is not full, (step, res)
            assert res["contributors"] == (3 if full else 2), (step, res)
            assert res["applied"]
        for n, t in server.items():
            assert torch.equal(g["params"][n], t), n
    # Each partial round waited out the timeout (the first had started before the kill), and
    # the run did not hang beyond it.
    partial_rounds = steps - stop_after
    assert (partial_rounds - 1) * timeout_s <= elapsed < partial_rounds * timeout_s + 20
    rounds = [[0, 1, 2]] * stop_after + [[0, 1]] * partial_rounds
    _assert_close(server, workers.reference(rounds))


def test_a_rank_pushing_twice_in_one_round_gets_duplicate_push(
    daemon: Daemon, model_name: str
) -> None:
    init = workers.initial_params()
    with Client(daemon.grpc_address) as c0, Client(daemon.grpc_address) as c1:
        c0.create_model(model_name, init, world_size=2, lr=workers.LR)
        first, second = workers.rank_grads(0, 0), workers.rank_grads(2, 0)
        model = daemon.registry.get(model_name)
        errors: list[BaseException] = []
        lock = threading.Lock()

        def push(grads: dict[str, torch.Tensor]) -> object:
            try:
                return c0.push_grad(model_name, grads, version=0, rank=0)
            except DuplicatePush as exc:
                with lock:
                    errors.append(exc)
                raise

        with ThreadPoolExecutor(2) as pool:
            futures = [pool.submit(push, g) for g in (first, second)]
            deadline = time.monotonic() + 30
            while not errors:  # whichever arrived second is refused at once
                assert time.monotonic() < deadline
                time.sleep(0.01)
            assert model.version == 0
            assert isinstance(errors[0], DuplicatePush)
            assert errors[0].code == grpc.StatusCode.FAILED_PRECONDITION
            assert "already pushed" in str(errors[0])
            r1 = c1.push_grad(model_name, workers.rank_grads(1, 0), version=0, rank=1)
            outcomes = [f.exception(timeout=30) or f.result() for f in futures]
        assert sum(isinstance(o, DuplicatePush) for o in outcomes) == 1
        winner = next(i for i, o in enumerate(outcomes) if not isinstance(o, DuplicatePush))
        assert r1.version == 1 and r1.contributors == 2
        assert outcomes[winner] == r1
        # The round averaged the accepted push with rank 1's; the refused one counted nowhere.
        kept = (first, second)[winner]
        mean = {n: (kept[n] + workers.rank_grads(1, 0)[n]) / 2 for n in init}
        params = {n: t.clone().requires_grad_(True) for n, t in init.items()}
        ref = torch.optim.Adam(params.values(), lr=workers.LR, fused=True)
        for n, p in params.items():
            p.grad = mean[n]
        ref.step()
        _assert_close(c0.pull_params(model_name), {n: p.detach() for n, p in params.items()})
        # A sync push computed from another version is refused, not folded into this round.
        with pytest.raises(StalePush):
            c0.push_grad(model_name, workers.rank_grads(0, 1), version=0, rank=0)
        assert model.version == 1
