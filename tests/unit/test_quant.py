"""The blockwise absmax int8 codec (adamd.protocol.quant): error bound, block edges, zeros, odd
sizes, the payload layout, and the server's decoding sink."""

from __future__ import annotations

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from adamd.protocol import ProtocolError, quant


def _roundtrip(x: torch.Tensor, block: int) -> torch.Tensor:
    payload, deq, _ = quant.quantize(x, block)
    out = torch.empty(x.shape, dtype=torch.float32)
    quant.dequantize_into(out, payload, block)
    assert torch.equal(out.reshape(-1), deq)  # the server's values are the client's, bitwise
    return out


def _bound(x: torch.Tensor, block: int) -> torch.Tensor:
    """Half a quantization step of each value's block: absmax / 254."""
    flat = x.reshape(-1).float()
    n = flat.numel()
    nb = quant.n_blocks(n, block)
    padded = torch.zeros(nb * block)
    padded[:n] = flat.abs()
    return (padded.view(nb, block).amax(1) / 254).repeat_interleave(block)[:n]


@pytest.mark.parametrize("n", [1, 7, 2047, 2048, 2049, 4096 * 3 + 5])
@pytest.mark.parametrize("block", [1, 64, 2048])
def test_round_trip_error_is_at_most_half_a_step_per_block(n: int, block: int) -> None:
    torch.manual_seed(n + block)
    x = torch.randn(n) * torch.logspace(-6, 3, n)  # magnitudes spread over many decades
    out = _roundtrip(x, block)
    err = (out.reshape(-1) - x).abs()
    assert bool((err <= _bound(x, block) * (1 + 1e-6) + 1e-30).all())
    assert quant.quantize(x, block)[0].numel() == 4 * quant.n_blocks(n, block) + n


def test_payload_is_scales_then_int8_values() -> None:
    x = torch.tensor([1.0, -2.0, 0.5, 254.0, -127.0])
    payload, _, q = quant.quantize(x, block=3)
    scales = payload[:8].view(torch.float32)
    assert torch.equal(scales, torch.tensor([2.0, 254.0]) / 127)
    assert payload[8:].view(torch.int8).tolist() == q.tolist()
    assert q.tolist() == [64, -127, 32, 127, -64]  # each block's absmax maps to +-127


def test_zero_blocks_have_zero_scale_and_values() -> None:
    x = torch.zeros(5000)
    x[4096:] = 3.0  # two zero blocks, then one with values
    payload, deq, q = quant.quantize(x, 2048)
    assert torch.equal(payload[:12].view(torch.float32), torch.tensor([0.0, 0.0, 3.0]) / 127)
    assert not q[:4096].any() and torch.equal(deq, x)


def test_empty_and_multidimensional_tensors() -> None:
    empty = torch.zeros(0, 3)
    payload, deq, _ = quant.quantize(empty)
    assert payload.numel() == 0 and deq.numel() == 0
    quant.dequantize_into(torch.empty(0, 3), payload, quant.DEFAULT_BLOCK)
    x = torch.randn(3, 5, 7)
    out = _roundtrip(x, 16)
    assert out.shape == x.shape


def test_bfloat16_input_quantizes_its_float32_value() -> None:
    x = torch.randn(100).to(torch.bfloat16)
    assert torch.equal(quant.quantize(x, 32)[1], quant.quantize(x.float(), 32)[1])


def test_dequantize_into_a_bfloat16_buffer_rounds_the_float32_values() -> None:
    x = torch.randn(300)
    payload, deq, _ = quant.quantize(x, 128)
    out = torch.empty(300, dtype=torch.bfloat16)
    quant.dequantize_into(out, payload, 128)
    assert torch.equal(out, deq.to(torch.bfloat16))


def test_bad_sizes_and_blocks_are_refused() -> None:
    payload, _, _ = quant.quantize(torch.ones(10), 4)
    with pytest.raises(ProtocolError, match="payload"):
        quant.dequantize_into(torch.empty(11), payload, 4)
    for block in (0, quant.MAX_BLOCK + 1):
        with pytest.raises(ProtocolError, match="block"):
            quant.quantize(torch.ones(3), block)


def test_decoding_sink_dequantizes_each_encoded_tensor_once_complete() -> None:
    a, b = torch.randn(5000), torch.randn(7)
    pa, da, _ = quant.quantize(a, 2048)
    bufs = [torch.full((5000,), 9.0), torch.empty(7)]
    done: list[int] = []
    sink = quant.DecodingSink(bufs, [torch.float32, torch.float32], [2048, 0], done.append)
    raw = pa.numpy().tobytes()
    sink.write(0, 0, memoryview(raw[:1000]))
    assert done == [] and bool((bufs[0] == 9.0).all())  # nothing written before the last byte
    sink.write(0, 1000, memoryview(raw[1000:]))
    sink.write(1, 0, memoryview(b.numpy().tobytes()))
    sink.check_complete()
    assert done == [0, 1]
    assert torch.equal(bufs[0], da) and torch.equal(bufs[1], b)
    with pytest.raises(ProtocolError, match="more bytes"):
        sink.write(0, len(raw), memoryview(b"\x00"))


@settings(max_examples=60, deadline=None)
@given(
    values=st.lists(
        st.floats(min_value=-(2.0**100), max_value=2.0**100, allow_nan=False, width=32),
        min_size=0,
        max_size=300,
    ),
    block=st.integers(min_value=1, max_value=70),
)
@example(values=[1.4e-45], block=1)  # the smallest subnormal: its scale underflows to 0
def test_property_round_trip_bound(values: list[float], block: int) -> None:
    x = torch.tensor(values, dtype=torch.float32)
    out = _roundtrip(x, block)
    err = (out.reshape(-1) - x).abs()
    # float32 rounding of value/scale and of q*scale adds a few ulps to the half step; a scale
    # (absmax/127) in the subnormal range is rounded to a multiple of 2**-149, which q (up to 127)
    # multiplies: a block of values below 127 * 2**-149 dequantizes to zero
    slack = x.abs() * 1e-6 + 127 * 2.0**-149
    assert bool((err <= _bound(x, block) * (1 + 1e-5) + slack).all())


def test_dequantized_values_match_the_servers_bit_for_bit_signed_zeros_included() -> None:
    x = torch.tensor([1.0, -1e-9, 1e-9, -0.0, 0.0] * 500)
    payload, deq, _ = quant.quantize(x, 64)
    out = torch.empty(x.numel())
    quant.dequantize_into(out, payload, 64)
    assert torch.equal(deq.view(torch.int32), out.view(torch.int32))


def test_pushes_from_two_threads_quantize_as_one_at_a_time() -> None:
    """A Client's compressor is shared by the threads pushing through it: the payloads two
    threads encode at once are those each would encode alone (they share scratch buffers)."""
    import threading

    from adamd.client._compression import Compressor

    g = torch.Generator().manual_seed(0)
    grads = {r: {"w": torch.randn(500_000, generator=g) * (r + 1) * 100} for r in range(2)}
    alone = {r: Compressor("int8").encode("m", r, grads[r]).payloads[0].clone() for r in range(2)}
    shared = Compressor("int8")
    mismatched = []

    def push(rank: int) -> None:
        for _ in range(20):
            payload = shared.encode("m", rank, grads[rank]).payloads[0]
            if not torch.equal(payload, alone[rank]):
                mismatched.append(rank)
            shared.reset()

    threads = [threading.Thread(target=push, args=(r,)) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not mismatched
