"""Tensor framing for adamd's streaming RPCs: raw chunks in, raw chunks out, no extra copies.

Every tensor-carrying RPC streams frame messages whose fields 1-4 are (header, tensor, offset,
data) (see protos/adamd/v1/adamd.proto). This module encodes and decodes those frames by hand so a
multi-MiB `data` chunk is copied once on the way out (tensor memory -> the message bytes) and once
on the way in (message bytes -> a preallocated tensor), never through protobuf objects. The
encoding is ordinary protobuf wire format: the generated classes parse it, and the tests check
that they do.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from adamd.v1 import adamd_pb2 as pb

from .errors import ProtocolError
from .pinned import device_chunks

# Stock gRPC clients (grpc-js, Go, Java, C++, Python) refuse received messages over 4 MiB unless
# told otherwise. A chunk leaves 64 KiB of that for its framing and, on the first frame, the
# header, so every frame of a pull or a state fetch stays under the default limit.
STOCK_MESSAGE_LIMIT = 4 << 20
FRAME_HEADROOM = 64 << 10
MAX_CHUNK_BYTES = STOCK_MESSAGE_LIMIT - FRAME_HEADROOM
MIN_CHUNK_BYTES = 64 << 10
# Measured with bench/cpu_per_byte.py (25M params over loopback gRPC, BENCHMARKS.md): the largest
# chunk costs the least CPU per byte on both ends (a 25M fp32 push: 256 KiB about 1.4x the CPU,
# 1 MiB about 1.05-1.2x).
DEFAULT_CHUNK_BYTES = MAX_CHUNK_BYTES
# Largest message either side accepts: a chunk plus its header, with room for big headers.
MAX_MESSAGE_BYTES = 64 << 20

_TORCH_TO_PB = {
    torch.float32: pb.FLOAT32,
    torch.float16: pb.FLOAT16,
    torch.bfloat16: pb.BFLOAT16,
    torch.float64: pb.FLOAT64,
    torch.complex64: pb.COMPLEX64,
    torch.complex128: pb.COMPLEX128,
}
_PB_TO_TORCH = {v: k for k, v in _TORCH_TO_PB.items()}
_NP_OF = {
    torch.float32: np.float32,
    torch.float16: np.float16,
    torch.float64: np.float64,
    torch.complex64: np.complex64,
    torch.complex128: np.complex128,
}


def trainable(dtype: torch.dtype) -> bool:
    """Whether Adam trains this dtype: floating point, or complex (as its real view)."""
    return dtype.is_floating_point or dtype.is_complex


def dtype_to_pb(dtype: torch.dtype) -> int:
    try:
        return _TORCH_TO_PB[dtype]
    except KeyError:
        raise ProtocolError(
            f"dtype {dtype} cannot travel: adamd carries float32, float16, bfloat16, float64,"
            " complex64 and complex128"
        ) from None


def dtype_from_pb(code: int) -> torch.dtype:
    try:
        return _PB_TO_TORCH[code]
    except KeyError:
        raise ProtocolError(f"unknown or unspecified dtype code {code}") from None


def wire_dtype_of(dtype: torch.dtype, wire_dtype: torch.dtype | None) -> torch.dtype:
    """The dtype a tensor travels as: `wire_dtype` narrows real floating-point tensors only; a
    complex tensor travels as itself (a real bfloat16 cannot hold it, and halving it would need a
    complex-half dtype numpy and most kernels lack)."""
    if wire_dtype is None or not dtype.is_floating_point:
        return dtype
    return wire_dtype


def spec_of(name: str, t: torch.Tensor, wire_dtype: torch.dtype | None = None) -> pb.TensorSpec:
    return pb.TensorSpec(
        name=name, dtype=dtype_to_pb(wire_dtype_of(t.dtype, wire_dtype)), shape=list(t.shape)
    )


def shape_of(spec: pb.TensorSpec) -> tuple[int, ...]:
    return tuple(int(d) for d in spec.shape)


def byte_view(t: torch.Tensor) -> np.ndarray:
    """The bytes of a contiguous CPU tensor as a uint8 array sharing its memory."""
    if t.device.type != "cpu" or not t.is_contiguous():
        raise ProtocolError("byte_view needs a contiguous CPU tensor")
    return t.reshape(-1).view(torch.uint8).numpy()


# --- protobuf wire primitives -------------------------------------------------------------------


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _read_varint(buf: memoryview, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(buf):
            raise ProtocolError("truncated frame")
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise ProtocolError("malformed varint in frame")


def encode_frame(
    header: bytes | None, tensor: int = 0, offset: int = 0, data: object = b""
) -> bytes:
    """One frame message: optional serialized header, then one chunk of tensor bytes."""
    parts: list[object] = []
    if header is not None:
        parts += [b"\x0a", _varint(len(header)), header]
    if tensor:
        parts += [b"\x10", _varint(tensor)]
    if offset:
        parts += [b"\x18", _varint(offset)]
    n = memoryview(data).nbytes  # type: ignore[arg-type]
    if n:
        parts += [b"\x22", _varint(n), data]
    return b"".join(parts)  # type: ignore[arg-type]


@dataclass(frozen=True)
class Frame:
    header: memoryview | None  # serialized header message, when this frame has one
    tensor: int
    offset: int
    data: memoryview


def decode_frame(raw: bytes) -> Frame:
    """Split a frame without copying its data chunk (a view into `raw`)."""
    buf = memoryview(raw)
    pos, end = 0, len(buf)
    header = None
    tensor = offset = 0
    data = buf[0:0]
    while pos < end:
        key, pos = _read_varint(buf, pos)
        field, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _read_varint(buf, pos)
            if field == 2:
                tensor = value
            elif field == 3:
                offset = value
        elif wire == 2:
            n, pos = _read_varint(buf, pos)
            if pos + n > end:
                raise ProtocolError("truncated frame")
            if field == 1:
                header = buf[pos : pos + n]
            elif field == 4:
                data = buf[pos : pos + n]
            pos += n
        elif wire in (1, 5):
            pos += 8 if wire == 1 else 4
            if pos > end:
                raise ProtocolError("truncated frame")
        else:
            raise ProtocolError(f"unsupported wire type {wire} in frame")
    return Frame(header, tensor, offset, data)


def reply_chunk_bytes(asked: int, default: int) -> int:
    """The chunk size of a reply stream: what the request asked (0: `default`), kept within
    MIN_CHUNK_BYTES..MAX_CHUNK_BYTES and a whole number of 8-byte elements."""
    n = min(max(asked or default, MIN_CHUNK_BYTES), MAX_CHUNK_BYTES)
    return n - n % 8


def identity(b: bytes) -> bytes:
    return b


# --- sending ------------------------------------------------------------------------------------


def iter_frames(
    header: bytes,
    tensors: Sequence[torch.Tensor],
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    wire_dtype: torch.dtype | Sequence[torch.dtype] | None = None,
) -> Iterator[bytes]:
    """The header frame, then every tensor cut into chunks, as `wire_dtype` where one is given
    (see wire_chunks; without one, tensors must be contiguous CPU tensors); a sequence gives each
    tensor its own.

    The header rides on the first chunk when both fit the headroom; a larger header travels in a
    frame of its own, so a frame is never much more than `chunk_bytes`."""
    first = True
    if len(header) > FRAME_HEADROOM - 64 and any(t.numel() for t in tensors):
        yield encode_frame(header)
        header, first = b"", False
    wires = _each(wire_dtype, len(tensors))
    for index, t in enumerate(tensors):
        for start, chunk in wire_chunks(t, wires[index], chunk_bytes):
            yield encode_frame(header if first else None, index, start, chunk)
            first = False
    if first:
        yield encode_frame(header)


def _each(
    wire_dtype: torch.dtype | Sequence[torch.dtype] | None, n: int
) -> Sequence[torch.dtype | None]:
    if wire_dtype is None or isinstance(wire_dtype, torch.dtype):
        return [wire_dtype] * n
    if len(wire_dtype) != n:
        raise ValueError(f"{len(wire_dtype)} wire dtypes for {n} tensors")
    return wire_dtype


def wire_chunks(
    t: torch.Tensor, wire_dtype: torch.dtype | None, chunk_bytes: int
) -> Iterator[tuple[int, np.ndarray]]:
    """(byte offset, bytes) of `t` as it travels, `chunk_bytes` at a time.

    A CPU tensor that travels narrower (bf16/fp16) is converted one chunk at a time into one
    reused chunk-sized buffer, which stays in cache, instead of into a whole converted copy first:
    one pass over the tensor's memory. Each chunk is valid only until the next one is asked for
    (encode_frame copies it). A device tensor goes through two pinned chunk buffers
    (pinned.device_chunks); others through to_wire."""
    wire = wire_dtype_of(t.dtype, wire_dtype)
    if t.device.type != "cpu" and t.numel():  # through pinned chunk buffers (pinned.py)
        yield from device_chunks(t, wire, chunk_bytes)
        return
    if wire == t.dtype or not t.numel():
        raw = byte_view(to_wire(t, wire_dtype))
        for start in range(0, raw.nbytes, chunk_bytes):
            yield start, raw[start : start + chunk_bytes]
        return
    flat = t.detach().reshape(-1)
    per = max(chunk_bytes // wire.itemsize, 1)
    buf = torch.empty(min(per, flat.numel()), dtype=wire)
    view = byte_view(buf)
    for i in range(0, flat.numel(), per):
        n = min(per, flat.numel() - i)
        buf[:n].copy_(flat[i : i + n])  # the rounding of Tensor.to: the same bits
        yield i * wire.itemsize, view[: n * wire.itemsize]


def to_wire(t: torch.Tensor, wire_dtype: torch.dtype | None = None) -> torch.Tensor:
    """A contiguous CPU tensor ready for byte_view, converted to the wire dtype if one is asked
    (real floating-point tensors only: see wire_dtype_of)."""
    t = t.detach()
    wire_dtype = wire_dtype_of(t.dtype, wire_dtype)
    if wire_dtype != t.dtype:
        t = t.to(device="cpu", dtype=wire_dtype)
    elif t.device.type != "cpu":
        t = t.to("cpu")
    return t.contiguous()


# --- receiving ----------------------------------------------------------------------------------


class TensorSink:
    """Writes a stream's chunks into preallocated tensors, in order, and says when all arrived.

    `targets[i]` receives the bytes of the stream's tensor i, which were sent as `wire_dtypes[i]`
    (a different float dtype is converted on the way in; complex only to complex). Chunks of one tensor must arrive in
    order, without gaps or overlaps; anything else is a ProtocolError and leaves the stream unusable.
    `on_complete(i)`, when given, is called once target i holds all its bytes (the server starts
    that gradient's host-to-device copy there); never for a tensor with no bytes.
    """

    def __init__(
        self,
        targets: Sequence[torch.Tensor],
        wire_dtypes: Sequence[torch.dtype],
        on_complete: Callable[[int], None] | None = None,
    ):
        self.targets = list(targets)
        self.wire_dtypes = list(wire_dtypes)
        self.on_complete = on_complete
        self._wire_nbytes = [t.numel() * w.itemsize for t, w in zip(self.targets, self.wire_dtypes)]
        self._received = [0] * len(self.targets)
        self._views: list[np.ndarray | None] = [None] * len(self.targets)

    def write(self, index: int, offset: int, data: memoryview) -> None:
        n = data.nbytes
        view = self.direct_view(index, offset, n)
        if view is not None:
            view[:] = np.frombuffer(data, dtype=np.uint8)
        else:
            wire = self.wire_dtypes[index]
            self._convert_into(self.targets[index], wire, offset // wire.itemsize, data)
        self.advance(index, offset + n)

    def converts(self, index: int) -> bool:
        """Whether tensor `index` arrives as another dtype than its target's."""
        if not 0 <= index < len(self.targets):
            raise ProtocolError(
                f"chunk names tensor {index}, but the stream declared {len(self.targets)}"
            )
        return self.wire_dtypes[index] != self.targets[index].dtype

    def direct_view(self, index: int, offset: int, n: int) -> np.ndarray | None:
        """Check a chunk of `n` bytes of tensor `index` at byte `offset`; where it needs no
        conversion, the target's bytes it fills (a receiver may read straight into them, then
        calls `advance`); None where it converts (pass the bytes to `write`)."""
        if not 0 <= index < len(self.targets):
            raise ProtocolError(
                f"chunk names tensor {index}, but the stream declared {len(self.targets)}"
            )
        if offset != self._received[index]:
            raise ProtocolError(
                f"chunk of tensor {index} at byte {offset}, expected byte {self._received[index]}"
                " (chunks missing, repeated or out of order)"
            )
        end = offset + n
        if end > self._wire_nbytes[index]:
            raise ProtocolError(
                f"tensor {index} gets more bytes ({end}) than its shape holds ({self._wire_nbytes[index]})"
            )
        wire = self.wire_dtypes[index]
        if n % wire.itemsize:
            raise ProtocolError(f"chunk of tensor {index} is not a whole number of {wire} elements")
        target = self.targets[index]
        if wire.is_complex != target.dtype.is_complex:
            raise ProtocolError(
                f"tensor {index} travels as {wire} into {target.dtype}: complex only into complex"
            )
        if wire != target.dtype:
            return None
        view = self._views[index]
        if view is None:
            view = self._views[index] = byte_view(target)
        return view[offset:end]

    def advance(self, index: int, end: int) -> None:
        """Tensor `index` holds its bytes up to `end` (after a checked chunk was written)."""
        grew = end > self._received[index]
        self._received[index] = end
        if grew and end == self._wire_nbytes[index] and self.on_complete is not None:
            self.on_complete(index)

    @staticmethod
    def _convert_into(
        target: torch.Tensor, wire: torch.dtype, start: int, data: memoryview
    ) -> None:
        flat = target.reshape(-1)
        if not data.readonly:  # torch's vectorized conversion (it refuses read-only buffers)
            values = torch.frombuffer(data, dtype=wire)
            flat[start : start + values.numel()].copy_(values)
            return
        if wire == torch.bfloat16 and target.dtype == torch.float32:
            # bfloat16 is the top half of a float32: widen the bits in place, no temporaries.
            src = np.frombuffer(data, dtype=np.uint16)
            dst = flat[start : start + src.size].numpy().view(np.uint32)
            np.copyto(dst, src)
            np.left_shift(dst, 16, out=dst)
            return
        if wire == torch.bfloat16:
            bits = np.frombuffer(data, dtype=np.uint16).astype(np.uint32) << 16
            values = torch.from_numpy(bits.view(np.float32))
        else:
            values = torch.from_numpy(np.frombuffer(data, dtype=_NP_OF[wire]).copy())
        flat[start : start + values.numel()].copy_(values)

    def missing(self) -> list[int]:
        return [i for i, n in enumerate(self._wire_nbytes) if self._received[i] != n]

    def check_complete(self) -> None:
        missing = self.missing()
        if missing:
            got = sum(self._received)
            want = sum(self._wire_nbytes)
            raise ProtocolError(
                f"stream ended early: {got} of {want} bytes; tensors {missing} incomplete"
            )


def all_finite(t: torch.Tensor) -> bool:
    """True when every element is finite. A finite sum proves it (inf and nan propagate through
    addition) at the cost of one read; only a non-finite sum, which may be an overflow of large
    finite values, pays for the exact check. A complex tensor is checked as its real view."""
    if t.is_complex():
        t = torch.view_as_real(t)
    if bool(torch.isfinite(t.sum(dtype=torch.float32))):
        return True
    return bool(torch.isfinite(t).all())
