"""The Client API end to end against a real server: every call, chunking of large tensors,
versions, conditional and waiting pulls, wire dtypes and state round trips."""

from __future__ import annotations

import threading
from typing import Any

import pytest
import torch

from adamd.client import Client, DeadlineExceeded, NotFound

from ..conftest import running_daemon


def test_create_push_pull_describe_list_delete(
    daemon: Any, client: Client, model_name: str
) -> None:
    w, b = torch.randn(10, 4), torch.randn(4)
    info = client.create_model(model_name, {"w": w, "b": b}, lr=0.1, betas=(0.8, 0.9))
    assert info.created and info.version == 0 and info.mode == "sync" and info.world_size == 1
    assert info.params == {"w": ((10, 4), torch.float32), "b": ((4,), torch.float32)}
    assert info.param_groups[0]["lr"] == 0.1 and info.param_groups[0]["betas"] == (0.8, 0.9)
    assert info.device == "cpu"
    pulled = client.pull(model_name)
    assert (
        pulled.version == 0
        and torch.equal(pulled.params["w"], w)
        and torch.equal(pulled.params["b"], b)
    )

    ref_w, ref_b = w.clone().requires_grad_(), b.clone().requires_grad_()
    ref = torch.optim.Adam([ref_w, ref_b], lr=0.1, betas=(0.8, 0.9), fused=True)
    for _ in range(3):
        gw, gb = torch.randn(10, 4), torch.randn(4)
        result = client.push_grad(model_name, {"w": gw, "b": gb})
        ref_w.grad, ref_b.grad = gw, gb
        ref.step()
    assert result.version == 3 and result.applied and not result.duplicate
    params = client.pull_params(model_name)
    assert torch.equal(params["w"], ref_w.detach()) and torch.equal(params["b"], ref_b.detach())
    assert client.pull_params(model_name, ["b"]).keys() == {"b"}
    assert model_name in [m.name for m in client.list_models()]
    client.delete_model(model_name)
    with pytest.raises(NotFound):
        client.describe(model_name)


def test_pull_into_out_tensors_in_place(client: Client, model_name: str) -> None:
    client.create_model(model_name, {"w": torch.arange(12.0).reshape(3, 4)})
    contiguous = torch.zeros(3, 4)
    strided = torch.zeros(4, 3).t()  # not contiguous: filled through a temporary
    halved = torch.zeros(3, 4, dtype=torch.bfloat16)
    for out in (contiguous, strided, halved):
        got = client.pull_params(model_name, out={"w": out})
        assert got["w"] is out and torch.equal(out.float(), torch.arange(12.0).reshape(3, 4))


def test_conditional_and_waiting_pulls(client: Client, model_name: str) -> None:
    client.create_model(model_name, {"w": torch.zeros(5)})
    assert client.pull(model_name, if_newer_than=0).not_modified
    client.push_grad(model_name, {"w": torch.ones(5)})
    fresh = client.pull(model_name, if_newer_than=0)
    assert not fresh.not_modified and fresh.version == 1
    with pytest.raises(DeadlineExceeded):
        client.pull(model_name, wait_for_version=2, wait_timeout=0.2)
    timer = threading.Timer(0.3, lambda: client.push_grad(model_name, {"w": torch.ones(5)}))
    timer.start()
    waited = client.pull(model_name, wait_for_version=2, wait_timeout=10)
    timer.join()
    assert waited.version == 2


@pytest.mark.parametrize("wire", [torch.bfloat16, torch.float16])
def test_wire_dtype_halves_the_bytes_and_keeps_fp32_master(
    daemon: Any, model_name: str, wire: torch.dtype
) -> None:
    with Client(daemon.grpc_address, wire_dtype=wire) as c:
        w = torch.randn(1000)
        c.create_model(model_name, {"w": w}, lr=0.01)
        g = torch.randn(1000)
        c.push_grad(model_name, {"w": g})
        hosted = daemon.registry.get(model_name)
        assert hosted.params["w"].dtype == torch.float32
        ref = w.clone().requires_grad_()
        opt = torch.optim.Adam([ref], lr=0.01, fused=True)
        ref.grad = g.to(wire).float()  # what the server received
        opt.step()
        assert torch.equal(hosted.params["w"], ref.detach())
        pulled = c.pull_params(model_name)["w"]
        assert pulled.dtype == wire and torch.equal(pulled, ref.detach().to(wire))


def test_get_state_and_load_state_round_trip(client: Client, model_name: str) -> None:
    client.create_model(model_name, {"w": torch.randn(6)}, amsgrad=True)
    for _ in range(2):
        client.push_grad(model_name, {"w": torch.randn(6)})
    saved = client.get_state(model_name)
    assert set(saved["state"]["w"]) == {"step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"}
    assert float(saved["state"]["w"]["step"]) == 2 and saved["version"] == 2
    client.push_grad(model_name, {"w": torch.randn(6)})
    client.load_state(model_name, saved["state"])
    again = client.get_state(model_name)
    for k, v in saved["state"]["w"].items():
        assert torch.equal(again["state"]["w"][k], v), k


def test_hyperparameters_and_groups(daemon: Any, client: Client, model_name: str) -> None:
    client.create_model(
        model_name,
        {"a": torch.zeros(2), "b": torch.zeros(3)},
        param_groups=[{"params": ["a"]}, {"params": ["b"], "lr": 0.5}],
        lr=0.1,
    )
    info = client.set_hyperparams(model_name, group=1, lr=0.25, weight_decay=0.01)
    assert [g["lr"] for g in info.param_groups] == [0.1, 0.25]
    info = client.add_param_group(model_name, {"c": torch.ones(4)}, lr=0.3)
    assert info.param_groups[2] == {**info.param_groups[2], "params": ["c"], "lr": 0.3}
    hosted = daemon.registry.get(model_name)
    assert [g["lr"] for g in hosted.optimizer.param_groups] == [0.1, 0.25, 0.3]
    assert torch.equal(client.pull_params(model_name, ["c"])["c"], torch.ones(4))
    result = client.push_grad(model_name, {"c": torch.ones(4)}, hyper_updates=[(2, {"lr": 0.05})])
    assert result.applied and hosted.optimizer.param_groups[2]["lr"] == 0.05


def test_100m_element_tensor_is_chunked_both_ways(model_name: str) -> None:
    """Far beyond gRPC's 4 MiB default message size and near its cap per call, in 4 MiB chunks."""
    with running_daemon(http_port=-1) as d, Client(d.grpc_address) as c:
        n = 100_000_000
        w = torch.randn(n)
        c.create_model(model_name, {"w": w}, lr=1e-3)
        hosted = d.registry.get(model_name)
        assert torch.equal(hosted.params["w"], w)
        g = torch.randn(n)
        c.push_grad(model_name, {"w": g})
        del w
        out = torch.empty(n)
        c.pull(model_name, out={"w": out})
        assert torch.equal(out, hosted.params["w"])
        expected_first = hosted.params["w"][:4].clone()
        assert torch.equal(out[:4], expected_first)
        assert float(c.get_state(model_name)["state"]["w"]["step"]) == 1


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_any_chunk_size_carries_whole_elements(daemon: Any, model_name: str, dtype: Any) -> None:
    params = {"w": torch.randn(1000, dtype=dtype), "b": torch.randn(3, dtype=dtype)}
    with Client(daemon.grpc_address, chunk_bytes=1002, transport="grpc") as c:
        c.create_model(model_name, params, lr=0.1)
        got = c.pull_params(model_name)
    assert all(torch.equal(got[n], params[n]) for n in params)
    with pytest.raises(ValueError, match="chunk_bytes"):
        Client(daemon.grpc_address, chunk_bytes=4)
