"""Adam state in torch's format: the one name <-> index mapping, reading it out, checking it in.

torch.optim.Adam numbers parameters 0, 1, ... across its param groups in order; adamd names them.
`index_order` is that mapping and everything that converts between the two goes through it:
HostedModel (state_by_name, load_state), views.snapshot_payload and snapshot_interop (torch
checkpoints). The checks here run before load_state changes anything, so a bad state leaves the
model bitwise unchanged.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, TypeVar

import torch

from adamd.protocol.frames import trainable
from adamd.protocol.hyper import IMPLEMENTATION_KEYS
from adamd.server.core.groups import GroupEditor
from adamd.server.errors import InvalidArgument

T = TypeVar("T")

STATE_KEYS = ("step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq")
_SHAPED = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")  # shaped like their parameter

NamedState = Mapping[str, Mapping[str, torch.Tensor]]  # parameter name -> {state key: tensor}


# --- the mapping ---------------------------------------------------------------------------------


def index_order(group_names: Iterable[Sequence[str]]) -> list[str]:
    """torch's index i is the i-th name of the groups' names laid end to end."""
    return [n for names in group_names for n in names]


def group_names(optimizer: torch.optim.Optimizer) -> list[list[str]]:
    return [list(g["param_names"]) for g in optimizer.param_groups]


def by_index(named: Mapping[str, T], order: Sequence[str]) -> dict[int, T]:
    index = {n: i for i, n in enumerate(order)}
    return {index[n]: v for n, v in named.items()}


def by_name(indexed: Mapping[Any, T], order: Sequence[str] | Mapping[int, str]) -> dict[str, T]:
    """Indices (ints, or their strings after a round trip through JSON) to names."""
    return {order[int(i)]: v for i, v in indexed.items()}


def indexed_groups(
    groups: Sequence[Mapping[str, Any]], names: Sequence[Sequence[str]]
) -> list[dict[str, Any]]:
    """torch's param_groups: each group's options with "params" as indices, plus "param_names"."""
    index = {n: i for i, n in enumerate(index_order(names))}
    return [
        {
            **{k: v for k, v in g.items() if k not in ("params", "param_names")},
            "param_names": list(g_names),
            "params": [index[n] for n in g_names],
        }
        for g, g_names in zip(groups, names)
    ]


def saved_names(
    saved_groups: Sequence[Mapping[str, Any]], fallback: Sequence[str]
) -> dict[int, str] | None:
    """Index -> name of a saved torch state_dict: from the groups' param_names (torch records
    them for an optimizer built from named_parameters()), else index i is `fallback[i]` when the
    counts match; None when neither says."""
    if all("param_names" in g for g in saved_groups):
        return {i: n for g in saved_groups for i, n in zip(g["params"], g["param_names"])}
    if len(fallback) == sum(len(g["params"]) for g in saved_groups):
        return dict(enumerate(fallback))
    return None


# --- reading out ---------------------------------------------------------------------------------


def named_state(optimizer: torch.optim.Optimizer) -> Iterator[tuple[str, Mapping[str, Any]]]:
    """(name, live state dict) of every parameter that has state, in index order. No copies."""
    for group in optimizer.param_groups:
        for name, p in zip(group["param_names"], group["params"]):
            state = optimizer.state.get(p)
            if state:
                yield name, state


def state_by_name(optimizer: torch.optim.Optimizer) -> dict[str, dict[str, torch.Tensor]]:
    """Every parameter's state, copied, keyed by name (numbers as 0-d tensors). Lock held."""
    return {
        name: {
            k: (v.detach().clone() if isinstance(v, torch.Tensor) else torch.tensor(v))
            for k, v in state.items()
        }
        for name, state in named_state(optimizer)
    }


def host_state(
    optimizer: torch.optim.Optimizer, copy: Callable[[torch.Tensor], torch.Tensor]
) -> dict[str, dict[str, torch.Tensor]]:
    """Every parameter's state keyed by name, each tensor through `copy` (on CUDA the model's
    host_copy, inside its on_device()), numbers as 0-d tensors. Lock held."""
    return {
        name: {k: copy(v) if isinstance(v, torch.Tensor) else torch.tensor(v) for k, v in e.items()}
        for name, e in named_state(optimizer)
    }


def torch_state_dict(optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """optimizer.state_dict() with every group's param_names. Live tensors: copy under the lock."""
    sd = optimizer.state_dict()
    return {
        "state": sd["state"],
        "param_groups": indexed_groups(sd["param_groups"], group_names(optimizer)),
    }


# --- checking in ---------------------------------------------------------------------------------


def check_entries(state: NamedState, params: Mapping[str, torch.Tensor]) -> None:
    """Each entry names a parameter and holds known keys of the right shape and dtype."""
    for name, entry in state.items():
        p = params.get(name)
        if p is None:
            raise InvalidArgument(f"state names unknown parameter {name!r}")
        for key, t in entry.items():
            if key in _SHAPED and tuple(t.shape) != tuple(p.shape):
                raise InvalidArgument(
                    f"state {key} of {name!r} has shape {list(t.shape)}, parameter has {list(p.shape)}"
                )
            if key == "step" and t.numel() != 1:
                raise InvalidArgument(f"state step of {name!r} must hold one number")
            if key not in STATE_KEYS:
                raise InvalidArgument(f"unknown state key {key!r} for {name!r}")
            if key != "step" and not trainable(t.dtype):
                raise InvalidArgument(
                    f"state {key} of {name!r} has dtype {t.dtype}, need a float or complex dtype"
                )


def group_updates(
    groups: Sequence[Mapping[str, Any]], names: Sequence[Sequence[str]]
) -> list[tuple[int, dict[str, Any]]]:
    """Saved param groups as hyperparameter updates (implementation options stay the model's).
    The groups must list the model's parameters group for group."""
    if len(groups) != len(names):
        raise InvalidArgument(f"state has {len(groups)} param groups, model has {len(names)}")
    updates = []
    for i, (g, g_names) in enumerate(zip(groups, names)):
        if list(g.get("params", g_names)) != list(g_names):
            raise InvalidArgument(f"param group {i} lists {list(g['params'])}, model has {g_names}")
        opts = {
            k: v
            for k, v in g.items()
            if k not in ("params", "param_names") and k not in IMPLEMENTATION_KEYS
        }
        updates.append((i, opts))
    return updates


def check_complete(state: NamedState, names: Sequence[Sequence[str]], amsgrad: list[bool]) -> None:
    """A parameter with state has all its group needs: step and both moments, plus
    max_exp_avg_sq with amsgrad (torch would fail the next step without it)."""
    for i, g_names in enumerate(names):
        needed = {"step", "exp_avg", "exp_avg_sq"} | ({"max_exp_avg_sq"} if amsgrad[i] else set())
        for name in g_names:
            lacking = needed - set(state.get(name, needed))
            if lacking:
                raise InvalidArgument(
                    f"state of {name!r} lacks {sorted(lacking)} (param group {i} needs"
                    f" {sorted(needed)}; a parameter that never stepped has no state at all)"
                )


def checked_load(
    state: NamedState,
    groups: Sequence[Mapping[str, Any]] | None,
    params: Mapping[str, torch.Tensor],
    editor: GroupEditor,
    optimizer: torch.optim.Optimizer,
) -> tuple[list[tuple[int, dict[str, Any]]], dict[str, Any]]:
    """Every check of a state load (HostedModel.load_state), before anything changes: the
    hyperparameter updates from `groups` and what optimizer.load_state_dict takes. Lock held."""
    names = editor.names()
    updates = [] if groups is None else group_updates(groups, names)
    check_entries(state, params)
    editor.check(updates)
    new = dict(updates)
    amsgrad = [new.get(i, {}).get("amsgrad", r["amsgrad"]) for i, r in enumerate(editor.requested)]
    check_complete(state, names, amsgrad)
    return updates, load_dict(state, optimizer)


def load_dict(state: NamedState, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """What optimizer.load_state_dict takes for `state` (checked), groups as the optimizer has them."""
    names = group_names(optimizer)
    order = index_order(names)
    stray = sorted(set(state) - set(order))
    if stray:
        raise InvalidArgument(f"state names parameters in no param group: {stray}")
    return {
        "state": by_index({n: dict(s) for n, s in state.items()}, order),
        "param_groups": indexed_groups(optimizer.param_groups, names),
    }
