"""One model sharded over several adamd servers: addressing, placement, and training through
three real servers on loopback bitwise equal to a local fused Adam and to one server."""

from __future__ import annotations

import contextlib
import copy
import itertools
import json
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import torch

from adamd.client import (
    AlreadyExists,
    Client,
    FailedPrecondition,
    InvalidArgument,
    NonFiniteGradient,
    NotFound,
    RemoteAdam,
    Unavailable,
)
from adamd.client._addresses import parse_servers
from adamd.client._sharding import ShardedClient
from adamd.protocol.layout import Layout

from ..conftest import running_daemon

if TYPE_CHECKING:
    from adamd.server import Daemon

SLICE = 256  # bytes: small, so the test models have sliced parameters


# --- addressing ---------------------------------------------------------------------------------


def test_server_lists_in_every_form(monkeypatch: pytest.MonkeyPatch) -> None:
    assert parse_servers("a:1") == ["a:1"]
    assert parse_servers("a:1, b:2,c:3") == ["a:1", "b:2", "c:3"]
    assert parse_servers(["a:1", "b:2"]) == ["a:1", "b:2"]
    assert parse_servers("adamd-{0..3}.adamd-headless:50051") == [
        f"adamd-{i}.adamd-headless:50051" for i in range(4)
    ]
    assert parse_servers("h{1..2}-{0..1}:9") == ["h1-0:9", "h1-1:9", "h2-0:9", "h2-1:9"]
    monkeypatch.setenv("ADAMD_SERVERS", "x-{0..2}:7")
    assert parse_servers(None) == ["x-0:7", "x-1:7", "x-2:7"]
    monkeypatch.delenv("ADAMD_SERVERS")
    assert parse_servers(None) == ["127.0.0.1:50051"]
    for bad, words in [
        ("a:1,,b:2", "empty"),
        ("a:1,a:1", "twice"),
        ("adamd-{3..1}:5", "bad range"),
        ("adamd-{0,1}:5", "FIRST..LAST"),
        ([], "no server"),
    ]:
        with pytest.raises(ValueError, match=words):
            parse_servers(bad)


def test_one_server_is_a_plain_client_and_several_a_sharded_one() -> None:
    with Client("127.0.0.1:1") as one:
        assert type(one) is Client and not one.sharded and one.address == "127.0.0.1:1"
    with Client(["127.0.0.1:1"]) as listed:
        assert type(listed) is Client
    with Client("127.0.0.1:1,127.0.0.1:2", slice_bytes=64) as two:
        assert isinstance(two, ShardedClient) and two.sharded
        assert two.servers == ["127.0.0.1:1", "127.0.0.1:2"] and two.slice_bytes == 64


# --- placement ----------------------------------------------------------------------------------


def _spec(**shapes: tuple[int, ...]) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    return {n: (s, torch.float32) for n, s in shapes.items()}


def test_layout_is_size_balanced_largest_first() -> None:
    spec = _spec(a=(10,), b=(40,), c=(30,), d=(20,))
    layout = Layout.plan(["s0", "s1"], spec, [list(spec)], slice_bytes=1 << 20)
    # largest first onto the lighter shard: b->0, c->1, d->1, a->0
    assert {n: p.parts[0].shard for n, p in layout.params.items()} == {
        "a": 0,
        "b": 0,
        "c": 1,
        "d": 1,
    }
    assert layout.loads() == [200, 200]
    assert list(layout.params) == ["a", "b", "c", "d"]  # the model's order is kept


def test_large_tensors_are_split_along_dim0_over_distinct_shards() -> None:
    spec = _spec(emb=(1000, 16), w=(16, 16), b=(16,))
    layout = Layout.plan(["s0", "s1", "s2"], spec, [list(spec)], slice_bytes=8192)
    emb = layout.params["emb"]
    assert emb.sliced and [q.shard for q in emb.parts] == [0, 1, 2]
    bounds = [(q.start, q.stop) for q in emb.parts]
    assert bounds[0][0] == 0 and bounds[-1][1] == 1000
    assert all(a[1] == b[0] for a, b in itertools.pairwise(bounds))  # contiguous, no gaps
    assert all(q.stop > q.start for q in emb.parts)
    assert sum(layout.loads()) == 4 * (1000 * 16 + 16 * 16 + 16)
    assert max(layout.loads()) - min(layout.loads()) <= 16 * 16 * 4 * 2
    # Pieces are views of the caller's tensor: their rows, nothing copied.
    t = torch.arange(16000.0).reshape(1000, 16)
    pieces = [layout.shard_params(k, {"emb": t})["emb"] for k in range(3)]
    assert torch.equal(torch.cat(pieces), t)
    assert pieces[1].data_ptr() == t[bounds[1][0]].data_ptr()


def test_layout_record_round_trips_and_identifies_the_servers() -> None:
    spec = _spec(emb=(100, 4), w=(8, 8))
    layout = Layout.plan(["a:1", "b:2"], spec, [["emb"], ["w"]], slice_bytes=512)
    again, shard = Layout.from_record(layout.record(1))
    assert shard == 1 and again.id == layout.id and again.groups == [["emb"], ["w"]]
    assert Layout.plan(["b:2", "a:1"], spec, [["emb"], ["w"]], 512).id != layout.id
    assert Layout.plan(["a:1", "b:2"], spec, [["emb"], ["w"]], 256).id != layout.id
    doc = json.loads(layout.record(0))
    doc["slice_bytes"] = 1
    with pytest.raises(ValueError, match="does not match"):
        Layout.from_record(json.dumps(doc))


def test_a_transformer_with_a_large_embedding_spreads_evenly() -> None:
    """GPT-2 small's shapes (a 154 MB token embedding) at the default 4 MiB slices: the shards'
    bytes stay within a few percent of each other (bench/sharded.py reports the same rows)."""
    from bench.sharded import balance

    for row in balance([2, 4, 8]):
        assert row["max_over_min"] < 1.05, row
        assert row["sliced_tensors"] >= 1


def test_too_few_tensors_for_the_shards_is_refused_clearly() -> None:
    with pytest.raises(ValueError, match="every shard needs at least one"):
        Layout.plan(["a", "b", "c"], _spec(w=(4,), b=(2,)), [["w", "b"]])


# --- three real servers -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def three() -> Iterator[list[Daemon]]:
    with contextlib.ExitStack() as stack:
        yield [stack.enter_context(running_daemon()) for _ in range(3)]


@pytest.fixture
def servers(three: list[Daemon]) -> list[str]:
    return [d.grpc_address for d in three]


def _params(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "emb": torch.randn(96, 8, generator=g),  # 3 KiB: sliced over the three shards
        "w": torch.randn(8, 5, generator=g),
        "b": torch.randn(5, generator=g),
        "c": torch.randn(3, 2, generator=g),
    }


def _grads(step: int, rank: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 * step + rank)
    return {n: torch.randn(t.shape, generator=g) for n, t in _params().items()}


def _equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for n in a:
        assert a[n].dtype == b[n].dtype and torch.equal(a[n], b[n]), n


def test_three_shards_train_bitwise_like_local_fused_adam_and_one_server(
    servers: list[str], model_name: str
) -> None:
    opts: dict[str, Any] = {"lr": 0.01, "weight_decay": 0.1, "amsgrad": True, "fused": True}
    local = {n: t.clone() for n, t in _params().items()}
    ref = torch.optim.Adam(list(local.values()), **opts)
    with Client(servers, slice_bytes=SLICE) as sharded, Client(servers[0]) as one:
        info = sharded.create_model(model_name, _params(), **opts)
        layout = sharded.layout(model_name)
        assert layout.params["emb"].sliced and len(layout.params["emb"].parts) == 3
        assert info.params["emb"] == ((96, 8), torch.float32) and info.created
        one.create_model(model_name + "-one", _params(), **opts)
        for step in range(6):
            g = _grads(step)
            r = sharded.push_grad(model_name, g, version=step)
            assert r.version == step + 1 and r.applied
            one.push_grad(model_name + "-one", g)
            for n, p in local.items():
                p.grad = g[n]
            ref.step()
        pulled = sharded.pull(model_name)
        assert pulled.version == 6
        _equal(pulled.params, local)
        _equal(pulled.params, one.pull_params(model_name + "-one"))
        state = sharded.get_state(model_name)
        assert state["version"] == 6
        for n, p in local.items():
            for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq", "step"):
                assert torch.equal(state["state"][n][key], ref.state[p][key]), (n, key)
        # Into preallocated tensors (the shards stream straight into their rows), and a subset.
        out = {n: torch.full_like(t, float("nan")) for n, t in local.items()}
        sharded.pull(model_name, out=out)
        _equal(out, local)
        _equal(
            sharded.pull_params(model_name, ["emb", "b"]), {"emb": local["emb"], "b": local["b"]}
        )
        assert sharded.pull(model_name, if_newer_than=6).not_modified


def _calls(d: Daemon, method: str) -> float:
    return d.metrics.rpc_calls.labels(method, "OK")._value.get()


def test_a_sharded_step_is_one_exchange_on_every_shard(
    three: list[Daemon], servers: list[str], model_name: str
) -> None:
    """ShardedClient.step over the bulk channel: each shard's part goes as that shard's one-
    exchange STEP (no separate push and pull), into `out`'s rows, bitwise the push and pull of a
    twin model give."""
    opts: dict[str, Any] = {"lr": 0.01, "weight_decay": 0.1}
    with Client(servers, slice_bytes=SLICE, transport="bulk") as c:
        c.create_model(model_name, _params(), **opts)
        c.create_model(model_name + "-twin", _params(), **opts)
        out = {n: torch.full_like(t, float("nan")) for n, t in _params().items()}

        def counts() -> list[tuple[float, ...]]:
            return [tuple(_calls(d, m) for m in ("Step", "PushGrad", "PullParams")) for d in three]

        before = counts()
        for step in range(3):
            pushed, pulled = c.step(model_name, _grads(step), out, version=step)
            assert pushed.version == step + 1 and pushed.applied and pulled.version == step + 1
            assert all(pulled.params[n] is out[n] for n in out)
        # A server counts a call once its reply is written: the client may read the reply first.
        deadline = time.monotonic() + 10
        while (got := [tuple(a - b for a, b in zip(*ab)) for ab in zip(counts(), before)]) != [
            (3, 0, 0)
        ] * 3 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert got == [(3, 0, 0)] * 3
        for step in range(3):
            c.push_grad(model_name + "-twin", _grads(step), version=step)
        _equal(out, c.pull_params(model_name + "-twin"))


def test_a_retried_push_is_applied_once_on_every_shard(servers: list[str], model_name: str) -> None:
    with Client(servers, slice_bytes=SLICE) as c:
        c.create_model(model_name, _params(), lr=0.1)
        first = c.push_grad(model_name, _grads(0), push_id="same-id")
        before = c.pull_params(model_name)
        again = c.push_grad(model_name, _grads(0), push_id="same-id")
        assert first.version == again.version == 1 and again.duplicate and not first.duplicate
        _equal(c.pull_params(model_name), before)
        assert c.describe(model_name).shard_versions == (1, 1, 1)


def test_bad_input_changes_no_shard(servers: list[str], model_name: str) -> None:
    with Client(servers, slice_bytes=SLICE) as c:
        c.create_model(model_name, _params(), lr=0.1)
        c.push_grad(model_name, _grads(0))
        before = c.pull_params(model_name), c.get_state(model_name)
        bad = _grads(1)
        bad["emb"][95, 7] = float("inf")  # only the last shard's slice is not finite
        with pytest.raises(NonFiniteGradient, match="emb"):
            c.push_grad(model_name, bad)
        with pytest.raises(InvalidArgument, match="shape"):
            c.push_grad(model_name, {**_grads(1), "emb": torch.zeros(95, 8)})
    with Client(servers, slice_bytes=SLICE, wire_dtype=torch.float16) as half:
        big = _grads(1)
        big["emb"][95, 7] = 1e5  # finite in float32, inf as float16 on the wire
        with pytest.raises(NonFiniteGradient, match="float16"):
            half.push_grad(model_name, big)
    with Client(servers, slice_bytes=SLICE) as c:
        with pytest.raises(NotFound, match="nope"):
            c.push_grad(model_name, {"nope": torch.zeros(1)})
        with pytest.raises(InvalidArgument, match="shape"):
            c.load_state(
                model_name, {"emb": {"step": torch.tensor(1.0), "exp_avg": torch.zeros(2)}}
            )
        after = c.pull_params(model_name), c.get_state(model_name)
        _equal(after[0], before[0])
        assert after[1]["version"] == before[1]["version"] == 1
        for n in before[1]["state"]:
            _equal(after[1]["state"][n], before[1]["state"][n])
        assert c.describe(model_name).shard_versions == (1, 1, 1)


def test_layout_is_recorded_and_another_one_is_refused(
    three: list[Daemon], servers: list[str], model_name: str
) -> None:
    with Client(servers, slice_bytes=SLICE) as c:
        c.create_model(model_name, _params(), lr=0.1)
        layout_id = c.layout(model_name).id
        c.push_grad(model_name, _grads(0))
        before = c.pull_params(model_name)
    # Another order of the same servers: refused, naming the servers it was created over.
    with Client([servers[1], servers[0], servers[2]], slice_bytes=SLICE) as swapped:
        with pytest.raises(FailedPrecondition, match="same servers in the same order"):
            swapped.describe(model_name)
        with pytest.raises(AlreadyExists, match="another shard layout"):
            swapped.create_model(model_name, _params(), lr=0.1, exist_ok=True)
    # Another slice threshold places the parameters differently: refused by every shard.
    with (
        Client(servers, slice_bytes=1 << 20) as other,
        pytest.raises(AlreadyExists, match=f"layout '{layout_id}' there"),
    ):
        other.create_model(model_name, _params(), lr=0.1, exist_ok=True)
    # A plain client of one shard cannot join it as if it were the whole model.
    with Client(servers[0]) as one, pytest.raises(ValueError, match="one shard of a model"):
        RemoteAdam([torch.zeros(3)], server=servers[0], model=model_name, client=one)
    with Client(servers, slice_bytes=SLICE) as c:
        _equal(c.pull_params(model_name), before)  # nothing above changed anything
    # The layout is visible over HTTP on every shard.
    for k, d in enumerate(three):
        url = f"{d.http_url}/v1/models/{model_name}"
        with urllib.request.urlopen(url, timeout=10) as resp:
            shard = json.load(resp)["shard"]
        assert shard["index"] == k and shard["of"] == 3 and shard["layout_id"] == layout_id
        assert shard["servers"] == servers and "emb" in shard["params_here"]
        assert [p[0] for p in shard["sliced"]["emb"]] == [0, 1, 2]
        with urllib.request.urlopen(f"{d.http_url}/metrics", timeout=10) as resp:
            metrics = resp.read().decode()
        labels = f'layout="{layout_id}",model="{model_name}",shard="{k}",shards="3"'
        assert f"adamd_model_shard{{{labels}}} {float(k)}" in metrics


def test_inspect_shows_the_shards_side_by_side_and_which_is_behind(
    three: list[Daemon], servers: list[str], model_name: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from adamd.server.cli.main import main

    with Client(servers, slice_bytes=SLICE) as c:
        c.create_model(model_name, _params(), lr=0.1)
        c.push_grad(model_name, _grads(0))
    with Client(servers[2]) as last:  # shard 2 alone steps once more: the others are behind
        last.push_grad(model_name, {})
    urls = ",".join(d.http_url or "" for d in three)
    assert main(["inspect", "--http", urls, "--width", "200", model_name]) == 0
    out = capsys.readouterr().out
    assert f"model {model_name}: 3 shards" in out
    rows = {line.split("│")[1].strip(): line for line in out.splitlines() if line.count("│") > 5}
    for k in range(3):
        cells = [c.strip() for c in rows[str(k)].split("│")[1:-1]]
        assert cells[1] == three[k].http_url
        assert cells[2:4] == (["2", "0"] if k == 2 else ["1", "1"])


def test_a_failed_create_leaves_no_shard_behind(servers: list[str], model_name: str) -> None:
    with Client(servers[2]) as last:
        last.create_model(model_name, {"x": torch.zeros(2)})  # a plain model of that name
    with (
        Client(servers, slice_bytes=SLICE) as c,
        pytest.raises(AlreadyExists, match=f"shard 2 \\({servers[2]}\\)"),
    ):
        c.create_model(model_name, _params(), lr=0.1)
    for addr in servers[:2]:
        with Client(addr) as one, pytest.raises(NotFound):
            one.describe(model_name)


# --- RemoteAdam over three shards ---------------------------------------------------------------


def _net(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Embedding(48, 8), torch.nn.Flatten(), torch.nn.Linear(24, 5), torch.nn.Linear(5, 2)
    )


def _batch(step: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(7919 * step + rank)
    return torch.randint(0, 48, (4, 3), generator=g), torch.randn(4, 2, generator=g)


def _loss(net: torch.nn.Module, step: int, rank: int) -> torch.Tensor:
    x, y = _batch(step, rank)
    return torch.nn.functional.mse_loss(net(x), y)


def _two_rank_reference(
    steps: int, step_lr: bool = False
) -> tuple[torch.nn.Module, torch.optim.Adam]:
    """One local fused Adam fed the mean of the two ranks' gradients (StepLR halving every 2)."""
    net = _net(0)
    ref = torch.optim.Adam(net.parameters(), lr=0.02, fused=True)
    sched = torch.optim.lr_scheduler.StepLR(ref, step_size=2, gamma=0.5) if step_lr else None
    for step in range(steps):
        grads = []
        for rank in range(2):
            net.zero_grad()
            _loss(net, step, rank).backward()
            grads.append([torch.clone(p.grad) for p in net.parameters() if p.grad is not None])
        for p, g0, g1 in zip(net.parameters(), *grads):
            p.grad = (g0 + g1) / 2
        ref.step()
        if sched is not None:
            sched.step()
    return net, ref


def _worker(
    net: torch.nn.Module, servers: list[str], model: str, rank: int, steps: int, out: dict[int, Any]
) -> None:
    with Client(servers, slice_bytes=SLICE) as client:
        opt = RemoteAdam(
            net.parameters(), lr=0.02, world_size=2, rank=rank, model=model, client=client
        )
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
        for step in range(steps):
            opt.zero_grad()
            _loss(net, step, rank).backward()
            opt.step()
            sched.step()
        out[rank] = ({n: p.detach().clone() for n, p in net.named_parameters()}, opt.state_dict())


def test_remote_adam_sync_workers_over_three_shards_match_local_adam_on_the_mean(
    servers: list[str], model_name: str
) -> None:
    steps = 5
    out: dict[int, Any] = {}
    nets = [_net(0) for _ in range(2)]  # here: torch.manual_seed is global, threads would race
    threads = [
        threading.Thread(target=_worker, args=(nets[r], servers, model_name, r, steps, out))
        for r in range(2)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert sorted(out) == [0, 1]
    net, ref = _two_rank_reference(steps, step_lr=True)
    expected = {n: p.detach() for n, p in net.named_parameters()}
    for rank in range(2):
        _equal(out[rank][0], expected)
    got, want = out[0][1], ref.state_dict()
    assert got["param_groups"][0]["lr"] == want["param_groups"][0]["lr"]
    for i, entry in want["state"].items():
        for key, value in entry.items():
            assert torch.equal(got["state"][i][key], value), (i, key)


def test_remote_adam_state_dict_and_new_groups_across_shards(
    servers: list[str], model_name: str
) -> None:
    net = _net(1)
    local = _net(1)
    ref = torch.optim.Adam(local.parameters(), lr=0.01, fused=True)
    with Client(servers, slice_bytes=SLICE) as client:
        opt = RemoteAdam(net.parameters(), lr=0.01, model=model_name, client=client)
        for step in range(3):
            for n_, o_ in ((net, opt), (local, ref)):
                o_.zero_grad()
                _loss(n_, step, 0).backward()
                o_.step()
        saved = opt.state_dict()
        want = ref.state_dict()
        for i, entry in want["state"].items():
            for key, value in entry.items():
                assert torch.equal(saved["state"][i][key], value), (i, key)
        # A state dict from a local Adam loads into the sharded model (and back out, equal).
        ref2 = torch.optim.Adam(_net(2).parameters(), lr=0.003, fused=True)
        two = _net(2)
        ref2_net = list(two.parameters())
        for p in ref2_net:
            p.grad = torch.ones_like(p)
        torch.optim.Adam(ref2_net, lr=0.003, fused=True).step()
        ref2 = torch.optim.Adam(ref2_net, lr=0.003, fused=True)
        for p in ref2_net:
            p.grad = torch.full_like(p, 0.5)
        ref2.step()
        opt.load_state_dict(ref2.state_dict())
        back = opt.state_dict()
        assert back["param_groups"][0]["lr"] == 0.003
        for i, entry in ref2.state_dict()["state"].items():
            for key, value in entry.items():
                assert torch.equal(back["state"][i][key], value), (i, key)
        # add_param_group: a new (large, so sliced) parameter trains like torch's.
        extra = torch.nn.Parameter(torch.randn(64, 4))
        extra_local = torch.nn.Parameter(extra.detach().clone())
        opt.add_param_group({"params": [extra], "lr": 0.05})
        assert len(client.layout(model_name).params) == 6
        assert client.layout(model_name).params["5"].sliced
        ref3 = torch.optim.Adam([extra_local], lr=0.05, fused=True)
        for _ in range(2):
            g = torch.randn(64, 4)
            extra.grad, extra_local.grad = g.clone(), g.clone()
            opt.step()
            ref3.step()
        assert torch.equal(extra.detach(), extra_local.detach())
        # Another worker joining now sees the whole model, groups included.
        with Client(servers, slice_bytes=SLICE) as c2:
            info = c2.describe(model_name)
            assert info.param_groups[1]["params"] == ["5"]
            assert info.shard_versions == (info.version,) * 3
        opt.close()


# --- a shard that is down -----------------------------------------------------------------------


def test_a_shard_that_is_down_fails_pushes_clearly_and_the_same_push_completes_later(
    model_name: str, tmp_path: Path
) -> None:
    """A shard that is down: the push retries until the deadline, then Unavailable names the
    shard. The other shards applied it; once the shard is back (durable: at its version), the
    same push id applies it there and is a duplicate elsewhere, and the model is whole again."""
    local = {n: t.clone() for n, t in _params().items()}
    ref = torch.optim.Adam(list(local.values()), lr=0.1, fused=True)
    with contextlib.ExitStack() as stack:
        ds = [
            stack.enter_context(running_daemon(durable=True, data_dir=tmp_path / f"d{k}"))
            for k in range(3)
        ]
        servers = [d.grpc_address for d in ds]
        # The retry window outlasts the channel's reconnect backoff (at most 2 s, +20% jitter),
        # so the push after the restart finds the shard back.
        with Client(servers, slice_bytes=SLICE, retry_timeout=5.0) as c:
            c.create_model(model_name, _params(), lr=0.1)
            for step in range(2):
                g = _grads(step)
                if step == 1:
                    ds[1].stop(grace=0.5)
                    with pytest.raises(Unavailable, match=f"shard 1 \\({servers[1]}\\)"):
                        c.push_grad(model_name, g, version=step, push_id="p1")
                    with pytest.raises(Unavailable, match="shard 1"):
                        c.pull_params(model_name)
                    port = int(servers[1].rsplit(":", 1)[1])
                    stack.enter_context(
                        running_daemon(durable=True, data_dir=tmp_path / "d1", grpc_port=port)
                    )
                r = c.push_grad(model_name, g, version=step, push_id=f"p{step}")
                assert r.version == step + 1
                for n, p in local.items():
                    p.grad = g[n]
                ref.step()
            assert c.describe(model_name).shard_versions == (2, 2, 2)
            _equal(c.pull_params(model_name), local)


def test_snapshot_export_of_a_sharded_model_is_one_torch_checkpoint(
    model_name: str, tmp_path: Path
) -> None:
    """`adamd snapshot export --shard DIR ...`: the newest version every shard holds, whole."""
    from adamd.server.cli.main import main

    local = {n: t.clone() for n, t in _params().items()}
    ref = torch.optim.Adam(list(local.values()), lr=0.01, fused=True)
    at: dict[int, tuple[dict[str, torch.Tensor], dict[str, Any]]] = {}
    dirs = [tmp_path / f"d{k}" for k in range(3)]
    with contextlib.ExitStack() as stack:
        ds = [stack.enter_context(running_daemon(data_dir=d)) for d in dirs]
        with Client([d.grpc_address for d in ds], slice_bytes=SLICE) as c:
            c.create_model(model_name, _params(), lr=0.01)
            for step in range(4):
                g = _grads(step)
                c.push_grad(model_name, g)
                for n, p in local.items():
                    p.grad = g[n]
                ref.step()
                at[step + 1] = (
                    {n: t.clone() for n, t in local.items()},
                    copy.deepcopy(ref.state_dict()),
                )
                if step == 2:
                    assert c.snapshot(model_name).version == 3
    # Stopping wrote version 4 on every shard; shard 2 loses it: 3 is the newest in common.
    (newest,) = [f for f in (dirs[2] / model_name).glob("snap-*-v4.json")]
    args = ["snapshot", "export", model_name]
    shards = [a for d in [dirs[2], dirs[0], dirs[1]] for a in ("--shard", str(d))]  # any order
    for version in (4, 3):
        if version == 3:
            newest.unlink()
        out = tmp_path / f"whole-{version}.pt"
        assert main([*args, str(out), *shards]) == 0
        ckpt = torch.load(out, weights_only=True)
        params, state_dict = at[version]
        _equal(ckpt["model"], params)
        for i, entry in state_dict["state"].items():
            for key, value in entry.items():
                assert torch.equal(ckpt["optimizer"]["state"][i][key], value), (i, key)
        # A local Adam loads it and steps on bitwise like the reference did.
        resumed = {n: t.clone() for n, t in ckpt["model"].items()}
        opt = torch.optim.Adam(list(resumed.values()), lr=0.01, fused=True)
        opt.load_state_dict(ckpt["optimizer"])
        if version == 3:
            g = _grads(3)
            for n, p in resumed.items():
                p.grad = g[n]
            opt.step()
            _equal(resumed, at[4][0])
    # Not every shard: refused, naming what is missing.
    assert main([*args, str(tmp_path / "x.pt"), "--shard", str(dirs[0])]) == 1
    assert not (tmp_path / "x.pt").exists()


def test_elastic_workers_over_three_shards_get_one_rank_everywhere(
    servers: list[str], model_name: str
) -> None:
    nets = [_net(0), _net(0)]
    clients = [Client(servers, slice_bytes=SLICE) for _ in nets]
    opts = [
        RemoteAdam(n.parameters(), lr=0.02, world_size="elastic", model=model_name, client=c)
        for n, c in zip(nets, clients)
    ]
    assert [o.rank for o in opts] == [0, 1]  # the rank shard 0 assigned, registered everywhere

    def train(i: int) -> None:
        for step in range(3):
            opts[i].zero_grad()
            _loss(nets[i], step, i).backward()
            opts[i].step()

    threads = [threading.Thread(target=train, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    net, _ = _two_rank_reference(3)
    expected = {n: p.detach() for n, p in net.named_parameters()}
    for n_ in nets:
        _equal({n: p.detach() for n, p in n_.named_parameters()}, expected)
    assert clients[0].describe(model_name).shard_versions == (3, 3, 3)
    for o, c in zip(opts, clients):
        o.close()  # leaves on every shard
        c.close()


def test_groups_empty_on_some_shards_train_edit_and_survive_a_restart(
    model_name: str, tmp_path: Path
) -> None:
    """A group whose parameters all live on one shard is an empty group on the others, so group
    indices agree everywhere: edits, state and snapshots (restart and restore) work through it."""
    p = {"emb": torch.randn(96, 8), "w": torch.randn(8, 5), "b": torch.randn(5)}
    groups: list[dict[str, Any]] = [{"params": ["emb", "w"]}, {"params": ["b"], "lr": 0.5}]
    local = {n: t.clone() for n, t in p.items()}
    ref_groups: list[dict[str, Any]] = [
        {"params": [local["emb"], local["w"]]},
        {"params": [local["b"]], "lr": 0.5},
    ]
    ref = torch.optim.Adam(ref_groups, lr=0.01, fused=True)
    dirs = [tmp_path / f"d{k}" for k in range(3)]
    with contextlib.ExitStack() as stack:
        ds = [stack.enter_context(running_daemon(data_dir=d)) for d in dirs]
        servers = [d.grpc_address for d in ds]
        with Client(servers, slice_bytes=SLICE) as c:
            c.create_model(model_name, p, param_groups=groups, lr=0.01)
            assert sum(1 for k in range(3) if "b" in c.layout(model_name).names_on(k)) == 1
            c.set_hyperparams(model_name, group=1, lr=0.25)
            ref.param_groups[1]["lr"] = 0.25
            g = _grads(0)
            g = {"emb": torch.randn(96, 8), "w": g["w"], "b": g["b"]}
            c.push_grad(model_name, g)
            for n, t in local.items():
                t.grad = g[n]
            ref.step()
        for d in ds:
            d.stop(grace=1.0)  # writes each shard's snapshot
        for k, d in enumerate(dirs):
            port = int(servers[k].rsplit(":", 1)[1])
            stack.enter_context(running_daemon(data_dir=d, grpc_port=port))
        with Client(servers, slice_bytes=SLICE) as c:
            info = c.describe(model_name)
            assert info.shard_versions == (1, 1, 1)
            assert [g["params"] for g in info.param_groups] == [["emb", "w"], ["b"]]
            assert info.param_groups[1]["lr"] == 0.25
            _equal(c.pull_params(model_name), local)
            state = c.get_state(model_name)
            for n, t in local.items():
                assert torch.equal(state["state"][n]["exp_avg_sq"], ref.state[t]["exp_avg_sq"])
