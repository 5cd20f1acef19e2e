"""A local `adamd serve` for the examples run without `--server`: a real daemon subprocess on free
loopback ports, its log kept for a failure message, stopped with SIGTERM (which writes final
snapshots) when the `with` block ends.

Not an example of its own; the examples import it so that each runs in one command.
"""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

_READY = re.compile(r"serving gRPC on (\S+) and HTTP on (\S+)")


@dataclass
class LocalServer:
    grpc_address: str  # host:port for Client / RemoteAdam
    http_url: str  # the dashboard, /metrics, /v1/...
    data_dir: Path  # where its snapshots go
    log: list[str] = field(default_factory=list)  # its stderr, line by line
    proc: subprocess.Popen[str] | None = None

    def dashboard(self, model: str) -> str:
        return f"{self.http_url}/#{model}"

    def stop(self) -> None:
        """SIGTERM: the daemon drains in-flight steps and writes a final snapshot of every model."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@contextmanager
def local_server(data_dir: Path | str | None = None, *flags: str) -> Iterator[LocalServer]:
    """`adamd serve` on free ports. Without `data_dir` its snapshots go to a temporary directory,
    removed afterwards; with one, a later server on the same directory restores them."""
    with tempfile.TemporaryDirectory(prefix="adamd-example-") as tmp:
        where = Path(data_dir) if data_dir is not None else Path(tmp)
        cmd = [sys.executable, "-m", "adamd.server.cli", "serve", "--grpc-port", "0"]
        cmd += ["--http-port", "0", "--device", "cpu", "--data-dir", str(where), *flags]
        proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
        log: list[str] = []
        ready = threading.Event()
        found: list[str] = []

        def drain() -> None:  # read to the end, or the daemon blocks once the pipe is full
            assert proc.stderr is not None
            for line in proc.stderr:
                log.append(line)
                m = _READY.search(line)
                if m and not ready.is_set():
                    found.extend(m.groups())
                    ready.set()
            ready.set()  # exited before serving: `found` stays empty

        reader = threading.Thread(target=drain, daemon=True)
        reader.start()
        server = LocalServer("", "", where, log, proc)
        try:
            ready.wait(120)
            if not found:
                raise RuntimeError("adamd serve did not start:\n" + "".join(log))
            server.grpc_address, server.http_url = found
            yield server
        finally:
            server.stop()
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            reader.join(10)
            if proc.stderr is not None:
                proc.stderr.close()
