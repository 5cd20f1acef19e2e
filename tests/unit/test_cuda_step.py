"""What of the CUDA step path runs without CUDA: when GraphedStep warms up, captures, replays,
falls back or drops a graph (device work replaced by stand-ins that run the real Adam step where
the real thing would), the fingerprint that decides whether a graph is stale, and the TensorSink
callback that starts early uploads. The device work itself is tested in test_gpu.py."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch

from adamd.protocol import ProtocolError
from adamd.protocol.frames import TensorSink
from adamd.server.cuda import graph_guards
from adamd.server.cuda.step import (
    MAX_CAPTURES,
    WARMUP_STEPS,
    CaptureBroken,
    Fingerprint,
    GraphedStep,
    graphs_disabled,
)

CPU = torch.device("cpu")
SHAPES = {"w": (4, 3), "b": (3,), "v": (5,)}


class _Graph:
    def __init__(self, n: int) -> None:
        self.n = n


class Recorder(GraphedStep):
    """GraphedStep with its device work replaced: eager and plain steps run optimizer.step();
    a capture runs nothing and returns a stand-in graph (as a real capture runs nothing); a replay
    runs optimizer.step() (what the graph's kernels do)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.log: list[tuple[str, Any]] = []
        self.fail_capture = False
        self.broken_capture = False  # capture_end itself fails (a CUDA-level capture error)
        self.quiesced = 0

    def _plain_step(self) -> None:
        self.log.append(("plain", None))
        self.optimizer.step()

    def _eager(self) -> None:
        self.log.append(("eager", None))
        self.optimizer.step()

    def _capture(self) -> Any:
        if self.fail_capture:
            raise RuntimeError("operation not permitted when stream is capturing")
        if self.broken_capture:
            raise CaptureBroken("capture_end") from RuntimeError(
                "CUDA error: operation failed due to a previous error during capture"
            )
        graph = _Graph(self.captures + 1)
        self.log.append(("capture", graph))
        return graph

    def _replay(self, graph: Any) -> None:
        self.log.append(("replay", graph))
        self.optimizer.step()

    def _quiesce(self) -> None:
        self.quiesced += 1


def _params(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {n: torch.randn(s, generator=g) for n, s in SHAPES.items()}


def _grads(step: int, names: Any = SHAPES) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + step)
    return {n: torch.randn(s, generator=g) for n, s in SHAPES.items() if n in names}


class Setup:
    """A model-like pair: params + Adam driven through Recorder, and a plain local reference."""

    def __init__(self, lr: Any = 0.01, capturable: bool = True, **kwargs: Any) -> None:
        self.params = _params()
        self.ref_params = {n: t.clone() for n, t in self.params.items()}
        opts: dict[str, Any] = {"fused": True, "capturable": capturable}
        self.opt = torch.optim.Adam(
            list(self.params.values()), lr=copy.deepcopy(lr), **opts, **kwargs
        )
        self.ref = torch.optim.Adam(
            list(self.ref_params.values()), lr=copy.deepcopy(lr), **opts, **kwargs
        )
        self.stepper = Recorder(self.opt, self.params, CPU)

    def step(self, i: int, names: Any = SHAPES) -> str:
        grads = _grads(i, names)
        for params in (self.params, self.ref_params):
            for n, p in params.items():
                p.grad = grads.get(n)
        self.stepper.run(frozenset(grads))
        self.ref.step()
        for params in (self.params, self.ref_params):
            for p in params.values():
                p.grad = None
        return self.stepper.log[-1][0]

    def assert_equal(self) -> None:
        for n in self.params:
            assert torch.equal(self.params[n], self.ref_params[n]), n
        for p, q in zip(self.params.values(), self.ref_params.values()):
            assert self.opt.state[p].keys() == self.ref.state[q].keys()
            for k in self.opt.state[p]:
                assert torch.equal(self.opt.state[p][k], self.ref.state[q][k]), k


def test_warmup_steps_are_the_first_real_steps_then_capture_and_replay() -> None:
    s = Setup()
    kinds = [s.step(i) for i in range(10)]
    assert kinds == ["eager"] * WARMUP_STEPS + ["replay"] * (10 - WARMUP_STEPS)
    assert [k for k, _ in s.stepper.log].count("capture") == 1
    # the capture step applied its step once (by the replay), no warm-up step was extra
    s.assert_equal()
    assert float(s.opt.state[s.params["w"]]["step"]) == 10
    g = s.stepper
    assert (g.eager_steps, g.captures, g.replays) == (WARMUP_STEPS, 1, 10 - WARMUP_STEPS)
    assert g.graph_for(SHAPES) is s.stepper.log[WARMUP_STEPS][1]


def test_lr_tensor_filled_in_place_keeps_the_graph_other_changes_drop_it() -> None:
    s = Setup(lr=torch.tensor(0.01))  # a tensor on the model's device (here the CPU)
    for i in range(5):
        s.step(i)
    graph = s.stepper.graph_for(SHAPES)
    for i in range(5, 8):  # what an lr schedule does to a tensor lr
        for opt in (s.opt, s.ref):
            opt.param_groups[0]["lr"].fill_(0.01 / (i + 1))
        assert s.step(i) == "replay"
    assert s.stepper.graph_for(SHAPES) is graph
    for opt in (s.opt, s.ref):  # betas are floats in the kernel's arguments: baked in
        opt.param_groups[0]["betas"] = (0.8, 0.99)
    kinds = [s.step(i) for i in range(8, 13)]
    assert kinds == ["eager"] * WARMUP_STEPS + ["replay"] * 2
    assert s.stepper.graph_for(SHAPES) is not graph and s.stepper.captures == 2
    s.assert_equal()


def test_a_push_missing_a_gradient_steps_eagerly_and_graphs_are_kept_per_set() -> None:
    s = Setup()
    for i in range(5):
        s.step(i)
    full = s.stepper.graph_for(SHAPES)
    assert s.step(5, {"w", "v"}) == "eager"
    assert s.step(6) == "replay" and s.stepper.log[-1][1] is full
    kinds = [s.step(i, {"w", "v"}) for i in range(7, 7 + WARMUP_STEPS + 1)]
    assert kinds == ["eager"] * (WARMUP_STEPS - 1) + ["replay"] * 2  # one eager step was at 5
    part = s.stepper.graph_for({"w", "v"})
    assert part is not None and part is not full
    assert s.step(20) == "replay" and s.stepper.log[-1][1] is full
    # a third set: its capture evicts the least recently used graph (max_graphs=2)
    for i in range(21, 21 + WARMUP_STEPS + 1):
        s.step(i, {"b"})
    assert s.stepper.graph_for({"b"}) is not None
    assert s.stepper.graph_for({"w", "v"}) is None and s.stepper.graph_for(SHAPES) is full
    s.assert_equal()
    # "b" got no step while it was left out
    assert float(s.opt.state[s.params["b"]]["step"]) == 5 + 1 + 1 + WARMUP_STEPS + 1


def test_invalidate_and_replaced_state_or_groups_recapture() -> None:
    s = Setup()
    for i in range(5):
        s.step(i)
    s.stepper.invalidate()
    assert s.stepper.graph_for(SHAPES) is None
    assert [s.step(i) for i in range(5, 9)] == ["eager"] * WARMUP_STEPS + ["replay"]
    graph = s.stepper.graph_for(SHAPES)
    # load_state_dict replaces the state tensors: stale even without invalidate()
    for opt in (s.opt, s.ref):
        opt.load_state_dict(copy.deepcopy(opt.state_dict()))
    assert s.step(9) == "eager" and s.stepper.graph_for(SHAPES) is None
    assert [s.step(i) for i in range(10, 13)] == ["eager"] * (WARMUP_STEPS - 1) + ["replay"]
    assert s.stepper.graph_for(SHAPES) is not graph
    s.assert_equal()


def test_not_capturable_or_failed_capture_steps_plainly_each_step_once() -> None:
    s = Setup(capturable=False)
    assert [s.step(i) for i in range(6)] == ["plain"] * 6
    s.assert_equal()
    f = Setup()
    f.stepper.fail_capture = True
    kinds = [f.step(i) for i in range(7)]
    assert kinds == ["eager"] * (WARMUP_STEPS + 1) + ["plain"] * (6 - WARMUP_STEPS)
    assert f.stepper.disabled and f.stepper.captures == 0
    f.assert_equal()


def test_fingerprint_follows_what_a_graph_bakes_in() -> None:
    p = torch.zeros(3)
    opt = torch.optim.Adam([p], lr=torch.tensor(0.01), fused=True)
    fp = Fingerprint(opt, CPU)
    opt.param_groups[0]["lr"].fill_(0.5)  # on the model's device: read at replay
    assert Fingerprint(opt, CPU).same(fp)
    # a tensor kept on the host is baked in by value (the CUDA kernel takes lr.item() then)
    cuda = torch.device("cuda")
    host = Fingerprint(opt, cuda)
    opt.param_groups[0]["lr"].fill_(0.25)
    assert not Fingerprint(opt, cuda).same(host)
    for change in (
        lambda: opt.param_groups[0].__setitem__("lr", torch.tensor(0.25)),  # another tensor
        lambda: opt.param_groups[0].__setitem__("betas", (0.9, 0.99)),
        lambda: opt.param_groups[0].__setitem__("eps", 1e-6),
        lambda: opt.param_groups[0].__setitem__("amsgrad", True),
        lambda: opt.load_state_dict(opt.state_dict()),
        lambda: opt.add_param_group({"params": [torch.zeros(2)]}),
    ):
        before = Fingerprint(opt, CPU)
        change()
        assert not Fingerprint(opt, CPU).same(before)


def test_tensor_sink_reports_each_tensor_once_when_its_last_byte_arrives() -> None:
    targets = [torch.empty(6), torch.empty(0), torch.empty(3, dtype=torch.float64), torch.empty(2)]
    seen: list[int] = []
    sink = TensorSink(
        targets, [torch.float32, torch.float32, torch.float32, torch.float32], seen.append
    )
    a = torch.arange(6, dtype=torch.float32).numpy().tobytes()
    c = torch.tensor([1.5, 2.5, 3.5]).numpy().tobytes()  # float32 on the wire into float64
    sink.write(0, 0, memoryview(a[:8]))
    sink.write(2, 0, memoryview(c[:4]))
    assert seen == []
    sink.write(0, 8, memoryview(a[8:]))
    assert seen == [0]
    sink.write(2, 4, memoryview(c[4:]))
    assert seen == [0, 2] and targets[2].tolist() == [1.5, 2.5, 3.5]
    with pytest.raises(ProtocolError):  # a write past the end is refused and reports nothing
        sink.write(0, 24, memoryview(b"\0" * 4))
    sink.write(3, 0, memoryview(b""))
    assert seen == [0, 2] and sink.missing() == [3]
    sink.write(3, 0, memoryview(torch.ones(2).numpy().tobytes()))
    assert seen == [0, 2, 3] and sink.missing() == []


@pytest.fixture
def graphs_on() -> Any:
    """A test that breaks a capture turns graphs off for the process: on again afterwards."""
    yield
    graph_guards._PROCESS_DISABLED.clear()


def test_a_key_recaptured_too_often_steps_eagerly_for_good() -> None:
    """A schedule that changes a baked-in option (here eps) every few steps: each change drops
    the graph; after MAX_CAPTURES captures the set steps eagerly, each step still applied once."""
    s = Setup()
    kinds = []
    for i in range((WARMUP_STEPS + 2) * (MAX_CAPTURES + 2)):
        if i % (WARMUP_STEPS + 2) == 0:
            for opt in (s.opt, s.ref):
                opt.param_groups[0]["eps"] = 1e-8 * (1 + i)
        kinds.append(s.step(i))
    assert s.stepper.captures == MAX_CAPTURES
    assert frozenset(SHAPES) in s.stepper.given_up
    tail = kinds[(WARMUP_STEPS + 2) * MAX_CAPTURES :]
    assert tail[0] == "eager" and set(tail[1:]) == {"plain"}  # no more warm-up
    s.assert_equal()
    other = Setup()  # another model's keys are not affected
    assert [other.step(i) for i in range(WARMUP_STEPS + 1)][-1] == "replay"


def test_a_capture_broken_at_the_cuda_level_turns_graphs_off_for_the_process(
    graphs_on: None,
) -> None:
    a, b = Setup(), Setup()
    for i in range(WARMUP_STEPS + 2):  # b has a graph already
        b.step(i)
    assert b.stepper.graph_for(SHAPES) is not None
    a.stepper.broken_capture = True
    kinds = [a.step(i) for i in range(WARMUP_STEPS + 3)]
    assert kinds == ["eager"] * (WARMUP_STEPS + 1) + ["plain"] * 2  # the failed one eager
    assert graphs_disabled() and "capture_end" not in (a.stepper.disabled or "")
    assert "previous error during capture" in (graphs_disabled() or "")
    # every model steps eagerly from now on, including one that had a graph
    assert [b.step(i) for i in range(WARMUP_STEPS + 2, WARMUP_STEPS + 5)] == ["plain"] * 3
    fresh = Setup()
    assert [fresh.step(i) for i in range(WARMUP_STEPS + 2)] == ["plain"] * (WARMUP_STEPS + 2)
    a.assert_equal()
    b.assert_equal()
    fresh.assert_equal()


def test_a_capture_failing_inside_the_step_turns_graphs_off_for_that_model_only() -> None:
    a, b = Setup(), Setup()
    a.stepper.fail_capture = True
    [a.step(i) for i in range(WARMUP_STEPS + 1)]
    assert a.stepper.disabled and graphs_disabled() is None
    assert [b.step(i) for i in range(WARMUP_STEPS + 1)][-1] == "replay"


def test_invalidate_and_close_wait_for_device_work_even_without_a_graph() -> None:
    s = Setup()
    s.step(0)  # eager: state now exists, no graph yet
    assert s.stepper.graph_for(SHAPES) is None
    s.stepper.invalidate()
    assert s.stepper.quiesced == 1
    s.stepper.close()
    assert s.stepper.quiesced == 2 and s.stepper.grads == {}
