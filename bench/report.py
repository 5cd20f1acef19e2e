"""Turning measurements into BENCHMARKS.md: machine and versions, figures, ratios, targets.

Everything here formats what `bench.__main__` measured; nothing is measured here.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from .adamd_runs import AdamdFigures, StepFigures, gbps
from .common import ADAM_BYTES_PER_PARAM, N_TENSORS, size_label
from .sync_scaling import ScalingRow

HEADLINE = 25_000_000  # the round-trip target is stated at 25M params
ANALYSIS = Path(__file__).with_name("analysis.md")  # hand-written reasons, copied into the report


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
    wall_s: float = 0.0
    command: str = ""


def machine_info() -> dict[str, str]:
    cpu = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    ram = "unknown"
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                ram = f"{int(line.split()[1]) / 2**20:.1f} GiB"
    except OSError:
        pass
    import torch

    return {
        "cpu": cpu,
        "cores": str(os.cpu_count()),
        "ram": ram,
        "os": platform.platform(),
        "torch threads": str(torch.get_num_threads()),
    }


def versions() -> dict[str, str]:
    out = {"python": sys.version.split()[0]}
    for dist in ("torch", "grpcio", "protobuf", "adamd"):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[dist] = "not installed"
    return out


def _ms(s: float | None) -> str:
    return "—" if s is None else f"{s * 1e3:.1f}"


def _gb(n: int, s: float | None) -> str:
    v = gbps(n, s)
    return "—" if v is None else f"{v:.2f}"


def _x(v: float | None) -> str:
    return "—" if v is None else f"{v:.2f}x"


def _speed_ratio(ours: float | None, theirs: float | None) -> float | None:
    """Throughput ratio ours/theirs from times (>1: ours faster)."""
    return None if not ours or not theirs else theirs / ours


def _time_ratio(ours: float | None, theirs: float | None) -> float | None:
    """Time ratio ours/theirs (<1: ours faster)."""
    return None if not ours or not theirs else ours / theirs


@dataclass
class Ratios:
    n: int
    push: float | None  # adamd push (transport) throughput / raw gRPC push
    push_full: float | None  # adamd push incl. finite check + step / raw gRPC push
    pull: float | None
    step: float | None  # local fused step time / server step time
    round_trip: float | None  # RemoteAdam default time / torch RPC PS time
    round_trip_grpc_bf16: float | None  # RemoteAdam grpc + bf16 wire (or bf16 wire) / RPC PS
    round_trip_grpc_bf16_tcp: float | None  # the same / RPC PS over TCP only
    memory: float | None


def ratios(r: SizeResult) -> Ratios:
    a, s = r.adamd or AdamdFigures(r.n), r.step
    ra = a.remote_adam
    bf16 = ra.get("transport=grpc, bf16", ra.get("bf16 wire"))
    return Ratios(
        n=r.n,
        push=_speed_ratio(a.push_transport, r.raw_push),
        push_full=_speed_ratio(a.push_full, r.raw_push),
        pull=_speed_ratio(a.pull, r.raw_pull),
        step=_speed_ratio(s.server_step, s.local_fused) if s else None,
        round_trip=_time_ratio(ra.get("default"), r.peer),
        round_trip_grpc_bf16=_time_ratio(bf16, r.peer),
        round_trip_grpc_bf16_tcp=_time_ratio(bf16, r.peer_tcp),
        memory=a.memory_ratio,
    )


@dataclass(frozen=True)
class Target:
    label: str
    get: Callable[[Ratios], float | None]
    ok: Callable[[float], bool]
    at_headline_only: bool = False


TARGETS = (
    Target("push_grad (transport) >= 0.9x raw gRPC push", lambda q: q.push, lambda v: v >= 0.9),
    Target("pull_params(out=) >= 0.9x raw gRPC pull", lambda q: q.pull, lambda v: v >= 0.9),
    Target("server step >= 0.95x local fused Adam", lambda q: q.step, lambda v: v >= 0.95),
    Target(
        "RemoteAdam.step() default <= 0.5x torch RPC PS time (25M)",
        lambda q: q.round_trip,
        lambda v: v <= 0.5,
        at_headline_only=True,
    ),
    Target(
        "RemoteAdam.step() gRPC + bf16 wire < 1.0x torch RPC PS time",
        lambda q: q.round_trip_grpc_bf16,
        lambda v: v < 1.0,
    ),
    Target(
        "RemoteAdam.step() gRPC + bf16 wire < 1.0x torch RPC PS over TCP only (cross-host peer)",
        lambda q: q.round_trip_grpc_bf16_tcp,
        lambda v: v < 1.0,
    ),
    Target("server peak memory <= 1.2x (16 B/param)", lambda q: q.memory, lambda v: v <= 1.2),
)


def target_lines(rows: Sequence[Ratios]) -> list[str]:
    """One line per target: its value at the headline size and the sizes where it holds."""
    if not rows:
        return []
    head = next((q for q in rows if q.n == HEADLINE), max(rows, key=lambda q: q.n))
    out = []
    for t in TARGETS:
        value = t.get(head)
        if value is None:
            out.append(f"- **not measured**: {t.label}")
            continue
        verdict = "met" if t.ok(value) else "NOT met"
        where = ""
        if not t.at_headline_only:
            held = [size_label(q.n) for q in rows if (v := t.get(q)) is not None and t.ok(v)]
            where = f"; holds at: {', '.join(held) or 'no size'}"
        out.append(f"- **{verdict}**: {t.label} — {_x(value)} at {size_label(head.n)}{where}")
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
                else "—"
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


def render(result: RunResult) -> str:
    rows = [ratios(r) for r in result.sizes]
    mach, ver = machine_info(), versions()
    now = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    md = [
        "# adamd benchmarks",
        "",
        f"Measured by `{result.command}` on {now} ({result.wall_s:.0f} s). Every figure is the best"
        f" (minimum) of {result.reps} timed repetitions after a warm-up (more, up to 30, for models under"
        " 10M params, whose timings are short), all contenders in the same run:"
        " this machine is shared and noisy, so compare ratios within this file, not absolutes across runs.",
        "",
        "## Machine and versions",
        "",
        *[f"- {k}: {v}" for k, v in mach.items()],
        "- versions: " + ", ".join(f"{k} {v}" for k, v in ver.items()),
        "",
        "## Targets",
        "",
        *target_lines(rows),
        "",
        "### Where a target is missed, and why",
        "",
        ANALYSIS.read_text().rstrip(),
        "",
        "## Ratios",
        "",
        *ratio_table(rows),
        "",
        "## Figures",
        "",
        f"fp32 models of {N_TENSORS} tensors each. GB/s is fp32 bytes of the gradients (push) or"
        " parameters (pull) per second.",
        "",
        *figures_table(result),
        "",
        "## Sync scaling",
        "",
        f"{size_label(result.scaling_n)}-param model, mode sync, world_size W, W worker processes"
        " each pushing every round as its own rank over gRPC (push only; the round completes when all W"
        " gradients are in, averaged and stepped). Client processes and the server share the"
        f" machine's {mach['cores']} cores.",
        "",
        *scaling_table(result),
        "",
        "## How each figure is measured",
        "",
        "- **raw gRPC push / pull**: `bench/raw_grpc.py`, a server process with generic handlers and"
        " identity serializers; the client streams preallocated 4 MiB `bytes` chunks (push, stream-"
        "unary) and the server streams them back (pull, unary-stream). No tensor is touched: the"
        " ceiling for Python grpcio alone.",
        "- **adamd push (transport)**: `Client.push_grad(..., found_inf=True)` against `adamd serve` in"
        " its own process: every gradient byte is streamed into the server's buffers, then the"
        " step is skipped (GradScaler contract). **push (full)** is a normal push: streaming, the"
        " inf/nan check and the Adam step; it is what a worker waits for.",
        "- **adamd pull(out=)**: `Client.pull(model, out=preallocated)`. Push and pull use"
        ' `Client(transport="grpc")` where the Client has that switch, so they are compared with'
        " the gRPC ceiling; the **default transport** columns repeat push (full) and pull with"
        " the Client's default (the same-host shared-memory path when it engages).",
        "- **server step**: the server's own `torch.optim.Adam` (`HostedModel.optimizer.step()`, with"
        " `.grad` set) in an in-process Daemon, interleaved rep by rep with a local"
        " `torch.optim.Adam(fused=True)` over tensors of the same shapes. Ratio: local time /"
        " server time.",
        "- **RemoteAdam.step()**: push + server step + pull into the local parameters, one variant per"
        " option the installed RemoteAdam offers (found with `inspect.signature`).",
        "- **torch RPC PS**: `bench/peer_rpc.py`, two processes, `torch.distributed.rpc` with"
        " TensorPipe (defaults, 4 worker threads): one `rpc_sync` sends the gradients, the server"
        " sets `.grad`, runs fused Adam and returns the parameters. On one host TensorPipe's"
        " defaults move the tensors through shared memory; **TCP only** repeats it with"
        ' `_transports=["uv"], _channels=["basic"]`, what it does between hosts, the fair'
        " peer for adamd's gRPC path.",
        f"- **memory**: the server process's VmHWM (fresh server per size) minus its VmRSS before"
        f" the model was created (interpreter, torch, grpc), divided by {ADAM_BYTES_PER_PARAM}"
        " B/param (params + exp_avg + exp_avg_sq + one gradient buffer). The ratio is taken after"
        " create_model and the gRPC pushes and pulls (gradients stream into one preallocated"
        " buffer set); the table also gives the peak after every operation, by which time"
        " same-host clients have each attached a session with its own gradient file. VmHWM counts"
        " /dev/shm pages only where the server has them mapped and touched; the MiB the server's"
        " /dev/shm files hold at the end are listed beside it.",
    ]
    errors = list(result.errors)
    for r in result.sizes:
        if r.adamd:
            errors += [f"{size_label(r.n)} {e}" for e in r.adamd.errors]
    leftovers = [
        f"{size_label(r.n)}: the server left {r.adamd.leftover_shm_files} file(s) in /dev/shm"
        " after SIGTERM (removed by the harness)"
        for r in result.sizes
        if r.adamd and r.adamd.leftover_shm_files
    ]
    errors += leftovers
    if errors:
        md += ["", "## Errors during the run", "", *[f"- {e}" for e in errors]]
    return "\n".join(md) + "\n"


# Sections other harnesses (bench.concurrency) own inside the same file: `python -m bench` keeps
# them when it rewrites the rest.
_BEGIN, _END = "<!-- begin {} -->", "<!-- end {} -->"


def kept_sections(old: str) -> list[str]:
    """Every `<!-- begin NAME --> ... <!-- end NAME -->` block of `old`, verbatim."""
    blocks, pos = [], 0
    while (start := old.find("<!-- begin ", pos)) >= 0:
        name = old[start + len("<!-- begin ") : old.index(" -->", start)]
        end = old.find(_END.format(name), start)
        if end < 0:
            break
        end += len(_END.format(name))
        blocks.append(old[start:end])
        pos = end
    return blocks


def put_section(text: str, name: str, body: str) -> str:
    """`text` with section NAME replaced by `body` (appended when it is not there yet)."""
    begin, end = _BEGIN.format(name), _END.format(name)
    block = f"{begin}\n{body.rstrip()}\n{end}"
    if begin in text and end in text:
        return text[: text.index(begin)] + block + text[text.index(end) + len(end) :]
    return text.rstrip() + "\n\n" + block + "\n"
