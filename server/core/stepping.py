"""One torch.optim.Adam step over a hosted model's tensors: gradients to the device, the step
itself (graph-captured on CUDA, cuda/step.py), and the bucketed step whose parameters stream back
as they are stepped.

HostedModel (model.py) owns the lock, the seqlock and the version around a step; `ModelStep`
only moves gradients to where the parameters are and runs the optimizer. The bulk channel's STEP
requests hand in hooks: on the CPU the step then runs a bucket of parameters at a time, and each
hook hears of each bucket as soon as its parameters hold their new values, so they stream back
while later buckets step. Adam is elementwise per parameter: the bits are those of one whole step.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from adamd.server.cuda.step import GraphedStep

# A step whose parameters stream back as they are stepped (the bulk channel's STEP) runs in
# buckets: at least this many bytes of parameters each, and about at most this many buckets.
MIN_STEP_BUCKET_BYTES = 8 << 20
MAX_STEP_BUCKETS = 16

logger = logging.getLogger(__name__)


class ModelStep:
    """The step of one model: its optimizer over its (shared, growing) `params` dict."""

    def __init__(
        self,
        name: str,
        optimizer: torch.optim.Optimizer,
        params: dict[str, torch.Tensor],
        device: torch.device,
    ):
        self.name = name
        self.optimizer = optimizer
        self.params = params
        self.device = device
        # On CUDA: static device gradients, early uploads, graph-captured steps (cuda/step.py).
        self.graphed = GraphedStep(optimizer, params, device) if device.type == "cuda" else None
        # Off the CPU: the gradients' device buffers (on CUDA the graphed step's static ones).
        self.device_grads: dict[str, torch.Tensor] = self.graphed.grads if self.graphed else {}

    def to_device(self, grads: Mapping[str, torch.Tensor]) -> Mapping[str, torch.Tensor]:
        if self.device.type == "cpu":
            return grads
        if self.graphed is not None:
            return self.graphed.upload(grads)
        out = {}
        for name, g in grads.items():
            dev = self.device_grads.get(name)
            if dev is None:
                dev = self.device_grads[name] = torch.empty_like(self.params[name])
            dev.copy_(g, non_blocking=True)
            out[name] = dev
        return out

    def run(
        self,
        on_device: Mapping[str, torch.Tensor],
        hooks: Sequence[Callable[[list[str]], None]] = (),
    ) -> None:
        """One step with these gradients, already on the device (params not named get no step);
        with `hooks`, on the CPU, a bucket at a time, each bucket handed to every hook."""
        try:
            if self.graphed is not None:
                for name, p in self.params.items():
                    p.grad = on_device.get(name)
                self.graphed.run(frozenset(on_device))  # eager, or a captured graph's replay
            elif hooks and self.device.type == "cpu":
                for bucket in self.buckets(on_device):
                    for name in bucket:
                        self.params[name].grad = on_device[name]
                    self.optimizer.step()
                    for name in bucket:
                        self.params[name].grad = None
                    for hook in hooks:
                        try:  # a hook only hands names on; whatever it does, the step goes on
                            hook(bucket)
                        except Exception:
                            logger.exception("model %s: a step hook failed", self.name)
            else:
                for name, p in self.params.items():
                    p.grad = on_device.get(name)
                self.optimizer.step()
        finally:
            for p in self.params.values():
                p.grad = None

    def buckets(self, grads: Mapping[str, torch.Tensor]) -> list[list[str]]:
        """The stepped parameters in model order, cut into at most about MAX_STEP_BUCKETS
        buckets of at least MIN_STEP_BUCKET_BYTES (each bucket's step walks every parameter of
        its groups in Python: a few large buckets, not one per tensor of a large model)."""
        stepped = [(n, p.numel() * p.element_size()) for n, p in self.params.items() if n in grads]
        limit = max(MIN_STEP_BUCKET_BYTES, sum(b for _, b in stepped) // MAX_STEP_BUCKETS)
        buckets: list[list[str]] = [[]]
        size = 0
        for name, nbytes in stepped:
            if size >= limit:
                buckets.append([])
                size = 0
            buckets[-1].append(name)
            size += nbytes
        return [b for b in buckets if b]

    def memory_bytes(self, staging_nbytes: int) -> dict[str, int]:
        """Bytes of what the step works on: parameters, optimizer state, and gradient buffers
        (`staging_nbytes` on the host, plus on CUDA the static and landing ones on the device)."""

        def size(ts: Any) -> int:
            return sum(t.numel() * t.element_size() for t in ts if isinstance(t, torch.Tensor))

        state = sum(size(s.values()) for s in self.optimizer.state.values())
        device_grads = self.graphed.nbytes if self.graphed else size(self.device_grads.values())
        return {
            "params": size(self.params.values()),
            "optimizer_state": state,
            "staging": staging_nbytes + device_grads,
        }
