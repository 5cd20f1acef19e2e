"""PyTorch Lightning with RemoteAdam: `configure_optimizers` returns it, with an lr scheduler.

Shows: a LightningModule trained by `lightning.Trainer` on the CPU, in one process or several
(`--devices 2`: strategy "ddp" over gloo, Lightning starting the other ranks), with Adam on an
adamd server. The lines that matter are in `configure_optimizers`. Under DDP, Lightning sets
WORLD_SIZE but not RANK for its ranks, so RemoteAdam takes the world size from the environment and
the rank from the module; every rank pushes its (DDP-averaged) gradient and the server steps once
per round. Lightning's checkpoints hold `optimizer.state_dict()`, which RemoteAdam answers in
torch.optim.Adam's format from the server's state; `--resume CKPT` restores it (model weights,
Adam state, scheduler, epoch) and training continues exactly as if it had not stopped. Resume into
a server that does not hold the model (a fresh one, or another `--model`): where it does, the
server's parameters win at construction and the server itself is the checkpoint.

Run it (from the repository root, after `make setup`):

    .venv/bin/python examples/lightning_remote_adam.py                 # one process
    .venv/bin/python examples/lightning_remote_adam.py --devices 2     # DDP, two processes

Without `--server` it starts a local `adamd serve` on free ports for the run. Checkpoints go to
`--ckpt-dir` (default lightning-ckpts/: one per epoch and last.ckpt); `--resume
lightning-ckpts/last.ckpt --epochs 8` continues a finished run, `--resume
lightning-ckpts/epoch=1-step=32.ckpt` one from the middle.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import warnings
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from adamd.client import RemoteAdam

# Lightning's advice for real data loading: this toy set lives in memory, workers would only cost.
warnings.filterwarnings("ignore", ".*does not have many workers.*")
# Lightning 2.6's own use of a torch.utils._pytree name that torch 2.13 deprecates: not ours to fix.
warnings.filterwarnings("ignore", r".*isinstance\(treespec, LeafSpec\).*")
_SERVER_ENV = (
    "ADAMD_EXAMPLE_SERVER"  # the address, for the ranks Lightning starts (they get our env)
)


class Regressor(L.LightningModule):
    def __init__(self, server: str, model: str, lr: float):
        super().__init__()
        self.server, self.model_name, self.lr = server, model, lr
        self.net = nn.Sequential(nn.Linear(8, 64), nn.Tanh(), nn.Linear(64, 1))

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], index: int) -> torch.Tensor:
        x, y = batch
        loss = F.mse_loss(self.net(x), y)
        self.log("loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self) -> Any:
        # world_size: from WORLD_SIZE, which Lightning sets under DDP; RANK it does not set
        opt = RemoteAdam(
            self.named_parameters(),
            lr=self.lr,
            server=self.server,
            model=self.model_name,
            rank=self.global_rank,
        )
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.8)  # per epoch
        return {"optimizer": opt, "lr_scheduler": sched}

    def on_train_end(self) -> None:
        for opt in self.trainer.optimizers:
            opt.close()  # type: ignore[attr-defined]


def data(n: int = 512) -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 8, generator=g)
    w = torch.randn(8, 1, generator=g)
    return TensorDataset(x, torch.tanh(x @ w) + 0.05 * torch.randn(n, 1, generator=g))


def train(args: argparse.Namespace, server: str) -> None:
    torch.manual_seed(0)  # one init for every rank and every run (a fresh model starts the same)
    module = Regressor(server, args.model, args.lr)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=args.devices,
        strategy="ddp" if args.devices > 1 else "auto",
        max_epochs=args.epochs,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        # every epoch's checkpoint, and last.ckpt
        callbacks=[ModelCheckpoint(dirpath=args.ckpt_dir, save_last=True, save_top_k=-1)],
    )
    loader = DataLoader(data(), batch_size=args.batch)  # DDP: Lightning shards it per rank
    trainer.fit(module, loader, ckpt_path=args.resume)
    if trainer.is_global_zero:
        print(
            f"{args.devices} process(es): epochs {args.epochs}, global step {trainer.global_step},"
            f" loss {float(trainer.callback_metrics['loss']):.4f}, lr {trainer.optimizers[0].param_groups[0]['lr']:.5f}"
        )
        print(f"checkpoint: {os.path.join(args.ckpt_dir, 'last.ckpt')}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--server", help="host:port of a running adamd (default: start one)")
    p.add_argument("--model", default="lightning-regressor", help="model name on the server")
    p.add_argument("--devices", type=int, default=1, help="processes (2+: DDP over gloo)")
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--ckpt-dir", default="lightning-ckpts")
    p.add_argument(
        "--resume", help="a checkpoint to continue from (e.g. lightning-ckpts/last.ckpt)"
    )
    args = p.parse_args()
    with contextlib.ExitStack() as stack:
        server = args.server or os.environ.get(_SERVER_ENV)
        if server is None:  # rank 0 of the run: the other ranks inherit the address
            from _local_server import local_server

            server = stack.enter_context(local_server()).grpc_address
            os.environ[_SERVER_ENV] = server
        train(args, server)


if __name__ == "__main__":
    main()
