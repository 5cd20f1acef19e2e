"""Mixed precision with RemoteAdam: `torch.autocast` plus `torch.amp.GradScaler`, unchanged.

Shows: the standard AMP recipe (autocast forward, `scaler.scale(loss).backward()`,
`scaler.unscale_` for gradient clipping, `scaler.step(opt)`, `scaler.update()`) with the optimizer
swapped for RemoteAdam. The scaler starts deliberately high (`--init-scale`, 2**24) so that the
first float16 backward passes overflow: each such step is skipped whole on the server (its
version does not move, its Adam state is untouched) while the scaler backs off, and training
then proceeds. The model is a small MLP classifying points on two interleaved spirals, on the CPU
(float16 autocast; `--dtype bfloat16` works too, and rarely overflows).

Run it (from the repository root, after `make setup`):

    .venv/bin/python examples/amp.py

Without `--server` it starts a local `adamd serve` on free ports for the run.
"""

from __future__ import annotations

import argparse
import contextlib
import math

import torch
import torch.nn.functional as F
from torch import nn

from adamd.client import RemoteAdam


def spirals(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    t = torch.rand(n, generator=g) * 3 * math.pi
    label = torch.randint(0, 2, (n,), generator=g)
    r = t / (3 * math.pi)
    angle = t + math.pi * label
    x = torch.stack([r * angle.cos(), r * angle.sin()], 1) + 0.02 * torch.randn(n, 2, generator=g)
    return x, label


def train(args: argparse.Namespace, server: str) -> None:
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Linear(2, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 2)
    )
    opt = RemoteAdam(net.named_parameters(), lr=args.lr, server=server, model=args.model)
    scaler = torch.amp.GradScaler("cpu", init_scale=args.init_scale)
    dtype = getattr(torch, args.dtype)
    x, y = spirals(2048, seed=1)
    g = torch.Generator().manual_seed(2)
    applied = skipped = 0
    first = last = None
    try:
        for step in range(args.steps):
            idx = torch.randint(0, len(x), (args.batch,), generator=g)
            opt.zero_grad()
            with torch.autocast("cpu", dtype=dtype):
                loss = F.cross_entropy(net(x[idx]), y[idx])  # autocast runs this in float32
            scale = scaler.get_scale()
            scaler.scale(loss).backward()
            scaler.unscale_(opt)  # true gradients, so clipping sees their real norm
            nn.utils.clip_grad_norm_(net.parameters(), 1.0)
            opt.report_loss(loss)
            scaler.step(opt)  # hands RemoteAdam found_inf: an overflowing step is skipped remotely
            scaler.update()
            result = opt.last_result
            assert result is not None
            if result.applied:
                applied += 1
                first = loss.item() if first is None else first
                last = loss.item()
            else:
                skipped += 1
                print(
                    f"step {step + 1}: gradients overflowed at scale 2^{math.log2(scale):.0f};"
                    f" skipped on the server (version stays {result.version}),"
                    f" scale now 2^{math.log2(scaler.get_scale()):.0f}"
                )
            if (step + 1) % args.log_every == 0:
                print(f"step {step + 1}/{args.steps}  loss {loss.item():.4f}  v{opt.version}")
        info = opt.client.describe(args.model)
        with torch.no_grad(), torch.autocast("cpu", dtype=dtype):
            accuracy = (net(x).argmax(1) == y).float().mean().item()
    finally:
        opt.close()
    print(
        f"{applied} steps applied, {skipped} skipped for overflow; server version {info.version},"
    )
    print(f"server skipped_steps {info.skipped_steps}; loss {first:.4f} -> {last:.4f}")
    print(f"accuracy {accuracy:.3f}, final scale 2^{math.log2(scaler.get_scale()):.0f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--server", help="host:port of a running adamd (default: start one)")
    p.add_argument("--model", default="amp-spirals", help="model name on the server")
    p.add_argument("--dtype", choices=["float16", "bfloat16"], default="float16")
    p.add_argument("--init-scale", type=float, default=2.0**24)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--log-every", type=int, default=25)
    args = p.parse_args()
    with contextlib.ExitStack() as stack:
        server = args.server
        if server is None:
            from _local_server import local_server

            server = stack.enter_context(local_server()).grpc_address
        train(args, server)


if __name__ == "__main__":
    main()
