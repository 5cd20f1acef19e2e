"""`ModelClient`: the calls `Client` (one server) and `ShardedClient` (one model over several
servers) both offer, with the same meaning; what RemoteAdam is written against."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import torch

from adamd.client._types import ModelInfo, PullResult, PushResult
from adamd.v1 import adamd_pb2 as pb


class ModelClient(Protocol):
    sharded: bool
    address: str
    timeout: float | None
    wire_dtype: torch.dtype | None

    def close(self) -> None: ...

    def create_model(
        self,
        model: str,
        params: Mapping[str, torch.Tensor],
        *,
        param_groups: Sequence[Mapping[str, Any]] | None = None,
        world_size: int | str = 1,
        mode: str = "sync",
        max_staleness: int = 0,
        round_timeout_s: float = 0.0,
        lease_s: float = 0.0,
        exist_ok: bool = False,
        layout: str = "",
        master_dtype: torch.dtype | None = None,
        **adam_kwargs: Any,
    ) -> ModelInfo: ...

    def describe(self, model: str) -> ModelInfo: ...

    def list_models(self) -> list[ModelInfo]: ...

    def join(self, model: str, rank: int | None = None) -> int: ...

    def leave(self, model: str, rank: int) -> bool: ...

    def delete_model(self, model: str) -> None: ...

    def snapshot(self, model: str) -> pb.SnapshotInfo: ...

    def set_hyperparams(self, model: str, group: int = 0, **options: Any) -> ModelInfo: ...

    def set_group_options(
        self, model: str, updates: Sequence[tuple[int, Mapping[str, Any]]]
    ) -> ModelInfo: ...

    def add_param_group(
        self,
        model: str,
        params: Mapping[str, torch.Tensor],
        *,
        listed: Sequence[str] | None = None,
        layout: str = "",
        **options: Any,
    ) -> ModelInfo: ...

    def push_grad(
        self,
        model: str,
        grads: Mapping[str, torch.Tensor],
        *,
        version: int | None = None,
        rank: int = 0,
        push_id: str | None = None,
        loss: float | None = None,
        scalars: Mapping[str, float] | None = None,
        found_inf: bool = False,
        hyper_updates: Sequence[tuple[int, Mapping[str, Any]]] = (),
        wire_dtype: torch.dtype | None = None,
        grad_compression: str | None = None,
    ) -> PushResult: ...

    def step(
        self,
        model: str,
        grads: Mapping[str, torch.Tensor],
        out: Mapping[str, torch.Tensor],
        *,
        version: int | None = None,
        rank: int = 0,
        push_id: str | None = None,
        loss: float | None = None,
        scalars: Mapping[str, float] | None = None,
        found_inf: bool = False,
        hyper_updates: Sequence[tuple[int, Mapping[str, Any]]] = (),
        wire_dtype: torch.dtype | None = None,
        grad_compression: str | None = None,
    ) -> tuple[PushResult, PullResult]: ...

    def pull_params(
        self, model: str, names: Sequence[str] | None = None, **kwargs: Any
    ) -> dict[str, torch.Tensor]: ...

    def pull(
        self,
        model: str,
        names: Sequence[str] | None = None,
        *,
        out: Mapping[str, torch.Tensor] | None = None,
        if_newer_than: int | None = None,
        wait_for_version: int | None = None,
        wait_timeout: float = 60.0,
        wire_dtype: torch.dtype | None = None,
    ) -> PullResult: ...

    def get_state(self, model: str) -> dict[str, Any]: ...

    def load_state(
        self,
        model: str,
        state: Mapping[str, Mapping[str, torch.Tensor]],
        param_groups: Sequence[Mapping[str, Any]] | None = None,
    ) -> ModelInfo: ...
