"""A character-level transformer language model, trained by several workers through one adamd server.

Shows: `torchrun` starting N workers that share one Adam on an adamd server. `RemoteAdam` takes
RANK and WORLD_SIZE from torchrun's environment; the model is passed as `named_parameters()`, so
the dashboard lists `blocks.0.qkv.weight` and friends. In sync mode (the default) the server
averages the N gradients of a round into one Adam step and every worker gets the same parameters
back; with `--mode async` every push steps at once. The text is nine of Shakespeare's sonnets,
shipped in examples/data/ (no download).

Run it (from the repository root, after `make setup`):

    .venv/bin/torchrun --standalone --nproc-per-node 2 examples/char_lm.py
    .venv/bin/torchrun --standalone --nproc-per-node 2 examples/char_lm.py --mode async
    .venv/bin/torchrun --standalone --nproc-per-node 2 examples/char_lm.py --grad-compression int8

`--grad-compression int8` pushes gradients as blockwise int8 with error feedback (about a quarter
of float32's bytes); `int8-noef` without the feedback; `--wire-dtype bfloat16` halves the bytes of
pulls (and of pushes, when they are not int8). bench/compression.py compares their final losses.

Without `--server`, rank 0 starts a local `adamd serve` on free ports and stops it at the end;
`--server HOST:PORT` uses a running one instead (the model stays there, and a second run joins it
where the first left off). Rank 0 prints the loss as it trains, the dashboard URL, and a sample.
"""

from __future__ import annotations

import argparse
import math
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from adamd.client import RemoteAdam

TEXT = Path(__file__).resolve().parent / "data" / "sonnets.txt"


class Block(nn.Module):
    """Pre-norm transformer block: causal self-attention, then an MLP."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, self.heads, d // self.heads).unbind(2)
        att = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True
        )
        x = x + self.proj(att.transpose(1, 2).reshape(b, t, d))
        return x + self.mlp(self.ln2(x))


class CharLM(nn.Module):
    def __init__(self, vocab: int, dim: int, layers: int, heads: int, context: int):
        super().__init__()
        self.context = context
        self.tok, self.pos = nn.Embedding(vocab, dim), nn.Embedding(context, dim)
        self.blocks = nn.ModuleList(Block(dim, heads) for _ in range(layers))
        self.norm, self.head = nn.LayerNorm(dim), nn.Linear(dim, vocab)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.tok(idx) + self.pos(torch.arange(idx.shape[1]))
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))

    @torch.no_grad()
    def sample(self, start: torch.Tensor, n: int, seed: int = 0) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed)
        idx = start
        for _ in range(n):
            probs = self(idx[:, -self.context :])[:, -1].softmax(-1)
            idx = torch.cat([idx, torch.multinomial(probs, 1, generator=g)], dim=1)
        return idx


def batch(
    data: torch.Tensor, size: int, context: int, g: torch.Generator
) -> tuple[torch.Tensor, ...]:
    starts = torch.randint(0, len(data) - context - 1, (size,), generator=g)
    x = torch.stack([data[s : s + context] for s in starts])
    y = torch.stack([data[s + 1 : s + context + 1] for s in starts])
    return x, y


@torch.no_grad()
def val_loss(net: CharLM, data: torch.Tensor, context: int) -> float:
    g = torch.Generator().manual_seed(1234)  # the same batches every time: losses compare
    x, y = batch(data, 64, context, g)
    return float(F.cross_entropy(net(x).flatten(0, 1), y.flatten()))


def share_address(address: str | None) -> str:
    """Rank 0's server address, for every rank (torch.distributed over gloo, set up by torchrun)."""
    if not dist.is_initialized():
        assert address is not None
        return address
    box = [address]
    dist.broadcast_object_list(box, src=0)
    assert box[0] is not None
    return box[0]


def train(args: argparse.Namespace, server: str, dashboard: str | None) -> dict[str, float]:
    """Train; returns the held-out loss before and after, and the mean training loss of the
    last 10% of steps (what bench/compression.py compares)."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    text = TEXT.read_text()
    chars = sorted(set(text))
    data = torch.tensor([chars.index(c) for c in text])
    split = int(0.9 * len(data))
    train_data, held_out = data[:split], data[split:]

    torch.manual_seed(0)  # one init everywhere (the server's copy wins for whoever joins second)
    net = CharLM(len(chars), args.dim, args.layers, args.heads, args.context)
    opt = RemoteAdam(
        net.named_parameters(),
        lr=args.lr,
        weight_decay=0.01,
        decoupled_weight_decay=True,  # AdamW
        server=server,
        model=args.model,
        mode=args.mode,
        wire_dtype=WIRE_DTYPES[args.wire_dtype],
        grad_compression=None if args.grad_compression == "none" else args.grad_compression,
    )  # rank and world_size: from torchrun's RANK / WORLD_SIZE
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=args.steps, eta_min=args.lr / 10)
    g = torch.Generator().manual_seed(100 + rank)  # each worker its own batches
    if rank == 0:
        n = sum(p.numel() for p in net.parameters())
        print(
            f"{world} worker(s), {args.mode} mode, {n} parameters, model {args.model!r} on {server}"
        )
        if dashboard:
            print(f"dashboard: {dashboard}", flush=True)
    before = val_loss(net, held_out, args.context)
    start = time.monotonic()
    losses: list[float] = []
    try:
        for step in range(args.steps):
            x, y = batch(train_data, args.batch, args.context, g)
            opt.zero_grad()
            loss = F.cross_entropy(net(x).flatten(0, 1), y.flatten())
            loss.backward()
            losses.append(float(loss.detach()))
            opt.report_loss(loss)  # the dashboard's loss chart
            opt.step()
            sched.step()
            if rank == 0 and (step + 1) % args.log_every == 0:
                print(
                    f"step {step + 1}/{args.steps}  loss {loss.item():.3f}  v{opt.version}",
                    flush=True,
                )
        after = val_loss(net, held_out, args.context)
        if dist.is_initialized():
            dist.barrier()  # every worker done: the server's version is final
        if rank == 0:
            took = time.monotonic() - start
            version = opt.client.describe(args.model).version
            print(
                f"held-out loss {before:.3f} -> {after:.3f} (uniform would be {math.log(len(chars)):.3f})"
            )
            print(f"final version {version}; {args.steps} steps per worker in {took:.1f}s")
            if args.sample:
                out = net.sample(data[:1].view(1, 1), args.sample)[0]
                print("sample:\n" + "".join(chars[int(i)] for i in out))
    finally:
        opt.close()
    tail = losses[-max(len(losses) // 10, 1) :]
    return {"before": before, "after": after, "train_tail": sum(tail) / len(tail)}


WIRE_DTYPES = {"float32": None, "bfloat16": torch.bfloat16}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--server", help="host:port of a running adamd (default: start one)")
    p.add_argument("--mode", choices=["sync", "async"], default="sync")
    p.add_argument("--model", help="model name on the server (default char-lm-MODE)")
    p.add_argument("--steps", type=int, default=300, help="steps per worker (default 300)")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--context", type=int, default=64)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--log-every", type=int, default=25)
    p.add_argument("--sample", type=int, default=200, help="characters to generate at the end")
    p.add_argument(
        "--grad-compression",
        choices=["none", "int8", "int8-noef"],
        default="none",
        help="int8: blockwise int8 gradients with error feedback; int8-noef: without it",
    )
    p.add_argument("--wire-dtype", choices=sorted(WIRE_DTYPES), default="float32")
    return p


def main() -> None:
    args = parser().parse_args()
    args.model = args.model or f"char-lm-{args.mode}"

    world = int(os.environ.get("WORLD_SIZE", 1))
    if world > 1:
        dist.init_process_group("gloo")  # only to share the server's address and wait at the end
    try:
        if args.server:
            host = args.server.rsplit(":", 1)[0]
            dashboard = (
                f"http://{host}:8080/#{args.model} (if that server uses the default --http-port)"
            )
            train(args, share_address(args.server), dashboard)
        elif int(os.environ.get("RANK", 0)) == 0:
            from _local_server import local_server

            with local_server() as server:
                train(args, share_address(server.grpc_address), server.dashboard(args.model))
        else:
            train(args, share_address(None), None)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
