"""The image of deploy/Dockerfile, built and run: three shard containers train one model.

tests/docker_engine.py makes an engine ready (installs docker.io, starts dockerd, builds the base
image and the image offline). The shards run as the image's entrypoint with the flags
deploy/compose.yaml gives them: durable, a volume each, the token from a file, as uid 10001 on a
read-only root with every capability dropped. They share the host's network and listen on
127.0.0.1 (distinct ports), so all traffic stays on loopback. Two worker processes
(tests/workers.py) train in sync mode; the test process recomputes every step with a local fused
Adam. Every container and volume is removed at the end, also when the test fails.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import torch
import yaml

from adamd.client import Client

from .. import docker_engine, workers
from ..docker_engine import docker

pytestmark = [pytest.mark.container, pytest.mark.timeout(900)]

PREFIX = f"adamd-test-{os.getpid()}"
SHARDS = 3
TOKEN_IN_CONTAINER = "/run/secrets/adamd-token"


@pytest.fixture(scope="module")
def image() -> Iterator[str]:
    try:
        with docker_engine.engine() as tag:
            yield tag
    except docker_engine.Unavailable as exc:
        pytest.skip(f"no Docker engine can be started here: {exc}")


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


class Shards:
    """Three shard containers of `image`, each with a volume, listening on 127.0.0.1."""

    def __init__(self, image: str, token: Path) -> None:
        self.image, self.token = image, token
        ports = _free_ports(3 * SHARDS)
        self.ports = [ports[3 * k : 3 * k + 3] for k in range(SHARDS)]  # grpc, bulk, http
        self.volumes = [f"{PREFIX}-data{k}" for k in range(SHARDS)]
        self.containers: list[str] = []  # every container started, for the clean-up
        self.names: list[str] = []  # the current one of each shard
        self.generation = 0

    @property
    def servers(self) -> str:
        return ",".join(f"127.0.0.1:{grpc}" for grpc, _, _ in self.ports)

    def run(self) -> None:
        """New containers on the shards' volumes (a generation of them)."""
        self.names = []
        for k, (grpc, bulk, http) in enumerate(self.ports):
            name = f"{PREFIX}-g{self.generation}-shard{k}"
            self.containers.append(name)
            docker(
                "run",
                "-d",
                f"--name={name}",
                "--network=host",
                "--read-only",
                "--tmpfs=/tmp",
                "--cap-drop=ALL",
                "--security-opt=no-new-privileges",
                "--health-interval=2s",
                f"--volume={self.volumes[k]}:/data",
                f"--volume={self.token}:{TOKEN_IN_CONTAINER}:ro",
                f"--env=ADAMD_HEALTH_URL=http://127.0.0.1:{http}/healthz",
                "--stop-timeout=60",
                self.image,
                "--host=127.0.0.1",
                f"--grpc-port={grpc}",
                f"--bulk-port={bulk}",
                f"--http-port={http}",
                f"--token-file={TOKEN_IN_CONTAINER}",
                "--durable",
            )
            self.names.append(name)
        self.generation += 1
        for k in range(SHARDS):
            self.wait_ready(k)

    def wait_ready(self, k: int, timeout: float = 120) -> None:
        url = f"http://127.0.0.1:{self.ports[k][2]}/readyz"
        deadline = time.monotonic() + timeout
        while True:
            with_status = docker("inspect", "-f", "{{.State.Status}}", self.names[k]).strip()
            assert with_status == "running", f"shard {k} {with_status}:\n{self.logs(k)}"
            try:
                if httpx.get(url, timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, f"shard {k} not ready:\n{self.logs(k)}"
            time.sleep(0.3)

    def health(self, k: int) -> str:
        return docker("inspect", "-f", "{{.State.Health.Status}}", self.names[k]).strip()

    def logs(self, k: int) -> str:
        done = subprocess.run(
            ["docker", "logs", "--tail=40", self.names[k]],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        return done.stdout + done.stderr  # the daemon logs on stderr

    def remove(self) -> None:
        for args in [("rm", "-f", "-v", n) for n in self.containers] + [
            ("volume", "rm", "-f", v) for v in self.volumes
        ]:
            with contextlib.suppress(subprocess.TimeoutExpired):  # remove the rest regardless
                docker(*args, check=False)


@pytest.fixture
def shards(image: str, tmp_path: Path) -> Iterator[Shards]:
    token = tmp_path / "token"
    token.write_text("s3cret-container\n")
    token.chmod(0o644)  # read by uid 10001 inside the container
    s = Shards(image, token)
    try:
        s.run()
        yield s
    finally:
        s.remove()


def _train(
    shards: Shards, model: str, tmp: Path, steps: int, *extra: str
) -> tuple[dict[int, subprocess.Popen[bytes]], list[Path]]:
    outs = [tmp / f"{model}-rank{r}.pt" for r in range(2)]
    procs = {
        r: workers.launch(
            r,
            2,
            shards.servers,
            model,
            outs[r],
            "--steps",
            str(steps),
            "--token-file",
            str(shards.token),
            *extra,
        )
        for r in range(2)
    }
    return procs, outs


def _equal(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert got.keys() == want.keys()
    for n in want:
        assert torch.equal(got[n], want[n]), n


def test_three_shard_containers_train_survive_a_killed_shard_and_resume_after_stop(
    shards: Shards, tmp_path: Path
) -> None:
    token = shards.token.read_text().strip()
    steps = 24
    want = workers.reference([[0, 1]] * steps)
    # The container's log names the address it bound and the user it runs as is 10001.
    assert "HTTP on http://127.0.0.1:" in shards.logs(0)
    assert docker("exec", shards.names[0], "id", "-u").strip() == "10001"

    # Uninterrupted: two sync workers over the three containers, bitwise a local fused Adam.
    procs, outs = _train(shards, "plain", tmp_path, steps)
    try:
        workers.finish(procs, timeout=240)
    finally:
        workers.stop_all(procs)
    for out in outs:
        result = workers.load(out)
        assert result["version"] == steps
        _equal(result["params"], want)

    # docker kill of shard 1 mid-run, docker start again: the workers' pushes wait for it, and
    # (durable) it comes back at its version: the end is bitwise the uninterrupted run's.
    procs, outs = _train(shards, "killed", tmp_path, steps, "--step-sleep", "0.2")
    try:
        with Client(shards.servers, token=token) as c:
            deadline = time.monotonic() + 180
            while True:
                with_models = [m.name for m in c.list_models()]
                at = c.describe("killed").shard_versions if "killed" in with_models else (0,)
                if min(at) >= 4:
                    break
                assert time.monotonic() < deadline, "training never reached step 4"
                time.sleep(0.1)
            docker("kill", shards.names[1])
            assert docker("inspect", "-f", "{{.State.Running}}", shards.names[1]).strip() == "false"
            assert max(at) < steps - 4, "the run was about to end before the shard was killed"
            time.sleep(1)  # the workers' pushes find it gone
            docker("start", shards.names[1])
            shards.wait_ready(1)
        workers.finish(procs, timeout=240)
    finally:
        workers.stop_all(procs)
    for out in outs:
        result = workers.load(out)
        assert result["version"] == steps
        _equal(result["params"], want)
    assert all(shards.health(k) == "healthy" for k in range(SHARDS) if k != 1)

    # docker stop of every shard writes final snapshots; new containers on the same volumes
    # resume every model at the same versions, with the same parameters.
    with Client(shards.servers, token=token) as c:
        before = {m: c.describe(m).shard_versions for m in ("plain", "killed")}
        params = {m: c.pull(m).params for m in ("plain", "killed")}
    assert before == {"plain": (steps,) * SHARDS, "killed": (steps,) * SHARDS}
    for name in shards.names:
        docker("stop", name, timeout=120)
    for name in shards.names:
        assert docker("inspect", "-f", "{{.State.ExitCode}}", name).strip() == "0"
    shards.run()
    with Client(shards.servers, token=token) as c:
        assert {m: c.describe(m).shard_versions for m in before} == before
        for m, p in params.items():
            _equal(c.pull(m).params, p)
        _equal(params["killed"], want)


def test_compose_starts_three_healthy_shards_and_its_worker_trains_over_them(
    image: str, tmp_path: Path
) -> None:
    """deploy/compose.yaml as a user runs it (`up`, then `run worker`), on 127.0.0.2."""
    cmd = docker_engine.compose()
    if cmd is None:
        pytest.skip("neither `docker compose` nor Debian's docker-compose can be had here")
    token = tmp_path / "token"
    token.write_text("s3cret-compose\n")
    token.chmod(0o644)
    env = {
        **os.environ,
        "ADAMD_IMAGE": image,
        "ADAMD_HOST": "127.0.0.2",
        "ADAMD_TOKEN_HOST_FILE": str(token),
    }
    compose = [*cmd, "-p", f"{PREFIX}-compose", "-f", str(docker_engine.DEPLOY / "compose.yaml")]

    def run(*args: str, timeout: float = 180) -> str:
        done = subprocess.run(
            [*compose, *args], capture_output=True, text=True, env=env, timeout=timeout
        )
        assert done.returncode == 0, f"{' '.join(args)}:\n{done.stdout}\n{done.stderr}"
        return done.stdout

    config = yaml.safe_load(run("config"))
    shards = [f"shard{k}" for k in range(SHARDS)]
    assert sorted(config["services"]) == sorted([*shards, "worker"])
    for name, service in config["services"].items():
        assert service["network_mode"] == "host", name  # no bridge: loopback addresses only
    assert len({config["services"][s]["volumes"][0].split(":")[0] for s in shards}) == SHARDS
    try:
        run("up", "-d", "--no-build", *shards)
        ids = run("ps", "-q").split()
        assert len(ids) == SHARDS
        deadline = time.monotonic() + 120
        while {docker("inspect", "-f", "{{.State.Health.Status}}", i).strip() for i in ids} != {
            "healthy"
        }:
            assert time.monotonic() < deadline, "the shards did not turn healthy"
            time.sleep(1)
        out = run("run", "--rm", "-e", "ADAMD_STEPS=20", "worker")
        assert "rank 0 step 19 version 20" in out, out
        servers = config["services"]["worker"]["environment"]["ADAMD_SERVERS"]
        with Client(servers, token="s3cret-compose") as c:
            assert c.describe("compose-demo").shard_versions == (20,) * SHARDS
    finally:
        subprocess.run(
            [*compose, "down", "-v", "--remove-orphans"], env=env, capture_output=True, timeout=180
        )
