"""The registry of hosted models: create (in two phases, so initial values stream straight into
place), look up, list and delete. Placement (CPU or CUDA) is decided here once for the daemon."""

from __future__ import annotations

import json
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from adamd.protocol import ProtocolError
from adamd.protocol.frames import TensorSink, trainable
from adamd.server.core.limits import Limits
from adamd.server.core.membership import DEFAULT_LEASE_S
from adamd.server.core.model import ASYNC, SYNC, HostedModel
from adamd.server.core.precision import Precision, check_master
from adamd.server.core.staging import BOUNCE_BYTES, copy_in_chunks, host_bytes
from adamd.server.errors import AlreadyExists, InvalidArgument, NotFound

_NAME_CHARS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-")


def resolve_device(spec: str) -> torch.device:
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(spec)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {spec!r} asked for, but CUDA is not available")
    return device


def check_model_name(name: str) -> None:
    if not name or len(name) > 128 or not set(name) <= _NAME_CHARS or name.startswith("."):
        raise InvalidArgument(
            f"model name {name!r} must be 1-128 characters of letters, digits, '.', '_' or '-',"
            " not starting with '.'"
        )


@dataclass
class ModelSpec:
    """What a client asks for when creating a model (initial values arrive separately)."""

    name: str
    params: Sequence[tuple[str, tuple[int, ...], torch.dtype]]
    groups: Sequence[Mapping[str, Any]]  # options plus "params": [names]
    world_size: int = 1
    mode: str = SYNC
    max_staleness: int = 0  # 0: the daemon's default
    round_timeout_s: float = 0.0  # 0: the daemon's default
    elastic: bool = False  # sync over whichever workers are registered (world_size ignored)
    lease_s: float = 0.0  # elastic: registration lasts this long unrenewed (0: the default)
    exist_ok: bool = False
    layout: str = ""  # sharded: the layout record this shard keeps (the client's JSON)
    wire_dtypes: Sequence[torch.dtype] = field(default_factory=list)
    # master weights (precision.py): narrower float params are held, with their state, in it
    master_dtype: torch.dtype | None = None

    @property
    def precision(self) -> Precision:
        return Precision.of(self.params, self.master_dtype)


@dataclass
class PendingModel:
    spec: ModelSpec
    tensors: dict[str, torch.Tensor]
    sink: TensorSink
    existing: HostedModel | None = None  # exist_ok and already there: the upload is ignored


class ModelRegistry:
    def __init__(
        self,
        device: torch.device,
        *,
        max_staleness: int = 16,
        round_timeout_s: float = 60.0,
        limits: Limits | None = None,
    ):
        self.device = device
        self.limits = limits or Limits()
        self.default_max_staleness = max_staleness
        self.default_round_timeout_s = round_timeout_s
        self._models: dict[str, HostedModel] = {}
        self._lock = threading.Lock()
        self.on_create: list[Any] = []  # callbacks(model) after a model is added
        self.on_delete: list[Any] = []  # callbacks(name) after a model is removed
        self._bounce: torch.Tensor | None = None  # pinned, stages initial values to the device
        self._bounce_lock = threading.Lock()

    def get(self, name: str) -> HostedModel:
        model = self._models.get(name)
        if model is None:
            raise NotFound(f"no model named {name!r}")
        return model

    def names(self) -> list[str]:
        return sorted(self._models)

    def models(self) -> list[HostedModel]:
        return [self._models[n] for n in self.names()]

    def begin_create(self, spec: ModelSpec) -> PendingModel:
        """Validate a create request and allocate its parameters. Nothing is registered yet."""
        check_model_name(spec.name)
        check_master(spec.master_dtype)
        # Sizes first, as held (master weights are wider than the worker's dtype): nothing below
        # allocates more than the limits allow.
        self.limits.check_specs(f"model {spec.name!r}", spec.precision.held_specs(spec.params))
        if not spec.params:
            raise InvalidArgument("a model needs at least one parameter")
        names = [n for n, _, _ in spec.params]
        if len(set(names)) != len(names):
            raise InvalidArgument("parameter names must be unique")
        for n, shape, dtype in spec.params:
            if not n:
                raise InvalidArgument("parameter names must not be empty")
            if not trainable(dtype):
                raise InvalidArgument(
                    f"parameter {n!r} has dtype {dtype}; Adam needs floating point or complex"
                )
            if any(d < 0 for d in shape):
                raise InvalidArgument(f"parameter {n!r} has a negative dimension {list(shape)}")
        if spec.mode not in (SYNC, ASYNC):
            raise InvalidArgument(f"mode must be 'sync' or 'async', got {spec.mode!r}")
        if spec.world_size < 1 and not spec.elastic:
            raise InvalidArgument(f"world_size must be at least 1, got {spec.world_size}")
        existing = self._models.get(spec.name)
        if existing is not None:
            self._check_same(existing, spec)
            if not spec.exist_ok:
                raise AlreadyExists(
                    f"model {spec.name!r} exists already (pass exist_ok to join it)"
                )
            return PendingModel(spec, {}, TensorSink([], []), existing=existing)
        # Validate groups and options before allocating anything large.
        probe = HostedModel(
            spec.name,
            {n: torch.zeros(0, device=self.device) for n, _, _ in spec.params},
            spec.groups,
            device=self.device,
            world_size=spec.world_size,
            mode=spec.mode,
            elastic=spec.elastic,
        )
        del probe
        # Values land in ordinary host memory first and move to the device at commit through a
        # small pinned bounce buffer: N ranks racing to create one model pin nothing per rank.
        # Master weights: held wider than declared, the values widened as they arrive.
        held = spec.precision.held_specs(spec.params)
        tensors = {n: torch.empty(shape, dtype=dtype) for n, shape, dtype in held}
        wire = list(spec.wire_dtypes) or [d for _, _, d in spec.params]
        return PendingModel(spec, tensors, TensorSink(list(tensors.values()), wire))

    def commit(self, pending: PendingModel) -> tuple[HostedModel, bool]:
        """Register a fully received model. Returns (model, created)."""
        if pending.existing is not None:
            return pending.existing, False
        try:
            pending.sink.check_complete()
        except ProtocolError as exc:
            raise InvalidArgument(str(exc)) from exc
        spec = pending.spec
        params = self._to_device(pending.tensors)
        model = HostedModel(
            spec.name,
            params,
            spec.groups,
            device=self.device,
            world_size=spec.world_size,
            mode=spec.mode,
            max_staleness=spec.max_staleness or self.default_max_staleness,
            round_timeout_s=spec.round_timeout_s or self.default_round_timeout_s,
            elastic=spec.elastic,
            lease_s=spec.lease_s or DEFAULT_LEASE_S,
            precision=spec.precision,
        )
        model.layout = spec.layout
        with self._lock:
            existing = self._models.get(spec.name)
            if existing is not None:  # another client created it meanwhile
                self._check_same(existing, spec)
                if not spec.exist_ok:
                    raise AlreadyExists(f"model {spec.name!r} exists already")
                return existing, False
            self._models[spec.name] = model
        for cb in list(self.on_create):
            cb(model)
        return model, True

    def _to_device(self, tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if self.device.type == "cpu":
            return dict(tensors)
        out = {}
        with self._bounce_lock:
            if self._bounce is None:
                self._bounce = host_bytes(BOUNCE_BYTES, pin=self.device.type == "cuda")
            for n, t in tensors.items():
                out[n] = torch.empty(t.shape, dtype=t.dtype, device=self.device)
                copy_in_chunks(t, out[n], self._bounce)
        return out

    def add(self, model: HostedModel) -> None:
        """Register a model built elsewhere (a restored snapshot)."""
        with self._lock:
            if model.name in self._models:
                raise AlreadyExists(f"model {model.name!r} exists already")
            self._models[model.name] = model
        for cb in list(self.on_create):
            cb(model)

    def delete(self, name: str) -> None:
        with self._lock:
            model = self._models.pop(name, None)
            if model is None:
                raise NotFound(f"no model named {name!r}")
        model.close()  # a push still in flight fails; on CUDA its device work finishes first
        for cb in list(self.on_delete):
            cb(name)

    @staticmethod
    def _check_same(existing: HostedModel, spec: ModelSpec) -> None:
        """A client joining an existing model must agree on its shard layout (none, for a model
        on one server) and every parameter it names."""
        if existing.layout != spec.layout:
            raise AlreadyExists(
                f"model {spec.name!r} exists with another shard layout: {_layout_id(existing.layout)}"
                f" there, {_layout_id(spec.layout)} here (another server list, server order,"
                " slice_bytes or parameters); use the servers it was created with, or delete it"
            )
        if existing.precision.master != spec.master_dtype:
            raise AlreadyExists(
                f"model {spec.name!r} exists with master_dtype {existing.precision.master},"
                f" asked for {spec.master_dtype}; delete it or use another name"
            )
        for n, shape, dtype in spec.params:
            p = existing.params.get(n)
            worker = None if p is None else existing.precision.worker_dtype(n, p.dtype)
            if p is None or tuple(p.shape) != tuple(shape) or worker != dtype:
                have = None if p is None else (list(p.shape), str(worker))
                raise AlreadyExists(
                    f"model {spec.name!r} exists with other parameters: {n!r} is {have} there,"
                    f" {[list(shape), str(dtype)]} here; delete it or use another name"
                )


def _layout_id(record: str) -> str:
    """A layout record's id for messages ('unsharded' for none)."""
    if not record:
        return "unsharded"
    try:
        return f"layout {json.loads(record).get('id')!r}"
    except (ValueError, AttributeError):
        return "an unreadable layout"
