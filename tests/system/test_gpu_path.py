"""The CUDA path under load, at the core (HostedModel, registry, stats, views; no sockets, so these
run where the daemon's HTTP and metrics extras are not installed). Skipped without CUDA.

What each test would catch on a first run:
- two models capturing at the same moment while other threads pull, snapshot and read
  statistics (a process-wide capture lock deadlocks it; a reader off the model's stream reads
  torn or stale tensors; 64 MB tensors make copy races wide), bf16 and fp16 parameters;
- statistics on the step path never synchronize (torch's sync debug mode raises if they do);
- pinned staging: exactly-sized registered buffers, trimmed back after bursts, and neither
  torch's pinned cache nor its device cache growing from one burst to the next;
- a model deleted while pushes and pulls are in flight, then created again (blocks freed
  while still in use would corrupt the new model);
- a snapshot restored onto the GPU continues bitwise equal; the download imports on a CPU;
- a capture broken at the CUDA level turns graphs off for the process (in a subprocess);
- memory_bytes counts the landing buffers.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import torch

from adamd.server.core import staging
from adamd.server.core.model import HostedModel, PushMeta, StepRecord
from adamd.server.core.registry import ModelRegistry, ModelSpec
from adamd.server.core.stats import ModelStats
from adamd.server.cuda.step import WARMUP_STEPS, graphs_disabled
from adamd.server.errors import ServerError
from adamd.server.http import views

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
    pytest.mark.filterwarnings("ignore:This instance was constructed with capturable=True"),
]

DEV = torch.device("cuda")
LR = 1e-3
BIG = 16 << 20  # elements: 64 MB of fp32 (32 MB of bf16)
ROOT = Path(__file__).resolve().parents[2]


# --- driving a model on the GPU without sockets --------------------------------------------------


def gpu_model(name: str, init: Mapping[str, torch.Tensor], **options: Any) -> HostedModel:
    return HostedModel(
        name,
        {n: t.to(DEV) for n, t in init.items()},
        [{"params": list(init), "lr": LR, **options}],
        device=DEV,
        mode="async",
        max_staleness=1 << 30,
    )


def push(model: HostedModel, grads: Mapping[str, torch.Tensor]) -> Any:
    """One push through the pooled pinned buffers, its bytes written in two chunks per tensor
    (each gradient's early upload starts when its last chunk lands)."""
    specs = [(n, tuple(g.shape), g.dtype) for n, g in grads.items()]
    ticket = model.begin_push(PushMeta(), specs)
    assert ticket.sink is not None
    for i, name in enumerate(ticket.names):
        data = grads[name].contiguous().view(-1).view(torch.uint8).numpy().tobytes()
        half = len(data) // 2 // 8 * 8
        ticket.sink.write(i, 0, memoryview(data[:half]))
        ticket.sink.write(i, half, memoryview(data[half:]))
    return model.finish_push(ticket).wait()


def init_values(shapes: Mapping[str, tuple[tuple[int, ...], torch.dtype]], seed: int) -> Any:
    g = torch.Generator().manual_seed(seed)
    return {n: torch.randn(s, generator=g).to(d) for n, (s, d) in shapes.items()}


class Reference:
    """The server's configuration as a local eager Adam on the same GPU (legacy stream)."""

    def __init__(self, init: Mapping[str, torch.Tensor], **options: Any):
        self.params = {n: t.to(DEV) for n, t in init.items()}
        lr = torch.tensor(LR, dtype=torch.float32, device=DEV)
        self.opt = torch.optim.Adam(
            list(self.params.values()), lr=lr, fused=True, capturable=True, **options
        )

    def step(self, grads: Mapping[str, torch.Tensor]) -> None:
        for n, p in self.params.items():
            p.grad = grads[n].to(DEV) if n in grads else None
        self.opt.step()
        for p in self.params.values():
            p.grad = None

    def host(self) -> dict[str, torch.Tensor]:
        out = {f"param/{n}": p.detach().cpu() for n, p in self.params.items()}
        for n, p in self.params.items():
            for k, v in self.opt.state.get(p, {}).items():
                out[f"state/{n}/{k}"] = v.detach().cpu()
        return out


def host_state(model: HostedModel) -> dict[str, torch.Tensor]:
    """The model's parameters and Adam state on the host, copied on the model's stream."""
    with model.locked(), model.on_device():
        out = {f"param/{n}": p.detach().to("cpu") for n, p in model.params.items()}
        for n, p in model.params.items():
            for k, v in model.optimizer.state.get(p, {}).items():
                out[f"state/{n}/{k}"] = v.detach().to("cpu")
    return out


def assert_equal(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


def digest(t: torch.Tensor) -> str:
    return hashlib.sha1(t.contiguous().view(-1).view(torch.uint8).numpy().tobytes()).hexdigest()


def grads_at(
    shapes: Mapping[str, tuple[tuple[int, ...], torch.dtype]], step: int, seed: int
) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 * seed + step + 1)
    return {n: torch.randn(s, generator=g).to(d) for n, (s, d) in shapes.items()}


@pytest.fixture(autouse=True)
def _graphs_on() -> Iterator[None]:
    assert graphs_disabled() is None, "an earlier test broke a capture in this process"
    yield


# --- two models capturing at once, with readers ---------------------------------------------------

FP32 = {"big": ((BIG,), torch.float32), "w": ((96, 40), torch.float32), "b": ((40,), torch.float32)}
HALF = {
    "big": ((BIG,), torch.bfloat16),
    "w": ((96, 40), torch.float16),
    "b": ((7, 3), torch.bfloat16),
}


class _Meeting:
    """Holds each model's capture open until both are open and a third model has been pulled
    meanwhile: proof that captures of different models neither exclude each other nor stall
    other models' readers."""

    def __init__(self) -> None:
        self.capturing = {"fp32": threading.Event(), "half": threading.Event()}
        self.pulled_during = threading.Event()

    def hook(self, key: str) -> Callable[..., None]:
        def pre_step(*_: Any) -> None:
            if not torch.cuda.is_current_stream_capturing():
                return
            self.capturing[key].set()
            for other in self.capturing.values():
                assert other.wait(60), "the two captures did not overlap (a process-wide lock?)"
            assert self.pulled_during.wait(60), "no other model could be pulled during captures"

        return pre_step


def test_two_models_capture_at_once_while_other_threads_pull_snapshot_and_read_stats() -> None:
    steps = WARMUP_STEPS + 5
    meeting = _Meeting()
    models: dict[str, HostedModel] = {}
    refs: dict[str, Reference] = {}
    stats: dict[str, ModelStats] = {}
    for key, shapes in (("fp32", FP32), ("half", HALF)):
        init = init_values(shapes, seed=len(models))
        models[key] = gpu_model(f"m-{key}", init, weight_decay=0.01)
        refs[key] = Reference(init, weight_decay=0.01)
        stats[key] = ModelStats(models[key], every=1)
        models[key].observers.append(stats[key].observe)
        models[key].optimizer.register_step_pre_hook(meeting.hook(key))
    bystander = gpu_model("bystander", init_values(FP32, seed=9))
    # Made one after another, the three models' streams are distinct (torch's pool hands out 32
    # per priority in turn); were two shared, their captures would rightly exclude each other.
    steps_streams = [
        m.graphed._get_streams()[0] for m in (*models.values(), bystander) if m.graphed
    ]
    assert len({s.cuda_stream for s in steps_streams}) == 3
    ref_digests: dict[tuple[str, int], str] = {}  # (model, version) -> digest of "big"
    seen: list[tuple[str, int, str]] = []  # what consistent readers saw
    stop = threading.Event()
    errors: list[BaseException] = []
    for key, ref in refs.items():
        ref_digests[(key, 0)] = digest(ref.params["big"].cpu())

    def pusher(key: str) -> None:
        shapes = FP32 if key == "fp32" else HALF
        for step in range(steps):
            grads = grads_at(shapes, step, seed=3 if key == "fp32" else 4)
            r = push(models[key], grads)
            assert r.applied and r.version == step + 1
            refs[key].step(grads)
            ref_digests[(key, step + 1)] = digest(refs[key].params["big"].cpu())

    def reader(key: str) -> None:
        model = models[key]
        while not stop.is_set():
            seq, version = model.read_begin()
            (big,) = model.host_copies(["big"])
            if model.read_consistent(seq):
                seen.append((key, version, digest(big)))
            stats[key].entries()
            stats[key].param_stats()
            views.snapshot_payload(model)

    def bystander_reader() -> None:
        while not stop.is_set():
            if all(e.is_set() for e in meeting.capturing.values()):
                bystander.host_copies(list(FP32))
                meeting.pulled_during.set()
            time.sleep(0.001)

    def guarded(fn: Callable[..., None], *args: Any) -> Callable[[], None]:
        def run() -> None:
            try:
                fn(*args)
            except BaseException as exc:
                errors.append(exc)
                stop.set()
                meeting.pulled_during.set()
                for e in meeting.capturing.values():
                    e.set()

        return run

    readers = [threading.Thread(target=guarded(reader, k)) for k in models for _ in range(2)]
    readers.append(threading.Thread(target=guarded(bystander_reader)))
    pushers = [threading.Thread(target=guarded(pusher, k)) for k in models]
    for t in readers + pushers:
        t.start()
    for t in pushers:
        t.join(300)
    stop.set()
    for t in readers:
        t.join(60)
    assert not errors, errors
    for key, model in models.items():
        graphed = model.graphed
        assert graphed is not None
        assert (graphed.captures, graphed.replays) == (1, steps - WARMUP_STEPS), key
        assert_equal(host_state(model), refs[key].host())
        entries = stats[key].entries()
        assert len(entries) == steps and all(e.update_norm is not None for e in entries)
    assert seen, "no reader saw a consistent version"
    for key, version, d in seen:
        assert d == ref_digests[(key, version)], (key, version)


# --- statistics never synchronize on the step path -----------------------------------------------


def test_stats_on_the_step_path_never_synchronize_and_match_the_step() -> None:
    shapes = {"w": ((256, 64), torch.float32), "b": ((64,), torch.float32)}
    init = init_values(shapes, seed=1)
    model = gpu_model("stats", init, weight_decay=0.1, decoupled_weight_decay=True)
    stats = ModelStats(model, every=1)
    for step in range(WARMUP_STEPS + 2):
        push(model, grads_at(shapes, step, seed=1))
    before = host_state(model)
    grads = grads_at(shapes, 99, seed=1)
    push(model, grads)  # the step the record describes (no observer attached yet)
    after = host_state(model)
    record = StepRecord(
        model="stats",
        version=model.version,
        applied=True,
        wall_time=time.time(),
        step_seconds=0.0,
        contributors=1,
        partial=False,
        ranks=(0,),
        losses=(),
        scalars={},
        grads={n: g.pin_memory() for n, g in grads.items()},
    )
    torch.cuda.synchronize()
    with model.locked():
        torch.cuda.set_sync_debug_mode("error")
        try:
            stats.observe(record)  # raises on any synchronizing call (.item(), a D2H copy)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    (entry,) = stats.entries()
    upd = torch.stack([(before[f"param/{n}"] - after[f"param/{n}"]).norm() for n in shapes]).norm()
    assert entry.update_norm == pytest.approx(float(upd), rel=1e-3)
    gn = torch.stack([g.norm() for g in grads.values()]).norm()
    assert entry.grad_norm == pytest.approx(float(gn), rel=1e-5)


# --- pinned staging and allocator statistics across bursts ---------------------------------------


def _burst(model: HostedModel, n: int, shapes: Any) -> None:
    """n pushes whose pinned sets are all taken before any finishes."""
    ready = threading.Barrier(n)

    def one(i: int) -> None:
        grads = grads_at(shapes, i, seed=7)
        specs = [(k, tuple(g.shape), g.dtype) for k, g in grads.items()]
        ticket = model.begin_push(PushMeta(), specs)
        ready.wait(60)
        assert ticket.sink is not None
        for j, name in enumerate(ticket.names):
            data = grads[name].contiguous().view(-1).view(torch.uint8).numpy().tobytes()
            ticket.sink.write(j, 0, memoryview(data))
        model.finish_push(ticket).wait()

    with ThreadPoolExecutor(n) as pool:
        for f in [pool.submit(one, i) for i in range(n)]:
            f.result(120)


def _host_cache_bytes() -> int:
    s = torch.cuda.host_memory_stats()
    for key in ("allocated_bytes.current", "allocated_bytes.all.current"):
        if key in s:
            return int(s[key])
    return 0


def _wait_trimmed(model: HostedModel, sets: int) -> None:
    deadline = time.monotonic() + 10
    while model.staging.sets > sets and time.monotonic() < deadline:
        time.sleep(0.05)
    assert model.staging.sets == sets


def test_pinned_staging_is_exact_and_allocators_do_not_grow_after_trim() -> None:
    shapes = {"big": ((BIG,), torch.float32), "b": ((1000,), torch.float32)}
    model = gpu_model("burst", init_values(shapes, seed=2))
    model.staging.trim_after_s = 0.5
    one_set = staging.layout(model.params)[1]
    pinned_set = (one_set + 4095) // 4096 * 4096  # registered pages, not a power of two
    base_registered = staging.registered_bytes()
    _burst(model, 6, shapes)
    assert model.staging.sets == 6
    assert staging.registered_bytes() - base_registered == 6 * pinned_set
    gs = model.staging.acquire()
    assert all(b.is_pinned() for b in gs.buffers.values())
    model.staging.release(gs)
    _wait_trimmed(model, 1)
    torch.cuda.synchronize()
    after_first = (
        staging.registered_bytes(),
        _host_cache_bytes(),
        torch.cuda.memory_allocated(),
        torch.cuda.memory_reserved(),
    )
    assert after_first[0] - base_registered == pinned_set  # the trimmed sets went back
    _burst(model, 6, shapes)
    _wait_trimmed(model, 1)
    torch.cuda.synchronize()
    after_second = (
        staging.registered_bytes(),
        _host_cache_bytes(),
        torch.cuda.memory_allocated(),
        torch.cuda.memory_reserved(),
    )
    assert after_second[0] == after_first[0], "pinned staging grew"
    assert after_second[1] <= after_first[1], "torch's pinned cache grew"
    assert after_second[2] == after_first[2], "device memory in use grew"
    assert after_second[3] <= after_first[3], "the device cache grew"
    assert model.version == 12


# --- deletion during traffic ---------------------------------------------------------------------


def create(registry: ModelRegistry, name: str, init: Mapping[str, torch.Tensor]) -> HostedModel:
    spec = ModelSpec(
        name,
        [(n, tuple(t.shape), t.dtype) for n, t in init.items()],
        [{"params": list(init), "lr": LR}],
        mode="async",
        max_staleness=1 << 30,
    )
    pending = registry.begin_create(spec)
    for i, t in enumerate(init.values()):
        data = t.contiguous().view(-1).view(torch.uint8).numpy().tobytes()
        pending.sink.write(i, 0, memoryview(data))
    model, created = registry.commit(pending)
    assert created
    return model


def test_a_model_deleted_during_traffic_then_created_again_stays_exact() -> None:
    registry = ModelRegistry(DEV)
    init = init_values(FP32, seed=5)
    model = create(registry, "gone", init)
    stop = threading.Event()
    outcomes: list[str] = []

    def pusher() -> None:
        step = 0
        while not stop.is_set():
            try:
                push(registry.get("gone"), grads_at(FP32, step, seed=5))
                outcomes.append("ok")
            except ServerError as exc:
                outcomes.append(type(exc).__name__)
            step += 1

    def reader() -> None:
        while not stop.is_set():
            try:
                registry.get("gone").host_copies(list(FP32))
            except ServerError:
                pass

    threads = [threading.Thread(target=f) for f in (pusher, pusher, reader, reader)]
    for t in threads:
        t.start()
    while model.version < WARMUP_STEPS + 3:  # past the capture
        time.sleep(0.01)
    registry.delete("gone")
    assert model.closed
    time.sleep(0.2)
    stop.set()
    for t in threads:
        t.join(60)
    assert "ok" in outcomes and set(outcomes) <= {"ok", "NotFound", "Aborted", "InvalidArgument"}
    torch.cuda.synchronize()  # no CUDA error surfaced from the freed model
    # Recreated under the same name: its blocks come from what the old one freed.
    again = create(registry, "gone", init)
    ref = Reference(init)
    for step in range(WARMUP_STEPS + 3):
        grads = grads_at(FP32, 100 + step, seed=5)
        push(again, grads)
        ref.step(grads)
    assert_equal(host_state(again), ref.host())


# --- snapshots -----------------------------------------------------------------------------------


def test_a_snapshot_restored_onto_the_gpu_continues_bitwise(tmp_path: Path) -> None:
    pytest.importorskip("safetensors")
    from adamd.server.storage import format as fmt
    from adamd.server.storage.snapshots import build_model

    shapes = {"w": ((512, 256), torch.bfloat16), "b": ((256,), torch.float32)}
    model = gpu_model("snap", init_values(shapes, seed=6), amsgrad=True)
    for step in range(WARMUP_STEPS + 2):
        push(model, grads_at(shapes, step, seed=6))
    file = fmt.write(fmt.capture(model), tmp_path, 1)
    restored = build_model(fmt.load(file), ModelRegistry(DEV))
    assert restored.device.type == "cuda" and restored.version == model.version
    assert_equal(host_state(restored), host_state(model))
    for step in range(WARMUP_STEPS + 3):  # both step on (one replays, the other warms up)
        grads = grads_at(shapes, 50 + step, seed=6)
        push(model, grads)
        push(restored, grads)
        assert_equal(host_state(restored), host_state(model))
    assert restored.graphed is not None and restored.graphed.captures == 1


def test_the_snapshot_download_of_a_gpu_model_imports_on_a_cpu() -> None:
    pytest.importorskip("safetensors")  # snapshot_interop imports the snapshot format
    from adamd.server.storage import interop as snapshot_interop

    shapes = {"w": ((64, 32), torch.float32), "b": ((32,), torch.float32)}
    model = gpu_model("dl", init_values(shapes, seed=8), weight_decay=0.1)
    for step in range(WARMUP_STEPS + 2):
        push(model, grads_at(shapes, step, seed=8))
    payload = views.snapshot_payload(model)
    (group,) = payload["optimizer"]["param_groups"]
    assert group["capturable"] is False and isinstance(group["lr"], float)
    params, groups, state, _ = snapshot_interop.from_torch_checkpoint(payload)
    cpu = HostedModel("dl-cpu", params, groups, device=torch.device("cpu"))
    cpu.load_state(state, groups)
    on_gpu = host_state(model)
    for n in shapes:
        assert torch.equal(cpu.params[n], on_gpu[f"param/{n}"])
        for k, v in cpu.optimizer.state[cpu.params[n]].items():
            assert torch.equal(v, on_gpu[f"state/{n}/{k}"].to(v.dtype)), (n, k)


# --- copies out, memory accounting -------------------------------------------------------------


@pytest.mark.parametrize("wire", [None, torch.bfloat16], ids=["same", "bf16-wire"])
def test_host_copies_of_large_and_half_tensors_are_exact(wire: torch.dtype | None) -> None:
    model = gpu_model("copies", init_values(HALF, seed=10))
    names = list(HALF)
    for n, t in zip(names, model.host_copies(names, wire)):
        p = model.params[n]
        want = p.detach().to(wire if wire is not None and p.is_floating_point() else p.dtype)
        torch.cuda.synchronize()
        assert t.device.type == "cpu" and torch.equal(t, want.cpu()), n


def test_memory_bytes_counts_static_and_landing_gradients() -> None:
    shapes = {"w": ((1024, 256), torch.float32), "b": ((256,), torch.float32)}
    model = gpu_model("mem", init_values(shapes, seed=11))
    push(model, grads_at(shapes, 0, seed=11))
    graphed = model.graphed
    assert graphed is not None and graphed.early_copies == len(shapes)
    param_bytes = sum(p.numel() * p.element_size() for p in model.params.values())
    memory = model.memory_bytes()
    assert memory["staging"] == model.staging.nbytes + 2 * param_bytes  # static + landing


# --- a capture broken at the CUDA level ----------------------------------------------------------

_BROKEN_CAPTURE = """
import torch
from adamd.server.cuda.step import WARMUP_STEPS, graphs_disabled
from tests.system.test_gpu_path import FP32, Reference, assert_equal, gpu_model, grads_at, host_state, init_values, push

other = gpu_model("other", init_values(FP32, seed=1))
other_ref = Reference(init_values(FP32, seed=1))
init = init_values(FP32, seed=0)
model, ref = gpu_model("broken", init), Reference(init)
probe = torch.ones(1, device="cuda")

def sync_in_capture(*_):
    if torch.cuda.is_current_stream_capturing():
        probe.item()  # a synchronizing call: invalidates the capture

model.optimizer.register_step_pre_hook(sync_in_capture)
for step in range(WARMUP_STEPS + 3):
    grads = grads_at(FP32, step, seed=0)
    assert push(model, grads).applied
    ref.step(grads)
assert graphs_disabled(), "graphs still on after a broken capture"
assert model.graphed.captures == 0 and model.version == WARMUP_STEPS + 3
assert_equal(host_state(model), ref.host())
for step in range(WARMUP_STEPS + 3):  # every other model now steps eagerly, still exact
    grads = grads_at(FP32, step, seed=1)
    push(other, grads)
    other_ref.step(grads)
assert other.graphed.captures == 0
assert_equal(host_state(other), other_ref.host())
x = torch.empty(64 << 20, dtype=torch.uint8, device="cuda")  # the allocator still serves
del x
torch.cuda.synchronize()
print("BROKEN-CAPTURE-OK", graphs_disabled())
"""


def test_a_capture_broken_at_the_cuda_level_turns_graphs_off_for_the_process() -> None:
    """In a subprocess: the broken capture leaves this process's allocator counting it."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), *sys.path])}
    run = subprocess.run(
        [sys.executable, "-c", _BROKEN_CAPTURE],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0 and "BROKEN-CAPTURE-OK" in run.stdout, run.stdout + run.stderr
