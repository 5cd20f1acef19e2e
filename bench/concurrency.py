"""`python -m bench.concurrency`: what waits that hold no thread buy, against an `adamd serve` process.

1. Many sync workers: one model with world_size W (default 512), W concurrent workers as grpc.aio
   coroutines spread over a few processes, R rounds each (default 20). Reports rounds completed,
   partial rounds (a round that stepped without every rank: must be 0) and round times.
2. Stalled streams: S push streams (default 1000) that send a header and then nothing. Meanwhile a
   normal client's push + pull latency (p50/p99) is measured and compared with the same client on
   the idle server; then the stalled streams must be ended by the server's idle deadline with
   DEADLINE_EXCEEDED and their staging buffers freed.

Defaults are the targets' sizes (what `python -m bench` runs); `--quick` is a smoke run. It
prints its report section. Workers use the raw frame codec
(adamd.protocol) over grpc.aio channels, as a light client would.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import statistics
import subprocess
import sys
import time
import uuid
from typing import Any

import grpc
import grpc.aio
import httpx
import torch

from adamd.client import Client
from adamd.protocol.frames import encode_frame, iter_frames, spec_of
from adamd.v1 import adamd_pb2 as pb

from .common import adamd_server, free_port, python_subprocess_env
from .compose import Section

PUSH = "/adamd.v1.Optimizer/PushGrad"


def _push_frames(model: str, grads: dict[str, torch.Tensor], **fields: Any) -> list[bytes]:
    header = pb.PushHeader(
        model=model,
        grads=[spec_of(n, t) for n, t in grads.items()],
        push_id=uuid.uuid4().hex,
        **fields,
    )
    return list(iter_frames(header.SerializeToString(), list(grads.values())))


# --- 1. many sync workers -----------------------------------------------------------------------


async def _sync_workers(address: str, model: str, first: int, count: int, rounds: int) -> dict:
    grads = {"w": torch.full((1024,), 1e-3)}
    async with grpc.aio.insecure_channel(address) as ch:
        push = ch.stream_unary(PUSH, response_deserializer=pb.PushReply.FromString)

        async def worker(rank: int) -> tuple[int, list[float]]:
            version, partial, ends = 0, 0, []
            for _ in range(rounds):
                reply = await push(iter(_push_frames(model, grads, rank=rank, version=version)))
                version = reply.version
                partial += reply.partial
                ends.append(time.perf_counter())
            return partial, ends

        results = await asyncio.gather(*(worker(r) for r in range(first, first + count)))
    ends = results[0][1]
    return {
        "partial": sum(p for p, _ in results),
        "pushes": count * rounds,
        "round_s": [b - a for a, b in itertools.pairwise(ends)],
    }


def measure_sync(address: str, world: int, rounds: int, procs: int) -> dict:
    model = f"sync-{world}"
    with Client(address) as c:
        c.create_model(model, {"w": torch.zeros(1024)}, world_size=world, lr=1e-3)
    per = world // procs
    t0 = time.perf_counter()
    children = [
        subprocess.Popen(
            [sys.executable, "-m", "bench.concurrency", "--worker", address, model,
             str(i * per), str(per if i < procs - 1 else world - i * per), str(rounds)],
            stdout=subprocess.PIPE,
            env=python_subprocess_env(),
        )
        for i in range(procs)
    ]  # fmt: skip
    outs = [json.loads(p.communicate(timeout=1200)[0]) for p in children]
    wall = time.perf_counter() - t0
    with Client(address) as c:
        version = c.describe(model).version
    rounds_s = outs[0]["round_s"]
    return {
        "world_size": world,
        "rounds": rounds,
        "versions_reached": version,
        "partial_replies": sum(o["partial"] for o in outs),
        "pushes": sum(o["pushes"] for o in outs),
        "wall_s": wall,
        "round_ms_median": 1e3 * statistics.median(rounds_s) if rounds_s else None,
        "round_ms_max": 1e3 * max(rounds_s) if rounds_s else None,
    }


# --- 2. stalled streams -------------------------------------------------------------------------


def _latencies(address: str, model: str, grads: dict[str, torch.Tensor], reps: int) -> list[float]:
    out = []
    with Client(address, transport="grpc") as c:
        for _ in range(reps):
            t0 = time.perf_counter()
            c.push_grad(model, grads)
            c.pull_params(model)
            out.append(time.perf_counter() - t0)
    return out


def _p(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


async def _stall(address: str, model: str, streams: int) -> dict[str, int]:
    """Open `streams` pushes that send their header and then nothing; tell the parent once they
    are open (a line on stdout), and return how each ended."""
    header = pb.PushHeader(model=model, grads=[spec_of("w", torch.zeros(4096))])
    release = asyncio.Event()
    async with grpc.aio.insecure_channel(address) as ch:
        push = ch.stream_unary(PUSH, response_deserializer=pb.PushReply.FromString)

        async def one() -> str:
            header.push_id = uuid.uuid4().hex
            frame = encode_frame(header.SerializeToString())

            async def requests() -> Any:
                yield frame
                await release.wait()  # never set: the server's idle deadline ends the stream

            try:
                await push(requests())
                return "OK"
            except grpc.aio.AioRpcError as err:
                return str(err.code().name)

        tasks = [asyncio.ensure_future(one()) for _ in range(streams)]
        await asyncio.sleep(2.0)  # let every header reach the server
        print("opened", flush=True)
        codes = await asyncio.gather(*tasks)
    counts: dict[str, int] = {}
    for code in codes:
        counts[code] = counts.get(code, 0) + 1
    return counts


def _staging(http: str, model: str) -> int:
    return int(httpx.get(f"{http}/v1/models/{model}").json()["memory"]["staging"])


def measure_stalled(address: str, http: str, streams: int, reps: int, n: int) -> dict:
    grads = {"w": torch.randn(n) * 1e-3}
    with Client(address) as c:
        c.create_model("normal", {"w": torch.zeros(n)}, mode="async", lr=1e-3)
        c.create_model("stall", {"w": torch.zeros(4096)}, mode="async", lr=1e-3)
    _latencies(address, "normal", grads, 5)  # warm-up
    idle = _latencies(address, "normal", grads, reps)
    staller = subprocess.Popen(
        [sys.executable, "-m", "bench.concurrency", "--stall", address, "stall", str(streams)],
        stdout=subprocess.PIPE,
        text=True,
        env=python_subprocess_env(),
    )
    assert staller.stdout is not None
    assert staller.stdout.readline().strip() == "opened"
    t_open = time.monotonic()
    staging_stalled = _staging(http, "stall")
    busy = _latencies(address, "normal", grads, reps)
    counts = json.loads(staller.stdout.readline())
    ended_after = time.monotonic() - t_open
    staller.wait(timeout=60)
    # Ended streams give their buffers back to the model's pool at once; idle pool sets are
    # then trimmed within two trim windows (10 s each). Poll until staging has fallen.
    t_end, staging_after = time.monotonic(), _staging(http, "stall")
    while staging_after >= staging_stalled and time.monotonic() - t_end < 45:
        time.sleep(0.5)
        staging_after = _staging(http, "stall")
    return {
        "streams": streams,
        "params": n,
        "idle_p50_ms": 1e3 * _p(idle, 0.5),
        "idle_p99_ms": 1e3 * _p(idle, 0.99),
        "stalled_p50_ms": 1e3 * _p(busy, 0.5),
        "stalled_p99_ms": 1e3 * _p(busy, 0.99),
        "p99_ratio": _p(busy, 0.99) / _p(idle, 0.99),
        "stalled_ended": counts,
        "ended_within_s": ended_after,
        "staging_bytes_while_stalled": staging_stalled,
        "staging_bytes_after": staging_after,
        "trimmed_after_s": time.monotonic() - t_end,
    }


def to_section(sync: dict, stalled: dict) -> Section:
    """The report section: what was run, the figures, and the targets."""
    no_partial = sync["partial_replies"] == 0 and sync["versions_reached"] == sync["rounds"]
    ended = stalled["stalled_ended"].get("DEADLINE_EXCEEDED", 0) == stalled["streams"]
    freed = stalled["staging_bytes_after"] < stalled["staging_bytes_while_stalled"]
    body = [
        f"- **{'met' if no_partial else 'NOT met'}**: {sync['world_size']} concurrent sync"
        f" workers complete {sync['rounds']} rounds with no partial round:"
        f" {sync['versions_reached']} versions, {sync['partial_replies']} partial replies out of"
        f" {sync['pushes']} pushes; round median {sync['round_ms_median']:.0f} ms, slowest"
        f" {sync['round_ms_max']:.0f} ms; {sync['wall_s']:.1f} s wall with process start-up"
        f" ({sync['procs']} worker processes of grpc.aio coroutines).",
        f"- **{'met' if stalled['p99_ratio'] < 3 else 'NOT met'}**: with {stalled['streams']}"
        " stalled push streams open, a normal client's push + pull"
        f" ({stalled['params']:,} fp32 params, gRPC) p99 {stalled['stalled_p99_ms']:.1f} ms"
        f" vs {stalled['idle_p99_ms']:.1f} ms idle = {stalled['p99_ratio']:.2f}x (target < 3x);"
        f" p50 {stalled['stalled_p50_ms']:.1f} vs {stalled['idle_p50_ms']:.1f} ms.",
        f"- **{'met' if ended and freed else 'NOT met'}**: the stalled streams were ended by the"
        f" idle deadline: {stalled['stalled_ended']} within {stalled['ended_within_s']:.1f} s of"
        f" opening; staging {stalled['staging_bytes_while_stalled'] / 2**20:.1f} MiB while"
        f" stalled, {stalled['staging_bytes_after'] / 2**20:.2f} MiB"
        f" {stalled['trimmed_after_s']:.1f} s after they ended (idle buffer sets are trimmed"
        " within two 10 s windows).",
    ]
    how = [
        "One `adamd serve` process with default flags but `--stream-idle-s"
        f" {stalled['idle_s']:g}`. Sync workers use the raw frame codec (adamd.protocol) over"
        " grpc.aio channels, as coroutines spread over a few processes; a partial round is one"
        " that stepped without every rank. Stalled streams send a push header and then nothing;"
        " the normal client's push + pull latency is measured with them open and on the idle"
        " server, and the staging bytes come from the model's HTTP status (`/v1/models/NAME`).",
    ]
    run = (
        f"World size {sync['world_size']}, {sync['rounds']} rounds, {sync['procs']} worker"
        f" processes; {stalled['streams']} stalled streams."
    )
    return Section("Concurrency: waits that hold no thread", run, body, how)


def measure(args: argparse.Namespace) -> tuple[dict, dict]:
    http_port = free_port()
    server_args = ("--http-port", str(http_port), "--stream-idle-s", str(args.idle_s))
    with adamd_server(server_args) as server:
        http = f"http://127.0.0.1:{http_port}"
        sync = measure_sync(server.address, args.world, args.rounds, args.procs)
        print(json.dumps({"sync": sync}), flush=True)
        stalled = measure_stalled(server.address, http, args.streams, args.reps, args.params)
        print(json.dumps({"stalled": stalled}), flush=True)
    sync["procs"], stalled["idle_s"] = args.procs, args.idle_s
    return sync, stalled


def _quick(args: argparse.Namespace) -> None:
    args.world, args.rounds, args.procs, args.streams, args.reps = 16, 3, 2, 20, 20
    args.params, args.idle_s = 4096, 2.0


def section(quick: bool = False) -> Section:
    """Measured at the targets' sizes (the defaults), or a smoke run's."""
    args = _parser().parse_args(["--quick"] if quick else [])
    if quick:
        _quick(args)
    return to_section(*measure(args))


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.concurrency", description=__doc__)
    p.add_argument("--world", type=int, default=512, help="sync world size (default 512)")
    p.add_argument("--rounds", type=int, default=20, help="sync rounds (default 20)")
    p.add_argument("--procs", type=int, default=4, help="worker processes (default 4)")
    p.add_argument("--streams", type=int, default=1000, help="stalled streams (default 1000)")
    p.add_argument("--reps", type=int, default=200, help="latency samples (default 200)")
    p.add_argument("--params", type=int, default=1 << 20, help="normal model size (default 1M)")
    p.add_argument("--idle-s", type=float, default=20.0, help="server --stream-idle-s (20)")
    p.add_argument("--quick", action="store_true", help="smoke run: small numbers")
    p.add_argument("--worker", nargs=5, metavar="ARG", help=argparse.SUPPRESS)
    p.add_argument("--stall", nargs=3, metavar="ARG", help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.worker:
        address, model, first, count, rounds = args.worker
        out = asyncio.run(_sync_workers(address, model, int(first), int(count), int(rounds)))
        print(json.dumps(out), flush=True)
        return 0
    if args.stall:
        address, model, streams = args.stall
        print(json.dumps(asyncio.run(_stall(address, model, int(streams)))), flush=True)
        return 0
    if args.quick:
        _quick(args)
    print(to_section(*measure(args)).markdown())
    return 0


if __name__ == "__main__":
    sys.exit(main())
