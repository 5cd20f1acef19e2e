"""Elastic workers as real processes against a real daemon: they join with no rank (the server
assigns one), one dies without leaving, one joins mid-run and leaves. Every round's mean is over
its actual contributors (the final parameters equal, bitwise, a local torch.optim.Adam fed those
means), no gradient is counted twice, and no round waits for the dead worker longer than its lease.
The live membership shows in /v1/models/{model} while they run and is empty once they are gone.
Then RemoteAdam in this process against the same real daemon: ranks assigned without RANK, leave
on close (not on a copy's), a worker whose round closed without it dropping its gradient, and the
elastic mode (not the membership) surviving a restart.
"""

from __future__ import annotations

import copy
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch

from adamd.client import Client, RemoteAdam
from adamd.server import Daemon
from adamd.server.cli.main import main as cli_main

from .. import workers
from ..conftest import assert_bitwise_equal, running_daemon

LEASE_S = 1.5


def _wait_for(check: Any, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = check()
        if got:
            return got
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def _rounds(results: list[dict[str, Any]]) -> dict[int, list[int]]:
    """version v -> the ranks whose pushes made the step from v to v + 1, from the workers' logs."""
    rounds: dict[int, list[int]] = defaultdict(list)
    for res in results:
        for s in res["steps"]:
            if s["version"] is not None:
                assert s["version"] == s["pushed_from"] + 1, s  # a sync round steps once
                rounds[s["pushed_from"]].append(res["rank"])
    return rounds


def test_workers_join_and_leave_mid_run(daemon: Daemon, model_name: str, tmp_path: Path) -> None:
    addr = daemon.grpc_address
    common = ("--elastic", "--lease", str(LEASE_S), "--step-sleep", "0.1")
    outs = {w: tmp_path / f"{w}.pt" for w in "abc"}
    stop = tmp_path / "stop"  # A runs until C is done
    procs = {
        "a": workers.launch(
            None, 0, addr, model_name, outs["a"], *common, "--steps", "1000", "--until", str(stop)
        ),
        "b": workers.launch(None, 0, addr, model_name, outs["b"], *common, "--die-after", "4"),
    }
    try:
        with httpx.Client(base_url=daemon.http_url, timeout=10) as http:
            url = f"/v1/models/{model_name}"

            def got() -> Any:
                reply = http.get(url)
                return reply.json() if reply.status_code == 200 else None

            both = _wait_for(lambda: (m := got()) and len(m["members"]) == 2 and m, 60, "joins")
            assert both["elastic"] and both["lease_s"] == LEASE_S and both["world_size"] == 2
            assert [m["rank"] for m in both["members"]] == [0, 1]  # assigned, lowest free
            for m in both["members"]:
                assert 0 < m["lease_left_s"] <= LEASE_S
                assert m["last_seen"] <= time.time() < m["lease_expires_at"]
            model = daemon.registry.get(model_name)
            _wait_for(lambda: model.version >= 8, 60, "the dead worker's lease to lapse")
            procs["c"] = workers.launch(
                None, 0, addr, model_name, outs["c"], *common, "--steps", "6"
            )
            workers.finish({"c": procs["c"]}, timeout=60)
            stop.touch()
            workers.finish(procs, timeout=30)
            assert got()["members"] == []  # two left, the dead one's lease lapsed
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
                p.communicate()
    a, b, c = (workers.load(outs[w]) for w in "abc")
    # B's rank may go to C, once B's lease lapsed and one more lease passed; A's may not
    assert {a["rank"], b["rank"]} == {0, 1} and c["rank"] in (0, 1, 2) and c["rank"] != a["rank"]
    assert len(b["steps"]) == 4

    rounds = _rounds([a, b, c])
    with Client(addr) as client:
        final = client.pull(model_name)
    assert sorted(rounds) == list(range(final.version))  # every step accounted for
    for v, ranks in rounds.items():
        assert len(ranks) == len(set(ranks)), (v, ranks)  # no gradient counted twice
    for res in (a, b, c):
        for s in res["steps"]:
            if s["version"] is not None:
                assert s["contributors"] == len(rounds[s["pushed_from"]])
    # C joined mid-run and shared rounds with A; B shared rounds with A before it died.
    assert any({a["rank"], c["rank"]} <= set(r) for r in rounds.values())
    assert any({a["rank"], b["rank"]} <= set(r) for r in rounds.values())
    # the mean is over each round's actual contributors, summed in rank order
    expected = workers.reference([rounds[v] for v in range(final.version)])
    assert_bitwise_equal(final.params, expected)
    # the rounds after B died waited for it until its lease lapsed, and no longer
    waits = [s["seconds"] for s in a["steps"]]
    assert 0.5 * LEASE_S <= max(waits) <= LEASE_S + 2.0, max(waits)


def test_remote_adam_elastic_joins_with_an_assigned_rank_and_leaves_on_close(
    daemon: Daemon,
    model_name: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    w = torch.nn.Parameter(torch.ones(3))
    kw: dict[str, Any] = {"server": daemon.grpc_address, "model": model_name, "lr": 0.1}
    first = RemoteAdam([w], world_size="elastic", lease_s=30, **kw)
    second = RemoteAdam([torch.nn.Parameter(torch.ones(3))], world_size="elastic", **kw)
    assert (first.rank, second.rank) == (0, 1)  # no rank error: the server assigned them
    info = first.client.describe(model_name)
    assert info.elastic and info.lease_s == 30 and info.world_size == 0
    with pytest.raises(ValueError, match="elastic"):  # a fixed-world worker cannot join it
        RemoteAdam([torch.nn.Parameter(torch.ones(3))], world_size=2, rank=0, **kw)
    assert cli_main(["inspect", "--http", str(daemon.http_url), "--width", "200", model_name]) == 0
    out = capsys.readouterr().out
    assert "members" in out and "rank 0: lease" in out and "rank 1: lease" in out
    members = daemon.registry.get(model_name).rounds.members
    assert members is not None
    copy.deepcopy(first).close()  # a copy closing does not deregister the original
    assert members.live() == {0, 1}
    second.close()  # leaving: the next round does not wait for rank 1
    assert members.live() == {0}
    w.grad = torch.ones(3)
    first.step()
    assert first.last_result is not None and first.last_result.contributors == 1
    first.close()
    with Client(daemon.grpc_address) as c:
        assert c.leave(model_name, 0) is False  # already left
        assert c.join(model_name) == 0  # rank 0 is free again at once


def test_a_worker_whose_round_closed_without_it_drops_its_gradient_and_carries_on(
    daemon: Daemon, model_name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("RANK", raising=False)
    kw: dict[str, Any] = {"server": daemon.grpc_address, "model": model_name, "lr": 0.1}
    kw.update(world_size="elastic", lease_s=0.5)
    fast_w, slow_w = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(3))
    fast, slow = RemoteAdam([fast_w], **kw), RemoteAdam([slow_w], **kw)
    fast_w.grad = torch.ones(3)
    t0 = time.monotonic()
    fast.step()  # waits for the slow worker's lease (0.5 s), then steps without it
    assert 0.3 <= time.monotonic() - t0 < 3.0
    assert fast.last_result is not None and fast.last_result.partial
    assert fast.last_result.contributors == 1 and fast.version == 1
    slow_w.grad = torch.full((3,), 100.0)
    slow.step()  # computed from version 0: its round is gone, so the gradient is dropped
    assert slow.last_result is None and slow.version == 1
    assert torch.equal(slow_w.detach(), fast_w.detach())  # it pulled the fresh parameters
    members = daemon.registry.get(model_name).rounds.members
    assert members is not None and slow.rank in members.live()  # and is registered again
    slow.close()
    fast.close()


def test_elastic_mode_survives_a_restart_and_membership_starts_empty(tmp_path: Path) -> None:
    params = {"w": torch.ones(3)}
    with running_daemon(data_dir=tmp_path, http_port=-1) as d, Client(d.grpc_address) as c:
        c.create_model("m", params, world_size="elastic", lease_s=7.5, lr=0.1)
        assert c.join("m") == 0
        c.push_grad("m", {"w": torch.ones(3)}, version=0, rank=0)
        c.snapshot("m")
    with running_daemon(data_dir=tmp_path, http_port=-1) as d, Client(d.grpc_address) as c:
        info = c.describe("m")
        assert info.elastic and info.lease_s == 7.5 and info.version == 1
        members = d.registry.get("m").rounds.members
        assert members is not None and members.live() == set()  # workers register again
        assert c.push_grad("m", {"w": torch.ones(3)}, version=1, rank=3).version == 2
        assert members.live() == {3}
