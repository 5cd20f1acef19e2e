"""Reading a hosted model's parameters without its lock: the seqlock, and host copies for the wire.

A writer (a step, a state load, a restore) bumps the sequence number before and after it writes,
so it is odd while parameters are being written. A reader takes (seq, version) under the lock
(HostedModel.read_begin), copies without it, and keeps its copy only if the number has not moved
since (read_consistent); else it retries. Listeners hear (seq, version) on every change (the
same-host channel publishes them to readers in other processes).

On CUDA the copies are issued on the model's step stream (cuda/step.py `reading()`), so they come
after the step they read and before the next one, through a pinned bounce buffer.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch

from adamd.protocol.frames import to_wire
from adamd.server.core.precision import Precision
from adamd.server.cuda.step import GraphedStep


class SeqLock:
    """One model's write sequence number and who hears of it. Writers hold the model lock."""

    def __init__(self) -> None:
        self.seq = 0  # odd while parameters are being written (readers retry)
        self.listeners: list[Callable[[int, int], None]] = []  # (seq, version) on every change

    def begin_write(self, version: int) -> None:
        self.seq += 1
        for listener in self.listeners:
            listener(self.seq, version)

    def end_write(self, version: int) -> None:
        self.seq += 1
        for listener in self.listeners:
            listener(self.seq, version)


def host_copy(
    graphed: GraphedStep | None, t: torch.Tensor, dtype: torch.dtype | None = None
) -> torch.Tensor:
    """A copy of `t` (a parameter or state tensor) on the host, contiguous, in `dtype` if given.
    Inside `on_device()` on CUDA (through a pinned bounce buffer, on the model's stream); a plain
    copy elsewhere."""
    if graphed is not None and t.device.type == "cuda":
        return graphed.to_host(t, dtype)
    return t.detach().to("cpu", dtype=dtype, copy=True).contiguous()


def host_copies(
    params: Mapping[str, torch.Tensor],
    precision: Precision,
    graphed: GraphedStep | None,
    names: Sequence[str],
    wire_dtypes: torch.dtype | Sequence[torch.dtype] | None = None,
) -> list[torch.Tensor]:
    """Parameters as host tensors ready for the wire (a pull), each to travel as its `wire_dtypes`
    entry (one dtype or None: as precision.pull_dtypes says for a pull asking for it): on the CPU
    the parameters themselves (iter_frames converts a narrower wire dtype a chunk at a time as it
    streams), copies on the model's stream on CUDA. Read under the seqlock, not the lock."""
    wires: Sequence[torch.dtype] = (
        precision.pull_dtypes(params, names, wire_dtypes)
        if wire_dtypes is None or isinstance(wire_dtypes, torch.dtype)
        else wire_dtypes
    )
    if graphed is None:
        return [
            params[n].detach() if params[n].device.type == "cpu" else to_wire(params[n], w)
            for n, w in zip(names, wires)
        ]
    with graphed.reading():
        return [host_copy(graphed, params[n], w) for n, w in zip(names, wires)]
