"""Mixed precision against a real daemon: torch.amp.GradScaler around RemoteAdam, and low-precision
gradients for float32 parameters.

RemoteAdam says `_step_supports_amp_scaling`, so GradScaler hands it `grad_scale` / `found_inf`
instead of skipping the step itself: RemoteAdam unscales the gradients locally and pushes them,
or, on an overflow, pushes none with found_inf set, and the server skips the step whole (the push
still counts for the round). The reference is what the server runs on CPU, a local
torch.optim.Adam(fused=True), which GradScaler drives the same way (it unscales in its kernel).
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from adamd.client import Client, NonFiniteGradient, RemoteAdam
from adamd.server import Daemon

from ..conftest import assert_bitwise_equal, snapshot

LR = 1e-2
STEPS = 10
INF_AT = (0, 5)  # the very first step (no Adam state yet on the server) and one mid-run
GROWTH_INTERVAL = 3
# GradScaler("cpu", growth_interval=3) from 2**16: halved after each overflow, doubled after
# three clean steps in a row (the scale after each step's update()).
SCALES = [2.0**15, 2.0**15, 2.0**15, 2.0**16, 2.0**16, 2.0**15, 2.0**15, 2.0**15, 2.0**16, 2.0**16]


def _net() -> torch.nn.Sequential:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 1))


def _batch(step: int, rank: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 * rank + step)
    return torch.randn(8, 16, generator=g), torch.randn(8, 1, generator=g)


def _scaled_backward(
    net: torch.nn.Sequential,
    scaler: torch.amp.GradScaler,
    opt: torch.optim.Optimizer,
    step: int,
    *,
    rank: int = 0,
    overflow: bool = False,
    autocast: bool = True,
) -> None:
    """zero_grad, a (bf16-autocast) forward, scaler.scale(loss).backward(), and an inf put into
    one gradient element when `overflow` (what an fp16 overflow would leave there)."""
    opt.zero_grad()
    x, y = _batch(step, rank)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = net(x)
    loss = torch.nn.functional.mse_loss(out.float(), y)
    scaler.scale(loss).backward()
    if overflow:
        weight = net[0].weight
        assert isinstance(weight, torch.Tensor) and weight.grad is not None
        weight.grad[3, 7] = float("inf")


def _scrape(daemon: Daemon) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    r = httpx.get(f"{daemon.http_url}/metrics")
    assert r.status_code == 200
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(r.text)
        for s in family.samples
    }


def _assert_params_equal(a: torch.nn.Module, b: torch.nn.Module) -> None:
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert p.dtype == q.dtype and torch.equal(p, q), name


@pytest.mark.parametrize("transport", ["auto", "grpc"])
@pytest.mark.parametrize("unscale_first", [False, True], ids=["step", "unscale-clip-step"])
def test_grad_scaler_around_remote_adam_skips_overflows_whole_and_matches_local_fused_adam(
    daemon: Daemon, model_name: str, transport: str, unscale_first: bool
) -> None:
    """`unscale-clip-step`: scaler.unscale_(opt), clip_grad_norm_, then scaler.step(opt): the
    gradients arrive unscaled (grad_scale None) and found_inf still decides."""
    remote_net, local_net = _net(), _net()
    opt = RemoteAdam(
        remote_net.parameters(),
        lr=LR,
        server=daemon.grpc_address,
        model=model_name,
        transport=transport,
    )
    ref = torch.optim.Adam(local_net.parameters(), lr=LR, fused=True)
    remote_scaler = torch.amp.GradScaler("cpu", growth_interval=GROWTH_INTERVAL)
    local_scaler = torch.amp.GradScaler("cpu", growth_interval=GROWTH_INTERVAL)
    model = daemon.registry.get(model_name)
    scales = []
    try:
        for step in range(STEPS):
            overflow = step in INF_AT
            before = snapshot(model)
            scale = remote_scaler.get_scale()
            for net, scaler, o in (
                (remote_net, remote_scaler, opt),
                (local_net, local_scaler, ref),
            ):
                _scaled_backward(net, scaler, o, step, overflow=overflow)
                if unscale_first:
                    scaler.unscale_(o)
                    torch.nn.utils.clip_grad_norm_(net.parameters(), max_norm=1.0)
                scaler.step(o)
                scaler.update()
            result = opt.last_result
            assert result is not None
            if overflow:
                # Skipped whole: version, parameters, step counts, exp_avg, exp_avg_sq untouched.
                assert_bitwise_equal(snapshot(model), before)
                assert not result.applied and result.found_inf, result
                assert result.version == model.version == opt.version == int(before["version"])
                assert remote_scaler.get_scale() == scale * 0.5  # the scaler backed off
            else:
                assert result.applied and not result.found_inf, result
                assert result.version == int(before["version"]) + 1 == opt.version
            assert not hasattr(opt, "found_inf") and not hasattr(opt, "grad_scale")
            scales.append(remote_scaler.get_scale())
            assert scales[-1] == local_scaler.get_scale(), step
            _assert_params_equal(remote_net, local_net)  # bitwise, every step
        assert scales == SCALES

        # The server's Adam state is the local one's, bitwise (a skipped first step leaves the
        # local fused Adam a zero state at step 0; the server made none: same after step 1).
        remote_sd, local_sd = opt.state_dict(), ref.state_dict()
        assert remote_sd["state"].keys() == local_sd["state"].keys()
        for i, local_state in local_sd["state"].items():
            assert_bitwise_equal(remote_sd["state"][i], local_state)
            assert float(local_state["step"]) == STEPS - len(INF_AT)
        server = {n: p.detach().clone() for n, p in model.params.items()}
        for (name, p), q in zip(remote_net.named_parameters(), local_net.parameters()):
            assert torch.equal(server[opt._name_of(p)], q), name

        # What the server reports: the skipped steps everywhere they are exposed.
        info = opt.client.describe(model_name)
        assert info.version == STEPS - len(INF_AT)
        assert info.skipped_steps == len(INF_AT)
        samples = _scrape(daemon)
        label = (("model", model_name),)
        assert samples[("adamd_steps_skipped_total", label)] == len(INF_AT)
        assert samples[("adamd_steps_total", label)] == STEPS - len(INF_AT)
        summary = httpx.get(f"{daemon.http_url}/v1/models/{model_name}").json()
        assert (summary["version"], summary["skipped_steps"]) == (STEPS - len(INF_AT), len(INF_AT))
        body = httpx.get(f"{daemon.http_url}/v1/models/{model_name}/history").json()
        assert [e["applied"] for e in body["steps"]] == [s not in INF_AT for s in range(STEPS)]
        # A skipped step keeps the version it was pushed at: 0 (nothing applied yet), then 4.
        assert [e["version"] for e in body["steps"] if not e["applied"]] == [0, 4]
    finally:
        opt.close()


def test_two_sync_ranks_one_overflowing_skips_the_round_for_both(
    daemon: Daemon, model_name: str
) -> None:
    """Rank 1 overflows at step 1: the round (both ranks' pushes) is skipped whole, both replies
    say so, both ranks keep identical parameters, and the run equals a local fused Adam fed the
    mean gradient of the other rounds."""
    nets = [_net(), _net()]
    opts = [
        RemoteAdam(
            nets[r].parameters(),
            lr=LR,
            server=daemon.grpc_address,
            model=model_name,
            world_size=2,
            rank=r,
            round_timeout_s=120,
        )
        for r in range(2)
    ]
    scalers = [torch.amp.GradScaler("cpu") for _ in range(2)]
    model = daemon.registry.get(model_name)
    steps, overflow_at = 3, 1

    def rank_step(r: int, step: int) -> float:
        scale = scalers[r].get_scale()
        _scaled_backward(
            nets[r],
            scalers[r],
            opts[r],
            step,
            rank=r,
            overflow=(r == 1 and step == overflow_at),
            autocast=False,
        )
        scalers[r].step(opts[r])
        scalers[r].update()
        return scale

    try:
        with ThreadPoolExecutor(2) as pool:
            for step in range(steps):
                before = snapshot(model)
                futures = [pool.submit(rank_step, r, step) for r in range(2)]
                scales_before = [f.result(timeout=180) for f in futures]
                results = [o.last_result for o in opts]
                assert all(res is not None and res.contributors == 2 for res in results)
                if step == overflow_at:
                    assert_bitwise_equal(snapshot(model), before)
                    for res in results:
                        assert res is not None and not res.applied and res.found_inf, res
                        assert res.version == int(before["version"])
                    # The rank that overflowed backs off; rank 0's own gradients were finite,
                    # so its scaler saw no overflow (it unscales its own gradients anyway).
                    assert scalers[1].get_scale() == scales_before[1] * 0.5
                else:
                    for res in results:
                        assert res is not None and res.applied and not res.found_inf, res
                _assert_params_equal(nets[0], nets[1])
    finally:
        for o in opts:
            o.close()
    assert model.version == steps - 1 and model.skipped_steps == 1

    # Reference: unscaled fp32 gradients of each rank's batch, summed in rank order, halved.
    ref_net = _net()
    ref = torch.optim.Adam(ref_net.parameters(), lr=LR, fused=True)
    for step in range(steps):
        if step == overflow_at:
            continue
        per_rank = []
        for r in range(2):
            ref.zero_grad()
            x, y = _batch(step, r)
            torch.nn.functional.mse_loss(ref_net(x), y).backward()
            per_rank.append([p.grad.clone() for p in ref_net.parameters() if p.grad is not None])
        for p, g0, g1 in zip(ref_net.parameters(), *per_rank):
            p.grad = (g0 + g1) / 2
        ref.step()
    # Scaling by a power of two and back is exact, so this holds bitwise here; the tolerance only
    # spares the test BLAS differences between the worker threads and this one.
    for p, q in zip(nets[0].parameters(), ref_net.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


def _grads(shapes: dict[str, tuple[int, ...]], step: int) -> dict[str, torch.Tensor]:
    """float32 gradients spanning 1e-7 .. 1e3 in magnitude (fp16 subnormals to large values)."""
    g = torch.Generator().manual_seed(50 + step)
    out = {}
    for n, s in shapes.items():
        mag = torch.pow(10.0, torch.empty(s).uniform_(-7, 3, generator=g))
        out[n] = torch.randn(s, generator=g) * mag
    return out


SHAPES: dict[str, tuple[int, ...]] = {"w": (64, 48), "b": (48,), "v": (3001,)}


@pytest.mark.parametrize("transport", ["auto", "grpc"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_push_grad_low_precision_gradients_step_fp32_params_like_the_upcast_gradient(
    daemon: Daemon, model_name: str, dtype: torch.dtype, transport: str
) -> None:
    """push_grad with fp16/bf16 gradients for fp32 parameters: over gRPC they travel as sent
    (cut into small chunks, so conversion restarts mid-tensor) and the server widens them;
    through shared memory the client widens them into the fp32 gradient file."""
    g = torch.Generator().manual_seed(3)
    init = {n: torch.randn(s, generator=g) for n, s in SHAPES.items()}
    params = {n: t.clone().requires_grad_(True) for n, t in init.items()}
    ref = torch.optim.Adam(params.values(), lr=LR, fused=True)
    with Client(daemon.grpc_address, transport=transport, chunk_bytes=1000) as c:
        c.create_model(model_name, init, lr=LR)
        model = daemon.registry.get(model_name)
        for step in range(3):
            low = {n: t.to(dtype) for n, t in _grads(SHAPES, step).items()}
            result = c.push_grad(model_name, low, version=step)
            assert result.applied and result.version == step + 1
            for n, p in params.items():
                p.grad = low[n].float()  # exact: every fp16/bf16 value is an fp32 value
            ref.step()
        # The path the parametrization names was the one taken (private, but the point here).
        assert (c._sessions.get(model_name) is not None) == (transport == "auto")
        for n, p in params.items():
            assert model.params[n].dtype == torch.float32
            assert torch.equal(model.params[n], p.detach()), n
            state, local = model.optimizer.state[model.params[n]], ref.state[p]
            assert_bitwise_equal(dict(state), dict(local))
        pulled = c.pull_params(model_name)
        assert all(torch.equal(pulled[n], p.detach()) for n, p in params.items())

        # A value too big for fp16 is inf there: rejected whole, unless sent as found_inf
        # (then skipped whole, and counted).
        bad = {n: t.to(dtype) for n, t in _grads(SHAPES, 3).items()}
        bad["v"][17] = float("inf")
        before = snapshot(model)
        with pytest.raises(NonFiniteGradient):
            c.push_grad(model_name, bad, version=3)
        assert_bitwise_equal(snapshot(model), before)
        skipped = c.push_grad(model_name, bad, version=3, found_inf=True)
        assert not skipped.applied and skipped.found_inf and skipped.version == 3
        assert_bitwise_equal(snapshot(model), before)
        assert c.describe(model_name).skipped_steps == 1


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_remote_adam_wire_dtype_pushes_rounded_gradients_and_keeps_fp32_on_the_server(
    daemon: Daemon, model_name: str, dtype: torch.dtype
) -> None:
    """RemoteAdam(wire_dtype=...) over fp32 parameters: gradients are rounded to `dtype` on the
    way out, the server steps fp32 master weights with the widened gradient, and the worker gets
    those weights rounded to `dtype` (the documented trade: half the bytes both ways)."""
    shapes = {"w": (64, 48), "b": (48,)}
    g = torch.Generator().manual_seed(4)
    init = {n: torch.randn(s, generator=g) for n, s in shapes.items()}
    local = {n: t.clone().requires_grad_(True) for n, t in init.items()}
    ref_params = {n: t.clone().requires_grad_(True) for n, t in init.items()}
    ref = torch.optim.Adam(ref_params.values(), lr=LR, fused=True)
    opt = RemoteAdam(
        [{"params": list(local.values()), "param_names": list(local)}],
        lr=LR,
        server=daemon.grpc_address,
        model=model_name,
        wire_dtype=dtype,
    )
    rounded: Callable[[torch.Tensor], torch.Tensor] = lambda t: t.detach().to(dtype).float()
    try:
        for step in range(3):
            grads = _grads(shapes, step)
            for n, p in local.items():
                p.grad = grads[n].clone()
            opt.step()
            for n, p in ref_params.items():
                p.grad = rounded(grads[n])
            ref.step()
            assert opt.last_result is not None and opt.last_result.applied
    finally:
        opt.close()
    model = daemon.registry.get(model_name)
    for n, p in ref_params.items():
        assert model.params[n].dtype == torch.float32
        assert torch.equal(model.params[n], p.detach()), n
        assert torch.equal(local[n].detach(), rounded(p)), n
        assert local[n].dtype == torch.float32
