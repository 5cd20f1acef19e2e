"""Async parameter-server training: every push steps at once; too-stale pushes are refused.

Documented policy (server/core/model.py): a push carries the version its gradient was computed from;
one more than `max_staleness` versions behind the model is rejected with StalePush
(FAILED_PRECONDITION) and changes nothing; anything newer is applied.
"""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest
import torch

from adamd.client import Client, StalePush
from adamd.server import Daemon

from .. import workers
from ..conftest import assert_bitwise_equal, snapshot


def test_two_async_workers_one_step_per_push(
    daemon: Daemon, model_name: str, tmp_path: Path
) -> None:
    steps = 8
    got = workers.run_all(
        2, daemon.grpc_address, model_name, tmp_path, "--mode", "async", "--steps", str(steps)
    )
    model = daemon.registry.get(model_name)
    assert model.mode == "async"
    replies = [res for g in got for res in g["results"]]
    assert len(replies) == 2 * steps and all(res["applied"] for res in replies)
    assert not any(res["duplicate"] or res["partial"] for res in replies)
    # Each push was one step: the versions the replies report are exactly 1..2*steps.
    assert sorted(res["version"] for res in replies) == list(range(1, 2 * steps + 1))
    assert model.version == 2 * steps
    for state in model.optimizer.state.values():
        assert int(state["step"]) == 2 * steps
    # Whoever pushed last saw the final parameters.
    last = max(got, key=lambda g: g["version"])
    assert last["version"] == model.version
    for n, p in model.params.items():
        assert torch.equal(last["params"][n], p), n


def test_pushes_older_than_max_staleness_are_rejected_and_change_nothing(
    daemon: Daemon, model_name: str
) -> None:
    k = 2
    with Client(daemon.grpc_address) as c:
        info = c.create_model(
            model_name, workers.initial_params(), mode="async", max_staleness=k, lr=workers.LR
        )
        assert info.max_staleness == k
        for step in range(k + 1):
            assert c.push_grad(model_name, workers.rank_grads(0, step), version=step).version == (
                step + 1
            )
        model = daemon.registry.get(model_name)
        before = snapshot(model)
        # Version 0 is k + 1 behind version k + 1: refused, whole.
        with pytest.raises(StalePush) as err:
            c.push_grad(model_name, workers.rank_grads(1, 0), version=0)
        assert err.value.code == grpc.StatusCode.FAILED_PRECONDITION
        assert f"max_staleness={k}" in str(err.value)
        assert_bitwise_equal(before, snapshot(model))
        # Exactly k behind is still applied.
        r = c.push_grad(model_name, workers.rank_grads(1, 1), version=1)
        assert r.applied and r.version == k + 2 and model.version == k + 2
        # A pull reports the version, skips the transfer when the caller is current, and waits.
        pulled = c.pull(model_name)
        assert pulled.version == k + 2
        assert c.pull(model_name, if_newer_than=k + 2).not_modified
