"""RemoteAdam's param groups, torch's way: torch.optim.Adam's own checks of the arguments and of
a step's gradients, this worker's world and rank, the names its parameters have on the server,
the hyperparameters a group shares with the server (edits ride along with the next push; a
joined model's win), and the checks that the server's model is this one.
"""

from __future__ import annotations

import itertools
import os
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch

from adamd.client._types import ModelInfo
from adamd.protocol.hyper import ADAM_DEFAULTS, IMPLEMENTATION_KEYS, fused_refusal, same_value

# The options the server steps with (the implementation's own, foreach / fused / ..., stay here).
SYNCED_KEYS = tuple(k for k in ADAM_DEFAULTS if k not in IMPLEMENTATION_KEYS)

# --- torch's checks -------------------------------------------------------------------------------


def _copy_for_probe(params: Any) -> Any:
    """A copy of the params argument torch.optim.Adam can consume without touching ours."""
    if isinstance(params, (torch.Tensor, set)) or not isinstance(params, Iterable):
        return params  # torch raises the right error
    out = []
    for p in params:
        out.append(dict(p) if isinstance(p, dict) else p)
    return out


def _as_list(params: Any) -> Any:
    return params if isinstance(params, (torch.Tensor, set)) else list(params)


def checked_like_torch(params: Any, options: Mapping[str, Any]) -> Any:
    """torch's own checks, with torch's own messages (ValueError, TypeError, RuntimeError), on
    `params` made lists all the way down: a group's params may be a generator, which the probe
    would use up (torch takes those). Its warnings (a group listing a parameter twice) come once,
    from Optimizer.__init__ later."""
    if isinstance(params, Iterable) and not isinstance(params, (torch.Tensor, set)):
        params = [
            {**p, "params": _as_list(p["params"])} if isinstance(p, dict) and "params" in p else p
            for p in params
        ]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.optim.Adam(_copy_for_probe(params), **options)
    if options.get("differentiable"):
        raise ValueError(
            "differentiable=True is not supported by RemoteAdam: no autograd graph crosses the wire"
        )
    return params


# --- world and rank -----------------------------------------------------------------------------


def _env_rank() -> int | None:
    return int(os.environ["RANK"]) if "RANK" in os.environ else None


def world(
    world_size: int | str | None, rank: int | None, mode: str
) -> tuple[bool, int, int | None]:
    """(elastic, world size, rank): a fixed world from the arguments or torchrun's variables;
    an elastic one has size 0 and a rank the server assigns at construction (None)."""
    if world_size == "elastic":
        return True, 0, rank if rank is not None else _env_rank()
    size = int(world_size if world_size is not None else os.environ.get("WORLD_SIZE", 1))
    return False, size, _rank(rank, size, mode)


def _rank(rank: int | None, world_size: int, mode: str) -> int:  # a fixed world_size
    """This worker's rank: `rank`, else $RANK; required once there are several workers, since
    every worker silently taking rank 0 only shows up later, as DuplicatePush in a sync round."""
    if rank is None and "RANK" in os.environ:
        rank = int(os.environ["RANK"])
    if rank is None:
        if world_size > 1:
            raise ValueError(
                f"world_size={world_size} needs this worker's rank: pass rank= (0..{world_size - 1})"
                " or set the RANK environment variable (torchrun sets RANK and WORLD_SIZE)"
            )
        return 0
    if mode == "sync" and not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside 0..{world_size - 1} for world_size={world_size}")
    return int(rank)


def gradients(
    groups: Sequence[Mapping[str, Any]], name_of: Callable[[torch.Tensor], str]
) -> dict[str, torch.Tensor]:
    """The gradients a step pushes, by name (parameters without one get no step), refused as
    torch.optim.Adam refuses them: sparse ones, and complex ones its implementation cannot take."""
    grads: dict[str, torch.Tensor] = {}
    for group in groups:
        for p in group["params"]:
            if p.grad is not None:
                if p.grad.is_sparse:
                    raise RuntimeError(
                        "Adam does not support sparse gradients, please consider SparseAdam instead"
                    )
                if p.is_complex():
                    refusal = fused_refusal(group, p)
                    if refusal is not None:
                        raise RuntimeError(refusal)
                grads[name_of(p)] = p.grad
    return grads


# --- names ----------------------------------------------------------------------------------------


def name_new_params(group: Mapping[str, Any], names: dict[int, str]) -> None:
    """Name a new group's parameters in `names` (by id): its param_names, else their index
    among all parameters; a name taken already gets a suffix (.1, .2, ...)."""
    given = group.get("param_names")
    start = len(names)
    taken = set(names.values())
    for i, p in enumerate(group["params"]):
        if id(p) in names:  # listed twice in this group: torch warned and keeps both
            continue
        name = str(given[i]) if given is not None else str(start + i)
        if name in taken:  # two modules' named_parameters() both have "weight": torch takes it
            name = next(f"{name}.{k}" for k in itertools.count(1) if f"{name}.{k}" not in taken)
        taken.add(name)
        names[id(p)] = name


def group_for_server(group: Mapping[str, Any], names: Sequence[str]) -> dict[str, Any]:
    """A group as create_model takes it: its Adam options and its parameters' names."""
    return {**{k: group[k] for k in ADAM_DEFAULTS}, "params": list(names)}


# --- the options the server shares --------------------------------------------------------------


def clone(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, tuple):
        return tuple(clone(v) for v in value)
    return value


def options_of(group: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of the group's synced options, as last sent (later edits are compared to it)."""
    return {k: clone(group[k]) for k in SYNCED_KEYS}


def changed_options(
    groups: Sequence[Mapping[str, Any]], synced: Sequence[Mapping[str, Any]]
) -> list[tuple[int, dict[str, Any]]]:
    """Each group's options edited since they were last sent: (group index, the new values)."""
    out = []
    for i, (group, sent) in enumerate(zip(groups, synced)):
        changed = {k: group[k] for k in SYNCED_KEYS if not same_value(group[k], sent[k])}
        if changed:
            out.append((i, changed))
    return out


def check_same_model(
    model: str, info: ModelInfo, local: Mapping[str, torch.Tensor], here: list[list[str]]
) -> None:
    """The server's model is this one: the same parameters' shapes and, group by group, the
    same names (`here`); fewer groups here is fine (add_param_group rejoins later ones)."""
    for name, p in local.items():
        have = info.params.get(name)
        if have is None or tuple(p.shape) != have[0]:
            raise ValueError(
                f"model {model!r} on the server has {name!r} as {have}, here it is"
                f" {tuple(p.shape)}: not the same model"
            )
    there = [g["params"] for g in info.param_groups]
    if here != there[: len(here)]:
        raise ValueError(
            f"model {model!r} on the server has param groups {there}, here they are"
            f" {here}: not the same model"
        )


def check_joinable(
    model: str,
    info: ModelInfo,
    unsharded_at: str | None,
    elastic: bool,
    master_dtype: torch.dtype | None,
) -> None:
    """The server's model is one this optimizer may join: not one shard of a sharded model when
    this client is on one server (`unsharded_at`, its address; None: sharded), the same kind of
    world, the same master dtype where one is asked for."""
    if info.layout and unsharded_at is not None:
        raise ValueError(
            f"model {model!r} on {unsharded_at} is one shard of a model sharded"
            " over several servers: pass server= all of them, in their order"
        )
    if info.elastic != elastic:
        raise ValueError(
            f"model {model!r} on the server is "
            f"{'elastic' if info.elastic else f'world_size={info.world_size}'}; pass"
            f" world_size={'elastic' if info.elastic else info.world_size!r} to join it"
        )
    if master_dtype is not None and info.master_dtype != master_dtype:
        raise ValueError(
            f"model {model!r} on the server has master_dtype {info.master_dtype}, here"
            f" it is {master_dtype}: not the same model"
        )


def adopt_options(groups: Sequence[dict[str, Any]], remote: Sequence[Mapping[str, Any]]) -> None:
    """A joined model's hyperparameters win: the server's values into our groups (tensor
    options filled in place)."""
    for group, there in zip(groups, remote):
        for key in SYNCED_KEYS:
            value = there.get(key)
            if value is None:
                continue
            if isinstance(group[key], torch.Tensor) and isinstance(value, torch.Tensor):
                group[key].fill_(value.item())
            elif not same_value(group[key], value):
                group[key] = value
