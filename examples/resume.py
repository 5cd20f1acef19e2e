"""Resuming a run: stop every worker and the server, start them again, training continues.

Shows: the server's snapshot is the checkpoint. Run 1 starts `adamd serve --data-dir DIR` and two
sync workers, which train `--steps` steps and exit; then the server is stopped with SIGTERM (as a
deploy or Ctrl-C would), which writes a final snapshot of every model into DIR. Run 2 starts a new
server on the same DIR (it restores the model: parameters, Adam state, version) and the same
worker code again: RemoteAdam finds the model on the server, pulls its parameters, and training
picks up at the version and loss where run 1 stopped instead of starting over. Nothing in the
worker knows it is resuming. (After a crash rather than a clean stop, the server restores its
newest periodic snapshot: `--snapshot-every-steps` / `--snapshot-every-s` bound what is lost.)

Run it (from the repository root, after `make setup`):

    .venv/bin/python examples/resume.py

It keeps the snapshots in a temporary directory unless `--data-dir` is given. The worker alone is
`python examples/resume.py worker --server HOST:PORT` with RANK and WORLD_SIZE set, as torchrun
would set them; run it against your own `adamd serve`, stop everything, start it again.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

MODEL = "resume-demo"


def worker(args: argparse.Namespace) -> None:
    """Plain training code: the same in both runs."""
    import torch
    import torch.nn.functional as F

    from adamd.client import RemoteAdam

    torch.set_num_threads(1)
    torch.manual_seed(0)  # the first run initializes the server; a later one pulls from it
    net = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.Tanh(), torch.nn.Linear(64, 1))
    opt = RemoteAdam(net.named_parameters(), lr=1e-2, server=args.server, model=MODEL)
    start_version = opt.version  # 0 on a fresh server, where the last run stopped on a restored one
    t = torch.Generator().manual_seed(3)
    w1, w2 = torch.randn(16, 8, generator=t) / 4, torch.randn(8, 1, generator=t)  # the teacher
    g = torch.Generator().manual_seed(start_version * 10 + opt.rank)  # new batches each run
    losses = []
    try:
        for _ in range(args.steps):
            x = torch.randn(64, 16, generator=g)
            opt.zero_grad()
            loss = F.mse_loss(net(x), torch.tanh(x @ w1) @ w2)
            loss.backward()
            opt.report_loss(loss)
            opt.step()
            losses.append(loss.item())
    finally:
        opt.close()
    print(
        json.dumps({"rank": opt.rank, "start": start_version, "end": opt.version, "losses": losses})
    )


def run_workers(server: str, world: int, steps: int) -> list[dict[str, Any]]:
    """The workers as torchrun would start them: RANK and WORLD_SIZE in the environment."""
    procs = [
        subprocess.Popen(
            [sys.executable, __file__, "worker", "--server", server, "--steps", str(steps)],
            env={**os.environ, "RANK": str(rank), "WORLD_SIZE": str(world)},
            stdout=subprocess.PIPE,
            text=True,
        )
        for rank in range(world)
    ]
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    if any(p.returncode for p in procs):
        raise SystemExit(f"a worker failed: exit codes {[p.returncode for p in procs]}")
    return [json.loads(out.strip().splitlines()[-1]) for out in outputs]


def driver(args: argparse.Namespace) -> None:
    from _local_server import local_server

    with tempfile.TemporaryDirectory(prefix="adamd-resume-") as tmp:
        data_dir = Path(args.data_dir or tmp)
        for run in (1, 2):
            with local_server(data_dir) as server:
                print(f"run {run}: adamd serve --data-dir {data_dir} on {server.grpc_address}")
                print(f"  dashboard: {server.dashboard(MODEL)}", flush=True)
                results = run_workers(server.grpc_address, args.workers, args.steps)
                r = results[0]
                head, tail = r["losses"][:5], r["losses"][-5:]  # means of 5: less noise
                print(
                    f"  {args.workers} workers: version {r['start']} -> {r['end']},"
                    f" loss {sum(head) / len(head):.4f} -> {sum(tail) / len(tail):.4f}"
                    " (means of the first and last 5 steps)"
                )
                print("  every worker is done; stopping the server (SIGTERM: final snapshot)")
            snaps = sorted(p.name for p in (data_dir / MODEL).glob("*.safetensors"))
            print(f"  snapshots in {data_dir / MODEL}: {', '.join(snaps)}", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="role")
    w = sub.add_parser("worker", help="one training worker (RANK / WORLD_SIZE from the env)")
    w.add_argument("--server", required=True)
    w.add_argument("--steps", type=int, default=50)
    p.add_argument("--data-dir", help="where the server keeps snapshots (default: a temp dir)")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--steps", type=int, default=50, help="steps per run (default 50)")
    args = p.parse_args()
    if args.role == "worker":
        worker(args)
    else:
        driver(args)


if __name__ == "__main__":
    main()
