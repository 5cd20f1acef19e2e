"""Property-based tests (hypothesis) of what hostile bytes reach: the frame decoder and the tensor
sink, the hyperparameter decoder, and state loading. Random and mutated input never raises
anything but the documented errors (ProtocolError on the wire, InvalidArgument in the core), and
a refused input changes nothing."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from adamd.protocol import ProtocolError
from adamd.protocol.frames import TensorSink, decode_frame, encode_frame
from adamd.protocol.hyper import value_from_pb
from adamd.server.core.options import validate
from adamd.server.core.registry import ModelRegistry, ModelSpec
from adamd.server.errors import InvalidArgument, ServerError
from adamd.server.operations import Operations
from adamd.v1 import adamd_pb2 as pb

from ..conftest import assert_bitwise_equal, snapshot

FAST = settings(max_examples=200, deadline=None)
HEADER = pb.PushHeader(model="m", grads=[pb.TensorSpec(name="b", shape=[3], dtype=pb.FLOAT32)])
VALID = encode_frame(HEADER.SerializeToString(), 0, 0, torch.ones(3).numpy().tobytes())


@st.composite
def mutated(draw: Any) -> bytes:
    """A valid frame with bytes flipped, cut, inserted or repeated."""
    raw = bytearray(VALID)
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "cut", "insert", "repeat"]))
        i = draw(st.integers(0, max(len(raw) - 1, 0)))
        if op == "flip" and raw:
            raw[i] ^= draw(st.integers(1, 255))
        elif op == "cut":
            del raw[i:]
        elif op == "insert":
            raw[i:i] = draw(st.binary(min_size=1, max_size=12))
        else:
            raw += raw[i:]
    return bytes(raw)


@FAST
@given(st.one_of(st.binary(max_size=64), mutated()))
def test_frame_decoder_raises_only_protocol_error(raw: bytes) -> None:
    try:
        frame = decode_frame(raw)
    except ProtocolError:
        return
    for view in (frame.header, frame.data):  # views, inside the message
        assert view is None or view.nbytes <= len(raw)
    assert frame.tensor >= 0 and frame.offset >= 0


@FAST
@given(
    st.lists(st.tuples(st.integers(-2, 3), st.integers(0, 40), st.binary(max_size=24)), max_size=8)
)
def test_tensor_sink_writes_only_inside_its_targets(chunks: list[tuple[int, int, bytes]]) -> None:
    """Whatever chunks arrive, the sink writes inside the declared tensors or refuses."""
    backing = torch.full((3 + 4 + 2,), 7.0)  # target, guard, target, guard
    targets = [backing[0:3], backing[7:9]]
    sink = TensorSink(targets, [torch.float32, torch.float32])
    for index, offset, data in chunks:
        try:
            sink.write(index, offset, memoryview(data))
        except ProtocolError:
            break
    assert torch.equal(backing[3:7], torch.full((4,), 7.0))  # the guard between them untouched


def hyper_values() -> st.SearchStrategy[pb.HyperValue]:
    dims = st.lists(st.one_of(st.integers(-3, 3), st.integers(0, 1 << 62)), max_size=12)
    tensor = st.builds(
        lambda v, s, d: pb.HyperValue(tensor=pb.ScalarTensor(value=v, shape=s, dtype=d)),
        st.floats(allow_nan=True, allow_infinity=True),
        dims,
        st.integers(-2, 10),
    )
    leaf = st.one_of(
        st.builds(lambda v: pb.HyperValue(number=v), st.floats()),
        st.builds(lambda v: pb.HyperValue(flag=v), st.booleans()),
        st.just(pb.HyperValue(none=True)),
        st.just(pb.HyperValue()),
        tensor,
    )
    return st.recursive(
        leaf,
        lambda inner: st.builds(
            lambda items: pb.HyperValue(list=pb.HyperList(items=items)), st.lists(inner, max_size=4)
        ),
        max_leaves=8,
    )


def _tensors(value: Any) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, tuple):
        return [t for v in value for t in _tensors(v)]
    return []


@FAST
@given(
    st.sampled_from(["lr", "betas", "eps", "weight_decay", "amsgrad", "maximize"]), hyper_values()
)
def test_hyperparameter_decoder_never_builds_more_than_one_element(
    key: str, hv: pb.HyperValue
) -> None:
    """Decoding raises only ProtocolError (a ValueError) and never allocates a big tensor; the
    server's validation of the decoded value raises only InvalidArgument."""
    try:
        value = value_from_pb(hv)
    except ProtocolError:
        return
    assert all(t.numel() <= 1 for t in _tensors(value))
    try:
        validate({key: value}, torch.device("cpu"))
    except InvalidArgument:
        pass


# --- state loading, on the core (no sockets) -----------------------------------------------------


@pytest.fixture(scope="module")
def core() -> tuple[Operations, Any, dict[str, dict[str, torch.Tensor]]]:
    registry = ModelRegistry(torch.device("cpu"))
    spec = ModelSpec(
        name="m",
        params=[("w", (4, 3), torch.float32), ("b", (3,), torch.float32)],
        groups=[{"params": ["w", "b"], "lr": 0.01}],
    )
    pending = registry.begin_create(spec)
    for i, t in enumerate(pending.tensors.values()):
        pending.sink.write(i, 0, memoryview(torch.randn(t.shape).numpy().tobytes()))
    model, _ = registry.commit(pending)
    with torch.no_grad():
        for p in model.params.values():
            p.grad = torch.ones_like(p)
    model.optimizer.step()
    base = {
        name: {k: v.detach().clone() for k, v in model.optimizer.state[p].items()}
        for name, p in model.params.items()
    }
    return Operations(registry), model, base


@st.composite
def mutated_state(
    draw: Any, base: dict[str, dict[str, torch.Tensor]]
) -> dict[str, dict[str, torch.Tensor]]:
    state = {name: {k: v.clone() for k, v in entry.items()} for name, entry in base.items()}
    for _ in range(draw(st.integers(0, 3))):
        name = draw(st.sampled_from(sorted(state)))
        entry = state[name]
        op = draw(st.sampled_from(["poison", "reshape", "drop", "rename", "retype", "extra"]))
        key = draw(st.sampled_from(sorted(entry) or ["step"]))
        if (
            op == "poison"
            and key in entry
            and entry[key].is_floating_point()
            and entry[key].numel()
        ):
            entry[key].view(-1)[0] = draw(
                st.sampled_from([float("nan"), float("inf"), -float("inf")])
            )
        elif op == "reshape" and key in entry:
            entry[key] = torch.zeros(draw(st.lists(st.integers(0, 5), max_size=3)))
        elif op == "drop":
            entry.pop(key, None)
        elif op == "rename":
            state[name + "x"] = state.pop(name)
        elif op == "retype" and key in entry:
            entry[key] = entry[key].to(
                draw(st.sampled_from([torch.int64, torch.bool, torch.float64]))
            )
        else:
            entry[draw(st.sampled_from(["momentum", "step", "max_exp_avg_sq"]))] = torch.zeros(3)
    return state


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(st.data())
def test_state_loading_refuses_bad_state_whole(core: Any, data: Any) -> None:
    ops, model, base = core
    ops.load_state("m", base, None)  # each example starts from the same state
    state = data.draw(mutated_state(base))
    before = snapshot(model)
    try:
        ops.load_state("m", state, None)
    except ServerError as exc:
        assert isinstance(exc, InvalidArgument), exc
        assert_bitwise_equal(before, snapshot(model))
        return
    for name, entry in state.items():  # accepted: what was sent is what the model now holds
        p = model.params[name]
        for key, t in entry.items():
            held = model.optimizer.state[p][key]
            assert torch.isfinite(held).all() and torch.equal(held.to(t.dtype), t)
