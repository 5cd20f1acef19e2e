"""`python -m bench`: measure adamd side by side with its ceilings and its peer, write BENCHMARKS.md.

In one run, for each model size: the raw gRPC bytes ceiling (push, pull), adamd push_grad /
pull_params / RemoteAdam.step() against an `adamd serve` subprocess (with its peak memory), the
server's Adam step against a local fused Adam; then PyTorch's RPC parameter server on every size,
then sync scaling with 1, 2, 4 worker processes. `--quick` is a smoke run (about a minute).
"""

from __future__ import annotations

import argparse
import gc
import shlex
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import TypeVar

from rich.console import Console
from rich.markdown import Markdown
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from . import adamd_runs, peer_rpc, raw_grpc, report, sync_scaling
from .common import FP32, adamd_server, best_of, free_port, parse_size, reps_for, size_label
from .report import RunResult, SizeResult

FULL_SIZES = "1M,10M,25M,100M"
QUICK_SIZES = "1M"
T = TypeVar("T")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    p.add_argument(
        "--sizes", help=f"model sizes in fp32 params (default {FULL_SIZES}; quick: {QUICK_SIZES})"
    )
    p.add_argument(
        "--reps", type=int, help="timed repetitions per figure, best kept (default 5; quick: 2)"
    )
    p.add_argument(
        "--quick", action="store_true", help="smoke run: small sizes, few reps, short scaling"
    )
    p.add_argument(
        "--out",
        type=Path,
        default=Path("BENCHMARKS.md"),
        help="report file (default BENCHMARKS.md)",
    )
    p.add_argument(
        "--scaling-size", help="params of the sync-scaling model (default 10M; quick: 1M)"
    )
    p.add_argument(
        "--workers", default=None, help="sync-scaling worker counts (default 1,2,4; quick: 1,2)"
    )
    p.add_argument("--no-peer", action="store_true", help="skip PyTorch's RPC parameter server")
    p.add_argument("--no-scaling", action="store_true", help="skip sync scaling")
    return p


def _attempt(errors: list[str], what: str, fn: Callable[[], T]) -> T | None:
    """Run one measurement; a failure is recorded in the report instead of ending the run."""
    try:
        return fn()
    except Exception as exc:
        errors.append(f"{what}: {type(exc).__name__}: {str(exc)[:300]}")
        return None


def _raw(r: SizeResult, reps: int) -> None:
    nbytes, reps = FP32 * r.n, reps_for(r.n, reps)
    with raw_grpc.raw_server() as c:
        r.raw_push = best_of(lambda: c.push(nbytes), reps)
        r.raw_pull = best_of(lambda: c.pull(nbytes), reps)


def run(args: argparse.Namespace, progress: Progress) -> RunResult:
    sizes = [
        parse_size(s)
        for s in (args.sizes or (QUICK_SIZES if args.quick else FULL_SIZES)).split(",")
    ]
    reps = args.reps or (2 if args.quick else 5)
    workers = [int(w) for w in (args.workers or ("1,2" if args.quick else "1,2,4")).split(",")]
    scaling_n = parse_size(args.scaling_size or ("1M" if args.quick else "10M"))
    rounds = 3 if args.quick else 6
    result = RunResult([SizeResult(n) for n in sizes], reps, scaling_n=scaling_n)
    steps = 3 * len(sizes) + (0 if args.no_peer else 1) + (0 if args.no_scaling else len(workers))
    task = progress.add_task("starting", total=steps)
    errors = result.errors

    def tick(what: str) -> None:
        progress.update(task, description=what)

    for r in result.sizes:
        label = size_label(r.n)
        tick(f"{label}: raw gRPC ceiling")
        _attempt(errors, f"{label} raw gRPC", partial(_raw, r, reps))
        progress.advance(task)
        on_stage = partial(lambda lbl, s: tick(f"{lbl}: {s}"), label)
        r.adamd = _attempt(
            errors,
            f"{label} adamd service",
            partial(adamd_runs.measure_over_service, r.n, reps, on_stage),
        )
        progress.advance(task)
        gc.collect()
        tick(f"{label}: server step vs local fused Adam")
        r.step = _attempt(
            errors,
            f"{label} server step",
            partial(adamd_runs.measure_server_step, r.n, max(reps, 5)),
        )
        progress.advance(task)
        gc.collect()
    if not args.no_peer:
        tick("torch.distributed.rpc parameter server (all sizes)")
        peer = _attempt(errors, "torch RPC PS", partial(peer_rpc.measure, free_port(), reps, sizes))
        tick("torch.distributed.rpc parameter server, TCP only (all sizes)")
        tcp = _attempt(
            errors, "torch RPC PS tcp", partial(peer_rpc.measure, free_port(), reps, sizes, True)
        )
        for r in result.sizes:
            r.peer = (peer or {}).get(r.n)
            r.peer_tcp = (tcp or {}).get(r.n)
        progress.advance(task)
    if not args.no_scaling:
        with adamd_server() as server:
            for w in workers:
                tick(f"sync scaling: {w} worker(s), {size_label(scaling_n)} params")
                row = _attempt(
                    errors,
                    f"sync scaling W={w}",
                    partial(sync_scaling.measure, server.address, w, scaling_n, rounds),
                )
                if row is not None:
                    result.scaling.append(row)
                progress.advance(task)
    tick("done")
    return result


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    console = Console(stderr=True)
    started = time.perf_counter()
    with Progress(
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TimeElapsedColumn(),
        console=console,
    ) as progress:
        result = run(args, progress)
    result.wall_s = time.perf_counter() - started
    result.command = "python -m bench " + shlex.join(argv if argv is not None else sys.argv[1:])
    text = report.render(result)
    if args.out.exists():
        kept = report.kept_sections(args.out.read_text())
        text = "\n\n".join([text.rstrip(), *kept]) + "\n" if kept else text
    args.out.write_text(text)
    rows = [report.ratios(r) for r in result.sizes]
    console.print(
        Markdown(
            "\n".join(
                [
                    "## Ratios",
                    *report.ratio_table(rows),
                    "",
                    "## Targets",
                    *report.target_lines(rows),
                ]
            )
        )
    )
    console.print(f"wrote {args.out} ({result.wall_s:.0f} s)")
    if result.errors:
        console.print(f"[yellow]{len(result.errors)} measurement(s) failed; see {args.out}[/]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
