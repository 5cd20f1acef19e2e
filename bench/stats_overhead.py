"""What the HTTP side's step statistics cost on the step path.

Drives a HostedModel directly (no networking, so only the step path is timed): each push writes
gradients into the model's staging buffers, then `finish_push` is timed, which checks them, steps
torch's fused Adam and runs the step observers. It compares a model with no observers against one
with `adamd.server.core.stats.ModelStats` at stats_every 1, 10 and 0 (auto: a 2% time budget), on
several model layouts. Figures are mean step times (the cost of a stats step is amortized).

    .venv/bin/python -m bench.stats_overhead [--device cpu|cuda] [--steps N]
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

from adamd.server.core.model import HostedModel, PushMeta
from adamd.server.core.stats import ModelStats

LAYOUTS: dict[str, list[tuple[int, ...]]] = {  # name -> shapes
    "demo 4.3k params, 4 tensors": [(128, 32), (128,), (1, 128), (1,)],
    "1M params, 8 tensors": [(512, 256)] * 8,
    "20M params, 8 tensors": [(2500, 1000)] * 8,
    "20M params, 200 tensors": [(100, 1000)] * 200,
}


def step_times(
    shapes: list[tuple[int, ...]], every: int | None, steps: int, device: str
) -> list[float]:
    params = {f"p{i}": torch.randn(s, device=device) for i, s in enumerate(shapes)}
    model = HostedModel(
        "bench", params, [{"params": list(params), "lr": 1e-3}], device=torch.device(device)
    )
    if every is not None:
        stats = ModelStats(model, every)
        model.observers.append(stats.observe)
    g = torch.Generator().manual_seed(0)
    grads = [torch.randn(s, generator=g) for s in shapes]
    raw = [memoryview(t.numpy()).cast("B") for t in grads]  # type: ignore[arg-type]
    specs = [(n, tuple(s), torch.float32) for n, s in zip(params, shapes)]
    out = []
    for step in range(steps):
        ticket = model.begin_push(PushMeta(version=model.version), specs)
        assert ticket.sink is not None
        for i, data in enumerate(raw):
            ticket.sink.write(i, 0, data)
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        model.finish_push(ticket).wait()
        if device == "cuda":
            torch.cuda.synchronize()
        if step >= 3:  # warm-up: lazy state, allocator, first stats buffer
            out.append(time.perf_counter() - t0)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--steps", type=int, default=40)
    args = p.parse_args()
    torch.manual_seed(0)
    print(f"device {args.device}, torch {torch.__version__}, threads {torch.get_num_threads()}")
    print(
        f"{'layout':32} {'no stats':>12} {'auto':>12} {'every 10':>12} {'every 1':>12}"
        "  overhead (auto / every 10 / every 1)"
    )
    for name, shapes in LAYOUTS.items():
        steps = args.steps if sum(np.prod(s) for s in shapes) > 1e5 else args.steps * 20
        # Interleave the configurations so drift (other load, frequency) hits each alike.
        runs: dict[str | int, list[float]] = {"none": [], 0: [], 10: [], 1: []}
        for _ in range(3):
            for key in runs:
                every = None if key == "none" else int(key)
                runs[key] += step_times(shapes, every, steps // 3 + 3, args.device)
        med = {k: statistics.fmean(v) for k, v in runs.items()}
        base = med["none"]

        def fmt(s: float) -> str:
            return f"{s * 1e3:9.3f} ms" if s >= 1e-3 else f"{s * 1e6:9.1f} us"

        over = " / ".join(f"{100 * (med[k] / base - 1):+.0f}%" for k in (0, 10, 1))
        print(
            f"{name:32} {fmt(base):>12} {fmt(med[0]):>12} {fmt(med[10]):>12} {fmt(med[1]):>12}"
            f"  {over}"
        )


if __name__ == "__main__":
    main()
