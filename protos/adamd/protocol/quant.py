"""Blockwise absmax int8: the gradient encoding of `grad_compression="int8"`, shared by the client
(which quantizes) and the server (which dequantizes into its gradient buffer).

A tensor of n values is cut into blocks of `block` values (the last one may be shorter). Each
block keeps one float32 scale, its largest magnitude / 127, and each value the nearest integer
of value / scale in -127..127 (a block of zeros has scale 0 and all-zero values). On the wire
the tensor's bytes are its payload: the ceil(n / block) scales as little-endian float32 first,
then the n int8 values, so a payload is 4 * ceil(n / block) + n bytes (about 1.002 B/value at
the default block of 2048, against 4 for float32 and 2 for bfloat16).

The rounding error of a value is at most half a step, scale / 2 = absmax(block) / 254; the
client keeps that error per parameter and adds it to the next gradient (error feedback,
adamd.client._compression). Dequantizing is one elementwise multiply in float32, the same on
both ends, so a client can know bit for bit what the server steps with.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from adamd.v1 import adamd_pb2 as pb

from .errors import ProtocolError
from .frames import TensorSink

INT8 = pb.ENCODING_INT8_BLOCKWISE
DEFAULT_BLOCK = 2048
MAX_BLOCK = 1 << 20
_LEVELS = 127.0


def check_block(block: int) -> None:
    if not 1 <= block <= MAX_BLOCK:
        raise ProtocolError(f"int8 block size must be in 1..{MAX_BLOCK}, got {block}")


def n_blocks(numel: int, block: int) -> int:
    return -(-numel // block)


def payload_nbytes(numel: int, block: int) -> int:
    """Bytes of an int8 payload of `numel` values: the scales, then one byte per value."""
    return 4 * n_blocks(numel, block) + numel


def quantize(
    x: torch.Tensor, block: int = DEFAULT_BLOCK
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(payload, dequantized, q) of tensor `x` (any real float dtype, any device; computed in
    float32): `payload` the uint8 wire bytes on the CPU, `dequantized` the float32 values the
    server will step with (flat, on x's device), `q` the int8 values (flat, CPU)."""
    check_block(block)
    work = x.detach().reshape(-1).to(torch.float32, copy=True)
    payload = torch.empty(payload_nbytes(work.numel(), block), dtype=torch.uint8)
    quantize_into(work, block, payload)
    return payload, work, payload[4 * n_blocks(work.numel(), block) :].view(torch.int8)


def quantize_into(work: torch.Tensor, block: int, payload: torch.Tensor) -> None:
    """Quantize `work` (a flat contiguous float32 tensor, any device) into `payload` (uint8, CPU,
    payload_nbytes long) and leave in `work` the dequantized values, q * scale in float32:
    bit for bit what dequantize_into gives the server. One temporary-free pass per block row
    beyond the division (the tensors of a large model are many megabytes: no full copies)."""
    check_block(block)
    n = work.numel()
    nb = n_blocks(n, block)
    if payload.numel() != payload_nbytes(n, block):
        raise ProtocolError(f"payload of {payload.numel()} bytes, need {payload_nbytes(n, block)}")
    if not n:
        return
    full = n // block
    parts = [(work[: full * block].view(full, block), 0, full)] if full else []
    if full < nb:  # the last, shorter block
        parts.append((work[full * block :].view(1, n - full * block), full, nb))
    scales_out = payload[: 4 * nb].view(torch.float32)
    q_out = payload[4 * nb :].view(torch.int8)
    for rows, first, last in parts:
        lo, hi = torch.aminmax(rows, dim=1)
        scales = torch.maximum(lo.abs(), hi.abs()).div_(_LEVELS)
        safe = torch.where(scales > 0, scales, torch.ones_like(scales))[:, None]
        # now the int8 values, as floats (+ 0.0: a -0.0 is 0 in int8, and +0.0 on the server)
        rows.div_(safe).round_().clamp_(-_LEVELS, _LEVELS).add_(0.0)
        start = first * block
        q_out[start : start + rows.numel()].copy_(rows.reshape(-1))
        rows.mul_(scales[:, None])  # dequantized: q * scale, as the server computes it
        scales_out[first:last].copy_(scales)


def dequantize_into(out: torch.Tensor, payload: torch.Tensor, block: int) -> None:
    """Write the values of an int8 `payload` (uint8, CPU) into `out` (any float dtype; its
    numel fixes the payload's size), computed in float32 as `quantize` computed them."""
    check_block(block)
    n = out.numel()
    nb = n_blocks(n, block)
    if payload.numel() != payload_nbytes(n, block):
        raise ProtocolError(
            f"int8 payload of {payload.numel()} bytes for {n} values in blocks of {block};"
            f" expected {payload_nbytes(n, block)}"
        )
    if not n:
        return
    scales = payload[: 4 * nb].view(torch.float32)
    q = payload[4 * nb :].view(torch.int8)
    direct = out.dtype == torch.float32 and out.is_contiguous()
    dst = out.view(-1) if direct else torch.empty(n, dtype=torch.float32)
    dst.copy_(q)
    full = n // block
    if full:
        dst[: full * block].view(full, block).mul_(scales[:full, None])
    if full < nb:
        dst[full * block :].mul_(scales[full])
    if not direct:
        out.copy_(dst.view(out.shape))


class DecodingSink(TensorSink):
    """A push's TensorSink where some gradients arrive int8-encoded: those stream into uint8
    payload buffers of their own, and each is dequantized into its gradient buffer once its
    last byte arrived (then `on_complete` hears of it, as of every other gradient).

    `blocks[i]`: tensor i's block size, 0 for a tensor sent as it is (`wire_dtypes[i]`)."""

    def __init__(
        self,
        buffers: Sequence[torch.Tensor],
        wire_dtypes: Sequence[torch.dtype],
        blocks: Sequence[int],
        on_complete: Callable[[int], None] | None = None,
    ):
        if len(blocks) != len(buffers):
            raise ProtocolError(f"{len(blocks)} encodings for {len(buffers)} tensors")
        self.buffers = list(buffers)
        self.blocks = list(blocks)
        self._then = on_complete
        targets: list[torch.Tensor] = []
        wires: list[torch.dtype] = []
        for buf, wire, block in zip(buffers, wire_dtypes, blocks):
            if block:
                check_block(block)
                if not buf.dtype.is_floating_point:
                    raise ProtocolError(f"int8 encoding is for real float tensors, not {buf.dtype}")
                targets.append(torch.empty(payload_nbytes(buf.numel(), block), dtype=torch.uint8))
                wires.append(torch.uint8)
            else:
                targets.append(buf)
                wires.append(wire)
        super().__init__(targets, wires, self._completed)

    def _completed(self, index: int) -> None:
        block = self.blocks[index]
        if block:
            dequantize_into(self.buffers[index], self.targets[index], block)
        if self._then is not None:
            self._then(index)
