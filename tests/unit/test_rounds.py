"""Rounds, the exactly-once ledger and staging, driven directly on HostedModel: no sockets.

Sync rounds average in rank order whatever the arrival order, close partial on their deadline and
refuse a rank twice or a stale version; async pushes obey max_staleness; a push id is applied once
(a repeat is answered from the ledger, a retry of one in a round joins it, a retry while the first
copy still streams takes its place, an aborted one may be sent again); a step that fails answers
Aborted and changes nothing; a burst's staging is released.
"""

from __future__ import annotations

import itertools
import threading
import time
from concurrent.futures import Future

import pytest
import torch

from adamd.server.core.model import HostedModel, PushResult
from adamd.server.core.staging import layout
from adamd.server.errors import Aborted, DuplicatePush, InvalidArgument, NotFound, StalePush

from ..hosted import (
    assert_same,
    begin,
    local_adam,
    make_model,
    push,
    rank_grads,
    state_of,
    write,
)


def test_sync_mean_is_rank_ordered_whatever_the_arrival_order() -> None:
    g = [rank_grads(r) for r in range(3)]
    forward = (g[0]["w"] + g[1]["w"]) + g[2]["w"]
    assert not torch.equal(forward, (g[2]["w"] + g[1]["w"]) + g[0]["w"])  # order matters
    results = []
    for order in itertools.permutations(range(3)):
        model = make_model(world_size=3)
        pending = [push(model, g[r], rank=r, version=0) for r in order[:2]]
        assert not any(p.outcome.done() for p in pending)  # the round waits for the third rank
        pending.append(push(model, g[order[2]], rank=order[2], version=0))
        got = [p.wait() for p in pending]
        assert all(r == PushResult(version=1, applied=True, contributors=3) for r in got)
        results.append(state_of(model))
    # the reference: one local Adam step with the mean summed in rank order. The state is
    # compared too: Adam's first update is about lr * sign(g), blind to the sum's last bits.
    model = make_model(world_size=3)
    ref = {n: p.clone() for n, p in model.params.items()}
    opt = local_adam(model, ref)
    for n, p in ref.items():
        p.grad = ((g[0][n] + g[1][n]) + g[2][n]) / 3
    opt.step()
    for state in results:
        for n, p in ref.items():
            assert torch.equal(state[f"param/{n}"], p), n
            assert torch.equal(state[f"state/{n}/exp_avg"], opt.state[p]["exp_avg"]), n
            assert torch.equal(state[f"state/{n}/exp_avg_sq"], opt.state[p]["exp_avg_sq"]), n
        assert_same(state, results[0])


def test_sync_ranks_from_threads_agree() -> None:
    model = make_model(world_size=3)
    start = threading.Barrier(3)
    results: list[PushResult | None] = [None] * 3

    def worker(rank: int) -> None:
        start.wait()
        results[rank] = push(model, rank_grads(rank), rank=rank, version=0).wait()

    threads = [threading.Thread(target=worker, args=(r,)) for r in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert [r.version if r else None for r in results] == [1, 1, 1]
    assert model.rounds.open_ranks() is None


def test_partial_round_steps_on_its_deadline() -> None:
    model = make_model(world_size=3, round_timeout_s=0.3)
    p0 = push(model, rank_grads(0), rank=0, version=0)
    p2 = push(model, rank_grads(2), rank=2, version=0)
    p0.expire()  # before the deadline: nothing happens
    assert not p0.outcome.done() and model.rounds.open_ranks() == (0, 2)
    assert p0.deadline is not None and p0.deadline > time.monotonic()
    r = p2.wait()  # blocks until the deadline, then expires the round
    assert time.monotonic() >= p0.deadline
    assert r == PushResult(version=1, applied=True, contributors=2, partial=True)
    assert p0.outcome.result(0) == r and model.version == 1
    assert model.last_heard.keys() == {0, 2}
    # a latecomer for the old version is stale; the next round starts clean
    with pytest.raises(StalePush):
        push(model, rank_grads(1), rank=1, version=0)


def test_duplicate_rank_and_stale_version_change_nothing() -> None:
    model = make_model(world_size=2)
    first = push(model, rank_grads(0), rank=0, version=0)
    before = state_of(model)
    sets = model.staging.sets
    with pytest.raises(DuplicatePush, match="rank 0"):
        push(model, rank_grads(0), rank=0, version=0)
    with pytest.raises(StalePush, match="round is for version 0"):
        push(model, rank_grads(1), rank=1, version=1)
    with pytest.raises(InvalidArgument, match="rank 2 outside"):
        push(model, rank_grads(1), rank=2, version=0)
    assert_same(before, state_of(model))
    assert model.staging.sets == sets + 1  # the refused pushes' buffers went back to the pool
    assert model.rounds.open_ranks() == (0,) and not first.outcome.done()
    assert push(model, rank_grads(1), rank=1, version=0).wait().contributors == 2


def test_async_staleness_bound() -> None:
    model = make_model(mode="async", max_staleness=2)
    for v in range(3):
        assert push(model, rank_grads(1), version=v).wait().version == v + 1
    before = state_of(model)
    with pytest.raises(StalePush, match="max_staleness=2"):
        push(model, rank_grads(1), version=0)  # 3 versions old
    assert_same(before, state_of(model))
    assert push(model, rank_grads(1), version=1).wait().version == 4  # 2 old: accepted
    assert push(model, rank_grads(1)).wait().version == 5  # no version: always fresh


def test_a_repeated_push_id_returns_its_first_result() -> None:
    model = make_model()
    first = push(model, rank_grads(1), push_id="p1").wait()
    before = state_of(model)
    again = push(model, rank_grads(2), push_id="p1").wait()
    assert again == PushResult(version=1, applied=True, duplicate=True)
    assert first.version == again.version and not first.duplicate
    assert_same(before, state_of(model))
    assert model.recent_push_results() == {"p1": first}


def test_a_retry_of_an_inflight_push_joins_its_outcome() -> None:
    model = make_model(world_size=2)
    original = push(model, rank_grads(0), rank=0, version=0, push_id="r0")
    retry_ticket = begin(model, rank_grads(0), rank=0, version=0, push_id="r0")
    assert retry_ticket.joined is not None and retry_ticket.grads is None  # no buffers taken
    retry = model.finish_push(retry_ticket)
    assert not retry.outcome.done()
    push(model, rank_grads(1), rank=1, version=0, push_id="r1").wait()
    assert original.wait() == PushResult(version=1, applied=True, contributors=2)
    assert retry.wait() == PushResult(version=1, applied=True, contributors=2, duplicate=True)
    assert model.version == 1


def test_a_retry_while_the_first_copy_still_streams_takes_its_place() -> None:
    """A client sends again only after it lost the connection, maybe before the server noticed:
    the retry counts, the first copy is refused when it ends, and the step happens once."""
    model = make_model()
    first = begin(model, rank_grads(1), push_id="s")
    write(first, rank_grads(1))  # all of it arrived, but finish_push has not run yet
    retry = push(model, rank_grads(1), push_id="s").outcome.result(timeout=5)
    assert retry == PushResult(version=1, applied=True) and not retry.duplicate
    with pytest.raises(StalePush, match="sent again"):
        model.finish_push(first)
    reference = make_model()
    push(reference, rank_grads(1)).wait()
    assert_same(state_of(reference), state_of(model))  # stepped once, with that gradient
    assert push(model, rank_grads(2), push_id="s").wait().duplicate  # the id stays applied


def test_an_aborted_push_lets_its_retry_through() -> None:
    model = make_model()
    before = state_of(model)
    ticket = begin(model, rank_grads(1), push_id="x")
    write(ticket, rank_grads(1))
    model.abort_push(ticket)  # the stream broke before finish_push
    with pytest.raises(StalePush):
        ticket.outcome.result(0)
    assert_same(before, state_of(model))
    r = push(model, rank_grads(1), push_id="x").wait()
    assert r == PushResult(version=1, applied=True) and not r.duplicate


def test_an_incomplete_stream_is_rejected_and_forgotten() -> None:
    model = make_model()
    before = state_of(model)
    ticket = begin(model, rank_grads(1), push_id="y")  # no chunks written
    with pytest.raises(InvalidArgument, match="stream ended early"):
        model.finish_push(ticket)
    assert_same(before, state_of(model))
    assert push(model, rank_grads(1), push_id="y").wait().version == 1


def _wrong_dtype(rank: int) -> dict[str, torch.Tensor]:
    """Gradients handed over in place as float64 for float32 parameters: the header checks
    pass (a float dtype), torch refuses them at the step. A real failure of the step."""
    return {n: g.double() for n, g in rank_grads(rank).items()}


def test_a_failed_step_answers_aborted_and_changes_nothing() -> None:
    model = make_model(world_size=2)
    for r in (0, 1):  # one good round first, so there is optimizer state to keep
        push(model, rank_grads(r), rank=r, version=0)
    before = state_of(model)
    # rank 0's buffer carries the round's sum, so its dtype is the one the step sees
    p0 = push(model, _wrong_dtype(0), streamed=False, rank=0, version=1, push_id="a0")
    p1 = push(model, rank_grads(1), rank=1, version=1, push_id="a1")
    for p in (p0, p1):
        with pytest.raises(Aborted, match="step for version 1 failed"):
            p.wait()
    assert_same(before, state_of(model))
    assert model.rounds.open_ranks() is None and model.recent_push_results() == {}
    # the same push ids go through once the gradients are right
    p0 = push(model, rank_grads(0), rank=0, version=1, push_id="a0")
    p1 = push(model, rank_grads(1), rank=1, version=1, push_id="a1")
    assert [p.wait().duplicate for p in (p0, p1)] == [False, False] and model.version == 2


def test_version_reached_is_a_future() -> None:
    model = make_model(mode="async")
    reached: Future[None] = model.version_reached(2)
    given_up = model.version_reached(2)
    given_up.cancel()
    push(model, rank_grads(1)).wait()
    assert not reached.done()
    push(model, rank_grads(1)).wait()
    assert reached.result(0) is None and given_up.cancelled()
    assert model.version_reached(1).done() and not model.wait_for_version(3, 0.01)


def _burst(model: HostedModel, n: int, grads: dict[str, torch.Tensor]) -> None:
    """n pushes whose buffers are all taken before any finishes (as n open streams would)."""
    ready = threading.Barrier(n)

    def one() -> None:
        g = grads
        ticket = begin(model, g)
        ready.wait()
        write(ticket, g)
        model.finish_push(ticket).wait()

    threads = [threading.Thread(target=one) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)


def test_staging_is_released_after_a_burst() -> None:
    model = make_model({"w": torch.zeros(1000), "b": torch.zeros(24)}, mode="async")
    model.staging.trim_after_s = 1.0
    one_set = layout(model.params)[1]  # one flat buffer, each tensor on a 256-byte boundary
    assert one_set == 4096 + 256
    ones = {"w": torch.ones(1000), "b": torch.ones(24)}
    _burst(model, 8, ones)
    assert model.version == 8
    assert model.memory_bytes()["staging"] == 8 * one_set
    push(model, ones).wait()
    assert model.staging.sets == 8  # within the window of the burst: kept, nothing reallocated
    time.sleep(1.1)
    push(model, ones).wait()  # closes the burst's window
    time.sleep(1.1)
    push(model, ones).wait()  # a quiet window: trim
    assert model.staging.sets == 2  # one in use at a time, plus one
    assert model.memory_bytes()["staging"] == 2 * one_set
    assert model.version == 11


def test_staging_is_trimmed_when_traffic_stops_after_a_burst() -> None:
    """No release comes after the burst's window: a timer trims at its end all the same."""
    model = make_model({"w": torch.zeros(1000), "b": torch.zeros(24)}, mode="async")
    model.staging.trim_after_s = 0.5
    ones = {"w": torch.ones(1000), "b": torch.ones(24)}
    _burst(model, 6, ones)
    assert model.version == 6 and model.staging.sets == 6
    deadline = time.monotonic() + 5
    while model.staging.sets > 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    # the burst's window kept 6 + 1; the quiet window after it needs none in use, plus one
    assert model.staging.sets == 1
    assert model.memory_bytes()["staging"] == layout(model.params)[1]
    push(model, ones).wait()
    assert model.version == 7 and model.staging.sets == 1


def test_a_deleted_model_fails_pushes_in_flight_refuses_new_ones_and_drops_staging() -> None:
    model = make_model({"w": torch.zeros(8)}, mode="async")
    ones = {"w": torch.ones(8)}
    push(model, ones).wait()
    before = state_of(model)
    ticket = begin(model, ones)
    write(ticket, ones)
    model.close()  # what ModelRegistry.delete does
    with pytest.raises(Aborted, match="deleted"):
        model.finish_push(ticket).wait()
    with pytest.raises(NotFound):
        begin(model, ones)
    assert_same(state_of(model), before)
    assert model.staging.sets == 0
