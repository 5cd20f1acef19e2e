"""Prometheus metrics of one daemon, in its own CollectorRegistry (several daemons may share a
process, tests do), rendered by the HTTP side at /metrics.

Three sources, each as cheap as it can be:

* `on_call` (RpcHooks.on_call, once per gRPC call): call counts by method and outcome, latency
  histograms, bytes in and out, and the push/pull/rejection counters people look for first;
* a step observer per model (on the step path, so only a counter increment and one histogram
  observation): steps, skipped steps, step latency;
* a collector evaluated at scrape time for what is already held elsewhere (model version, worker
  lag, memory, last loss), so none of it costs anything between scrapes.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from adamd.server.core.budget import TransferBudget
from adamd.server.core.model import HostedModel, StepRecord
from adamd.server.core.registry import ModelRegistry
from adamd.server.http.views import shard_view

if TYPE_CHECKING:
    from adamd.server.core.stats import StatsBook

logger = logging.getLogger(__name__)

OK = "OK"  # the outcome of a call that succeeded; otherwise the error kind (StalePush, ...)
_LATENCY_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
)  # fmt: skip
_STEP_BUCKETS = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
)  # fmt: skip


class Metrics:
    """The daemon's metrics. `registry` is what /metrics renders."""

    def __init__(
        self,
        models: ModelRegistry,
        stats: StatsBook | None = None,
        transfers: TransferBudget | None = None,
    ):
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.rpc_calls = Counter(
            "adamd_rpc_calls",
            "calls handled (gRPC and the bulk-data channel)",
            ["method", "outcome"],
            registry=r,
        )
        self.rpc_seconds = Histogram(
            "adamd_rpc_duration_seconds",
            "call latency, first byte in to last byte out",
            ["method"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.bytes_in = Counter(
            "adamd_received_bytes",
            "request bytes received over gRPC and the bulk-data channel (not shared memory)",
            ["method"],
            registry=r,
        )
        self.bytes_out = Counter(
            "adamd_sent_bytes",
            "reply bytes sent over gRPC and the bulk-data channel (not shared memory)",
            ["method"],
            registry=r,
        )
        self.pushes = Counter(
            "adamd_pushes", "gradient pushes (PushGrad calls and bulk-channel steps)", registry=r
        )
        self.rejected = Counter(
            "adamd_pushes_rejected",
            "gradient pushes refused, by reason (the error kind)",
            ["reason"],
            registry=r,
        )
        self.pulls = Counter(
            "adamd_pulls", "parameter pulls (PullParams calls and bulk-channel steps)", registry=r
        )
        self.push_seconds = Histogram(
            "adamd_push_duration_seconds",
            "PushGrad latency (sync mode includes waiting for the round)",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.pull_seconds = Histogram(
            "adamd_pull_duration_seconds",
            "PullParams latency",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.steps = Counter("adamd_steps", "Adam steps applied", ["model"], registry=r)
        self.skipped = Counter(
            "adamd_steps_skipped", "steps skipped (found_inf)", ["model"], registry=r
        )
        self.step_seconds = Histogram(
            "adamd_step_duration_seconds",
            "time to average a round's gradients and apply the Adam step",
            ["model"],
            buckets=_STEP_BUCKETS,
            registry=r,
        )
        r.register(_ModelCollector(models, stats))
        if transfers is not None:
            r.register(_TransferCollector(transfers))
        self._observers: dict[str, object] = {}
        models.on_create.append(self._on_create)
        models.on_delete.append(self._on_delete)
        for model in models.models():
            self._on_create(model)

    # --- sources -------------------------------------------------------------------------------

    def on_call(
        self, method: str, outcome: str, seconds: float, bytes_in: int, bytes_out: int
    ) -> None:
        """RpcHooks.on_call: once per call (gRPC, or the bulk-data channel's PushGrad,
        PullParams and Step: a push and a pull in one exchange), after it finished or failed."""
        self.rpc_calls.labels(method, outcome).inc()
        self.rpc_seconds.labels(method).observe(seconds)
        if bytes_in:
            self.bytes_in.labels(method).inc(bytes_in)
        if bytes_out:
            self.bytes_out.labels(method).inc(bytes_out)
        if method in ("PushGrad", "Step"):
            self.pushes.inc()
            self.push_seconds.observe(seconds)
            if outcome != OK:
                self.rejected.labels(outcome).inc()
        if method in ("PullParams", "Step"):
            self.pulls.inc()
            self.pull_seconds.observe(seconds)

    def _on_create(self, model: HostedModel) -> None:
        steps, skipped = self.steps.labels(model.name), self.skipped.labels(model.name)
        step_seconds = self.step_seconds.labels(model.name)

        def observe(record: StepRecord) -> None:
            if record.applied:
                steps.inc()
                step_seconds.observe(record.step_seconds)
            else:
                skipped.inc()

        with model.locked():
            model.observers.append(observe)

    def _on_delete(self, name: str) -> None:
        # Drop the model's series so a deleted model stops being reported.
        for metric in (self.steps, self.skipped, self.step_seconds):
            try:
                metric.remove(name)
            except KeyError:
                pass

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _ModelCollector(Collector):
    """Per-model gauges read at scrape time from the registry and the stats book."""

    def __init__(self, models: ModelRegistry, stats: StatsBook | None):
        self.models = models
        self.stats = stats
        self.started = time.time()

    def collect(self) -> Iterator[Metric]:
        now = time.time()
        up = GaugeMetricFamily("adamd_uptime_seconds", "seconds since the daemon started")
        up.add_metric([], now - self.started)
        count = GaugeMetricFamily("adamd_models", "models hosted")
        version = GaugeMetricFamily(
            "adamd_model_version", "model version (steps applied)", labels=["model"]
        )
        elements = GaugeMetricFamily(
            "adamd_model_parameters", "parameter elements", labels=["model"]
        )
        memory = GaugeMetricFamily(
            "adamd_model_memory_bytes", "memory held per model", labels=["model", "kind"]
        )
        workers = GaugeMetricFamily(
            "adamd_model_world_size", "workers per sync round", labels=["model"]
        )
        lag = GaugeMetricFamily(
            "adamd_worker_lag_versions",
            "versions applied since the one the worker's last gradient was computed from",
            labels=["model", "rank"],
        )
        age = GaugeMetricFamily(
            "adamd_worker_last_push_age_seconds",
            "seconds since the worker's last push was applied",
            labels=["model", "rank"],
        )
        loss = GaugeMetricFamily(
            "adamd_model_loss", "last loss reported by workers", labels=["model"]
        )
        shard = GaugeMetricFamily(
            "adamd_model_shard",
            "sharded models: this server's shard index (labels: shard, shards, layout id)",
            labels=["model", "shard", "shards", "layout"],
        )
        models = self.models.models()
        count.add_metric([], len(models))
        for m in models:
            v = m.version
            version.add_metric([m.name], v)
            elements.add_metric([m.name], sum(p.numel() for p in m.params.values()))
            workers.add_metric([m.name], m.world_size)
            for kind, nbytes in m.memory_bytes().items():
                memory.add_metric([m.name, kind], nbytes)
            for rank, (heard, pushed_from) in sorted(dict(m.last_heard).items()):
                lag.add_metric([m.name, str(rank)], max(0, v - pushed_from - 1))
                age.add_metric([m.name, str(rank)], max(0.0, now - heard))
            view = shard_view(m.layout)
            if view is not None and "index" in view:
                labels = [m.name, str(view["index"]), str(view["of"]), str(view["layout_id"])]
                shard.add_metric(labels, view["index"])
            if self.stats is not None:
                last = self.stats.get(m).last_loss()
                if last is not None:
                    loss.add_metric([m.name], last)
        yield from (up, count, version, elements, memory, workers, lag, age, loss, shard)


class _TransferCollector(Collector):
    """The transfer-memory budget (server/core/budget.py), read at scrape time."""

    def __init__(self, budget: TransferBudget):
        self.budget = budget

    def collect(self) -> Iterator[Metric]:
        b = self.budget
        for name, text, value in (
            (
                "adamd_transfer_budget_bytes",
                "host bytes transfers in flight may hold at once (-1: no budget)",
                -1 if b.capacity is None else b.capacity,
            ),
            (
                "adamd_transfer_reserved_bytes",
                "host bytes held by pulls and pushes in flight now",
                b.reserved,
            ),
            (
                "adamd_transfer_reserved_peak_bytes",
                "most host bytes held by transfers at once since the daemon started",
                b.peak,
            ),
            ("adamd_transfer_waiting", "transfers waiting for budget now", b.waiting),
        ):
            gauge = GaugeMetricFamily(name, text)
            gauge.add_metric([], value)
            yield gauge
        waits = CounterMetricFamily(
            "adamd_transfer_waits", "transfers that had to wait for budget (back-pressure)"
        )
        waits.add_metric([], b.waits)
        yield waits
