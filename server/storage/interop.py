"""Plain PyTorch checkpoints to and from adamd snapshots.

The checkpoint layout is what a PyTorch user saves and loads themselves:

    {"model": {param_name: tensor},                       # for module.load_state_dict
     "optimizer": torch.optim.Adam.state_dict()}          # integer indices in group order

Export writes it with torch.save; import reads it with `torch.load(weights_only=True)`, which
refuses anything but tensors and plain containers, so a checkpoint cannot run code here.

Exported param groups carry the options the server's Adam ran with on CPU (fused where the client
left the implementation open), so a local torch.optim.Adam that loads them continues bitwise where
the server left off. Indices map to names through each group's `param_names` (torch records them
when the optimizer was built from `named_parameters()`); without them, index i is the i-th entry of
the "model" dict, which must then hold exactly the optimized parameters.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from adamd.server.core import options as adam_options
from adamd.server.core import state_io
from adamd.server.core.options import ADAM_DEFAULTS
from adamd.server.storage import format as fmt


class CheckpointError(ValueError):
    """A torch checkpoint that cannot become an adamd model (layout, names, indices)."""


def to_torch_checkpoint(loaded: fmt.Loaded) -> dict[str, Any]:
    return checkpoint_of(fmt.params_of(loaded), fmt.groups_of(loaded), fmt.state_by_name(loaded))


def checkpoint_of(
    params: Mapping[str, torch.Tensor],
    groups: list[dict[str, Any]],
    by_name: Mapping[str, Mapping[str, torch.Tensor]],
) -> dict[str, Any]:
    """The torch checkpoint of a model's parameters, groups and Adam state keyed by name."""
    names = [g["params"] for g in groups]
    state = state_io.by_index(dict(by_name), state_io.index_order(names))
    effective = [
        adam_options.effective(
            {k: v for k, v in g.items() if k != "params"},
            torch.device("cpu"),
            [params[n] for n in g["params"]],
        )
        for g in groups
    ]
    param_groups = state_io.indexed_groups(effective, names)
    return {"model": dict(params), "optimizer": {"state": state, "param_groups": param_groups}}


def save_checkpoint(checkpoint: Mapping[str, Any], path: Path) -> None:
    """torch.save, atomically (a half-written export never has the final name)."""
    path = Path(path)
    tmp = path.with_name(f".tmp-{path.name}")
    torch.save(dict(checkpoint), tmp)
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_checkpoint(path: Path) -> dict[str, Any]:
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"{path}: not a loadable tensors-only checkpoint ({exc})") from exc
    if not isinstance(ckpt, dict) or "model" not in ckpt or "optimizer" not in ckpt:
        raise CheckpointError(f'{path}: expected a dict with "model" and "optimizer" entries')
    return ckpt


def from_torch_checkpoint(
    ckpt: Mapping[str, Any],
) -> tuple[dict[str, torch.Tensor], list[dict[str, Any]], dict[str, dict[str, Any]], list[str]]:
    """(params, param_groups with names, Adam state by name, option keys dropped)."""
    model, opt = ckpt["model"], ckpt["optimizer"]
    if not isinstance(model, Mapping) or not isinstance(opt, Mapping):
        raise CheckpointError('"model" must be a name -> tensor dict, "optimizer" a state_dict')
    saved_groups = opt.get("param_groups") or []
    if not saved_groups:
        raise CheckpointError("the optimizer state_dict has no param_groups")
    names_of = state_io.saved_names(saved_groups, list(model))
    if names_of is None:
        n_indices = sum(len(g["params"]) for g in saved_groups)
        raise CheckpointError(
            f'the optimizer covers {n_indices} parameters but "model" holds {len(model)} entries'
            " and the groups carry no param_names: build the optimizer from"
            ' model.named_parameters(), or save only the optimized parameters under "model"'
        )
    groups: list[dict[str, Any]] = []
    dropped: set[str] = set()
    for g in saved_groups:
        names = [names_of[i] for i in g["params"]]
        missing = [n for n in names if n not in model]
        if missing:
            raise CheckpointError(f'optimized parameters {missing} are missing from "model"')
        # Schedulers add keys such as initial_lr; the server's Adam takes only its own options.
        opts = {k: v for k, v in g.items() if k in ADAM_DEFAULTS}
        dropped |= {k for k in g if k not in ADAM_DEFAULTS and k not in ("params", "param_names")}
        groups.append({**opts, "params": names})
    order = [n for g in groups for n in g["params"]]
    params = {n: model[n] for n in order}
    state = state_io.by_name({i: dict(e) for i, e in opt.get("state", {}).items()}, names_of)
    return params, groups, state, sorted(dropped)
