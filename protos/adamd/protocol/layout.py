"""Where each parameter of a sharded model lives: a pure, deterministic placement.

Parameters are placed by bytes, largest first, each on the shard holding the fewest bytes so
far (ties: the lowest shard). A tensor over `slice_bytes` is split along dim 0 into row ranges on
several shards (at most one range per shard, ascending with the shard index), so one huge
embedding does not pin one server. Adam is elementwise, so a slice steps exactly as the same rows
of the whole tensor would. The layout (servers, slices, groups) has an id; every shard records
it at creation, and a client that would place the model differently is refused.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

DEFAULT_SLICE_BYTES = 4 << 20
LAYOUT_FORMAT = 1
# Slice boundaries fall on multiples of this many elements, so a slice's vectorised fused-Adam
# loop covers the same elements as the whole tensor's does: torch's CPU kernel computes the
# leftover elements after its last full vector with scalar code, which can round differently
# (measured: exp_avg_sq differs in the last bit when a slice starts mid-vector).
_ALIGN_ELEMENTS = 64


@dataclass(frozen=True)
class Part:
    """One shard's piece of a parameter: rows start..stop along dim 0 (the whole tensor when
    `whole`)."""

    shard: int
    start: int
    stop: int
    whole: bool


@dataclass(frozen=True)
class Placement:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    parts: tuple[Part, ...]

    @property
    def sliced(self) -> bool:
        return not self.parts[0].whole

    def piece(self, tensor: torch.Tensor, part: Part) -> torch.Tensor:
        """`tensor`'s rows for `part` (a view; the tensor itself when whole)."""
        return tensor if part.whole else tensor.narrow(0, part.start, part.stop - part.start)


def _nbytes(shape: Sequence[int], dtype: torch.dtype) -> int:
    return math.prod(shape) * torch.empty(0, dtype=dtype).element_size()


def _row_align(row_elements: int) -> int:
    """Rows per aligned unit: the fewest rows holding a multiple of _ALIGN_ELEMENTS elements."""
    if row_elements <= 0:
        return 1
    return _ALIGN_ELEMENTS // math.gcd(_ALIGN_ELEMENTS, row_elements)


def _row_bounds(rows: int, n: int, row_elements: int) -> list[int]:
    """n+1 row boundaries splitting `rows` into n near-equal non-empty aligned ranges
    (n <= rows // _row_align(row_elements))."""
    align = _row_align(row_elements)
    units = rows // align
    bounds = [(units * i // n) * align for i in range(n)]
    return [*bounds, rows]


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _dtype_of(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"layout names unknown dtype {name!r}")
    return dtype


class Layout:
    """The placement of one model's parameters over `servers` (their order is the shards')."""

    def __init__(
        self,
        servers: Sequence[str],
        slice_bytes: int,
        params: Sequence[Placement],
        groups: Sequence[Sequence[str]],
    ):
        self.servers = tuple(servers)
        self.slice_bytes = int(slice_bytes)
        self.params = {p.name: p for p in params}
        self.groups = [list(g) for g in groups]
        self.id = hashlib.sha256(self._canonical().encode()).hexdigest()[:16]

    # --- planning -------------------------------------------------------------------------------

    @classmethod
    def plan(
        cls,
        servers: Sequence[str],
        params: Mapping[str, tuple[tuple[int, ...], torch.dtype]],
        groups: Sequence[Sequence[str]],
        slice_bytes: int = DEFAULT_SLICE_BYTES,
    ) -> Layout:
        """Place `params` (name -> (shape, dtype), in the model's order) over `servers`."""
        if slice_bytes < 1:
            raise ValueError(f"slice_bytes must be at least 1, got {slice_bytes}")
        loads = [0] * len(servers)
        placed = _place(params, loads, slice_bytes)
        empty = [servers[k] for k, load in enumerate(loads) if load == 0 and not _holds(placed, k)]
        if empty:
            raise ValueError(
                f"{len(servers)} servers, but this model's {len(params)} parameters leave"
                f" {empty} without any: every shard needs at least one tensor or slice (use fewer"
                " servers, or a smaller slice_bytes so large tensors are split)"
            )
        return cls(servers, slice_bytes, [placed[n] for n in params], groups)

    def with_group(
        self, params: Mapping[str, tuple[tuple[int, ...], torch.dtype]], listed: Sequence[str]
    ) -> Layout:
        """This layout plus a new param group's parameters, placed over the current loads."""
        loads = self.loads()
        placed = _place(params, loads, self.slice_bytes)
        return Layout(
            self.servers,
            self.slice_bytes,
            [*self.params.values(), *(placed[n] for n in params)],
            [*self.groups, list(listed)],
        )

    # --- reading --------------------------------------------------------------------------------

    def loads(self) -> list[int]:
        """Parameter bytes per shard."""
        out = [0] * len(self.servers)
        for p in self.params.values():
            row = _nbytes(p.shape[1:], p.dtype) if p.shape else 0
            for part in p.parts:
                out[part.shard] += (
                    _nbytes(p.shape, p.dtype) if part.whole else row * (part.stop - part.start)
                )
        return out

    def names_on(self, shard: int) -> list[str]:
        return [n for n, p in self.params.items() if any(q.shard == shard for q in p.parts)]

    def part(self, name: str, shard: int) -> Part | None:
        return next((q for q in self.params[name].parts if q.shard == shard), None)

    def shard_params(
        self, shard: int, tensors: Mapping[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """The pieces of `tensors` (any subset of the parameters) that live on `shard`."""
        out = {}
        for name, t in tensors.items():
            place = self.params.get(name)
            if place is None:
                raise KeyError(name)
            part = self.part(name, shard)
            if part is not None:
                out[name] = place.piece(t, part)
        return out

    def shard_groups(self, shard: int) -> list[list[str]]:
        on = set(self.names_on(shard))
        return [[n for n in g if n in on] for g in self.groups]

    def whole_groups(self, groups: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
        """A shard's param groups (their options) with each group's parameters as the whole
        model has them."""
        return [
            {**{k: v for k, v in g.items() if k != "params"}, "params": list(names)}
            for g, names in zip(groups, self.groups)
        ]

    # --- the record -----------------------------------------------------------------------------

    def _body(self) -> dict[str, Any]:
        return {
            "format": LAYOUT_FORMAT,
            "servers": list(self.servers),
            "slice_bytes": self.slice_bytes,
            "params": [
                {
                    "name": p.name,
                    "shape": list(p.shape),
                    "dtype": _dtype_name(p.dtype),
                    "parts": [[q.shard, q.start, q.stop] for q in p.parts] if p.sliced else None,
                    "shard": p.parts[0].shard if not p.sliced else None,
                }
                for p in self.params.values()
            ],
            "groups": self.groups,
        }

    def _canonical(self) -> str:
        return json.dumps(self._body(), sort_keys=True, separators=(",", ":"))

    def record(self, shard: int) -> str:
        """The JSON shard `shard` keeps: the layout, its id and which shard it is."""
        return json.dumps({"id": self.id, "shard": shard, **self._body()}, sort_keys=True)

    @classmethod
    def from_record(cls, text: str) -> tuple[Layout, int]:
        """(layout, the recording shard's index) from `record`'s JSON."""
        try:
            doc = json.loads(text)
            if doc.get("format") != LAYOUT_FORMAT:
                raise ValueError(f"layout format {doc.get('format')!r} is not {LAYOUT_FORMAT}")
            params = []
            for p in doc["params"]:
                shape = tuple(int(d) for d in p["shape"])
                if p["parts"] is None:
                    parts: tuple[Part, ...] = (Part(int(p["shard"]), 0, 0, True),)
                else:
                    parts = tuple(Part(int(k), int(a), int(b), False) for k, a, b in p["parts"])
                params.append(Placement(p["name"], shape, _dtype_of(p["dtype"]), parts))
            layout = cls(doc["servers"], doc["slice_bytes"], params, doc["groups"])
            shard = int(doc["shard"])
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"unreadable layout record: {exc}") from exc
        if layout.id != doc.get("id"):
            raise ValueError(f"layout record's id {doc.get('id')!r} does not match its content")
        return layout, shard


def _holds(placed: Mapping[str, Placement], shard: int) -> bool:
    return any(q.shard == shard for p in placed.values() for q in p.parts)


def _place(
    params: Mapping[str, tuple[tuple[int, ...], torch.dtype]], loads: list[int], slice_bytes: int
) -> dict[str, Placement]:
    """Largest first onto the least-loaded shards; `loads` is updated in place."""
    sizes = {n: _nbytes(shape, dtype) for n, (shape, dtype) in params.items()}
    order = sorted(params, key=lambda n: -sizes[n])  # stable: ties keep the model's order
    placed: dict[str, Placement] = {}
    n_shards = len(loads)
    for name in order:
        shape, dtype = params[name]
        size = sizes[name]
        rows = shape[0] if shape else 0
        aligned_units = rows // _row_align(math.prod(shape[1:])) if shape else 0
        pieces = min(n_shards, math.ceil(size / slice_bytes), aligned_units)
        if pieces < 2:
            k = min(range(n_shards), key=lambda s: (loads[s], s))
            loads[k] += size
            placed[name] = Placement(name, shape, dtype, (Part(k, 0, 0, True),))
            continue
        chosen = sorted(sorted(range(n_shards), key=lambda s: (loads[s], s))[:pieces])
        bounds = _row_bounds(rows, pieces, math.prod(shape[1:]))
        row_bytes = size // rows
        parts = []
        for i, k in enumerate(chosen):
            parts.append(Part(k, bounds[i], bounds[i + 1], False))
            loads[k] += row_bytes * (bounds[i + 1] - bounds[i])
        placed[name] = Placement(name, shape, dtype, tuple(parts))
    return placed


def join_state(
    place: Placement, parts: Sequence[Mapping[str, torch.Tensor]]
) -> dict[str, torch.Tensor]:
    """One parameter's Adam state from its shards' entries, in shard order: a sliced parameter's
    moments joined along dim 0 (its step is the same on every slice), a whole one's as it is."""
    return {
        key: parts[0][key]
        if key == "step" or not place.sliced
        else torch.cat([e[key] for e in parts])
        for key in parts[0]
    }
