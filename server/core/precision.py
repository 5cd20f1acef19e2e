"""Master weights: which dtype the server holds each parameter in, and which the worker has.

A model created with `master_dtype` (float32) holds every real floating-point parameter that is
narrower than it (bf16, fp16 on the worker) in the master dtype, and its Adam state with it, as
ZeRO-Offload and torch.amp's fp32-master recipe do. The worker's dtype stays the parameter's
*worker dtype*: initial values and gradients arrive in it and are widened (exactly) into the held
tensors, and a pull without a wire dtype of its own travels in it, rounded to nearest even from
the master (Tensor.to's rounding). Parameters already as wide (fp32 layer norms beside bf16
weights, fp64) and complex ones are held as they come.

Without `master_dtype` a model holds what the worker sent (worker dtype == held dtype) and nothing
here changes anything. The registry asks `held_specs` what to allocate, the data plane asks
`pull_dtypes` what a pull sends, snapshots keep `to_record` beside the parameters.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from adamd.protocol.frames import wire_dtype_of
from adamd.server.errors import InvalidArgument

Spec = tuple[str, tuple[int, ...], torch.dtype]

MASTER_DTYPES = (torch.float32, torch.float64)


def check_master(dtype: torch.dtype | None) -> None:
    if dtype is not None and dtype not in MASTER_DTYPES:
        raise InvalidArgument(f"master_dtype must be torch.float32 or torch.float64, got {dtype}")


def held_dtype(worker: torch.dtype, master: torch.dtype | None) -> torch.dtype:
    """The dtype the server holds a parameter of `worker` dtype in."""
    if master is None or not worker.is_floating_point or worker.itemsize >= master.itemsize:
        return worker
    return master


@dataclass(frozen=True)
class Precision:
    """A model's master dtype (None: none) and each widened parameter's worker dtype."""

    master: torch.dtype | None = None
    # name -> the worker's dtype, for the parameters held wider than it (the others: as held)
    narrow: Mapping[str, torch.dtype] = field(default_factory=dict)

    @classmethod
    def of(cls, specs: Sequence[Spec], master: torch.dtype | None) -> Precision:
        check_master(master)
        narrow = {n: d for n, _, d in specs if held_dtype(d, master) != d}
        return cls(master, narrow)

    def with_params(self, specs: Sequence[Spec]) -> Precision:
        """This precision with a new param group's parameters (a group added later)."""
        return Precision(self.master, {**self.narrow, **Precision.of(specs, self.master).narrow})

    def hold(
        self, tensors: Mapping[str, torch.Tensor]
    ) -> tuple[dict[str, torch.Tensor], Precision]:
        """A new param group's values as held (widened where the master is wider), and this
        precision with them."""
        specs = [(n, tuple(t.shape), t.dtype) for n, t in tensors.items()]
        held = {n: t.to(held_dtype(t.dtype, self.master)) for n, t in tensors.items()}
        return held, self.with_params(specs)

    def held_specs(self, specs: Sequence[Spec]) -> list[Spec]:
        """What to allocate for parameters the worker declared as `specs`."""
        return [(n, shape, held_dtype(d, self.master)) for n, shape, d in specs]

    def worker_dtype(self, name: str, held: torch.dtype) -> torch.dtype:
        return self.narrow.get(name, held)

    def pull_dtypes(
        self, params: Mapping[str, torch.Tensor], names: Sequence[str], asked: torch.dtype | None
    ) -> list[torch.dtype]:
        """The dtype each pulled parameter travels as: the one the pull asks for (narrowing real
        floats, as ever), else the worker's."""
        if asked is not None:
            return [wire_dtype_of(params[n].dtype, asked) for n in names]
        return [self.worker_dtype(n, params[n].dtype) for n in names]

    # --- snapshots ------------------------------------------------------------------------------

    def to_record(self) -> dict[str, Any]:
        if self.master is None:
            return {}
        return {
            "master_dtype": _name(self.master),
            "worker_dtypes": {n: _name(d) for n, d in self.narrow.items()},
        }

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> Precision:
        """A snapshot manifest's record (older snapshots have none: no master weights)."""
        master = record.get("master_dtype")
        if not master:
            return cls()
        return cls(
            _dtype(master), {n: _dtype(d) for n, d in record.get("worker_dtypes", {}).items()}
        )


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown dtype {name!r}")
    return dtype
