"""Sharding across separate network hosts: three `adamd serve` processes, each in its own Linux
network namespace, and four training workers in another, joined by a bridge (veth pairs into a
switch namespace). Sync training through the three shards is bitwise equal to a local fused Adam
fed the mean gradient; in durable mode a shard killed with SIGKILL mid-run and restarted loses
nothing and training goes on bitwise as if nothing happened; in periodic mode it comes back
behind the others and every worker stops with an error naming it.

Needs root (`ip netns add`); skipped with the reason where namespaces cannot be created.
Namespaces are named `adsh<pid>...`, addresses are in 10.71.0.0/16, and both go at teardown.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from adamd.client import Client, NotFound
from bench.netns import Switch

from .. import workers

ADAMD = str(Path(sys.executable).with_name("adamd"))
WORLD = 4
SHARDS = 3
STEPS = 10
SLICE = 2048  # bytes: workers.SHAPES' "w" (6 KiB) is split over 3 shards, "v" (4000 B) over 2
PORT = 50051


@pytest.fixture
def net() -> Iterator[Switch]:
    if shutil.which("ip") is None:
        pytest.skip("needs iproute2's `ip` to build network namespaces")
    try:
        n = Switch.create(f"adsh{os.getpid() % 100000}", 1 + os.getpid() % 250)
    except (subprocess.CalledProcessError, PermissionError) as exc:
        err = getattr(exc, "stderr", b"") or b""
        pytest.skip(f"cannot create a network namespace (needs root): {err.decode().strip()}")
    try:
        yield n
    finally:
        n.close()


class ShardServer:
    """`adamd serve --no-shm` in its own namespace, on its own address; restartable."""

    def __init__(self, ns: str, address: str, data_dir: Path, *flags: str):
        self.ns, self.ip, self.data_dir, self.flags = ns, address, data_dir, flags
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    @property
    def address(self) -> str:
        return f"{self.ip}:{PORT}"

    def start(self) -> None:
        log = self.data_dir.parent / f"{self.ns}-{self.starts}.log"
        self.starts += 1
        with open(log, "wb") as out:
            self.proc = subprocess.Popen(
                [
                    *("ip", "netns", "exec", self.ns, ADAMD, "serve", "--no-shm"),
                    *("--host", self.ip, "--grpc-port", str(PORT), "--http-port", "8080"),
                    *("--data-dir", str(self.data_dir), "--device", "cpu", *self.flags),
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
                env={**os.environ, "OMP_NUM_THREADS": "1"},
            )
        deadline = time.monotonic() + 60
        while "adamd serving gRPC" not in log.read_text():
            assert self.proc.poll() is None, f"server exited: {log.read_text()}"
            assert time.monotonic() < deadline, f"server did not start: {log.read_text()}"
            time.sleep(0.05)

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()  # `ip netns exec` execs adamd: this is SIGKILL to the server itself
        self.proc.wait(timeout=30)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)


@pytest.fixture
def cluster(
    net: Switch, tmp_path: Path, request: pytest.FixtureRequest
) -> Iterator[list[ShardServer]]:
    flags: tuple[str, ...] = getattr(request, "param", ())
    servers = []
    for k in range(SHARDS):
        ns = net.host(f"s{k}", 10 + k)
        servers.append(ShardServer(ns, net.address(10 + k), tmp_path / f"data{k}", *flags))
    net.plug_root(200)
    try:
        for s in servers:
            s.start()
        yield servers
    finally:
        for s in servers:
            s.stop()


def _train(net: Switch, servers: list[ShardServer], tmp: Path, steps: int, sleep: float) -> list:
    ns = net.host("w", 100)
    address = ",".join(s.address for s in servers)
    outs = [tmp / f"rank{r}.pt" for r in range(WORLD)]
    extra = ("--steps", str(steps), "--slice-bytes", str(SLICE), "--step-sleep", str(sleep))
    return [
        workers.launch(r, WORLD, address, "m", outs[r], *extra, prefix=("ip", "netns", "exec", ns))
        for r in range(WORLD)
    ]


def _check(servers: list[ShardServer], procs: list, tmp: Path, steps: int) -> None:
    workers.finish(dict(enumerate(procs)), timeout=240)
    expected = workers.reference([list(range(WORLD))] * steps)
    for r in range(WORLD):
        out = workers.load(tmp / f"rank{r}.pt")
        assert out["version"] == steps
        for n, t in expected.items():
            assert torch.equal(out["params"][n], t), (r, n)
    with Client([s.address for s in servers], slice_bytes=SLICE) as c:
        layout = c.layout("m")
        assert layout.params["v"].sliced or layout.params["w"].sliced
        assert all(layout.names_on(k) for k in range(SHARDS))
        info = c.describe("m")
        assert info.shard_versions == (steps,) * SHARDS
        pulled = c.pull_params("m")
        for n, t in expected.items():
            assert torch.equal(pulled[n], t), n


def test_sync_workers_train_through_three_shards_on_three_hosts(
    net: Switch, cluster: list[ShardServer], tmp_path: Path
) -> None:
    procs = _train(net, cluster, tmp_path, STEPS, 0.0)
    _check(cluster, procs, tmp_path, STEPS)


@pytest.mark.parametrize("cluster", [("--durable",)], indirect=True)
def test_durable_shard_killed_mid_run_loses_nothing(
    net: Switch, cluster: list[ShardServer], tmp_path: Path
) -> None:
    procs = _train(net, cluster, tmp_path, STEPS, 0.1)
    with Client(cluster[1].address, retry_timeout=120) as shard1:
        _wait_version(shard1, 3)
    cluster[1].kill()
    cluster[1].start()
    _check(cluster, procs, tmp_path, STEPS)


@pytest.mark.parametrize("cluster", [("--snapshot-every-s=0",)], indirect=True)
def test_periodic_shard_restarted_behind_stops_training_naming_it(
    net: Switch, cluster: list[ShardServer], tmp_path: Path
) -> None:
    """Without --durable, a shard killed mid-run comes back at its last snapshot, behind the
    others: every worker stops with an error naming that shard and its version, and no shard
    trains on from a mix of versions."""
    procs = _train(net, cluster, tmp_path, 40, 0.2)
    with Client(cluster[1].address, retry_timeout=120) as shard1:
        _wait_version(shard1, 3)
        saved = shard1.snapshot("m").version  # the version shard 1 will come back at
        _wait_version(shard1, saved + 2)
    cluster[1].kill()
    cluster[1].start()
    outputs = []
    for p in procs:
        out, _ = p.communicate(timeout=240)
        assert p.returncode != 0, out.decode()[-2000:]
        outputs.append(out.decode())
    behind = f"shard 1 ({cluster[1].address}) at version {saved}"
    for text in outputs:
        assert "FailedPrecondition" in text and behind in text, text[-3000:]
    with Client(cluster[1].address) as shard1:
        assert shard1.describe("m").version == saved  # it took no step from a mixed round


def _wait_version(client: Client, version: int) -> None:
    deadline = time.monotonic() + 180
    while True:
        try:
            if client.describe("m").version >= version:
                return
        except NotFound:
            pass  # not created yet
        assert time.monotonic() < deadline, f"training did not reach version {version}"
        time.sleep(0.02)
