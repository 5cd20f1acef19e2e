"""/metrics: Prometheus text that parses, counters that move with real pushes and pulls, rejected
pushes by reason, per-model gauges, and one registry per daemon (two daemons, one process)."""

from __future__ import annotations

import httpx
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from adamd.client import Client
from adamd.client._exceptions import AdamdError
from adamd.server import Daemon

from ..conftest import running_daemon


def scrape(daemon: Daemon) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    r = httpx.get(f"{daemon.http_url}/metrics")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain")
    samples = {}
    for family in text_string_to_metric_families(r.text):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples


def value(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def test_counters_move_with_pushes_and_pulls(daemon: Daemon, model_name: str) -> None:
    grads = {"w": torch.ones(1000), "b": torch.ones(10)}
    # A wire dtype keeps tensors on the gRPC stream (same-host clients may otherwise move them
    # through shared memory, which no RPC byte counter sees).
    with Client(daemon.grpc_address, wire_dtype=torch.float32) as c:
        c.create_model(model_name, {k: torch.zeros_like(v) for k, v in grads.items()})
        before = scrape(daemon)
        for _ in range(3):
            c.push_grad(model_name, grads, loss=0.5)
        c.pull_params(model_name)
        after = scrape(daemon)
    assert value(after, "adamd_pushes_total") - value(before, "adamd_pushes_total") == 3
    assert value(after, "adamd_pulls_total") - value(before, "adamd_pulls_total") == 1
    assert value(after, "adamd_steps_total", model=model_name) == 3
    calls = ("adamd_rpc_calls_total", {"method": "PushGrad", "outcome": "OK"})
    assert value(after, calls[0], **calls[1]) - value(before, calls[0], **calls[1]) == 3
    # Bytes: at least the gradient payload in, at least the parameters out.
    grew_in = value(after, "adamd_received_bytes_total", method="PushGrad") - value(
        before, "adamd_received_bytes_total", method="PushGrad"
    )
    assert grew_in >= 3 * 1010 * 4
    grew_out = value(after, "adamd_sent_bytes_total", method="PullParams") - value(
        before, "adamd_sent_bytes_total", method="PullParams"
    )
    assert grew_out >= 1010 * 4
    # Latency histograms saw every call.
    count = "adamd_push_duration_seconds_count"
    assert value(after, count) - value(before, count) == 3
    assert value(after, "adamd_step_duration_seconds_count", model=model_name) == 3
    assert value(after, "adamd_pull_duration_seconds_count") >= 1
    # Per-model gauges, read at scrape time.
    assert value(after, "adamd_model_version", model=model_name) == 3
    assert value(after, "adamd_model_parameters", model=model_name) == 1010
    assert value(after, "adamd_model_loss", model=model_name) == 0.5
    assert value(after, "adamd_worker_lag_versions", model=model_name, rank="0") == 0
    assert value(after, "adamd_model_memory_bytes", model=model_name, kind="params") == 4040


def test_rejected_pushes_by_reason(daemon: Daemon, model_name: str) -> None:
    with Client(daemon.grpc_address, wire_dtype=torch.float32) as c:
        c.create_model(model_name, {"w": torch.zeros(4)}, mode="async", max_staleness=1)
        for v in range(3):
            c.push_grad(model_name, {"w": torch.ones(4)}, version=v)
        before = scrape(daemon)
        with pytest.raises(AdamdError):
            c.push_grad(model_name, {"w": torch.full((4,), float("nan"))})
        with pytest.raises(AdamdError):
            c.push_grad(model_name, {"w": torch.ones(4)}, version=0)  # 3 versions old
        with pytest.raises(AdamdError):
            c.push_grad(model_name, {"nope": torch.ones(4)})
        after = scrape(daemon)
    for reason in ("NonFiniteGradient", "StalePush", "InvalidArgument"):
        name = "adamd_pushes_rejected_total"
        assert value(after, name, reason=reason) - value(before, name, reason=reason) == 1
    assert value(after, "adamd_pushes_total") - value(before, "adamd_pushes_total") == 3
    assert value(after, "adamd_model_version", model=model_name) == 3  # nothing applied


def test_skipped_steps_and_deleted_models(daemon: Daemon, model_name: str) -> None:
    with Client(daemon.grpc_address) as c:
        c.create_model(model_name, {"w": torch.zeros(4)})
        c.push_grad(model_name, {"w": torch.ones(4)}, found_inf=True)
        s = scrape(daemon)
        assert value(s, "adamd_steps_skipped_total", model=model_name) == 1
        assert value(s, "adamd_steps_total", model=model_name) == 0
        c.delete_model(model_name)
    s = scrape(daemon)
    assert not [k for k in s if ("model", model_name) in k[1]]


def test_each_daemon_has_its_own_registry(daemon: Daemon) -> None:
    with running_daemon() as other:
        with Client(other.grpc_address) as c:
            c.create_model("only-here", {"w": torch.zeros(2)})
            c.push_grad("only-here", {"w": torch.ones(2)})
        mine, theirs = scrape(daemon), scrape(other)
        assert value(theirs, "adamd_steps_total", model="only-here") == 1
        assert value(theirs, "adamd_pushes_total") == 1
        assert not [k for k in mine if ("model", "only-here") in k[1]]
