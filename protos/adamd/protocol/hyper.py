"""Param-group options (lr, betas, eps, ...) to and from the wire, keeping torch's Python types.

A group's options travel as `map<string, HyperValue>`: floats, bools, None, 0-dim or shaped
scalar tensors (a Tensor lr or beta) and lists (betas), so the server's torch.optim.Adam sees
exactly the values a local one would.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from adamd.v1 import adamd_pb2 as pb

from .errors import ProtocolError
from .frames import dtype_from_pb, dtype_to_pb

# torch.optim.Adam's defaults, in its order: the keys every param group carries.
ADAM_DEFAULTS: dict[str, Any] = dict(torch.optim.Adam([torch.zeros(1)]).defaults)
GROUP_SKIP_KEYS = ("params", "param_names")
# Most dims a one-element tensor hyperparameter may declare on the wire.
MAX_TENSOR_DIMS = 8
# Options that choose how torch computes the step, not what it computes: fixed at creation.
IMPLEMENTATION_KEYS = ("foreach", "fused", "capturable", "differentiable")


def value_to_pb(value: Any) -> pb.HyperValue:
    if isinstance(value, bool):
        return pb.HyperValue(flag=value)
    if value is None:
        return pb.HyperValue(none=True)
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(
                f"a tensor hyperparameter must hold one element, got shape {tuple(value.shape)}"
            )
        return pb.HyperValue(
            tensor=pb.ScalarTensor(
                value=float(value.detach().cpu().reshape(()).item()),
                shape=list(value.shape),
                dtype=dtype_to_pb(value.dtype),
            )
        )
    if isinstance(value, (tuple, list)):
        return pb.HyperValue(list=pb.HyperList(items=[value_to_pb(v) for v in value]))
    if isinstance(value, (int, float)):
        return pb.HyperValue(number=float(value))
    raise ProtocolError(f"hyperparameter value of type {type(value).__name__} cannot travel")


def value_from_pb(hv: pb.HyperValue) -> Any:
    kind = hv.WhichOneof("kind")
    if kind == "number":
        return hv.number
    if kind == "flag":
        return hv.flag
    if kind == "none" or kind is None:
        return None
    if kind == "tensor":
        st = hv.tensor
        # Checked before torch.full: a tensor hyperparameter holds one element, so its shape is
        # a few 1s (a 40-byte message must not make the receiver fill gigabytes).
        if len(st.shape) > MAX_TENSOR_DIMS or any(d != 1 for d in st.shape):
            raise ProtocolError(
                f"a tensor hyperparameter holds one element; got shape {list(st.shape)[:8]}"
            )
        dtype = dtype_from_pb(st.dtype)
        try:
            return torch.full(tuple(st.shape), st.value, dtype=dtype)
        except (RuntimeError, OverflowError) as exc:  # a value the dtype cannot hold
            raise ProtocolError(f"tensor hyperparameter {st.value!r} as {dtype}: {exc}") from None
    if kind == "list":
        return tuple(value_from_pb(v) for v in hv.list.items)
    raise ProtocolError(f"unknown hyperparameter kind {kind}")


def options_to_pb(group: Mapping[str, Any]) -> dict[str, pb.HyperValue]:
    """A param group's options (not its params) as wire values."""
    return {k: value_to_pb(v) for k, v in group.items() if k not in GROUP_SKIP_KEYS}


def options_from_pb(options: Mapping[str, pb.HyperValue]) -> dict[str, Any]:
    return {k: value_from_pb(v) for k, v in options.items()}


def same_value(a: Any, b: Any) -> bool:
    """Equality that treats tensors by value (what decides whether an edit must be sent)."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)):
            return False
        return (
            a.shape == b.shape
            and a.dtype == b.dtype
            and bool(torch.equal(a.detach().cpu(), b.detach().cpu()))
        )
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return len(a) == len(b) and all(same_value(x, y) for x, y in zip(a, b))
    return type(a) is type(b) and a == b


def fused_refusal(options: Mapping[str, Any], param: torch.Tensor) -> str | None:
    """torch's own error for a parameter that fused Adam cannot step (a complex one), or None.

    torch.optim.Adam accepts fused=True with such a parameter and raises this RuntimeError at its
    first step, before anything moves; both sides ask torch rather than copy its message."""
    if not options.get("fused") or param.is_floating_point():
        return None
    probe = torch.zeros(0, dtype=param.dtype, device=param.device, requires_grad=True)
    probe.grad = torch.zeros_like(probe)
    try:
        torch.optim.Adam([probe], fused=True).step()
    except RuntimeError as exc:
        return str(exc)
    return None
