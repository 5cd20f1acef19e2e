"""adamd's own figures: push_grad, pull_params, RemoteAdam.step() against an `adamd serve`
subprocess, server peak memory, and the server's Adam step timed in-process.

What each figure is:
- push (full): `Client.push_grad` of all gradients; it returns once the server has streamed them
  into its buffers, checked them for inf/nan and applied the Adam step. What a worker waits for.
- push (transport): the same push with `found_inf=True`, which the server streams in completely
  and then skips the finite check and step (the GradScaler contract). The wire part of a push; the
  figure compared with the raw gRPC push ceiling.
- pull: `Client.pull(model, out=...)` into preallocated tensors.
- RemoteAdam.step(): push + step + pull into the local parameters, per transport variant the
  installed RemoteAdam offers (checked with inspect.signature at run time).
- server step: `HostedModel.optimizer.step()` of a model created through the service, in an
  in-process Daemon, with .grad set; interleaved rep by rep with a local
  `torch.optim.Adam(fused=True)` over tensors of the same shapes, so both see the same noise.
- memory: VmHWM (peak RSS) of the server process after all of the above for one size, minus its
  VmRSS before the model was created (interpreter, torch, grpc), against 16 B/param.
"""

from __future__ import annotations

import inspect
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch

from adamd.client import Client, RemoteAdam

from .common import (
    ADAM_BYTES_PER_PARAM,
    FP32,
    adamd_server,
    best_of,
    make_tensors,
    reps_for,
)


@dataclass
class AdamdFigures:
    """Best-of-N seconds per operation for one model size (None: not measured)."""

    n: int
    push_full: float | None = None  # over gRPC (transport="grpc" where the Client has it)
    push_transport: float | None = None  # over gRPC, found_inf=True: streamed, not stepped
    pull: float | None = None  # over gRPC
    push_default: float | None = None  # Client's default transport (same-host path), full push
    pull_default: float | None = None  # Client's default transport, pull(out=)
    remote_adam: dict[str, float] = field(default_factory=dict)  # variant -> seconds
    server_idle_rss: int | None = None  # bytes, before the model exists
    server_peak_grpc: int | None = None  # bytes, VmHWM after create + gRPC pushes and pulls
    server_peak: int | None = None  # bytes, VmHWM after everything for this size
    server_shm: int | None = None  # bytes in the server's /dev/shm files at that point
    leftover_shm_files: int = 0  # files the server left in /dev/shm after it exited
    errors: list[str] = field(default_factory=list)

    @property
    def model_bytes(self) -> int:
        return ADAM_BYTES_PER_PARAM * self.n

    @property
    def memory_ratio(self) -> float | None:
        """Peak over 16 B/param while gradients stream over gRPC (the same-host path adds a
        session's gradient file per attached client instead; see server_peak)."""
        if self.server_peak_grpc is None or self.server_idle_rss is None:
            return None
        return (self.server_peak_grpc - self.server_idle_rss) / self.model_bytes


def remote_adam_variants() -> dict[str, dict[str, Any]]:
    """RemoteAdam configurations to time: default, plus the options this RemoteAdam has."""
    params = inspect.signature(RemoteAdam).parameters
    variants: dict[str, dict[str, Any]] = {"default": {}}
    if "transport" in params:
        variants["transport=grpc"] = {"transport": "grpc"}
    if "wire_dtype" in params:
        key = "transport=grpc, bf16" if "transport" in params else "bf16 wire"
        extra = {"transport": "grpc"} if "transport" in params else {}
        variants[key] = {**extra, "wire_dtype": torch.bfloat16}
    return variants


def client_transports() -> dict[str, dict[str, Any]]:
    """Client kwargs for the gRPC path and, if the Client has a transport switch, its default."""
    if "transport" in inspect.signature(Client.__init__).parameters:
        return {"grpc": {"transport": "grpc"}, "default": {}}
    return {"grpc": {}}


def _guard(fig: AdamdFigures, what: str, fn: Callable[[], float]) -> float | None:
    """Run one measurement; a failure is recorded, not fatal (the API is moving under us)."""
    try:
        return fn()
    except Exception as exc:
        fig.errors.append(f"{what}: {type(exc).__name__}: {str(exc)[:300]}")
        return None


def measure_over_service(
    n: int, reps: int, tick: Callable[[str], None] = lambda s: None
) -> AdamdFigures:
    """Push, pull, RemoteAdam and server memory for one size against a fresh `adamd serve`."""
    fig = AdamdFigures(n)
    reps = reps_for(n, reps)
    name = "bench"
    params = make_tensors(n, seed=1)
    grads = make_tensors(n, seed=2)
    for g in grads.values():
        g.mul_(1e-3)
    with adamd_server() as server:
        fig.server_idle_rss = server.rss_bytes()
        for transport, kwargs in client_transports().items():
            with Client(server.address, **kwargs) as client:
                _push_pull(fig, client, transport, name, params, grads, reps, tick)
            if transport == "grpc":
                fig.server_peak_grpc = server.peak_bytes()
        for label, kwargs in remote_adam_variants().items():
            tick(f"RemoteAdam.step() {label}")
            t = _guard(
                fig,
                f"RemoteAdam {label}",
                partial(_time_remote_adam, server.address, name, grads, reps, kwargs),
            )
            if t is not None:
                fig.remote_adam[label] = t
        fig.server_peak = server.peak_bytes()
        fig.server_shm = server.shm_bytes()
    fig.leftover_shm_files = server.leftover_shm
    return fig


def _push_pull(
    fig: AdamdFigures,
    client: Client,
    transport: str,
    name: str,
    params: dict[str, torch.Tensor],
    grads: dict[str, torch.Tensor],
    reps: int,
    tick: Callable[[str], None],
) -> None:
    if transport == "grpc":
        tick("adamd create_model")
        client.create_model(name, params, lr=1e-3)
    tick(f"adamd push_grad ({transport})")
    push = _guard(
        fig, f"push {transport}", lambda: best_of(lambda: client.push_grad(name, grads), reps)
    )
    tick(f"adamd pull_params(out=) ({transport})")
    out = {k: torch.empty_like(v) for k, v in params.items()}
    pull = _guard(
        fig, f"pull {transport}", lambda: best_of(lambda: client.pull(name, out=out), reps)
    )
    if transport == "grpc":
        fig.push_full, fig.pull = push, pull
        fig.push_transport = _guard(
            fig,
            "push(found_inf) grpc",
            lambda: best_of(lambda: client.push_grad(name, grads, found_inf=True), reps),
        )
    else:
        fig.push_default, fig.pull_default = push, pull


def _time_remote_adam(
    address: str, model: str, grads: dict[str, torch.Tensor], reps: int, kwargs: dict[str, Any]
) -> float:
    """Join the existing model (the server's parameters win), then time step()."""
    local = [torch.nn.Parameter(torch.zeros_like(g)) for g in grads.values()]
    for p, g in zip(local, grads.values()):
        p.grad = g
    opt = RemoteAdam(local, lr=1e-3, server=address, model=model, **kwargs)
    try:
        return best_of(opt.step, reps)
    finally:
        opt.close()


@dataclass
class StepFigures:
    n: int
    server_step: float  # seconds, HostedModel.optimizer.step()
    local_fused: float  # seconds, torch.optim.Adam(fused=True).step()
    fused_on_server: bool | None  # what the server's Adam runs with


def measure_server_step(n: int, reps: int) -> StepFigures:
    """The server's Adam step alone, in-process, against a local fused Adam on the same shapes."""
    from adamd.server import Daemon, ServerConfig

    params = make_tensors(n, seed=1)
    with tempfile.TemporaryDirectory(prefix="adamd-bench-") as tmp:
        daemon = Daemon(
            ServerConfig(grpc_port=0, http_port=-1, device="cpu", data_dir=Path(tmp))
        ).start()
        try:
            with Client(daemon.grpc_address) as client:
                client.create_model("step", params, lr=1e-3)
            hosted = daemon.registry.get("step")
            fused = hosted.optimizer.param_groups[0].get("fused")
            for p in hosted.params.values():
                p.grad = torch.randn_like(p).mul_(1e-3)
            local = [torch.nn.Parameter(t.clone()) for t in params.values()]
            del params
            for p in local:
                p.grad = torch.randn_like(p).mul_(1e-3)
            local_opt = torch.optim.Adam(local, lr=1e-3, fused=True)
            server_opt = hosted.optimizer
            server_opt.step()
            local_opt.step()
            best_server = best_local = float("inf")
            for _ in range(max(1, reps)):  # interleaved: both see the same machine noise
                best_server = min(best_server, best_of(server_opt.step, 1, warmup=0))
                best_local = min(best_local, best_of(local_opt.step, 1, warmup=0))
            for p in hosted.params.values():
                p.grad = None
        finally:
            daemon.stop(grace=1.0)
    return StepFigures(n, best_server, best_local, fused)


def gbps(n: int, seconds: float | None) -> float | None:
    """fp32 gradient (or parameter) bytes per second, in GB/s."""
    return None if not seconds else FP32 * n / seconds / 1e9
