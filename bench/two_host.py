"""`python -m bench.two_host`: adamd across two hosts, against PyTorch's RPC parameter server.

Two Linux network namespaces joined by a veth pair stand in for two hosts: the server namespace
(`adxh<pid>s`, 10.72.0.1) runs `adamd serve --no-shm` and the torch RPC parameter server
(TensorPipe limited to TCP: `_transports=["uv"], _channels=["basic"]`, what it uses between
hosts); the worker namespace (`adxh<pid>w`, 10.72.0.2) runs one worker process that measures
every contender, interleaved rep by rep, so all of them see the same moments of a noisy machine.
Variants (`--variants`):

- `mtu1500`: plain veth, MTU 1500.
- `10gbe`: the same with `tc qdisc ... root tbf rate 10gbit` on both ends (emulated 10 GbE).
- `1gbe`: the same with `tbf rate 1gbit` (emulated 1 GbE: the slow link int8 pushes are for).
- `jumbo`: plain veth, MTU 9000 (not run by default).

Measurements (`--what`):

- `step`: RemoteAdam.step() round trip (push + server Adam + pull into the local parameters) at
  `--step-size` params (default 25M) in `--tensors` tensors (default 4), one contender per entry
  of STEP_CONTENDERS (RemoteAdam keyword arguments: wire fp32, bf16, int8 push with a bf16 pull,
  over the bulk-data channel, the default across hosts, and over gRPC streams); the torch RPC
  peer's push + fused Adam + pull (one `rpc_sync`) on the same tensors. Best of `--reps` after
  `--warmup` calls of each, and the bytes that crossed the worker's veth end (both ways, read
  from /proc/net/dev around each timed call: payload plus TCP/IP framing) per param per step.
- `train`: a character-level transformer LM (torch.nn.TransformerEncoder, pre-norm, causal; on
  examples/data/sonnets.txt) trained with a local fused Adam; RemoteAdam on the same host (a
  second `adamd serve` in the worker's namespace: shared memory); RemoteAdam fp32 and bf16 across
  the namespaces, with and without overlap, and fp32 against a third `adamd serve` beside the first
  with step statistics off (`--stats-every -1`: on 2 shared cores the server's statistics take CPU
  from the worker, though they no longer delay the reply); and the torch RPC peer across the
  namespaces (the worker sends the gradients, copies the returned parameters into the model). Each contender has its own copy of one initial model and
  sees the same batches; contenders take turns in blocks of `--train-block` steps. Reported: mean
  step time (zero grad + forward + backward + optimizer step), its overhead over the local fused
  Adam, the median step time, and the mean time from the end of backward to the end of the step.

Namespaces, veth and qdiscs are named `adxh<pid>*` (this run's process id, so runs never clash)
on 10.72.0.0/24, created per variant and removed afterwards (also on Ctrl-C, SIGTERM and errors;
those of a run killed with SIGKILL are removed by the next run, once their process is gone). Needs root (`ip netns add`); without it the script
exits with a message. `--quick` is a smoke run (small sizes, 2 reps). It prints its report
section; `python -m bench` runs `section()` (REPORT_ARGV: the step part, at veth speed and at
1 Gbit/s) and puts it into BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .common import parse_size, python_subprocess_env, stop_process
from .compose import load_average

ROOT = Path(__file__).resolve().parent.parent
TEXT = ROOT / "examples" / "data" / "sonnets.txt"
# This run's names (process id: concurrent runs, and other users of `ip netns`, never clash;
# interface names stay under IFNAMSIZ, 15 characters).
_TAG = f"adxh{os.getpid()}"
SERVER_NS, WORKER_NS = f"{_TAG}s", f"{_TAG}w"
SERVER_IF, WORKER_IF = f"{_TAG}vs", f"{_TAG}vw"
SERVER_IP, WORKER_IP = "10.72.0.1", "10.72.0.2"
ADAMD_PORT, RPC_PORT = 50051, 29533
LOCAL_PORT = 50061  # a second adamd serve in the worker's namespace: the same-host contender
NOSTATS_PORT = 50071  # a third, beside the first, with step statistics off (--stats-every -1)
LOCK = Path(tempfile.gettempdir()) / "adxh-two-host.lock"
SECTION = "two-host"
TBF_10GBE = "rate 10gbit burst 5mb latency 10ms"  # burst >= rate / HZ (5 MB at HZ=250)
TBF_1GBE = "rate 1gbit burst 1mb latency 50ms"
TBF_RATES = {"10gbe": 10e9, "1gbe": 1e9}  # bit/s of the tc-limited variants


@dataclass(frozen=True)
class Variant:
    name: str
    mtu: int
    tbf: str | None  # `tc qdisc add dev X root tbf <this>` on both ends, or none
    label: str


VARIANTS = {
    "mtu1500": Variant("mtu1500", 1500, None, "veth, MTU 1500"),
    "10gbe": Variant("10gbe", 1500, TBF_10GBE, f"veth, MTU 1500, `tbf {TBF_10GBE}` both ends"),
    "1gbe": Variant("1gbe", 1500, TBF_1GBE, f"veth, MTU 1500, `tbf {TBF_1GBE}` both ends"),
    "jumbo": Variant("jumbo", 9000, None, "veth, MTU 9000"),
}
# The step contenders: label -> RemoteAdam keyword arguments, plus "param_dtype" (the worker's
# parameters and gradients, default float32); torch dtypes by name. adamd's default transport
# across hosts is the bulk-data channel; gRPC streams for comparison. The master-weights row: bf16
# parameters on the worker, fp32 master weights and Adam state on the server (bf16 both ways).
STEP_CONTENDERS: dict[str, dict[str, Any]] = {
    "adamd fp32": {},
    "adamd bf16": {"wire_dtype": "bfloat16"},
    "adamd int8 + bf16 pull": {"wire_dtype": "bfloat16", "grad_compression": "int8"},
    "adamd master, bf16 params": {"param_dtype": "bfloat16", "master_dtype": "float32"},
    "adamd gRPC fp32": {"transport": "grpc"},
    "adamd gRPC bf16": {"transport": "grpc", "wire_dtype": "bfloat16"},
}
CONTENDERS_STEP = (*STEP_CONTENDERS, "torch RPC")
CONTENDERS_TRAIN = (
    "local fused Adam",
    "adamd same host",
    "adamd fp32",
    "adamd fp32 no stats",
    "adamd bf16",
    "adamd fp32 overlap",
    "adamd bf16 overlap",
    "torch RPC",
)


# --- namespaces -----------------------------------------------------------------------------


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check)


def namespace_problem() -> str | None:
    """Why this machine cannot make the namespace pair (None: it can)."""
    if shutil.which("ip") is None or shutil.which("tc") is None:
        return "`ip` and `tc` (iproute2) are needed"
    probe = f"adxh-p{os.getpid()}"
    done = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if done.returncode != 0:
        return f"`ip netns add` is not permitted here ({done.stderr.strip() or 'no message'})"
    _ip("netns", "del", probe, check=False)
    return None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_namespaces() -> None:
    """This run's namespaces, and those a run killed with SIGKILL left (its process is gone)."""
    listed = [line.split()[0] for line in _ip("netns", "list", check=False).stdout.splitlines()]
    for ns in listed:  # deleting a namespace deletes its end of the veth pair
        m = re.fullmatch(r"adxh(\d+)[sw]", ns)
        if ns in (SERVER_NS, WORKER_NS) or (m and not _pid_alive(int(m.group(1)))):
            _ip("netns", "del", ns, check=False)


@contextlib.contextmanager
def _run_lock() -> Iterator[None]:
    """One two-host run at a time on this machine (their timings would disturb each other)."""
    with open(LOCK, "w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print("waiting for another bench.two_host run to finish...", file=sys.stderr)
            fcntl.flock(f, fcntl.LOCK_EX)
        yield


@contextlib.contextmanager
def namespace_pair(variant: Variant) -> Iterator[None]:
    """The two namespaces joined by a veth pair, shaped as `variant` says; removed on exit."""
    _remove_namespaces()  # left by a run that was killed with SIGKILL
    try:
        for ns in (SERVER_NS, WORKER_NS):
            _ip("netns", "add", ns)
            _ip("-n", ns, "link", "set", "lo", "up")
        _ip("link", "add", SERVER_IF, "netns", SERVER_NS, "type", "veth",
            "peer", "name", WORKER_IF, "netns", WORKER_NS)  # fmt: skip
        for ns, dev, addr in ((SERVER_NS, SERVER_IF, SERVER_IP), (WORKER_NS, WORKER_IF, WORKER_IP)):
            _ip("-n", ns, "addr", "add", f"{addr}/24", "dev", dev)
            _ip("-n", ns, "link", "set", dev, "mtu", str(variant.mtu), "up")
            if variant.tbf:
                subprocess.run(
                    ["ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", dev, "root", "tbf",
                     *variant.tbf.split()],
                    check=True, capture_output=True, text=True,
                )  # fmt: skip
        yield
    finally:
        _remove_namespaces()


@contextlib.contextmanager
def _sigterm_raises() -> Iterator[None]:
    """SIGTERM unwinds like Ctrl-C, so every `finally` (processes, namespaces) runs."""

    def handler(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    old = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


# --- processes ------------------------------------------------------------------------------


@dataclass
class _Proc:
    name: str
    proc: subprocess.Popen[str]
    log: Path

    def tail(self, n: int = 3000) -> str:
        return self.log.read_text(errors="replace")[-n:] if self.log.exists() else ""


@contextlib.contextmanager
def _in_ns(ns: str, name: str, argv: list[str], tmp: Path, ifname: str) -> Iterator[_Proc]:
    """`argv` started in namespace `ns` (output to a log file), stopped on exit."""
    env = python_subprocess_env()
    # torch RPC: TensorPipe and its Gloo group listen on this namespace's veth end (the host name
    # resolves to an address outside the namespace)
    env["TP_SOCKET_IFNAME"] = env["GLOO_SOCKET_IFNAME"] = ifname
    log = tmp / f"{name}.log"
    with open(log, "w") as logf:
        proc = subprocess.Popen(
            ["ip", "netns", "exec", ns, *argv], stdout=logf, stderr=subprocess.STDOUT,
            text=True, env=env, cwd=ROOT,
        )  # fmt: skip
    try:
        yield _Proc(name, proc, log)
    finally:
        if proc.poll() is None:
            stop_process(proc)


def run_variant(variant: Variant, cfg: dict[str, Any], timeout: float) -> dict[str, Any]:
    """Namespaces up, servers in one and the measuring worker in the other; its JSON result."""
    py = sys.executable
    with namespace_pair(variant), tempfile.TemporaryDirectory(prefix="adxh-bench-") as tmp_s:
        tmp = Path(tmp_s)
        serve = [py, "-m", "adamd.server.cli", "serve", "--no-shm", "--host", SERVER_IP,
                 "--grpc-port", str(ADAMD_PORT), "--http-port", "-1", "--device", "cpu",
                 "--data-dir", str(tmp / "data"), "--snapshot-every-s", "0"]  # fmt: skip
        local = [py, "-m", "adamd.server.cli", "serve", "--host", "127.0.0.1",
                 "--grpc-port", str(LOCAL_PORT), "--http-port", "-1", "--device", "cpu",
                 "--data-dir", str(tmp / "local"), "--snapshot-every-s", "0"]  # fmt: skip
        nostats = [*serve, "--stats-every", "-1", "--data-dir", str(tmp / "nostats")]
        nostats[nostats.index("--grpc-port") + 1] = str(NOSTATS_PORT)
        me = [py, "-m", "bench.two_host"]
        with (
            _in_ns(SERVER_NS, "adamd", serve, tmp, SERVER_IF) as adamd,
            _in_ns(SERVER_NS, "adamd-nostats", nostats, tmp, SERVER_IF),
            _in_ns(WORKER_NS, "adamd-local", local, tmp, WORKER_IF),
            _in_ns(SERVER_NS, "rpc-ps", [*me, "--role", "rpc-ps"], tmp, SERVER_IF) as ps,
            _in_ns(WORKER_NS, "worker", [*me, "--role", "worker", json.dumps(cfg)], tmp,
                   WORKER_IF) as worker,
        ):  # fmt: skip
            try:
                worker.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                raise RuntimeError(f"{variant.name}: the worker ran past {timeout:.0f} s") from None
            result = None
            for line in worker.log.read_text().splitlines():
                if line.startswith("{"):
                    result = json.loads(line)
                elif line.startswith("[worker]"):
                    print(f"[two_host] {variant.name} {line}", file=sys.stderr, flush=True)
            if worker.proc.returncode != 0 or result is None:
                raise RuntimeError(
                    f"{variant.name}: the worker failed ({worker.proc.returncode}):\n"
                    f"{worker.tail()}\n--- adamd serve:\n{adamd.tail()}\n--- rpc ps:\n{ps.tail()}"
                )
            with contextlib.suppress(subprocess.TimeoutExpired):
                ps.proc.wait(timeout=30)  # rpc.shutdown() on both sides
            return dict(result)


# --- command line ---------------------------------------------------------------------------


def _config(args: argparse.Namespace) -> dict[str, Any]:
    quick = args.quick
    return {
        "adamd": f"{SERVER_IP}:{ADAMD_PORT}",
        "adamd_local": f"127.0.0.1:{LOCAL_PORT}",
        "adamd_nostats": f"{SERVER_IP}:{NOSTATS_PORT}",
        "ifname": WORKER_IF,  # the worker's veth end: bytes on the wire per contender
        "step_contenders": [c for c in args.contenders.split(",") if c] or list(STEP_CONTENDERS),
        "what": args.what.split(","),
        "step_n": parse_size(args.step_size or ("200k" if quick else "25M")),
        "tensors": args.tensors,
        "reps": args.reps or (2 if quick else 5),
        "warmup": args.warmup or (1 if quick else 5),
        "train": {
            "dim": args.lm_dim or (32 if quick else 320),
            "layers": args.lm_layers or (1 if quick else 6),
            "heads": 4 if quick else 8,
            "batch": args.batch or (2 if quick else 4),
            "context": args.context or (32 if quick else 128),
            "steps": args.train_steps or (2 if quick else 16),
            "block": args.train_block,
        },
    }


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bench.two_host", description=__doc__.splitlines()[0]
    )
    p.add_argument("--variants", default="mtu1500,10gbe", help=f"of {','.join(VARIANTS)}")
    p.add_argument("--what", default="step,train", help="step, train, or both (default)")
    p.add_argument("--quick", action="store_true", help="smoke run: small sizes, 2 reps")
    p.add_argument("--step-size", help="fp32 params of the step round trip (default 25M)")
    p.add_argument("--tensors", type=int, default=4, help="tensors they are split into (4)")
    p.add_argument(
        "--contenders",
        default="",
        help="step contenders, comma-separated (default: all adamd ones)",
    )
    p.add_argument("--reps", type=int, help="timed step repetitions, best kept (default 5)")
    p.add_argument("--warmup", type=int, help="warm-up calls / steps per contender (default 5)")
    p.add_argument("--lm-dim", type=int, help="LM width (default 320)")
    p.add_argument("--lm-layers", type=int, help="LM layers (default 6)")
    p.add_argument("--batch", type=int, help="LM batch size (default 4)")
    p.add_argument("--context", type=int, help="LM context, characters (default 128)")
    p.add_argument("--train-steps", type=int, help="measured steps per contender (default 16)")
    p.add_argument(
        "--train-block", type=int, default=2, help="steps per turn, contenders alternating (2)"
    )
    p.add_argument("--timeout", type=float, default=1500, help="seconds per variant (1500)")
    p.add_argument("--role", help=argparse.SUPPRESS)
    p.add_argument("role_arg", nargs="?", help=argparse.SUPPRESS)
    return p


# What `python -m bench` runs: the step round trip at veth speed and at 1 Gbit/s, the wire formats
# the headline compares (fp32, bf16, int8 push with a bf16 pull, master weights) and torch RPC.
REPORT_ARGV = ["--what", "step", "--variants", "mtu1500,1gbe", "--reps", "3", "--warmup", "2"]
QUICK_ARGV = ["--quick", "--what", "step", "--variants", "1gbe"]
REPORT_CONTENDERS = [
    "adamd fp32",
    "adamd bf16",
    "adamd int8 + bf16 pull",
    "adamd master, bf16 params",
]


def measure(args: argparse.Namespace, cfg: dict[str, Any]) -> Any:
    """Every variant of `args`, each in its namespace pair; a two_host_report.Run."""
    from .two_host_report import Run

    problem = namespace_problem()
    if problem:
        raise SystemExit(f"bench.two_host needs two network namespaces: {problem} (run as root)")
    variants = [VARIANTS[v] for v in args.variants.split(",")]
    t0 = time.perf_counter()
    load_start = load_average()
    results: dict[str, dict[str, Any]] = {}
    errors: list[str] = []
    with _sigterm_raises(), _run_lock():
        for v in variants:
            print(f"[two_host] {v.name}: {v.label}", file=sys.stderr, flush=True)
            try:
                results[v.name] = run_variant(v, cfg, args.timeout)
            except RuntimeError as e:
                errors.append(str(e).splitlines()[0])
                print(e, file=sys.stderr)
    cmd = "python -m bench.two_host"
    run = Run(variants, results, cfg, cmd, time.perf_counter() - t0, load_average(), load_start)
    run.errors = errors
    return run


def section(quick: bool = False) -> Any:
    """The report's two-host section (compose.Section), measured at REPORT_ARGV (or QUICK_ARGV)."""
    from .two_host_report import to_section

    args = _parser().parse_args(QUICK_ARGV if quick else REPORT_ARGV)
    cfg = _config(args)
    cfg["step_contenders"] = REPORT_CONTENDERS
    run = measure(args, cfg)
    sec = to_section(run)
    if run.errors and not run.results:
        raise RuntimeError("; ".join(run.errors))
    return sec


def main(argv: list[str] | None = None) -> int:
    from .two_host_report import to_section

    args = _parser().parse_args(argv)
    if args.role in ("rpc-ps", "worker"):  # inside a namespace: the processes run_variant starts
        from . import two_host_worker

        if args.role == "rpc-ps":
            return two_host_worker.rpc_ps_main()
        return two_host_worker.worker_main(json.loads(args.role_arg))
    unknown = [v for v in args.variants.split(",") if v not in VARIANTS]
    if unknown:
        raise SystemExit(f"unknown variant(s) {unknown}; known: {', '.join(VARIANTS)}")
    if set(args.what.split(",")) - {"step", "train"}:
        raise SystemExit("--what takes step, train or step,train")
    run = measure(args, _config(args))
    print(to_section(run).markdown())
    print(json.dumps({"results": run.results}))
    return 1 if run.errors else 0


if __name__ == "__main__":
    # Run through the imported module, as the namespaces' processes import it (the RPC
    # functions they call live in bench.two_host_worker).
    from bench.two_host import main as _main

    sys.exit(_main())
