"""A worker whose parameters and gradients live on a GPU: pushes leave device memory through two
pinned chunk buffers, pulls land in pinned buffers and go up with one asynchronous copy each
(adamd.protocol.pinned); no pageable copy either way.

The pool and the chunking run here on any machine (over ordinary host memory without CUDA); the
end-to-end tests need a GPU (marked `gpu`): a CUDA bf16 model trained through RemoteAdam with
master weights against a CPU daemon equals, bitwise, the local fp32-master recipe on the CPU fed
the same gradients, and the CUDA profiler shows only pinned host copies.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from adamd.client import RemoteAdam
from adamd.protocol.frames import wire_chunks
from adamd.protocol.pinned import HostBuffers, Landing, device_chunks
from adamd.server import Daemon

from ..conftest import running_daemon

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


# --- the pool and the chunking (any machine) -------------------------------------------------


def test_host_buffers_are_reused_and_the_pool_is_bounded() -> None:
    pool = HostBuffers(keep_bytes=3 * 4096)
    a = pool.take(100)
    assert a.numel() == 4096 and a.is_pinned() == torch.cuda.is_available() == pool.pinned
    pool.give(a)
    b = pool.take(4000)
    assert b.data_ptr() == a.data_ptr() and pool.allocated == 1  # the same buffer again
    big = pool.take(5 * 4096)
    pool.give(big)  # over keep_bytes: dropped, not kept
    assert pool.idle_bytes == 0
    pool.give(b)
    assert pool.idle_bytes == 4096


@pytest.mark.parametrize("wire", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("chunk", [64, 1000, 1 << 20])
def test_device_chunks_are_the_bytes_wire_chunks_sends(wire: torch.dtype, chunk: int) -> None:
    """Odd sizes and chunk boundaries inside an element: the same bytes at the same offsets."""
    t = torch.randn(3, 333)
    pool = HostBuffers(pin=False)
    got = [(o, bytes(c)) for o, c in device_chunks(t, wire, chunk, pool)]
    want = [(o, bytes(c)) for o, c in wire_chunks(t, wire, chunk)]
    assert b"".join(c for _, c in got) == b"".join(c for _, c in want)
    assert [o for o, _ in got] == list(range(0, t.numel() * wire.itemsize, chunk))
    assert pool.allocated == 2 and pool.idle_bytes > 0  # two slots, back in the pool


def test_landing_fills_its_tensors_and_gives_the_buffers_back() -> None:
    pool = HostBuffers(pin=False)
    dst = torch.zeros(5, 7, dtype=torch.bfloat16)
    landing = Landing(pool)
    host = landing.buffer_for(dst)
    assert host.shape == dst.shape and host.dtype == dst.dtype
    host.copy_(torch.arange(35.0).view(5, 7))
    landing.finish()
    assert torch.equal(dst, torch.arange(35.0).view(5, 7).to(torch.bfloat16))
    assert pool.idle_bytes == 4096


# --- a GPU worker against a real daemon (needs CUDA) -----------------------------------------


@pytest.fixture(scope="module")
def cpu_daemon() -> Iterator[Daemon]:
    with running_daemon(http_port=-1, device="cpu") as d:
        yield d


def _net(device: str) -> torch.nn.Sequential:
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.Tanh(), torch.nn.Linear(128, 8))
    return net.to(device=device, dtype=torch.bfloat16)


def _backward(net: torch.nn.Module, step: int) -> None:
    g = torch.Generator().manual_seed(step)
    x, y = torch.randn(16, 64, generator=g), torch.randn(16, 8, generator=g)
    dev = next(net.parameters()).device
    for p in net.parameters():
        p.grad = None
    out = net(x.to(dev, torch.bfloat16)).float()
    torch.nn.functional.mse_loss(out, y.to(dev)).backward()


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("transport", ["auto", "bulk", "grpc"])
def test_cuda_worker_with_master_weights_equals_local_recipe_without_pageable_copies(
    cpu_daemon: Daemon, transport: str
) -> None:
    net = _net("cuda")
    opt = RemoteAdam(
        net.parameters(),
        lr=1e-3,
        server=cpu_daemon.grpc_address,
        model=f"cuda-{transport}",
        master_dtype=torch.float32,
        transport=transport,
    )
    master = [p.detach().float().cpu().clone() for p in net.parameters()]
    ref = torch.optim.Adam(master, lr=1e-3, fused=True)  # the server's kernel: fused Adam on CPU
    kinds: set[str] = set()
    try:
        for step in range(20):
            _backward(net, step)
            for m, p in zip(master, net.parameters()):
                assert p.grad is not None
                m.grad = p.grad.float().cpu()
            ref.step()
            torch.cuda.synchronize()
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
                opt.step()
                torch.cuda.synchronize()
            kinds |= {e.name for e in prof.events() if "Memcpy" in e.name}
            for m, p in zip(master, net.parameters()):
                assert p.device.type == "cuda" and p.dtype == torch.bfloat16
                assert torch.equal(p.cpu(), m.to(torch.bfloat16)), step
        held = cpu_daemon.registry.get(f"cuda-{transport}").params.values()
        for h, m in zip(held, master):
            assert torch.equal(h, m)
    finally:
        opt.close()
    print(transport, sorted(kinds))
    assert any("DtoH" in k for k in kinds) and any("HtoD" in k for k in kinds), kinds
    assert not any("Pageable" in k for k in kinds), kinds
