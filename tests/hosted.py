"""Driving a HostedModel directly, as an adapter would but without sockets: a push's header, its
chunks written into the ticket's sink, then finish_push. For the fast unit tests of the core."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from adamd.server.core.model import HostedModel, PendingPush, PushMeta, PushTicket

CPU = torch.device("cpu")


def make_model(
    params: Mapping[str, torch.Tensor] | None = None,
    groups: Sequence[Mapping[str, Any]] | None = None,
    **kwargs: Any,
) -> HostedModel:
    params = dict(params or {"w": torch.zeros(4), "b": torch.zeros(2)})
    groups = groups or [{"params": list(params), "lr": 0.1}]
    return HostedModel("m", {n: p.clone() for n, p in params.items()}, groups, device=CPU, **kwargs)


def begin(
    model: HostedModel, grads: Mapping[str, torch.Tensor], streamed: bool = True, **meta: Any
) -> PushTicket:
    """begin_push; `streamed`: pooled buffers filled through the sink (the gRPC path), else the
    gradients handed over in place (the same-host path)."""
    specs = [(n, tuple(g.shape), g.dtype) for n, g in grads.items()]
    if streamed:
        return model.begin_push(PushMeta(**meta), specs)
    return model.begin_push(PushMeta(**meta), specs, lambda names: [grads[n] for n in names])


def write(ticket: PushTicket, grads: Mapping[str, torch.Tensor]) -> None:
    """Stream each gradient into the ticket's buffers, as chunks arriving from the wire would."""
    if ticket.sink is None:
        return
    for i, name in enumerate(ticket.names):
        data = grads[name].contiguous().numpy().tobytes()
        half = len(data) // 2 // 4 * 4
        ticket.sink.write(i, 0, memoryview(data[:half]))
        ticket.sink.write(i, half, memoryview(data[half:]))


def push(
    model: HostedModel, grads: Mapping[str, torch.Tensor], streamed: bool = True, **meta: Any
) -> PendingPush:
    ticket = begin(model, grads, streamed, **meta)
    write(ticket, grads)
    return model.finish_push(ticket)


def state_of(model: HostedModel) -> dict[str, Any]:
    """Parameters, optimizer state, hyperparameters and counters, copied, for bitwise comparison."""
    out: dict[str, Any] = {f"param/{n}": p.detach().clone() for n, p in model.params.items()}
    with model.locked():
        for group, names in zip(model.optimizer.param_groups, model.group_names()):
            for name, p in zip(names, group["params"]):
                for k, v in model.optimizer.state.get(p, {}).items():
                    out[f"state/{name}/{k}"] = v.detach().clone()
        for i, (group, req) in enumerate(zip(model.optimizer.param_groups, model.requested)):
            for k, v in group.items():
                if k not in ("params", "param_names"):
                    out[f"group/{i}/{k}"] = _copy(v)
            for k, v in req.items():
                out[f"requested/{i}/{k}"] = _copy(v)
    out["version"] = model.version
    out["skipped"] = model.skipped_steps
    return out


def _copy(v: Any) -> Any:
    if isinstance(v, torch.Tensor):
        return v.detach().clone()
    if isinstance(v, tuple):
        return tuple(_copy(x) for x in v)
    return v


def assert_same(a: Mapping[str, Any], b: Mapping[str, Any]) -> None:
    """Bitwise equal: same keys, tensors with equal dtype and bits, other values equal."""
    assert a.keys() == b.keys()
    for k in a:
        _assert_same_value(a[k], b[k], k)


def _assert_same_value(x: Any, y: Any, key: str) -> None:
    if isinstance(x, tuple):
        assert isinstance(y, tuple) and len(x) == len(y), key
        for u, v in zip(x, y):
            _assert_same_value(u, v, key)
    elif isinstance(x, torch.Tensor):
        assert isinstance(y, torch.Tensor), key
        assert x.dtype == y.dtype and torch.equal(x, y), key
    else:
        assert type(x) is type(y) and x == y, (key, x, y)


def local_adam(model: HostedModel, params: Mapping[str, torch.Tensor]) -> torch.optim.Adam:
    """A local torch.optim.Adam with the options the model's groups run with."""
    groups = [
        {
            **{k: v for k, v in g.items() if k not in ("params", "param_names")},
            "params": [params[n] for n in g["param_names"]],
        }
        for g in model.optimizer.param_groups
    ]
    return torch.optim.Adam(groups)


def rank_grads(rank: int) -> dict[str, torch.Tensor]:
    """Magnitudes far apart, so float sums depend on their order (the test has teeth)."""
    gen = torch.Generator().manual_seed(rank)
    scale = (1e8, 1.0, -1e8)[rank]
    return {
        "w": torch.rand(4, generator=gen) * scale + rank,
        "b": torch.rand(2, generator=gen) * scale,
    }
