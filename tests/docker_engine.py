"""A Docker engine and the adamd image for the container tests, with no set-up by hand.

`engine()` makes one ready, as `make browser` does for Chromium: it installs Debian's `docker.io`
when `dockerd` is missing (root, apt), starts `dockerd` when none answers and stops it again at the
end; makes the base image (`deploy/debian-base.sh`: from Debian's packages, cached as
`adamd-base:bookworm`, since no container registry is reachable here; `ADAMD_TEST_BASE_IMAGE`
names another, such as `python:3.11-slim`, which the engine then pulls); fills the wheelhouse
`deploy/wheels` from the package indexes with the versions constraints.txt pins (torch's CPU wheel
included) and builds `deploy/Dockerfile` from it with `--network none`. A dockerd started here has
no bridge network (`--bridge=none`, no iptables rules): its containers use the host's network on
loopback addresses only, so nothing travels to any other address.

Only where no engine can be started at all does it raise `Unavailable` (the tests skip, saying
why).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
WHEELS = DEPLOY / "wheels"
BASE_IMAGE = os.environ.get("ADAMD_TEST_BASE_IMAGE", "adamd-base:bookworm")
IMAGE = "adamd:test"
STATE = Path("/tmp/adamd-test-dockerd")  # pidfile, log and exec-root of a dockerd started here


class Unavailable(Exception):
    """No Docker engine can be started on this machine (the message says why)."""


def docker(*args: str, timeout: float = 120, check: bool = True) -> str:
    """`docker ARGS`; its stdout. Raises AssertionError with stderr when it fails and `check`."""
    done = subprocess.run(
        ["docker", *args], capture_output=True, text=True, timeout=timeout, check=False
    )
    if check and done.returncode != 0:
        raise AssertionError(f"docker {' '.join(args)} exited {done.returncode}: {done.stderr}")
    return done.stdout


def _answers() -> bool:
    if shutil.which("docker") is None:
        return False
    try:
        done = subprocess.run(["docker", "info"], capture_output=True, timeout=30, check=False)
    except subprocess.TimeoutExpired:  # an engine still starting, or stuck: not answering
        return False
    return done.returncode == 0


def _install() -> None:
    if shutil.which("dockerd") and shutil.which("docker"):
        return
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        raise Unavailable("no Docker engine: dockerd is missing and apt-get (as root) is not here")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", "docker.io"]):
        done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
        if done.returncode != 0:
            raise Unavailable(f"could not install docker.io: {' '.join(cmd)}: {done.stderr[-500:]}")


def _start_dockerd() -> subprocess.Popen[bytes]:
    if os.geteuid() != 0:
        raise Unavailable("no Docker engine answers and dockerd needs root to start")
    STATE.mkdir(exist_ok=True)
    log = (STATE / "dockerd.log").open("wb")
    proc = subprocess.Popen(
        [
            "dockerd",
            "--bridge=none",  # no docker0 and no 172.x addresses: containers use --network host
            "--iptables=false",
            "--ip6tables=false",
            f"--pidfile={STATE / 'dockerd.pid'}",
            f"--exec-root={STATE / 'exec'}",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    log.close()
    deadline = time.monotonic() + 60
    while not _answers():
        if proc.poll() is not None or time.monotonic() > deadline:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            proc.wait()
            tail = (STATE / "dockerd.log").read_text(errors="replace")[-1500:]
            raise Unavailable(f"dockerd did not start (exit {proc.returncode}):\n{tail}")
        time.sleep(0.5)
    return proc


def _stop_dockerd(proc: subprocess.Popen[bytes]) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def base_image() -> str:
    """The base image: cached, or built from Debian's packages (about a minute), or pulled."""
    present = subprocess.run(
        ["docker", "image", "inspect", BASE_IMAGE], capture_output=True, timeout=30, check=False
    )
    if present.returncode == 0:
        return BASE_IMAGE
    if BASE_IMAGE.startswith("adamd-base:"):
        done = subprocess.run(
            ["sh", str(DEPLOY / "debian-base.sh"), BASE_IMAGE],
            capture_output=True,
            text=True,
            timeout=900,
        )
        assert done.returncode == 0, f"deploy/debian-base.sh failed:\n{done.stdout}{done.stderr}"
    else:
        docker("pull", BASE_IMAGE, timeout=600)
    return BASE_IMAGE


def wheelhouse() -> Path:
    """deploy/wheels: adamd[server]'s wheels at constraints.txt's versions, and setuptools (to
    build adamd itself with --no-index). Filled again only when pyproject or constraints change."""
    key = hashlib.sha256(
        (ROOT / "pyproject.toml").read_bytes() + (ROOT / "constraints.txt").read_bytes()
    ).hexdigest()
    stamp = WHEELS / ".filled"
    if stamp.exists() and stamp.read_text() == key:
        return WHEELS
    WHEELS.mkdir(exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--disable-pip-version-check"]
    cmd += ["-d", str(WHEELS), "-c", str(ROOT / "constraints.txt"), "--only-binary", ":all:"]
    cmd += [f"{ROOT}[server]", "setuptools>=68"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert done.returncode == 0, f"pip download failed:\n{done.stderr[-3000:]}"
    stamp.write_text(key)
    return WHEELS


def build_image() -> str:
    """deploy/Dockerfile built offline (`--network none`) from the base and the wheelhouse."""
    base = base_image()
    wheels = wheelhouse().relative_to(ROOT)
    docker(
        "build",
        "-q",
        "--network=none",
        "-f",
        str(DEPLOY / "Dockerfile"),
        "-t",
        IMAGE,
        "--build-arg",
        f"BASE_IMAGE={base}",
        "--build-arg",
        f"WHEELS={wheels}",
        str(ROOT),
        timeout=900,
    )
    return IMAGE


@contextlib.contextmanager
def engine() -> Iterator[str]:
    """A Docker engine that answers and the adamd image built on it (its tag). A dockerd started
    here is stopped on exit, also when the body fails."""
    started = None
    if not _answers():
        _install()
        started = _start_dockerd()
    try:
        yield build_image()
    finally:
        if started is not None:
            _stop_dockerd(started)


def compose() -> list[str] | None:
    """How to run Compose here: the `docker compose` plugin, or Debian's `docker-compose`
    (installed when missing, as root); None where neither can be had."""
    plugin = subprocess.run(
        ["docker", "compose", "version"], capture_output=True, timeout=30, check=False
    )
    if plugin.returncode == 0:
        return ["docker", "compose"]
    if shutil.which("docker-compose") is None and os.geteuid() == 0 and shutil.which("apt-get"):
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        for cmd in (
            ["apt-get", "update", "-qq"],
            ["apt-get", "install", "-y", "-qq", "docker-compose"],
        ):
            subprocess.run(cmd, capture_output=True, env=env, timeout=600, check=False)
    return ["docker-compose"] if shutil.which("docker-compose") else None
