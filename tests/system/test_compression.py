"""int8 gradient pushes with error feedback (`grad_compression="int8"`), against a real daemon:
the server steps with exactly the dequantized values (bitwise against a local fused Adam fed
them), the residual carries each step's quantization error into the next, a retried push is
applied once and moves the residual once, non-finite gradients are refused before anything is
quantized, and each rank of a sync round keeps its own residual."""

from __future__ import annotations

import threading
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
import torch

from adamd.client import Client, InvalidArgument, NonFiniteGradient, RemoteAdam
from adamd.client._compression import Compressor
from adamd.protocol import quant
from adamd.server import Daemon
from adamd.v1 import adamd_pb2 as pb

from ..conftest import assert_bitwise_equal, snapshot
from ..proxies import proxy_to, wait_until

SHAPES = {"w": (64, 70), "b": (5,), "big": (9000,)}  # block edges: 4480 = 2 blocks + 384


def _params() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return {n: torch.randn(s, generator=g) for n, s in SHAPES.items()}


def _grads(step: int, rank: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(100 * step + rank)
    return {n: torch.randn(s, generator=g) * 10 ** (step % 3 - 1) for n, s in SHAPES.items()}


class Reference:
    """A local fused torch.optim.Adam (the server's CPU step) fed what the server must see: each
    rank's gradient plus its residual, quantized, dequantized; the mean over ranks in rank
    order. Error feedback recomputed here from quant's primitives, independently of the client."""

    def __init__(self, feedback: bool = True, **adam: Any):
        self.params = {n: t.clone() for n, t in _params().items()}
        self.opt = torch.optim.Adam(list(self.params.values()), fused=True, **adam)
        self.residual: dict[tuple[int, str], torch.Tensor] = {}
        self.feedback = feedback

    def deq(self, rank: int, grads: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = {}
        for n, g in grads.items():
            x = g.reshape(-1).float()
            r = self.residual.get((rank, n))
            if self.feedback and r is not None:
                x = x + r
            _, values, _ = quant.quantize(x, quant.DEFAULT_BLOCK)
            if self.feedback:
                self.residual[(rank, n)] = x - values
            out[n] = values.view(g.shape)
        return out

    def step(self, per_rank: Mapping[int, Mapping[str, torch.Tensor]]) -> None:
        deqs = [self.deq(r, per_rank[r]) for r in sorted(per_rank)]
        for n, p in self.params.items():
            total = deqs[0][n].clone()
            for d in deqs[1:]:
                total.add_(d[n])
            p.grad = total.div_(len(deqs)) if len(deqs) > 1 else total
        self.opt.step()


def _assert_params(client: Client, model: str, ref: Reference) -> None:
    got = client.pull_params(model)
    for n, p in ref.params.items():
        assert torch.equal(got[n], p), n


@pytest.mark.parametrize("transport", ["grpc", "bulk", "auto"])
def test_int8_pushes_step_bitwise_like_adam_fed_the_dequantized_gradients(
    daemon: Daemon, model_name: str, transport: str
) -> None:
    ref = Reference(lr=0.01, weight_decay=0.1)
    with Client(daemon.grpc_address, transport=transport) as c:
        c.create_model(model_name, _params(), lr=0.01, weight_decay=0.1)
        for step in range(6):
            grads = _grads(step)
            if step % 2:
                r = c.push_grad(model_name, grads, version=step, grad_compression="int8")
                pulled = c.pull_params(model_name)
            else:  # step(): the bulk channel's push-and-pull exchange where it is used
                out = {n: torch.empty(s) for n, s in SHAPES.items()}
                r, _ = c.step(model_name, grads, out, version=step, grad_compression="int8")
                pulled = out
            assert r.applied and r.version == step + 1
            ref.step({0: grads})
            for n, p in ref.params.items():
                assert torch.equal(pulled[n], p), (step, n)
            residual = c.compressor("int8").residual(model_name, 0, "w")
            assert residual is not None and torch.equal(residual, ref.residual[(0, "w")])
        model = daemon.registry.get(model_name)
        with model.locked():
            for p, state in model.optimizer.state.items():
                name = next(n for n, q in model.params.items() if q is p)
                local = ref.opt.state[ref.params[name]]
                assert torch.equal(state["exp_avg"], local["exp_avg"])
                assert torch.equal(state["exp_avg_sq"], local["exp_avg_sq"])


def test_the_clients_grad_compression_is_read_at_every_push(
    daemon: Daemon, model_name: str
) -> None:
    """`Client.grad_compression` is the default of each push: set after construction, the next
    push travels int8 (the residual moves); set back to None, raw again (it stays)."""
    ref = Reference(lr=0.01)
    with Client(daemon.grpc_address, transport="grpc") as c:
        c.create_model(model_name, _params(), lr=0.01)
        c.grad_compression = "int8"
        c.push_grad(model_name, _grads(0), version=0)
        ref.step({0: _grads(0)})
        _assert_params(c, model_name, ref)
        residual = c.compressor("int8").residual(model_name, 0, "w")
        assert residual is not None and torch.equal(residual, ref.residual[(0, "w")])
        c.grad_compression = None
        c.push_grad(model_name, _grads(1), version=1)
        for n, g in _grads(1).items():
            ref.params[n].grad = g
        ref.opt.step()
        _assert_params(c, model_name, ref)
        assert torch.equal(c.compressor("int8").residual(model_name, 0, "w"), residual)


def test_error_feedback_carries_what_rounding_dropped(daemon: Daemon, model_name: str) -> None:
    """Every value below its block's half step: without feedback nothing ever arrives; with it
    the residual grows until it is sent, and the sum sent tracks the sum of the gradients."""
    grads = {"w": torch.full((2048,), 1e-4)}  # one block
    grads["w"][0] = 1.0  # the block's absmax: a step of 1/127, so 1e-4 rounds to 0
    comp, noef = Compressor("int8"), Compressor("int8-noef")
    sent = torch.zeros(2048)
    for _ in range(200):
        e = comp.encode("m", 0, grads, keep_dequantized=True)
        e.commit()
        sent += e.dequantized["w"]
        lost = noef.encode("m", 0, grads, keep_dequantized=True)
        lost.commit()
        assert not lost.dequantized["w"][1:].any()
    total = grads["w"] * 200
    residual = comp.residual("m", 0, "w")
    assert residual is not None
    assert torch.allclose(sent + residual, total, rtol=1e-5)  # nothing lost, only delayed
    assert float((sent[1:] - total[1:]).abs().max()) <= 1 / 254 + 1e-6  # within one half step
    assert noef.residual("m", 0, "w") is None
    # And a server fed the no-feedback pushes steps as Adam fed those (lossy) values.
    ref = Reference(feedback=False, lr=0.01)
    with Client(daemon.grpc_address, transport="grpc") as c:
        c.create_model(model_name, _params(), lr=0.01)
        for step in range(3):
            c.push_grad(model_name, _grads(step), grad_compression="int8-noef")
            ref.step({0: _grads(step)})
        _assert_params(c, model_name, ref)


def test_remote_adam_int8_matches_a_local_loop(daemon: Daemon, model_name: str) -> None:
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(30, 200), torch.nn.Tanh(), torch.nn.Linear(200, 3))
    local = torch.nn.Sequential(torch.nn.Linear(30, 200), torch.nn.Tanh(), torch.nn.Linear(200, 3))
    local.load_state_dict(net.state_dict())
    opt = RemoteAdam(
        net.parameters(), lr=3e-3, server=daemon.grpc_address, model=model_name,
        grad_compression="int8", transport="bulk",
    )  # fmt: skip
    ref = torch.optim.Adam(local.parameters(), lr=3e-3, fused=True)
    comp = Compressor("int8")
    x, y = torch.randn(64, 30), torch.randn(64, 3)
    try:
        for _ in range(8):
            for m in (net, local):
                m.zero_grad()
                torch.nn.functional.mse_loss(m(x), y).backward()
            opt.step()
            named = dict(local.named_parameters())
            e = comp.encode("m", 0, {n: p.grad for n, p in named.items()}, keep_dequantized=True)
            e.commit()
            for n, p in named.items():
                p.grad = e.dequantized[n].view(p.shape)
            ref.step()
            for a, b in zip(net.parameters(), local.parameters()):
                assert torch.equal(a, b)
    finally:
        opt.close()


def test_a_retried_int8_push_is_applied_once_and_moves_the_residual_once(
    daemon: Daemon, model_name: str
) -> None:
    with Client(daemon.grpc_address) as direct:
        direct.create_model(model_name, _params(), lr=0.01)
    model = daemon.registry.get(model_name)
    ref = Reference(lr=0.01)
    with (
        proxy_to(daemon) as proxy,
        Client(proxy.address, transport="grpc", grad_compression="int8") as c,
        ThreadPoolExecutor(1) as pool,
    ):
        c.push_grad(model_name, _grads(0), version=0)
        ref.step({0: _grads(0)})
        proxy.hold_replies.set()
        push = pool.submit(c.push_grad, model_name, _grads(1), version=1)
        wait_until(lambda: model.version == 2)  # applied; the reply is held back
        applied = snapshot(model)
        # Not acknowledged yet: the residual is still the first push's.
        assert torch.equal(
            c.compressor("int8").residual(model_name, 0, "w"), ref.residual[(0, "w")]
        )
        proxy.cut()
        reply = push.result(timeout=30)  # retried with the same bytes, answered as a duplicate
        assert reply.duplicate and reply.version == 2
        assert_bitwise_equal(applied, snapshot(model))
        ref.step({0: _grads(1)})
        assert torch.equal(
            c.compressor("int8").residual(model_name, 0, "w"), ref.residual[(0, "w")]
        )
        c.push_grad(model_name, _grads(2), version=2)
        ref.step({0: _grads(2)})
        _assert_params(c, model_name, ref)


def test_a_push_refused_leaves_the_residual_where_it_was(daemon: Daemon, model_name: str) -> None:
    with Client(daemon.grpc_address, transport="grpc", grad_compression="int8") as c:
        c.create_model(model_name, _params(), lr=0.01)
        c.push_grad(model_name, _grads(0))
        before = c.compressor("int8").residual(model_name, 0, "w").clone()
        with pytest.raises(InvalidArgument, match="no parameter"):
            c.push_grad(model_name, {**_grads(1), "nope": torch.ones(3)})
        assert torch.equal(c.compressor("int8").residual(model_name, 0, "w"), before)


def test_non_finite_gradients_are_refused_before_quantizing(
    daemon: Daemon, model_name: str
) -> None:
    with Client(daemon.grpc_address, transport="grpc", grad_compression="int8") as c:
        c.create_model(model_name, _params(), lr=0.01)
        c.push_grad(model_name, _grads(0))
        model = daemon.registry.get(model_name)
        before = snapshot(model)
        residual = c.compressor("int8").residual(model_name, 0, "big").clone()
        for bad in (float("inf"), float("nan")):
            grads = _grads(1)
            grads["big"][8500] = bad
            with pytest.raises(NonFiniteGradient, match="'big'"):
                c.push_grad(model_name, grads)
            assert_bitwise_equal(before, snapshot(model))
            assert torch.equal(c.compressor("int8").residual(model_name, 0, "big"), residual)
        # found_inf (AMP): the server skips the step whatever the values; sent raw, residual kept
        grads = _grads(1)
        grads["w"][0, 0] = float("inf")
        r = c.push_grad(model_name, grads, found_inf=True)
        assert not r.applied and r.found_inf
        assert torch.equal(c.compressor("int8").residual(model_name, 0, "big"), residual)


def _raw_push(c: Client, model: str, spec: pb.TensorSpec, payload: torch.Tensor) -> None:
    header = pb.PushHeader(model=model, grads=[spec], push_id=f"raw-{spec.block}-{spec.encoding}")
    c._route.push(header, [payload], None)  # as it is, past the client's checks


def test_the_server_checks_encoded_pushes_itself(daemon: Daemon, model_name: str) -> None:
    """A client that skips the checks: a nan scale is refused by the server's finite check, a
    bad block size or encoding or a short payload as invalid; the model stays bitwise as it was."""
    from adamd.client._exceptions import AdamdError

    with Client(daemon.grpc_address, transport="grpc") as c:
        c.create_model(model_name, {"w": torch.zeros(5000)}, lr=0.01)
        model = daemon.registry.get(model_name)
        before = snapshot(model)
        payload, _, _ = quant.quantize(torch.randn(5000), 2048)

        def spec(**kw: int) -> pb.TensorSpec:
            fields = {"encoding": quant.INT8, "block": 2048, **kw}
            return pb.TensorSpec(name="w", dtype=pb.FLOAT32, shape=[5000], **fields)

        bad_scale = payload.clone()
        bad_scale[:4].view(torch.float32)[0] = float("nan")
        with pytest.raises(NonFiniteGradient):
            _raw_push(c, model_name, spec(), bad_scale)
        for kw, match in (({"block": 0}, "block"), ({"encoding": 7}, "encoding")):
            with pytest.raises(InvalidArgument, match=match):
                _raw_push(c, model_name, spec(**kw), payload)
        with pytest.raises(AdamdError, match=r"ended early|incomplete"):
            _raw_push(c, model_name, spec(), payload[:-10])
        assert_bitwise_equal(before, snapshot(model))
        # and the payload itself goes through
        _raw_push(c, model_name, spec(), payload)
        assert model.version == 1


def test_sync_ranks_keep_their_own_residuals(daemon: Daemon, model_name: str) -> None:
    with Client(daemon.grpc_address) as direct:
        direct.create_model(model_name, _params(), lr=0.01, world_size=2)
    ref = Reference(lr=0.01)
    clients = [Client(daemon.grpc_address, grad_compression="int8") for _ in range(2)]
    barrier = threading.Barrier(2)

    def worker(rank: int) -> None:
        for step in range(4):
            barrier.wait()
            r = clients[rank].push_grad(model_name, _grads(step, rank), version=step, rank=rank)
            assert r.applied and r.contributors == 2

    try:
        with ThreadPoolExecutor(2) as pool:
            for f in [pool.submit(worker, r) for r in range(2)]:
                f.result(timeout=60)
        for step in range(4):
            ref.step({r: _grads(step, r) for r in range(2)})
        _assert_params(clients[0], model_name, ref)
        for rank in range(2):
            got = clients[rank].compressor("int8").residual(model_name, rank, "big")
            assert got is not None and torch.equal(got, ref.residual[(rank, "big")])
        assert not torch.equal(ref.residual[(0, "big")], ref.residual[(1, "big")])
    finally:
        for c in clients:
            c.close()


def test_a_sharded_model_refuses_int8_for_now(daemon: Daemon) -> None:
    with pytest.raises(ValueError, match="sharded"):
        Client([daemon.grpc_address, "127.0.0.1:9"], grad_compression="int8")
    with pytest.raises(ValueError, match="grad_compression"):
        Client(daemon.grpc_address, grad_compression="int4")


def test_char_lm_with_int8_ends_within_2_percent_of_the_fp32_wire() -> None:
    """examples/char_lm.py, small and short (bench.compression runs the full size): the same
    seeds and batches over the fp32 wire and over int8 pushes with error feedback."""
    from bench import compression

    results = compression.run(["fp32", "int8-fp32pull"], 40, dim=32, layers=1)
    fp32, int8 = results["fp32"], results["int8-fp32pull"]
    assert int8["after"] < fp32["before"] - 0.3  # it learned
    assert abs(int8["after"] / fp32["after"] - 1) <= 0.02


def test_a_large_push_is_quantized_while_it_is_sent_with_the_same_bytes(
    daemon: Daemon, model_name: str
) -> None:
    """Over PIPELINE_MIN_VALUES a push's gradients are quantized on a thread while the earlier
    ones are sent: the payloads and residuals are those of quantizing in line, and the server
    steps with them."""
    g = torch.Generator().manual_seed(5)
    params = {"a": torch.randn(700_000, generator=g), "b": torch.randn(600_001, generator=g)}
    inline = Compressor("int8")
    with Client(daemon.grpc_address, transport="bulk", grad_compression="int8") as c:
        c.create_model(model_name, params, lr=0.01)
        ref = {n: p.clone() for n, p in params.items()}
        opt = torch.optim.Adam(list(ref.values()), lr=0.01, fused=True)
        for step in range(2):
            grads = {n: torch.randn(p.shape, generator=g) for n, p in params.items()}
            piped = Compressor("int8")
            piped.residuals = {k: dict(v) for k, v in inline.residuals.items()}
            a = piped.encode(model_name, 0, grads)
            b = inline.encode(model_name, 0, grads, keep_dequantized=True, pipelined=False)
            assert type(a.payloads).__name__ == "_Pending"
            a.commit()
            assert all(torch.equal(x, y) for x, y in zip(a.payloads, b.payloads))
            b.commit()
            out = {n: torch.empty(p.shape) for n, p in params.items()}
            c.step(model_name, grads, out)
            for n, p in ref.items():
                p.grad = b.dequantized[n].view(p.shape)
                assert torch.equal(
                    c.compressor("int8").residual(model_name, 0, n),
                    inline.residual(model_name, 0, n),
                )
            opt.step()
            for n, p in ref.items():
                assert torch.equal(out[n], p), (step, n)


def test_a_complex_gradient_is_refused_for_int8(daemon: Daemon, model_name: str) -> None:
    with Client(daemon.grpc_address, grad_compression="int8") as c:
        c.create_model(model_name, {"z": torch.zeros(4, dtype=torch.complex64)}, lr=0.1)
        with pytest.raises(ValueError, match="real float"):
            c.push_grad(model_name, {"z": torch.ones(4, dtype=torch.complex64)})
        assert daemon.registry.get(model_name).version == 0
        assert c.compressor("int8").residual(model_name, 0, "z") is None


def test_the_core_refuses_encoded_gradients_in_a_same_host_file() -> None:
    """A same-host session's file holds raw gradients: a push claiming int8 there is refused,
    and its push id is not left in flight (the next push with it is taken)."""
    from adamd.server.errors import InvalidArgument as ServerInvalid

    from ..hosted import begin, make_model, push

    model = make_model()
    grads = {"w": torch.ones(4), "b": torch.ones(2)}
    with pytest.raises(ServerInvalid, match="same-host"):
        begin(model, grads, streamed=False, push_id="p1", blocks=(2048, 2048))
    assert push(model, grads, push_id="p1").wait().applied and model.version == 1


def test_a_model_made_again_under_its_name_starts_without_the_old_residuals(
    daemon: Daemon, model_name: str
) -> None:
    """Residuals belong to one model: deleting it (or creating a new one under its name)
    drops them, so the new model's first push carries its own gradient only."""
    with Client(daemon.grpc_address, transport="grpc", grad_compression="int8") as c:
        c.create_model(model_name, _params(), lr=0.01)
        c.push_grad(model_name, _grads(0))
        comp = c.compressor("int8")
        assert comp.residual(model_name, 0, "w") is not None
        c.delete_model(model_name)
        assert comp.residual(model_name, 0, "w") is None
        c.create_model(model_name, _params(), lr=0.01)
        ref = Reference(feedback=True, lr=0.01)
        c.push_grad(model_name, _grads(1))
        ref.step({0: _grads(1)})
        _assert_params(c, model_name, ref)
