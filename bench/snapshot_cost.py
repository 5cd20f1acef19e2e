"""What durability costs: snapshot capture/write/verify times and the push+step time with snapshots
off, periodic and durable, for a 25M-parameter model on a CPU daemon in this process.

    .venv/bin/python -m bench.snapshot_cost [--params 25e6] [--steps 20] [--data-dir DIR]

The data dir decides the disk measured (default: a temp dir, which may be tmpfs on some hosts;
point it at the disk the daemon will use). Prints one line per figure; docs/durability.md quotes them.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from adamd.client import Client
from adamd.server import Daemon, ServerConfig
from adamd.server.storage import format as fmt


def _params(n: int) -> dict[str, torch.Tensor]:
    per = n // 5
    return {f"layer{i}.weight": torch.randn(per) for i in range(5)}


def _push_times(data_dir: Path, n: int, steps: int, **snap: object) -> list[float]:
    cfg = ServerConfig(grpc_port=0, http_port=-1, data_dir=data_dir, device="cpu", **snap)  # type: ignore[arg-type]
    daemon = Daemon(cfg).start()
    try:
        with Client(daemon.grpc_address) as c:
            params = _params(n)
            c.create_model("bench", params, lr=1e-3)
            grads = {k: torch.randn_like(v) for k, v in params.items()}
            for _ in range(3):  # warm up: state allocation, first snapshot
                c.push_grad("bench", grads)
            times = []
            for _ in range(steps):
                t0 = time.perf_counter()
                c.push_grad("bench", grads)
                times.append(time.perf_counter() - t0)
            return times
    finally:
        daemon.stop()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--params", type=float, default=25e6)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--data-dir", type=Path)
    args = ap.parse_args()
    n = int(args.params)
    root = Path(args.data_dir or tempfile.mkdtemp(prefix="adamd-snapbench-"))
    print(f"{n / 1e6:.0f}M fp32 params, data dir {root}, torch threads {torch.get_num_threads()}")

    # The snapshot itself, on a model that has stepped (so Adam state exists).
    cfg = ServerConfig(grpc_port=0, http_port=-1, data_dir=root / "direct", device="cpu")
    daemon = Daemon(cfg).start()
    try:
        with Client(daemon.grpc_address) as c:
            params = _params(n)
            c.create_model("bench", params, lr=1e-3)
            c.push_grad("bench", {k: torch.randn_like(v) for k, v in params.items()})
        model = daemon.registry.get("bench")
        caps, writes, loads = [], [], []
        for i in range(5):
            t0 = time.perf_counter()
            cap = fmt.capture(model)
            caps.append(time.perf_counter() - t0)
            file = fmt.write(cap, root / "direct" / "bench", 100 + i)
            writes.append(file.seconds)
            t0 = time.perf_counter()
            fmt.load(file)
            loads.append(time.perf_counter() - t0)
        size = file.nbytes
    finally:
        daemon.stop()
    med = statistics.median
    print(f"snapshot size: {size / 1e6:.0f} MB")
    print(f"capture (copy under the model lock, stalls pushes): median {med(caps) * 1e3:.0f} ms")
    print(
        f"write (safetensors + fsync + sha256 + manifest + rename): median {med(writes) * 1e3:.0f} ms"
    )
    print(f"verify + load at restart: median {med(loads) * 1e3:.0f} ms")

    runs: dict[str, dict[str, Any]] = {
        "off": {},
        "periodic every 10 steps": {"snapshot_every_steps": 10},
        "durable": {"durable": True},
    }
    base = None
    for label, snap in runs.items():
        times = _push_times(root / label.replace(" ", "-"), n, args.steps, **snap)
        m = med(times)
        base = base or m
        print(
            f"push+step, snapshots {label}: median {m * 1e3:.0f} ms, p90"
            f" {sorted(times)[int(0.9 * len(times))] * 1e3:.0f} ms ({m / base:.2f}x off)"
        )


if __name__ == "__main__":
    main()
