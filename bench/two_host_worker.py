"""The two-host benchmark's processes inside the network namespaces (`python -m bench.two_host
--role rpc-ps | worker`, started by `two_host.run_variant`): PyTorch's RPC parameter server in the
server's namespace, and the measuring worker in the worker's: the RemoteAdam.step() round trips
and the char-LM training steps, every contender interleaved, bytes counted on the worker's veth.
The worker prints its figures as one JSON line for the orchestrating process."""

from __future__ import annotations

import copy
import json
import os
import re
import statistics
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .common import shapes_for
from .two_host import CONTENDERS_TRAIN, RPC_PORT, SERVER_IP, STEP_CONTENDERS, TEXT

# --- the torch RPC parameter server (runs in the server namespace) --------------------------


_PS: dict[str, tuple[list[torch.Tensor], torch.optim.Optimizer]] = {}


def _ps_setup(name: str, params: list[torch.Tensor], lr: float = 1e-3) -> None:
    ps: list[torch.Tensor] = [nn.Parameter(p.clone()) for p in params]
    _PS[name] = (ps, torch.optim.Adam(ps, lr=lr, fused=True))


def _ps_setup_zeros(name: str, shapes: list[tuple[int, ...]]) -> None:
    _ps_setup(name, [torch.zeros(s) for s in shapes])


def _ps_drop(name: str) -> None:
    _PS.pop(name, None)


def _ps_push_pull(name: str, grads: list[torch.Tensor]) -> list[torch.Tensor]:
    """One gradient push, a fused Adam step, the fresh parameters back: one RemoteAdam.step()."""
    params, opt = _PS[name]
    for p, g in zip(params, grads):
        p.grad = g
    opt.step()
    return [p.detach() for p in params]


def _rpc_init(rank: int) -> None:
    import torch.distributed.rpc as rpc

    os.environ.update(MASTER_ADDR=SERVER_IP, MASTER_PORT=str(RPC_PORT))
    opts = rpc.TensorPipeRpcBackendOptions(
        num_worker_threads=4, rpc_timeout=300, _transports=["uv"], _channels=["basic"]
    )
    rpc.init_rpc("ps" if rank == 0 else "worker", rank=rank, world_size=2, rpc_backend_options=opts)


def rpc_ps_main() -> int:
    import torch.distributed.rpc as rpc

    _rpc_init(0)
    rpc.shutdown()  # serves until the worker shuts down too
    return 0


# --- the worker (runs in the worker namespace) ----------------------------------------------


def _veth_bytes(ifname: str | None) -> int:
    """Bytes received plus sent on `ifname` so far (this network namespace's /proc/net/dev)."""
    if not ifname:
        return 0
    for line in Path("/proc/net/dev").read_text().splitlines():
        name, sep, rest = line.partition(":")
        if sep and name.strip() == ifname:
            fields = rest.split()
            return int(fields[0]) + int(fields[8])
    return 0


def _interleaved(
    fns: dict[str, Callable[[], object]], reps: int, warmup: int, ifname: str | None = None
) -> dict[str, Any]:
    """Warm-up calls of each, then `reps` rounds calling each once; best and median seconds,
    and the mean bytes that crossed `ifname` (both ways) per call."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    moved: dict[str, list[int]] = {k: [] for k in fns}
    for _ in range(reps):
        for k, fn in fns.items():
            b = _veth_bytes(ifname)
            t = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t)
            moved[k].append(_veth_bytes(ifname) - b)
    return {
        k: {"best": min(v), "median": statistics.median(v), "all": v,
            "bytes": statistics.fmean(moved[k])}
        for k, v in times.items()
    }  # fmt: skip


def _measure_step(cfg: dict[str, Any]) -> dict[str, Any]:
    import torch.distributed.rpc as rpc

    from adamd.client import RemoteAdam

    shapes = shapes_for(cfg["step_n"], cfg["tensors"])
    g = torch.Generator().manual_seed(0)
    fns: dict[str, Callable[[], object]] = {}
    opts = []
    for label in cfg.get("step_contenders") or STEP_CONTENDERS:
        kw = {
            k: getattr(torch, v) if k.endswith("dtype") else v
            for k, v in STEP_CONTENDERS[label].items()
        }
        dtype = kw.pop("param_dtype", torch.float32)
        params = [nn.Parameter(torch.zeros(s, dtype=dtype)) for s in shapes]
        for p in params:
            p.grad = (torch.randn(p.shape, generator=g) * 1e-3).to(dtype)
        kw.setdefault("transport", "auto")
        opt = RemoteAdam(params, lr=1e-3, server=cfg["adamd"],
                         model="step-" + re.sub(r"[^A-Za-z0-9]+", "-", label[6:]), **kw)  # fmt: skip
        opts.append(opt)
        fns[label] = opt.step
    rpc.rpc_sync("ps", _ps_setup_zeros, args=("step", shapes))
    grads = [torch.randn(s, generator=g) * 1e-3 for s in shapes]
    fns["torch RPC"] = partial(rpc.rpc_sync, "ps", _ps_push_pull, args=("step", grads))
    out = _interleaved(fns, cfg["reps"], cfg["warmup"], cfg.get("ifname"))
    rpc.rpc_sync("ps", _ps_drop, args=("step",))
    for opt in opts:
        opt.close()
    return {"n": cfg["step_n"], "tensors": cfg["tensors"], "times": out}


class CharLM(nn.Module):
    """A character-level transformer LM: embeddings, a pre-norm causal TransformerEncoder, a head."""

    def __init__(self, vocab: int, dim: int, layers: int, heads: int, context: int):
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab, dim), nn.Embedding(context, dim)
        layer = nn.TransformerEncoderLayer(
            dim, heads, 4 * dim, dropout=0.0, activation="gelu", batch_first=True, norm_first=True
        )
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm, self.head = nn.LayerNorm(dim), nn.Linear(dim, vocab)
        self.mask: torch.Tensor
        self.register_buffer("mask", nn.Transformer.generate_square_subsequent_mask(context))

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        t = idx.shape[1]
        x = self.tok(idx) + self.pos(torch.arange(t))
        x = self.encoder(x, mask=self.mask[:t, :t], is_causal=True)
        return self.head(self.norm(x))


def _batches(count: int, batch: int, context: int) -> tuple[int, list[torch.Tensor]]:
    text = TEXT.read_text()
    vocab = sorted(set(text))
    data = torch.tensor([vocab.index(c) for c in text])
    g = torch.Generator().manual_seed(0)
    starts = torch.randint(0, len(data) - context - 1, (count, batch), generator=g)
    return len(vocab), [torch.stack([data[s : s + context + 1] for s in row]) for row in starts]


def _train_steppers(cfg: dict[str, Any], base: CharLM) -> dict[str, tuple[CharLM, Any]]:
    """Each contender: its own copy of `base` and a step function."""
    import torch.distributed.rpc as rpc

    from adamd.client import RemoteAdam

    lr = 3e-4
    out: dict[str, tuple[CharLM, Any]] = {}
    local = copy.deepcopy(base)
    out["local fused Adam"] = (local, torch.optim.Adam(local.parameters(), lr=lr, fused=True).step)
    for label in CONTENDERS_TRAIN:
        if not label.startswith("adamd"):
            continue
        m = copy.deepcopy(base)
        wire = torch.bfloat16 if "bf16" in label else None
        server = cfg["adamd"]
        if "same host" in label:
            server = cfg["adamd_local"]
        elif "no stats" in label:
            server = cfg["adamd_nostats"]
        opt = RemoteAdam(m.parameters(), lr=lr, server=server,
                         model="lm-" + label[6:].replace(" ", "-"), transport="auto",
                         wire_dtype=wire, overlap="overlap" in label)  # fmt: skip
        out[label] = (m, opt.step)
    m = copy.deepcopy(base)
    params = list(m.parameters())
    rpc.rpc_sync("ps", _ps_setup, args=("lm", [p.detach() for p in params], lr))

    @torch.no_grad()
    def rpc_step() -> None:
        fresh = rpc.rpc_sync("ps", _ps_push_pull, args=("lm", [p.grad for p in params]))
        for p, q in zip(params, fresh):
            p.copy_(q)

    out["torch RPC"] = (m, rpc_step)
    return out


def _measure_train(cfg: dict[str, Any]) -> dict[str, Any]:
    t = cfg["train"]
    warmup, steps, block = cfg["warmup"], t["steps"], t["block"]
    vocab, batches = _batches(warmup + steps, t["batch"], t["context"])
    torch.manual_seed(0)
    base = CharLM(vocab, t["dim"], t["layers"], t["heads"], t["context"])
    contenders = _train_steppers(cfg, base)
    rec: dict[str, dict[str, list[float]]] = {
        k: {"step": [], "after_backward": [], "loss": []} for k in contenders
    }

    def one(name: str, i: int, keep: bool) -> None:
        model, step = contenders[name]
        x, y = batches[i][:, :-1], batches[i][:, 1:]
        t0 = time.perf_counter()
        model.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
        loss.backward()
        t1 = time.perf_counter()
        step()
        t2 = time.perf_counter()
        if keep:
            rec[name]["step"].append(t2 - t0)
            rec[name]["after_backward"].append(t2 - t1)
        rec[name]["loss"].append(float(loss.detach()))

    for name in contenders:  # warm-up: connections, buffers, the first steps on both ends
        for i in range(warmup):
            one(name, i, keep=False)
    for first in range(warmup, warmup + steps, block):
        for name in contenders:
            for i in range(first, min(first + block, warmup + steps)):
                one(name, i, keep=True)
    params = sum(p.numel() for p in base.parameters())
    return {"params": params, **t, "contenders": rec}


def worker_main(cfg: dict[str, Any]) -> int:
    import torch.distributed.rpc as rpc

    from .common import wait_for_channel

    wait_for_channel(cfg["adamd"], timeout=120)
    wait_for_channel(cfg["adamd_local"], timeout=120)
    wait_for_channel(cfg["adamd_nostats"], timeout=120)
    _rpc_init(1)
    result: dict[str, Any] = {"torch_threads": torch.get_num_threads()}
    for what, measure in (("step", _measure_step), ("train", _measure_train)):
        if what in cfg["what"]:
            t0 = time.perf_counter()
            result[what] = measure(cfg)
            print(f"[worker] {what}: {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    rpc.shutdown()
    print(json.dumps(result), flush=True)
    return 0
