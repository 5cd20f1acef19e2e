"""What a round does with the gradients it gathered: the mean over a round's contributors, summed
in rank order so the result does not depend on arrival order (the same sum in every run,
bitwise). The finite check every push passes is adamd.protocol.frames.all_finite, which the
client's int8 path runs too."""

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
