"""Param groups and their hyperparameters: adding a group, checking and applying edits, undo.

`GroupEditor` holds what clients asked for per group (`requested`, torch's defaults filled in)
beside the live `optimizer.param_groups`, whose values may be device tensors that a captured CUDA
graph reads: those are filled in place, never replaced. Every edit is checked whole before any
of it is applied, and an applied edit can be undone bitwise (a round whose step fails puts back
the hyperparameters its pushes carried). The caller (HostedModel) holds the model lock.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from adamd.protocol.hyper import IMPLEMENTATION_KEYS, same_value
from adamd.server.core import options as adam_options
from adamd.server.errors import InvalidArgument

Updates = Sequence[tuple[int, Mapping[str, Any]]]  # (param group index, {option: new value})


class GroupEditor:
    """The param groups of one model's optimizer, edited only through here."""

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        params: Mapping[str, torch.Tensor],
        device: torch.device,
    ):
        self.optimizer = optimizer
        self.params = params  # the model's own dict (add_param_group adds to it first)
        self.device = device
        self.requested: list[dict[str, Any]] = []  # options as clients asked, per group

    def group_of(self, p: torch.Tensor) -> Mapping[str, Any]:
        """The param group holding `p`."""
        return next(g for g in self.optimizer.param_groups if any(q is p for q in g["params"]))

    def names(self) -> list[list[str]]:
        """Parameter names per group, in torch's order."""
        return [list(g["param_names"]) for g in self.optimizer.param_groups]

    def append(self, group: Mapping[str, Any]) -> None:
        """Add a group {"params": [names], **options} over parameters already in `params`."""
        names = list(group["params"])
        opts = {k: v for k, v in group.items() if k != "params"}
        adam_options.validate(opts, self.device)
        taken = {n for g in self.optimizer.param_groups for n in g["param_names"]}
        for n in names:
            if n not in self.params:
                raise InvalidArgument(f"param group names unknown parameter {n!r}")
            if n in taken:
                raise InvalidArgument(f"parameter {n!r} appears in more than one param group")
        params = [self.params[n] for n in names]
        eff = adam_options.effective(opts, self.device, params)
        unique = list(dict.fromkeys(names))
        try:
            self.optimizer.add_param_group(
                {"params": [self.params[n] for n in unique], "param_names": unique, **eff}
            )
        except (ValueError, RuntimeError, TypeError) as exc:
            raise InvalidArgument(str(exc)) from exc
        if len(unique) != len(names):
            # A parameter listed twice steps twice per step, as in torch.optim.Adam (which warns
            # and proceeds; the client warned already, and a warning here would go to the log).
            group = self.optimizer.param_groups[-1]
            group["params"], group["param_names"] = params, names
        self.requested.append({**adam_options.ADAM_DEFAULTS, **opts})

    def check(self, updates: Updates) -> None:
        """Raise InvalidArgument unless every update could be applied. Changes nothing."""
        groups = self.optimizer.param_groups
        for index, opts in updates:
            if not 0 <= index < len(groups):
                raise InvalidArgument(
                    f"param group {index} does not exist (model has {len(groups)})"
                )
            requested = self.requested[index]
            merged = {**requested, **opts}
            adam_options.validate(merged, self.device)
            for key in opts:
                if key in IMPLEMENTATION_KEYS and not same_value(opts[key], requested[key]):
                    raise InvalidArgument(f"{key} cannot change after creation")
            if merged.get("amsgrad") and not requested.get("amsgrad"):
                state = self.optimizer.state
                if any(
                    state.get(p) and "max_exp_avg_sq" not in state[p]
                    for p in groups[index]["params"]
                ):
                    raise InvalidArgument(
                        f"amsgrad cannot be turned on in param group {index} after it has stepped"
                        " (torch.optim.Adam fails its next step the same way: no max_exp_avg_sq)"
                    )

    def apply(self, updates: Updates) -> Callable[[], None]:
        """Apply checked updates; returns what puts the old values back, bitwise."""
        old = [
            (
                index,
                {k: self.requested[index][k] for k in opts},
                {k: _value_copy(self.optimizer.param_groups[index].get(k)) for k in opts},
            )
            for index, opts in updates
        ]
        for index, opts in updates:
            group = self.optimizer.param_groups[index]
            for key, value in opts.items():
                self.requested[index][key] = value
                _set_group_value(group, key, value)

        def undo() -> None:
            for index, requested, values in reversed(old):
                self.requested[index].update(requested)
                for key, value in values.items():
                    _set_group_value(self.optimizer.param_groups[index], key, value)

        return undo

    def apply_all(self, batches: Sequence[Updates]) -> Callable[[], None]:
        """Apply several checked batches in order (a round's pushes); one undo for all of them.
        Should one fail, those before it are undone and the error raised."""
        undos: list[Callable[[], None]] = []

        def undo() -> None:
            for u in reversed(undos):
                u()

        try:
            for updates in batches:
                undos.append(self.apply(updates))
        except Exception:
            undo()
            raise
        return undo


def _set_group_value(group: dict[str, Any], key: str, value: Any) -> None:
    """group[key] = value, but tensors the step reads (maybe in a captured graph) filled in place."""
    current = group.get(key)
    if isinstance(current, torch.Tensor) and isinstance(value, torch.Tensor):
        current.fill_(value.item())  # in place: a captured graph keeps reading it
    elif (
        isinstance(current, torch.Tensor)
        and current.device.type != "cpu"
        and isinstance(value, (int, float))
        and not isinstance(value, bool)
    ):
        current.fill_(float(value))  # the device lr options.effective made, likewise
    elif (
        key == "betas"
        and isinstance(current, tuple)
        and any(isinstance(b, torch.Tensor) for b in current)
    ):
        for cur, new in zip(current, value):
            if isinstance(cur, torch.Tensor):
                cur.fill_(float(new))
    else:
        group[key] = value


def _value_copy(value: Any) -> Any:
    """A copy of a group value that later in-place fills leave alone."""
    if isinstance(value, torch.Tensor):
        return value.clone()
    if isinstance(value, tuple):
        return tuple(_value_copy(v) for v in value)
    return value
