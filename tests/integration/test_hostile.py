"""Hostile input, generated in families: every case gets one specific documented status (never
INTERNAL, 5xx or a hang), and leaves the target model's parameters, optimizer state and version
bitwise unchanged, and the set of models as it was.

Families: each field of each request x {huge, negative, NaN, inf, empty, wrong type, too long};
frame-level mutations of a valid push; request bytes that are not the message; HTTP bodies,
paths and query strings. The expected statuses are the ones docs/security.md documents:
INVALID_ARGUMENT / 400 for malformed or unusable input, RESOURCE_EXHAUSTED / 413 for input over a
limit, NOT_FOUND / 404, ALREADY_EXISTS / 409, FAILED_PRECONDITION / 409, DEADLINE_EXCEEDED.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import grpc
import httpx
import pytest
import torch

from adamd.client import Client
from adamd.protocol.frames import encode_frame, identity
from adamd.v1 import adamd_pb2 as pb

from ..conftest import assert_bitwise_equal, snapshot

MODEL = "hostile-target"
SHAPES = {"w": (4, 3), "b": (3,)}
METHOD = "/adamd.v1.Optimizer/"
S = grpc.StatusCode
INF, NAN = float("inf"), float("nan")


@dataclass(frozen=True)
class Case:
    id: str
    send: Callable[[Any], Any]  # (Target) -> grpc.StatusCode or HTTP status
    expect: Any


@dataclass
class Target:
    daemon: Any
    channel: grpc.Channel
    http: httpx.Client | None

    def code(self, *, kind: str, method: str, request: Any) -> grpc.StatusCode:
        try:
            if kind == "unary":
                self.channel.unary_unary(METHOD + method, identity, identity)(request, timeout=10)
            elif kind == "stream_in":
                call = self.channel.stream_unary(METHOD + method, identity, identity)
                call(iter(request), timeout=10)
            else:
                call = self.channel.unary_stream(METHOD + method, identity, identity)
                list(call(request, timeout=10))
        except grpc.RpcError as err:
            return err.code()  # type: ignore[no-any-return]
        return S.OK


@pytest.fixture(scope="module")
def target(daemon: Any) -> Iterator[Target]:
    torch.manual_seed(0)
    with Client(daemon.grpc_address) as c:
        c.create_model(MODEL, {n: torch.randn(s) for n, s in SHAPES.items()}, lr=0.01)
        for _ in range(2):
            c.push_grad(MODEL, {n: torch.randn(s) for n, s in SHAPES.items()})
    with (
        grpc.insecure_channel(daemon.grpc_address) as ch,
        httpx.Client(base_url=daemon.http_url, timeout=10) as http,
    ):
        yield Target(daemon, ch, http)
    daemon.registry.delete(MODEL)


def rpc(kind: str, method: str, request: Any) -> Callable[[Target], grpc.StatusCode]:
    return functools.partial(Target.code, kind=kind, method=method, request=request)


def http(method: str, path: str, body: str | None) -> Callable[[Target], int]:
    def send(t: Target) -> int:
        assert t.http is not None
        headers = {"content-type": "application/json"} if body is not None else {}
        return t.http.request(method, path, content=body, headers=headers).status_code

    return send


# --- builders ------------------------------------------------------------------------------------


def f32(n: int) -> bytes:
    return torch.ones(n).numpy().tobytes()


def spec(name: str, shape: list[int], dtype: int = pb.FLOAT32) -> pb.TensorSpec:
    return pb.TensorSpec(name=name, shape=shape, dtype=dtype)


def push_frames(header: pb.PushHeader, chunks: list[tuple[int, int, bytes]]) -> list[bytes]:
    h = header.SerializeToString()
    if not chunks:
        return [encode_frame(h)]
    return [encode_frame(h if i == 0 else None, t, o, d) for i, (t, o, d) in enumerate(chunks)]


def good_push_header(**kw: Any) -> pb.PushHeader:
    fields: dict[str, Any] = {"model": MODEL, "grads": [spec("b", [3])]}
    fields.update(kw)
    return pb.PushHeader(**fields)


def hv(value: Any) -> pb.HyperValue:
    if isinstance(value, pb.HyperValue):
        return value
    if isinstance(value, bool):
        return pb.HyperValue(flag=value)
    if value is None:
        return pb.HyperValue(none=True)
    if isinstance(value, (tuple, list)):
        return pb.HyperValue(list=pb.HyperList(items=[hv(v) for v in value]))
    return pb.HyperValue(number=float(value))


# --- families ------------------------------------------------------------------------------------

# Values no Adam option may take, and what torch (or adamd) says. Each is refused whole.
BAD_OPTION_VALUES: dict[str, list[tuple[str, Any]]] = {
    "lr": [
        ("negative", -1.0),
        ("nan", NAN),
        ("inf", INF),
        ("-inf", -INF),
        ("none", None),
        ("list", [0.1, 0.2]),
        ("empty-list", []),
    ],
    "eps": [("negative", -1.0), ("nan", NAN), ("inf", INF), ("none", None), ("list", [1e-8])],
    "weight_decay": [("negative", -1.0), ("nan", NAN), ("inf", INF), ("none", None)],
    "betas": [
        ("beta1-huge", (1e300, 0.999)),
        ("beta1-negative", (-0.1, 0.999)),
        ("beta2-one", (0.9, 1.0)),
        ("beta1-nan", (NAN, 0.999)),
        ("beta2-inf", (0.9, INF)),
        ("empty", []),
        ("one", [0.9]),
        ("three", [0.9, 0.99, 0.9]),
        ("number", 0.9),
        ("none", None),
    ],
    "amsgrad-on-after-steps": [("true", True)],
    "fused": [("changed", False)],
    "momentum": [("unknown-key", 0.9)],
    "": [("empty-key", 0.1)],
    "tensor-lr": [
        (
            "shape-1<<26",
            pb.HyperValue(tensor=pb.ScalarTensor(value=0.1, shape=[1 << 26], dtype=pb.FLOAT32)),
        ),
        (
            "shape-1<<40",
            pb.HyperValue(tensor=pb.ScalarTensor(value=0.1, shape=[1 << 40], dtype=pb.FLOAT32)),
        ),
        (
            "shape-neg",
            pb.HyperValue(tensor=pb.ScalarTensor(value=0.1, shape=[-1], dtype=pb.FLOAT32)),
        ),
        ("shape-0", pb.HyperValue(tensor=pb.ScalarTensor(value=0.1, shape=[0], dtype=pb.FLOAT32))),
        ("dtype-0", pb.HyperValue(tensor=pb.ScalarTensor(value=0.1, shape=[], dtype=0))),
        ("dtype-99", pb.HyperValue(tensor=pb.ScalarTensor(value=0.1, shape=[], dtype=99))),  # type: ignore[arg-type]
        ("value-inf", pb.HyperValue(tensor=pb.ScalarTensor(value=INF, shape=[], dtype=pb.FLOAT32))),
        (
            "value-nan",
            pb.HyperValue(tensor=pb.ScalarTensor(value=NAN, shape=[1], dtype=pb.FLOAT32)),
        ),
    ],
}


def _option(key: str, value: Any) -> dict[str, pb.HyperValue]:
    name = {"amsgrad-on-after-steps": "amsgrad", "tensor-lr": "lr"}.get(key, key)
    return {name: hv(value)}


def hyper_cases() -> Iterator[Case]:
    """Every bad option value through SetHyperparams, a push's hyper_updates, and CreateModel."""
    for key, values in BAD_OPTION_VALUES.items():
        for label, value in values:
            opts = _option(key, value)
            upd = [pb.GroupUpdate(group=0, options=opts)]
            req = pb.SetHyperparamsRequest(model=MODEL, updates=upd).SerializeToString()
            yield Case(
                f"set-{key}-{label}",
                rpc("unary", "SetHyperparams", req),
                S.INVALID_ARGUMENT,
            )
            frames = push_frames(good_push_header(hyper_updates=upd), [(0, 0, f32(3))])
            yield Case(
                f"push-hyper-{key}-{label}",
                rpc("stream_in", "PushGrad", frames),
                S.INVALID_ARGUMENT,
            )
            if key in ("amsgrad-on-after-steps", "fused"):
                continue  # valid for a new model
            cfg = pb.ModelConfig(
                model="hostile-new",
                params=[spec("w", [2])],
                groups=[pb.ParamGroup(params=["w"], options=opts)],
            )
            frames = [encode_frame(cfg.SerializeToString(), 0, 0, f32(2))]
            yield Case(
                f"create-{key}-{label}",
                rpc("stream_in", "CreateModel", frames),
                S.INVALID_ARGUMENT,
            )
    for group in (1, 2**31 - 1, 2**32 - 1):
        upd = [pb.GroupUpdate(group=group, options={"lr": hv(0.1)})]
        req = pb.SetHyperparamsRequest(model=MODEL, updates=upd).SerializeToString()
        yield Case(
            f"set-group-{group}",
            rpc("unary", "SetHyperparams", req),
            S.INVALID_ARGUMENT,
        )


# Tensor declarations no request may make: (label, spec, status).
BAD_SPECS: list[tuple[str, pb.TensorSpec, grpc.StatusCode]] = [
    ("dim-huge", spec("b", [1 << 40]), S.RESOURCE_EXHAUSTED),
    ("dims-overflow", spec("b", [1 << 32, 1 << 32]), S.RESOURCE_EXHAUSTED),
    ("dim-max-u64", spec("b", [2**63 - 1]), S.RESOURCE_EXHAUSTED),
    ("dim-negative", spec("b", [-1]), S.INVALID_ARGUMENT),
    ("dims-40", spec("b", [1] * 40), S.INVALID_ARGUMENT),
    ("dtype-unspecified", spec("b", [3], 0), S.INVALID_ARGUMENT),
    ("dtype-99", spec("b", [3], 99), S.INVALID_ARGUMENT),
    ("dtype-negative", spec("b", [3], -7), S.INVALID_ARGUMENT),
    ("name-too-long", spec("b" * 5000, [3]), S.RESOURCE_EXHAUSTED),
]


def spec_cases() -> Iterator[Case]:
    """Each bad declaration in a push, a create, a new param group and a state load."""
    for label, s, code in BAD_SPECS:
        frames = push_frames(good_push_header(grads=[s]), [])
        yield Case(f"push-spec-{label}", rpc("stream_in", "PushGrad", frames), code)
        cfg = pb.ModelConfig(model="hostile-new", params=[s])
        frames = [encode_frame(cfg.SerializeToString())]
        yield Case(f"create-spec-{label}", rpc("stream_in", "CreateModel", frames), code)
        new = (
            pb.TensorSpec(name="v", shape=s.shape, dtype=s.dtype) if label != "name-too-long" else s
        )
        g = pb.GroupHeader(model=MODEL, params=[new], group=pb.ParamGroup(params=[new.name]))
        frames = [encode_frame(g.SerializeToString())]
        yield Case(f"group-spec-{label}", rpc("stream_in", "AddParamGroup", frames), code)
        st = pb.StateHeader(
            model=MODEL, tensors=[s], states=[pb.ParamState(param="b", tensors={"exp_avg": 0})]
        )
        frames = [encode_frame(st.SerializeToString())]
        yield Case(
            f"load-spec-{label}",
            rpc("stream_in", "LoadState", frames),
            S.INVALID_ARGUMENT,
        )


def push_field_cases() -> Iterator[Case]:
    b = [(0, 0, f32(3))]
    cases: list[tuple[str, pb.PushHeader, list[tuple[int, int, bytes]], grpc.StatusCode]] = [
        ("rank-huge", good_push_header(rank=2**32 - 1), b, S.INVALID_ARGUMENT),
        ("rank-1", good_push_header(rank=1), b, S.INVALID_ARGUMENT),
        ("version-future", good_push_header(version=2**63), b, S.FAILED_PRECONDITION),
        ("push-id-long", good_push_header(push_id="x" * 4096), b, S.RESOURCE_EXHAUSTED),
        ("push-id-4MiB", good_push_header(push_id="x" * (2 << 20)), b, S.RESOURCE_EXHAUSTED),
        ("model-empty", good_push_header(model=""), b, S.NOT_FOUND),
        ("model-unknown", good_push_header(model="no-such"), b, S.NOT_FOUND),
        ("model-long", good_push_header(model="m" * 100_000), b, S.NOT_FOUND),
        ("grad-unknown", good_push_header(grads=[spec("zzz", [3])]), b, S.INVALID_ARGUMENT),
        ("grad-empty-name", good_push_header(grads=[spec("", [3])]), b, S.INVALID_ARGUMENT),
        (
            "grad-dup",
            good_push_header(grads=[spec("b", [3]), spec("b", [3])]),
            [*b, (1, 0, f32(3))],
            S.INVALID_ARGUMENT,
        ),
        (
            "grad-shape",
            good_push_header(grads=[spec("b", [4])]),
            [(0, 0, f32(4))],
            S.INVALID_ARGUMENT,
        ),
        (
            "grad-shape-empty",
            good_push_header(grads=[spec("b", [])]),
            [(0, 0, f32(1))],
            S.INVALID_ARGUMENT,
        ),
        (
            "grad-many",
            good_push_header(grads=[spec(f"g{i}", [1]) for i in range(70_000)]),
            [],
            S.RESOURCE_EXHAUSTED,
        ),
        (
            "grad-nan",
            good_push_header(),
            [(0, 0, torch.tensor([NAN, 0, 0]).numpy().tobytes())],
            S.INVALID_ARGUMENT,
        ),
        (
            "grad-inf",
            good_push_header(),
            [(0, 0, torch.tensor([0, INF, 0]).numpy().tobytes())],
            S.INVALID_ARGUMENT,
        ),
        (
            "grad-neg-inf",
            good_push_header(),
            [(0, 0, torch.tensor([0, 0, -INF]).numpy().tobytes())],
            S.INVALID_ARGUMENT,
        ),
        ("session-unknown", good_push_header(session="no-such-session"), [], S.FAILED_PRECONDITION),
        (
            "hyper-group-99",
            good_push_header(hyper_updates=[pb.GroupUpdate(group=99, options={"lr": hv(0.1)})]),
            b,
            S.INVALID_ARGUMENT,
        ),
    ]
    for label, h, chunks, code in cases:
        frames = push_frames(h, chunks)
        yield Case(f"push-{label}", rpc("stream_in", "PushGrad", frames), code)


def frame_cases() -> Iterator[Case]:
    """Mutations of a valid one-chunk push of "b" at the frame level."""
    h = good_push_header().SerializeToString()
    good = encode_frame(h, 0, 0, f32(3))
    raw: dict[str, list[bytes]] = {
        "empty-stream": [],
        "no-header": [encode_frame(None, 0, 0, f32(3))],
        "garbage": [b"\xff\xff\xff"],
        "varint-11-bytes": [b"\x10" + b"\xff" * 11],
        "wire-type-3": [b"\x0b"],
        "wire-type-4": [b"\x0c"],
        "wire-type-6": [b"\x0e"],
        "wire-type-7": [b"\x0f"],
        "length-past-end": [b"\x0a\x7f" + h[:10]],
        "length-huge": [b"\x22\xff\xff\xff\xff\x0f"],
        "truncated": [good[: len(good) // 2]],
        "header-not-a-header": [encode_frame(b"\xff\xff\xff", 0, 0, f32(3))],
        # a push's last frame may carry a closing header (RemoteAdam's overlap); no other may
        "header-twice": [
            encode_frame(h, 0, 0, f32(1)),
            encode_frame(h, 0, 4, f32(1)),
            encode_frame(None, 0, 8, f32(1)),
        ],
        "tensor-past-end": [encode_frame(h, 0, 0, f32(3)), encode_frame(None, 1, 0, f32(1))],
        "tensor-huge-index": [encode_frame(h, 2**32 - 1, 0, f32(3))],
        "offset-gap": [encode_frame(h, 0, 4, f32(2))],
        "offset-huge": [encode_frame(h, 0, 2**63, f32(1))],
        "offset-repeat": [encode_frame(h, 0, 0, f32(2)), encode_frame(None, 0, 0, f32(1))],
        "overlap": [encode_frame(h, 0, 0, f32(2)), encode_frame(None, 0, 4, f32(2))],
        "too-many-bytes": [encode_frame(h, 0, 0, f32(4))],
        "half-element": [encode_frame(h, 0, 0, b"\0" * 5)],
        "odd-byte": [encode_frame(h, 0, 0, b"\0")],
        "missing-chunk": [encode_frame(h)],
        "short": [encode_frame(h, 0, 0, f32(2))],
        "fixed64-cut": [good + b"\x09\x00"],
        "fixed32-cut": [good + b"\x0d\x00"],
    }
    for label, frames in raw.items():
        yield Case(
            f"frame-{label}",
            rpc("stream_in", "PushGrad", frames),
            S.INVALID_ARGUMENT,
        )
    for method in ("CreateModel", "LoadState", "AddParamGroup"):
        for label in (
            "empty-stream",
            "no-header",
            "garbage",
            "header-not-a-header",
            "varint-11-bytes",
        ):
            frames = raw[label]
            yield Case(
                f"frame-{method}-{label}",
                rpc("stream_in", method, frames),
                S.INVALID_ARGUMENT,
            )


GARBAGE = {"ff": b"\xff\xff\xff\xff", "truncated-string": b"\x0a\x10abc", "wire-type-7": b"\x0f"}


def unary_cases() -> Iterator[Case]:
    methods = [
        ("unary", m)
        for m in (
            "DescribeModel",
            "SetHyperparams",
            "DeleteModel",
            "Snapshot",
            "Attach",
            "Detach",
            "ListModels",
        )
    ]
    methods += [("stream_out", m) for m in ("PullParams", "GetState")]
    for kind, method in methods:
        for label, raw in GARBAGE.items():
            yield Case(
                f"bytes-{method}-{label}",
                rpc(kind, method, raw),
                S.INVALID_ARGUMENT,
            )


def pull_cases() -> Iterator[Case]:
    reqs: list[tuple[str, pb.PullRequest, grpc.StatusCode]] = [
        (
            "wait-nan",
            pb.PullRequest(model=MODEL, wait_for_version=10**6, wait_timeout_s=NAN),
            S.INVALID_ARGUMENT,
        ),
        (
            "wait-inf",
            pb.PullRequest(model=MODEL, wait_for_version=10**6, wait_timeout_s=INF),
            S.INVALID_ARGUMENT,
        ),
        (
            "wait-negative",
            pb.PullRequest(model=MODEL, wait_for_version=10**6, wait_timeout_s=-1),
            S.INVALID_ARGUMENT,
        ),
        (
            "wait-short",
            pb.PullRequest(model=MODEL, wait_for_version=2**63, wait_timeout_s=0.05),
            S.DEADLINE_EXCEEDED,
        ),
        ("wire-99", pb.PullRequest(model=MODEL, wire_dtype=99), S.INVALID_ARGUMENT),  # type: ignore[arg-type]
        ("wire-negative", pb.PullRequest(model=MODEL, wire_dtype=-3), S.INVALID_ARGUMENT),  # type: ignore[arg-type]
        ("names-unknown", pb.PullRequest(model=MODEL, names=["nope"]), S.INVALID_ARGUMENT),
        ("names-long", pb.PullRequest(model=MODEL, names=["n" * 100_000]), S.INVALID_ARGUMENT),
        ("model-unknown", pb.PullRequest(model="no-such"), S.NOT_FOUND),
        ("model-empty", pb.PullRequest(model=""), S.NOT_FOUND),
        # a pull's session only names where a same-host client wants the copy; unknown: streamed
        ("session-unknown", pb.PullRequest(model=MODEL, session="nope"), S.OK),
    ]
    for label, req, code in reqs:
        raw = req.SerializeToString()
        yield Case(f"pull-{label}", rpc("stream_out", "PullParams", raw), code)


def state_cases() -> Iterator[Case]:
    one = [spec("b/exp_avg", [3])]

    def load(
        states: list[pb.ParamState],
        tensors: list[pb.TensorSpec],
        chunks: list[bytes],
        groups: Any = (),
    ) -> list[bytes]:
        h = pb.StateHeader(
            model=MODEL, states=states, tensors=tensors, groups=list(groups)
        ).SerializeToString()
        if not chunks:
            return [encode_frame(h)]
        return [encode_frame(h if i == 0 else None, i, 0, c) for i, c in enumerate(chunks)]

    full = [spec("b/step", []), spec("b/exp_avg", [3]), spec("b/exp_avg_sq", [3])]
    full_state = [pb.ParamState(param="b", tensors={"step": 0, "exp_avg": 1, "exp_avg_sq": 2})]

    def vals(step: float, a: float, sq: float) -> list[bytes]:
        return [
            torch.tensor([step]).numpy().tobytes(),
            torch.full((3,), a).numpy().tobytes(),
            torch.full((3,), sq).numpy().tobytes(),
        ]

    cases = {
        "index-past": load([pb.ParamState(param="b", tensors={"exp_avg": 5})], one, []),
        "unknown-param": load([pb.ParamState(param="zzz", tensors={"exp_avg": 0})], one, []),
        "orphan-tensor": load([], one, []),
        "step-shape": load(
            [pb.ParamState(param="b", tensors={"step": 0})], [spec("b/step", [3])], []
        ),
        "too-many-tensors": load([], [spec(f"t{i}", [1]) for i in range(50)], []),
        "unknown-key": load([pb.ParamState(param="b", tensors={"momentum": 0})], one, [f32(3)]),
        "lacks-keys": load([pb.ParamState(param="b", tensors={"exp_avg": 0})], one, [f32(3)]),
        "nan-exp-avg-sq": load(full_state, full, vals(1, 0.1, NAN)),
        "inf-exp-avg": load(full_state, full, vals(1, INF, 0.1)),
        "inf-step": load(full_state, full, vals(INF, 0.1, 0.1)),
        "group-count": load(
            full_state, full, vals(1, 0.1, 0.1), [pb.ParamGroup(), pb.ParamGroup()]
        ),
        "group-lr-inf": load(
            full_state,
            full,
            vals(1, 0.1, 0.1),
            [pb.ParamGroup(params=["w", "b"], options={"lr": hv(INF)})],
        ),
        "model-unknown-state": [encode_frame(pb.StateHeader(model="no-such").SerializeToString())],
    }
    codes = {"model-unknown-state": S.NOT_FOUND, "too-many-tensors": S.RESOURCE_EXHAUSTED}
    for label, frames in cases.items():
        code = codes.get(label, S.INVALID_ARGUMENT)
        yield Case(f"load-{label}", rpc("stream_in", "LoadState", frames), code)


def group_cases() -> Iterator[Case]:
    def frames(h: pb.GroupHeader) -> list[bytes]:
        return [encode_frame(h.SerializeToString(), 0, 0, f32(2))]

    cases = {
        "existing-name": (
            pb.GroupHeader(model=MODEL, params=[spec("w", [2])], group=pb.ParamGroup(params=["w"])),
            S.INVALID_ARGUMENT,
        ),
        "params-mismatch": (
            pb.GroupHeader(model=MODEL, params=[spec("v", [2])], group=pb.ParamGroup(params=["u"])),
            S.INVALID_ARGUMENT,
        ),
        "lr-inf": (
            pb.GroupHeader(
                model=MODEL,
                params=[spec("v", [2])],
                group=pb.ParamGroup(params=["v"], options={"lr": hv(INF)}),
            ),
            S.INVALID_ARGUMENT,
        ),
        "model-unknown": (
            pb.GroupHeader(
                model="no-such", params=[spec("v", [2])], group=pb.ParamGroup(params=["v"])
            ),
            S.NOT_FOUND,
        ),
        "int-dtype": (
            pb.GroupHeader(
                model=MODEL, params=[spec("v", [2], 0)], group=pb.ParamGroup(params=["v"])
            ),
            S.INVALID_ARGUMENT,
        ),
    }
    for label, (h, code) in cases.items():
        yield Case(f"group-{label}", rpc("stream_in", "AddParamGroup", frames(h)), code)


def create_cases() -> Iterator[Case]:
    def frames(cfg: pb.ModelConfig) -> list[bytes]:
        return [encode_frame(cfg.SerializeToString(), 0, 0, f32(2))]

    w = [spec("w", [2])]
    cases = {
        "name-empty": (pb.ModelConfig(model="", params=w), S.INVALID_ARGUMENT),
        "name-slash": (pb.ModelConfig(model="a/b", params=w), S.INVALID_ARGUMENT),
        "name-dotdot": (pb.ModelConfig(model="..", params=w), S.INVALID_ARGUMENT),
        "name-long": (pb.ModelConfig(model="m" * 129, params=w), S.INVALID_ARGUMENT),
        "name-nul": (pb.ModelConfig(model="a\0b", params=w), S.INVALID_ARGUMENT),
        "no-params": (pb.ModelConfig(model="hostile-new"), S.INVALID_ARGUMENT),
        "dup-params": (pb.ModelConfig(model="hostile-new", params=w + w), S.INVALID_ARGUMENT),
        "mode-99": (pb.ModelConfig(model="hostile-new", params=w, mode=99), S.INVALID_ARGUMENT),  # type: ignore[arg-type]
        "round-timeout-nan": (
            pb.ModelConfig(model="hostile-new", params=w, round_timeout_s=NAN),
            S.INVALID_ARGUMENT,
        ),
        "round-timeout-inf": (
            pb.ModelConfig(model="hostile-new", params=w, round_timeout_s=INF),
            S.INVALID_ARGUMENT,
        ),
        "round-timeout-negative": (
            pb.ModelConfig(model="hostile-new", params=w, round_timeout_s=-1),
            S.INVALID_ARGUMENT,
        ),
        "group-unknown-param": (
            pb.ModelConfig(model="hostile-new", params=w, groups=[pb.ParamGroup(params=["q"])]),
            S.INVALID_ARGUMENT,
        ),
        "existing-other-shapes": (
            pb.ModelConfig(model=MODEL, params=w, exist_ok=True),
            S.ALREADY_EXISTS,
        ),
        "existing": (
            pb.ModelConfig(model=MODEL, params=[spec("w", [4, 3]), spec("b", [3])]),
            S.ALREADY_EXISTS,
        ),
    }
    for label, (cfg, code) in cases.items():
        yield Case(f"create-{label}", rpc("stream_in", "CreateModel", frames(cfg)), code)


# --- HTTP ----------------------------------------------------------------------------------------


def http_cases() -> Iterator[Case]:
    route = f"/v1/models/{MODEL}/param_groups/0"
    bodies: dict[str, tuple[str, int]] = {
        "lr-Infinity": ('{"lr": Infinity}', 400),
        "lr-NaN": ('{"lr": NaN}', 400),
        "lr-1e999": ('{"lr": 1e999}', 400),
        "lr--1e999": ('{"lr": -1e999}', 400),
        "eps-Infinity": ('{"eps": Infinity}', 400),
        "wd-1e999": ('{"weight_decay": 1e999}', 400),
        "betas-inf": ('{"betas": [0.9, 1e999]}', 400),
        "lr-negative": ('{"lr": -1}', 400),
        "lr-string": ('{"lr": "fast"}', 400),
        "lr-list": ('{"lr": [1]}', 400),
        "lr-object": ('{"lr": {}}', 400),
        "lr-bool": ('{"lr": true}', 400),
        "betas-one": ('{"betas": [0.9]}', 400),
        "betas-three": ('{"betas": [0.9, 0.9, 0.9]}', 400),
        "betas-above-one": ('{"betas": [0.9, 2]}', 400),
        "unknown-field": ('{"momentum": 0.9}', 400),
        "empty-object": ("{}", 400),
        "array": ("[]", 400),
        "null": ("null", 400),
        "not-json": ("lr=0.1", 400),
        "truncated-json": ('{"lr": 0.', 400),
        "empty-body": ("", 400),
        "deep-nesting": ("[" * 5000 + "]" * 5000, 400),
    }
    for label, (body, status) in bodies.items():
        yield Case(
            f"http-hyper-{label}",
            http("POST", route, body),
            status,
        )
    requests: dict[str, tuple[str, str, int]] = {
        "group-negative": ("POST", f"/v1/models/{MODEL}/param_groups/-1", 400),
        "group-huge": ("POST", f"/v1/models/{MODEL}/param_groups/99999999999999999999", 400),
        "group-99": ("POST", f"/v1/models/{MODEL}/param_groups/99", 400),
        "group-text": ("POST", f"/v1/models/{MODEL}/param_groups/abc", 400),
        "group-model-unknown": ("POST", "/v1/models/no-such/param_groups/0", 404),
        "describe-unknown": ("GET", "/v1/models/no-such", 404),
        "describe-long": ("GET", "/v1/models/" + "m" * 5000, 404),
        "params-unknown": ("GET", "/v1/models/no-such/params", 404),
        "history-limit-negative": ("GET", f"/v1/models/{MODEL}/history?limit=-1", 400),
        "history-limit-text": ("GET", f"/v1/models/{MODEL}/history?limit=abc", 400),
        "history-since-text": ("GET", f"/v1/models/{MODEL}/history?since=abc", 400),
        "history-since-huge": ("GET", f"/v1/models/{MODEL}/history?since=1e999", 400),
        "snapshot-unknown": ("POST", "/v1/models/no-such/snapshot", 404),
        "download-unknown": ("GET", "/v1/models/no-such/snapshot", 404),
        "delete-unknown": ("DELETE", "/v1/models/no-such", 404),
        "put-model": ("PUT", f"/v1/models/{MODEL}", 405),
        "patch-models": ("PATCH", "/v1/models", 405),
        "delete-models": ("DELETE", "/v1/models", 405),
        "no-route": ("GET", "/v2/anything", 404),
        "traversal": ("GET", "/static/../../etc/passwd", 404),
        "traversal-encoded": ("GET", "/static/%2e%2e/%2e%2e/etc/passwd", 404),
    }
    for label, (method, path, status) in requests.items():
        yield Case(
            f"http-{label}",
            http(method, path, '{"lr": 0.1}' if method == "POST" else None),
            status,
        )


CASES = [
    *hyper_cases(),
    *spec_cases(),
    *push_field_cases(),
    *frame_cases(),
    *unary_cases(),
    *pull_cases(),
    *state_cases(),
    *group_cases(),
    *create_cases(),
    *http_cases(),
]


def test_the_suite_is_large_and_distinct() -> None:
    ids = [c.id for c in CASES]
    assert len(set(ids)) == len(ids)
    assert len(ids) >= 150, len(ids)
    assert sum(c.id.startswith("http-") for c in CASES) >= 40


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_hostile_input_gets_its_status_and_changes_nothing(target: Target, case: Case) -> None:
    model = target.daemon.registry.get(MODEL)
    names = target.daemon.registry.names()
    before = snapshot(model)
    groups = [dict(g) for g in model.requested]
    status = case.send(target)
    assert status == case.expect, f"{case.id}: {status}"
    assert_bitwise_equal(before, snapshot(model))
    assert [dict(g) for g in model.requested] == groups
    assert target.daemon.registry.names() == names
