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
    float32 on x's device): `payload` the uint8 wire bytes on the CPU, `dequantized` the float32
    values the server will step with (flat, on x's device), `q` the int8 values (flat)."""
    check_block(block)
    flat = x.detach().reshape(-1).to(torch.float32)
    n = flat.numel()
    nb = n_blocks(n, block)
    pad = nb * block - n
    blocks = (
        torch.nn.functional.pad(flat, (0, pad)).view(nb, block) if pad else flat.view(nb, block)
    )
    scales = blocks.abs().amax(dim=1) / _LEVELS
    safe = torch.where(scales > 0, scales, torch.ones_like(scales))
    q = torch.round(blocks / safe[:, None]).clamp_(-_LEVELS, _LEVELS).to(torch.int8)
    deq = (q.to(torch.float32) * scales[:, None]).reshape(-1)[:n]
    payload = torch.empty(payload_nbytes(n, block), dtype=torch.uint8)
    payload[: 4 * nb].view(torch.float32).copy_(scales)
    payload[4 * nb :].view(torch.int8).copy_(q.reshape(-1)[:n])
    return payload, deq, q.reshape(-1)[:n]


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
    pad = nb * block - n
    if pad:
        full = torch.zeros(nb * block, dtype=torch.int8)
        full[:n] = q
        q = full
    deq = (q.view(nb, block).to(torch.float32) * scales[:, None]).reshape(-1)[:n]
    out.view(-1).copy_(deq) if out.is_contiguous() else out.copy_(deq.view(out.shape))


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
