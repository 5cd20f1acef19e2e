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
    they are on a retry) and their `specs`; `commit()` moves the residuals on (after the ack).
    `dequantized`: what the server steps with (float32, flat), when asked for."""

    specs: list[pb.TensorSpec]
    payloads: list[torch.Tensor]
    dequantized: dict[str, torch.Tensor]
    _owner: Compressor | None = None
    _key: tuple[str, int] = ("", 0)
    _next: dict[str, torch.Tensor] = field(default_factory=dict)

    def commit(self) -> None:
        if self._owner is not None and self._next:
            kept = self._owner.residuals.setdefault(self._key, {})
            spare = self._owner.spares.setdefault(self._key, {})
            for name, r in self._next.items():
                old = kept.get(name)
                kept[name] = r
                if old is not None and old.shape == r.shape:
                    spare[name] = old  # the next push's residual goes there: no new allocation
            self._next = {}


class Compressor:
    """Per-parameter error-feedback residuals of one client, keyed by (model, rank).

    Memory on the worker, with feedback: the residual (4 bytes per parameter) and the one a push
    in flight will leave (4 more, swapped in on the ack), plus one float32 scratch buffer the size
    of the largest gradient."""

    def __init__(self, mode: str, block: int = quant.DEFAULT_BLOCK):
        check_mode(mode)
        quant.check_block(block)
        self.mode = mode
        self.block = block
        self.feedback = mode == "int8"
        self.residuals: dict[tuple[str, int], dict[str, torch.Tensor]] = {}
        self.spares: dict[tuple[str, int], dict[str, torch.Tensor]] = {}
        self._scratch: dict[torch.device, torch.Tensor] = {}

    def residual(self, model: str, rank: int, name: str) -> torch.Tensor | None:
        return self.residuals.get((model, rank), {}).get(name)

    def reset(self, model: str | None = None) -> None:
        """Drop the residuals (of one model, or all)."""
        for table in (self.residuals, self.spares):
            for key in [k for k in table if model is None or k[0] == model]:
                del table[key]

    def _work(self, n: int, device: torch.device) -> torch.Tensor:
        buf = self._scratch.get(device)
        if buf is None or buf.numel() < n:
            buf = self._scratch[device] = torch.empty(n, dtype=torch.float32, device=device)
        return buf[:n]

    def encode(
        self,
        model: str,
        rank: int,
        grads: Mapping[str, torch.Tensor],
        keep_dequantized: bool = False,
    ) -> Encoded:
        """Quantize `grads` (plus their residuals, with feedback); nothing changes here until
        the returned push is committed."""
        check_finite(grads)
        key = (model, rank)
        kept = self.residuals.get(key, {})
        spare = self.spares.get(key, {})
        specs, payloads, deq, nxt = [], [], {}, {}
        for name, g in grads.items():
            if not g.dtype.is_floating_point:
                raise ValueError(
                    f"gradient {name!r} is {g.dtype}: int8 compression is for real float tensors"
                )
            flat = g.detach().reshape(-1)
            n = flat.numel()
            work = self._work(n, flat.device)
            payload = torch.empty(quant.payload_nbytes(n, self.block), dtype=torch.uint8)
            if self.feedback:
                r = kept.get(name)
                x = spare.pop(name, None)
                if x is None or x.numel() != n or x.device != flat.device:
                    x = torch.empty(n, dtype=torch.float32, device=flat.device)
                if r is not None and r.numel() == n:
                    torch.add(flat, r, out=x)  # the gradient plus what earlier pushes dropped
                else:
                    x.copy_(flat)
                work.copy_(x)
                quant.quantize_into(work, self.block, payload)
                nxt[name] = x.sub_(work)  # what this push drops, sent with the next one
            else:
                work.copy_(flat)
                quant.quantize_into(work, self.block, payload)
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
            if keep_dequantized:
                deq[name] = work.clone()
        return Encoded(specs, payloads, deq, self, key, nxt)
