"""`adamd demo`: an embedded server plus worker processes training a small model through RemoteAdam.

Each worker fits the same two-layer network to its own shard of a synthetic regression task (a
fixed random "teacher" network plus noise). Sync mode averages the workers' gradients into one
Adam step per round; async mode steps on every push. Progress shows the mean loss per step; the
command exits 0 only if the loss fell below half its first value.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import queue
import socket
import tempfile
import time
from typing import Any

DIM_IN, HIDDEN = 32, 128


def _model() -> Any:
    """Named layers, handed to RemoteAdam as named_parameters(), so the dashboard and `adamd
    inspect` show `hidden.weight`, `out.bias`, ... rather than 0, 1, 2, 3."""
    from collections import OrderedDict

    import torch

    return torch.nn.Sequential(
        OrderedDict(
            hidden=torch.nn.Linear(DIM_IN, HIDDEN),
            act=torch.nn.Tanh(),
            out=torch.nn.Linear(HIDDEN, 1),
        )
    )


def _teacher_data(rank: int, n: int) -> tuple[Any, Any]:
    import torch

    g = torch.Generator().manual_seed(1234)
    w1, w2 = torch.randn(DIM_IN, 16, generator=g), torch.randn(16, 1, generator=g)
    g.manual_seed(rank + 1)
    x = torch.randn(n, DIM_IN, generator=g)
    y = torch.tanh(x @ w1) @ w2 + 0.05 * torch.randn(n, 1, generator=g)
    return x, y


def run_worker(
    address: str,
    model_name: str,
    rank: int,
    world_size: int,
    mode: str,
    steps: int,
    lr: float,
    batch: int,
    out: Any,
) -> None:
    """One training process: local forward/backward, Adam on the server."""
    import torch

    from adamd.client import RemoteAdam, StalePush

    torch.set_num_threads(1)
    torch.manual_seed(0)  # every worker starts from the same init; the server's copy wins anyway
    net = _model()
    opt = RemoteAdam(
        net.named_parameters(),
        lr=lr,
        server=address,
        model=model_name,
        world_size=world_size,
        rank=rank,
        mode=mode,
    )
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps, eta_min=lr * 0.1)
    x, y = _teacher_data(rank, 4096)
    g = torch.Generator().manual_seed(100 + rank)
    dropped = 0  # async: gradients refused as too stale
    try:
        for step in range(steps):
            idx = torch.randint(0, x.shape[0], (batch,), generator=g)
            opt.zero_grad()
            loss = torch.nn.functional.mse_loss(net(x[idx]), y[idx])
            loss.backward()
            opt.report_loss(loss)
            try:
                opt.step()
            except StalePush:
                if mode != "async":
                    raise
                # Async: a worker that fell more than max_staleness versions behind (a busy
                # machine) has its gradient refused; RemoteAdam pulled the current parameters,
                # so the next step starts from them.
                dropped += 1
            sched.step()
            out.put((rank, step, float(loss.detach()), opt.version))
    finally:
        opt.close()
        out.put((rank, -1, float(dropped), opt.version))  # done: how many were dropped


def _free_port(preferred: int) -> int:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", preferred))
            return preferred
        except OSError:
            return 0


def _demo(args: argparse.Namespace) -> int:
    import logging

    from rich.console import Console

    from adamd.server.cli.args import config_from_args

    console = Console(stderr=True)
    logging.getLogger("adamd").setLevel(logging.WARNING)
    logging.getLogger("adamd.server").setLevel(logging.WARNING)
    http_port = args.http_port if args.http_port is not None else _free_port(8080)
    scratch = None
    if args.data_dir is None and "ADAMD_DATA_DIR" not in os.environ:
        # Not ./adamd-data: a server running there would hold it, and old demos would come back.
        scratch = tempfile.TemporaryDirectory(prefix="adamd-demo-")
    config = config_from_args(
        args,
        grpc_port=args.grpc_port or 0,
        http_port=http_port,
        round_timeout_s=args.round_timeout_s or 30.0,
        **({"data_dir": scratch.name} if scratch is not None else {}),
    )
    try:
        return _run(args, config, console)
    finally:
        if scratch is not None:
            scratch.cleanup()


def _run(args: argparse.Namespace, config: Any, console: Any) -> int:
    from adamd.server.cli.daemon import Daemon

    daemon = Daemon(config).start()
    model_name = f"demo-{args.mode}-{args.workers}w"
    if model_name in daemon.registry.names():
        # restored from an earlier demo's final snapshot in the data dir: train from scratch, or
        # the loss starts low and the run "fails" to make it fall
        daemon.registry.delete(model_name)
    console.print(
        f"[bold]adamd demo[/]: server on {daemon.grpc_address}, device {daemon.device}; "
        f"{args.workers} worker(s), {args.mode} mode, {args.steps} steps"
    )
    if daemon.http_url:
        console.print(f"dashboard: {daemon.http_url}/   metrics: {daemon.http_url}/metrics")
    ctx = mp.get_context("spawn")
    results: Any = ctx.Queue()
    procs = [
        ctx.Process(
            target=run_worker,
            args=(
                *(daemon.grpc_address, model_name, r, args.workers, args.mode, args.steps),
                *(args.lr, args.batch, results),
            ),
            daemon=True,
        )
        for r in range(args.workers)
    ]
    for p in procs:
        p.start()
    try:
        first, last, dropped = _follow(args, procs, results, console)
        for p in procs:
            p.join(timeout=30)
        failed = [p.exitcode for p in procs if p.exitcode != 0]
        if args.linger and daemon.http_url:
            console.print(
                f"training done; the server stays up {args.linger:.0f}s for the dashboard"
            )
            time.sleep(args.linger)
    finally:
        daemon.stop()
    if failed or first is None or last is None:
        console.print(f"[red]demo failed[/]: worker exit codes {[p.exitcode for p in procs]}")
        return 1
    fell = last < first * 0.5
    verdict = (
        "[green]loss fell[/]" if fell else "[red]loss did not fall below half its first value[/]"
    )
    stale = f"; {dropped} stale gradient(s) dropped" if dropped else ""
    version = daemon.registry.get(model_name).version
    console.print(f"loss {first:.4f} -> {last:.4f}: {verdict} (final version {version}{stale})")
    return 0 if fell else 1


def _follow(
    args: argparse.Namespace, procs: list[Any], results: Any, console: Any
) -> tuple[float | None, float | None, int]:
    """Show the workers' progress until all are done; returns the first and last mean loss and
    how many stale gradients the workers dropped."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    losses: dict[int, list[float]] = {}
    done = dropped = 0
    first = last = None
    # Without an interactive terminal (a pipe, a CI log, TERM=dumb) rich draws the bar only once,
    # at the end: print plain progress lines as well, about ten per run.
    plain, every, shown = not console.is_interactive, max(1, args.steps // 10), 0
    with Progress(
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]}"),
        TextColumn("v{task.fields[version]}"),
        TimeElapsedColumn(),
        console=console,
    ) as progress:
        task = progress.add_task("training", total=args.steps, loss="-", version=0)
        while done < args.workers:
            try:
                _rank, step, loss, version = results.get(timeout=1.0)
            except queue.Empty:
                if not any(p.is_alive() for p in procs):
                    break
                continue
            if step < 0:  # a worker is done; `loss` carries its count of dropped gradients
                done += 1
                dropped += int(loss)
                continue
            losses.setdefault(step, []).append(loss)
            if len(losses[step]) == args.workers or args.mode == "async":
                mean = sum(losses[step]) / len(losses[step])
                first = mean if first is None else first
                last = mean
                progress.update(
                    task,
                    completed=max(progress.tasks[0].completed, step + 1),
                    loss=f"{mean:.4f}",
                    version=version,
                )
                if plain and step + 1 >= shown + every:
                    shown = step + 1
                    progress.console.print(
                        f"step {shown}/{args.steps}  loss {mean:.4f}  v{version}"
                    )
    return first, last, dropped


def register(sub: Any) -> None:
    from adamd.server.cli.args import add_server_arguments

    p = sub.add_parser(
        "demo",
        help="train a small model with N local workers through an embedded server",
        description="Start an embedded adamd server and N worker processes that train a small model "
        "through RemoteAdam, showing the loss. Exits 0 only if the loss fell below half its first value.",
    )
    add_server_arguments(p, data_dir_default="a temporary directory, removed after the run")
    p.add_argument("--workers", type=int, default=2, help="worker processes (default 2)")
    p.add_argument(
        "--mode",
        choices=["sync", "async"],
        default="sync",
        help="parameter-server mode (default sync)",
    )
    p.add_argument("--steps", type=int, default=200, help="training steps per worker (default 200)")
    p.add_argument("--lr", type=float, default=3e-3, help="Adam learning rate (default 3e-3)")
    p.add_argument("--batch", type=int, default=64, help="batch size per worker (default 64)")
    p.add_argument(
        "--linger",
        type=float,
        default=0.0,
        help="keep the server up this many seconds after training (to look at the dashboard)",
    )
    p.set_defaults(func=_demo)
