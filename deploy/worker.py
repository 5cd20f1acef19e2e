"""A training worker for deploy/compose.yaml: a small regression model whose parameters live on
the servers that `ADAMD_SERVERS` names (one model sharded over all of them), trained with
RemoteAdam. `RANK` / `WORLD_SIZE` as torchrun sets them (sync mode: one averaged step per round);
the token from the file `ADAMD_TOKEN_FILE`; `ADAMD_MODEL` names the model, `ADAMD_STEPS` the steps.

Run it anywhere that reaches the servers: `docker compose run --rm worker`, or
`ADAMD_SERVERS=127.0.0.1:50051,127.0.0.1:50061,127.0.0.1:50071 python deploy/worker.py`.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from adamd.client import RemoteAdam


def main() -> None:
    token_file = os.environ.get("ADAMD_TOKEN_FILE")
    token = Path(token_file).read_text().strip() if token_file else None
    steps = int(os.environ.get("ADAMD_STEPS", "200"))
    torch.manual_seed(0)  # every worker starts from the same parameters
    net = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.Tanh(), torch.nn.Linear(64, 1))
    true_w = torch.randn(16, 1)
    opt = RemoteAdam(
        list(net.named_parameters()),
        lr=0.01,
        model=os.environ.get("ADAMD_MODEL", "compose-demo"),
        token=token,  # server=None: the addresses come from ADAMD_SERVERS
    )
    data = torch.Generator().manual_seed(1 + opt.rank)  # each rank its own batches
    try:
        for step in range(steps):
            x = torch.randn(64, 16, generator=data)
            loss = torch.nn.functional.mse_loss(net(x), x @ true_w)
            loss.backward()
            opt.step()
            opt.zero_grad()
            if step % 50 == 0 or step == steps - 1:
                print(f"rank {opt.rank} step {step} version {opt.version} loss {loss.item():.4f}")
    finally:
        opt.close()


if __name__ == "__main__":
    main()
