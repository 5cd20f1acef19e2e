"""Adam state in torch's format, directly on state_io and HostedModel: the name <-> index mapping
agrees with torch.optim.Adam's own numbering, state read out loads back bitwise, and every bad
state is refused before anything changes."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch

from adamd.server.core import state_io
from adamd.server.core.model import HostedModel
from adamd.server.errors import InvalidArgument

from ..hosted import assert_same, local_adam, make_model, push, state_of

GROUPS = [{"params": ["w"], "lr": 0.1}, {"params": ["b", "c"], "lr": 0.01, "amsgrad": True}]


def trained(steps: int = 2) -> HostedModel:
    params = {"w": torch.zeros(4), "b": torch.zeros(2), "c": torch.zeros(3)}
    model = make_model(params, GROUPS, mode="async")
    for i in range(steps):
        push(model, {n: torch.full_like(p, i + 1.0) for n, p in params.items()}).wait()
    return model


def test_the_mapping_is_torchs_numbering() -> None:
    names = [["w"], ["b", "c"]]
    order = state_io.index_order(names)
    assert order == ["w", "b", "c"]
    named = {"c": 2, "w": 0}
    assert state_io.by_index(named, order) == {2: 2, 0: 0}
    assert state_io.by_name(state_io.by_index(named, order), order) == named
    assert state_io.by_name({"1": "x"}, order) == {"b": "x"}  # JSON keys
    groups = state_io.indexed_groups([{"lr": 1}, {"lr": 2, "params": ["ignored"]}], names)
    assert groups == [
        {"lr": 1, "param_names": ["w"], "params": [0]},
        {"lr": 2, "param_names": ["b", "c"], "params": [1, 2]},
    ]
    # torch numbers a named_parameters() optimizer the same way
    net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 1))
    named_params = list(net.named_parameters())
    torch_groups: list[dict[str, Any]] = [
        {"params": named_params[:2]},
        {"params": named_params[2:], "lr": 0.5},
    ]
    opt = torch.optim.Adam(torch_groups)
    saved = opt.state_dict()["param_groups"]
    assert state_io.saved_names(saved, []) == dict(enumerate(n for n, _ in named_params))


def test_saved_names_without_param_names() -> None:
    saved = [{"params": [0, 1]}, {"params": [2]}]
    assert state_io.saved_names(saved, ["a", "b", "c"]) == {0: "a", 1: "b", 2: "c"}
    assert state_io.saved_names(saved, ["a", "b"]) is None


def test_state_by_name_matches_the_optimizer() -> None:
    model = trained()
    state, groups, version = model.state_by_name()
    assert version == 2 and [g["params"] for g in groups] == [["w"], ["b", "c"]]
    assert groups[1]["amsgrad"] is True and groups[0]["lr"] == 0.1
    sd = model.optimizer.state_dict()
    assert (
        state_io.by_index(state, state_io.index_order(model.group_names())).keys()
        == sd["state"].keys()
    )
    for name, p in model.params.items():
        live = model.optimizer.state[p]
        assert state[name].keys() == live.keys()
        for k, v in live.items():
            assert torch.equal(state[name][k], v) and state[name][k] is not v  # copies
    full = state_io.torch_state_dict(model.optimizer)
    assert [g["param_names"] for g in full["param_groups"]] == [["w"], ["b", "c"]]
    assert [g["params"] for g in full["param_groups"]] == [[0], [1, 2]]


def test_load_state_round_trip_continues_bitwise() -> None:
    source = trained(3)
    state, groups, _ = source.state_by_name()
    target = trained(1)
    target.load_state(state, groups)
    for name in source.params:
        a = source.optimizer.state[source.params[name]]
        b = target.optimizer.state[target.params[name]]
        for k in a:
            assert torch.equal(a[k], b[k]), (name, k)
    # a local Adam loading the same state (as torch indices) steps to the same parameters
    with torch.no_grad():
        for n, p in target.params.items():
            p.copy_(source.params[n])
    ref = {n: p.clone() for n, p in source.params.items()}
    opt = local_adam(source, ref)
    opt.load_state_dict(
        {
            # copies: load_state_dict keeps same-device tensors, and target steps its own
            "state": state_io.by_index(
                {n: {k: v.clone() for k, v in e.items()} for n, e in state.items()},
                state_io.index_order(source.group_names()),
            ),
            "param_groups": state_io.indexed_groups(
                opt.state_dict()["param_groups"], source.group_names()
            ),
        }
    )
    grads = {n: torch.full_like(p, -0.5) for n, p in ref.items()}
    push(target, grads).wait()
    for n, p in ref.items():
        p.grad = grads[n]
    opt.step()
    for n, p in ref.items():
        assert torch.equal(target.params[n], p), n


def _bad(edit: Callable[[dict[str, dict[str, torch.Tensor]], list[dict[str, Any]]], Any]) -> Any:
    def case(model: HostedModel) -> None:
        state, groups, _ = model.state_by_name()
        groups_arg = edit(state, groups)
        model.load_state(state, groups if groups_arg is None else groups_arg)

    return case


BAD_STATES = {
    "unknown parameter": _bad(lambda s, g: s.update(x={"step": torch.tensor(1.0)})),
    "has shape": _bad(lambda s, g: s["w"].update(exp_avg=torch.zeros(5))),
    "unknown state key": _bad(lambda s, g: s["w"].update(momentum=torch.zeros(4))),
    "need a float or complex dtype": _bad(
        lambda s, g: s["w"].update(exp_avg=torch.zeros(4, dtype=torch.int32))
    ),
    "must hold one number": _bad(lambda s, g: s["w"].update(step=torch.zeros(2))),
    "lacks \\['max_exp_avg_sq'\\]": _bad(
        lambda s, g: s.update(b={k: v for k, v in s["b"].items() if k != "max_exp_avg_sq"})
    ),
    "state has 1 param groups": _bad(lambda s, g: [g[0]]),
    "param group 1 lists": _bad(lambda s, g: g[1].update(params=["c", "b"])),
    "Invalid learning rate": _bad(lambda s, g: g[0].update(lr=-1.0)),
}


@pytest.mark.parametrize("message", list(BAD_STATES))
def test_bad_state_is_refused_and_changes_nothing(message: str) -> None:
    model = trained()
    before = state_of(model)
    with pytest.raises(InvalidArgument, match=message):
        BAD_STATES[message](model)
    assert_same(before, state_of(model))


def test_state_for_a_parameter_in_no_group_is_refused() -> None:
    model = make_model({"w": torch.zeros(2), "frozen": torch.zeros(2)}, [{"params": ["w"]}])
    before = state_of(model)
    entry = {"step": torch.tensor(1.0), "exp_avg": torch.zeros(2), "exp_avg_sq": torch.zeros(2)}
    with pytest.raises(InvalidArgument, match="in no param group"):
        model.load_state({"w": dict(entry), "frozen": dict(entry)}, None)
    assert_same(before, state_of(model))


def test_loaded_hyperparameters_keep_the_implementation() -> None:
    model = trained()
    state, groups, _ = model.state_by_name()
    groups[0].update(lr=0.5, fused=False, foreach=True)  # implementation keys: ignored
    model.load_state(state, groups)
    assert model.requested[0]["lr"] == 0.5 and model.requested[0]["fused"] is None
    assert model.optimizer.param_groups[0]["fused"] is True
