"""Plain result types the client returns (frozen dataclasses, one comment per field)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass(frozen=True)
class ModelInfo:
    name: str
    version: int  # +1 per applied step
    mode: str  # "sync" or "async"
    world_size: int  # sync: pushes gathered per step (0: elastic)
    device: str  # where the server holds parameters and state
    params: dict[str, tuple[tuple[int, ...], torch.dtype]]  # name -> (shape, dtype), in order
    param_groups: list[dict[str, Any]]  # options as requested, with "params": [names]
    max_staleness: int  # async: oldest accepted gradient, in versions
    round_timeout_s: float  # sync: how long a round waits for missing workers
    created: bool = False  # create_model: False when the model existed and was joined
    skipped_steps: int = 0  # rounds skipped for non-finite gradients (found_inf)
    elastic: bool = False  # sync over whichever workers are registered (world_size is then 0)
    lease_s: float = 0.0  # elastic: how long a worker stays registered without pushing
    layout: str = ""  # sharded: the layout record (JSON; "" for a model on one server)
    shard_versions: tuple[int, ...] = ()  # sharded: each shard's version, in shard order
    master_dtype: torch.dtype | None = None  # master weights: params and Adam state held in it
    # master weights: each parameter's dtype on the workers (what pushes and pulls carry)
    worker_dtypes: dict[str, torch.dtype] = field(default_factory=dict)


@dataclass(frozen=True)
class PushResult:
    version: int  # the model's version after this push took effect
    applied: bool  # a step ran (False: skipped, found_inf)
    found_inf: bool = False  # some worker's gradient was not finite; the round was skipped
    contributors: int = 1  # sync: pushes averaged into this step
    duplicate: bool = False  # the server had this push id already; nothing was applied twice
    partial: bool = False  # sync: the round timed out and stepped without some workers


@dataclass(frozen=True)
class PullResult:
    version: int  # the version these parameters are at
    params: dict[str, torch.Tensor] = field(default_factory=dict)  # empty when not_modified
    not_modified: bool = False  # the caller's version was current; nothing was sent
