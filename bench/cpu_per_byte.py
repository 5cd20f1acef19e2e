"""`python -m bench.cpu_per_byte`: CPU, page faults and time per push and pull over loopback gRPC.

One `adamd serve --no-shm` process per allocator setting (glibc thresholds raised in-process, the
default, or left alone with ADAMD_MALLOC_TUNE=0, client and server alike); a client process
pushes a model's gradients (world_size 1: each push also steps) and pulls its parameters into
preallocated tensors (RemoteAdam's pull), fp32 and bf16 on the wire, at several chunk sizes,
interleaved so every variant sees the same machine. Per operation: wall time, client CPU
(user+system, all threads), server CPU, and minor page faults on either side (ru_minflt and
/proc/PID/stat). Medians over the reps; the settings alternate `--rounds` times. It prints
its report section (`python -m bench` runs it at REPORT_ARGV).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from .common import adamd_server, python_subprocess_env
from .compose import Section

CHUNKS = (256 << 10, 1 << 20, (4 << 20) - (64 << 10))
_TICK = os.sysconf("SC_CLK_TCK")


def _proc(pid: int) -> tuple[int, float]:
    """(minor faults, CPU seconds) of process `pid`."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[7]), (int(fields[11]) + int(fields[12])) / _TICK


def _self() -> tuple[int, float]:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_minflt, r.ru_utime + r.ru_stime


def _measure(fn: Any, server_pid: int) -> dict[str, float]:
    c0, s0 = _self(), _proc(server_pid)
    t0 = time.perf_counter()
    fn()
    wall = time.perf_counter() - t0
    c1, s1 = _self(), _proc(server_pid)
    return {
        "ms": wall * 1e3,
        "client_cpu_ms": (c1[1] - c0[1]) * 1e3,
        "server_cpu_ms": (s1[1] - s0[1]) * 1e3,
        "client_faults": c1[0] - c0[0],
        "server_faults": s1[0] - s0[0],
    }


def worker(address: str, server_pid: int, numel: int, reps: int, warmup: int) -> dict[str, Any]:
    from adamd.client import Client
    from adamd.protocol.allocator import tune_malloc

    shapes = [numel // 4] * 4
    params = {f"p{i}": torch.randn(n) * 0.01 for i, n in enumerate(shapes)}
    grads = {k: torch.randn_like(v) * 1e-3 for k, v in params.items()}
    out = {k: torch.empty_like(v) for k, v in params.items()}
    clients = {c: Client(address, chunk_bytes=c, transport="grpc") for c in CHUNKS}
    first = next(iter(clients.values()))
    first.create_model("m", params, lr=1e-3, fused=True)
    samples: dict[str, list[dict[str, float]]] = {}
    for i in range(warmup + reps):
        for chunk, c in clients.items():
            for wire in (None, torch.bfloat16):
                tag = f"{chunk}/{'bf16' if wire else 'fp32'}"
                push = _measure(
                    lambda c=c, w=wire: c.push_grad("m", grads, wire_dtype=w), server_pid
                )
                pull = _measure(lambda c=c, w=wire: c.pull("m", out=out, wire_dtype=w), server_pid)
                if i >= warmup:
                    samples.setdefault("push " + tag, []).append(push)
                    samples.setdefault("pull " + tag, []).append(pull)
    for c in clients.values():
        c.close()
    result = {
        key: {k: statistics.median(s[k] for s in runs) for k in runs[0]}
        for key, runs in samples.items()
    }
    return {"tuned": tune_malloc(), "results": result}


def _run_setting(tuned: bool, args: argparse.Namespace) -> dict[str, Any]:
    env = python_subprocess_env()
    env["ADAMD_MALLOC_TUNE"] = "1" if tuned else "0"
    saved = os.environ.get("ADAMD_MALLOC_TUNE")
    os.environ["ADAMD_MALLOC_TUNE"] = env["ADAMD_MALLOC_TUNE"]  # the server inherits it
    try:
        with adamd_server(("--no-shm",)) as server:
            cmd = [sys.executable, "-m", "bench.cpu_per_byte", "--worker", server.address]
            cmd += [str(server.pid), str(args.numel), str(args.reps), str(args.warmup)]
            done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
    finally:
        if saved is None:
            os.environ.pop("ADAMD_MALLOC_TUNE", None)
        else:
            os.environ["ADAMD_MALLOC_TUNE"] = saved
    return json.loads(done.stdout.strip().splitlines()[-1])


def _body(rows: dict[str, dict[str, dict[str, float]]]) -> list[str]:
    lines = [
        "| op | chunk | wire | malloc | ms | client CPU ms | server CPU ms | client faults"
        " | server faults |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for key in rows["default"]:
        op, rest = key.split(" ")
        chunk, wire = rest.split("/")
        for setting in ("default", "tuned"):
            r = rows[setting][key]
            lines.append(
                f"| {op} | {int(chunk) >> 10} KiB | {wire} | {setting} | {r['ms']:.0f}"
                f" | {r['client_cpu_ms']:.0f} | {r['server_cpu_ms']:.0f}"
                f" | {r['client_faults']:.0f} | {r['server_faults']:.0f} |"
            )
    lines += ["", "Ratios (tuned / default malloc, same chunk and wire; < 1 is better):", ""]
    for key in rows["default"]:
        d, t = rows["default"][key], rows["tuned"][key]
        op, rest = key.split(" ")
        chunk, wire = rest.split("/")
        lines.append(
            f"- {op} {int(chunk) >> 10} KiB {wire}: time {t['ms'] / d['ms']:.2f}x, CPU (both"
            f" sides) {_cpu(t) / max(_cpu(d), 1.0):.2f}x, page faults (both sides)"
            f" {_faults(d):.0f} -> {_faults(t):.0f}"
        )
    lines += ["", "Time by chunk size, relative to 1 MiB (tuned malloc):", ""]
    for key in rows["tuned"]:
        op, rest = key.split(" ")
        chunk, wire = rest.split("/")
        base = rows["tuned"][f"{op} {1 << 20}/{wire}"]["ms"]
        lines.append(
            f"- {op} {wire} {int(chunk) >> 10} KiB: {rows['tuned'][key]['ms'] / base:.2f}x"
        )
    return lines


REPORT_ARGV = ["--reps", "3", "--warmup", "1", "--rounds", "1"]  # what `python -m bench` runs
QUICK_ARGV = ["--quick"]
TITLE = "CPU per byte: chunk size and the allocator (loopback gRPC, `--no-shm`)"
HOW = [
    "One `adamd serve --no-shm` process per allocator setting (glibc thresholds raised"
    " in-process, the default, or left alone with `ADAMD_MALLOC_TUNE=0`, client and server"
    " alike); a client process pushes the gradients (world_size 1: each push also steps) and"
    " pulls the parameters into preallocated tensors, fp32 and bf16 on the wire, at each chunk"
    " size, interleaved. Per operation: wall time, client CPU (user+system, all threads), server"
    " CPU and minor page faults on either side (`ru_minflt`, /proc/PID/stat); medians over the"
    " reps, and over the rounds the settings alternate.",
]


def to_section(rows: dict[str, dict[str, dict[str, float]]], args: argparse.Namespace) -> Section:
    run = (
        f"{args.numel / 1e6:g}M params in 4 tensors, {args.reps} reps after {args.warmup}"
        f" warm-up per variant, {args.rounds} round(s) of the two settings."
    )
    return Section(TITLE, run, _body(rows), HOW)


def measure(args: argparse.Namespace) -> dict[str, dict[str, dict[str, float]]]:
    if args.quick:
        args.numel, args.reps, args.warmup, args.rounds = 1_000_000, 2, 1, 1
    runs: dict[str, list[dict[str, dict[str, float]]]] = {"default": [], "tuned": []}
    for _ in range(args.rounds):
        for setting in ("default", "tuned"):
            got = _run_setting(setting == "tuned", args)
            assert got["tuned"] == (setting == "tuned"), got["tuned"]
            runs[setting].append(got["results"])
            print(json.dumps({setting: got["results"]}), file=sys.stderr, flush=True)
    return {k: _merge(v) for k, v in runs.items()}


def section(quick: bool = False) -> Section:
    args = _parser().parse_args(QUICK_ARGV if quick else REPORT_ARGV)
    return to_section(measure(args), args)


def _cpu(r: dict[str, float]) -> float:
    return r["client_cpu_ms"] + r["server_cpu_ms"]


def _faults(r: dict[str, float]) -> float:
    return r["client_faults"] + r["server_faults"]


def _merge(runs: list[dict[str, dict[str, float]]]) -> dict[str, dict[str, float]]:
    """Median across rounds of each figure."""
    return {
        key: {k: statistics.median(r[key][k] for r in runs) for k in runs[0][key]}
        for key in runs[0]
    }


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.cpu_per_byte", description=__doc__)
    p.add_argument("--numel", type=int, default=25_000_000, help="parameters (default 25M)")
    p.add_argument("--reps", type=int, default=5, help="measured reps per variant (default 5)")
    p.add_argument("--warmup", type=int, default=2, help="warm-up reps (default 2)")
    p.add_argument("--rounds", type=int, default=2, help="alternations of the settings (2)")
    p.add_argument("--quick", action="store_true", help="smoke run: 1M params")
    p.add_argument("--worker", nargs=5, metavar="ARG", help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.worker:
        address, pid, numel, reps, warmup = args.worker
        out = worker(address, int(pid), int(numel), int(reps), int(warmup))
        print(json.dumps(out), flush=True)
        return 0
    print(to_section(measure(args), args).markdown())
    return 0


if __name__ == "__main__":
    sys.exit(main())
