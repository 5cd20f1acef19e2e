"""What a new user meets first: the rank error and the errors
docs/troubleshooting.md explains, each produced for real against a server on loopback."""

from __future__ import annotations

import socket
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait

import grpc
import pytest
import torch

from adamd.client import (
    Client,
    DuplicatePush,
    NotFound,
    RemoteAdam,
    StalePush,
    Unauthenticated,
    Unavailable,
)
from adamd.server import Daemon

from ..conftest import running_daemon


def _params() -> list[torch.nn.Parameter]:
    return [torch.nn.Parameter(torch.zeros(4))]


@pytest.mark.parametrize("how", ["argument", "env"])
def test_several_workers_without_a_rank_fail_at_construction_naming_rank_and_RANK(
    daemon: Daemon, model_name: str, monkeypatch: pytest.MonkeyPatch, how: str
) -> None:
    monkeypatch.delenv("RANK", raising=False)
    kwargs: dict[str, int] = {}
    if how == "argument":
        kwargs["world_size"] = 3
    else:
        monkeypatch.setenv("WORLD_SIZE", "3")  # as a hand-made launcher might set it
    with pytest.raises(ValueError, match=r"world_size=3 needs .*rank=.*RANK") as err:
        RemoteAdam(_params(), server=daemon.grpc_address, model=model_name, **kwargs)
    assert "0..2" in str(err.value)
    with Client(daemon.grpc_address) as c, pytest.raises(NotFound):
        c.describe(model_name)  # refused before anything reached the server


def test_a_rank_from_RANK_or_the_argument_is_taken_and_checked_against_world_size(
    daemon: Daemon, model_name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RANK", "2")
    with pytest.raises(ValueError, match=r"rank 2 is outside 0\.\.1 for world_size=2"):
        RemoteAdam(_params(), server=daemon.grpc_address, model=model_name, world_size=2)
    opt = RemoteAdam(_params(), server=daemon.grpc_address, model=model_name, world_size=3)
    try:
        assert opt.rank == 2
    finally:
        opt.close()
    monkeypatch.delenv("RANK")
    alone = RemoteAdam(_params(), server=daemon.grpc_address, model=model_name + "-1")
    try:
        assert (alone.rank, alone.world_size) == (0, 1)  # one worker needs no rank
    finally:
        alone.close()


# --- the README's Troubleshooting section, claim by claim --------------------------------------


def test_connection_refused_is_unavailable_after_the_retry_window() -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{s.getsockname()[1]}"
    with Client(address, retry_timeout=1.0) as c:
        start = time.monotonic()
        with pytest.raises(Unavailable, match=address):
            c.list_models()
        # Retried with backoff, then gave up: the client stops once its next (jittered) wait
        # would pass the window, so the shortest run is 0.025 + 0.05 + 0.1 + 0.2 s of waits.
        assert 0.35 < time.monotonic() - start < 10


def test_a_missing_or_wrong_token_is_unauthenticated(model_name: str) -> None:
    with running_daemon(token="s3cret") as d:
        for token in (None, "wrong"):
            with Client(d.grpc_address, token=token) as c, pytest.raises(Unauthenticated):
                c.list_models()
        with Client(d.grpc_address, token="s3cret") as c:
            assert c.list_models() == []


def test_two_workers_sharing_a_rank_get_duplicate_push(daemon: Daemon, model_name: str) -> None:
    g = {"w": torch.ones(2)}
    with Client(daemon.grpc_address) as c, ThreadPoolExecutor(2) as pool:
        c.create_model(model_name, {"w": torch.zeros(2)}, world_size=2, round_timeout_s=30)
        # Two workers both left at rank 0: whichever comes second is refused at once, the
        # first waits for rank 1, which completes the round.
        pushes = [pool.submit(c.push_grad, model_name, g, version=0, rank=0) for _ in range(2)]
        done, _ = wait(pushes, timeout=30, return_when=FIRST_COMPLETED)
        with pytest.raises(DuplicatePush, match="rank 0 already pushed for version 0"):
            done.pop().result()
        assert c.push_grad(model_name, g, version=0, rank=1).contributors == 2
        assert c.describe(model_name).version == 1


def test_a_remote_adam_refused_as_stale_has_pulled_the_fresh_parameters(
    daemon: Daemon, model_name: str
) -> None:
    """Async, max_staleness=1: a worker whose gradient is two versions old gets StalePush, and
    its next step (from the parameters it now holds) is applied."""
    nets = [torch.nn.Linear(3, 1) for _ in range(2)]
    kw = {"server": daemon.grpc_address, "model": model_name, "mode": "async", "max_staleness": 1}
    a, b = (RemoteAdam(net.parameters(), lr=0.1, **kw) for net in nets)  # type: ignore[arg-type]
    try:
        for net in nets:
            net(torch.ones(3)).sum().backward()  # both from version 0
        b.step()
        b.step()
        with pytest.raises(StalePush):
            a.step()
        assert a.version == 2
        assert all(torch.equal(p, q) for p, q in zip(nets[0].parameters(), nets[1].parameters()))
        a.step()  # the same gradient, now pushed from version 2
        assert a.last_result is not None and a.last_result.applied and a.version == 3
    finally:
        a.close()
        b.close()


def test_one_message_over_64_mib_is_resource_exhausted(daemon: Daemon) -> None:
    """adamd's Client streams 4 MiB chunks; a hand-written gRPC client that sends a whole tensor
    in one message hits the 64 MiB limit both sides set."""
    with grpc.insecure_channel(daemon.grpc_address) as ch:
        call = ch.unary_unary("/adamd.v1.Optimizer/DescribeModel")
        with pytest.raises(grpc.RpcError) as err:
            call(b"\0" * (65 << 20), timeout=60)
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
