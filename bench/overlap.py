"""`python -m bench.overlap`: RemoteAdam with gradients streamed during backward, against without.

One `adamd serve --no-shm` process; one client process trains two copies of an MLP (default
4 x 2500x2500 Linear layers, 25M fp32 params, batch 128: backward takes about as long as the
push over loopback here), each on its own model on the server, one with `overlap=True` and one
with `overlap=False`, both `transport="grpc"`, alternating step by step so both see the same
machine. Per step: the time from the end of backward to the end of `step()` (what overlap
shortens), and the whole step (zero_grad + forward + backward + step). Medians after warm-up.
It prints its report section (`python -m bench` runs it at REPORT_ARGV).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from typing import Any

import torch

from .common import adamd_server, python_subprocess_env
from .compose import Section, table


def _mlp(width: int, layers: int) -> torch.nn.Sequential:
    torch.manual_seed(0)
    mods: list[torch.nn.Module] = []
    for _ in range(layers):
        mods += [torch.nn.Linear(width, width), torch.nn.Tanh()]
    return torch.nn.Sequential(*mods)


def worker(address: str, args: argparse.Namespace) -> dict[str, Any]:
    from adamd.client import RemoteAdam

    torch.set_num_threads(args.threads)
    runs: dict[str, dict[str, Any]] = {}
    for overlap in (True, False):
        net = _mlp(args.width, args.layers)
        opt = RemoteAdam(
            net.parameters(),
            lr=1e-4,
            server=address,
            model=f"overlap-{overlap}",
            transport="grpc",
            wire_dtype=torch.bfloat16 if args.bf16 else None,
            overlap=overlap,
        )
        runs["on" if overlap else "off"] = {"net": net, "opt": opt, "tail": [], "step": []}
    x = torch.randn(args.batch, args.width)
    for i in range(args.warmup + args.steps):
        for run in runs.values():
            t0 = time.perf_counter()
            run["opt"].zero_grad()
            run["net"](x).square().mean().backward()
            t1 = time.perf_counter()
            run["opt"].step()
            t2 = time.perf_counter()
            if i >= args.warmup:
                run["tail"].append((t2 - t1) * 1e3)
                run["step"].append((t2 - t0) * 1e3)
    out = {}
    for key, run in runs.items():
        streamer = run["opt"]._streamer
        out[key] = {
            "tail_ms": statistics.median(run["tail"]),
            "step_ms": statistics.median(run["step"]),
            "streamed": streamer.streamed if streamer is not None else 0,
        }
        run["opt"].close()
    return out


REPORT_ARGV = ["--steps", "6", "--warmup", "2", "--runs", "1"]  # what `python -m bench` runs
QUICK_ARGV = ["--quick"]


def to_section(results: list[dict[str, Any]], args: argparse.Namespace) -> Section:
    params = args.layers * (args.width * args.width + args.width)
    wire = "bf16" if args.bf16 else "fp32"
    cells = []
    for i, r in enumerate(results):
        on, off = r["on"], r["off"]
        for key in ("on", "off"):
            v = r[key]
            ratios = (
                [f"{on['tail_ms'] / off['tail_ms']:.2f}x", f"{on['step_ms'] / off['step_ms']:.2f}x"]
                if key == "on"
                else ["", ""]
            )
            cells.append(
                (i + 1, key, f"{v['tail_ms']:.0f}", f"{v['step_ms']:.0f}", v["streamed"], *ratios)
            )
    head = ("run", "overlap", "tail ms", "step ms", "steps streamed", "tail on/off", "step on/off")
    how = [
        "One `adamd serve --no-shm` process; one client process trains two copies of the MLP,"
        " each on its own model on the server, one with `overlap=True` and one without, both"
        ' `transport="grpc"`, alternating step by step so both see the same machine. *tail*:'
        " from the end of backward to the end of `step()` (what overlap shortens); *step*: zero"
        " grad + forward + backward + step; medians after the warm-up steps.",
    ]
    run = (
        f"MLP of {args.layers} x {args.width}x{args.width} Linear, {params / 1e6:.1f}M params,"
        f" batch {args.batch}, {wire} on the wire; {args.steps} steps after {args.warmup} warm-up,"
        f" {args.runs} client process(es)."
    )
    return Section(
        f"Overlap: gradients streamed during backward ({wire}, loopback gRPC, `--no-shm`)",
        run,
        table(head, cells),
        how,
    )


def measure(args: argparse.Namespace, given: list[str]) -> list[dict[str, Any]]:
    results = []
    with adamd_server(("--no-shm",)) as server:
        for _ in range(args.runs):
            cmd = [sys.executable, "-m", "bench.overlap", *given, "--worker", server.address]
            done = subprocess.run(
                cmd, env=python_subprocess_env(), capture_output=True, text=True, check=True
            )
            results.append(json.loads(done.stdout.strip().splitlines()[-1]))
            print(json.dumps(results[-1]), file=sys.stderr, flush=True)
    return results


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.overlap", description=__doc__)
    p.add_argument("--width", type=int, default=2500)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--threads", type=int, default=1, help="torch threads in the client (1)")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--runs", type=int, default=2, help="client processes, one after another")
    p.add_argument("--bf16", action="store_true", help="bf16 on the wire")
    p.add_argument("--quick", action="store_true", help="smoke run: small model")
    p.add_argument("--worker", metavar="ADDRESS", help=argparse.SUPPRESS)
    return p


def _parse(argv: list[str]) -> argparse.Namespace:
    args = _parser().parse_args(argv)
    if args.quick:
        args.width, args.steps, args.warmup, args.runs = 256, 3, 1, 1
    return args


def section(quick: bool = False) -> Section:
    given = QUICK_ARGV if quick else REPORT_ARGV
    args = _parse(given)
    return to_section(measure(args, given), args)


def main(argv: list[str] | None = None) -> int:
    given = sys.argv[1:] if argv is None else argv
    args = _parse(given)
    if args.worker:
        print(json.dumps(worker(args.worker, args)), flush=True)
        return 0
    print(to_section(measure(args, given), args).markdown())
    return 0


if __name__ == "__main__":
    sys.exit(main())
