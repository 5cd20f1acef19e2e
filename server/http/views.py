"""JSON views of the daemon's core for the HTTP side and `adamd inspect`: plain dicts of Python
numbers and strings (tensors and tuples turned into floats and lists), read under the model lock
so one answer never mixes two versions."""

from __future__ import annotations

import json
import math
import time
from typing import Any

import torch

from adamd.server.core import options as adam_options
from adamd.server.core import state_io
from adamd.server.core.model import HostedModel
from adamd.server.core.stats import ModelStats


def jsonable(v: Any) -> Any:
    """A hyperparameter as JSON: tensor -> float, tuple -> list, non-finite -> None."""
    if isinstance(v, torch.Tensor):
        v = v.detach().reshape(-1)[0].item() if v.numel() else None
    if isinstance(v, (tuple, list)):
        return [jsonable(x) for x in v]
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    return str(v)


def implementation(group: dict[str, Any]) -> str:
    if group.get("fused"):
        return "fused"
    if group.get("foreach"):
        return "foreach"
    return "for-loop"


def shard_view(record: str) -> dict[str, Any] | None:
    """A sharded model's layout as this server recorded it (None: the model is whole here)."""
    if not record:
        return None
    try:
        doc = json.loads(record)
        index = int(doc["shard"])
        here = [
            p["name"]
            for p in doc["params"]
            if p["shard"] == index or any(part[0] == index for part in p["parts"] or ())
        ]
        return {
            "index": index,
            "of": len(doc["servers"]),
            "layout_id": doc["id"],
            "servers": doc["servers"],
            "slice_bytes": doc["slice_bytes"],
            "params_here": here,
            "sliced": {p["name"]: p["parts"] for p in doc["params"] if p["parts"] is not None},
        }
    except (ValueError, KeyError, TypeError):
        return {"error": "unreadable layout record"}


def model_summary(model: HostedModel, stats: ModelStats, detail: bool = False) -> dict[str, Any]:
    """What /v1/models lists per model; `detail` adds param groups and workers."""
    memory = model.memory_bytes()
    memory["total"] = sum(memory.values())
    now = time.time()
    with model.locked():
        version = model.version
        params = dict(model.params)
        members = model.rounds.members
        if members is not None:
            members.prune()
        out: dict[str, Any] = {
            "name": model.name,
            "mode": model.mode,
            # Elastic: the workers registered now.
            "world_size": model.world_size if members is None else len(members.members),
            "elastic": members is not None,
            "version": version,
            "step": version,
            "skipped_steps": model.skipped_steps,
            "device": str(model.device),
            "dtypes": sorted({str(p.dtype).removeprefix("torch.") for p in params.values()}),
            # master weights: the dtype the params and Adam state are held in (None: as sent)
            "master_dtype": model.precision.to_record().get("master_dtype"),
            "num_params": len(params),
            "num_elements": sum(p.numel() for p in params.values()),
            "memory": memory,
            "created_at": model.created_at,
            "last_step_at": model.last_step_at,
            "step_rate": stats.step_rate(),
            "last_loss": stats.last_loss(),
            "lr": [jsonable(g.get("lr")) for g in model.requested],
            "workers_heard": len(model.last_heard),
            "shard": shard_view(model.layout),
        }
        if detail:
            out["max_staleness"] = model.max_staleness
            out["round_timeout_s"] = model.round_timeout_s
            if members is not None:
                out["lease_s"] = members.lease_s
                out["members"] = members.view()  # live membership: rank, last seen, lease expiry
            out["param_groups"] = [
                {
                    "index": i,
                    "params": list(group["param_names"]),
                    "hyperparameters": {k: jsonable(v) for k, v in requested.items()},
                    "implementation": implementation(group),
                }
                for i, (group, requested) in enumerate(
                    zip(model.optimizer.param_groups, model.requested)
                )
            ]
            out["workers"] = [
                {
                    "rank": rank,
                    "last_push_age_s": max(0.0, now - heard),
                    "pushed_from_version": pushed_from,
                    "lag": max(0, version - pushed_from - 1),
                }
                for rank, (heard, pushed_from) in sorted(model.last_heard.items())
            ]
    return out


def snapshot_payload(model: HostedModel) -> dict[str, Any]:
    """The layout `adamd snapshot export` writes and `import` reads: {"model": params by name,
    "optimizer": torch.optim.Adam's state_dict with param_names}, plus "adamd" (where it came
    from). Copied to the CPU under the model lock; only tensors, dicts, lists, tuples and plain
    values, so torch.load(weights_only=True) reads it.

    The param groups are the options the client asked for, made effective for a CPU (as the
    torch-format export makes them): not the live groups, which on a GPU server hold capturable,
    fused and a float32 device tensor lr that a CPU server or a local CPU Adam would refuse."""
    cpu = torch.device("cpu")
    with model.locked(), model.on_device():
        names = model.group_names()
        options = [
            adam_options.effective(dict(requested), cpu, [model.params[n] for n in group])
            for requested, group in zip(model.requested, names)
        ]
        state = {
            i: {
                k: model.host_copy(v) if isinstance(v, torch.Tensor) else v
                for k, v in entry.items()
            }
            for i, entry in state_io.torch_state_dict(model.optimizer)["state"].items()
        }
        return {
            "model": {n: model.host_copy(p) for n, p in model.params.items()},
            "optimizer": {
                "state": state,
                "param_groups": state_io.indexed_groups(options, names),
            },
            "adamd": {
                "model": model.name,
                "version": model.version,
                "mode": model.mode,
                "world_size": model.world_size,
            },
        }
