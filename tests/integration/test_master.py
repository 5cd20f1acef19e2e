"""Master weights: bf16/fp16 parameters on the worker, float32 parameters and Adam state on the
server (`master_dtype=torch.float32`), against a real daemon.

The reference, bitwise, is what mixed-precision training does locally: a float32 copy of the
low-precision parameters, a fused torch.optim.Adam stepping that copy with the gradients widened
to float32, and the low-precision parameters set from the copy after each step (Tensor.copy_
rounds to nearest even). Every configuration runs STEPS steps and compares every step.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from adamd.client import Client, RemoteAdam
from adamd.server import Daemon

from ..conftest import assert_bitwise_equal, running_daemon, snapshot

STEPS = 50
LR = 1e-3  # small enough that many updates are below bf16's resolution of the weights


def _net(dtype: torch.dtype = torch.bfloat16, hidden: int = 16) -> torch.nn.Sequential:
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Linear(12, hidden), torch.nn.Tanh(), torch.nn.Linear(hidden, 3)
    )
    return net.to(dtype)


def _backward(
    net: torch.nn.Module, step: int, rank: int = 0, scaler: torch.amp.GradScaler | None = None
) -> None:
    g = torch.Generator().manual_seed(1000 * rank + step)
    dtype = next(net.parameters()).dtype
    x, y = torch.randn(8, 12, generator=g).to(dtype), torch.randn(8, 3, generator=g)
    for p in net.parameters():
        p.grad = None
    loss = torch.nn.functional.mse_loss(net(x).float(), y)
    (loss if scaler is None else scaler.scale(loss)).backward()


class MasterCopy:
    """The local recipe: fp32 copies, fused Adam on them with widened gradients, cast back."""

    def __init__(
        self, net: torch.nn.Module, groups: Callable[[list[torch.Tensor]], Any], **kw: Any
    ):
        self.params = list(net.parameters())
        self.master = [p.detach().float().clone() for p in self.params]
        self.opt = torch.optim.Adam(groups(self.master), fused=True, **kw)

    def widen(self, grads: list[torch.Tensor | None] | None = None) -> None:
        for i, (p, m) in enumerate(zip(self.params, self.master)):
            g = p.grad if grads is None else grads[i]
            m.grad = None if g is None else g.float()

    def cast_back(self) -> None:
        with torch.no_grad():
            for p, m in zip(self.params, self.master):
                p.copy_(m)

    def step(self) -> None:
        self.widen()
        self.opt.step()
        self.cast_back()


def _one_group(ps: list[torch.Tensor]) -> Any:
    return ps


def _two_groups(ps: list[torch.Tensor]) -> Any:
    return [{"params": ps[:2]}, {"params": ps[2:], "lr": 3e-3, "weight_decay": 0.1}]


def _wire_bytes(daemon: Daemon) -> tuple[float, float]:
    """Bytes the daemon received and sent over gRPC and the bulk channel, all methods."""
    text = httpx.get(f"{daemon.http_url}/metrics").text
    sums = {"adamd_received_bytes_total": 0.0, "adamd_sent_bytes_total": 0.0}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in sums:
                sums[sample.name] += sample.value
    return sums["adamd_received_bytes_total"], sums["adamd_sent_bytes_total"]


def _equal_nets(a: torch.nn.Module, b: torch.nn.Module, step: int) -> None:
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert p.dtype == q.dtype and torch.equal(p, q), (step, name)


def _server_matches(daemon: Daemon, name: str, ref: MasterCopy) -> None:
    model = daemon.registry.get(name)
    for p, m in zip(model.params.values(), ref.master):
        assert p.dtype == torch.float32 and torch.equal(p, m)


CONFIGS: dict[str, dict[str, Any]] = {
    "plain": {},
    "amsgrad": {"amsgrad": True},
    "weight-decay": {"weight_decay": 0.05},
    "decoupled-wd": {"weight_decay": 0.05, "decoupled_weight_decay": True},
    "maximize": {"maximize": True},
    "two-groups": {"groups": _two_groups},
    "lr-scheduler": {"scheduler": True},
}


@pytest.mark.parametrize("config", list(CONFIGS))
def test_remote_adam_with_master_weights_equals_local_fp32_master_copy_bitwise(
    daemon: Daemon, model_name: str, config: str
) -> None:
    kw = dict(CONFIGS[config])
    groups = kw.pop("groups", _one_group)
    scheduled = kw.pop("scheduler", False)
    remote_net, local_net = _net(), _net()
    opt = RemoteAdam(
        groups(list(remote_net.parameters())),
        lr=LR,
        server=daemon.grpc_address,
        model=model_name,
        master_dtype=torch.float32,
        **kw,
    )
    ref = MasterCopy(local_net, groups, lr=LR, **kw)
    scheds = []
    if scheduled:
        scheds = [
            torch.optim.lr_scheduler.StepLR(o, step_size=10, gamma=0.5) for o in (opt, ref.opt)
        ]
    try:
        for step in range(STEPS):
            _backward(remote_net, step)
            _backward(local_net, step)
            opt.step()
            ref.step()
            for s in scheds:
                s.step()
            _equal_nets(remote_net, local_net, step)
        _server_matches(daemon, model_name, ref)
        # Updates below bf16's resolution were kept by the master: the fp32 weights are not
        # what the bf16 ones say (a bf16 Adam would have lost them).
        held = list(daemon.registry.get(model_name).params.values())
        assert any(not torch.equal(h, p.float()) for h, p in zip(held, remote_net.parameters()))
        # state_dict(): torch's format, the fp32 state, loadable into the local master's Adam.
        sd, local_sd = opt.state_dict(), ref.opt.state_dict()
        assert sd["state"].keys() == local_sd["state"].keys()
        for i, entry in local_sd["state"].items():
            for key, value in entry.items():
                got = sd["state"][i][key]
                assert got.dtype == value.dtype and torch.equal(got, value), (i, key)
        assert sd["state"][0]["exp_avg"].dtype == torch.float32
        again = torch.optim.Adam(groups([m.clone() for m in ref.master]), fused=True, **kw)
        again.load_state_dict(sd)
    finally:
        opt.close()


def test_grad_scaler_with_fp16_parameters_equals_local_master_copy(
    daemon: Daemon, model_name: str
) -> None:
    """fp16 weights, torch.amp.GradScaler, an overflow on two steps: the reference GradScaler
    drives the local master's fused Adam (unscaling in its kernel), RemoteAdam unscales before it
    pushes (float32 gradients then); both skip the same steps."""
    remote_net, local_net = _net(torch.float16), _net(torch.float16)
    opt = RemoteAdam(
        remote_net.parameters(),
        lr=LR,
        server=daemon.grpc_address,
        model=model_name,
        master_dtype=torch.float32,
    )
    ref = MasterCopy(local_net, _one_group, lr=LR)
    scalers = [torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=4) for _ in "ab"]
    skipped = 0
    try:
        for step in range(STEPS):
            for net, scaler in zip((remote_net, local_net), scalers):
                _backward(net, step, scaler=scaler)
                if step in (0, 17):  # what an fp16 overflow would leave
                    w = next(net.parameters())
                    assert w.grad is not None
                    w.grad[0, 0] = float("inf")
            scalers[0].step(opt)
            ref.widen()
            scalers[1].step(ref.opt)
            ref.cast_back()
            scale = scalers[0].get_scale()
            for s in scalers:
                s.update()
            assert scalers[0].get_scale() == scalers[1].get_scale()
            result = opt.last_result
            assert result is not None
            # a step the server skipped is one the scaler backed off from (fp16 overflows too)
            assert (not result.applied) == (scalers[0].get_scale() < scale), step
            skipped += int(not result.applied)
            _equal_nets(remote_net, local_net, step)
        assert 2 <= skipped < STEPS // 2
        _server_matches(daemon, model_name, ref)
    finally:
        opt.close()


@pytest.mark.parametrize("transport", ["auto", "bulk", "grpc"])
def test_every_transport_carries_worker_dtype_both_ways(
    daemon: Daemon, model_name: str, transport: str
) -> None:
    """auto is the same-host shared memory here, bulk the raw-socket channel, grpc the streams.
    Pulls come back as bf16, rounded to nearest even from the fp32 master."""
    remote_net, local_net = _net(hidden=512), _net(hidden=512)
    opt = RemoteAdam(
        remote_net.parameters(),
        lr=LR,
        server=daemon.grpc_address,
        model=model_name,
        master_dtype=torch.float32,
        transport=transport,
    )
    ref = MasterCopy(local_net, _one_group, lr=LR)
    numel = sum(p.numel() for p in remote_net.parameters())
    before = _wire_bytes(daemon)
    try:
        for step in range(10):
            _backward(remote_net, step)
            _backward(local_net, step)
            opt.step()
            ref.step()
            _equal_nets(remote_net, local_net, step)
        received, sent = (a - b for a, b in zip(_wire_bytes(daemon), before))
        if transport != "auto":  # over a socket: bf16 both ways, 2 B/param plus the framing
            assert 2.0 <= received / (10 * numel) < 2.5, received
            assert 2.0 <= sent / (10 * numel) < 2.5, sent
        else:  # through the shared files: nothing but headers on the socket
            assert received + sent < 10 * numel
        client = opt._client
        assert (client._session(model_name) is not None) == (transport == "auto")
        assert (client._bulk_channel() is not None) == (transport != "grpc")
        info = client.describe(model_name)
        assert info.master_dtype == torch.float32
        assert {d for _, d in info.params.values()} == {torch.float32}
        assert set(info.worker_dtypes.values()) == {torch.bfloat16}
        with Client(daemon.grpc_address, transport="grpc") as c:
            pulled = c.pull_params(model_name)
        for p, m in zip(pulled.values(), ref.master):
            assert p.dtype == torch.bfloat16 and torch.equal(p, m.to(torch.bfloat16))
    finally:
        opt.close()


def test_client_create_model_master_dtype_and_mixed_widths(daemon: Daemon, model_name: str) -> None:
    """A float32 parameter beside bf16 ones stays float32 both ways; the bf16 values arrive
    widened exactly; a push of bf16 gradients steps the fp32 master."""
    w = torch.randn(5, 4).to(torch.bfloat16)
    norm = torch.randn(4)
    with Client(daemon.grpc_address) as c:
        info = c.create_model(
            model_name, {"w": w, "norm": norm}, lr=0.1, master_dtype=torch.float32
        )
        assert info.master_dtype == torch.float32
        assert info.worker_dtypes == {"w": torch.bfloat16, "norm": torch.float32}
        model = daemon.registry.get(model_name)
        assert torch.equal(model.params["w"], w.float()) and torch.equal(model.params["norm"], norm)
        view = httpx.get(f"{daemon.http_url}/v1/models/{model_name}").json()
        assert view["master_dtype"] == "float32" and view["dtypes"] == ["float32"]
        gw, gn = torch.randn(5, 4).to(torch.bfloat16), torch.randn(4)
        c.push_grad(model_name, {"w": gw, "norm": gn})
        mw, mn = w.float().clone(), norm.clone()
        ref = torch.optim.Adam([mw, mn], lr=0.1, fused=True)
        mw.grad, mn.grad = gw.float(), gn
        ref.step()
        pulled = c.pull_params(model_name)
        assert pulled["w"].dtype == torch.bfloat16 and torch.equal(pulled["w"], mw.bfloat16())
        assert pulled["norm"].dtype == torch.float32 and torch.equal(pulled["norm"], mn)
        # The exact master, to go on locally (the README's recipe): a float32 wire.
        exact = c.pull_params(model_name, wire_dtype=torch.float32)
        assert exact["w"].dtype == torch.float32 and torch.equal(exact["w"], mw)
        # Asking for a wire dtype still narrows everything real, as without master weights.
        half = c.pull_params(model_name, wire_dtype=torch.float16)
        assert {t.dtype for t in half.values()} == {torch.float16}
        # Joining with other precision is refused, naming it; a bad master dtype too.
        with pytest.raises(Exception, match="master_dtype"):
            c.create_model(model_name, {"w": w, "norm": norm}, exist_ok=True)
        with pytest.raises(Exception, match="master_dtype"):
            c.create_model(model_name + "-x", {"w": w}, master_dtype=torch.bfloat16)


def test_without_master_dtype_a_bf16_model_stays_bf16(daemon: Daemon, model_name: str) -> None:
    """Opt-in: nothing widens by itself (what the issue measured stays what it was)."""
    net = _net()
    opt = RemoteAdam(net.parameters(), lr=LR, server=daemon.grpc_address, model=model_name)
    try:
        _backward(net, 0)
        opt.step()
        model = daemon.registry.get(model_name)
        assert {p.dtype for p in model.params.values()} == {torch.bfloat16}
        assert opt._client.describe(model_name).master_dtype is None
    finally:
        opt.close()


def test_sync_two_ranks_average_widened_gradients(daemon: Daemon, model_name: str) -> None:
    """Each rank pushes bf16; the round sums the widened gradients in rank order and halves."""
    nets = [_net(), _net()]
    local = _net()
    opts = [
        RemoteAdam(
            n.parameters(),
            lr=LR,
            server=daemon.grpc_address,
            model=model_name,
            world_size=2,
            rank=r,
            master_dtype=torch.float32,
            transport="grpc",
        )
        for r, n in enumerate(nets)
    ]
    ref = MasterCopy(local, _one_group, lr=LR)
    from concurrent.futures import ThreadPoolExecutor

    try:
        with ThreadPoolExecutor(2) as pool:
            for step in range(10):
                grads = []
                for r, n in enumerate(nets):
                    _backward(n, step, rank=r)
                    grads.append([p.grad.float() for p in n.parameters() if p.grad is not None])
                list(pool.map(lambda o: o.step(), opts))
                ref.widen([(a + b) / 2 for a, b in zip(*grads)])
                ref.opt.step()
                ref.cast_back()
                _equal_nets(nets[0], local, step)
                _equal_nets(nets[1], local, step)
    finally:
        for o in opts:
            o.close()


def test_a_retried_push_is_applied_once(daemon: Daemon, model_name: str) -> None:
    w = torch.randn(6).to(torch.bfloat16)
    g = torch.randn(6).to(torch.bfloat16)
    with Client(daemon.grpc_address) as c:
        c.create_model(model_name, {"w": w}, lr=0.1, master_dtype=torch.float32)
        first = c.push_grad(model_name, {"w": g}, version=0, push_id="mw-1")
        model = daemon.registry.get(model_name)
        before = snapshot(model)
        again = c.push_grad(model_name, {"w": g}, version=0, push_id="mw-1")
        assert again.duplicate and again.version == first.version == 1
        assert_bitwise_equal(snapshot(model), before)


def test_snapshot_restores_master_weights_and_worker_dtypes(tmp_path: Path) -> None:
    w = torch.randn(7, 3).to(torch.bfloat16)
    with running_daemon(data_dir=tmp_path, http_port=-1) as d, Client(d.grpc_address) as c:
        c.create_model("m", {"w": w}, lr=1e-3, master_dtype=torch.float32)
        for k in range(5):
            c.push_grad("m", {"w": torch.full((7, 3), 0.1 * (k + 1)).to(torch.bfloat16)})
        before = snapshot(d.registry.get("m"))
        c.snapshot("m")
    assert before["param/w"].dtype == torch.float32
    with running_daemon(data_dir=tmp_path, http_port=-1) as d, Client(d.grpc_address) as c:
        assert d.snapshots.restored == {"m": 5}
        assert_bitwise_equal(snapshot(d.registry.get("m")), before)
        info = c.describe("m")
        assert info.master_dtype == torch.float32 and info.worker_dtypes == {"w": torch.bfloat16}
        pulled = c.pull_params("m")
        assert pulled["w"].dtype == torch.bfloat16
        assert torch.equal(pulled["w"], before["param/w"].to(torch.bfloat16))


@pytest.fixture
def shards() -> Iterator[list[Daemon]]:
    with running_daemon(http_port=-1) as a, running_daemon(http_port=-1) as b:
        yield [a, b]


def test_sharded_model_holds_master_weights_on_every_shard(
    shards: list[Daemon], model_name: str
) -> None:
    remote_net, local_net = _net(), _net()
    servers = ",".join(d.grpc_address for d in shards)
    opt = RemoteAdam(
        remote_net.named_parameters(),
        lr=LR,
        server=servers,
        model=model_name,
        master_dtype=torch.float32,
        slice_bytes=64,  # the first weight is sliced across both servers
    )
    ref = MasterCopy(local_net, _one_group, lr=LR)
    try:
        for step in range(10):
            _backward(remote_net, step)
            _backward(local_net, step)
            opt.step()
            ref.step()
            _equal_nets(remote_net, local_net, step)
        for d in shards:
            held = d.registry.get(model_name).params.values()
            assert held and {p.dtype for p in held} == {torch.float32}
    finally:
        opt.close()


def test_a_param_group_added_later_is_held_in_the_master_dtype(
    daemon: Daemon, model_name: str
) -> None:
    """Fine-tuning: a bf16 layer unfrozen later joins with master weights like the first ones."""
    remote_net, local_net = _net(), _net()
    first = list(remote_net.parameters())
    opt = RemoteAdam(
        first[:2], lr=LR, server=daemon.grpc_address, model=model_name, master_dtype=torch.float32
    )
    local = list(local_net.parameters())
    masters = [p.detach().float().clone() for p in local]
    ref = torch.optim.Adam(masters[:2], lr=LR, fused=True)
    try:
        opt.add_param_group({"params": first[2:], "lr": 2e-3})
        ref.add_param_group({"params": masters[2:], "lr": 2e-3})
        for step in range(10):
            _backward(remote_net, step)
            _backward(local_net, step)
            opt.step()
            for p, m in zip(local, masters):
                m.grad = None if p.grad is None else p.grad.float()
            ref.step()
            with torch.no_grad():
                for p, m in zip(local, masters):
                    p.copy_(m)
            _equal_nets(remote_net, local_net, step)
        held = daemon.registry.get(model_name).params
        assert {p.dtype for p in held.values()} == {torch.float32} and len(held) == 4
    finally:
        opt.close()


def test_async_pushes_step_the_master_each(daemon: Daemon, model_name: str) -> None:
    remote_net, local_net = _net(), _net()
    opt = RemoteAdam(
        remote_net.parameters(),
        lr=LR,
        server=daemon.grpc_address,
        model=model_name,
        mode="async",
        master_dtype=torch.float32,
    )
    ref = MasterCopy(local_net, _one_group, lr=LR)
    try:
        for step in range(10):
            _backward(remote_net, step)
            _backward(local_net, step)
            opt.step()
            ref.step()
            _equal_nets(remote_net, local_net, step)
        assert opt.version == 10
        _server_matches(daemon, model_name, ref)
    finally:
        opt.close()


def test_the_model_size_limit_counts_master_weights_as_held() -> None:
    """--max-model-bytes counts what the server allocates: a 2048-value bf16 model is 4 KiB on
    the worker but 8 KiB as fp32 masters, so a 6000-byte limit refuses it (and a param group
    added later is counted the same way)."""
    from adamd.client import LimitExceeded

    with running_daemon(max_model_bytes=6000) as d, Client(d.grpc_address) as c:
        w = {"w": torch.zeros(2048, dtype=torch.bfloat16)}
        with pytest.raises(LimitExceeded, match="bytes"):
            c.create_model("held", w, master_dtype=torch.float32)
        c.create_model("plain", w)  # 4 KiB as bf16: within the limit
        assert "held" not in [m.name for m in c.list_models()]
        small = {"v": torch.zeros(256, dtype=torch.bfloat16)}
        c.create_model("grows", small, master_dtype=torch.float32)  # 1 KiB held
        with pytest.raises(LimitExceeded, match="bytes"):  # 2.5 KiB more as bf16, 5 KiB held
            c.add_param_group("grows", {"u": torch.zeros(1280, dtype=torch.bfloat16)})
