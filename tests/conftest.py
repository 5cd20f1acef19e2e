"""Shared fixtures: a real daemon (gRPC + HTTP) on loopback port 0, clients, unique model names."""

from __future__ import annotations

import contextlib
import hashlib
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import torch

from adamd.client import Client

if TYPE_CHECKING:
    from adamd.server import Daemon


@contextlib.contextmanager
def running_daemon(**overrides: Any) -> Iterator[Daemon]:
    """A daemon on free loopback ports with a fresh data dir, stopped on exit. (Imported here:
    the core's GPU tests run where the daemon's extras are not installed.)"""
    from adamd.server import Daemon, ServerConfig

    with tempfile.TemporaryDirectory(prefix="adamd-test-") as tmp:
        settings: dict[str, Any] = {
            "grpc_port": 0,
            "http_port": 0,
            "data_dir": Path(tmp),
            "device": "cpu",
        }
        settings.update(overrides)
        daemon = Daemon(ServerConfig(**settings)).start()
        try:
            yield daemon
        finally:
            daemon.stop(grace=1.0)


@pytest.fixture(scope="session")
def daemon() -> Iterator[Daemon]:
    with running_daemon() as d:
        yield d


@pytest.fixture
def client(daemon: Daemon) -> Iterator[Client]:
    with Client(daemon.grpc_address) as c:
        yield c


@pytest.fixture
def model_name(request: pytest.FixtureRequest) -> str:
    """A model name unique to the test (the session daemon is shared)."""
    name = re.sub(r"[^A-Za-z0-9._-]", "-", request.node.name)
    if len(name) > 100:
        name = name[:80] + "-" + hashlib.sha1(name.encode()).hexdigest()[:12]
    return name


def snapshot(model: Any) -> dict[str, torch.Tensor]:
    """Every parameter and optimizer-state tensor of a hosted model, cloned, for bitwise comparison."""
    # On CUDA the model steps on its own stream: copied to the host on that stream, after its
    # last step (a copy on another stream could read the tensors mid-step).
    with model.locked(), model.on_device():
        out = {f"param/{n}": p.detach().to("cpu", copy=True) for n, p in model.params.items()}
        for p, state in model.optimizer.state.items():
            name = next(n for n, q in model.params.items() if q is p)
            for k, v in state.items():
                out[f"state/{name}/{k}"] = v.detach().to("cpu", copy=True)
        out["version"] = torch.tensor(model.version)
    return out


def assert_bitwise_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
