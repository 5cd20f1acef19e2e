"""The hand-written frame codec is ordinary protobuf: generated classes parse what it writes and
it reads what they write; TensorSink refuses every malformed chunk sequence."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from adamd.protocol import ProtocolError
from adamd.protocol.frames import TensorSink, decode_frame, encode_frame, iter_frames
from adamd.v1 import adamd_pb2 as pb


@pytest.mark.parametrize("offset", [0, 1, 300, 2**40])
@pytest.mark.parametrize("tensor", [0, 1, 200])
def test_frames_are_protobuf(tensor: int, offset: int) -> None:
    hdr = pb.PushHeader(
        model="m", push_id="x", grads=[pb.TensorSpec(name="w", dtype=pb.FLOAT32, shape=[2, 3])]
    )
    data = bytes(range(256)) * 3
    raw = encode_frame(hdr.SerializeToString(), tensor, offset, data)
    parsed = pb.PushFrame.FromString(raw)
    assert (
        parsed.header == hdr
        and parsed.tensor == tensor
        and parsed.offset == offset
        and parsed.data == data
    )
    back = decode_frame(parsed.SerializeToString())
    assert back.header is not None and pb.PushHeader.FromString(bytes(back.header)) == hdr
    assert (back.tensor, back.offset, bytes(back.data)) == (tensor, offset, data)


def test_decode_is_zero_copy() -> None:
    raw = encode_frame(None, 1, 8, b"abcd" * 1000)
    frame = decode_frame(raw)
    assert frame.header is None and frame.data.obj is raw


def test_frames_round_trip_tensors_of_any_dtype() -> None:
    src = [
        torch.randn(5, 7),
        torch.randn(3).to(torch.bfloat16),
        torch.randn(11).half(),
        torch.randn(2, 2).double(),
    ]
    dst = [torch.empty_like(t) for t in src]
    sink = TensorSink(dst, [t.dtype for t in src])
    for raw in iter_frames(b"h", src, chunk_bytes=8):
        f = decode_frame(raw)
        if f.data.nbytes:
            sink.write(f.tensor, f.offset, f.data)
    sink.check_complete()
    for a, b in zip(src, dst):
        assert torch.equal(a, b)


@pytest.mark.parametrize("wire", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("chunk", [8, 24, 1 << 20])
def test_chunked_conversion_sends_the_bytes_of_a_whole_conversion(
    wire: torch.dtype, chunk: int
) -> None:
    """iter_frames with a wire dtype converts one chunk at a time into a reused buffer: the bytes
    are those of Tensor.to(wire), also for non-contiguous tensors and a ragged last chunk;
    complex tensors travel at full width."""
    g = torch.Generator().manual_seed(0)
    src = [
        torch.randn(7, 5, generator=g) * 1e3,
        torch.randn(6, 4, generator=g).t(),  # not contiguous
        torch.randn(3, dtype=torch.complex64, generator=g),
        torch.empty(0),
    ]
    want = [(t.to(wire) if t.is_floating_point() else t).contiguous() for t in src]
    dst = [torch.empty(t.shape, dtype=t.dtype) for t in want]
    sink = TensorSink(dst, [t.dtype for t in want])
    for raw in iter_frames(b"h", src, chunk_bytes=chunk, wire_dtype=wire):
        f = decode_frame(raw)
        if f.data.nbytes:
            sink.write(f.tensor, f.offset, f.data)
    sink.check_complete()
    for a, b in zip(want, dst):
        assert a.dtype == b.dtype and torch.equal(
            a.view(-1).view(torch.uint8), b.view(-1).view(torch.uint8)
        )


@pytest.mark.parametrize("wire", [torch.float16, torch.bfloat16, torch.float64])
def test_sink_converts_wire_dtype_into_float32(wire: torch.dtype) -> None:
    src = torch.randn(1000).to(wire)
    dst = torch.empty(1000)
    sink = TensorSink([dst], [wire])
    raw = src.view(torch.uint8).numpy().tobytes()
    for start in range(0, len(raw), 256):
        sink.write(0, start, memoryview(raw[start : start + 256]))
    sink.check_complete()
    assert torch.equal(dst, src.float())


def test_sink_refuses_bad_sequences() -> None:
    def sink() -> TensorSink:
        return TensorSink([torch.empty(4)], [torch.float32])

    chunk = memoryview(np.zeros(2, np.float32).tobytes())
    with pytest.raises(ProtocolError, match="declared 1"):
        sink().write(1, 0, chunk)
    with pytest.raises(ProtocolError, match="expected byte 0"):
        sink().write(0, 8, chunk)
    s = sink()
    s.write(0, 0, chunk)
    with pytest.raises(ProtocolError, match="expected byte 8"):
        s.write(0, 0, chunk)
    with pytest.raises(ProtocolError, match="more bytes"):
        sink().write(0, 0, memoryview(bytes(20)))
    with pytest.raises(ProtocolError, match="whole number"):
        sink().write(0, 0, memoryview(bytes(3)))
    with pytest.raises(ProtocolError, match="ended early"):
        s.check_complete()


def test_empty_stream_still_carries_its_header() -> None:
    frames = list(iter_frames(b"hdr", []))
    assert len(frames) == 1 and decode_frame(frames[0]).header == b"hdr"
    frames = list(iter_frames(b"hdr", [torch.empty(0)]))
    assert len(frames) == 1
