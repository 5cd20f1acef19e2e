"""Sharding: aggregate push+step+pull throughput of W workers against S = 1, 2, 4 servers, each
server on its own network host with its link limited by `tc`, so the link (as on a real cluster),
not this machine's 2 cores, is what one server runs out of. Also unthrottled figures, and how
evenly a real model's bytes spread over the shards.

    sudo .venv/bin/python -m bench.sharded [--rate 100mbit] [--params 2M] [--steps 2]

Needs root: each server runs in its own Linux network namespace (`adsh<pid>s<k>`, 10.71.0.0/16),
the workers in another, joined by a bridge in a switch namespace; every server's veth pair is
shaped with a token bucket (`tc qdisc ... tbf`) both ways. Everything is removed at the end.
A worker is `python -m bench.sharded worker SERVERS MODEL RANK W PARAMS STEPS SLICE_BYTES`: it creates or
joins a sync model (world_size W) over SERVERS, then times STEPS rounds of push_grad + pull(out=)
after one warm-up round, and prints one JSON line. The command prints its report section;
`python -m bench` runs it at the defaults.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from adamd.protocol.layout import DEFAULT_SLICE_BYTES, Layout

from .common import parse_size
from .compose import DASH, Row, Section, at_least, judged, table
from .netns import Switch

ROOT = Path(__file__).resolve().parent.parent
ADAMD = str(Path(sys.executable).with_name("adamd"))
PORT = 50051


def _params(n: int) -> dict[str, torch.Tensor]:
    """A model of about n fp32 params: an embedding of half of them (split over the shards when
    above --slice-bytes) and eight equal matrices for the rest."""
    g = torch.Generator().manual_seed(0)
    emb_rows = max(1, n // 2 // 256)
    rest = max(1, (n - emb_rows * 256) // 8 // 256)
    out = {"emb": torch.randn(emb_rows, 256, generator=g)}
    for i in range(8):
        out[f"w{i}"] = torch.randn(rest, 256, generator=g)
    return out


def _worker(
    servers: str, model: str, rank: int, world: int, n: int, steps: int, slice_bytes: int
) -> None:
    from adamd.client import Client

    torch.set_num_threads(1)
    params = _params(n)
    grads = {k: torch.randn_like(v) for k, v in params.items()}
    with Client(servers, transport="grpc", retry_timeout=120, slice_bytes=slice_bytes) as c:
        c.create_model(model, params, world_size=world, exist_ok=True, lr=1e-3)
        version = c.pull(model, out=params).version
        times = []
        for i in range(steps + 1):
            t0 = time.perf_counter()
            r = c.push_grad(model, grads, rank=rank, version=version)
            version = c.pull(model, out=params).version
            assert version == r.version
            if i:  # the first round warms up connections and buffers
                times.append(time.perf_counter() - t0)
    nbytes = sum(t.numel() * t.element_size() for t in params.values())
    print(json.dumps({"rank": rank, "times": times, "bytes": nbytes}))


# --- the network -------------------------------------------------------------------------------


# --- the measurement ---------------------------------------------------------------------------


def _start_servers(
    net: Switch, count: int, tmp: Path
) -> tuple[list[subprocess.Popen[bytes]], list[str]]:
    procs, addresses, logs = [], [], []
    for k in range(count):
        ns, address = net.host(f"s{k}", 10 + k), net.address(10 + k)
        log = tmp / f"server{k}.log"
        logs.append(log)
        with open(log, "wb") as out:
            procs.append(
                subprocess.Popen(
                    [
                        "ip",
                        "netns",
                        "exec",
                        ns,
                        ADAMD,
                        "serve",
                        "--no-shm",
                        "--host",
                        address,
                        "--grpc-port",
                        str(PORT),
                        "--http-port",
                        "-1",
                        "--data-dir",
                        str(tmp / f"d{k}"),
                        "--device",
                        "cpu",
                        "--snapshot-every-s",
                        "0",
                        "--grpc-workers",
                        "2",
                    ],
                    stdout=out,
                    stderr=subprocess.STDOUT,
                )
            )
        addresses.append(f"{address}:{PORT}")
    deadline = time.monotonic() + 300
    for log in logs:
        while "adamd serving gRPC" not in log.read_text():
            if time.monotonic() > deadline:
                raise RuntimeError(f"server did not start: {log.read_text()}")
            time.sleep(0.1)
    return procs, addresses


def _round(
    worker_ns: str,
    servers: Sequence[str],
    model: str,
    world: int,
    n: int,
    steps: int,
    slice_bytes: int,
) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    procs = [
        subprocess.Popen(
            [
                "ip",
                "netns",
                "exec",
                worker_ns,
                sys.executable,
                "-m",
                "bench.sharded",
                "worker",
                ",".join(servers),
                model,
                str(r),
                str(world),
                str(n),
                str(steps),
                str(slice_bytes),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
            cwd=ROOT,
        )
        for r in range(world)
    ]
    rows = []
    for p in procs:
        out, err = p.communicate(timeout=1800)
        if p.returncode:
            raise RuntimeError(f"worker failed: {err.decode()[-3000:]}")
        rows.append(json.loads(out.decode().strip().splitlines()[-1]))
    per_round = min(sum(r["times"]) / len(r["times"]) for r in rows)  # mean round, fastest rank
    moved = 2 * world * rows[0]["bytes"]  # every worker pushes a gradient and pulls the params
    return {"servers": len(servers), "round_s": per_round, "mb_per_s": moved / per_round / 1e6}


def balance(shards: Sequence[int], slice_bytes: int = DEFAULT_SLICE_BYTES) -> list[dict]:
    """Per-shard bytes of a GPT-2 small sized transformer (a 50257 x 768 token embedding)."""
    d, vocab, layers = 768, 50257, 12
    spec: dict[str, tuple[tuple[int, ...], torch.dtype]] = {
        "wte": ((vocab, d), torch.float32),
        "wpe": ((1024, d), torch.float32),
    }
    for i in range(layers):
        for name, shape in (
            ("ln1", (d,)),
            ("qkv", (d, 3 * d)),
            ("qkv_b", (3 * d,)),
            ("proj", (d, d)),
            ("ln2", (d,)),
            ("fc", (d, 4 * d)),
            ("fc_b", (4 * d,)),
            ("out", (4 * d, d)),
        ):
            spec[f"h{i}.{name}"] = (shape, torch.float32)
    rows = []
    for s in shards:
        layout = Layout.plan([f"s{k}" for k in range(s)], spec, [list(spec)], slice_bytes)
        loads = layout.loads()
        sliced = sum(1 for p in layout.params.values() if p.sliced)
        rows.append(
            {
                "servers": s,
                "max_mb": max(loads) / 1e6,
                "min_mb": min(loads) / 1e6,
                "max_over_min": max(loads) / min(loads),
                "sliced_tensors": sliced,
            }
        )
    return rows


def run(
    rate: str,
    n: int,
    steps: int,
    world: int,
    counts: Sequence[int],
    slice_bytes: int,
    unthrottled: bool = True,
) -> dict:
    import tempfile

    net = Switch.create(f"adsh{os.getpid() % 100000}", 1 + (os.getpid() + 7) % 250)
    procs: list[subprocess.Popen[bytes]] = []
    try:
        with tempfile.TemporaryDirectory(prefix="adamd-bench-shard-") as tmp:
            procs, addresses = _start_servers(net, max(counts), Path(tmp))
            worker_ns = net.host("w", 100)
            results: dict[str, list] = {}
            links = [(f"throttled {rate}", rate)] + ([("unthrottled", None)] if unthrottled else [])
            for label, limit in links:
                for k in range(max(counts)):
                    net.shape(f"s{k}", limit)
                rows = []
                for s in counts:
                    model = f"m-{'t' if limit else 'u'}{s}"
                    rows.append(
                        _round(worker_ns, addresses[:s], model, world, n, steps, slice_bytes)
                    )
                    print(label, rows[-1], flush=True)
                results[label] = rows
            return results
    finally:
        for p in procs:
            p.kill()
            p.wait()
        net.close()


REPORT_ARGV: list[str] = []  # the defaults: what `python -m bench` runs
QUICK_ARGV = [
    "--params", "200k", "--steps", "1", "--servers", "1,2", "--workers", "2", "--no-unthrottled"
]  # fmt: skip
UNSLICED = 1 << 62  # a slice threshold no tensor reaches: every tensor whole on one shard


def _rate_bytes(rate: str) -> float:
    """tc's rate ("100mbit", "1gbit") in bytes per second."""
    units = {"kbit": 1e3, "mbit": 1e6, "gbit": 1e9}
    unit = next(u for u in units if rate.endswith(u))
    return float(rate[: -len(unit)]) * units[unit] / 8


def headline_rows(results: dict, args: argparse.Namespace) -> list[Row]:
    rows = results.get(f"throttled {args.rate}") or []
    if not rows:
        return [Row("sharding", "throughput, S servers on throttled links", verdict="not measured")]
    base, link = rows[0]["mb_per_s"], 2 * _rate_bytes(args.rate) / 1e6  # both ways
    b = rows[0]["servers"]  # the fewest servers run: the baseline (S=1 in the report)
    out = []
    for r in rows:
        s = r["servers"]
        out.append(
            judged(
                "sharding",
                f"throughput, S={s} server(s), W={args.workers} workers, links {args.rate}"
                " each way",
                f"{r['mb_per_s']:.1f} MB/s",
                f"{base:.1f} MB/s (S={b})",
                f"{s * link:.1f} MB/s (S links, both ways)",
                r["mb_per_s"] / base,
                DASH if s == b else f">= {0.8 * s / b:.1f}x (0.8 x S{'' if b == 1 else f'/{b}'})",
                None if s == b else at_least(0.8 * s / b),
            )
        )
    return out


def _tables(results: dict) -> list[str]:
    lines: list[str] = []
    for label, rows in results.items():
        base = rows[0]["mb_per_s"]
        cells = [
            (
                r["servers"],
                f"{r['round_s']:.3f}",
                f"{r['mb_per_s']:.1f}",
                f"{r['mb_per_s'] / base:.2f}",
            )
            for r in rows
        ]
        lines += [
            f"### {label}",
            "",
            *table(("servers", "round (s)", "MB/s moved", "x S=1"), cells),
            "",
        ]
    sliced, whole = balance([2, 4, 8]), balance([2, 4, 8], UNSLICED)
    balance_cells = [
        (
            a["servers"],
            f"{a['max_mb']:.1f}",
            f"{a['min_mb']:.1f}",
            f"{a['max_over_min']:.3f}",
            a["sliced_tensors"],
            f"{b['max_over_min']:.2f}",
        )
        for a, b in zip(sliced, whole)
    ]
    head = ("servers", "max MB", "min MB", "max/min", "sliced tensors", "max/min unsliced")
    return [
        *lines,
        "### Load balance (GPT-2 small shapes, default 4 MiB slices)",
        "",
        *table(head, balance_cells),
    ]


def _why(results: dict, args: argparse.Namespace) -> list[str]:
    """Mechanisms, with the figures of this run."""
    free = results.get("unthrottled") or []
    cpu = f": {free[0]['mb_per_s']:.0f} MB/s at S=1 in this run" if free else ""
    return [
        f"- **Throttled** links ({args.rate} each way) make each server's link the bottleneck,"
        " as on a cluster; they are slower than a real NIC because this machine's cores move"
        f" only so much through Python gRPC in all (the unthrottled rows{cpu}): with faster links"
        " the servers' links would outrun the CPU and the rows would measure the cores again. A"
        " round overlaps one worker's next push with another's pull, so a link carries both"
        " directions at once.",
        "- **Unthrottled** (veths with no link limit): all servers and workers share this"
        " machine's cores, so the CPU (Python gRPC framing and copies), not any link, is the"
        " limit, and more server processes on the same cores cannot raise it. On real hosts each"
        " server brings its own cores and NIC, which is what the throttled rows model.",
        "- **Balance**: tensors above the slice threshold are split over the shards, so one large"
        " embedding does not pin a shard (the unsliced column: every tensor whole on one shard).",
    ]


HOW = [
    "Each server runs in its own Linux network namespace, the workers in another, joined by a"
    " bridge in a switch namespace; every server's veth pair is shaped with a token bucket"
    " (`tc qdisc ... tbf`) both ways. A round is push_grad + pull(out=) by every worker of a"
    " sync model (world_size W) sharded over the S servers; the figure is the mean round of the"
    " fastest rank over the timed rounds after one warm-up round, and throughput counts both"
    " directions (W pushes and W pulls of the model per round).",
]


def to_section(results: dict, args: argparse.Namespace) -> Section:
    run = (
        f"Model: {args.params} fp32 params (half in one embedding, sliced); slice_bytes"
        f" {args.slice_bytes}; W={args.workers} workers; S = {args.servers}; {args.steps} timed"
        " sync rounds after one warm-up."
    )
    body = [*_tables(results), "", *_why(results, args)]
    return Section(
        f"Sharding: W={args.workers} workers, S servers on separate network hosts",
        run,
        body,
        HOW,
        headline_rows(results, args),
    )


def measure(args: argparse.Namespace) -> dict:
    return run(
        args.rate,
        parse_size(args.params),
        args.steps,
        args.workers,
        [int(x) for x in args.servers.split(",")],
        parse_size(args.slice_bytes),
        unthrottled=not args.no_unthrottled,
    )


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.sharded")
    p.add_argument("--rate", default="100mbit", help="tc rate of each server's link, each way")
    p.add_argument("--params", default="2M")
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--servers", default="1,2,4")
    p.add_argument("--slice-bytes", default="1M", help="tensors above it are split over shards")
    p.add_argument("--balance-only", action="store_true")
    p.add_argument("--no-unthrottled", action="store_true", help="only the throttled rows")
    return p


def section(quick: bool = False) -> Section:
    from .two_host import namespace_problem

    if problem := namespace_problem():
        raise SystemExit(f"bench.sharded needs network namespaces: {problem} (run as root)")
    args = _parser().parse_args(QUICK_ARGV if quick else REPORT_ARGV)
    return to_section(measure(args), args)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["worker"]:
        s, m, r, w, n, k, b = argv[1:8]
        _worker(s, m, int(r), int(w), int(n), int(k), int(b))
        return 0
    args = _parser().parse_args(argv)
    results = {} if args.balance_only else measure(args)
    print(to_section(results, args).markdown())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
