"""The HTTP snapshot download's payload (views.snapshot_payload) carries the param groups the
client asked for, made effective for a CPU, like the torch-format export: never the live groups,
which on a GPU server hold capturable=True, fused=True and a float32 device tensor lr that a CPU
server's `adamd snapshot import` (or a local CPU Adam) refuses."""

from __future__ import annotations

import io

import torch

from adamd.server.core.model import HostedModel
from adamd.server.http import views
from adamd.server.storage import interop as snapshot_interop

from ..hosted import CPU, make_model, push

SHAPES = {"w": (4, 3), "b": (3,)}


def _trained() -> HostedModel:
    g = torch.Generator().manual_seed(0)
    params = {n: torch.randn(s, generator=g) for n, s in SHAPES.items()}
    model = make_model(params, [{"params": list(SHAPES), "lr": 0.01, "weight_decay": 0.1}])
    for _ in range(3):
        push(model, {n: torch.randn(s, generator=g) for n, s in SHAPES.items()}).wait()
    return model


def test_the_download_exports_requested_groups_and_a_cpu_server_imports_it() -> None:
    model = _trained()
    # What a GPU server's live group holds (options.effective on CUDA, minus the device).
    live = model.optimizer.param_groups[0]
    live["capturable"] = True
    live["lr"] = torch.tensor(0.01, dtype=torch.float32)
    payload = views.snapshot_payload(model)
    (group,) = payload["optimizer"]["param_groups"]
    assert group["capturable"] is False and group["fused"] is True
    assert isinstance(group["lr"], float) and group["lr"] == 0.01
    assert group["weight_decay"] == 0.1 and group["param_names"] == list(SHAPES)
    # torch.load(weights_only=True) reads it, as `adamd snapshot import` does
    buf = io.BytesIO()
    torch.save(payload, buf)
    loaded = torch.load(io.BytesIO(buf.getvalue()), weights_only=True)
    params, groups, state, dropped = snapshot_interop.from_torch_checkpoint(loaded)
    assert dropped == []
    copy = HostedModel("copy", params, groups, device=CPU)  # refused before: capturable on CPU
    copy.load_state(state, groups)
    for n in SHAPES:
        assert torch.equal(copy.params[n], model.params[n])
        p, q = model.params[n], copy.params[n]
        for k, v in model.optimizer.state[p].items():
            assert torch.equal(copy.optimizer.state[q][k], v), (n, k)
    # and a local CPU Adam loads the optimizer part
    local = [params[n].clone() for n in SHAPES]
    opt = torch.optim.Adam(local, lr=1.0)
    opt.load_state_dict(loaded["optimizer"])
    assert opt.param_groups[0]["lr"] == 0.01 and not opt.param_groups[0]["capturable"]
