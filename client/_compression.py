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

import threading
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from adamd.client._exceptions import NonFiniteGradient
from adamd.protocol import quant
from adamd.protocol.frames import all_finite
from adamd.v1 import adamd_pb2 as pb

MODES = ("int8", "int8-noef")


def check_mode(mode: str | None) -> str | None:
    """`mode` itself, when it is one grad_compression knows (None: no compression)."""
    if mode is not None and mode not in MODES:
        raise ValueError(f"grad_compression must be None, 'int8' or 'int8-noef', got {mode!r}")
    return mode


def check_finite(grads: Mapping[str, torch.Tensor]) -> None:
    """Refuse non-finite gradients before anything is quantized (an inf would make its block's
    scale inf and every value of the block nan), as the server refuses them."""
    for name, g in grads.items():
        if not all_finite(g):
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
    payloads: Sequence[torch.Tensor]
    dequantized: dict[str, torch.Tensor]
    _owner: Compressor | None = None
    _key: tuple[str, int] = ("", 0)
    _next: dict[str, torch.Tensor] = field(default_factory=dict)

    def wait(self) -> None:
        """Until every payload is quantized (and every residual computed)."""
        if isinstance(self.payloads, _Pending):
            self.payloads.wait()

    def commit(self) -> None:
        self.wait()
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
        self._scratch_lock = threading.Lock()  # one quantizing at a time uses the scratch
        self._executor: ThreadPoolExecutor | None = None

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
        pipelined: bool = True,
    ) -> Encoded:
        """Quantize `grads` (plus their residuals, with feedback); nothing changes here until
        the returned push is committed. Every gradient is checked first (float, finite); with
        `pipelined`, the quantizing then runs on a thread of this compressor's, one gradient
        after the other, and `payloads[i]` waits for gradient i: the first is sent while the
        next ones are still being quantized (torch releases the GIL)."""
        for name, g in grads.items():
            if not g.dtype.is_floating_point:
                raise ValueError(
                    f"gradient {name!r} is {g.dtype}: int8 compression is for real float tensors"
                )
        check_finite(grads)
        key = (model, rank)
        kept = self.residuals.get(key, {})
        spare = self.spares.get(key, {})
        names = list(grads)
        specs = [
            pb.TensorSpec(
                name=name,
                dtype=pb.FLOAT32,
                shape=list(grads[name].shape),
                encoding=quant.INT8,
                block=self.block,
            )
            for name in names
        ]
        payloads = [
            torch.empty(quant.payload_nbytes(grads[n].numel(), self.block), dtype=torch.uint8)
            for n in names
        ]
        deq: dict[str, torch.Tensor] = {}
        nxt: dict[str, torch.Tensor] = {}
        # Buffers are taken here, on the caller's thread: the quantizing thread only computes.
        plans = []
        for name in names:
            flat = grads[name].detach().reshape(-1)
            x = None
            if self.feedback:
                x = spare.pop(name, None)
                if x is None or x.numel() != flat.numel() or x.device != flat.device:
                    x = torch.empty(flat.numel(), dtype=torch.float32, device=flat.device)
            plans.append((name, flat, kept.get(name), x))

        def one(i: int) -> None:
            with self._scratch_lock:  # pushes from several threads share the scratch buffers
                quantize(i)

        def quantize(i: int) -> None:
            name, flat, r, x = plans[i]
            work = self._work(flat.numel(), flat.device)
            if x is not None:  # feedback
                if r is not None and r.numel() == flat.numel():
                    torch.add(flat, r, out=x)  # the gradient plus what earlier pushes dropped
                else:
                    x.copy_(flat)
                work.copy_(x)
                quant.quantize_into(work, self.block, payloads[i])
                nxt[name] = x.sub_(work)  # what this push drops, sent with the next one
            else:
                work.copy_(flat)
                quant.quantize_into(work, self.block, payloads[i])
            if keep_dequantized:
                deq[name] = work.clone()

        big = sum(f.numel() for _, f, _, _ in plans) >= PIPELINE_MIN_VALUES
        if pipelined and big and len(plans) > 1:
            pending = _Pending(payloads, [self._pool().submit(one, i) for i in range(len(plans))])
            return Encoded(specs, pending, deq, self, key, nxt)
        for i in range(len(plans)):
            one(i)
        return Encoded(specs, payloads, deq, self, key, nxt)

    def _pool(self) -> ThreadPoolExecutor:
        if self._executor is None:
            self._executor = ThreadPoolExecutor(1, thread_name_prefix="adamd-int8")
        return self._executor


# Below this many values in a push, quantize on the caller's thread (a thread hop costs more).
PIPELINE_MIN_VALUES = 1 << 20


class _Pending(Sequence[torch.Tensor]):
    """A push's payloads while they are being quantized: item i waits for gradient i."""

    def __init__(self, payloads: list[torch.Tensor], done: list[Future[None]]):
        self._payloads = payloads
        self._done = done

    def __len__(self) -> int:
        return len(self._payloads)

    def __getitem__(self, i: int) -> torch.Tensor:  # type: ignore[override]
        self._done[i].result()
        return self._payloads[i]

    def wait(self) -> None:
        for f in self._done:
            f.result()


class Residuals:
    """A Client's int8 state: one Compressor per mode ("int8", "int8-noef"), made on first use,
    and the choice of whether a push is encoded at all."""

    def __init__(self, default: Callable[[], str | None]):
        self.default = default  # the Client's grad_compression, as it is at each push
        self._by_mode: dict[str, Compressor] = {}

    def compressor(self, mode: str) -> Compressor:
        if mode not in self._by_mode:
            self._by_mode[mode] = Compressor(mode)
        return self._by_mode[mode]

    def encode(
        self,
        model: str,
        rank: int,
        grads: Mapping[str, torch.Tensor],
        mode: str | None,
        found_inf: bool,
    ) -> Encoded | None:
        """The push's int8 encoding (`mode`, else the Client's), or None where it travels raw:
        no compression, or a push with found_inf (skipped by the server whatever its values;
        the residuals stay)."""
        mode = check_mode(mode or self.default())
        if mode is None or found_inf:
            return None
        return self.compressor(mode).encode(model, rank, grads)

    def forget(self, model: str) -> None:
        """Drop `model`'s residuals (deleted, or created anew under its name)."""
        for compressor in self._by_mode.values():
            compressor.reset(model)
