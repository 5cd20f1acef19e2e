"""Elastic sync mode on the core, without sockets: membership by lease, rank assignment, rounds
that close once every registered worker has pushed, on a leave, or when a missing worker's lease
lapses (never at the round timeout when a lease is shorter), the mean over the round's actual
contributors, and exactly-once push ids. The real-process tests are in test_elastic_workers.py.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import pytest
import torch

from adamd.server.core.model import HostedModel, PushResult
from adamd.server.errors import InvalidArgument, StalePush

from ..hosted import local_adam, make_model, push, rank_grads, state_of


def elastic(lease_s: float = 5.0, round_timeout_s: float = 30.0) -> HostedModel:
    return make_model(elastic=True, lease_s=lease_s, round_timeout_s=round_timeout_s)


def assert_stepped_with_mean(model: HostedModel, ranks: Sequence[int]) -> None:
    """The model took exactly one step, with the rank-ordered mean of `ranks`' gradients."""
    fresh = make_model()
    ref = {n: p.clone() for n, p in fresh.params.items()}
    opt = local_adam(fresh, ref)
    grads = [rank_grads(r) for r in sorted(ranks)]
    for n, p in ref.items():
        total = grads[0][n].clone()
        for g in grads[1:]:
            total.add_(g[n])
        p.grad = total / len(ranks) if len(ranks) > 1 else total
    opt.step()
    state = state_of(model)
    assert state["version"] == 1
    for n, p in ref.items():
        assert torch.equal(state[f"param/{n}"], p), n
        assert torch.equal(state[f"state/{n}/exp_avg_sq"], opt.state[p]["exp_avg_sq"]), n


def test_ranks_are_assigned_lowest_free_and_lapsed_ranks_cool_off() -> None:
    model = elastic(lease_s=0.3)
    rounds = model.rounds
    assert [rounds.join(None) for _ in range(3)] == [0, 1, 2]
    assert rounds.join(1) == 1  # a live rank asked for again: the same worker, renewed
    assert rounds.leave(1) is True and rounds.leave(1) is False
    assert rounds.join(None) == 1  # a rank that left is free at once
    time.sleep(0.35)  # every lease lapses
    assert rounds.members is not None and rounds.members.live() == set()
    # lapsed ranks are kept from newcomers for one lease (their worker may only be slow)
    assert rounds.join(None) == 3
    time.sleep(0.35)
    assert rounds.join(None) == 0
    assert model.world_size == 0 and model.elastic and model.lease_s == 0.3


def test_fixed_world_models_refuse_join_and_elastic_needs_sync() -> None:
    with pytest.raises(InvalidArgument, match="not elastic"):
        make_model(world_size=2).rounds.join(None)
    with pytest.raises(InvalidArgument, match="sync"):
        make_model(elastic=True, mode="async")


def test_a_round_closes_once_every_registered_worker_pushed() -> None:
    model = elastic()
    for r in range(3):
        model.rounds.join(r)
    pending = [push(model, rank_grads(r), rank=r, version=0) for r in (2, 0)]
    assert not any(p.outcome.done() for p in pending)  # rank 1 is registered: the round waits
    pending.append(push(model, rank_grads(1), rank=1, version=0))
    assert [p.outcome.result(5) for p in pending] == [PushResult(1, True, contributors=3)] * 3
    assert_stepped_with_mean(model, [0, 1, 2])


def test_a_push_registers_its_rank_and_a_lone_worker_steps_alone() -> None:
    model = elastic()
    r = push(model, rank_grads(2), rank=2, version=0).outcome.result(5)
    assert r == PushResult(version=1, applied=True, contributors=1)
    assert model.rounds.members is not None and model.rounds.members.live() == {2}


def test_leaving_closes_a_round_that_waited_only_for_the_leaver() -> None:
    model = elastic()
    model.rounds.join(0)
    model.rounds.join(1)
    p0 = push(model, rank_grads(0), rank=0, version=0)
    assert not p0.outcome.done()
    assert model.rounds.leave(1)
    assert p0.outcome.result(5) == PushResult(version=1, applied=True, contributors=1)
    assert_stepped_with_mean(model, [0])  # the mean is over the contributors, not the members


def test_a_departed_worker_holds_the_round_until_its_lease_lapses_not_the_round_timeout() -> None:
    model = elastic(lease_s=0.4, round_timeout_s=30.0)
    model.rounds.join(0)
    t0 = time.monotonic()
    model.rounds.join(1)  # then never pushes: departed without leaving
    t1 = time.monotonic()
    time.sleep(0.2)
    p0 = push(model, rank_grads(0), rank=0, version=0)  # rank 0's lease now ends 0.2 s later
    assert p0.deadline is not None and t0 + 0.4 <= p0.deadline <= t1 + 0.4
    r = p0.wait()  # the adapters' timeout path: expire() once the deadline passed
    waited = time.monotonic() - t0
    assert model.rounds.members is not None and model.rounds.members.live() == {0}
    assert 0.39 <= waited < 2.0, waited
    assert r == PushResult(version=1, applied=True, contributors=1, partial=True)
    assert_stepped_with_mean(model, [0])
    # the straggler's gradient is for a closed round: refused, never counted, but it is heard
    # from, so it is registered again and the next round waits for it
    with pytest.raises(StalePush):
        push(model, rank_grads(1), rank=1, version=0)
    assert model.rounds.members.live() == {0, 1} and model.version == 1


def test_the_deadline_moves_on_when_the_first_missing_worker_pushes() -> None:
    model = elastic(lease_s=0.5)
    model.rounds.join(0)
    model.rounds.join(1)
    time.sleep(0.2)
    model.rounds.join(2)  # its lease ends 0.2 s after rank 1's
    p0 = push(model, rank_grads(0), rank=0, version=0)
    first = p0.deadline
    assert first is not None
    push(model, rank_grads(1), rank=1, version=0)  # the rank whose lease ended first
    time.sleep(max(0.0, first - time.monotonic()) + 0.01)
    later = p0.expire()  # rank 2's lease is still good: no step, a later deadline
    assert not p0.outcome.done() and later is not None and later > first + 0.1
    r = p0.wait()
    assert r == PushResult(version=1, applied=True, contributors=2, partial=True)
    assert_stepped_with_mean(model, [0, 1])


def test_push_ids_are_applied_once_in_elastic_rounds() -> None:
    model = elastic()
    model.rounds.join(0)
    model.rounds.join(1)
    p0 = push(model, rank_grads(0), rank=0, version=0, push_id="a")
    again = push(model, rank_grads(0), rank=0, version=0, push_id="a")  # a retry in flight
    push(model, rank_grads(1), rank=1, version=0, push_id="b")
    first = p0.outcome.result(5)
    assert first == PushResult(version=1, applied=True, contributors=2)
    assert again.outcome.result(5) == PushResult(1, True, contributors=2, duplicate=True)
    late = push(model, rank_grads(0), rank=0, version=0, push_id="a").outcome.result(5)
    assert late.duplicate and late.version == 1 and model.version == 1
    assert_stepped_with_mean(model, [0, 1])


def test_registrations_are_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    from adamd.server.core import membership
    from adamd.server.errors import LimitExceeded

    monkeypatch.setattr(membership, "MAX_MEMBERS", 3)
    model = elastic()
    assert [model.rounds.join(None) for _ in range(3)] == [0, 1, 2]
    with pytest.raises(LimitExceeded):
        model.rounds.join(None)
    with pytest.raises(LimitExceeded):  # a push registering a new rank counts too
        push(model, rank_grads(0), rank=7, version=0)
    assert model.rounds.join(2) == 2 and model.rounds.leave(2)  # renewing and leaving still work
    assert model.rounds.join(None) == 2
