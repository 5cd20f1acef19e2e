"""Training-worker processes for the parameter-server tests, and the helpers that launch them.

Each worker is a real process (`python -m tests.workers ROLE ...`) started the way torchrun starts
one: `RANK` and `WORLD_SIZE` in its environment, and RemoteAdam given neither. A worker sets
deterministic per-rank gradients (`rank_grads`), so the test process can recompute every step with
a local torch.optim.Adam. When it is done it writes what it saw (final parameters, every push
reply) to a file with torch.save and exits 0.

With `--elastic` a worker is an elastic one (`world_size="elastic"`, no RANK: the server assigns
its rank) and pushes `rank_grads(rank, version)`: keyed by the version it computed from, since
workers that join late are at different local steps within one round. It records, per step, the
version it pushed from, the version its round produced (None: its round closed without it) and
the round's contributors; `--die-after N` ends it abruptly after N steps, without leaving.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
SHAPES: dict[str, tuple[int, ...]] = {"w": (48, 32), "b": (32,), "v": (1000,)}
LR = 0.01


def initial_params() -> dict[str, torch.Tensor]:
    """The values every worker starts from (whichever creates the model, they agree)."""
    g = torch.Generator().manual_seed(7)
    return {n: torch.randn(s, generator=g) for n, s in SHAPES.items()}


def rank_grads(rank: int, step: int) -> dict[str, torch.Tensor]:
    """The gradient rank `rank` pushes at step `step`: seeded, so the test can recompute it."""
    g = torch.Generator().manual_seed(1_000 * step + rank + 1)
    return {n: torch.randn(s, generator=g) * (rank + 1) for n, s in SHAPES.items()}


def mean_grads(ranks: Sequence[int], step: int) -> dict[str, torch.Tensor]:
    """What a sync round must step with: the ranks' gradients summed in rank order, then / count."""
    ranks = sorted(ranks)
    total = rank_grads(ranks[0], step)
    for r in ranks[1:]:
        for n, g in rank_grads(r, step).items():
            total[n].add_(g)
    return {n: t.div_(len(ranks)) if len(ranks) > 1 else t for n, t in total.items()}


def reference(rounds: Sequence[Sequence[int]]) -> dict[str, torch.Tensor]:
    """A local fused torch.optim.Adam (what the server runs on CPU) fed the mean of `rounds[i]`'s
    gradients at step i."""
    params = {n: t.clone().requires_grad_(True) for n, t in initial_params().items()}
    opt = torch.optim.Adam(params.values(), lr=LR, fused=True)
    for step, ranks in enumerate(rounds):
        grads = mean_grads(ranks, step)
        for n, p in params.items():
            p.grad = grads[n]
        opt.step()
    return {n: p.detach() for n, p in params.items()}


# --- the worker side ---------------------------------------------------------------------------


def _optimizer(args: argparse.Namespace, **kwargs: Any) -> tuple[list[Any], Any]:
    """The worker's parameters and its RemoteAdam on them (one torch thread: many workers)."""
    from adamd.client import RemoteAdam

    torch.set_num_threads(1)
    params = [(n, torch.nn.Parameter(t)) for n, t in initial_params().items()]
    if args.token_file:
        kwargs["token"] = Path(args.token_file).read_text().strip()
    return params, RemoteAdam(params, lr=LR, server=args.address, model=args.model, **kwargs)


def _train_elastic(args: argparse.Namespace) -> None:
    params, opt = _optimizer(
        args,
        world_size="elastic",
        lease_s=args.lease,
        round_timeout_s=args.round_timeout or 60.0,
    )
    steps = []
    for step in range(args.steps):
        if step == args.die_after or (args.until and Path(args.until).exists()):
            break
        assert opt.rank is not None
        pushed_from = opt.version
        grads = rank_grads(opt.rank, pushed_from)
        for n, p in params:
            p.grad = grads[n]
        t0 = time.monotonic()
        opt.step()
        r = opt.last_result
        steps.append(
            {
                "pushed_from": pushed_from,
                "version": None if r is None else r.version,
                "contributors": None if r is None else r.contributors,
                "seconds": time.monotonic() - t0,
            }
        )
        time.sleep(args.step_sleep)
    out = {"rank": opt.rank, "steps": steps}
    torch.save(out, args.out)
    if args.die_after >= 0:
        os._exit(0)  # gone without leaving: only its lease tells the server
    opt.close()


def _train(args: argparse.Namespace) -> None:
    if args.elastic:
        _train_elastic(args)
        return
    # rank and world_size come from $RANK / $WORLD_SIZE, as under torchrun; several servers:
    # tensors above --slice-bytes are split
    params, opt = _optimizer(
        args,
        mode=args.mode,
        round_timeout_s=args.round_timeout,
        slice_bytes=args.slice_bytes or None,
    )
    if args.start_when:  # start-up (torch's import) done: wait for the others, then go together
        Path(args.out + ".ready").touch()
        while not Path(args.start_when).exists():
            time.sleep(0.01)
    results = []
    try:
        for step in range(args.steps):
            if step == args.stop_after:
                Path(args.out + ".stopped").touch()  # the test SIGKILLs us now
                time.sleep(600)
            grads = rank_grads(opt.rank, step)
            for n, p in params:
                p.grad = grads[n]
            opt.step()
            assert opt.last_result is not None
            results.append(dataclasses.asdict(opt.last_result))
            time.sleep(args.step_sleep)
        out = {
            "rank": opt.rank,
            "world_size": opt.world_size,
            "version": opt.version,
            "params": {n: p.detach().clone() for n, p in params},
            "results": results,
        }
    finally:
        opt.close()
    torch.save(out, args.out)


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m tests.workers")
    p.add_argument("address")
    p.add_argument("model")
    p.add_argument("out", help="where to torch.save the worker's results")
    p.add_argument("--mode", choices=["sync", "async"], default="sync")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--round-timeout", type=float, default=0.0)
    p.add_argument(
        "--stop-after", type=int, default=-1, help="park before this step (to be killed)"
    )
    p.add_argument("--start-when", default="", help="take the first step once this file exists")
    p.add_argument("--elastic", action="store_true", help="world_size='elastic', no rank")
    p.add_argument("--lease", type=float, default=0.0, help="elastic: lease_s")
    p.add_argument("--step-sleep", type=float, default=0.0, help="pause after each step")
    p.add_argument("--slice-bytes", type=int, default=0, help="sharded: RemoteAdam slice_bytes")
    p.add_argument("--die-after", type=int, default=-1, help="elastic: exit after N steps")
    p.add_argument("--until", default="", help="elastic: stop once this file exists")
    p.add_argument("--token-file", default="", help="the servers' token, from this file")
    _train(p.parse_args(argv))


# --- the test side -----------------------------------------------------------------------------


def launch(
    rank: int | None,
    world_size: int,
    address: str,
    model: str,
    out: Path,
    *extra: str,
    prefix: Sequence[str] = (),
) -> subprocess.Popen[bytes]:
    """Start one worker as torchrun would: RANK / WORLD_SIZE in its environment (rank None:
    neither, for elastic workers). `prefix`: a command to run it under (`ip netns exec NS`)."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE")}
    if rank is not None:
        env.update(RANK=str(rank), WORLD_SIZE=str(world_size))
    env = {
        **env,
        "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
        "OMP_NUM_THREADS": "1",
    }
    cmd = [*prefix, sys.executable, "-m", "tests.workers", address, model, str(out), *extra]
    return subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )


def finish(procs: Mapping[Any, subprocess.Popen[bytes]], timeout: float) -> None:
    """Wait for the workers (by rank or any name); fail with their output if one failed or
    overran."""
    deadline = time.monotonic() + timeout
    failures = []
    for rank, proc in procs.items():
        try:
            output, _ = proc.communicate(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            output, _ = proc.communicate()
            failures.append(f"rank {rank} did not finish in {timeout}s:\n{output.decode()}")
            continue
        if proc.returncode != 0:
            failures.append(f"rank {rank} exited {proc.returncode}:\n{output.decode()}")
    if failures:
        raise AssertionError("\n".join(failures))


def start_together(
    procs: Mapping[int, subprocess.Popen[bytes]],
    outs: Mapping[int, Path],
    go: Path,
    timeout: float = 180,
) -> None:
    """Once every worker launched with `--start-when go` is ready, let them all take their
    first step (a round's timeout then measures the round, not a slow worker's start-up)."""
    deadline = time.monotonic() + timeout
    while not all(Path(str(out) + ".ready").exists() for out in outs.values()):
        for rank, proc in procs.items():
            assert proc.poll() is None, f"rank {rank} exited:\n{proc.communicate()[0].decode()}"
        assert time.monotonic() < deadline, f"workers not ready in {timeout}s"
        time.sleep(0.05)
    go.touch()


def stop_all(procs: Mapping[Any, subprocess.Popen[bytes]]) -> None:
    """Kill whatever still runs and close the pipes (a failed test leaves nothing behind)."""
    for proc in procs.values():
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()


def load(out: Path) -> dict[str, Any]:
    result: dict[str, Any] = torch.load(out, weights_only=True)
    return result


def run_all(
    world_size: int, address: str, model: str, tmp: Path, *extra: str, timeout: float = 120
) -> list[dict[str, Any]]:
    """Every rank of a world as its own process, to completion; their results, by rank."""
    outs = [tmp / f"rank{r}.pt" for r in range(world_size)]
    procs = {r: launch(r, world_size, address, model, outs[r], *extra) for r in range(world_size)}
    finish(procs, timeout=timeout)
    return [load(out) for out in outs]


if __name__ == "__main__":
    main()
