"""Convergence of int8 gradient pushes: examples/char_lm.py trained with the same seeds and
batches over each wire format, against one local `adamd serve`.

    .venv/bin/python -m bench.compression [--steps 300] [--formats fp32,bf16,int8,int8-noef]

One worker, sync; every run starts from the same initial parameters and sees the same batches, so
the runs differ only in what the wire does to the gradients (and, for bf16, the parameters). It
prints one row per format: the held-out loss at the end, the mean training loss of the last 10%
of steps, and each one's ratio to the fp32 wire's. `python -m bench` runs `section()` (REPORT)
and puts it into BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"

# name: (char_lm --wire-dtype, --grad-compression)
FORMATS = {
    "fp32": ("float32", "none"),
    "bf16": ("bfloat16", "none"),
    "int8": ("bfloat16", "int8"),  # int8 push with a bf16 pull: the slow-link setting
    "int8-fp32pull": ("float32", "int8"),
    "int8-noef": ("bfloat16", "int8-noef"),
}


def run(formats: list[str], steps: int, **sizes: int) -> dict[str, dict[str, float]]:
    sys.path.insert(0, str(EXAMPLES))
    import char_lm  # examples/char_lm.py
    from _local_server import local_server

    results: dict[str, dict[str, float]] = {}
    with local_server() as server:
        for name in formats:
            wire, compression = FORMATS[name]
            argv = [
                "--steps", str(steps), "--model", f"conv-{name}", "--sample", "0",
                "--log-every", str(10**9), "--wire-dtype", wire, "--grad-compression", compression,
            ]  # fmt: skip
            for key, value in sizes.items():
                argv += [f"--{key}", str(value)]
            args = char_lm.parser().parse_args(argv)
            args.model = args.model or f"char-lm-{args.mode}"
            start = time.monotonic()
            with contextlib.redirect_stdout(io.StringIO()):
                out = char_lm.train(args, server.grpc_address, None)
            results[name] = {**out, "seconds": time.monotonic() - start}
    return results


def run_scaled_quadratic(formats: list[str], steps: int, n: int = 2048) -> dict[str, float]:
    """Where error feedback matters: a quadratic sum(c_j (w_j - t_j)^2) / 2 whose curvatures c_j
    span five decades within one int8 block. Adam is scale-free, so over fp32 every weight moves
    toward its target alike; over int8 the gradients far below half a quantization step of the
    block's largest round to zero: without feedback those weights stand still until the large
    ones have converged, with it their gradient arrives late but whole. Returns each format's
    mean |w - t| / mean |t| after `steps` steps (same start, same targets)."""
    import torch

    from adamd.client import RemoteAdam

    sys.path.insert(0, str(EXAMPLES))
    from _local_server import local_server  # examples/_local_server.py

    g = torch.Generator().manual_seed(0)
    c = torch.logspace(0, -5, n)
    t = torch.randn(n, generator=g)
    out: dict[str, float] = {}
    with local_server() as server:
        for name in formats:
            wire, compression = FORMATS[name]
            w = torch.nn.Parameter(torch.zeros(n))
            opt = RemoteAdam(
                [w], lr=1e-2, server=server.grpc_address, model=f"quad-{name}",
                wire_dtype=None if wire == "float32" else torch.bfloat16,
                grad_compression=None if compression == "none" else compression,
            )  # fmt: skip
            try:
                for _ in range(steps):
                    opt.zero_grad()
                    (0.5 * (c * (w - t) ** 2).sum()).backward()
                    opt.step()
                out[name] = float((w.detach() - t).abs().mean() / t.abs().mean())
            finally:
                opt.close()
    return out


LABELS = {
    "fp32": "fp32 / fp32",
    "bf16": "bf16 / bf16",
    "int8": "int8 + error feedback / bf16",
    "int8-fp32pull": "int8 + error feedback / fp32",
    "int8-noef": "int8, no error feedback / bf16",
}


# What `python -m bench` runs: char_lm over the formats the docs compare, and the quadratic.
@dataclass(frozen=True)
class Settings:
    steps: int
    formats: tuple[str, ...]
    quadratic_steps: int


REPORT = Settings(200, ("fp32", "bf16", "int8", "int8-noef"), 200)
QUICK = Settings(5, ("fp32", "int8"), 5)
QUADRATIC_FORMATS = ["fp32", "int8-fp32pull", "int8-noef"]


def table(results: dict[str, dict[str, float]]) -> str:
    base = results.get("fp32")
    lines = [
        "| wire (push / pull) | held-out loss | vs fp32 | train loss, last 10% | vs fp32 | time |",
        "|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        after, tail = (
            (f"{r[k] / base[k] - 1:+.2%}" if base else "-") for k in ("after", "train_tail")
        )
        lines.append(
            f"| {LABELS[name]} | {r['after']:.4f} | {after} | {r['train_tail']:.4f} |"
            f" {tail} | {r['seconds']:.0f} s |"
        )
    return "\n".join(lines)


def quadratic_table(losses: dict[str, float]) -> str:
    base = losses.get("fp32")
    lines = ["| wire (push / pull) | mean abs error of the weights / mean abs target | vs fp32 |"]
    lines.append("|---|---|---|")
    for name, value in losses.items():
        ratio = f"{value / base:.2f}x" if base else "-"
        lines.append(f"| {LABELS[name]} | {value:.4g} | {ratio} |")
    return "\n".join(lines)


def section(quick: bool = False) -> Any:
    """The report section (compose.Section): char_lm's losses per format, the quadratic's errors,
    and the target (every format within 2% of the fp32 wire's held-out loss)."""
    from .compose import Section

    cfg = QUICK if quick else REPORT
    results = run(list(cfg.formats), cfg.steps)
    quad = run_scaled_quadratic(QUADRATIC_FORMATS, cfg.quadratic_steps)
    base = results["fp32"]["after"]
    worst = max(abs(r["after"] / base - 1) for r in results.values())
    verdict = "met" if worst <= 0.02 else "**NOT met**"
    body = [
        table(results),
        "",
        f"- {verdict}: every format's held-out loss within 2% of the fp32 wire's (largest"
        f" difference {worst:.2%}).",
        "",
        f"A badly scaled quadratic ({cfg.quadratic_steps} steps), where error feedback matters:",
        "",
        quadratic_table(quad),
    ]
    how = [
        "- **char_lm**: examples/char_lm.py (2 layers, dim 64; one worker, sync) against one"
        " local `adamd serve`, the same seeds and batches for every format, so the runs differ"
        " only in what the wire does to the gradients (and, for bf16, the parameters); the"
        " held-out loss at the end (fixed held-out windows) and the mean training loss of the"
        " last 10% of steps. The times are wall times on a shared machine.",
        "- **quadratic**: sum of c_j (w_j - t_j)^2 / 2 over 2048 weights, curvatures c_j from 1 to"
        " 1e-5 in one int8 block, RemoteAdam with lr 1e-2; mean |w - t| / mean |t| at the end."
        " Adam is scale-free, so over fp32 every weight moves alike; over int8 the gradients"
        " under half a quantization step of the block's largest round to zero without error"
        " feedback, and arrive late with it.",
    ]
    formats = ", ".join(LABELS[f] for f in cfg.formats)
    run_text = f"char_lm {cfg.steps} steps per format: {formats}."
    return Section("Convergence over each wire format", run_text, body, how)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m bench.compression", description=__doc__.split("\n\n")[0]
    )
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--formats", default=",".join(FORMATS))
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--json", type=Path, help="also write the figures here")
    p.add_argument(
        "--task",
        choices=["char_lm", "quadratic"],
        default="char_lm",
        help="char_lm (default), or a badly scaled quadratic where error feedback matters",
    )
    args = p.parse_args(argv)
    formats = [f for f in args.formats.split(",") if f]
    unknown = [f for f in formats if f not in FORMATS]
    if unknown:
        p.error(f"unknown formats {unknown}; known: {list(FORMATS)}")
    extra: dict[str, Any] = {"steps": args.steps, "dim": args.dim, "layers": args.layers}
    if args.task == "quadratic":
        losses = run_scaled_quadratic(formats, args.steps)
        print(quadratic_table(losses))
        if args.json:
            args.json.write_text(json.dumps({**extra, "quadratic": losses}, indent=2))
        return 0
    results = run(formats, args.steps, dim=args.dim, layers=args.layers)
    print(table(results))
    if args.json:
        args.json.write_text(json.dumps({**extra, "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
