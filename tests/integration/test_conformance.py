"""RemoteAdam against a local torch.optim.Adam: same arguments, same results, same state_dict.

The matrix is PyTorch's own for CPU (shared/reference/adam_matrix.md): each configuration runs
with each implementation flag. Where the server runs the same implementation as the local
reference, parameters and every state tensor must be bitwise equal; the server runs fused Adam
when the client names no implementation, so that case is bitwise equal to local fused Adam and
equal to local for-loop Adam up to rounding.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import Any

import pytest
import torch

from adamd.client import RemoteAdam

CONFIGS: list[dict[str, Any]] = [
    {},
    {"lr": 0.01},
    {"weight_decay": 0.1},
    {"weight_decay": 0.1, "maximize": True},
    {"weight_decay": 0.1, "amsgrad": True},
    {"weight_decay": 0.1, "decoupled_weight_decay": True},  # AdamW
    {
        "lr": 0.01,
        "betas": (0.8, 0.99),
        "eps": 1e-6,
        "weight_decay": 0.05,
        "amsgrad": True,
        "decoupled_weight_decay": True,
    },
]
# What the client asks for -> what the server runs (and so what is bitwise comparable locally).
IMPLEMENTATIONS: list[tuple[str, dict[str, Any], dict[str, Any]]] = [
    ("default", {}, {"fused": True}),
    ("forloop", {"foreach": False}, {"foreach": False}),
    ("foreach", {"foreach": True}, {"foreach": True}),
    ("fused", {"fused": True}, {"fused": True}),
]
STEPS = 20


class Net(torch.nn.Module):
    """Two layers plus an extra matrix, which `contiguous=False` makes a non-contiguous leaf."""

    def __init__(self, contiguous: bool = True) -> None:
        super().__init__()
        self.l1 = torch.nn.Linear(6, 5)
        self.l2 = torch.nn.Linear(5, 3)
        t = torch.randn(5, 6).t()
        self.t = torch.nn.Parameter(t.contiguous() if contiguous else t)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.l2(torch.tanh(self.l1(x) + x @ self.t))


def twins(seed: int = 0, contiguous: bool = True) -> tuple[Net, Net]:
    torch.manual_seed(seed)
    a = Net(contiguous)
    b = Net(contiguous)
    b.load_state_dict(a.state_dict())
    with torch.no_grad():
        b.t.copy_(a.t)
    return a, b


def train(
    net: Net,
    opt: torch.optim.Optimizer,
    steps: int = STEPS,
    seed: int = 1,
    before_step: Callable[[int, Net, torch.optim.Optimizer], None] | None = None,
) -> list[float]:
    """`steps` optimizer steps on one fixed batch (so the loss must fall, or rise with maximize)."""
    x = torch.randn(8, 6, generator=torch.Generator().manual_seed(seed))
    losses = []
    for i in range(steps):
        opt.zero_grad()
        loss = net(x).pow(2).mean()
        loss.backward()
        if before_step is not None:
            before_step(i, net, opt)
        opt.step()
        losses.append(loss.item())
    return losses


def assert_same(
    remote_net: Net,
    remote: RemoteAdam,
    local_net: Net,
    local: torch.optim.Optimizer,
    *,
    exact: bool,
) -> None:
    def check(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
        assert a.dtype == b.dtype and a.shape == b.shape, what
        if exact:
            assert torch.equal(a, b), f"{what} differs: max {float((a - b).abs().max())}"
        else:
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=what)

    for (name, a), b in zip(remote_net.named_parameters(), local_net.parameters()):
        check(a.detach(), b.detach(), f"param {name}")
    rs, ls = remote.state_dict(), local.state_dict()
    assert rs["state"].keys() == ls["state"].keys()
    for i in ls["state"]:
        assert list(rs["state"][i]) == list(ls["state"][i]), f"state keys of {i}"
        for k in ls["state"][i]:
            check(rs["state"][i][k], ls["state"][i][k], f"state {i} {k}")
    for rg, lg in zip(rs["param_groups"], ls["param_groups"]):
        assert list(rg) == list(lg), "param_groups keys and their order"


@pytest.mark.parametrize(
    ("config", "impl"),
    list(itertools.product(CONFIGS, IMPLEMENTATIONS)),
    ids=[f"{c or 'defaults'}-{i[0]}" for c, i in itertools.product(CONFIGS, IMPLEMENTATIONS)],
)
def test_matrix_bitwise(
    daemon: Any,
    model_name: str,
    config: dict[str, Any],
    impl: tuple[str, dict[str, Any], dict[str, Any]],
) -> None:
    _, asked, runs = impl
    remote_net, local_net = twins()
    remote = RemoteAdam(
        remote_net.parameters(), **config, **asked, server=daemon.grpc_address, model=model_name
    )
    local = torch.optim.Adam(local_net.parameters(), **config, **runs)
    losses = train(remote_net, remote)
    train(local_net, local)
    assert_same(remote_net, remote, local_net, local, exact=True)
    # param_groups report what the client asked for, as a local Adam with those arguments would
    assert (
        remote.state_dict()["param_groups"]
        == torch.optim.Adam(local_net.parameters(), **config, **asked).state_dict()["param_groups"]
    )
    assert losses[-1] < losses[0] if not config.get("maximize") else losses[-1] > losses[0]
    assert daemon.registry.get(model_name).version == STEPS


@pytest.mark.parametrize("contiguous", [True, False], ids=["contiguous", "non-contiguous"])
@pytest.mark.parametrize("config", CONFIGS[:5], ids=lambda c: str(c or "defaults"))
def test_default_matches_forloop_to_rounding(
    daemon: Any, model_name: str, config: dict[str, Any], contiguous: bool
) -> None:
    """The server's fused Adam against local for-loop Adam, also for non-contiguous params.

    (Local fused Adam on CPU is no reference for non-contiguous params: in torch 2.13 it
    computes wrong values for them. The server stores parameters contiguously.)"""
    remote_net, local_net = twins(contiguous=contiguous)
    assert remote_net.t.is_contiguous() == contiguous
    remote = RemoteAdam(
        remote_net.parameters(), **config, server=daemon.grpc_address, model=model_name
    )
    local = torch.optim.Adam(local_net.parameters(), **config)  # for-loop on CPU
    train(remote_net, remote)
    train(local_net, local)
    assert_same(remote_net, remote, local_net, local, exact=False)


@pytest.mark.parametrize("impl", [{"fused": True}, {"foreach": False}], ids=["fused", "forloop"])
def test_tensor_lr(daemon: Any, model_name: str, impl: dict[str, Any]) -> None:
    """A Tensor lr: bitwise what a local Adam with a Tensor lr computes, and (as in torch) the
    same as a float lr up to rounding."""
    remote_net, local_net = twins()
    _, float_net = twins()
    remote = RemoteAdam(
        remote_net.parameters(),
        lr=torch.tensor(0.01),
        **impl,
        server=daemon.grpc_address,
        model=model_name,
    )
    local = torch.optim.Adam(local_net.parameters(), lr=torch.tensor(0.01), **impl)
    with_float = torch.optim.Adam(float_net.parameters(), lr=0.01, **impl)
    for net, opt in ((remote_net, remote), (local_net, local), (float_net, with_float)):
        train(net, opt)
    assert_same(remote_net, remote, local_net, local, exact=True)
    for a, b in zip(remote_net.parameters(), float_net.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert isinstance(remote.param_groups[0]["lr"], torch.Tensor)
    assert isinstance(daemon.registry.get(model_name).optimizer.param_groups[0]["lr"], torch.Tensor)


def test_grad_none_param_is_skipped(daemon: Any, model_name: str) -> None:
    """A param whose grad is None gets no step: no state, no step count, no weight decay."""
    remote_net, local_net = twins()
    remote = RemoteAdam(
        remote_net.parameters(),
        weight_decay=0.1,
        fused=True,
        server=daemon.grpc_address,
        model=model_name,
    )
    local = torch.optim.Adam(local_net.parameters(), weight_decay=0.1, fused=True)

    def drop_l2_bias_until_10(i: int, net: Net, opt: torch.optim.Optimizer) -> None:
        if i < 10:
            net.l2.bias.grad = None

    before = remote_net.l2.bias.detach().clone()
    train(remote_net, remote, steps=5, before_step=drop_l2_bias_until_10)
    assert torch.equal(remote_net.l2.bias, before)
    index = [p is remote_net.l2.bias for p in remote_net.parameters()].index(True)
    assert index not in remote.state_dict()["state"], (
        "state is created lazily at a param's first step"
    )
    remote_net2, _ = twins()
    remote2 = RemoteAdam(
        remote_net2.parameters(),
        weight_decay=0.1,
        fused=True,
        server=daemon.grpc_address,
        model=model_name + "-2",
    )
    train(remote_net2, remote2, before_step=drop_l2_bias_until_10)
    train(local_net, local, before_step=drop_l2_bias_until_10)
    assert_same(remote_net2, remote2, local_net, local, exact=True)
    assert float(remote2.state_dict()["state"][index]["step"]) == STEPS - 10


def test_named_parameters_and_param_names(daemon: Any, model_name: str) -> None:
    remote_net, local_net = twins()
    remote = RemoteAdam(
        remote_net.named_parameters(),
        lr=0.01,
        fused=True,
        server=daemon.grpc_address,
        model=model_name,
    )
    local = torch.optim.Adam(local_net.named_parameters(), lr=0.01, fused=True)
    train(remote_net, remote)
    train(local_net, local)
    assert_same(remote_net, remote, local_net, local, exact=True)
    assert remote.state_dict()["param_groups"][0]["param_names"] == [
        n for n, _ in remote_net.named_parameters()
    ]
    assert sorted(daemon.registry.get(model_name).params) == sorted(
        n for n, _ in remote_net.named_parameters()
    )


def _groups(net: Net) -> list[dict[str, Any]]:
    return [
        {"params": list(net.l1.parameters()), "lr": 0.02, "weight_decay": 0.1},
        {"params": [*net.l2.parameters(), net.t], "betas": (0.8, 0.95)},
    ]


def train_grouped_twins(
    groups: Callable[[Net], Any], daemon: Any, model_name: str
) -> tuple[Net, RemoteAdam]:
    """RemoteAdam and a local fused Adam over twin nets, param groups from `groups(net)`, trained
    alike and checked bitwise equal."""
    remote_net, local_net = twins()
    remote = RemoteAdam(
        groups(remote_net), lr=0.005, fused=True, server=daemon.grpc_address, model=model_name
    )
    local = torch.optim.Adam(groups(local_net), lr=0.005, fused=True)
    train(remote_net, remote)
    train(local_net, local)
    assert_same(remote_net, remote, local_net, local, exact=True)
    return remote_net, remote


def test_param_groups_apply_per_group(daemon: Any, model_name: str) -> None:
    train_grouped_twins(_groups, daemon, model_name)
    groups = daemon.registry.get(model_name).optimizer.param_groups
    assert [g["lr"] for g in groups] == [0.02, 0.005]


def test_add_param_group_unfreezes_a_layer_mid_run(daemon: Any, model_name: str) -> None:
    remote_net, local_net = twins()
    remote = RemoteAdam(
        list(remote_net.l1.parameters()), fused=True, server=daemon.grpc_address, model=model_name
    )
    local = torch.optim.Adam(list(local_net.l1.parameters()), fused=True)

    def unfreeze_at_8(i: int, net: Net, opt: torch.optim.Optimizer) -> None:
        if i == 8:
            opt.add_param_group({"params": [*net.l2.parameters(), net.t], "lr": 0.003})

    train(remote_net, remote, before_step=unfreeze_at_8)
    train(local_net, local, before_step=unfreeze_at_8)
    assert_same(remote_net, remote, local_net, local, exact=True)
    assert len(daemon.registry.get(model_name).optimizer.param_groups) == 2


@pytest.mark.parametrize(
    "make_scheduler",
    [
        lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=5, gamma=0.5),
        lambda opt: torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.05, total_steps=STEPS),
        lambda opt: torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=STEPS),
    ],
    ids=["StepLR", "OneCycleLR", "CosineAnnealingLR"],
)
def test_lr_scheduler_works_unchanged(
    daemon: Any, model_name: str, make_scheduler: Callable[[Any], Any]
) -> None:
    remote_net, local_net = twins()
    remote = RemoteAdam(
        remote_net.parameters(), lr=0.01, fused=True, server=daemon.grpc_address, model=model_name
    )
    local = torch.optim.Adam(local_net.parameters(), lr=0.01, fused=True)
    last_used: dict[str, Any] = {}
    for net, opt in ((remote_net, remote), (local_net, local)):
        sched = make_scheduler(opt)
        g = torch.Generator().manual_seed(3)
        for _ in range(STEPS):
            opt.zero_grad()
            net(torch.randn(8, 6, generator=g)).pow(2).mean().backward()
            last_used = {k: opt.param_groups[0][k] for k in ("lr", "betas")}
            opt.step()
            sched.step()
    assert_same(remote_net, remote, local_net, local, exact=True)
    # The server ran the last step with the values the schedule had set for it (a schedule's
    # later edit travels with the next push).
    server_group = daemon.registry.get(model_name).optimizer.param_groups[0]
    assert server_group["lr"] == last_used["lr"]
    assert tuple(server_group["betas"]) == tuple(last_used["betas"])


def test_load_state_dict_from_local_adam_then_continue(daemon: Any, model_name: str) -> None:
    """Train locally, move the checkpoint to RemoteAdam, continue: same as staying local."""
    local_net, other = twins()
    local = torch.optim.Adam(local_net.parameters(), lr=0.01, amsgrad=True, fused=True)
    train(local_net, local, steps=7)
    saved_model, saved_opt = local_net.state_dict(), local.state_dict()

    remote_net = Net()
    remote_net.load_state_dict(saved_model)
    remote = RemoteAdam(
        remote_net.parameters(),
        lr=0.5,
        amsgrad=True,
        fused=True,
        server=daemon.grpc_address,
        model=model_name,
    )
    remote.load_state_dict(saved_opt)
    assert (
        remote.param_groups[0]["lr"] == 0.01
    )  # hyperparameters come from the state dict, as in torch
    train(remote_net, remote, steps=5, seed=9)
    train(local_net, local, steps=5, seed=9)
    assert_same(remote_net, remote, local_net, local, exact=True)
    # ...and back: RemoteAdam's state_dict loads into a local Adam
    back = torch.optim.Adam(other.parameters(), lr=0.01, amsgrad=True, fused=True)
    back.load_state_dict(remote.state_dict())
    other.load_state_dict(remote_net.state_dict())
    train(other, back, steps=3, seed=11)
    train(remote_net, remote, steps=3, seed=11)
    assert_same(remote_net, remote, other, back, exact=True)


def test_state_dict_structure_matches_torch(daemon: Any, model_name: str) -> None:
    remote_net, local_net = twins()
    remote = RemoteAdam(
        remote_net.parameters(), amsgrad=True, server=daemon.grpc_address, model=model_name
    )
    local = torch.optim.Adam(local_net.parameters(), amsgrad=True)
    assert remote.state_dict() == local.state_dict()  # empty state, identical groups
    train(remote_net, remote, steps=2)
    train(local_net, local, steps=2)
    rs, ls = remote.state_dict(), local.state_dict()
    assert list(rs) == list(ls) == ["state", "param_groups"]
    assert rs["param_groups"] == ls["param_groups"]
    for entry in rs["state"].values():
        assert list(entry) == ["step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"]
        assert entry["step"].dim() == 0 and entry["step"].dtype == torch.float32
        assert float(entry["step"]) == 2.0
    assert remote.state_dict()["param_groups"] == rs["param_groups"], "state_dict is deterministic"


def test_group_params_as_generators_and_names_repeated_across_groups(
    daemon: Any, model_name: str
) -> None:
    """torch takes a group's params as a generator, and named_parameters() of two submodules that
    both have a "weight"; so must RemoteAdam (the server gets unique names)."""

    def groups(net: Net) -> list[dict[str, Any]]:
        return [
            {"params": net.l1.named_parameters(), "lr": 0.02},
            {"params": net.l2.named_parameters()},
            {"params": iter([("t", net.t)]), "weight_decay": 0.1},
        ]

    _, remote = train_grouped_twins(groups, daemon, model_name)
    assert [g["param_names"] for g in remote.state_dict()["param_groups"]] == [
        ["weight", "bias"],
        ["weight", "bias"],
        ["t"],
    ]
    assert list(daemon.registry.get(model_name).params) == [
        "weight",
        "bias",
        "weight.1",
        "bias.1",
        "t",
    ]


def test_add_param_group_with_names_already_in_use(daemon: Any, model_name: str) -> None:
    remote_net, local_net = twins()
    remote = RemoteAdam(
        remote_net.l2.named_parameters(), fused=True, server=daemon.grpc_address, model=model_name
    )
    local = torch.optim.Adam(local_net.l2.named_parameters(), fused=True)
    l1_before = [p.detach().clone() for p in remote_net.l1.parameters()]

    def unfreeze_at_4(i: int, net: Net, opt: torch.optim.Optimizer) -> None:
        if i == 4:
            opt.add_param_group({"params": list(net.l1.named_parameters()), "lr": 0.003})
            if opt is remote:  # joining kept l1's own values (nothing pulled over them)
                assert all(torch.equal(a, b) for a, b in zip(net.l1.parameters(), l1_before))

    train(remote_net, remote, before_step=unfreeze_at_4)
    train(local_net, local, before_step=unfreeze_at_4)
    assert_same(remote_net, remote, local_net, local, exact=True)


def test_joining_with_other_param_groups_is_refused(daemon: Any, model_name: str) -> None:
    first_net, _ = twins()
    RemoteAdam(_groups(first_net), server=daemon.grpc_address, model=model_name)
    late_net, _ = twins()
    one_group = [*late_net.l1.parameters(), *late_net.l2.parameters(), late_net.t]
    with pytest.raises(ValueError, match="param groups"):  # the same tensors, other groups
        RemoteAdam(one_group, server=daemon.grpc_address, model=model_name)
    # Fewer groups is a worker that adds the rest later, as the first one did.
    late = RemoteAdam(list(late_net.l1.parameters()), server=daemon.grpc_address, model=model_name)
    late.add_param_group({"params": [*late_net.l2.parameters(), late_net.t]})
    assert len(late.param_groups) == 2


def test_existing_model_server_params_win(daemon: Any, model_name: str) -> None:
    first_net, _ = twins(seed=0)
    first = RemoteAdam(
        first_net.parameters(), lr=0.01, server=daemon.grpc_address, model=model_name
    )
    train(first_net, first, steps=3)
    late_net, _ = twins(seed=42)  # a different init, as a restarted worker would have
    late = RemoteAdam(late_net.parameters(), lr=0.01, server=daemon.grpc_address, model=model_name)
    for a, b in zip(first_net.parameters(), late_net.parameters()):
        assert torch.equal(a, b)
    assert late.version == first.version == 3


def test_closure_and_loss(daemon: Any, model_name: str) -> None:
    remote_net, local_net = twins()
    remote = RemoteAdam(
        remote_net.parameters(), fused=True, server=daemon.grpc_address, model=model_name
    )
    local = torch.optim.Adam(local_net.parameters(), fused=True)
    x = torch.randn(4, 6)
    for net, opt in ((remote_net, remote), (local_net, local)):

        def closure(net: Net = net, opt: torch.optim.Optimizer = opt) -> torch.Tensor:
            opt.zero_grad()
            loss = net(x).pow(2).mean()
            loss.backward()
            return loss

        returned = opt.step(closure)
        assert isinstance(returned, torch.Tensor)
    assert_same(remote_net, remote, local_net, local, exact=True)


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"lr": -0.1}, ValueError),
        ({"eps": -1.0}, ValueError),
        ({"betas": (1.0, 0.999)}, ValueError),
        ({"betas": (0.9, -0.1)}, ValueError),
        ({"weight_decay": -0.1}, ValueError),
        ({"lr": torch.tensor([0.1, 0.2])}, ValueError),
        ({"lr": torch.tensor(0.1), "foreach": True}, ValueError),
        ({"betas": (torch.tensor(0.9), 0.99)}, ValueError),
        ({"fused": True, "foreach": True}, RuntimeError),
        ({"fused": True, "differentiable": True}, RuntimeError),
        ({"differentiable": True}, ValueError),
    ],
)
def test_invalid_arguments_raise_like_torch(
    daemon: Any, model_name: str, kwargs: dict[str, Any], error: type[Exception]
) -> None:
    params = [torch.nn.Parameter(torch.randn(3))]
    if not kwargs.get("differentiable") or kwargs.get("fused"):
        with pytest.raises(error):
            torch.optim.Adam([torch.nn.Parameter(torch.randn(3))], **kwargs)
    with pytest.raises(error):
        RemoteAdam(params, **kwargs, server=daemon.grpc_address, model=model_name)
    assert model_name not in daemon.registry.names()


def test_invalid_params_argument_raises_like_torch(daemon: Any, model_name: str) -> None:
    p = torch.nn.Parameter(torch.randn(3))
    with pytest.raises(TypeError, match="iterable of Tensors"):
        RemoteAdam(p, server=daemon.grpc_address, model=model_name)
    with pytest.raises(ValueError, match="more than one parameter group"):
        RemoteAdam([{"params": [p]}, {"params": [p]}], server=daemon.grpc_address, model=model_name)
    assert model_name not in daemon.registry.names()


def test_params_as_a_set_behaves_like_torch(daemon: Any, model_name: str) -> None:
    """torch's reference matrix lists TypeError for a set; torch 2.13 accepts one. Do as torch does."""
    p = torch.nn.Parameter(torch.randn(3))
    try:
        torch.optim.Adam({p})
    except TypeError:
        with pytest.raises(TypeError):
            RemoteAdam({p}, server=daemon.grpc_address, model=model_name)
    else:
        RemoteAdam({p}, server=daemon.grpc_address, model=model_name)
        assert model_name in daemon.registry.names()


# --- complex parameters, duplicates, state-dict hooks ---------------------------------------


def complex_twins(dtype: torch.dtype) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """A complex matrix, a complex vector and a real one (PyTorch's own mix), twice."""
    torch.manual_seed(3)
    a = [
        torch.randn(4, 3, dtype=dtype, requires_grad=True),
        torch.randn(5, dtype=dtype, requires_grad=True),
        torch.randn(3, 2, requires_grad=True),
    ]
    return a, [p.detach().clone().requires_grad_() for p in a]


@pytest.mark.parametrize("dtype", [torch.complex64, torch.complex128])
@pytest.mark.parametrize(
    "config", [CONFIGS[0], CONFIGS[4], CONFIGS[6]], ids=["defaults", "amsgrad", "adamw"]
)
@pytest.mark.parametrize(
    "impl", [{}, {"foreach": False}, {"foreach": True}], ids=["default", "forloop", "foreach"]
)
def test_complex_params_bitwise(
    daemon: Any,
    model_name: str,
    dtype: torch.dtype,
    config: dict[str, Any],
    impl: dict[str, Any],
) -> None:
    """Complex parameters train bitwise like a local Adam with the same flags: with none, the
    server runs what torch picks for them on CPU (the for-loop), not its fused default."""
    remote_params, local_params = complex_twins(dtype)
    remote = RemoteAdam(
        remote_params, **config, **impl, server=daemon.grpc_address, model=model_name
    )
    local = torch.optim.Adam(local_params, **config, **impl)
    gen = torch.Generator().manual_seed(4)
    for step in range(6):
        for i, (r, loc) in enumerate(zip(remote_params, local_params)):
            if step == 2 and i == 1:
                r.grad = loc.grad = None  # skipped: no step, no weight decay for it
                continue
            g = torch.randn(r.shape, dtype=r.dtype, generator=gen)
            r.grad, loc.grad = g, g.clone()
        remote.step()
        local.step()
    for r, loc in zip(remote_params, local_params):
        assert r.dtype == loc.dtype and torch.equal(r, loc)
        assert list(remote.state[r]) == list(local.state[loc])
        for k, v in local.state[loc].items():
            assert remote.state[r][k].dtype == v.dtype and torch.equal(remote.state[r][k], v), k
    assert daemon.registry.get(model_name).version == 6
    # and a checkpoint moves both ways
    again = RemoteAdam(
        local_params, **config, **impl, server=daemon.grpc_address, model=model_name + "-l"
    )
    again.load_state_dict(local.state_dict())
    sd = again.state_dict()
    for i, entry in local.state_dict()["state"].items():
        for k, v in entry.items():
            assert torch.equal(sd["state"][i][k], v)


def test_complex_with_fused_raises_torchs_error_and_changes_nothing(
    daemon: Any, model_name: str
) -> None:
    remote_params, local_params = complex_twins(torch.complex64)
    remote = RemoteAdam(remote_params, fused=True, server=daemon.grpc_address, model=model_name)
    local = torch.optim.Adam(local_params, fused=True)  # torch accepts it here too...
    for p in (*remote_params, *local_params):
        p.grad = torch.ones_like(p)
    with pytest.raises(RuntimeError) as local_error:
        local.step()  # ...and refuses at the first step
    with pytest.raises(RuntimeError) as remote_error:
        remote.step()
    assert str(remote_error.value) == str(local_error.value)
    assert "floating point" in str(remote_error.value)
    model = daemon.registry.get(model_name)
    assert model.version == 0 and not model.optimizer.state


def test_complex_with_bf16_wire_travels_as_complex(daemon: Any, model_name: str) -> None:
    """wire_dtype narrows real tensors only; complex ones travel at full width."""
    remote_params, local_params = complex_twins(torch.complex64)
    remote = RemoteAdam(
        remote_params,
        foreach=False,
        server=daemon.grpc_address,
        model=model_name,
        wire_dtype=torch.bfloat16,
    )
    local = torch.optim.Adam(local_params, foreach=False)
    for r, loc in zip(remote_params, local_params):
        g = torch.randn_like(r)
        r.grad, loc.grad = g, g.to(torch.bfloat16).to(g.dtype) if not g.is_complex() else g.clone()
    remote.step()
    local.step()
    assert torch.equal(remote_params[0], local_params[0])  # complex: exact
    assert torch.equal(remote_params[1], local_params[1])


def test_duplicate_param_in_a_group_warns_and_steps_like_torch(
    daemon: Any, model_name: str
) -> None:
    """torch warns about a group listing a parameter twice, keeps both, and steps it twice."""
    torch.manual_seed(5)
    p, other = torch.randn(3, requires_grad=True), torch.randn(2, requires_grad=True)
    q, other_l = p.detach().clone().requires_grad_(), other.detach().clone().requires_grad_()
    with pytest.warns(UserWarning, match="duplicate parameters") as caught:
        remote = RemoteAdam(
            [p, other, p], foreach=False, server=daemon.grpc_address, model=model_name
        )
    assert len(caught) == 1  # once, as torch.optim.Adam warns once
    with pytest.warns(UserWarning, match="duplicate parameters"):
        local = torch.optim.Adam([q, other_l, q], foreach=False)
    for _ in range(3):
        for r, loc in ((p, q), (other, other_l)):
            g = torch.randn_like(r)
            r.grad, loc.grad = g, g.clone()
        remote.step()
        local.step()
    assert torch.equal(p, q) and torch.equal(other, other_l)
    assert float(remote.state[p]["step"]) == float(local.state[q]["step"]) == 6.0
    rs, ls = remote.state_dict(), local.state_dict()
    assert rs["param_groups"][0]["params"] == ls["param_groups"][0]["params"]
    assert rs["state"].keys() == ls["state"].keys()
    assert torch.equal(rs["state"][2]["exp_avg"], ls["state"][2]["exp_avg"])


def test_all_four_state_dict_hooks_run_as_in_torch(daemon: Any, model_name: str) -> None:
    """The same hooks on a RemoteAdam and a local Adam leave the same record and results."""
    results = []
    for remote in (True, False):
        log: list[str] = []
        torch.manual_seed(6)
        w = torch.randn(3, 2, requires_grad=True)
        opt: torch.optim.Optimizer = (
            RemoteAdam([w], lr=0.01, server=daemon.grpc_address, model=model_name)
            if remote
            else torch.optim.Adam([w], lr=0.01)
        )

        def pre(o: torch.optim.Optimizer, log: list[str] = log) -> None:
            log.append("sd-pre")
            o.state["note"] = "kept"  # type: ignore[index]

        def post(o: torch.optim.Optimizer, sd: dict[str, Any], log: list[str] = log) -> Any:
            log.append(f"sd-post:{sorted(map(str, sd['state']))}")
            return {**sd, "extra": 1}

        def load_pre(o: torch.optim.Optimizer, sd: dict[str, Any], log: list[str] = log) -> Any:
            log.append(f"load-pre:{sd.get('extra')}")
            sd = {**sd, "param_groups": [dict(g, lr=0.5) for g in sd["param_groups"]]}
            return sd

        def load_post(o: torch.optim.Optimizer, log: list[str] = log) -> None:
            note = o.state.get("note")  # type: ignore[call-overload]
            log.append(f"load-post:{o.param_groups[0]['lr']}:{note}")

        handles = [
            opt.register_state_dict_pre_hook(pre),
            opt.register_state_dict_post_hook(post),
            opt.register_load_state_dict_pre_hook(load_pre),
            opt.register_load_state_dict_post_hook(load_post),
        ]
        w.grad = torch.ones_like(w)
        opt.step()
        sd = opt.state_dict()
        opt.load_state_dict(sd)
        w.grad = torch.ones_like(w)
        opt.step()  # lr 0.5 from the load pre hook, on the server too
        for h in handles:
            h.remove()
        opt.state_dict()
        results.append((log, sd["extra"], w.detach().clone()))
    (rlog, rextra, rw), (llog, lextra, lw) = results
    assert rlog == llog == ["sd-pre", "sd-post:['0', 'note']", "load-pre:1", "load-post:0.5:kept"]
    assert rextra == lextra == 1
    torch.testing.assert_close(rw, lw)  # server fused vs local for-loop: equal to rounding
