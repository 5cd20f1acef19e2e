"""Adam options on the server: torch's validation, and which implementation actually runs.

The server holds a real torch.optim.Adam; these helpers decide its options. A client that leaves
both `foreach` and `fused` unset gets fused Adam (several times faster on CPU, and on CUDA also
capturable, with lr a device tensor, so the step can be graph-captured: see cuda_step.py); a
client that names an implementation gets it. A group holding a complex parameter, which fused
Adam refuses, is left to torch's own default (the for-loop on CPU, foreach on CUDA), as a local
torch.optim.Adam would run it.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

import torch

from adamd.protocol.hyper import ADAM_DEFAULTS, fused_refusal
from adamd.server.errors import InvalidArgument

__all__ = ["ADAM_DEFAULTS", "effective", "fused_refusal", "validate"]


def validate(options: Mapping[str, Any], device: torch.device) -> None:
    """Raise InvalidArgument with torch's own message where torch.optim.Adam would refuse them."""
    unknown = set(options) - set(ADAM_DEFAULTS)
    if unknown:
        raise InvalidArgument(
            f"unknown Adam options {sorted(unknown)}; Adam takes {sorted(ADAM_DEFAULTS)}"
        )
    for key, value in options.items():
        if not _finite(value):
            # torch.optim.Adam takes an inf lr; one client must not poison a shared model.
            raise InvalidArgument(f"{key} must be finite, got {value!r}")
    if options.get("differentiable"):
        raise InvalidArgument(
            "differentiable=True is not supported by adamd: no autograd graph crosses the wire"
        )
    if options.get("capturable") and device.type == "cpu":
        raise InvalidArgument(
            "capturable=True needs params on a CUDA (or other graph-capturable) device; this server runs on CPU"
        )
    # Before torch: it indexes betas[0] and betas[1] (IndexError on a shorter one) and a longer
    # tuple fails at the first step.
    betas = options.get("betas", ADAM_DEFAULTS["betas"])
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise InvalidArgument(f"betas must be a pair (beta1, beta2), got {betas!r}")
    probe = torch.zeros(1, device=device)
    try:
        torch.optim.Adam([probe], **options)
    except (ValueError, RuntimeError, TypeError, IndexError) as exc:
        raise InvalidArgument(str(exc)) from exc


def effective(
    options: Mapping[str, Any], device: torch.device, params: Iterable[torch.Tensor] = ()
) -> dict[str, Any]:
    """The options the server's Adam runs with: the client's, with the implementation picked
    (`params`: the group's parameters, whose dtypes decide whether fused Adam can run them)."""
    out = {**ADAM_DEFAULTS, **options}
    if any(p.is_complex() for p in params):
        return out  # neither flag set: torch picks, as for a local Adam (fused refuses complex)
    if out.get("foreach") is None and out.get("fused") is None and not out.get("differentiable"):
        out["fused"] = True
        if device.type == "cuda":
            out["capturable"] = True
            # lr as a float32 tensor on the device, which the fused kernel reads when it runs: an
            # lr schedule then fills it in place and a captured step keeps its graph (a float lr
            # is baked into the graph). Like a local Adam given such a Tensor lr, this computes
            # with lr rounded to float32. (betas stay floats: _fused_adam_ takes them only so.)
            out["lr"] = torch.tensor(float(out["lr"]), dtype=torch.float32, device=device)
    return out


def _finite(value: Any) -> bool:
    if isinstance(value, torch.Tensor):
        return bool(torch.isfinite(value).all())
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, (tuple, list)):
        return all(_finite(v) for v in value)
    return True
