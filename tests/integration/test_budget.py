"""The transfer-memory budget (--max-transfer-bytes): concurrent pulls and pushes wait their turn
instead of each holding host memory, a transfer larger than the budget is refused up front, a
stalled reader gives its share back at the idle deadline, and sync rounds that fit still step."""

from __future__ import annotations

import asyncio
import threading
import time
import urllib.request
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
import torch

from adamd.client import Client, LimitExceeded
from adamd.server import ServerConfig
from adamd.server.config import ConfigError
from adamd.server.core.budget import TransferBudget
from adamd.server.errors import LimitExceeded as ServerLimitExceeded
from adamd.server.errors import Unavailable
from adamd.v1 import adamd_pb2 as pb

from ..conftest import running_daemon

MiB = 1 << 20


@pytest.fixture(scope="module")
def small() -> Iterator[Any]:
    """A daemon whose transfers may hold 3 MiB at once (a 2 MiB model's pull needs 2 MiB+)."""
    with running_daemon(max_transfer_bytes=3 * MiB, shm=False, stream_idle_s=20.0) as d:
        yield d


def _grpc(daemon: Any, **kwargs: Any) -> Client:
    return Client(daemon.grpc_address, transport="grpc", **kwargs)


def test_concurrent_pulls_wait_their_turn_and_stay_within_the_budget(small: Any) -> None:
    w = torch.arange(512 * 1024, dtype=torch.float32)  # 2 MiB: two pulls never fit at once
    with _grpc(small) as c:
        c.create_model("pulls", {"w": w}, lr=0.1)
    before, waits = small.transfers.peak, small.transfers.waits
    results: list[torch.Tensor] = []
    errors: list[BaseException] = []
    start = threading.Barrier(12)

    def pull() -> None:
        try:
            with _grpc(small) as c:
                c.describe("pulls")  # connected before the pulls start together
                start.wait(30)
                results.append(c.pull_params("pulls")["w"])
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=pull) for _ in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    assert len(results) == 12 and all(torch.equal(r, w) for r in results)
    budget = small.transfers
    assert budget.peak <= 3 * MiB, budget.peak
    assert budget.peak >= 2 * MiB or before >= 2 * MiB  # each pull held its bytes
    assert budget.reserved == 0 and budget.waiting == 0
    assert budget.waits > waits  # some pulls were held back rather than run side by side
    text = urllib.request.urlopen(f"{small.http_url}/metrics").read().decode()
    gauges = {
        line.split()[0]: float(line.split()[1])
        for line in text.splitlines()
        if line.startswith("adamd_transfer_")
    }
    assert gauges["adamd_transfer_budget_bytes"] == 3 * MiB
    assert gauges["adamd_transfer_reserved_bytes"] == 0
    assert 2 * MiB <= gauges["adamd_transfer_reserved_peak_bytes"] <= 3 * MiB
    assert gauges["adamd_transfer_waits_total"] >= budget.waits - waits


def test_concurrent_pushes_take_turns_with_one_staging_buffer(small: Any) -> None:
    w = torch.zeros(512 * 1024)  # 2 MiB of gradient per push: one buffer at a time fits
    with _grpc(small) as c:
        c.create_model("pushes", {"w": w}, mode="async", max_staleness=100, lr=0.1)
    errors: list[BaseException] = []

    def push() -> None:
        try:
            with _grpc(small) as c:
                c.push_grad("pushes", {"w": torch.ones_like(w)}, version=0)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=push) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    model = small.registry.get("pushes")
    assert model.version == 6
    assert model.staging.sets == 1  # without the budget, one buffer per concurrent push
    assert small.transfers.peak <= 3 * MiB and small.transfers.reserved == 0


def test_a_transfer_larger_than_the_whole_budget_is_refused(small: Any) -> None:
    big = {"w": torch.zeros(1024 * 1024), "b": torch.ones(8)}  # 4 MiB > 3 MiB
    with _grpc(small) as c:
        c.create_model("too-big", big, lr=0.1)  # creating it holds no transfer memory
        with pytest.raises(LimitExceeded, match="--max-transfer-bytes"):
            c.pull_params("too-big")
        with pytest.raises(LimitExceeded, match="--max-transfer-bytes"):
            c.push_grad("too-big", {"w": torch.ones(1024 * 1024)}, version=0)
        assert c.describe("too-big").version == 0
        assert torch.equal(c.pull_params("too-big", ["b"])["b"], torch.ones(8))  # this fits
    assert small.transfers.reserved == 0


def test_a_sync_round_that_cannot_fit_is_refused_at_create(small: Any) -> None:
    with _grpc(small) as c, pytest.raises(LimitExceeded, match="sync round of world_size 4"):
        c.create_model("round-too-big", {"w": torch.zeros(256 * 1024)}, world_size=4)
    with _grpc(small) as c:  # async pushes hold one buffer each, only while they run
        c.create_model("async-ok", {"w": torch.zeros(256 * 1024)}, world_size=4, mode="async")


def test_joining_an_elastic_round_that_cannot_fit_is_refused(small: Any) -> None:
    with _grpc(small) as c:
        c.create_model("elastic", {"w": torch.zeros(256 * 1024)}, world_size="elastic")
        assert c.join("elastic") == 0  # one rank: its pushes never wait on another
        with pytest.raises(LimitExceeded, match="sync round of world_size 2"):
            c.join("elastic")  # two 1 MiB buffers and a pull's frames pass 3 MiB
        assert c.join("elastic", rank=0) == 0  # the same worker again: still one rank


def test_a_sync_round_under_the_budget_steps() -> None:
    with running_daemon(max_transfer_bytes=8 * MiB, shm=False) as d:
        w = torch.zeros(256 * 1024)  # 1 MiB: two pushes, plus a pull, fit
        with _grpc(d) as c:
            c.create_model("round", {"w": w}, world_size=2, lr=0.1)
        out: dict[int, Any] = {}

        def push(rank: int) -> None:
            with _grpc(d) as c:
                out[rank] = c.push_grad("round", {"w": torch.ones_like(w)}, rank=rank, version=0)

        threads = [threading.Thread(target=push, args=(r,)) for r in (0, 1)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert {r.version for r in out.values()} == {1}
        with _grpc(d) as c:
            assert torch.allclose(c.pull_params("round")["w"], torch.full_like(w, -0.1))
        assert d.transfers.peak >= 2 * MiB  # both pushes held their buffers at once
        assert d.transfers.peak <= 8 * MiB and d.transfers.reserved == 0


def test_a_stalled_reader_gives_its_budget_back_at_the_idle_deadline() -> None:
    with running_daemon(max_transfer_bytes=16 * MiB, shm=False, stream_idle_s=2.0) as d:
        w = torch.randn(16 * MiB)  # 64 MiB: far more than grpc buffers for a reader
        with _grpc(d) as c:
            c.create_model("stall", {"w": w}, lr=0.1)
        channel = grpc.insecure_channel(d.grpc_address)
        pull = channel.unary_stream("/adamd.v1.Optimizer/PullParams")
        stalled = pull(pb.PullRequest(model="stall").SerializeToString())
        next(stalled)  # one frame read, then nothing: the server's writes back up
        deadline = time.monotonic() + 5
        while d.transfers.reserved == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        held = d.transfers.reserved
        assert held > 8 * MiB  # the stalled pull holds more than half the budget
        t0 = time.monotonic()
        with _grpc(d) as c:  # waits for the stalled reader's share, then runs
            assert torch.equal(c.pull_params("stall")["w"], w)
        assert time.monotonic() - t0 < 10
        assert d.transfers.reserved == 0
        with pytest.raises(grpc.RpcError) as err:
            for _ in stalled:
                pass
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert "read nothing" in (err.value.details() or "")
        channel.close()


def test_get_state_reserves_its_copies(small: Any) -> None:
    w = torch.zeros(256 * 1024)  # 1 MiB: Adam's state is 2 MiB once it has stepped
    with _grpc(small) as c:
        c.create_model("state", {"w": w}, mode="async", lr=0.1)
        assert c.get_state("state")["state"] == {}  # no step yet: nothing to copy
        c.push_grad("state", {"w": torch.ones_like(w)}, version=0)
        assert c.pull_params("state")["w"].shape == w.shape  # 1 MiB of frames fit
        with pytest.raises(LimitExceeded, match="GetState needs"):
            c.get_state("state")  # 2 MiB of copies and their frames do not
    assert small.transfers.reserved == 0


def test_the_budget_setting() -> None:
    assert ServerConfig(max_transfer_bytes=-1).transfer_budget is None
    assert ServerConfig(max_transfer_bytes=5 * MiB).transfer_budget == 5 * MiB
    assert ServerConfig().transfer_budget >= 1 << 30  # type: ignore[operator]
    env = {"ADAMD_MAX_TRANSFER_BYTES": "-1"}
    assert ServerConfig.load(environ=env).transfer_budget is None
    with pytest.raises(ConfigError, match="max_transfer_bytes"):
        ServerConfig(max_transfer_bytes=-2)


# --- the budget alone, on an event loop -----------------------------------------------------


def test_budget_grants_in_arrival_order_and_bounds_the_wait() -> None:
    async def scenario() -> None:
        b = TransferBudget(10)
        assert await b.reserve("a", 6, 1) is False
        order: list[str] = []

        async def take(name: str, n: int) -> None:
            await b.reserve(name, n, 5)
            order.append(name)

        big = asyncio.ensure_future(take("big", 8))
        await asyncio.sleep(0.01)
        small = asyncio.ensure_future(take("small", 1))  # would fit now, but queues behind big
        await asyncio.sleep(0.01)
        assert order == [] and b.waiting == 2
        b.release(6)
        await asyncio.gather(big, small)
        assert order == ["big", "small"] and b.reserved == 9 and b.peak == 9
        with pytest.raises(Unavailable, match="waited"):
            await b.reserve("late", 5, 0.05)
        assert b.waiting == 0 and b.reserved == 9
        with pytest.raises(ServerLimitExceeded):
            await b.reserve("huge", 11, 1)
        cancelled = asyncio.ensure_future(b.reserve("gone", 5, 5))
        await asyncio.sleep(0.01)
        cancelled.cancel()
        await asyncio.sleep(0.01)
        assert b.waiting == 0
        b.release(9)
        assert b.reserved == 0

    asyncio.run(scenario())


def test_the_automatic_budget_grows_to_fit_a_single_need_a_set_one_refuses() -> None:
    """The default budget bounds how many transfers run at once but refuses nothing a server
    without a budget would run: a transfer or sync round larger than it raises it instead."""

    async def scenario() -> None:
        auto = TransferBudget(10, grows=True)
        assert await auto.reserve("a big pull", 25, 1.0) is False  # grown, granted at once
        assert auto.capacity == 25 and auto.reserved == 25
        waiting = asyncio.ensure_future(auto.reserve("a small pull", 5, 5.0))
        await asyncio.sleep(0.05)
        assert not waiting.done(), "still bounded: the grown budget is full"
        auto.release(25)
        assert await waiting is True
        auto.release(5)
        auto.check("a sync round", 40)
        assert auto.capacity == 40
        fixed = TransferBudget(10)
        with pytest.raises(ServerLimitExceeded, match="--max-transfer-bytes"):
            await fixed.reserve("a big pull", 25, 1.0)
        assert fixed.capacity == 10 and fixed.reserved == 0

    asyncio.run(scenario())
    with running_daemon(shm=False) as d:  # the default is the automatic budget
        assert d.transfers.grows and d.transfers.capacity is not None
    with running_daemon(shm=False, max_transfer_bytes=3 * MiB) as d:
        assert not d.transfers.grows
