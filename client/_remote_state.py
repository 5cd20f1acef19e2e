"""RemoteAdam's optimizer state in torch's shapes: `state`, the lazily fetched mapping that
mirrors the server's Adam state by parameter, and the translation of a torch.optim.Adam state
dict (keyed by parameter index) into the state and groups the server loads (keyed by name).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Mapping
from copy import deepcopy
from typing import Any

import torch

from adamd.client._param_groups import SYNCED_KEYS
from adamd.protocol.hyper import ADAM_DEFAULTS

STATE_ORDER = ("step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq")
# The group keys torch.optim.Adam.__setstate__ fills in when a loaded state dict lacks them.
_SETSTATE_DEFAULTS = (
    "amsgrad",
    "maximize",
    "foreach",
    "capturable",
    "differentiable",
    "decoupled_weight_decay",
    "fused",
)


class ServerState(defaultdict):  # type: ignore[type-arg]
    """`RemoteAdam.state`: torch's per-parameter state, mirroring the server's.

    Entries keyed by a parameter hold the server's Adam state (step, exp_avg, exp_avg_sq,
    max_exp_avg_sq), fetched when the mapping is first read after the model changed; they are
    copies, so writing into them changes nothing on the server (load_state_dict does). Other keys
    stay local, as torch keeps them (state-dict hooks use such keys).
    """

    def __init__(self, fetch: Callable[[], dict[torch.Tensor, dict[str, Any]] | None]):
        super().__init__(dict)
        self._fetch = fetch

    def _sync(self) -> None:
        fresh = self._fetch()  # None: nothing changed since the last fetch
        if fresh is None:
            return
        for key in [k for k in dict.keys(self) if isinstance(k, torch.Tensor)]:
            dict.__delitem__(self, key)
        dict.update(self, fresh)

    def __getitem__(self, key: Any) -> Any:
        self._sync()
        return super().__getitem__(key)

    def __contains__(self, key: object) -> bool:
        self._sync()
        return super().__contains__(key)

    def __iter__(self) -> Iterator[Any]:
        self._sync()
        return super().__iter__()

    def __len__(self) -> int:
        self._sync()
        return super().__len__()

    def get(self, key: Any, default: Any = None) -> Any:
        self._sync()
        return super().get(key, default)

    def keys(self) -> Any:
        self._sync()
        return super().keys()

    def values(self) -> Any:
        self._sync()
        return super().values()

    def items(self) -> Any:
        self._sync()
        return super().items()

    def __repr__(self) -> str:
        self._sync()
        return super().__repr__()

    def __eq__(self, other: object) -> bool:
        self._sync()
        return super().__eq__(other)

    __hash__ = None  # type: ignore[assignment]

    def copy(self) -> defaultdict[Any, Any]:  # type: ignore[override]
        self._sync()
        return defaultdict(dict, dict.items(self))

    def __reduce__(self) -> Any:
        # Copies and pickles hold what was read, as a plain defaultdict (no server attached).
        self._sync()
        return (defaultdict, (dict,), None, None, iter(dict.items(self)))


def by_param(
    remote: Mapping[str, Mapping[str, torch.Tensor]],
    params: Iterable[torch.Tensor],
    name_of: Callable[[torch.Tensor], str],
) -> dict[torch.Tensor, dict[str, Any]]:
    """The server's state (get_state's, by name) by parameter, on each parameter's device (a
    CPU step count stays on the CPU, as torch keeps it); parameters with no step yet have none."""
    out: dict[torch.Tensor, dict[str, Any]] = {}
    for p in params:
        entry = remote.get(name_of(p))
        if entry is None:
            continue  # no step yet: torch creates state lazily too
        out[p] = {
            k: entry[k] if k == "step" and p.device.type == "cpu" else entry[k].to(p.device)
            for k in STATE_ORDER
            if k in entry
        }
    return out


def for_server(
    groups: list[dict[str, Any]],
    state_dict: Mapping[str, Any],
    name_of: Callable[[torch.Tensor], str],
) -> tuple[list[dict[str, Any]], dict[str, dict[str, torch.Tensor]], dict[Any, Any], list[Any]]:
    """A torch.optim.Adam state dict checked against our `groups` as torch checks it (same
    messages): (its groups, filled in as torch.optim.Adam.__setstate__ fills an older one; the
    Adam state by parameter name; the state not keyed by a parameter index, which stays local;
    the groups for the server, our parameters' names with the saved options)."""
    saved = deepcopy(state_dict["param_groups"])
    if len(groups) != len(saved):
        raise ValueError("loaded state dict has a different number of parameter groups")
    if any(len(g["params"]) != len(s["params"]) for g, s in zip(groups, saved)):
        raise ValueError(
            "loaded state dict contains a parameter group that doesn't match the size of optimizer's group"
        )
    id_to_name = {}
    for g, s in zip(groups, saved):
        for p, i in zip(g["params"], s["params"]):
            id_to_name[i] = name_of(p)
    state: dict[str, dict[str, torch.Tensor]] = {}
    local: dict[Any, Any] = {}
    for i, entry in state_dict["state"].items():
        if i not in id_to_name:
            local[i] = entry  # torch keeps such entries as they are
            continue
        state[id_to_name[i]] = {
            k: v if isinstance(v, torch.Tensor) else torch.tensor(float(v))
            for k, v in entry.items()
        }
    for s in saved:  # what torch.optim.Adam.__setstate__ fills into an older state dict
        for k in _SETSTATE_DEFAULTS:
            s.setdefault(k, ADAM_DEFAULTS[k])
    server_groups = []
    for g, s in zip(groups, saved):
        opts = {k: s[k] for k in SYNCED_KEYS if k in s}
        server_groups.append({**opts, "params": [name_of(p) for p in g["params"]]})
    return saved, state, local, server_groups
