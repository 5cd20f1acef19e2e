"""Sync-mode scaling: W worker processes push to one model created with world_size=W, mode="sync".

Each worker is its own process (`python -m bench.sync_scaling ...`, the entry point below) with a Client
pushing as rank r over gRPC (`transport="grpc"` where the Client has it: the scaling of
the network path is the question). In sync mode a push returns once every rank's gradient for the version has
arrived, been averaged and stepped, so the workers move in lock step; a round's time is the
interval between consecutive push completions on rank 0. We report the best round (best-of-N, as
elsewhere) and the mean over the timed rounds, and the aggregate gradient bytes ingested per
second (W x 4 B x params / round time).

Run a worker as `python -m bench.sync_scaling ADDRESS MODEL RANK N ROUNDS`; it prints one JSON line.
"""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
import time
from dataclasses import dataclass

from adamd.client import Client

from .adamd_runs import client_transports
from .common import FP32, make_tensors, python_subprocess_env


@dataclass
class ScalingRow:
    workers: int
    n: int
    best_round: float  # seconds
    mean_round: float  # seconds

    def aggregate_gbps(self, seconds: float) -> float:
        return self.workers * FP32 * self.n / seconds / 1e9


def _worker(address: str, model: str, rank: int, n: int, rounds: int) -> None:
    grads = make_tensors(n, seed=10 + rank)
    for g in grads.values():
        g.mul_(1e-3)
    with Client(address, **client_transports()["grpc"]) as c:
        version = c.describe(model).version
        version = c.push_grad(model, grads, version=version, rank=rank).version  # warm-up round
        ends = [time.perf_counter()]
        for _ in range(rounds):
            version = c.push_grad(model, grads, version=version, rank=rank).version
            ends.append(time.perf_counter())
    gaps = [b - a for a, b in itertools.pairwise(ends)]
    print(json.dumps({"rank": rank, "best": min(gaps), "mean": sum(gaps) / len(gaps)}), flush=True)


def measure(address: str, workers: int, n: int, rounds: int, timeout: float = 180) -> ScalingRow:
    """Create a sync model for `workers` ranks, run them as processes, collect rank 0's rounds."""
    model = f"scale-{workers}"
    with Client(address) as c:
        c.create_model(
            model,
            make_tensors(n, seed=3),
            world_size=workers,
            mode="sync",
            round_timeout_s=120.0,
            lr=1e-3,
        )
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "bench.sync_scaling",
                address,
                model,
                str(r),
                str(n),
                str(rounds),
            ],
            env=python_subprocess_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for r in range(workers)
    ]
    results = {}
    errors = []
    for r, p in enumerate(procs):
        try:
            out, err = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            out, err = p.communicate()
        if p.returncode != 0:
            errors.append(f"rank {r} exited {p.returncode}: {err[-1000:]}")
        for line in out.splitlines():
            if line.startswith("{"):
                rec = json.loads(line)
                results[int(rec["rank"])] = rec
    with Client(address) as c:
        c.delete_model(model)
    if 0 not in results:
        raise RuntimeError("; ".join(errors) or "rank 0 printed no result")
    return ScalingRow(workers, n, float(results[0]["best"]), float(results[0]["mean"]))


if __name__ == "__main__":
    _address, _model, _rank, _n, _rounds = sys.argv[1:6]
    _worker(_address, _model, int(_rank), int(_n), int(_rounds))
