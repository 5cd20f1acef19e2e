"""`python -m bench.transfer_memory`: the host memory concurrent pulls make a server hold, with and
without the transfer budget (`--max-transfer-bytes`).

For each server setting, a fresh `adamd serve` process (CPU) holds one model (default 25M fp32
params in 8 tensors); once it is created the process's peak RSS is reset (`/proc/PID/clear_refs`),
then C concurrent pulls (default 50, each on a channel of its own, as C clients would) read the
whole model and discard it, as grpc.aio coroutines in this process. Reported: the server's peak RSS
during the pulls minus its RSS before them, the budget's own peak reservation
(`adamd_transfer_reserved_peak_bytes` from /metrics) and the wall time for all C pulls. Pulls in
fp32 send the parameters themselves (the server holds only frames); pulls with
`wire_dtype=bfloat16` make a converted copy per pull first.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import httpx

from adamd.client import Client
from adamd.v1 import adamd_pb2 as pb

from .common import adamd_server, free_port, make_tensors, parse_size, proc_status_kib, size_label
from .compose import Section, table

MiB = 1 << 20
PULL = "/adamd.v1.Optimizer/PullParams"
MMAP_ENV = "MALLOC_MMAP_THRESHOLD_"


async def _pulls(address: str, count: int, wire_dtype: int) -> tuple[int, float]:
    """`count` concurrent pulls, each on its own channel; (pulls that failed, seconds)."""
    request = pb.PullRequest(model="bench", wire_dtype=wire_dtype).SerializeToString()
    options = [("grpc.max_receive_message_length", 64 * MiB)]

    async def one() -> bool:
        async with grpc.aio.insecure_channel(address, options=options) as ch:
            call = ch.unary_stream(PULL)(request)
            try:
                async for _ in call:
                    pass
            except grpc.aio.AioRpcError as exc:
                print(f"pull failed: {exc.code()} {exc.details()}", file=sys.stderr)
                return False
            return True

    t0 = time.perf_counter()
    ok = await asyncio.gather(*(one() for _ in range(count)))
    return ok.count(False), time.perf_counter() - t0


def _reserved_peak(http_port: int) -> int | None:
    text = httpx.get(f"http://127.0.0.1:{http_port}/metrics", timeout=10).text
    for line in text.splitlines():
        if line.startswith("adamd_transfer_reserved_peak_bytes "):
            return int(float(line.split()[1]))
    return None


def measure(
    n: int, count: int, budget: str, wire_dtype: int, mmap_threshold: int | None = None
) -> dict[str, Any]:
    """One server, one burst. `mmap_threshold`: the server runs with MALLOC_MMAP_THRESHOLD_ set
    (glibc then serves every larger allocation with its own mapping, returned when freed)."""
    http_port = free_port()
    args = ("--max-transfer-bytes", budget, "--http-port", str(http_port), "--no-shm")
    saved = os.environ.get(MMAP_ENV)
    if mmap_threshold is not None:
        os.environ[MMAP_ENV] = str(mmap_threshold)  # inherited by the server process only
    try:
        return _measure(n, count, budget, wire_dtype, args, http_port) | {
            "mmap_threshold": mmap_threshold
        }
    finally:
        if saved is None:
            os.environ.pop(MMAP_ENV, None)
        else:
            os.environ[MMAP_ENV] = saved


def _measure(
    n: int, count: int, budget: str, wire_dtype: int, args: tuple[str, ...], http_port: int
) -> dict[str, Any]:
    with adamd_server(args) as server:
        with Client(server.address, transport="grpc") as c:
            c.create_model("bench", make_tensors(n, seed=1), lr=1e-3)
        time.sleep(1.0)
        before = server.rss_bytes()
        Path(f"/proc/{server.pid}/clear_refs").write_text("5")  # VmHWM := VmRSS
        failed, seconds = asyncio.run(_pulls(server.address, count, wire_dtype))
        peak = proc_status_kib(server.pid, "VmHWM") * 1024
        return {
            "budget": budget,
            "wire": "bf16" if wire_dtype else "fp32",
            "added_mib": (peak - before) / MiB,
            "before_mib": before / MiB,
            "reserved_peak_mib": (_reserved_peak(http_port) or 0) / MiB,
            "failed": failed,
            "seconds": seconds,
        }


def _budget_label(budget: str) -> str:
    if budget == "-1":
        return "none (`-1`)"
    if budget == "0":
        return "default (a quarter of memory)"
    return f"{int(budget) / MiB:.0f} MiB"


REPORT_ARGV = ["--size", "25M", "--pulls", "50"]  # what `python -m bench` runs
QUICK_ARGV = ["--size", "100k", "--pulls", "4", "--budgets", "134217728", "--no-mmap-rows"]


def to_section(n: int, count: int, rows: list[dict[str, Any]]) -> Section:
    cells = [
        (
            _budget_label(r["budget"]),
            r["wire"],
            "-" if r["mmap_threshold"] is None else f"{r['mmap_threshold'] / MiB:g} MiB",
            f"{r['before_mib']:.0f}",
            f"{r['added_mib']:+.0f}",
            f"{r['reserved_peak_mib']:.0f}",
            f"{r['seconds']:.1f}",
            r["failed"],
        )
        for r in rows
    ]
    head = ["--max-transfer-bytes", "wire", "MALLOC_MMAP_THRESHOLD_", "server RSS before, MiB"]
    head += ["added, MiB", "reserved peak, MiB", f"{count} pulls took, s", "failed"]
    body = [
        *table(head, cells),
        "",
        "Without a budget every pull holds its frames at once (on the CPU the parameters are"
        " sent as they are; a bf16 pull converts one chunk at a time into a buffer of its own),"
        " so the memory grows with the number of clients. With one, pulls that do not fit wait"
        " their turn (FIFO) and the added memory stays near the budget. RSS also counts what"
        " the C allocator keeps after a free (the server raises glibc's mmap and trim"
        " thresholds at start, so freed buffers stay with the process for reuse).",
    ]
    how = [
        "A fresh `adamd serve --no-shm` (CPU) per row holds one model; once it is created the"
        " process's peak RSS is reset (`/proc/PID/clear_refs`), then the concurrent pulls (each"
        " on a channel of its own, as separate clients would) read the whole model and discard"
        " it. *Added* is the server's peak RSS during the pulls minus its RSS before them;"
        " *reserved peak* is the most the budget had granted at once"
        " (`adamd_transfer_reserved_peak_bytes` from /metrics).",
    ]
    run = (
        f"{size_label(n)} fp32 params ({n * 4 / MiB:.0f} MiB) in 8 tensors; {count} concurrent"
        " pulls of the whole model per row."
    )
    return Section("Transfer memory: concurrent pulls with and without a budget", run, body, how)


def measure_all(args: argparse.Namespace) -> list[dict[str, Any]]:
    n = parse_size(args.size)
    rows = []
    budgets = [b.strip() for b in args.budgets.split(",")]
    for wire in (0, pb.BFLOAT16):
        runs: list[tuple[str, int | None]] = [(b, None) for b in budgets]
        if not args.no_mmap_rows:
            runs += [(b, MiB) for b in budgets if b != "-1"]
        for budget, mmap in runs:
            row = measure(n, args.pulls, budget, wire, mmap)
            print(row, file=sys.stderr, flush=True)
            rows.append(row)
    return rows


def section(quick: bool = False) -> Section:
    args = _parser().parse_args(QUICK_ARGV if quick else REPORT_ARGV)
    return to_section(parse_size(args.size), args.pulls, measure_all(args))


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bench.transfer_memory", description=__doc__.splitlines()[0]
    )
    p.add_argument("--size", default="25M", help="fp32 params (default 25M)")
    p.add_argument("--pulls", type=int, default=50, help="concurrent pulls (default 50)")
    p.add_argument(
        "--budgets",
        default="-1,134217728",
        help="--max-transfer-bytes values to compare, comma-separated (default -1,134217728)",
    )
    p.add_argument(
        "--no-mmap-rows",
        action="store_true",
        help="leave out the rows with MALLOC_MMAP_THRESHOLD_ set in the server's environment",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    print(to_section(parse_size(args.size), args.pulls, measure_all(args)).markdown())
    return 0


if __name__ == "__main__":
    sys.exit(main())
