"""The peer: PyTorch's own RPC parameter server (torch.distributed.rpc, TensorPipe over loopback).

Two processes, as /work/shared/tools/peer_torch_rpc.py sets it up: rank 0 holds the parameters and
a fused torch.optim.Adam; rank 1 sends the gradients with `rpc_sync`, the server sets `.grad`,
steps and returns the fresh parameters. One call is one push + fused Adam step + pull, the same
work as one RemoteAdam.step(). TensorPipe options are the reference script's (its defaults, 4
worker threads). All sizes run in one spawn, so the start-up cost is paid once.

Run as `python -m bench.peer_rpc PORT REPS N [N ...]`; prints one JSON line per size.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from functools import partial
from typing import Any

import torch

from .common import N_TENSORS, best_of, python_subprocess_env, reps_for, shapes_for


class _PS:
    def __init__(self, n: int):
        self.p = [torch.nn.Parameter(torch.zeros(s)) for s in shapes_for(n)]
        self.opt = torch.optim.Adam(self.p, lr=1e-3, fused=True)

    def push_pull(self, grads: list[torch.Tensor]) -> list[torch.Tensor]:
        for q, g in zip(self.p, grads):
            q.grad = g
        self.opt.step()
        return [q.detach() for q in self.p]


_ps: _PS | None = None


def _setup(n: int) -> None:
    global _ps
    _ps = None
    _ps = _PS(n)


def _teardown() -> None:
    global _ps
    _ps = None


def _push_pull(grads: list[torch.Tensor]) -> list[torch.Tensor]:
    assert _ps is not None
    return _ps.push_pull(grads)


def _run(rank: int, port: int, reps: int, tcp: bool, sizes: list[int]) -> None:
    import torch.distributed.rpc as rpc

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    opts = rpc.TensorPipeRpcBackendOptions(num_worker_threads=4)
    if tcp:  # what TensorPipe does across hosts: TCP transport, no shared-memory shortcuts
        opts = rpc.TensorPipeRpcBackendOptions(
            num_worker_threads=4, _transports=["uv"], _channels=["basic"]
        )
    if rank == 0:
        rpc.init_rpc("ps", rank=0, world_size=2, rpc_backend_options=opts)
    else:
        rpc.init_rpc("worker", rank=1, world_size=2, rpc_backend_options=opts)
        for n in sizes:
            rpc.rpc_sync("ps", _setup, args=(n,))
            grads = [torch.randn(s) for s in shapes_for(n)]
            t = best_of(partial(rpc.rpc_sync, "ps", _push_pull, args=(grads,)), reps_for(n, reps))
            rpc.rpc_sync("ps", _teardown)
            print(json.dumps({"n": n, "tensors": N_TENSORS, "seconds": t}), flush=True)
    rpc.shutdown()


def measure(
    port: int, reps: int, sizes: list[int], tcp: bool = False, timeout: float = 900
) -> dict[int, float]:
    """Run the peer in subprocesses; {n_params: best seconds per push+step+pull}. `tcp`: only
    TensorPipe's TCP transport and basic channel (as between hosts); else its defaults, which on
    one host move tensors through shared memory."""
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench.peer_rpc",
            str(port),
            str(reps),
            str(int(tcp)),
            *map(str, sizes),
        ],
        env=python_subprocess_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    results: dict[int, float] = {}
    for line in out.stdout.splitlines():
        if line.startswith("{"):
            rec: dict[str, Any] = json.loads(line)
            results[int(rec["n"])] = float(rec["seconds"])
    if out.returncode != 0 and not results:
        raise RuntimeError(f"torch RPC peer failed ({out.returncode}):\n{out.stderr[-2000:]}")
    return results


if __name__ == "__main__":
    import torch.multiprocessing as mp

    _port, _reps, _tcp, *_sizes = (int(a) for a in sys.argv[1:])
    mp.spawn(_run, args=(_port, _reps, bool(_tcp), list(_sizes)), nprocs=2)
