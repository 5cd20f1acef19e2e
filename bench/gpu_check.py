"""`make gpu-check` (`python -m bench.gpu_check`): the CUDA tests and the GPU benchmark rows, with
the figures written to bench/results/gpu_check.json, which `python -m bench` reports (labelled
with the machine and date they were measured on).

1. The GPU tests: tests/system/test_gpu_path.py (the core under load: captures, streams, staging,
   deletion, snapshots, a broken capture; needs only torch, grpcio, protobuf, pytest) and
   tests/integration/test_gpu.py (through a gRPC-only daemon; skipped, and said so, where the
   daemon's extras are missing), plus the CPU-side tests of the CUDA step logic.
2. The benchmark rows, in this process: the server's Adam step at 100M fp32 params, replayed from
   its CUDA graph and eager, as a fraction of the 28 B/param HBM bound (at the device-to-device
   copy bandwidth measured here, and at the nominal peak where the device is known); the
   server's whole step with the gradient's upload from pinned host memory; a local fused Adam.

Runs from a source checkout without installing it (an `adamd` namespace is linked to the folders
when it is not importable) and without a virtual environment: `python3 -m bench.gpu_check`.
Exits 2 with a message when torch sees no CUDA device, 1 when a test failed.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import importlib.util
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULT = ROOT / "bench" / "results" / "gpu_check.json"  # the report's GPU section reads it
BYTES_PER_PARAM = 28  # fp32 Adam in place: read p, g, m, v; write p, m, v
NOMINAL_HBM = {"H100": 3.35e12, "H200": 4.8e12, "A100": 2.0e12, "B200": 8.0e12}  # bytes/s
TESTS = [
    "tests/system/test_gpu_path.py",
    "tests/integration/test_gpu.py",
    "tests/unit/test_cuda_step.py",
]
EXTRAS = ["grpc_health", "grpc_reflection", "prometheus_client", "safetensors", "fastapi"]


def _ensure_adamd() -> str | None:
    """Make `import adamd...` work from the checkout; the folder to put on PYTHONPATH, if any."""
    try:
        if importlib.util.find_spec("adamd.server") is not None:
            return None
    except ModuleNotFoundError:  # no `adamd` at all
        pass
    shim = Path(tempfile.mkdtemp(prefix="adamd-shim-"))
    (shim / "adamd").mkdir()
    links = {
        "client": ROOT / "client",
        "server": ROOT / "server",
        "protocol": ROOT / "protos/adamd/protocol",
        "v1": ROOT / "protos/adamd/v1",
    }
    for name, target in links.items():
        (shim / "adamd" / name).symlink_to(target)
    sys.path.insert(0, str(shim))
    return str(shim)


def _run_tests(shim: str | None, extra: list[str]) -> int:
    env = dict(os.environ)
    paths = [p for p in (shim, str(ROOT), env.get("PYTHONPATH")) if p]
    env["PYTHONPATH"] = os.pathsep.join(paths)
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        *TESTS,
        "-q",
        "-rs",
        "-p",
        "no:cacheprovider",
        "-W",
        "ignore::pytest.PytestConfigWarning",  # `timeout` in pyproject without pytest-timeout
        "-o",
        "faulthandler_timeout=240",  # a hang prints every thread's stack
        *extra,
    ]
    print("$", " ".join(cmd), flush=True)
    return subprocess.call(cmd, cwd=ROOT, env=env)


# --- benchmark rows ------------------------------------------------------------------------------


def _cuda_time(fn: Any, iters: int, stream: Any = None) -> float:
    """Seconds per call of fn, by CUDA events around `iters` calls, best of 3 after a warm-up."""
    import torch

    fn()
    torch.cuda.synchronize()
    best = float("inf")
    for _ in range(3):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record(stream)
        for _ in range(iters):
            fn()
        end.record(stream)
        end.synchronize()
        best = min(best, start.elapsed_time(end) / 1e3 / iters)
    return best


def _copy_bandwidth() -> float:
    """Device-to-device copy bytes (read + write) per second on 1 GiB."""
    import torch

    a = torch.empty(1 << 28, dtype=torch.float32, device="cuda")
    b = torch.empty_like(a)
    t = _cuda_time(lambda: b.copy_(a), 10)
    return 2 * a.numel() * 4 / t


def _bench(n_params: int) -> dict[str, Any]:
    import torch

    from adamd.server.core.model import HostedModel

    dev = torch.device("cuda")
    parts = 4
    shapes = {f"p{i}": (n_params // parts,) for i in range(parts)}
    params = {n: torch.randn(s, device=dev) for n, s in shapes.items()}
    model = HostedModel(
        "bench", params, [{"params": list(shapes), "lr": 1e-4}], device=dev, mode="async"
    )
    graphed = model.graphed
    assert graphed is not None
    gs = model.staging.acquire()
    host = dict(zip(shapes, gs.take(list(shapes))))
    for g in host.values():
        g.normal_()
    key = frozenset(shapes)
    static = graphed.upload(host)
    torch.cuda.synchronize()

    def step() -> None:  # what HostedModel._step does around graphed.run, minus the seqlock
        for n, p in model.params.items():
            p.grad = static[n]
        graphed.run(key)

    stream = graphed._get_streams()[0]
    for _ in range(graphed.warmup_steps + 1):
        step()
    assert graphed.captures == 1
    replay = _cuda_time(step, 20, stream)
    graphed.disabled = "benchmark: eager"
    eager = _cuda_time(step, 20, stream)
    graphed.disabled = None

    def whole() -> None:
        model._step(host)
        torch.cuda.synchronize()

    whole()
    t0 = time.perf_counter()
    for _ in range(5):
        whole()
    with_upload = (time.perf_counter() - t0) / 5
    model.staging.release(gs)
    local_p = [torch.randn(s, device=dev) for s in shapes.values()]
    for p in local_p:
        p.grad = torch.randn_like(p)
    local = torch.optim.Adam(local_p, lr=1e-4, fused=True)
    local_t = _cuda_time(local.step, 20)
    model.close()
    return {
        "replay": replay,
        "eager": eager,
        "with_upload": with_upload,
        "local": local_t,
        "upload_bytes": n_params * 4,
    }


def result_record(
    n_params: int, r: dict[str, Any], copy_bw: float, started: str, secs: float
) -> dict[str, Any]:
    """What the report needs of a GPU run: the machine, the date and the figures (JSON)."""
    import torch

    name = torch.cuda.get_device_name()
    return {
        "device": name,
        "host": platform.node(),
        "measured": started,
        "seconds": secs,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "params": n_params,
        "copy_bandwidth": copy_bw,
        "nominal_hbm": next((v for k, v in NOMINAL_HBM.items() if k in name), None),
        **r,
    }


def section(quick: bool = False, path: Path = RESULT) -> Any:
    """The report's GPU section from the result file of a CUDA run (`make gpu-check` writes it);
    without one, a headline row saying the GPU path was not measured here. Measures nothing."""
    from .compose import DASH, Section, judged, skipped_row, table

    if not path.exists():
        where = platform.node() or "this machine"
        reason = f"no CUDA device on {where}"
        run = (
            f"Not measured: {reason}. `make gpu-check` on a CUDA machine writes"
            f" {path.name}, which this report then shows with that machine and date."
        )
        return Section("GPU", run, rows=[skipped_row("GPU", "GPU path", reason)])
    r = json.loads(path.read_text())
    n, need = r["params"], BYTES_PER_PARAM * r["params"]
    bound = need / r["copy_bandwidth"]
    nominal = r.get("nominal_hbm")
    label = f"{r['device']} on {r['host']}, {r['measured']}"

    def frac(t: float, bw: float | None) -> str:
        return f"{need / bw / t:.2f}" if bw else DASH

    steps = [
        ("server step, CUDA graph replay", r["replay"]),
        ("server step, eager (same kernels)", r["eager"]),
        ("local torch fused Adam (eager)", r["local"]),
    ]
    head = ("step", "ms", "G params/s", "fraction of bound (measured copy BW)", "of nominal HBM")
    cells = [
        (k, f"{t * 1e3:.3f}", f"{n / t / 1e9:.1f}", frac(t, r["copy_bandwidth"]), frac(t, nominal))
        for k, t in steps
    ]
    body = [
        *table(head, cells),
        "",
        f"- graph vs eager: {r['eager'] / r['replay']:.2f}x (eager time / replay time).",
        f"- the server's whole step with the gradient's upload from pinned host memory"
        f" ({r['upload_bytes'] / 1e9:.1f} GB): {r['with_upload'] * 1e3:.1f} ms"
        f" ({r['upload_bytes'] / r['with_upload'] / 1e9:.1f} GB/s including the step).",
    ]
    rows = [
        judged(
            "GPU",
            f"server Adam step, graph replay ({n / 1e6:.0f}M params; {label})",
            f"{r['replay'] * 1e3:.3f} ms",
            f"{r['local'] * 1e3:.3f} ms (local fused Adam)",
            f"{bound * 1e3:.3f} ms ({BYTES_PER_PARAM} B/param at the measured copy bandwidth)",
            r["replay"] / r["local"],
            DASH,
            None,
        ),
    ]
    how = [
        f"Not measured by this run: read from `{path.name}`, which `make gpu-check`"
        f" wrote on {label} (torch {r['torch']}, CUDA {r['cuda']}, python {r['python']}). The"
        f" server's Adam step at {n / 1e6:.0f}M fp32 params in 4 tensors, replayed from its CUDA"
        f" graph and eager, against a local fused Adam; a step moves {BYTES_PER_PARAM} B/param"
        f" ({need / 1e9:.1f} GB): the bound is that traffic at the device-to-device copy"
        f" bandwidth measured there ({r['copy_bandwidth'] / 1e12:.2f} TB/s)"
        + (f" and at the nominal {nominal / 1e12:.2f} TB/s." if nominal else "."),
    ]
    return Section("GPU", f"From a `make gpu-check` run on {label}.", body, how, rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m bench.gpu_check", description=__doc__.splitlines()[0]
    )
    p.add_argument("--params", type=float, default=100e6, help="benchmark size (default 100M)")
    p.add_argument("--no-tests", action="store_true")
    p.add_argument("--no-bench", action="store_true")
    p.add_argument(
        "--result", type=Path, default=RESULT, help="result file (bench/results/gpu_check.json)"
    )
    p.add_argument("pytest_args", nargs="*", help="passed on to pytest")
    args = p.parse_args(argv)
    try:
        import torch
    except ImportError:
        print("gpu-check: torch is not installed in", sys.executable, file=sys.stderr)
        return 2
    if not torch.cuda.is_available():
        print(
            f"gpu-check: torch {torch.__version__} sees no CUDA device "
            f"(built for CUDA {torch.version.cuda or 'none: a CPU-only build'}); "
            "run this on a machine with an NVIDIA GPU and a CUDA build of torch.",
            file=sys.stderr,
        )
        return 2
    shim = _ensure_adamd()
    missing = [m for m in EXTRAS if importlib.util.find_spec(m) is None]
    for m in ("grpc", "google.protobuf", "pytest"):
        try:
            importlib.import_module(m)
        except ImportError:
            print(f"gpu-check: {m} is not installed in {sys.executable}", file=sys.stderr)
            return 2
    print(f"gpu-check: {torch.cuda.get_device_name()}, torch {torch.__version__}", flush=True)
    if missing:
        print(f"gpu-check: not installed here: {', '.join(missing)} (tests needing them skip)")
    status = 0 if args.no_tests else _run_tests(shim, args.pytest_args)
    if not args.no_bench:
        started = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        t0 = time.perf_counter()
        n = int(args.params)
        copy_bw = _copy_bandwidth()
        result = _bench(n)
        record = result_record(n, result, copy_bw, started, time.perf_counter() - t0)
        args.result.parent.mkdir(parents=True, exist_ok=True)
        args.result.write_text(json.dumps(record, indent=2) + "\n")
        print(section(path=args.result).markdown())
        print(f"gpu-check: figures written to {args.result} (`python -m bench` reports them)")
    if status:
        print(f"gpu-check: the GPU tests FAILED (pytest exit {status})", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
