"""`python -m bench.worker_memory`: a training worker's memory for a bf16 model, local
fp32-master Adam against RemoteAdam with master weights (`master_dtype=torch.float32`).

Each case runs in a fresh Python process (its own RSS): a stack of `--layers` bf16 Linear layers
of width `--width` (default 10 x 3162: 100M parameters), `--steps` steps of forward + backward
on a batch of one (activations are negligible beside the parameters), then an optimizer step:

- local: the mixed-precision recipe on the worker: fp32 copies of the bf16 parameters, the
  gradients widened into them, a fused torch.optim.Adam stepping the copies (fp32 exp_avg and
  exp_avg_sq), the bf16 parameters set from the copies.
- remote: RemoteAdam(master_dtype=torch.float32, transport="bulk") against an `adamd serve`
  process on loopback (the bulk-data socket, what a worker on another host uses): the fp32
  master parameters and Adam state live on the server; the worker keeps its bf16 parameters and
  gradients.

Reported per case: the tensor bytes the worker holds (parameters, gradients, optimizer state and
master copies) per parameter, and its peak RSS growth (VmHWM after the steps minus VmRSS before
the model was built, /proc/self/status) per parameter. It prints its report section;
`python -m bench` runs it at the defaults.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from typing import Any

import torch

from .common import adamd_server, proc_status_kib, python_subprocess_env


def _model(layers: int, width: int) -> torch.nn.Sequential:
    torch.manual_seed(0)
    blocks: list[torch.nn.Module] = []
    for _ in range(layers):  # made in bf16: no fp32 copy of the model at construction
        blocks += [torch.nn.Linear(width, width, dtype=torch.bfloat16), torch.nn.Tanh()]
    return torch.nn.Sequential(*blocks)


def _nbytes(ts: Any) -> int:
    return sum(t.numel() * t.element_size() for t in ts if isinstance(t, torch.Tensor))


def _worker(case: str, layers: int, width: int, steps: int, address: str) -> dict[str, Any]:
    import os

    from adamd.client import RemoteAdam

    pid = os.getpid()
    before_kib = proc_status_kib(pid, "VmRSS")
    with open(f"/proc/{pid}/clear_refs", "w") as f:
        f.write("5")  # peak RSS from here
    net = _model(layers, width)
    params = list(net.parameters())
    n = sum(p.numel() for p in params)
    master: list[torch.Tensor] = []
    opt: torch.optim.Optimizer
    if case == "local":
        master = [p.detach().float().clone() for p in params]
        opt = torch.optim.Adam(master, lr=1e-4, fused=True)
    else:
        opt = RemoteAdam(
            params,
            lr=1e-4,
            server=address,
            model="worker-memory",
            master_dtype=torch.float32,
            transport="bulk",
        )
    x = torch.randn(1, width).to(torch.bfloat16)
    for _ in range(steps):
        for p in params:
            p.grad = None
        net(x).float().sum().backward()
        if case == "local":
            for p, m in zip(params, master):
                assert p.grad is not None
                m.grad = p.grad.float()
            opt.step()
            with torch.no_grad():
                for p, m in zip(params, master):
                    p.copy_(m)
        else:
            opt.step()
    peak_kib = proc_status_kib(pid, "VmHWM")
    grads = [p.grad for p in params]
    state = [] if case != "local" else [t for s in opt.state.values() for t in s.values()]
    tracked = {
        "params": _nbytes(params),
        "grads": _nbytes(grads),
        "master": _nbytes(master) + _nbytes(m.grad for m in master),
        "optimizer_state": _nbytes(state),
    }
    if case != "local":
        opt.close()  # type: ignore[attr-defined]
    return {
        "case": case,
        "params": n,
        "tracked_bytes": tracked,
        "tracked_b_per_param": sum(tracked.values()) / n,
        "peak_rss_growth_b_per_param": (peak_kib - before_kib) * 1024 / n,
    }


def _run_case(case: str, args: argparse.Namespace, address: str = "") -> dict[str, Any]:
    cmd = [
        sys.executable,
        "-m",
        "bench.worker_memory",
        "--worker",
        case,
        "--layers",
        str(args.layers),
        "--width",
        str(args.width),
        "--steps",
        str(args.steps),
        "--address",
        address,
    ]
    out = subprocess.run(
        cmd, check=True, capture_output=True, text=True, env=python_subprocess_env()
    )
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


REPORT_ARGV: list[str] = []  # the defaults (100M params): what `python -m bench` runs
QUICK_ARGV = ["--layers", "2", "--width", "256", "--steps", "1"]
TARGET_B_PER_PARAM = 4.5  # what RemoteAdam with master weights may hold on the worker


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=10)
    ap.add_argument("--width", type=int, default=3162)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--worker", default="", help=argparse.SUPPRESS)
    ap.add_argument("--address", default="", help=argparse.SUPPRESS)
    return ap


def measure(args: argparse.Namespace) -> list[dict[str, Any]]:
    results = [_run_case("local", args)]
    with adamd_server() as server:
        results.append(_run_case("remote", args, server.address))
    return results


def to_section(results: list[dict[str, Any]], args: argparse.Namespace) -> Any:
    from .compose import Section, table

    local, remote = results
    labels = {
        "local": "local fp32-master Adam (fp32 copies, widened grads, fused Adam, cast back)",
        "remote": 'RemoteAdam(master_dtype=torch.float32, transport="bulk"), server on loopback',
    }
    cells = [
        (
            labels[r["case"]],
            f"{r['tracked_b_per_param']:.2f}",
            f"{r['peak_rss_growth_b_per_param']:.2f}",
        )
        for r in results
    ]
    x = remote["tracked_b_per_param"]
    verdict = "met" if x <= TARGET_B_PER_PARAM else "**NOT met**"
    body = [
        *table(("worker", "tensors, B/param", "peak RSS growth, B/param"), cells),
        "",
        f"- {verdict}: RemoteAdam with master weights holds at most {TARGET_B_PER_PARAM} B/param"
        f" on the worker: {x:.2f} B/param of tensors (bf16 weights and gradients),"
        f" {remote['peak_rss_growth_b_per_param']:.2f} of peak RSS growth; the local recipe"
        f" {local['tracked_b_per_param']:.2f} and {local['peak_rss_growth_b_per_param']:.2f}."
        " The local recipe keeps the widened fp32 gradients as the master copies' `.grad` too;"
        " with RemoteAdam the fp32 masters and Adam state (16 B/param) are on the server.",
    ]
    how = [
        "Each case in a fresh Python process (its own RSS). *Tensors*: the bytes the worker"
        " holds in parameters, gradients, fp32 master copies (with their widened gradients) and"
        " Adam state, per parameter; *peak RSS growth*: the process's VmHWM after the steps"
        " minus its VmRSS before the model was built (/proc/self/status), per parameter.",
    ]
    run = (
        f"A stack of {args.layers} bf16 `Linear({args.width}, {args.width})`"
        f" ({remote['params']:,} params, made in bf16), {args.steps} steps of forward +"
        " backward on a batch of one and an optimizer step."
    )
    return Section("Worker memory: master weights (bf16 model)", run, body, how)


def section(quick: bool = False) -> Any:
    args = _parser().parse_args(QUICK_ARGV if quick else REPORT_ARGV)
    return to_section(measure(args), args)


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    if args.worker:
        print(json.dumps(_worker(args.worker, args.layers, args.width, args.steps, args.address)))
        return
    print(to_section(measure(args), args).markdown())


if __name__ == "__main__":
    main()
