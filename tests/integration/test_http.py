"""The HTTP inspection API against real daemons: every JSON route, values checked against the
hosted optimizer's actual tensors, the snapshot download, errors, tokens, and `adamd inspect`."""

from __future__ import annotations

import io
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch

from adamd.client import Client
from adamd.server import Daemon
from adamd.server.cli.main import main as cli_main

from ..conftest import assert_bitwise_equal, running_daemon, snapshot

SHAPES = {"w1": (16, 8), "b1": (16,), "w2": (4, 16)}
STEPS = 6


def close(a: float | None, b: float, rel: float = 1e-5) -> bool:
    return a is not None and abs(a - b) <= rel * max(abs(b), 1e-12) + 1e-12


class Trained:
    """A model trained through the gRPC client, remembering what was pushed and what came back."""

    def __init__(self, daemon: Daemon, name: str, steps: int = STEPS):
        self.daemon, self.name = daemon, name
        g = torch.Generator().manual_seed(0)
        init = {n: torch.randn(s, generator=g) for n, s in SHAPES.items()}
        self.grads: list[dict[str, torch.Tensor]] = []
        self.params = [init]
        self.losses: list[float] = []
        with Client(daemon.grpc_address) as c:
            c.create_model(name, init, lr=0.01, weight_decay=0.1)
            for i in range(steps):
                grads = {n: torch.randn(s, generator=g) * (i + 1) for n, s in SHAPES.items()}
                loss = 1.0 / (i + 1)
                c.push_grad(name, grads, loss=loss, scalars={"acc": i / 10})
                self.grads.append(grads)
                self.losses.append(loss)
                self.params.append(c.pull_params(name))

    @property
    def model(self) -> Any:
        return self.daemon.registry.get(self.name)


def total_norm(ts: dict[str, torch.Tensor]) -> float:
    return float(torch.linalg.vector_norm(torch.stack([t.norm() for t in ts.values()])))


@pytest.fixture(scope="module")
def daemon() -> Iterator[Daemon]:
    """Statistics on every step, so each history entry can be checked against what was pushed."""
    with running_daemon(stats_every=1) as d:
        yield d


@pytest.fixture(scope="module")
def trained(daemon: Daemon) -> Trained:
    return Trained(daemon, "http-trained")


@pytest.fixture
def http(daemon: Daemon) -> Iterator[httpx.Client]:
    assert daemon.http_url is not None
    with httpx.Client(base_url=daemon.http_url, timeout=30) as c:
        yield c


def test_health_and_ready(http: httpx.Client) -> None:
    assert http.get("/healthz").json() == {"status": "ok"}
    r = http.get("/readyz")
    assert r.status_code == 200 and r.json()["status"] == "ready"


def test_models_list_and_detail(http: httpx.Client, trained: Trained) -> None:
    listed = {m["name"]: m for m in http.get("/v1/models").json()["models"]}
    assert listed[trained.name]["version"] == STEPS
    d = http.get(f"/v1/models/{trained.name}").json()
    model = trained.model
    assert (d["mode"], d["world_size"], d["version"], d["step"]) == ("sync", 1, STEPS, STEPS)
    assert d["device"] == str(model.device) == "cpu"
    assert d["num_elements"] == sum(p.numel() for p in model.params.values())
    assert d["memory"]["params"] == sum(p.numel() * 4 for p in model.params.values())
    assert d["memory"]["optimizer_state"] == model.memory_bytes()["optimizer_state"]
    (group,) = d["param_groups"]
    assert group["params"] == list(SHAPES)
    assert group["hyperparameters"]["lr"] == model.optimizer.param_groups[0]["lr"] == 0.01
    assert group["hyperparameters"]["weight_decay"] == 0.1
    assert group["hyperparameters"]["betas"] == [0.9, 0.999]
    assert group["implementation"] == "fused"
    assert d["last_loss"] == trained.losses[-1]
    assert [w["rank"] for w in d["workers"]] == [0] and d["workers"][0]["lag"] == 0


def test_params_match_optimizer_state(http: httpx.Client, trained: Trained) -> None:
    body = http.get(f"/v1/models/{trained.name}/params").json()
    model = trained.model
    assert body["version"] == STEPS
    rows = {r["name"]: r for r in body["params"]}
    assert list(rows) == list(SHAPES)
    for name, p in model.params.items():
        r, st = rows[name], model.optimizer.state[p]
        assert r["shape"] == list(p.shape) and r["dtype"] == "float32" and r["device"] == "cpu"
        assert r["step"] == int(st["step"]) == STEPS
        assert close(r["norm"], float(p.norm()))
        assert close(r["exp_avg_norm"], float(st["exp_avg"].norm()))
        assert close(r["exp_avg_sq_mean"], float(st["exp_avg_sq"].mean()))
        # The last step's gradient and update, from what the client pushed and pulled.
        assert close(r["grad_norm"], float(trained.grads[-1][name].norm()))
        update = float((trained.params[-1][name] - trained.params[-2][name]).norm())
        assert close(r["update_norm"], update, rel=1e-4)
        assert close(r["update_to_weight"], update / float(p.norm()), rel=1e-4)


def test_history_per_step(http: httpx.Client, trained: Trained) -> None:
    body = http.get(f"/v1/models/{trained.name}/history").json()
    steps = body["steps"]
    assert [e["version"] for e in steps] == list(range(1, STEPS + 1))
    for i, e in enumerate(steps):
        assert e["applied"] and e["workers"] == 1 and e["ranks"] == [0]
        assert e["lr"] == [0.01] and e["loss"] == trained.losses[i]
        assert e["scalars"] == {"acc": pytest.approx(i / 10)}
        assert e["step_ms"] > 0
        assert close(e["grad_norm"], total_norm(trained.grads[i]))
        upd = {n: trained.params[i + 1][n] - trained.params[i][n] for n in SHAPES}
        assert close(e["update_norm"], total_norm(upd), rel=1e-4)
    tail = http.get(f"/v1/models/{trained.name}/history", params={"since": 4}).json()["steps"]
    assert [e["version"] for e in tail] == [5, 6]
    last = http.get(f"/v1/models/{trained.name}/history", params={"limit": 1}).json()["steps"]
    assert [e["version"] for e in last] == [STEPS]


def test_stats_every_n_steps() -> None:
    with running_daemon(stats_every=3) as d:
        t = Trained(d, "every3", steps=7)
        assert d.http_url is not None
        steps = httpx.get(f"{d.http_url}/v1/models/every3/history").json()["steps"]
        with_norms = [e["version"] for e in steps if e["grad_norm"] is not None]
        assert with_norms == [3, 6]
        assert [e["version"] for e in steps if e["update_norm"] is not None] == [3, 6]
        upd = {n: t.params[6][n] - t.params[5][n] for n in SHAPES}
        assert close(steps[5]["update_norm"], total_norm(upd), rel=1e-4)
        assert all(e["loss"] is not None for e in steps)  # cheap fields every step


def test_auto_stats_stay_within_their_time_budget() -> None:
    """The default: a step gets norms when the statistics so far cost at most 2% of the time."""
    with running_daemon() as d:
        assert d.config.stats_every == 0
        t = Trained(d, "auto", steps=1)
        stats = d.stats.get(t.model)
        stats._last_cost = 1e6  # as if the last norms had taken forever: the budget is spent
        with Client(d.grpc_address) as c:
            for _ in range(3):
                c.push_grad("auto", {n: torch.ones(s) for n, s in SHAPES.items()})
        assert d.http_url is not None
        steps = httpx.get(f"{d.http_url}/v1/models/auto/history").json()["steps"]
        assert steps[0]["grad_norm"] is not None  # the first step always fits the budget
        assert all(e["grad_norm"] is None and e["update_norm"] is None for e in steps[1:])


def test_snapshot_download_loads_with_weights_only(
    http: httpx.Client, trained: Trained, daemon: Daemon, tmp_path: Path
) -> None:
    r = http.get(f"/v1/models/{trained.name}/snapshot")
    assert r.status_code == 200 and r.headers["content-type"] == "application/octet-stream"
    snap = torch.load(io.BytesIO(r.content), weights_only=True)
    model = trained.model
    assert snap["adamd"]["version"] == STEPS and snap["adamd"]["model"] == trained.name
    for name, p in model.params.items():
        assert torch.equal(snap["model"][name], p)
    # It is what `adamd snapshot export` writes, so `import` takes it: a copy of the model.
    downloaded = tmp_path / "downloaded.pt"
    downloaded.write_bytes(r.content)
    copy = trained.name + "-copy"
    assert (
        cli_main(["snapshot", "import", str(downloaded), copy, "--server", daemon.grpc_address])
        == 0
    )
    original, imported = snapshot(model), snapshot(daemon.registry.get(copy))
    del original["version"], imported["version"]  # an import starts a new model at version 0
    assert_bitwise_equal(original, imported)
    # The optimizer part is torch.optim.Adam's state_dict: a local Adam loads it and matches.
    local = [snap["model"][n].clone() for n in SHAPES]
    opt = torch.optim.Adam(local, lr=1.0)
    opt.load_state_dict(snap["optimizer"])
    assert opt.param_groups[0]["lr"] == 0.01
    for q, p in zip(local, model.params.values()):
        for k in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(opt.state[q][k], model.optimizer.state[p][k])


def test_routes_while_training(http: httpx.Client, daemon: Daemon) -> None:
    """Reads during steady pushes: always 200, versions never go back."""
    name = "http-live"
    params = {"w": torch.zeros(256, 64)}
    stop = threading.Event()
    with Client(daemon.grpc_address) as c:
        c.create_model(name, params)

        def train() -> None:
            while not stop.is_set():
                c.push_grad(name, {"w": torch.randn(256, 64)}, loss=1.0)

        worker = threading.Thread(target=train)
        worker.start()
        try:
            seen = -1
            for _ in range(20):
                for path in ("", "/params", "/history?limit=5"):
                    r = http.get(f"/v1/models/{name}{path}")
                    assert r.status_code == 200, r.text
                v = http.get(f"/v1/models/{name}/params").json()["version"]
                assert v >= seen
                seen = v
        finally:
            stop.set()
            worker.join()
        assert daemon.registry.get(name).version > 0
        c.delete_model(name)


def test_unknown_routes_and_models_are_json_404(http: httpx.Client) -> None:
    for path in (
        "/nope",
        "/v1/models/missing",
        "/v1/models/missing/params",
        "/v1/models/missing/history",
        "/v1/models/missing/snapshot",
        "/static/missing.js",
    ):
        r = http.get(path)
        assert r.status_code == 404, path
        body = r.json()
        assert body["error"] == "NotFound" and body["message"], path
    r = http.delete("/v1/models/missing")
    assert r.status_code == 404 and r.json()["error"] == "NotFound"


def test_bad_requests_are_json_400(http: httpx.Client, trained: Trained) -> None:
    lr = trained.model.optimizer.param_groups[0]["lr"]
    for path, body in (
        (f"/v1/models/{trained.name}/param_groups/0", {"lr": -1.0}),  # torch refuses it
        (f"/v1/models/{trained.name}/param_groups/7", {"lr": 0.1}),  # no such group
        (f"/v1/models/{trained.name}/param_groups/0", {"momentum": 0.9}),  # not an Adam option
        (f"/v1/models/{trained.name}/param_groups/0", {}),
    ):
        r = http.post(path, json=body)
        assert r.status_code == 400, (body, r.text)
        assert r.json()["error"] == "InvalidArgument"
    assert http.get("/v1/models/x/history", params={"limit": -1}).status_code == 400
    assert trained.model.optimizer.param_groups[0]["lr"] == lr


def test_openapi_documents_the_routes(http: httpx.Client) -> None:
    assert http.get("/docs").status_code == 200
    paths = http.get("/openapi.json").json()["paths"]
    for p in (
        "/healthz",
        "/readyz",
        "/metrics",
        "/v1/models",
        "/v1/models/{model}",
        "/v1/models/{model}/params",
        "/v1/models/{model}/history",
        "/v1/models/{model}/snapshot",
        "/v1/models/{model}/param_groups/{group}",
    ):
        assert p in paths, p


def test_operations_need_the_token() -> None:
    token = "s3cret"
    with running_daemon(token=token) as d:
        assert d.http_url is not None
        with Client(d.grpc_address, token=token) as c:
            c.create_model("guarded", {"w": torch.ones(3)}, lr=0.01)
            c.push_grad("guarded", {"w": torch.ones(3)})
        model = d.registry.get("guarded")
        url = f"{d.http_url}/v1/models/guarded"
        good = {"Authorization": f"Bearer {token}"}
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": token}):
            for method, path, body in (
                ("POST", "/param_groups/0", {"lr": 0.5}),
                ("POST", "/snapshot", None),
                ("DELETE", "", None),
                ("GET", "/snapshot", None),  # the weights and Adam state, as a gRPC pull
            ):
                r = httpx.request(method, url + path, json=body, headers=headers)
                assert r.status_code == 401, (method, path, headers)
                assert r.json()["error"] == "Unauthenticated"
                assert r.headers["www-authenticate"] == "Bearer"
        # Refused means unchanged: same lr, no snapshot written, model still there.
        assert model.optimizer.param_groups[0]["lr"] == 0.01
        assert not list((d.config.data_dir / "guarded").glob("*.json"))
        assert d.registry.get("guarded") is model
        # Whole-model statistics stay open (the dashboard shows them); per-parameter norms reveal
        # weights (a one-element parameter's norm is |w|) and need the token (docs/security.md).
        assert httpx.get(url).status_code == 200
        assert httpx.get(url + "/history").status_code == 200
        assert httpx.get(url + "/params").status_code == 401
        assert httpx.get(url + "/params", headers=good).status_code == 200
        assert httpx.get(url + "/snapshot", headers=good).status_code == 200
        assert httpx.get(f"{d.http_url}/metrics").status_code == 200
        # With the token each operation works.
        r = httpx.post(
            url + "/param_groups/0", json={"lr": 0.5, "betas": [0.8, 0.99]}, headers=good
        )
        assert r.status_code == 200, r.text
        assert model.optimizer.param_groups[0]["lr"] == 0.5
        assert model.optimizer.param_groups[0]["betas"] == (0.8, 0.99)
        r = httpx.post(url + "/snapshot", headers=good)
        assert r.status_code == 200, r.text
        assert r.json()["version"] == 1
        assert list((d.config.data_dir / "guarded").glob("*.json"))
        d.ops.snapshots = None  # a daemon without snapshots answers 409, not a crash
        r = httpx.post(url + "/snapshot", headers=good)
        assert r.status_code == 409 and r.json()["error"] == "FailedPrecondition"
        assert httpx.delete(url, headers=good).json() == {"deleted": "guarded"}
        assert "guarded" not in d.registry.names()


def test_async_worker_lag(http: httpx.Client, daemon: Daemon) -> None:
    name = "http-async-lag"
    with Client(daemon.grpc_address) as c:
        c.create_model(name, {"w": torch.zeros(4)}, mode="async", max_staleness=10)
        c.push_grad(name, {"w": torch.ones(4)}, rank=1, version=0)  # v1, rank 1 up to date
        for v in range(1, 4):
            c.push_grad(name, {"w": torch.ones(4)}, rank=0, version=v)  # v2..v4
        d = http.get(f"/v1/models/{name}").json()
        assert d["version"] == 4
        assert {w["rank"]: w["lag"] for w in d["workers"]} == {0: 0, 1: 3}
        steps = http.get(f"/v1/models/{name}/history").json()["steps"]
        assert steps[-1]["lag"] == {"0": 0, "1": 3}
        c.delete_model(name)


def test_inspect_command(
    daemon: Daemon, trained: Trained, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli_main(["inspect", "--http", str(daemon.http_url), "--width", "200"]) == 0
    out = capsys.readouterr().out
    assert trained.name in out and "sync" in out
    args = ["inspect", "--http", str(daemon.http_url), "--width", "200", trained.name]
    assert cli_main(args) == 0
    out = capsys.readouterr().out
    for name in SHAPES:
        assert name in out
    assert "exp_avg norm" in out and "recent steps" in out and "fused" in out
    assert cli_main(["inspect", "--http", str(daemon.http_url), "nope"]) == 1
    assert "no model named" in capsys.readouterr().err
    bare = str(daemon.http_url).removeprefix("http://")  # host:port, as people type it
    assert cli_main(["inspect", "--http", bare, "--width", "200"]) == 0
    assert trained.name in capsys.readouterr().out


def test_complex_params_stats(http: httpx.Client, daemon: Daemon) -> None:
    """Norms of complex parameters: a complex tensor counts as its real view (as Adam steps it);
    float64 ones are measured in float64."""
    params = {"c": torch.randn(4, 3, dtype=torch.complex128), "r": torch.randn(3)}
    with Client(daemon.grpc_address) as c:
        c.create_model("http-complex", params, foreach=False)
        before = c.pull_params("http-complex")
        grads = {n: torch.randn_like(p) for n, p in params.items()}
        c.push_grad("http-complex", grads)
        after = c.pull_params("http-complex")
    model = daemon.registry.get("http-complex")
    rows = {r["name"]: r for r in http.get("/v1/models/http-complex/params").json()["params"]}
    st = model.optimizer.state[model.params["c"]]
    r = rows["c"]
    assert r["dtype"] == "complex128" and r["step"] == 1
    assert close(r["norm"], float(model.params["c"].norm()))
    assert close(r["grad_norm"], float(grads["c"].norm()))
    assert close(r["exp_avg_norm"], float(st["exp_avg"].norm()))
    assert close(r["exp_avg_sq_mean"], float(torch.view_as_real(st["exp_avg_sq"]).mean()))
    assert close(r["update_norm"], float((after["c"] - before["c"]).norm()), rel=1e-4)
    entry = http.get("/v1/models/http-complex/history").json()["steps"][-1]
    assert close(entry["grad_norm"], total_norm(grads))
