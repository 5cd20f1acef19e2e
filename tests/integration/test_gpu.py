"""The server's CUDA path against a local torch.optim.Adam on the same GPU (skipped without CUDA).

On CUDA the server runs fused, capturable Adam with lr a float32 tensor on the device, uploads
gradients early through pinned buffers and steps by replaying a captured CUDA graph once a set of
gradients has warmed up (server/cuda/step.py). The reference is a local
Adam(fused=True, capturable=True, lr=<float32 CUDA tensor>) stepped eagerly on the same device:
parameters and every state tensor must stay bitwise equal, step after step.
"""

from __future__ import annotations

import copy
import threading
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
import torch

from adamd.client import Client, InvalidArgument, NonFiniteGradient, RemoteAdam
from adamd.server.cuda.step import WARMUP_STEPS

from ..conftest import assert_bitwise_equal, running_daemon, snapshot

try:  # the daemon's extras (gRPC health and reflection, prometheus-client, safetensors)
    from adamd.server import Daemon
except ImportError as exc:  # the core's GPU tests (test_gpu_path.py) need none of them
    pytest.skip(f"the daemon's dependencies are missing: {exc}", allow_module_level=True)

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
    # The local reference steps a capturable Adam without capturing it; torch warns about that.
    pytest.mark.filterwarnings("ignore:This instance was constructed with capturable=True"),
]

SHAPES: dict[str, tuple[int, ...]] = {"w": (64, 48), "b": (48,), "big": (256, 1024), "odd": (7, 3)}
ALL = frozenset(SHAPES)
LR = 1e-3
STEPS = 20
CHUNK = 64 << 10  # several chunks per large gradient, so early uploads overlap receiving
CONFIGS: list[dict[str, Any]] = [
    {},
    {"weight_decay": 0.1, "amsgrad": True},
    {"weight_decay": 0.1, "decoupled_weight_decay": True, "betas": (0.8, 0.99), "eps": 1e-6},
]


@pytest.fixture(scope="module")
def gpu_daemon() -> Iterator[Daemon]:
    # gRPC only (no HTTP: fastapi and uvicorn need not be installed); statistics on every step
    with running_daemon(device="cuda", stats_every=1, http_port=-1) as d:
        yield d


@pytest.fixture
def gpu_client(gpu_daemon: Daemon) -> Iterator[Client]:
    with Client(gpu_daemon.grpc_address, chunk_bytes=CHUNK) as c:
        yield c


def initial(names: Sequence[str] = tuple(SHAPES)) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    values = {n: torch.randn(s, generator=g) for n, s in SHAPES.items()}
    return {n: values[n] for n in names}


def grads_at(step: int, names: Any = ALL, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(10_000 * seed + step + 1)
    return {n: torch.randn(s, generator=g) for n, s in SHAPES.items() if n in names}


class Reference:
    """Local eager Adam on the GPU, configured as the server configures its own."""

    def __init__(self, init: Mapping[str, torch.Tensor], lr: float = LR, **config: Any):
        self.params = {n: t.to("cuda") for n, t in init.items()}
        self.lr = torch.tensor(lr, dtype=torch.float32, device="cuda")
        self.opt = torch.optim.Adam(
            list(self.params.values()), lr=self.lr, fused=True, capturable=True, **config
        )
        self.version = 0

    def add(self, name: str, value: torch.Tensor, **options: Any) -> None:
        p = self.params[name] = value.to("cuda")
        if "lr" in options:
            options["lr"] = torch.tensor(options["lr"], dtype=torch.float32, device="cuda")
        self.opt.add_param_group({"params": [p], **options})

    def step(self, grads: Mapping[str, torch.Tensor]) -> None:
        for n, p in self.params.items():
            p.grad = grads[n].to("cuda") if n in grads else None
        self.opt.step()
        for p in self.params.values():
            p.grad = None
        self.version += 1

    def snapshot(self) -> dict[str, torch.Tensor]:
        out = {f"param/{n}": p.detach().cpu() for n, p in self.params.items()}
        for n, p in self.params.items():
            for k, v in self.opt.state.get(p, {}).items():
                out[f"state/{n}/{k}"] = v.detach().cpu()
        out["version"] = torch.tensor(self.version)
        return out


def push_both(
    c: Client, name: str, ref: Reference, steps: range, names: Any = ALL, model: Any = None
) -> None:
    """Each step's gradients to the server and to the reference; with `model`, the two compared
    bitwise after every step."""
    for step in steps:
        c.push_grad(name, grads_at(step, names))
        ref.step(grads_at(step, names))
        if model is not None:
            assert_bitwise_equal(snapshot(model), ref.snapshot())


def test_graphed_steps_bitwise_equal_to_eager_fused_capturable_adam_sync_mode(
    gpu_daemon: Daemon, gpu_client: Client, model_name: str
) -> None:
    _check_graphed_steps(gpu_daemon, gpu_client, model_name, "sync", {})


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: "-".join(c) or "defaults")
def test_graphed_steps_bitwise_equal_to_eager_fused_capturable_adam_async_mode(
    gpu_daemon: Daemon, gpu_client: Client, model_name: str, config: dict[str, Any]
) -> None:
    _check_graphed_steps(gpu_daemon, gpu_client, model_name, "async", config)


def _check_graphed_steps(
    daemon: Daemon, c: Client, name: str, mode: str, config: dict[str, Any]
) -> None:
    init = initial()
    c.create_model(name, init, mode=mode, lr=LR, **config)
    model = daemon.registry.get(name)
    graphed = model.graphed
    assert graphed is not None
    group = model.optimizer.param_groups[0]
    assert group["fused"] and group["capturable"]
    lr = group["lr"]
    assert isinstance(lr, torch.Tensor) and lr.is_cuda and lr.dtype == torch.float32
    ref = Reference(init, **config)
    for step in range(STEPS):
        grads = grads_at(step)
        result = c.push_grad(name, grads, version=step)
        assert result.applied and result.version == step + 1
        ref.step(grads)
        assert_bitwise_equal(snapshot(model), ref.snapshot())
    assert (graphed.eager_steps, graphed.captures, graphed.replays) == (
        WARMUP_STEPS,
        1,
        STEPS - WARMUP_STEPS,
    )
    assert graphed.early_copies == len(SHAPES) * STEPS  # one pusher: every gradient came early
    assert model.optimizer.param_groups[0]["lr"] is lr
    # What clients and observers see stays a float.
    assert model.requested[0]["lr"] == LR and c.get_state(name)["param_groups"][0]["lr"] == LR
    entries = daemon.stats.get(model).entries()
    assert [e.lr for e in entries] == [(LR,)] * STEPS
    assert all(e.update_norm is not None and e.update_norm > 0 for e in entries)


def test_lr_schedule_fills_the_device_lr_in_place_and_keeps_the_graph(
    gpu_daemon: Daemon, model_name: str
) -> None:
    init = initial()
    params = {n: torch.nn.Parameter(t.clone()) for n, t in init.items()}
    remote = RemoteAdam(
        list(params.items()),
        lr=LR,
        server=gpu_daemon.grpc_address,
        model=model_name,
        world_size=1,
        rank=0,
        transport="grpc",
    )
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(remote, T_max=STEPS)
    ref = Reference(init)
    graph = None
    used = []
    for step in range(STEPS):
        grads = grads_at(step)
        for n, p in params.items():
            p.grad = grads[n].clone()
        used.append(remote.param_groups[0]["lr"])  # what this push carries
        ref.lr.fill_(used[-1])  # rounded to float32, as the server's fill_ rounds it
        remote.step()
        ref.step(grads)
        sched.step()
        model = gpu_daemon.registry.get(model_name)  # created by the first step
        assert_bitwise_equal(snapshot(model), ref.snapshot())
        graphed = model.graphed
        assert graphed is not None
        if step == WARMUP_STEPS:
            graph = graphed.graph_for(ALL)
    assert len(set(used)) == STEPS  # the schedule changed lr at every step
    assert graph is not None and graphed.graph_for(ALL) is graph
    assert graphed.captures == 1 and graphed.replays == STEPS - WARMUP_STEPS
    for n, p in params.items():  # the worker pulled what the server holds
        with model.on_device():
            assert torch.equal(p.detach(), model.params[n].cpu()), n


def test_add_param_group_recaptures_and_stays_equal(
    gpu_daemon: Daemon, gpu_client: Client, model_name: str
) -> None:
    init = initial()
    first = ("w", "b", "odd")
    gpu_client.create_model(model_name, {n: init[n] for n in first}, lr=LR)
    model = gpu_daemon.registry.get(model_name)
    graphed = model.graphed
    assert graphed is not None
    ref = Reference({n: init[n] for n in first})
    push_both(gpu_client, model_name, ref, range(6), first)
    old = graphed.graph_for(first)
    assert old is not None
    gpu_client.add_param_group(model_name, {"big": init["big"]}, lr=3e-3, weight_decay=0.01)
    ref.add("big", init["big"], lr=3e-3, weight_decay=0.01)
    assert graphed.graph_for(first) is None  # invalidated
    push_both(gpu_client, model_name, ref, range(6, 6 + WARMUP_STEPS + 4), model=model)
    new = graphed.graph_for(ALL)
    assert new is not None and new is not old and graphed.captures == 2
    assert isinstance(model.optimizer.param_groups[1]["lr"], torch.Tensor)
    assert model.requested[1]["lr"] == 3e-3


def test_load_state_recaptures_and_stays_equal(
    gpu_daemon: Daemon, gpu_client: Client, model_name: str
) -> None:
    init = initial()
    gpu_client.create_model(model_name, init, lr=LR, amsgrad=True)
    model = gpu_daemon.registry.get(model_name)
    graphed = model.graphed
    assert graphed is not None
    ref = Reference(init, amsgrad=True)
    saved = ref_saved = None
    for step in range(8):
        if step == 5:
            saved = gpu_client.get_state(model_name)
            ref_saved = copy.deepcopy(ref.opt.state_dict())
        gpu_client.push_grad(model_name, grads_at(step))
        ref.step(grads_at(step))
    old = graphed.graph_for(ALL)
    assert old is not None and saved is not None and ref_saved is not None
    # back to the state of step 5 (the parameters go on from where they are, on both sides)
    gpu_client.load_state(model_name, saved["state"], saved["param_groups"])
    ref.opt.load_state_dict(ref_saved)
    assert graphed.graph_for(ALL) is None
    assert_bitwise_equal(snapshot(model), ref.snapshot())
    push_both(gpu_client, model_name, ref, range(8, 8 + WARMUP_STEPS + 4), model=model)
    new = graphed.graph_for(ALL)
    assert new is not None and new is not old and graphed.captures == 2


def test_a_push_missing_a_gradient_falls_back_to_eager(
    gpu_daemon: Daemon, gpu_client: Client, model_name: str
) -> None:
    init = initial()
    gpu_client.create_model(model_name, init, mode="async", lr=LR, weight_decay=0.1)
    model = gpu_daemon.registry.get(model_name)
    graphed = model.graphed
    assert graphed is not None
    ref = Reference(init, weight_decay=0.1)
    part = ALL - {"b"}
    # full set: warm-up, capture; one push without "b": eager; full again: the same graph
    # four without "b": that set's own graph; full again: still the first graph (two kept)
    plan = [ALL] * 6 + [part] + [ALL] + [part] * (WARMUP_STEPS + 1) + [ALL] * 2
    full = None
    for step, names in enumerate(plan):
        eager, replays = graphed.eager_steps, graphed.replays
        gpu_client.push_grad(model_name, grads_at(step, names))
        ref.step(grads_at(step, names))
        assert_bitwise_equal(snapshot(model), ref.snapshot())
        if step == 6:
            assert graphed.eager_steps == eager + 1 and graphed.replays == replays
            assert graphed.graph_for(ALL) is full
        if step == 5:
            full = graphed.graph_for(ALL)
            assert full is not None
    assert graphed.graph_for(ALL) is full and graphed.graph_for(part) is not None
    assert graphed.captures == 2


def test_found_inf_and_rejected_pushes_leave_state_bitwise_unchanged(
    gpu_daemon: Daemon, gpu_client: Client, model_name: str
) -> None:
    init = initial()
    gpu_client.create_model(model_name, init, lr=LR)
    model = gpu_daemon.registry.get(model_name)
    graphed = model.graphed
    assert graphed is not None
    ref = Reference(init)
    for step in range(WARMUP_STEPS + 2):
        gpu_client.push_grad(model_name, grads_at(step), version=step)
        ref.step(grads_at(step))
    graph = graphed.graph_for(ALL)
    assert graph is not None
    before = snapshot(model)
    version = model.version
    r = gpu_client.push_grad(model_name, grads_at(100), version=version, found_inf=True)
    assert not r.applied and r.found_inf and r.version == version
    assert_bitwise_equal(snapshot(model), before)
    bad = grads_at(101)
    bad["big"][17, 3] = float("nan")
    with pytest.raises(NonFiniteGradient):
        gpu_client.push_grad(model_name, bad, version=version)
    assert_bitwise_equal(snapshot(model), before)
    with pytest.raises(InvalidArgument):
        gpu_client.push_grad(model_name, {**grads_at(102), "w": torch.zeros(3)}, version=version)
    assert_bitwise_equal(snapshot(model), before)
    for step in range(WARMUP_STEPS + 2, WARMUP_STEPS + 6):
        gpu_client.push_grad(model_name, grads_at(step), version=model.version)
        ref.step(grads_at(step))
        assert_bitwise_equal(snapshot(model), ref.snapshot())
    assert graphed.graph_for(ALL) is graph and graphed.captures == 1


def test_sync_round_of_two_sums_on_the_host_then_uploads(
    gpu_daemon: Daemon, model_name: str
) -> None:
    init = initial()
    with (
        Client(gpu_daemon.grpc_address, chunk_bytes=CHUNK) as c0,
        Client(gpu_daemon.grpc_address, chunk_bytes=CHUNK) as c1,
        ThreadPoolExecutor(2) as pool,
    ):
        c0.create_model(model_name, init, world_size=2, lr=LR)
        model = gpu_daemon.registry.get(model_name)
        graphed = model.graphed
        assert graphed is not None
        ref = Reference(init)
        for step in range(8):
            g0, g1 = grads_at(step, seed=0), grads_at(step, seed=1)
            futures = [
                pool.submit(c.push_grad, model_name, g, version=step, rank=rank)
                for rank, (c, g) in enumerate(((c0, g0), (c1, g1)))
            ]
            assert all(f.result(timeout=60).contributors == 2 for f in futures)
            ref.step({n: g0[n].clone().add_(g1[n]).div_(2) for n in g0})  # as the server sums
            assert_bitwise_equal(snapshot(model), ref.snapshot())
    assert graphed.early_copies == 0  # a push that is summed with others is uploaded after
    assert graphed.captures == 1 and graphed.replays == 8 - WARMUP_STEPS


def test_concurrent_async_pushes_each_apply_once_with_their_own_gradient(
    gpu_daemon: Daemon, model_name: str
) -> None:
    """Pushes stream at the same time: one at a time holds the landing buffers, the others are
    uploaded at their step, pinned buffers are reused only after their copies. Each reply's
    version says where its step fell, so the reference replays them in that order."""
    init = initial()
    workers, per_worker = 4, 6
    with Client(gpu_daemon.grpc_address, chunk_bytes=CHUNK) as c:
        c.create_model(model_name, init, mode="async", lr=LR, max_staleness=1000)
    model = gpu_daemon.registry.get(model_name)
    graphed = model.graphed
    assert graphed is not None
    applied: dict[int, dict[str, torch.Tensor]] = {}
    lock = threading.Lock()

    def worker(w: int) -> None:
        with Client(gpu_daemon.grpc_address, chunk_bytes=CHUNK) as wc:
            for i in range(per_worker):
                grads = grads_at(i, seed=w + 1)
                r = wc.push_grad(model_name, grads)
                assert r.applied
                with lock:
                    applied[r.version] = grads

    with ThreadPoolExecutor(workers) as pool:
        for f in [pool.submit(worker, w) for w in range(workers)]:
            f.result(timeout=120)
    assert sorted(applied) == list(range(1, workers * per_worker + 1))
    ref = Reference(init)
    for v in sorted(applied):
        ref.step(applied[v])
    assert_bitwise_equal(snapshot(model), ref.snapshot())
    assert graphed.captures == 1 and graphed.early_copies > 0
