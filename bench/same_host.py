"""The same-host suite: adamd against its ceilings and its peer on one machine.

For each model size: the raw gRPC bytes ceiling (push, pull), adamd push_grad / pull_params /
RemoteAdam.step() against an `adamd serve` subprocess (with its peak memory), the server's Adam
step against a local fused Adam; PyTorch's RPC parameter server on every size; then sync
scaling with 1, 2, 4 worker processes. `section(quick)` measures and returns the report section.
"""

from __future__ import annotations

import gc
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

from . import adamd_runs, peer_rpc, raw_grpc, sync_scaling
from .adamd_runs import AdamdFigures, StepFigures, gbps
from .common import (
    ADAM_BYTES_PER_PARAM,
    FP32,
    N_TENSORS,
    adamd_server,
    best_of,
    free_port,
    parse_size,
    reps_for,
    size_label,
)
from .compose import DASH, Row, Section, judged
from .sync_scaling import ScalingRow

AREA = "same host"
HEADLINE = 25_000_000  # the headline figures are those at 25M params (or the largest measured)
REPORT = {"sizes": "1M,10M,25M", "reps": 5, "workers": "1,2,4", "scaling": "10M", "rounds": 6}
QUICK = {"sizes": "100k", "reps": 1, "workers": "2", "scaling": "100k", "rounds": 2}
T = TypeVar("T")


@dataclass
class SizeResult:
    n: int
    raw_push: float | None = None
    raw_pull: float | None = None
    adamd: AdamdFigures | None = None
    step: StepFigures | None = None
    peer: float | None = None  # torch RPC PS push+step+pull, seconds
    peer_tcp: float | None = None  # the same with TensorPipe limited to TCP (as across hosts)


@dataclass
class RunResult:
    sizes: list[SizeResult]
    reps: int
    scaling: list[ScalingRow] = field(default_factory=list)
    scaling_n: int = 0
    errors: list[str] = field(default_factory=list)


def _log(what: str) -> None:
    print(f"[bench same host] {what}", file=sys.stderr, flush=True)


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


def _measure_size(r: SizeResult, reps: int, errors: list[str]) -> None:
    label = size_label(r.n)
    _log(f"{label}: raw gRPC ceiling")
    _attempt(errors, f"{label} raw gRPC", lambda: _raw(r, reps))
    r.adamd = _attempt(
        errors,
        f"{label} adamd service",
        lambda: adamd_runs.measure_over_service(r.n, reps, lambda s: _log(f"{label}: {s}")),
    )
    gc.collect()
    _log(f"{label}: server step vs local fused Adam")
    r.step = _attempt(
        errors, f"{label} server step", lambda: adamd_runs.measure_server_step(r.n, max(reps, 5))
    )
    gc.collect()


def measure(settings: dict[str, object], peer: bool = True, scaling: bool = True) -> RunResult:
    """Every figure of the suite at `settings` (REPORT or QUICK's keys)."""
    sizes = [parse_size(s) for s in str(settings["sizes"]).split(",")]
    reps = int(str(settings["reps"]))
    result = RunResult([SizeResult(n) for n in sizes], reps)
    result.scaling_n = parse_size(str(settings["scaling"]))
    errors = result.errors
    for r in result.sizes:
        _measure_size(r, reps, errors)
    if peer:
        _log("torch.distributed.rpc parameter server (all sizes; defaults, then TCP only)")
        rpc = _attempt(errors, "torch RPC PS", lambda: peer_rpc.measure(free_port(), reps, sizes))
        tcp = _attempt(
            errors, "torch RPC PS tcp", lambda: peer_rpc.measure(free_port(), reps, sizes, True)
        )
        for r in result.sizes:
            r.peer, r.peer_tcp = (rpc or {}).get(r.n), (tcp or {}).get(r.n)
    if scaling:
        rounds = int(str(settings["rounds"]))
        with adamd_server() as server:
            for w in (int(x) for x in str(settings["workers"]).split(",")):
                _log(f"sync scaling: {w} worker(s), {size_label(result.scaling_n)} params")
                row = _attempt(
                    errors,
                    f"sync scaling W={w}",
                    lambda w=w: sync_scaling.measure(server.address, w, result.scaling_n, rounds),  # type: ignore[misc]
                )
                if row is not None:
                    result.scaling.append(row)
    return result


def _ms(s: float | None) -> str:
    return DASH if s is None else f"{s * 1e3:.1f}"


def _gb(n: int, s: float | None) -> str:
    v = gbps(n, s)
    return DASH if v is None else f"{v:.2f}"


def _x(v: float | None) -> str:
    return DASH if v is None else f"{v:.2f}x"


def _speed_ratio(ours: float | None, theirs: float | None) -> float | None:
    """Throughput ratio ours/theirs from times (>1: ours faster)."""
    return None if not ours or not theirs else theirs / ours


def _time_ratio(ours: float | None, theirs: float | None) -> float | None:
    """Time ratio ours/theirs (<1: ours faster)."""
    return None if not ours or not theirs else ours / theirs


def _bf16(a: AdamdFigures) -> float | None:
    return a.remote_adam.get("transport=grpc, bf16", a.remote_adam.get("bf16 wire"))


@dataclass
class Ratios:
    n: int
    push: float | None  # adamd push (transport) throughput / raw gRPC push
    push_full: float | None  # adamd push incl. finite check + step / raw gRPC push
    pull: float | None
    step: float | None  # local fused step time / server step time
    round_trip: float | None  # RemoteAdam default time / torch RPC PS time
    round_trip_grpc_bf16: float | None  # RemoteAdam grpc + bf16 wire / RPC PS
    round_trip_grpc_bf16_tcp: float | None  # the same / RPC PS over TCP only
    memory: float | None


def ratios(r: SizeResult) -> Ratios:
    a, s = r.adamd or AdamdFigures(r.n), r.step
    return Ratios(
        n=r.n,
        push=_speed_ratio(a.push_transport, r.raw_push),
        push_full=_speed_ratio(a.push_full, r.raw_push),
        pull=_speed_ratio(a.pull, r.raw_pull),
        step=_speed_ratio(s.server_step, s.local_fused) if s else None,
        round_trip=_time_ratio(a.remote_adam.get("default"), r.peer),
        round_trip_grpc_bf16=_time_ratio(_bf16(a), r.peer),
        round_trip_grpc_bf16_tcp=_time_ratio(_bf16(a), r.peer_tcp),
        memory=a.memory_ratio,
    )


@dataclass(frozen=True)
class Target:
    key: str  # the Ratios field
    label: str
    text: str  # as the headline's target column shows it
    ok: Callable[[float], bool]
    why: str  # the mechanism behind a miss (true of any run; no figures)


TARGETS = {
    t.key: t
    for t in (
        Target(
            "push",
            "push_grad (transport) vs raw gRPC push",
            ">= 0.90x",
            lambda v: v >= 0.9,
            "the raw server drops each chunk it receives, while adamd copies every pushed chunk"
            " into the gradient tensor (Python grpcio hands over a `bytes` object per message, so"
            " that copy cannot be avoided on this path); client, server and grpcio's threads share"
            " the machine's cores. The same-host path (the default transport) skips gRPC.",
        ),
        Target(
            "pull",
            "pull(out=) vs raw gRPC pull",
            ">= 0.90x",
            lambda v: v >= 0.9,
            "the raw pull re-sends one preallocated `bytes` object, while adamd copies the"
            " parameters into fresh chunks on the server and those chunks into `out=` on the"
            " client: two copies per byte the ceiling does not make.",
        ),
        Target(
            "step",
            "server Adam step vs local fused Adam (speed)",
            ">= 0.95x",
            lambda v: v >= 0.95,
            "both are torch's Adam over tensors of the same shapes, timed rep by rep in turn: a"
            " difference is the kernel torch picks for the server's parameter groups, or other"
            " work on the shared cores during one of them.",
        ),
        Target(
            "round_trip",
            "RemoteAdam.step() (default transport) vs torch RPC PS (time)",
            "<= 0.50x",
            lambda v: v <= 0.5,
            "on one host both move tensors through shared memory; adamd's step copies the"
            " gradient into the session's shared-memory file, checks the whole gradient for"
            " inf/nan before it steps (a push is all or nothing), steps, and copies the new"
            " parameters out (the default-transport push and pull columns of the figures), and"
            " the worker's copies and the server's work share the same cores; the RPC"
            " parameter server makes no finite check.",
        ),
        Target(
            "round_trip_grpc_bf16_tcp",
            "RemoteAdam.step() gRPC + bf16 wire vs torch RPC PS over TCP only (time)",
            "< 1.00x",
            lambda v: v < 1.0,
            "bf16 halves the bytes, but each end converts every value, and Python grpcio copies"
            " each chunk on both ends, while TensorPipe's C++ TCP channel sends the tensors from"
            " their own memory; on loopback the CPU, not the link, is the limit.",
        ),
        Target(
            "memory",
            "server peak memory vs 16 B/param",
            "<= 1.20x",
            lambda v: v <= 1.2,
            "the model itself costs 16 B/param (params, exp_avg, exp_avg_sq, one gradient buffer);"
            " above it are gRPC's receive buffers for the chunks in flight and the allocator's"
            " arenas keeping them, which do not grow with the model, so the ratio falls as"
            " models grow.",
        ),
    )
}


def _head(result: RunResult) -> SizeResult:
    return next((r for r in result.sizes if r.n == HEADLINE), max(result.sizes, key=lambda r: r.n))


def headline_rows(result: RunResult) -> list[Row]:
    r = _head(result)
    q, a, s, n = ratios(r), r.adamd or AdamdFigures(r.n), r.step, r.n
    at = f" ({size_label(n)} params)"

    def row(key: str, ours: str, peer: str, limit: str = DASH) -> Row:
        t = TARGETS[key]
        return judged(AREA, t.label + at, ours, peer, limit, getattr(q, key), t.text, t.ok)

    excess = (
        f"{(a.server_peak_grpc - a.server_idle_rss) / n:.1f} B/param"
        if a.server_peak_grpc and a.server_idle_rss
        else DASH
    )
    return [
        row("push", f"{_gb(n, a.push_transport)} GB/s", f"{_gb(n, r.raw_push)} GB/s (raw gRPC)"),
        row("pull", f"{_gb(n, a.pull)} GB/s", f"{_gb(n, r.raw_pull)} GB/s (raw gRPC)"),
        row(
            "step",
            f"{_ms(s.server_step if s else None)} ms",
            f"{_ms(s.local_fused if s else None)} ms (local fused Adam)",
        ),
        row(
            "round_trip",
            f"{_ms(a.remote_adam.get('default'))} ms",
            f"{_ms(r.peer)} ms (torch RPC)",
        ),
        row(
            "round_trip_grpc_bf16_tcp",
            f"{_ms(_bf16(a))} ms",
            f"{_ms(r.peer_tcp)} ms (torch RPC, TCP)",
        ),
        row("memory", excess, DASH, f"{ADAM_BYTES_PER_PARAM} B/param"),
    ]


def target_lines(result: RunResult) -> list[str]:
    """Per target: the sizes where it holds, and for a miss at the headline size, why."""
    rows = [ratios(r) for r in result.sizes]
    head = ratios(_head(result))
    out = []
    for t in TARGETS.values():
        held = [size_label(q.n) for q in rows if (v := getattr(q, t.key)) is not None and t.ok(v)]
        value = getattr(head, t.key)
        line = f"- {t.label} {t.text}: holds at {', '.join(held) or 'no size measured'}"
        if value is not None and not t.ok(value):
            line += f". Missed at {size_label(head.n)} ({value:.2f}x): {t.why}"
        out.append(line + ("" if line.endswith(".") else "."))
    return out


def figures_table(result: RunResult) -> list[str]:
    variants: list[str] = []
    for r in result.sizes:
        for k in r.adamd.remote_adam if r.adamd else {}:
            if k not in variants:
                variants.append(k)
    head = [
        "params",
        "raw gRPC push ms (GB/s)",
        "adamd push transport ms (GB/s)",
        "adamd push full ms (GB/s)",
        "raw gRPC pull ms (GB/s)",
        "adamd pull(out=) ms (GB/s)",
        "adamd push, default transport ms (GB/s)",
        "adamd pull(out=), default transport ms (GB/s)",
        "server step ms",
        "local fused step ms",
        *[f"RemoteAdam.step() {v} ms" for v in variants],
        "torch RPC PS ms",
        "torch RPC PS, TCP only ms",
        "server peak MiB after gRPC / after all (idle MiB; /dev/shm MiB)",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for r in result.sizes:
        a, s, n = r.adamd or AdamdFigures(r.n), r.step, r.n
        cells = [
            size_label(n),
            f"{_ms(r.raw_push)} ({_gb(n, r.raw_push)})",
            f"{_ms(a.push_transport)} ({_gb(n, a.push_transport)})",
            f"{_ms(a.push_full)} ({_gb(n, a.push_full)})",
            f"{_ms(r.raw_pull)} ({_gb(n, r.raw_pull)})",
            f"{_ms(a.pull)} ({_gb(n, a.pull)})",
            f"{_ms(a.push_default)} ({_gb(n, a.push_default)})",
            f"{_ms(a.pull_default)} ({_gb(n, a.pull_default)})",
            _ms(s.server_step if s else None),
            _ms(s.local_fused if s else None),
            *[_ms(a.remote_adam.get(v)) for v in variants],
            _ms(r.peer),
            _ms(r.peer_tcp),
            (
                f"{(a.server_peak_grpc or 0) / 2**20:.0f} / {a.server_peak / 2**20:.0f}"
                f" ({a.server_idle_rss / 2**20:.0f}; {(a.server_shm or 0) / 2**20:.0f})"
                if a.server_peak and a.server_idle_rss
                else DASH
            ),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def ratio_table(rows: Sequence[Ratios]) -> list[str]:
    head = [
        "params",
        "push / raw (transport)",
        "push / raw (full: + check + step)",
        "pull / raw",
        "server step / local fused (speed)",
        "RemoteAdam default / RPC PS (time)",
        "RemoteAdam gRPC+bf16 / RPC PS (time)",
        "RemoteAdam gRPC+bf16 / RPC PS TCP-only (time)",
        "memory / 16 B/param",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for q in rows:
        cells = [
            size_label(q.n),
            _x(q.push),
            _x(q.push_full),
            _x(q.pull),
            _x(q.step),
            _x(q.round_trip),
            _x(q.round_trip_grpc_bf16),
            _x(q.round_trip_grpc_bf16_tcp),
            _x(q.memory),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def scaling_table(result: RunResult) -> list[str]:
    if not result.scaling:
        return ["(not measured)"]
    base = result.scaling[0]
    lines = [
        "| workers | round best ms | round mean ms | aggregate GB/s (best) | aggregate GB/s (mean) | speed-up vs 1 (mean) |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for row in result.scaling:
        speed = row.aggregate_gbps(row.mean_round) / base.aggregate_gbps(base.mean_round)
        lines.append(
            f"| {row.workers} | {_ms(row.best_round)} | {_ms(row.mean_round)} |"
            f" {row.aggregate_gbps(row.best_round):.2f} | {row.aggregate_gbps(row.mean_round):.2f} |"
            f" {speed:.2f}x |"
        )
    return lines


HOW = [
    "- **raw gRPC push / pull**: `bench/raw_grpc.py`, a server process with generic handlers and"
    " identity serializers; the client streams preallocated 4 MiB `bytes` chunks (push, stream-"
    "unary) and the server streams them back (pull, unary-stream). No tensor is touched: the"
    " ceiling for Python grpcio alone.",
    "- **adamd push (transport)**: `Client.push_grad(..., found_inf=True)` against `adamd serve` in"
    " its own process: every gradient byte is streamed into the server's buffers, then the"
    " step is skipped (GradScaler contract). **push (full)** is a normal push: streaming, the"
    " inf/nan check and the Adam step; it is what a worker waits for.",
    "- **adamd pull(out=)**: `Client.pull(model, out=preallocated)`. Push and pull use"
    ' `Client(transport="grpc")`, so they are compared with the gRPC ceiling; the **default'
    " transport** columns repeat push (full) and pull with the Client's default (the same-host"
    " shared-memory path).",
    "- **server step**: the server's own `torch.optim.Adam` (`HostedModel.optimizer.step()`, with"
    " `.grad` set) in an in-process Daemon, interleaved rep by rep with a local"
    " `torch.optim.Adam(fused=True)` over tensors of the same shapes. Ratio: local time /"
    " server time.",
    "- **RemoteAdam.step()**: push + server step + pull into the local parameters, one variant per"
    " transport and wire option.",
    "- **torch RPC PS**: `bench/peer_rpc.py`, two processes, `torch.distributed.rpc` with"
    " TensorPipe (defaults, 4 worker threads): one `rpc_sync` sends the gradients, the server"
    " sets `.grad`, runs fused Adam and returns the parameters. On one host TensorPipe's"
    " defaults move the tensors through shared memory; **TCP only** repeats it with"
    ' `_transports=["uv"], _channels=["basic"]`, what it does between hosts, the peer for'
    " adamd's gRPC path.",
    "- **memory**: the server process's VmHWM (fresh server per size) minus its VmRSS before"
    f" the model was created (interpreter, torch, grpc), divided by {ADAM_BYTES_PER_PARAM}"
    " B/param (params + exp_avg + exp_avg_sq + one gradient buffer), taken after create_model"
    " and the gRPC pushes and pulls; the figures table also gives the peak after every"
    " operation (same-host clients have then each attached a session with its own gradient"
    " file) and the MiB the server's /dev/shm files hold.",
    "- **sync scaling**: mode sync, world_size W, W worker processes each pushing every round as"
    " its own rank over gRPC (push only; the round completes when all W gradients are in,"
    " averaged and stepped); client processes and the server share the machine's cores.",
]


def errors_of(result: RunResult) -> list[str]:
    errors = list(result.errors)
    for r in result.sizes:
        if r.adamd:
            errors += [f"{size_label(r.n)} {e}" for e in r.adamd.errors]
            if r.adamd.leftover_shm_files:
                errors.append(
                    f"{size_label(r.n)}: the server left {r.adamd.leftover_shm_files} file(s) in"
                    " /dev/shm after SIGTERM (removed by the harness)"
                )
    return errors


def to_section(result: RunResult, settings: dict[str, object]) -> Section:
    rows = [ratios(r) for r in result.sizes]
    body = [
        "### Targets",
        "",
        *target_lines(result),
        "",
        "### Ratios",
        "",
        *ratio_table(rows),
        "",
        "### Figures",
        "",
        f"fp32 models of {N_TENSORS} tensors each; ms, and in brackets GB/s of fp32 gradient"
        " (push) or parameter (pull) bytes.",
        "",
        *figures_table(result),
        "",
        f"### Sync scaling ({size_label(result.scaling_n)} params)",
        "",
        *scaling_table(result),
    ]
    if errors := errors_of(result):
        body += ["", "### Errors during the run", "", *[f"- {e}" for e in errors]]
    return Section(
        "Same host",
        f"Model sizes {settings['sizes']} params; every figure the best (minimum) of"
        f" {result.reps} timed repetitions after a warm-up (more, up to 30, for models under 10M"
        f" params); sync scaling with {settings['workers']} workers, {settings['rounds']} rounds."
        " All contenders in the same run.",
        body,
        HOW,
        headline_rows(result),
    )


def section(quick: bool = False) -> Section:
    settings = QUICK if quick else REPORT
    return to_section(measure(settings), settings)
