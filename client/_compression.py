"""Gradient compression for pushes (`grad_compression=`): blockwise int8 (adamd.protocol.quant)
with error feedback.

"int8": each parameter's quantization error is kept here, on the worker, and added to that
parameter's next gradient before it is quantized, so what the rounding drops in one step is
sent in a later one (the sum of what the server received tracks the sum of the true gradients
to within one step's error). "int8-noef": the same encoding without the residual (every step's
error is lost; kept to show what the feedback buys, see BENCHMARKS.md).

Exactly-once: a push is quantized once, and its retries resend the same payload; the residual
it leaves moves on only once the server acknowledged the push (`Encoded.commit`). A push that
fails for good leaves the residual as it was. Residuals are kept per (model, rank, parameter):
in a sync round each rank carries its own.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from adamd.client._exceptions import NonFiniteGradient
from adamd.protocol import quant
from adamd.v1 import adamd_pb2 as pb

MODES = ("int8", "int8-noef")


def check_mode(mode: str | None) -> None:
    if mode is not None and mode not in MODES:
        raise ValueError(f"grad_compression must be None, 'int8' or 'int8-noef', got {mode!r}")


def check_finite(grads: Mapping[str, torch.Tensor]) -> None:
    """Refuse non-finite gradients before anything is quantized (an inf would make its block's
    scale inf and every value of the block nan), as the server refuses them."""
    for name, g in grads.items():
        if not bool(torch.isfinite(g).all()):
            raise NonFiniteGradient(
                f"gradient {name!r} holds inf or nan; the push was rejected and nothing changed"
                " (AMP: unscale first, or send found_inf so the step is skipped)"
            )


@dataclass
class Encoded:
    """One push's encoded gradients: `payloads` (uint8 CPU tensors, the wire bytes, resent as
    they are on a retry) and their `specs`; `commit()` moves the residuals on (after the ack)."""

    specs: list[pb.TensorSpec]
    payloads: list[torch.Tensor]
    dequantized: dict[str, torch.Tensor]  # what the server steps with (float32, flat)
    _owner: Compressor | None = None
    _key: tuple[str, int] = ("", 0)
    _next: dict[str, torch.Tensor] = field(default_factory=dict)

    def commit(self) -> None:
        if self._owner is not None:
            self._owner.residuals.setdefault(self._key, {}).update(self._next)
            self._next = {}


class Compressor:
    """Per-parameter error-feedback residuals of one client, keyed by (model, rank)."""

    def __init__(self, mode: str, block: int = quant.DEFAULT_BLOCK):
        check_mode(mode)
        quant.check_block(block)
        self.mode = mode
        self.block = block
        self.feedback = mode == "int8"
        self.residuals: dict[tuple[str, int], dict[str, torch.Tensor]] = {}

    def residual(self, model: str, rank: int, name: str) -> torch.Tensor | None:
        return self.residuals.get((model, rank), {}).get(name)

    def reset(self, model: str | None = None) -> None:
        """Drop the residuals (of one model, or all)."""
        for key in [k for k in self.residuals if model is None or k[0] == model]:
            del self.residuals[key]

    def encode(self, model: str, rank: int, grads: Mapping[str, torch.Tensor]) -> Encoded:
        """Quantize `grads` (plus their residuals, with feedback); nothing changes here until
        the returned push is committed."""
        check_finite(grads)
        kept = self.residuals.get((model, rank), {})
        specs, payloads, deq, nxt = [], [], {}, {}
        for name, g in grads.items():
            if not g.dtype.is_floating_point:
                raise ValueError(
                    f"gradient {name!r} is {g.dtype}: int8 compression is for real float tensors"
                )
            x = g.detach().reshape(-1).to(torch.float32)
            r = kept.get(name) if self.feedback else None
            if r is not None and r.numel() == x.numel():
                x = x + r.to(x.device)
            payload, values, _ = quant.quantize(x, self.block)
            if self.feedback:
                nxt[name] = x - values
            specs.append(
                pb.TensorSpec(
                    name=name,
                    dtype=pb.FLOAT32,
                    shape=list(g.shape),
                    encoding=quant.INT8,
                    block=self.block,
                )
            )
            payloads.append(payload)
            deq[name] = values
        return Encoded(specs, payloads, deq, self, (model, rank), nxt)
