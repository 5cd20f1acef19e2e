"""`adamd serve` as a child process, the way a user runs it: for the system tests.

`serve` starts one on free ports and yields once it logged its addresses; `stop` signals it and
collects the rest of its log; `Server` is one on a fixed port over one data dir that a test can
kill and start again.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

ADAMD = [sys.executable, "-m", "adamd.server.cli"]
ADAMD_SCRIPT = str(Path(sys.executable).with_name("adamd"))
READY = re.compile(r"serving gRPC on (\S+) and HTTP on (\S+)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def serve(*args: str, tmp: Path) -> Iterator[tuple[subprocess.Popen[str], str, str, list[str]]]:
    proc = subprocess.Popen(
        [
            *ADAMD,
            "serve",
            "--grpc-port",
            "0",
            "--http-port",
            "0",
            "--data-dir",
            str(tmp / "data"),
            *args,
        ],
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    lines: list[str] = []
    assert proc.stderr is not None
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            line = proc.stderr.readline()
            if not line:
                break
            lines.append(line)
            m = READY.search(line)
            if m:
                yield proc, m.group(1), m.group(2), lines
                return
        pytest.fail("adamd serve did not log its addresses:\n" + "".join(lines))
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)
        proc.stderr.close()


def stop(proc: subprocess.Popen[str], sig: int, lines: list[str]) -> int:
    proc.send_signal(sig)
    assert proc.stderr is not None
    _, rest = proc.communicate(timeout=30)
    lines.append(rest)
    return proc.returncode


class Server:
    """`adamd serve` as a child process on a fixed port, restartable over one data dir."""

    def __init__(self, data_dir: Path, *flags: str):
        self.data_dir = data_dir
        self.port = free_port()
        self.flags = flags
        self.proc: subprocess.Popen[bytes] | None = None
        self.logs: list[Path] = []

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> None:
        log = self.data_dir.parent / f"server-{len(self.logs)}.log"
        self.logs.append(log)
        with open(log, "wb") as out:
            self.proc = subprocess.Popen(
                [
                    *(ADAMD_SCRIPT, "serve", "--grpc-port", str(self.port), "--http-port", "-1"),
                    *("--data-dir", str(self.data_dir), "--device", "cpu", *self.flags),
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
            )

    def kill(self, sig: int = signal.SIGKILL) -> int:
        assert self.proc is not None
        self.proc.send_signal(sig)
        return self.proc.wait(timeout=60)

    def restored_version(self, index: int = -1) -> int | None:
        """The version the index-th start restored (from its log), None if it restored nothing."""
        deadline = time.monotonic() + 120  # a loaded 2-core machine can take long to import torch
        while time.monotonic() < deadline:
            text = self.logs[index].read_text()
            m = re.search(r"model m: restored version (\d+)", text)
            if m:
                return int(m[1])
            if "adamd serving gRPC" in text:
                return None
            time.sleep(0.02)
        raise AssertionError(f"server did not start: {self.logs[index].read_text()}")

    def wait_started(self, timeout: float = 180.0) -> str:
        """The log of the latest start, once it serves (slow on a loaded machine)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = self.logs[-1].read_text()
            if "adamd serving gRPC" in text:
                return text
            assert self.proc is not None and self.proc.poll() is None, f"server exited: {text}"
            time.sleep(0.05)
        raise AssertionError(f"server did not start in {timeout} s: {self.logs[-1].read_text()}")
