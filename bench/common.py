"""What every measurement in the harness shares: sizes, test tensors, best-of-N timing, free ports,
and an `adamd serve` subprocess with its memory high-water mark.

Timings are best-of-N (the minimum): the machine is noisy, and the minimum is the figure least
disturbed by other work; it is an optimistic figure for every contender alike.
"""

from __future__ import annotations

import contextlib
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import torch

N_TENSORS = 8  # tensors per benchmark model ("several tensors each")
FP32 = 4  # bytes per fp32 parameter
ADAM_BYTES_PER_PARAM = 16  # params + exp_avg + exp_avg_sq + one gradient buffer, fp32

_SUFFIX = {"": 1, "k": 1_000, "m": 1_000_000, "g": 1_000_000_000}


def parse_size(text: str) -> int:
    """'100k' -> 100_000, '25M' -> 25_000_000, '1e6' -> 1_000_000."""
    m = re.fullmatch(r"\s*([0-9.e+]+)\s*([kKmMgG]?)\s*", text)
    if not m:
        raise ValueError(f"not a size: {text!r} (use e.g. 100k, 1M, 25M)")
    return int(float(m.group(1)) * _SUFFIX[m.group(2).lower()])


def size_label(n: int) -> str:
    for suffix, unit in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= unit:
            v = n / unit
            return f"{v:g}{suffix}"
    return str(n)


def shapes_for(n: int, k: int = N_TENSORS) -> list[tuple[int, ...]]:
    """k tensors totalling n elements; the last takes the remainder."""
    each = n // k
    sizes = [each] * (k - 1) + [n - each * (k - 1)]
    return [(s,) for s in sizes]


def make_tensors(n: int, seed: int = 0, k: int = N_TENSORS) -> dict[str, torch.Tensor]:
    """Named fp32 tensors with names "0".."k-1" (the names RemoteAdam gives a plain list)."""
    g = torch.Generator().manual_seed(seed)
    return {str(i): torch.randn(s, generator=g) for i, s in enumerate(shapes_for(n, k))}


def best_of(fn: Callable[[], object], reps: int, warmup: int = 1) -> float:
    """Minimum wall time of `reps` calls of fn, after `warmup` untimed calls."""
    for _ in range(warmup):
        fn()
    best = float("inf")
    for _ in range(max(1, reps)):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def reps_for(n: int, reps: int) -> int:
    """More repetitions for small models: their timings are short and the noise relatively large."""
    return min(30, max(reps, round(reps * 10_000_000 / max(n, 1))))


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for_channel(
    address: str, timeout: float = 60.0, credentials: grpc.ChannelCredentials | None = None
) -> None:
    """Until `address` accepts a connection (over TLS with `credentials`)."""
    channel = (
        grpc.secure_channel(address, credentials) if credentials else grpc.insecure_channel(address)
    )
    with channel as ch:
        grpc.channel_ready_future(ch).result(timeout=timeout)


def proc_status_kib(pid: int, field: str) -> int:
    """A `kB` field (VmHWM, VmRSS) of /proc/<pid>/status, in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


@dataclass
class ServerProcess:
    """An `adamd serve` subprocess on free loopback ports."""

    proc: subprocess.Popen[bytes]
    address: str
    log: Path
    leftover_shm: int = 0  # files the server left in /dev/shm after it exited (then removed)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def rss_bytes(self) -> int:
        return proc_status_kib(self.pid, "VmRSS") * 1024

    def peak_bytes(self) -> int:
        return proc_status_kib(self.pid, "VmHWM") * 1024

    def shm_files(self) -> list[Path]:
        """Files this server holds under /dev/shm (the same-host fast path names them adamd-PID-*)."""
        return sorted(Path("/dev/shm").glob(f"adamd-{self.pid}-*"))

    def shm_bytes(self) -> int:
        """Memory held by those files (allocated blocks, not their nominal size)."""
        total = 0
        for f in self.shm_files():
            try:
                total += f.stat().st_blocks * 512
            except FileNotFoundError:
                pass
        return total


@contextlib.contextmanager
def adamd_server(
    extra_args: tuple[str, ...] = (), credentials: grpc.ChannelCredentials | None = None
) -> Iterator[ServerProcess]:
    """Start `adamd serve` (CPU, HTTP off) in its own process: its own GIL, its own RSS.
    `credentials`: what a client needs to reach it when `extra_args` turn TLS on."""
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="adamd-bench-") as tmp:
        log = Path(tmp) / "server.log"
        cmd = [
            sys.executable,
            "-m",
            "adamd.server.cli",
            "serve",
            "--host",
            "127.0.0.1",
            "--grpc-port",
            str(port),
            "--http-port",
            "-1",
            "--data-dir",
            str(Path(tmp) / "data"),
            "--device",
            "cpu",
            *extra_args,
        ]
        with open(log, "wb") as logf:
            proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT)
        server = ServerProcess(proc, f"127.0.0.1:{port}", log)
        try:
            _wait_started(server, credentials)
            yield server
        finally:
            stop_process(proc)
            # Our server is gone: whatever it left in /dev/shm is garbage holding RAM. Count it
            # (a finding for the report) and remove it, so later measurements are not starved.
            leftovers = server.shm_files()
            server.leftover_shm = len(leftovers)
            for f in leftovers:
                f.unlink(missing_ok=True)


def _wait_started(
    server: ServerProcess, credentials: grpc.ChannelCredentials | None, timeout: float = 180.0
) -> None:
    """Until the server accepts connections: up to `timeout` s (importing torch on a loaded
    2-core machine can take a minute), failing at once with its log if it exits."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            wait_for_channel(server.address, timeout=1.0, credentials=credentials)
            return
        except grpc.FutureTimeoutError:
            code = server.proc.poll()
            if code is not None or time.monotonic() > deadline:
                why = (
                    f"exited with {code}" if code is not None else f"not serving in {timeout:.0f} s"
                )
                raise RuntimeError(
                    f"adamd serve did not start ({why}):\n{server.log.read_text()}"
                ) from None


def stop_process(proc: subprocess.Popen[Any], timeout: float = 15) -> None:
    """SIGTERM, up to `timeout` seconds for it to end, then SIGKILL."""
    proc.terminate()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def python_subprocess_env() -> dict[str, str]:
    """Environment for helper subprocesses: the repo root importable (for `-m bench.*`)."""
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    return env
