"""Actor/learner: many lightweight actors push gradients asynchronously, one evaluator watches.

Shows: the Client API under async training with bounded staleness. The learner is the adamd server
(a model created with `mode="async"` and `max_staleness=K`): every accepted push is one Adam step.
Each actor (its own process) pulls the policy, plays a batch of a contextual bandit (4 arms, the
best one a fixed function of an 8-number context), computes a REINFORCE gradient and pushes it
tagged with the version it was computed from. A gradient more than K versions old is refused with
`StalePush`; the actor drops it, pulls the fresh policy and plays on. The evaluator pulls with
`if_newer_than`, so it gets nothing (no bytes) until the policy changed, and scores the greedy
policy on fixed contexts: the mean reward climbs from 1/4 (chance) towards 1.

Run it (from the repository root, after `make setup`):

    .venv/bin/python examples/actor_learner.py

Without `--server` it starts a local `adamd serve` on free ports for the run; `--actors`,
`--pushes` (per actor) and `--max-staleness` change the run.
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing as mp
import queue
import time
from typing import Any

import torch
from torch import nn

from adamd.client import Client, StalePush

CONTEXT, ARMS = 8, 4


def policy() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(CONTEXT, 32), nn.Tanh(), nn.Linear(32, ARMS))


def best_arm(x: torch.Tensor) -> torch.Tensor:
    """The environment: which arm pays, for each context (fixed, unknown to the policy)."""
    w = torch.randn(CONTEXT, ARMS, generator=torch.Generator().manual_seed(42))
    return (x @ w).argmax(1)


def actor(index: int, address: str, model: str, pushes: int, batch: int, out: Any) -> None:
    """One actor: pull, play a batch, push a REINFORCE gradient, repeat."""
    torch.set_num_threads(1)
    net = policy()
    params = dict(net.named_parameters())
    g = torch.Generator().manual_seed(1000 + index)
    applied, stale, worst = 0, 0, 0
    with Client(address) as c:
        with torch.no_grad():
            version = c.pull(model, out=params).version
        while applied + stale < pushes:
            x = torch.randn(batch, CONTEXT, generator=g)
            probs = net(x).softmax(1)
            arm = torch.multinomial(probs.detach(), 1, generator=g).squeeze(1)
            reward = (arm == best_arm(x)).float()
            advantage = reward - reward.mean()  # the batch mean as the baseline
            loss = -(advantage * probs.gather(1, arm[:, None]).squeeze(1).log()).mean()
            grads = torch.autograd.grad(loss, list(params.values()))
            try:
                result = c.push_grad(
                    model,
                    dict(zip(params, grads)),
                    version=version,  # what this gradient was computed from
                    rank=index,  # per-actor lag on the dashboard
                    scalars={"reward": reward.mean().item()},
                )
                applied += 1
                worst = max(worst, result.version - 1 - version)  # versions it was behind
            except StalePush:
                stale += 1  # too old: drop it and play on with the fresh policy
            with torch.no_grad():
                version = c.pull(model, out=params, if_newer_than=version).version
    out.put((index, applied, stale, worst))


@torch.no_grad()
def evaluate(net: nn.Module, x: torch.Tensor, best: torch.Tensor) -> float:
    return (net(x).argmax(1) == best).float().mean().item()


def run(args: argparse.Namespace, address: str, dashboard: str | None) -> None:
    net = policy()
    params = dict(net.named_parameters())
    x_eval = torch.randn(4096, CONTEXT, generator=torch.Generator().manual_seed(7))
    best = best_arm(x_eval)
    with Client(address) as c:
        info = c.create_model(
            args.model,
            {n: p.detach() for n, p in params.items()},
            mode="async",
            max_staleness=args.max_staleness,
            lr=args.lr,
            exist_ok=True,  # an existing model of that name is joined: training continues
        )
        print(
            f"{args.actors} actors x {args.pushes} pushes, async, max_staleness {info.max_staleness},"
            f" model {args.model!r} on {address}"
        )
        if dashboard:
            print(f"dashboard: {dashboard}", flush=True)
        ctx = mp.get_context("spawn")  # not fork: gRPC and torch threads do not survive a fork
        results: Any = ctx.Queue()
        procs = [
            ctx.Process(
                target=actor,
                args=(i, address, args.model, args.pushes, args.batch, results),
                daemon=True,
            )
            for i in range(args.actors)
        ]
        for p in procs:
            p.start()
        seen: int | None = None
        evaluations = not_modified = 0
        reports: list[tuple[int, int, int, int]] = []
        rewards: list[float] = []
        try:
            while True:
                done = len(reports) == len(procs)
                # Nothing crosses the wire unless the server's version moved past `seen`.
                with torch.no_grad():
                    pulled = c.pull(args.model, out=params, if_newer_than=seen)
                if pulled.not_modified:
                    not_modified += 1
                else:
                    seen = pulled.version
                    rewards.append(evaluate(net, x_eval, best))
                    evaluations += 1
                    print(f"v{seen}: greedy reward {rewards[-1]:.3f}", flush=True)
                if done:
                    break
                try:
                    reports.append(results.get(timeout=args.eval_interval))
                except queue.Empty:
                    if not any(p.is_alive() for p in procs):
                        raise RuntimeError("an actor died") from None
        finally:
            for p in procs:
                p.join(timeout=30)
                if p.is_alive():
                    p.kill()
        applied = sum(r[1] for r in reports)
        stale = sum(r[2] for r in reports)
        worst = max(r[3] for r in reports)
        final = c.describe(args.model).version
    print(
        f"{applied} pushes applied, {stale} refused as stale; the oldest applied gradient was"
        f" {worst} versions behind (bound {args.max_staleness}); server version {final}"
    )
    print(
        f"evaluator: {evaluations} evaluations, {not_modified} pulls answered not-modified;"
        f" greedy reward {rewards[0]:.3f} -> {rewards[-1]:.3f}"
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--server", help="host:port of a running adamd (default: start one)")
    p.add_argument("--model", default="actor-learner", help="model name on the server")
    p.add_argument("--actors", type=int, default=4, help="actor processes (default 4)")
    p.add_argument("--pushes", type=int, default=150, help="pushes per actor (default 150)")
    p.add_argument("--batch", type=int, default=64, help="contexts per push (default 64)")
    p.add_argument("--max-staleness", type=int, default=2, help="versions (default 2)")
    p.add_argument("--lr", type=float, default=0.02)
    p.add_argument("--eval-interval", type=float, default=0.5, help="seconds between evaluations")
    args = p.parse_args()
    with contextlib.ExitStack() as stack:
        address, dashboard = args.server, None
        if address is None:
            from _local_server import local_server

            server = stack.enter_context(local_server())
            address, dashboard = server.grpc_address, server.dashboard(args.model)
        start = time.monotonic()
        run(args, address, dashboard)
        print(f"took {time.monotonic() - start:.1f}s")


if __name__ == "__main__":
    main()
