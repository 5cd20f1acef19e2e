"""Bad input gets the right status and a client exception, and changes nothing.

Each test takes a bitwise snapshot of the model's parameters and optimizer state, sends a bad
request (through the client, or as raw frames on a bare gRPC channel where the client would
refuse to build them), checks the error, and checks the snapshot again.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from adamd.client import (
    AdamdError,
    AlreadyExists,
    Client,
    DuplicatePush,
    InvalidArgument,
    LimitExceeded,
    NonFiniteGradient,
    NotFound,
    RemoteAdam,
    Unauthenticated,
)
from adamd.client._exceptions import from_rpc_error
from adamd.protocol.frames import encode_frame, identity
from adamd.v1 import adamd_pb2 as pb

from ..conftest import assert_bitwise_equal, running_daemon, snapshot

SHAPES = {"w": (4, 3), "b": (3,)}


@pytest.fixture
def trained(daemon: Any, client: Client, model_name: str) -> Any:
    """A model that has taken two steps (so optimizer state exists), and its hosted object."""
    torch.manual_seed(0)
    client.create_model(model_name, {n: torch.randn(s) for n, s in SHAPES.items()}, lr=0.01)
    for _ in range(2):
        client.push_grad(model_name, {n: torch.randn(s) for n, s in SHAPES.items()})
    return daemon.registry.get(model_name)


def good_grads() -> dict[str, torch.Tensor]:
    return {n: torch.randn(s) for n, s in SHAPES.items()}


def raw_push(daemon: Any, frames: list[bytes]) -> pb.PushReply:
    """Send hand-made frames to PushGrad, translating failures as the client does."""
    with grpc.insecure_channel(daemon.grpc_address) as ch:
        call = ch.stream_unary("/adamd.v1.Optimizer/PushGrad", identity, pb.PushReply.FromString)
        try:
            return call(iter(frames), timeout=10)
        except grpc.RpcError as err:
            raise from_rpc_error(err) from None


def header(model: str, grads: dict[str, tuple[tuple[int, ...], int]], **kw: Any) -> bytes:
    specs = [pb.TensorSpec(name=n, shape=list(s), dtype=d) for n, (s, d) in grads.items()]
    return pb.PushHeader(model=model, grads=specs, **kw).SerializeToString()


def f32(*shape: int) -> bytes:
    return torch.randn(shape).numpy().tobytes()


def expect_unchanged(
    model: Any, fn: Any, error: type[Exception], match: str | None = None
) -> Exception:
    before = snapshot(model)
    with pytest.raises(error, match=match) as info:
        fn()
    assert_bitwise_equal(before, snapshot(model))
    return info.value


# --- through the client ------------------------------------------------------------------------


def test_unknown_model(client: Client) -> None:
    for call in (
        lambda: client.push_grad("no-such-model", good_grads()),
        lambda: client.pull_params("no-such-model"),
        lambda: client.describe("no-such-model"),
        lambda: client.delete_model("no-such-model"),
        lambda: client.get_state("no-such-model"),
        lambda: client.set_hyperparams("no-such-model", lr=0.1),
    ):
        with pytest.raises(NotFound) as info:
            call()
        assert info.value.code == grpc.StatusCode.NOT_FOUND


def test_unknown_parameter(client: Client, trained: Any) -> None:
    grads = {**good_grads(), "nope": torch.zeros(2)}
    err = expect_unchanged(
        trained,
        lambda: client.push_grad(trained.name, grads),
        InvalidArgument,
        "no parameter 'nope'",
    )
    assert isinstance(err, InvalidArgument) and err.code == grpc.StatusCode.INVALID_ARGUMENT
    expect_unchanged(trained, lambda: client.pull_params(trained.name, ["nope"]), InvalidArgument)


def test_shape_mismatch(client: Client, trained: Any) -> None:
    grads = {"w": torch.randn(3, 4), "b": torch.randn(3)}
    expect_unchanged(
        trained, lambda: client.push_grad(trained.name, grads), InvalidArgument, "shape"
    )


def test_non_float_dtype_refused(daemon: Any, trained: Any) -> None:
    frames = [encode_frame(header(trained.name, {"b": ((3,), 0)}), 0, 0, b"\0" * 12)]
    expect_unchanged(trained, lambda: raw_push(daemon, frames), InvalidArgument, "dtype")


@pytest.mark.parametrize("transport", ["auto", "grpc"])
@pytest.mark.parametrize("dtype", [torch.int64, torch.bool, torch.complex64])
def test_non_float_gradients_through_the_client(
    daemon: Any, trained: Any, transport: str, dtype: torch.dtype
) -> None:
    """Refused whichever way they would travel (a copy into shared memory would make them floats)."""
    with Client(daemon.grpc_address, transport=transport) as c:
        grads = {**good_grads(), "b": torch.ones(3, dtype=dtype)}
        expect_unchanged(trained, lambda: c.push_grad(trained.name, grads), InvalidArgument)


def test_non_finite_gradient_rejected_whole(client: Client, trained: Any) -> None:
    for bad in (float("inf"), float("-inf"), float("nan")):
        grads = good_grads()
        grads["w"][1, 2] = bad
        expect_unchanged(
            trained, lambda grads=grads: client.push_grad(trained.name, grads), NonFiniteGradient
        )
    # large but finite values are fine (the fast check must not mistake an overflowing sum for inf)
    huge = {"w": torch.full((4, 3), 3e38), "b": torch.zeros(3)}
    assert client.push_grad(trained.name, huge).applied


def test_recreating_with_other_shapes(client: Client, trained: Any) -> None:
    expect_unchanged(
        trained,
        lambda: client.create_model(trained.name, {"w": torch.zeros(5, 5)}, exist_ok=True),
        AlreadyExists,
    )
    expect_unchanged(
        trained,
        lambda: client.create_model(trained.name, {n: torch.zeros(s) for n, s in SHAPES.items()}),
        AlreadyExists,
    )
    info = client.create_model(
        trained.name, {n: torch.zeros(s) for n, s in SHAPES.items()}, exist_ok=True
    )
    assert not info.created and info.version == trained.version


def test_invalid_hyperparameters(client: Client, trained: Any, model_name: str) -> None:
    expect_unchanged(
        trained,
        lambda: client.set_hyperparams(trained.name, lr=-1.0),
        InvalidArgument,
        "Invalid learning rate",
    )
    expect_unchanged(
        trained,
        lambda: client.set_hyperparams(trained.name, betas=(0.9, 1.5)),
        InvalidArgument,
        "beta",
    )
    expect_unchanged(
        trained,
        lambda: client.set_hyperparams(trained.name, group=3, lr=0.1),
        InvalidArgument,
        "group 3",
    )
    expect_unchanged(
        trained,
        lambda: client.set_hyperparams(trained.name, fused=False),
        InvalidArgument,
        "cannot change",
    )
    expect_unchanged(
        trained,
        lambda: client.set_hyperparams(trained.name, momentum=0.9),
        InvalidArgument,
        "unknown Adam options",
    )
    expect_unchanged(  # torch checks betas[0] and betas[1] only, then fails at the next step
        trained,
        lambda: client.set_hyperparams(trained.name, betas=(0.9, 0.99, 0.9)),
        InvalidArgument,
        "pair",
    )
    expect_unchanged(
        trained,
        lambda: client.set_hyperparams(trained.name, amsgrad=True),
        InvalidArgument,
        "amsgrad cannot be turned on",
    )
    expect_unchanged(  # rejected by the client before anything is sent
        trained, lambda: client.set_hyperparams(trained.name, lr="0.1"), InvalidArgument
    )
    assert client.push_grad(trained.name, good_grads()).applied  # and it still trains
    with pytest.raises(InvalidArgument, match="Invalid epsilon"):
        client.create_model(model_name + "-new", {"w": torch.zeros(2)}, eps=-1.0)
    with pytest.raises(InvalidArgument, match="differentiable"):
        client.create_model(model_name + "-new", {"w": torch.zeros(2)}, differentiable=True)
    with pytest.raises(InvalidArgument, match="capturable"):
        client.create_model(model_name + "-new", {"w": torch.zeros(2)}, capturable=True)
    with pytest.raises(NotFound):
        client.describe(model_name + "-new")


def test_a_step_that_raises_fails_its_round_and_the_model_trains_on(
    daemon: Any, client: Client, model_name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Inputs are checked before any step, but should torch's step raise all the same, the round
    must end: each of its pushes gets an error, the hyperparameters they carried are put back, and
    the same pushes succeed once stepping works (an open round would answer DuplicatePush forever)."""
    client.create_model(model_name, {"w": torch.zeros(4)}, world_size=2, lr=0.01)
    model = daemon.registry.get(model_name)
    before = snapshot(model)

    def broken_step(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("injected step failure")

    def push_both() -> list[Any]:
        results: list[Any] = [None, None]

        def push(rank: int) -> None:
            try:
                results[rank] = client.push_grad(
                    model_name,
                    {"w": torch.full((4,), rank + 1.0)},
                    version=0,
                    rank=rank,
                    hyper_updates=[(0, {"lr": 0.5})] if rank == 0 else (),
                )
            except AdamdError as exc:
                results[rank] = exc

        threads = [threading.Thread(target=push, args=(r,)) for r in (0, 1)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        return results

    monkeypatch.setattr(model.optimizer, "step", broken_step)
    for result in push_both():
        assert isinstance(result, AdamdError) and "injected step failure" in str(result)
    assert_bitwise_equal(before, snapshot(model))
    assert model.optimizer.param_groups[0]["lr"] == 0.01 and model.requested[0]["lr"] == 0.01
    monkeypatch.undo()
    results = push_both()
    assert all(r.applied and r.contributors == 2 and r.version == 1 for r in results), results
    assert model.optimizer.param_groups[0]["lr"] == 0.5


def test_bad_create_requests(client: Client, model_name: str) -> None:
    with pytest.raises(InvalidArgument, match="model name"):
        client.create_model("bad/name", {"w": torch.zeros(2)})
    with pytest.raises(InvalidArgument, match="at least one parameter"):
        client.create_model(model_name, {})
    with pytest.raises(InvalidArgument, match="unknown parameter"):
        client.create_model(
            model_name, {"w": torch.zeros(2)}, param_groups=[{"params": ["w", "v"]}]
        )
    with pytest.raises(InvalidArgument, match="more than one param group"):
        client.create_model(
            model_name, {"w": torch.zeros(2)}, param_groups=[{"params": ["w"]}, {"params": ["w"]}]
        )
    with pytest.raises(InvalidArgument, match="world_size"):
        client.create_model(model_name, {"w": torch.zeros(2)}, world_size=0)
    with pytest.raises(NotFound):
        client.describe(model_name)


def test_rank_outside_world(client: Client, trained: Any) -> None:
    expect_unchanged(
        trained,
        lambda: client.push_grad(trained.name, good_grads(), rank=1),
        InvalidArgument,
        "rank 1",
    )


def test_duplicate_rank_in_a_round(daemon: Any, client: Client, model_name: str) -> None:
    client.create_model(model_name, {"w": torch.zeros(3)}, world_size=2, round_timeout_s=30)
    model = daemon.registry.get(model_name)
    done = threading.Event()
    results: list[Any] = []

    def rank0() -> None:
        results.append(client.push_grad(model_name, {"w": torch.ones(3)}, rank=0, version=0))
        done.set()

    t = threading.Thread(target=rank0)
    t.start()
    while model.rounds.open_ranks() is None:  # rank 0 is parked in the round
        threading.Event().wait(0.01)
    expect_unchanged(
        model,
        lambda: client.push_grad(model_name, {"w": torch.ones(3)}, rank=0, version=0),
        DuplicatePush,
    )
    client.push_grad(model_name, {"w": torch.ones(3)}, rank=1, version=0)
    t.join(10)
    assert done.is_set() and results[0].contributors == 2 and model.version == 1


def test_bad_state_load(client: Client, trained: Any) -> None:
    state = client.get_state(trained.name)
    state["state"]["w"]["exp_avg"] = torch.zeros(2, 2)
    expect_unchanged(
        trained, lambda: client.load_state(trained.name, state["state"]), InvalidArgument, "shape"
    )
    for lacking in ("step", "exp_avg", "exp_avg_sq"):
        state = client.get_state(trained.name)
        del state["state"]["w"][lacking]
        expect_unchanged(
            trained,
            lambda state=state: client.load_state(trained.name, state["state"]),
            InvalidArgument,
            f"lacks \\['{lacking}'\\]",
        )
    state = client.get_state(trained.name)
    state["state"]["b"]["exp_avg"] = state["state"]["b"]["exp_avg"].long()
    expect_unchanged(
        trained, lambda: client.load_state(trained.name, state["state"]), InvalidArgument, "dtype"
    )
    state = client.get_state(trained.name)
    state["state"]["ghost"] = state["state"].pop("w")
    expect_unchanged(
        trained,
        lambda: client.load_state(trained.name, state["state"]),
        InvalidArgument,
        "unknown parameter",
    )


def test_bad_add_param_group(client: Client, trained: Any) -> None:
    expect_unchanged(
        trained,
        lambda: client.add_param_group(trained.name, {"w": torch.zeros(4, 3)}),
        InvalidArgument,
        "exist",
    )
    expect_unchanged(
        trained,
        lambda: client.add_param_group(trained.name, {"v": torch.zeros(2)}, lr=-1.0),
        InvalidArgument,
    )
    assert "v" not in trained.params


def test_remote_adam_shape_clash_with_existing_model(daemon: Any, trained: Any) -> None:
    p = torch.nn.Parameter(torch.zeros(7))
    expect_unchanged(
        trained,
        lambda: RemoteAdam([p], server=daemon.grpc_address, model=trained.name),
        ValueError,
        "not the same model",
    )


# --- raw frames: what a broken or hostile client can send -------------------------------------


def test_empty_stream_and_missing_header(daemon: Any, trained: Any) -> None:
    expect_unchanged(trained, lambda: raw_push(daemon, []), InvalidArgument, "empty stream")
    expect_unchanged(
        trained,
        lambda: raw_push(daemon, [encode_frame(None, 0, 0, f32(3))]),
        InvalidArgument,
        "header",
    )
    expect_unchanged(trained, lambda: raw_push(daemon, [b"\xff\xff\xff"]), InvalidArgument)


def test_missing_chunks(daemon: Any, trained: Any) -> None:
    h = header(trained.name, {"w": ((4, 3), pb.FLOAT32), "b": ((3,), pb.FLOAT32)})
    only_w = [encode_frame(h, 0, 0, f32(4, 3))]
    expect_unchanged(trained, lambda: raw_push(daemon, only_w), InvalidArgument, "ended early")
    half_w = [encode_frame(h, 0, 0, f32(6))]
    expect_unchanged(trained, lambda: raw_push(daemon, half_w), InvalidArgument, "ended early")


def test_extra_repeated_and_misplaced_chunks(daemon: Any, trained: Any) -> None:
    h = header(trained.name, {"b": ((3,), pb.FLOAT32)})
    cases = {
        "more bytes": [encode_frame(h, 0, 0, f32(4))],
        "expected byte": [
            encode_frame(h, 0, 0, f32(2)),
            encode_frame(None, 0, 0, f32(1)),
        ],  # repeated offset
        "declared 1": [
            encode_frame(h, 0, 0, f32(3)),
            encode_frame(None, 1, 0, f32(1)),
        ],  # unknown tensor
        "whole number": [encode_frame(h, 0, 0, b"\0" * 5)],
        # a header on a middle frame (the last may carry a closing one: RemoteAdam's overlap)
        "the stream's last frame": [
            encode_frame(h, 0, 0, f32(1)),
            encode_frame(h, 0, 4, f32(1)),
            encode_frame(None, 0, 8, f32(1)),
        ],
    }
    for match, frames in cases.items():
        expect_unchanged(
            trained, lambda frames=frames: raw_push(daemon, frames), InvalidArgument, match
        )


def test_stream_cut_off_midway(daemon: Any, trained: Any) -> None:
    """A push whose connection dies half-way through changes nothing, and the next push works."""
    h = header(trained.name, {"w": ((4, 3), pb.FLOAT32), "b": ((3,), pb.FLOAT32)}, push_id="cut-1")
    sent_half = threading.Event()
    hold = threading.Event()

    def frames() -> Iterator[bytes]:
        yield encode_frame(h, 0, 0, f32(4, 3))
        sent_half.set()
        hold.wait(10)  # never sends "b"

    before = snapshot(trained)
    with grpc.insecure_channel(daemon.grpc_address) as ch:
        call = ch.stream_unary("/adamd.v1.Optimizer/PushGrad", identity, pb.PushReply.FromString)
        future = call.future(frames())
        assert sent_half.wait(10)
        threading.Event().wait(0.2)
        future.cancel()
        hold.set()
        with pytest.raises(grpc.FutureCancelledError):
            future.result()
    threading.Event().wait(0.3)  # the server notices the cancellation
    assert_bitwise_equal(before, snapshot(trained))
    # the same push id may now be sent again in full, and applies once
    whole = [encode_frame(h, 0, 0, f32(4, 3)), encode_frame(None, 1, 0, f32(3))]
    assert raw_push(daemon, whole).version == trained.version == 3


def test_token_required_except_health(model_name: str) -> None:
    with running_daemon(token="s3cret", http_port=-1) as d:
        for c in (Client(d.grpc_address), Client(d.grpc_address, token="wrong")):
            with c, pytest.raises(Unauthenticated) as info:
                c.create_model(model_name, {"w": torch.zeros(2)})
            assert info.value.code == grpc.StatusCode.UNAUTHENTICATED
        assert d.registry.names() == []
        with grpc.insecure_channel(d.grpc_address) as ch:
            reply = health_pb2_grpc.HealthStub(ch).Check(
                health_pb2.HealthCheckRequest(service="adamd.v1.Optimizer")
            )
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        with Client(d.grpc_address, token="s3cret") as c:
            c.create_model(model_name, {"w": torch.zeros(2)})
            assert c.push_grad(model_name, {"w": torch.ones(2)}).version == 1


# --- hardening: each of these answered INTERNAL, hung or was accepted before --------

METHOD = "/adamd.v1.Optimizer/"


def raw_call(daemon: Any, kind: str, method: str, request: Any, timeout: float = 10) -> Any:
    """A raw call of any shape ('unary', 'stream_in', 'stream_out'), errors as the client maps
    them. `request` is bytes (unary, stream_out) or a list of frames (stream_in)."""
    with grpc.insecure_channel(daemon.grpc_address) as ch:
        try:
            if kind == "unary":
                return ch.unary_unary(METHOD + method, identity, identity)(request, timeout=timeout)
            if kind == "stream_in":
                call = ch.stream_unary(METHOD + method, identity, identity)
                return call(iter(request), timeout=timeout)
            return list(
                ch.unary_stream(METHOD + method, identity, identity)(request, timeout=timeout)
            )
        except grpc.RpcError as err:
            raise from_rpc_error(err) from None


def create_frames(name: str, specs: dict[str, tuple[list[int], int]], **kw: Any) -> list[bytes]:
    cfg = pb.ModelConfig(
        model=name,
        params=[pb.TensorSpec(name=n, shape=s, dtype=d) for n, (s, d) in specs.items()],
        **kw,
    )
    return [encode_frame(cfg.SerializeToString())]


@pytest.mark.parametrize("timeout_s", [float("nan"), float("inf"), float("-inf"), -1.0])
def test_pull_wait_timeout_must_be_finite(daemon: Any, trained: Any, timeout_s: float) -> None:
    """NaN waited forever on a busy core; inf answered INTERNAL (OverflowError)."""
    req = pb.PullRequest(model=trained.name, wait_for_version=10**6, wait_timeout_s=timeout_s)
    expect_unchanged(
        trained,
        lambda: raw_call(daemon, "stream_out", "PullParams", req.SerializeToString(), 5),
        InvalidArgument,
        "wait_timeout_s",
    )


def test_unknown_wire_dtype(daemon: Any, trained: Any) -> None:
    req = pb.PullRequest(model=trained.name, wire_dtype=99)  # type: ignore[arg-type]
    expect_unchanged(
        trained,
        lambda: raw_call(daemon, "stream_out", "PullParams", req.SerializeToString()),
        InvalidArgument,
        "wire_dtype",
    )


@pytest.mark.parametrize(
    "kind, method",
    [
        ("unary", "DescribeModel"),
        ("unary", "SetHyperparams"),
        ("unary", "DeleteModel"),
        ("unary", "Attach"),
        ("stream_out", "PullParams"),
        ("stream_out", "GetState"),
    ],
)
def test_request_bytes_that_are_not_the_message(
    daemon: Any, trained: Any, kind: str, method: str
) -> None:
    """Answered INTERNAL ('Exception deserializing request!') before."""
    expect_unchanged(
        trained,
        lambda: raw_call(daemon, kind, method, b"\xff\xff\xff\xff"),
        InvalidArgument,
        "not a valid adamd.v1",
    )


@pytest.mark.parametrize(
    "shape, error",
    [([1 << 40], LimitExceeded), ([1 << 32, 1 << 32], LimitExceeded), ([2] * 40, InvalidArgument)],
)
def test_declared_shapes_refused_before_allocation(
    daemon: Any, client: Client, trained: Any, model_name: str, shape: list[int], error: type
) -> None:
    """CreateModel / AddParamGroup with huge shapes answered INTERNAL (can't allocate memory)."""
    frames = create_frames(model_name + "-big", {"w": (shape, pb.FLOAT32)})
    with pytest.raises(error):
        raw_call(daemon, "stream_in", "CreateModel", frames)
    assert model_name + "-big" not in daemon.registry.names()
    group = pb.GroupHeader(
        model=trained.name,
        params=[pb.TensorSpec(name="v", shape=shape, dtype=pb.FLOAT32)],
        group=pb.ParamGroup(params=["v"]),
    )
    expect_unchanged(
        trained,
        lambda: raw_call(
            daemon, "stream_in", "AddParamGroup", [encode_frame(group.SerializeToString())]
        ),
        error,
    )


@pytest.mark.parametrize("shape", [[1 << 40], [1 << 32, 1 << 32], [4, 3, 1], [-1]])
def test_load_state_shapes_checked_against_the_model_first(
    daemon: Any, trained: Any, shape: list[int]
) -> None:
    h = pb.StateHeader(
        model=trained.name,
        tensors=[pb.TensorSpec(name="w/exp_avg", shape=shape, dtype=pb.FLOAT32)],
        states=[pb.ParamState(param="w", tensors={"exp_avg": 0})],
    )
    expect_unchanged(
        trained,
        lambda: raw_call(daemon, "stream_in", "LoadState", [encode_frame(h.SerializeToString())]),
        InvalidArgument,
        "shape|negative",
    )


def test_model_bytes_limit(model_name: str) -> None:
    with running_daemon(max_model_bytes=1000, http_port=-1) as d, Client(d.grpc_address) as c:
        with pytest.raises(LimitExceeded, match="max-model-bytes"):
            c.create_model(model_name, {"w": torch.zeros(251)})
        c.create_model(model_name, {"w": torch.zeros(200)})
        m = d.registry.get(model_name)
        expect_unchanged(
            m,
            lambda: c.add_param_group(model_name, {"v": torch.zeros(51)}),
            LimitExceeded,
            "max-model-bytes",
        )
        c.add_param_group(model_name, {"v": torch.zeros(50)})


def test_tensor_count_and_name_limits(model_name: str) -> None:
    with (
        running_daemon(max_tensors=3, max_name_bytes=8, http_port=-1) as d,
        Client(d.grpc_address) as c,
    ):
        with pytest.raises(LimitExceeded, match="max-tensors"):
            c.create_model(model_name, {f"p{i}": torch.zeros(1) for i in range(4)})
        with pytest.raises(LimitExceeded, match="max-name-bytes"):
            c.create_model(model_name, {"n" * 9: torch.zeros(1)})
        assert d.registry.names() == []


@pytest.mark.parametrize(
    "tensor",
    [
        pb.ScalarTensor(value=0.1, shape=[1 << 26], dtype=pb.FLOAT32),  # filled 256 MiB before
        pb.ScalarTensor(value=0.1, shape=[1 << 40], dtype=pb.FLOAT32),  # INTERNAL before
        pb.ScalarTensor(value=0.1, shape=[-1], dtype=pb.FLOAT32),  # INTERNAL before
        pb.ScalarTensor(value=0.1, shape=[1] * 9, dtype=pb.FLOAT32),
    ],
    ids=["1<<26", "1<<40", "-1", "9dims"],
)
def test_tensor_hyperparameter_shape_checked_before_it_is_built(
    daemon: Any, trained: Any, model_name: str, tensor: pb.ScalarTensor
) -> None:
    lr = pb.HyperValue(tensor=tensor)
    req = pb.SetHyperparamsRequest(
        model=trained.name, updates=[pb.GroupUpdate(group=0, options={"lr": lr})]
    )
    expect_unchanged(
        trained,
        lambda: raw_call(daemon, "unary", "SetHyperparams", req.SerializeToString()),
        InvalidArgument,
        "one element",
    )
    push = header(
        trained.name,
        {"b": ((3,), pb.FLOAT32)},
        hyper_updates=[pb.GroupUpdate(group=0, options={"lr": lr})],
    )
    expect_unchanged(
        trained,
        lambda: raw_push(daemon, [encode_frame(push, 0, 0, f32(3))]),
        InvalidArgument,
        "one element",
    )
    frames = create_frames(
        model_name,
        {"w": ([2], pb.FLOAT32)},
        groups=[pb.ParamGroup(params=["w"], options={"lr": lr})],
    )
    with pytest.raises(InvalidArgument, match="one element"):
        raw_call(daemon, "stream_in", "CreateModel", frames)


NON_FINITE = [float("inf"), float("-inf"), float("nan")]


@pytest.mark.parametrize("bad", NON_FINITE, ids=["inf", "-inf", "nan"])
@pytest.mark.parametrize("key", ["lr", "eps", "weight_decay", "beta1", "beta2", "tensor_lr"])
def test_non_finite_hyperparameters_refused(
    client: Client, trained: Any, model_name: str, key: str, bad: float
) -> None:
    """inf lr made every parameter -inf one push later (torch takes it; a shared server must not)."""
    value: Any = {
        "beta1": ("betas", (bad, 0.999)),
        "beta2": ("betas", (0.9, bad)),
        "tensor_lr": ("lr", torch.tensor(bad)),
    }.get(key, (key, bad))
    option = {value[0]: value[1]}
    expect_unchanged(
        trained, lambda: client.set_hyperparams(trained.name, **option), InvalidArgument, "finite"
    )
    expect_unchanged(
        trained,
        lambda: client.push_grad(trained.name, good_grads(), hyper_updates=[(0, option)]),
        InvalidArgument,
        "finite",
    )
    with pytest.raises(InvalidArgument, match="finite"):
        client.create_model(model_name + "-new", {"w": torch.zeros(2)}, **option)
    assert model_name + "-new" not in [m.name for m in client.list_models()]


@pytest.mark.parametrize("key", ["exp_avg", "exp_avg_sq", "step"])
@pytest.mark.parametrize("bad", NON_FINITE, ids=["inf", "-inf", "nan"])
def test_load_state_with_non_finite_values_refused(
    client: Client, trained: Any, key: str, bad: float
) -> None:
    state = client.get_state(trained.name)
    state["state"]["w"][key].view(-1)[0] = bad
    expect_unchanged(
        trained,
        lambda: client.load_state(trained.name, state["state"]),
        InvalidArgument,
        "inf or nan",
    )


def test_push_id_length_limit(client: Client, trained: Any) -> None:
    """A 4 MiB push id was remembered and written into every snapshot manifest."""
    expect_unchanged(
        trained,
        lambda: client.push_grad(trained.name, good_grads(), push_id="x" * (4 << 20)),
        LimitExceeded,
        "push_id",
    )
    expect_unchanged(
        trained,
        lambda: client.push_grad(trained.name, good_grads(), push_id="x" * 257),
        LimitExceeded,
        "max-push-id-bytes",
    )
    assert not any(len(k) > 256 for k in trained.recent_push_results())
    assert client.push_grad(trained.name, good_grads(), push_id="x" * 256).applied


@pytest.mark.parametrize("token", ["ab\ncd", "ab cd", "ab\tcd", "tök"])
def test_token_file_that_no_client_can_send(tmp_path: Any, token: str) -> None:
    """Started a server nobody could call; now refused at start, exit 2, like an empty file."""
    from adamd.server.cli.main import main

    f = tmp_path / "token"
    f.write_text(token + "\n")
    argv = ["serve", "--grpc-port", "0", "--http-port", "-1", "--data-dir", str(tmp_path)]
    assert main([*argv, "--token-file", str(f)]) == 2


def test_pull_frames_fit_stock_clients_default_limit(
    daemon: Any, client: Client, model_name: str
) -> None:
    """4 MiB chunks plus framing were just over the 4 MiB default receive limit of stock gRPC
    clients: a default channel got RESOURCE_EXHAUSTED on the first frame of any tensor >= 4 MiB.
    A header too big to share the first frame with a chunk now travels alone."""
    params = {"big": torch.randn(3 << 20)}  # 12 MiB
    params.update({f"layer{i:05d}." + "n" * 40: torch.zeros(1) for i in range(1500)})
    client.create_model(model_name, params)
    client.push_grad(model_name, {"big": torch.ones(3 << 20)})  # state to fetch, 24 MiB
    with grpc.insecure_channel(daemon.grpc_address) as ch:  # stock options: 4 MiB receive limit
        for method, req in (
            ("PullParams", pb.PullRequest(model=model_name)),
            ("GetState", pb.GetStateRequest(model=model_name)),
        ):
            frames = list(
                ch.unary_stream(METHOD + method, identity, identity)(
                    req.SerializeToString(), timeout=30
                )
            )
            assert max(len(f) for f in frames) < 4 << 20
    pulled = client.pull_params(model_name)
    assert torch.equal(pulled["big"], daemon.registry.get(model_name).params["big"])
