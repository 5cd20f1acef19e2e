"""RemoteAdam(overlap=True) against a real daemon over gRPC: gradients stream while backward runs.

Every test compares, bitwise and every step, with a local torch.optim.Adam(fused=True) (what the
server runs on CPU) fed the same batches, and checks whether the streamed push was used (steps
that ended the stream opened during backward) or fell back to an ordinary push.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

import pytest
import torch

from adamd.client import RemoteAdam, StalePush
from adamd.server import Daemon

from ..proxies import proxy_to

LR = 1e-2
STEPS = 6
SCALE = 1024.0


def _net(seed: int = 0, unused: bool = False) -> torch.nn.Module:
    torch.manual_seed(seed)
    net = torch.nn.Sequential(
        torch.nn.Linear(16, 64), torch.nn.Tanh(), torch.nn.Linear(64, 64), torch.nn.Linear(64, 1)
    )
    if unused:  # a parameter that requires grad but takes no part in the loss
        net.register_parameter("spare", torch.nn.Parameter(torch.ones(5)))
    return net


def _backward(
    net: torch.nn.Module, step: int, micro: int = 0, scaler: torch.amp.GradScaler | None = None
) -> torch.Tensor:
    g = torch.Generator().manual_seed(100 * step + micro)
    x, y = torch.randn(8, 16, generator=g), torch.randn(8, 1, generator=g)
    loss = torch.nn.functional.mse_loss(net(x), y)
    (loss if scaler is None else scaler.scale(loss)).backward()
    return loss


def _assert_equal(a: torch.nn.Module, b: torch.nn.Module, step: int) -> None:
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert p.dtype == q.dtype and torch.equal(p, q), (step, name)


def _remote(net: torch.nn.Module, daemon: Daemon, model: str, **kw: object) -> RemoteAdam:
    """gRPC streams unless `transport="bulk"` (the bulk-data channel) is given."""
    return RemoteAdam(
        net.parameters(),
        lr=LR,
        server=daemon.grpc_address,
        model=model,
        **{"overlap": True, "transport": "grpc", **kw},  # type: ignore[arg-type]
    )


@pytest.mark.parametrize("mode", ["sync", "async"])
@pytest.mark.parametrize("set_to_none", [True, False])
@pytest.mark.parametrize("transport", ["grpc", "bulk"])
def test_streamed_steps_match_local_fused_adam_bitwise(
    daemon: Daemon, model_name: str, mode: str, set_to_none: bool, transport: str
) -> None:
    remote_net, local_net = _net(), _net()
    opt = _remote(remote_net, daemon, model_name, mode=mode, transport=transport)
    ref = torch.optim.Adam(local_net.parameters(), lr=LR, fused=True)
    try:
        for step in range(STEPS):
            for net, o in ((remote_net, opt), (local_net, ref)):
                o.zero_grad(set_to_none=set_to_none)
                _backward(net, step)
            # The push is open, and the gradients are on their way, before step() is called.
            assert opt._streamer is not None and opt._streamer._open is not None
            opt.step()
            ref.step()
            assert opt.last_result is not None and opt.last_result.applied
            _assert_equal(remote_net, local_net, step)
        assert opt._streamer.streamed == STEPS and opt._streamer.fallbacks == 0
        assert daemon.registry.get(model_name).version == STEPS == opt.version
        bulk = opt._client._bulk  # the channel's connection stays open for the next step
        assert (bulk is not None and len(bulk._idle) == 1) == (transport == "bulk")
    finally:
        opt.close()


def test_overlap_is_off_by_default_and_then_opens_no_stream(
    daemon: Daemon, model_name: str
) -> None:
    remote_net, local_net = _net(), _net()
    opt = RemoteAdam(
        remote_net.parameters(),
        lr=LR,
        server=daemon.grpc_address,
        model=model_name,
        transport="grpc",
    )
    ref = torch.optim.Adam(local_net.parameters(), lr=LR, fused=True)
    try:
        for step in range(3):
            for net, o in ((remote_net, opt), (local_net, ref)):
                o.zero_grad()
                _backward(net, step)
                o.step()
            _assert_equal(remote_net, local_net, step)
        assert opt._streamer is None and not opt._hooks
    finally:
        opt.close()


def test_two_sync_workers_streaming_step_together_bitwise(daemon: Daemon, model_name: str) -> None:
    """Both ranks compute the same gradient, so the round's mean is that gradient exactly."""
    nets = [_net(), _net()]
    local_net = _net()
    opts = [_remote(nets[r], daemon, model_name, world_size=2, rank=r) for r in range(2)]
    ref = torch.optim.Adam(local_net.parameters(), lr=LR, fused=True)
    errors: list[BaseException] = []

    def rank_step(r: int, step: int) -> None:
        try:
            opts[r].zero_grad()
            _backward(nets[r], step)
            opts[r].step()
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)

    try:
        for step in range(STEPS):
            threads = [threading.Thread(target=rank_step, args=(r, step)) for r in range(2)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(60)
            assert not errors, errors
            ref.zero_grad()
            _backward(local_net, step)
            ref.step()
            for r in range(2):
                _assert_equal(nets[r], local_net, step)
        for o in opts:
            assert o._streamer is not None and o._streamer.streamed == STEPS
        assert daemon.registry.get(model_name).version == STEPS
    finally:
        for o in opts:
            o.close()


def _fallback_run(
    daemon: Daemon,
    model_name: str,
    caplog: pytest.LogCaptureFixture,
    between: str,
    unused: bool = False,
) -> RemoteAdam:
    """STEPS steps where something between backward and step spoils the streamed push: every
    step falls back to an ordinary push, results stay bitwise equal, overlap turns itself off
    after two such steps (logged once), and every step is applied exactly once."""
    remote_net, local_net = _net(unused=unused), _net(unused=unused)
    opt = _remote(remote_net, daemon, model_name)
    ref = torch.optim.Adam(local_net.parameters(), lr=LR, fused=True)
    scalers = [torch.amp.GradScaler("cpu", init_scale=SCALE) for _ in range(2)]
    with caplog.at_level(logging.WARNING, logger="adamd.client._overlap"):
        for step in range(STEPS):
            for net, o in ((remote_net, opt), (local_net, ref)):
                o.zero_grad()
                scaler = scalers[o is ref] if between == "unscale" else None
                _backward(net, step, scaler=scaler)
                if between == "accumulate":
                    _backward(net, step, micro=1)
                elif between == "clip":
                    torch.nn.utils.clip_grad_norm_(net.parameters(), max_norm=0.01)
                elif scaler is not None:  # GradScaler.unscale_, which torch does not count
                    scaler.unscale_(o)
                    scaler.step(o)
                    scaler.update()
                    continue
                o.step()
            _assert_equal(remote_net, local_net, step)
    assert daemon.registry.get(model_name).version == STEPS == opt.version
    streamer = opt._streamer
    assert streamer is not None and streamer.streamed == 0 and not streamer.enabled
    assert streamer.fallbacks == 2
    messages = [r.getMessage() for r in caplog.records if "overlap is off" in r.getMessage()]
    assert len(messages) == 1, messages
    return opt


@pytest.mark.parametrize("between", ["accumulate", "clip", "unscale"])
def test_a_streamed_push_spoiled_before_the_step_falls_back_and_stays_exact(
    daemon: Daemon, model_name: str, caplog: pytest.LogCaptureFixture, between: str
) -> None:
    opt = _fallback_run(daemon, model_name, caplog, between)
    want = {
        "accumulate": "accumulated again",
        "clip": "changed after backward",
        "unscale": "GradScaler",
    }[between]
    assert opt._streamer is not None and want in (opt._streamer.last_fallback or "")
    opt.close()


def test_a_parameter_left_without_gradient_falls_back(
    daemon: Daemon, model_name: str, caplog: pytest.LogCaptureFixture
) -> None:
    opt = _fallback_run(daemon, model_name, caplog, "nothing", unused=True)
    assert opt._streamer is not None and "no gradient" in (opt._streamer.last_fallback or "")
    assert len(opt.state_dict()["state"]) == 6  # the six Linear tensors; never one for `spare`
    opt.close()


@pytest.mark.parametrize("transport", ["grpc", "bulk"])
def test_grad_scaler_overflow_discards_the_stream_and_skips_the_step(
    daemon: Daemon, model_name: str, transport: str
) -> None:
    """An overflowing step's stream is cancelled (nothing applied, version kept); overflows do
    not count against overlap; the clean GradScaler steps fall back (unscaled at the step)."""
    remote_net, local_net = _net(), _net()
    opt = _remote(remote_net, daemon, model_name, transport=transport)
    ref = torch.optim.Adam(local_net.parameters(), lr=LR, fused=True)
    scalers = [torch.amp.GradScaler("cpu", growth_interval=2) for _ in range(2)]
    model = daemon.registry.get(model_name)
    try:
        for step in range(STEPS):
            overflow = step in (0, 1, 3)
            version = model.version
            for net, o, scaler in ((remote_net, opt, scalers[0]), (local_net, ref, scalers[1])):
                o.zero_grad()
                g = torch.Generator().manual_seed(step)
                x, y = torch.randn(8, 16, generator=g), torch.randn(8, 1, generator=g)
                loss = torch.nn.functional.mse_loss(net(x), y)
                if overflow:
                    loss = loss * float("inf")
                scaler.scale(loss).backward()
                scaler.step(o)
                scaler.update()
            result = opt.last_result
            assert result is not None and result.applied == (not overflow), (step, result)
            assert model.version == version + (0 if overflow else 1)
            _assert_equal(remote_net, local_net, step)
        streamer = opt._streamer
        assert streamer is not None and streamer.streamed == 0
        assert "GradScaler" in (streamer.last_fallback or "")
        bulk = opt._client._bulk  # a cancelled stream is no reason to leave the channel
        assert transport == "grpc" or (bulk is not None and bulk.off_reason == "")
    finally:
        opt.close()


def test_a_streamed_push_cut_mid_flight_is_pushed_again_and_applied_once(
    daemon: Daemon, model_name: str
) -> None:
    remote_net, local_net = _net(), _net()
    ref = torch.optim.Adam(local_net.parameters(), lr=LR, fused=True)
    model_version = None
    with proxy_to(daemon) as proxy:
        opt = RemoteAdam(
            remote_net.parameters(),
            lr=LR,
            server=proxy.address,
            model=model_name,
            transport="grpc",
            overlap=True,
        )
        try:
            for step in range(3):
                for net, o in ((remote_net, opt), (local_net, ref)):
                    o.zero_grad()
                    _backward(net, step)
                if step == 1:
                    proxy.cut()  # the open stream dies; step() pushes again under its id
                opt.step()
                ref.step()
                _assert_equal(remote_net, local_net, step)
                model_version = daemon.registry.get(model_name).version
                assert model_version == step + 1 == opt.version
            assert opt._streamer is not None and opt._streamer.streamed == 2
        finally:
            opt.close()
    assert model_version == 3


def test_loss_and_lr_known_only_at_the_step_ride_on_the_closing_header(
    daemon: Daemon, model_name: str
) -> None:
    """step(closure) (as Lightning calls it): backward runs inside step(), the loss is known
    after the stream opened; an lr edited between backward and step: both reach the server
    with the streamed push, and every step streams."""
    remote_net, local_net = _net(), _net()
    opt = _remote(remote_net, daemon, model_name)
    ref = torch.optim.Adam(local_net.parameters(), lr=LR, fused=True)
    losses = []
    try:
        for step in range(STEPS):
            for net, o in ((remote_net, opt), (local_net, ref)):

                def closure(
                    net: torch.nn.Module = net, o: torch.optim.Optimizer = o, step: int = step
                ) -> float:
                    o.zero_grad()
                    loss = _backward(net, step)
                    o.param_groups[0]["lr"] = LR * (step + 2)  # after the stream opened
                    return float(loss.detach())

                loss = o.step(closure)
            losses.append(loss)
            _assert_equal(remote_net, local_net, step)
        assert opt._streamer is not None and opt._streamer.streamed == STEPS
        model = daemon.registry.get(model_name)
        assert opt.client.describe(model_name).param_groups[0]["lr"] == LR * (STEPS + 1)
        history = daemon.ops.stats.get(model).entries()
        assert [e.loss for e in history] == losses
    finally:
        opt.close()


def test_a_closing_header_must_end_the_stream_and_only_pushes_take_one(
    daemon: Daemon, model_name: str
) -> None:
    import grpc

    from adamd.client import Client
    from adamd.protocol.frames import encode_frame, iter_frames, spec_of
    from adamd.v1 import adamd_pb2 as pb

    with Client(daemon.grpc_address, transport="grpc") as c:
        c.create_model(model_name, {"w": torch.zeros(4)}, lr=0.5)
        g = torch.ones(4)
        header = pb.PushHeader(model=model_name, grads=[spec_of("w", g)], push_id="p1")
        closing = pb.PushHeader(loss=2.5).SerializeToString()
        body = list(iter_frames(header.SerializeToString(), [g]))
        # A closing header followed by more frames: refused, nothing applied.
        with pytest.raises(grpc.RpcError) as err:
            c._push(iter([*body, encode_frame(closing), encode_frame(None, 0, 0, b"")]))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert daemon.registry.get(model_name).version == 0
        # Another stream's second header: refused as before.
        add = pb.GroupHeader(model=model_name, group=pb.ParamGroup(params=["v"]))
        add.params.append(spec_of("v", g))
        frames = [*iter_frames(add.SerializeToString(), [g]), encode_frame(closing)]
        with pytest.raises(grpc.RpcError) as err:
            c._calls.add_group(iter(frames))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        # On the last frame: its loss is the push's.
        reply = c._push(iter([*body, encode_frame(closing)]))
        model = daemon.registry.get(model_name)
        assert reply.applied and model.version == 1
        assert daemon.ops.stats.get(model).entries()[-1].loss == 2.5


def test_a_server_restart_during_backward_is_survived_and_each_step_applied_once(
    tmp_path: Path, model_name: str
) -> None:
    """The server stops (final snapshot) while a streamed push is open and comes back on the same
    port from that snapshot: step() pushes again under the same id, applied once."""
    from adamd.server import Daemon as D
    from adamd.server import ServerConfig

    def start(port: int) -> D:
        config = ServerConfig(grpc_port=port, http_port=-1, data_dir=tmp_path, device="cpu")
        return D(config).start()

    daemon = start(0)
    port = daemon.grpc_port
    remote_net, local_net = _net(), _net()
    opt = RemoteAdam(
        remote_net.parameters(),
        lr=LR,
        server=f"127.0.0.1:{port}",
        model=model_name,
        transport="grpc",
        overlap=True,
    )
    ref = torch.optim.Adam(local_net.parameters(), lr=LR, fused=True)
    try:
        for step in range(3):
            for net, o in ((remote_net, opt), (local_net, ref)):
                o.zero_grad()
                _backward(net, step)
            if step == 1:
                daemon.stop(grace=0.5)
                daemon = start(port)
            opt.step()
            ref.step()
            _assert_equal(remote_net, local_net, step)
            assert daemon.registry.get(model_name).version == step + 1 == opt.version
        assert opt._streamer is not None and opt._streamer.streamed == 2
    finally:
        opt.close()
        daemon.stop(grace=0.5)


def test_same_host_shared_memory_opens_no_stream(daemon: Daemon, model_name: str) -> None:
    remote_net, local_net = _net(), _net()
    opt = RemoteAdam(
        remote_net.parameters(), lr=LR, server=daemon.grpc_address, model=model_name, overlap=True
    )
    ref = torch.optim.Adam(local_net.parameters(), lr=LR, fused=True)
    try:
        for step in range(3):
            for net, o in ((remote_net, opt), (local_net, ref)):
                o.zero_grad()
                _backward(net, step)
            assert opt._streamer is not None and opt._streamer._open is None
            assert opt.client._session(model_name) is not None  # shared memory carries it
            opt.step()
            ref.step()
            _assert_equal(remote_net, local_net, step)
        assert opt._streamer.streamed == 0 and opt._streamer.fallbacks == 0
    finally:
        opt.close()


def test_a_streamed_push_the_server_refuses_for_good_is_not_pushed_again(
    daemon: Daemon, model_name: str
) -> None:
    """Async, max_staleness 1: B's gradients stream while another worker steps twice, so the
    server answers B's streamed push StalePush. That answer stands (B pulls the fresh parameters
    and raises it, as without overlap); the whole gradient is not uploaded a second time."""

    def pushes(outcome: str) -> float:
        labels = {"method": "PushGrad", "outcome": outcome}
        return daemon.metrics.registry.get_sample_value("adamd_rpc_calls_total", labels) or 0.0

    net_a, net_b = _net(), _net()
    a = _remote(net_a, daemon, model_name, mode="async", max_staleness=1)
    b = _remote(net_b, daemon, model_name, mode="async", max_staleness=1)
    try:
        b.zero_grad()
        _backward(net_b, 0)  # streams a push from version 0
        for step in range(2):
            a.zero_grad()
            _backward(net_a, step)
            a.step()
        stale, ok = pushes("StalePush"), pushes("OK")
        with pytest.raises(StalePush):
            b.step()
        assert b.version == 2  # caught up for its next step
        assert pushes("StalePush") == stale + 1 and pushes("OK") == ok  # one upload, refused
        for p, q in zip(net_a.parameters(), net_b.parameters()):
            assert torch.equal(p, q)  # B now holds the server's parameters, as A does
    finally:
        a.close()
        b.close()
