"""Elastic workers as real processes against a real daemon: they join with no rank (the server
assigns one), one dies without leaving, one joins mid-run and leaves. Every round's mean is over
its actual contributors (the final parameters equal, bitwise, a local torch.optim.Adam fed those
means), no gradient is counted twice, and no round waits for the dead worker longer than its lease.
The live membership shows in /v1/models/{model} while they run and is empty once they are gone.
"""

from __future__ import annotations

import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import httpx

from adamd.client import Client
from adamd.server import Daemon

from . import workers
from .conftest import assert_bitwise_equal

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
