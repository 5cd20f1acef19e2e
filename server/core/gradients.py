"""What a round does with the gradients it gathered: the finite check every push passes, and the
mean over a round's contributors, summed in rank order so the result does not depend on arrival
order (the same sum in every run, bitwise)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from adamd.server.core.pushes import PushTicket


def rank_ordered_mean(tickets: Sequence[PushTicket]) -> dict[str, torch.Tensor]:
    """Per parameter, the mean of the tickets that carry it, summed in the tickets' order so the
    result does not depend on arrival order. Accumulates into the first ticket's buffer."""
    summed: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    for t in tickets:
        for name, buf in zip(t.names, t.buffers):
            if name in summed:
                summed[name].add_(buf)
                counts[name] += 1
            else:
                summed[name] = buf
                counts[name] = 1
    for name, n in counts.items():
        if n > 1:
            summed[name].div_(n)
    return summed


def all_finite(t: torch.Tensor) -> bool:
    """True when every element is finite. A finite sum proves it (inf and nan propagate through
    addition) at the cost of one read; only a non-finite sum, which may be an overflow of large
    finite values, pays for the exact check. A complex tensor is checked as its real view."""
    if t.is_complex():
        t = torch.view_as_real(t)
    if bool(torch.isfinite(t.sum(dtype=torch.float32))):
        return True
    return bool(torch.isfinite(t).all())
