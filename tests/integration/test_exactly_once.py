"""Exactly-once pushes: the same push id is applied once, however often and however it arrives.

The dropped-connection cases put a small TCP proxy between a Client and the daemon. The proxy can
hold back the server's replies and then cut every connection, which is what a network failure
after the server applied a push looks like to the client: the Client's own retry (same push id,
new connection) must get the first result back, marked duplicate, and the model must have moved
by one step only.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import torch

from adamd.client import Client
from adamd.server import Daemon

from .. import workers
from ..conftest import assert_bitwise_equal, snapshot
from ..proxies import proxy_to, wait_until


def test_the_same_push_id_twice_is_applied_once(daemon: Daemon, model_name: str) -> None:
    with Client(daemon.grpc_address) as c:
        c.create_model(model_name, workers.initial_params(), lr=workers.LR)
        model = daemon.registry.get(model_name)
        grads = workers.rank_grads(0, 0)
        first = c.push_grad(model_name, grads, version=0, push_id="push-a")
        assert (first.version, first.applied, first.duplicate) == (1, True, False)
        after_first = snapshot(model)
        again = c.push_grad(model_name, grads, version=0, push_id="push-a")
        assert (again.version, again.applied, again.duplicate) == (1, True, True)
        assert_bitwise_equal(after_first, snapshot(model))
        # Even with other gradients under that id: the id decides, nothing is applied twice.
        c.push_grad(model_name, workers.rank_grads(0, 5), push_id="push-a")
        assert_bitwise_equal(after_first, snapshot(model))
        # A new id steps again.
        assert c.push_grad(model_name, grads, version=1, push_id="push-b").version == 2
        for state in model.optimizer.state.values():
            assert int(state["step"]) == 2


def test_a_push_whose_reply_was_lost_is_retried_and_applied_once(
    daemon: Daemon, model_name: str
) -> None:
    with Client(daemon.grpc_address) as direct:
        direct.create_model(model_name, workers.initial_params(), lr=workers.LR)
    model = daemon.registry.get(model_name)
    with (
        proxy_to(daemon) as proxy,
        Client(proxy.address, transport="grpc") as c,
        ThreadPoolExecutor(1) as pool,
    ):
        assert c.describe(model_name).version == 0  # connection up
        proxy.hold_replies.set()
        push = pool.submit(c.push_grad, model_name, workers.rank_grads(0, 0), version=0)
        wait_until(lambda: model.version == 1)  # the server applied it; the reply is held back
        applied = snapshot(model)
        connections = proxy.connections
        proxy.cut()
        reply = push.result(timeout=30)  # the Client retried on a new connection
        assert proxy.connections > connections
    assert reply.duplicate and reply.applied and reply.version == 1
    assert model.version == 1
    assert_bitwise_equal(applied, snapshot(model))


def test_a_push_cut_mid_stream_is_retried_and_applied_once(daemon: Daemon, model_name: str) -> None:
    big = {"w": torch.zeros(4_000_000)}  # 16 MB: many chunks, so the cut lands mid-stream
    with Client(daemon.grpc_address) as direct:
        direct.create_model(model_name, big, lr=0.1)
    model = daemon.registry.get(model_name)
    before = snapshot(model)
    grads = {"w": torch.ones(4_000_000)}
    with (
        proxy_to(daemon) as proxy,
        Client(proxy.address, transport="grpc") as c,
        ThreadPoolExecutor(1) as pool,
    ):
        c.describe(model_name)
        start = proxy.upstream_bytes
        push = pool.submit(c.push_grad, model_name, grads, version=0)
        wait_until(lambda: proxy.upstream_bytes - start > 2_000_000)
        proxy.cut()
        # The server saw a broken stream: nothing applied, nothing half-applied.
        time.sleep(0.2)
        with model.locked():  # the retry may step any moment: look at one version
            if model.version == 0:
                assert_bitwise_equal(before, snapshot(model))
        reply = push.result(timeout=60)
    assert reply.applied and reply.version == 1 and model.version == 1
    for state in model.optimizer.state.values():
        assert int(state["step"]) == 1
    assert torch.allclose(model.params["w"], torch.full((4_000_000,), -0.1))


def test_a_sync_push_retried_while_its_round_is_open_counts_once(
    daemon: Daemon, model_name: str
) -> None:
    init = workers.initial_params()
    with Client(daemon.grpc_address) as direct:
        direct.create_model(model_name, init, world_size=2, lr=workers.LR)
        model = daemon.registry.get(model_name)
        with (
            proxy_to(daemon) as proxy,
            Client(proxy.address, transport="grpc") as c,
            ThreadPoolExecutor(1) as pool,
        ):
            c.describe(model_name)
            push = pool.submit(c.push_grad, model_name, workers.rank_grads(0, 0), version=0, rank=0)
            wait_until(lambda: 0 in (model.rounds.open_ranks() or ()))
            connections = proxy.connections
            proxy.cut()  # rank 0's connection dies while it waits for rank 1
            wait_until(lambda: proxy.connections > connections)  # the retry is in
            time.sleep(0.2)
            assert model.version == 0
            r1 = direct.push_grad(model_name, workers.rank_grads(1, 0), version=0, rank=1)
            r0 = push.result(timeout=30)
    assert (r1.version, r1.contributors, r1.duplicate) == (1, 2, False)
    assert (r0.version, r0.contributors, r0.duplicate) == (1, 2, True)
    assert model.version == 1
    expected = workers.reference([[0, 1]])
    for n, p in model.params.items():
        torch.testing.assert_close(p, expected[n], rtol=1e-6, atol=1e-7)
