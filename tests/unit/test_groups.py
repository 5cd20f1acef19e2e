"""Param groups and hyperparameter edits, directly on GroupEditor and HostedModel: checks that
refuse an edit before anything changes, undo that restores bitwise, a failing round that puts back
the hyperparameters its pushes carried, and add_param_group (a frozen layer unfrozen later)."""

from __future__ import annotations

import pytest
import torch

from adamd.server.core.groups import GroupEditor
from adamd.server.errors import Aborted, InvalidArgument

from ..hosted import CPU, assert_same, local_adam, make_model, push, state_of


def editor(**opts: object) -> GroupEditor:
    params = {"w": torch.zeros(3), "v": torch.zeros(2)}
    opt = torch.optim.Adam([torch.zeros(1)])
    opt.param_groups.clear()
    ed = GroupEditor(opt, params, CPU)
    ed.append({"params": ["w"], **opts})
    ed.append({"params": ["v"], "lr": 0.5})
    return ed


def test_apply_then_undo_restores_bitwise() -> None:
    ed = editor(lr=torch.tensor(0.01), betas=(0.8, 0.9), weight_decay=0.1)
    lr_tensor = ed.optimizer.param_groups[0]["lr"]
    before = [dict(g) for g in ed.optimizer.param_groups], [dict(r) for r in ed.requested]
    undo = ed.apply(
        [(0, {"lr": torch.tensor(0.3), "betas": (0.5, 0.6), "weight_decay": 0.0}), (1, {"lr": 2.0})]
    )
    g0, g1 = ed.optimizer.param_groups
    assert g0["lr"] is lr_tensor and float(g0["lr"]) == pytest.approx(0.3)  # filled in place
    assert g0["betas"] == (0.5, 0.6) and g1["lr"] == 2.0 and ed.requested[1]["lr"] == 2.0
    undo()
    assert g0["lr"] is lr_tensor  # a captured graph would still read the same tensor
    for now, was in zip(ed.optimizer.param_groups, before[0]):
        for k in was:
            if isinstance(was[k], torch.Tensor):
                assert torch.equal(now[k], torch.tensor(0.01)), k
            elif k != "params":
                assert now[k] == was[k], k
    assert ed.requested == before[1]


def test_check_refuses_before_anything_changes() -> None:
    ed = editor()
    before = [dict(r) for r in ed.requested]
    with pytest.raises(InvalidArgument, match="param group 2 does not exist"):
        ed.check([(2, {"lr": 0.1})])
    with pytest.raises(InvalidArgument, match="Invalid learning rate"):
        ed.check([(0, {"lr": 0.1}), (1, {"lr": -1.0})])
    with pytest.raises(InvalidArgument, match="fused cannot change"):
        ed.check([(0, {"fused": False})])
    with pytest.raises(InvalidArgument, match="unknown Adam options"):
        ed.check([(0, {"momentum": 0.9})])
    assert ed.requested == before
    ed.check([(0, {"fused": None, "lr": 0.2})])  # the value it has already: allowed


def test_amsgrad_cannot_be_turned_on_after_a_step() -> None:
    model = make_model()
    model.set_hyperparams([(0, {"amsgrad": True})])  # before any step: fine
    model.set_hyperparams([(0, {"amsgrad": False})])
    push(model, {"w": torch.ones(4), "b": torch.ones(2)}).wait()
    with pytest.raises(InvalidArgument, match="amsgrad cannot be turned on"):
        model.set_hyperparams([(0, {"amsgrad": True})])


def test_apply_all_is_undone_as_one() -> None:
    ed = editor()
    before = [dict(r) for r in ed.requested]
    undo = ed.apply_all([[(0, {"lr": 0.2})], [(0, {"lr": 0.3}), (1, {"eps": 1e-6})]])
    assert ed.requested[0]["lr"] == 0.3 and ed.requested[1]["eps"] == 1e-6
    undo()
    assert ed.requested == before
    assert ed.optimizer.param_groups[0]["lr"] == before[0]["lr"]


def test_a_failing_round_restores_the_hyperparameters_it_carried() -> None:
    model = make_model(world_size=2)
    for r in (0, 1):
        push(model, {"w": torch.ones(4), "b": torch.ones(2)}, rank=r, version=0)
    before = state_of(model)
    updates = [(0, {"lr": 0.5, "betas": (0.5, 0.5), "weight_decay": 0.25})]
    # float64 gradients handed over in place for float32 parameters: torch refuses the step
    bad = {"w": torch.ones(4, dtype=torch.float64), "b": torch.ones(2, dtype=torch.float64)}
    p0 = push(model, bad, streamed=False, rank=0, version=1, hyper_updates=updates)
    p1 = push(model, {"w": torch.ones(4), "b": torch.ones(2)}, rank=1, version=1)
    for p in (p0, p1):
        with pytest.raises(Aborted):
            p.wait()
    assert_same(before, state_of(model))
    # the same edit in a good round sticks
    push(model, {"w": torch.ones(4), "b": torch.ones(2)}, rank=0, version=1, hyper_updates=updates)
    push(model, {"w": torch.ones(4), "b": torch.ones(2)}, rank=1, version=1).wait()
    assert model.optimizer.param_groups[0]["betas"] == (0.5, 0.5)
    assert model.requested[0]["weight_decay"] == 0.25


def test_set_hyperparams_applies_and_refuses_whole() -> None:
    model = make_model(groups=[{"params": ["w"], "lr": 0.1}, {"params": ["b"], "lr": 0.2}])
    before = state_of(model)
    with pytest.raises(InvalidArgument):
        model.set_hyperparams([(0, {"lr": 0.3}), (1, {"eps": -1.0})])
    assert_same(before, state_of(model))
    edits: list[int] = []
    model.edit_listeners.append(lambda: edits.append(model.version))
    model.set_hyperparams([(0, {"lr": 0.3}), (1, {"eps": 1e-6})])
    assert model.requested[0]["lr"] == 0.3 and model.optimizer.param_groups[1]["eps"] == 1e-6
    assert edits == [0]


def test_add_param_group_unfreezes_a_layer() -> None:
    model = make_model({"w": torch.zeros(4)}, mode="async")
    push(model, {"w": torch.ones(4)}).wait()
    before = state_of(model)
    with pytest.raises(InvalidArgument, match="exist already"):
        model.add_param_group({"w": torch.zeros(4)}, {"params": ["w"]})
    with pytest.raises(InvalidArgument, match="unknown parameter"):
        model.add_param_group({"head": torch.zeros(2)}, {"params": ["head", "nope"]})
    assert_same(before, state_of(model))  # the failed group's parameters are gone again
    model.add_param_group({"head": torch.full((2,), 0.5)}, {"params": ["head"], "lr": 0.01})
    assert model.group_names() == [["w"], ["head"]]
    # the model now steps both, as a local Adam with the same groups does
    ref = {"w": model.params["w"].clone(), "head": torch.full((2,), 0.5)}
    opt = local_adam(model, ref)
    opt.state[ref["w"]] = {
        k: v.clone() for k, v in model.optimizer.state[model.params["w"]].items()
    }
    grads = {"w": torch.full((4,), 0.25), "head": torch.full((2,), -1.0)}
    push(model, grads).wait()
    for n, p in ref.items():
        p.grad = grads[n]
    opt.step()
    for n, p in ref.items():
        assert torch.equal(model.params[n], p), n
