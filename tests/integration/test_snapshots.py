"""Snapshots in-process: format round trip, corruption fallback, retention, periodic and durable
writes, delete, and the PyTorch export/import round trip (bitwise against a local fused Adam)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch

from adamd.client import Client
from adamd.server.cli.main import main as cli_main
from adamd.server.storage import format as fmt

from ..conftest import assert_bitwise_equal, running_daemon, snapshot


def _grads(step: int, shapes: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + step)
    return {n: torch.randn(s, generator=g) for n, s in shapes.items()}


SHAPES = {"w": (16, 8), "b": (8,), "head": (8, 3)}


def _init() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    return {n: torch.randn(s, generator=g) for n, s in SHAPES.items()}


def _create(c: Client, name: str = "m") -> None:
    c.create_model(
        name,
        _init(),
        param_groups=[
            {"params": ["w", "b"], "lr": torch.tensor(0.01), "betas": (0.8, 0.99)},
            {"params": ["head"], "amsgrad": True, "weight_decay": 0.1},
        ],
        lr=0.02,
    )


def _push(c: Client, steps: range, name: str = "m") -> None:
    for k in steps:
        c.push_grad(name, _grads(k, SHAPES), push_id=f"{name}-{k}")


def _newest(data_dir: Path, name: str = "m") -> fmt.SnapshotFile:
    return fmt.list_snapshots(data_dir / name)[-1]


def test_restart_restores_everything_bitwise(tmp_path: Path) -> None:
    with running_daemon(data_dir=tmp_path, http_port=-1) as d, Client(d.grpc_address) as c:
        _create(c)
        _push(c, range(5))
        c.push_grad("m", _grads(5, SHAPES), found_inf=True, push_id="m-skip")
        before = snapshot(d.registry.get("m"))
        requested = d.registry.get("m").requested
        info = c.snapshot("m")
        assert info.version == 5 and Path(info.path).exists() and info.bytes > 0
    with running_daemon(data_dir=tmp_path, http_port=-1) as d, Client(d.grpc_address) as c:
        assert d.snapshots.restored == {"m": 5}
        model = d.registry.get("m")
        assert_bitwise_equal(snapshot(model), before)
        assert model.skipped_steps == 1 and model.mode == "sync" and model.world_size == 1
        assert json.dumps(model.requested, default=repr) == json.dumps(requested, default=repr)
        assert isinstance(model.requested[0]["lr"], torch.Tensor)
        # A retried push whose reply was lost before the restart is answered, not applied again.
        r = c.push_grad("m", _grads(4, SHAPES), push_id="m-4")
        assert r.duplicate and r.version == 5
        assert_bitwise_equal(snapshot(model), before)
        _push(c, range(6, 8))
        assert c.describe("m").version == 7


@pytest.mark.parametrize(
    "damage", ["truncate", "bitflip-tensors", "bitflip-manifest", "torn-manifest"]
)
def test_corrupt_newest_snapshot_falls_back_to_previous(tmp_path: Path, damage: str) -> None:
    with running_daemon(data_dir=tmp_path, http_port=-1) as d, Client(d.grpc_address) as c:
        _create(c)
        _push(c, range(2))
        c.snapshot("m")
        at_2 = snapshot(d.registry.get("m"))
        _push(c, range(2, 3))
        c.snapshot("m")
    newest = _newest(tmp_path)
    assert newest.version == 3
    if damage == "truncate":
        data = newest.tensors.read_bytes()
        newest.tensors.write_bytes(data[: len(data) // 2])
    elif damage == "bitflip-tensors":
        data = bytearray(newest.tensors.read_bytes())
        data[-5] ^= 0x10  # inside the last tensor's data
        newest.tensors.write_bytes(bytes(data))
    elif damage == "bitflip-manifest":
        text = newest.manifest.read_text()
        newest.manifest.write_text(text.replace('"version": 3', '"version": 7'))
    else:
        text = newest.manifest.read_text()
        newest.manifest.write_text(text[: len(text) // 3])
    with pytest.raises(fmt.CorruptSnapshot):
        fmt.load(newest)
    with running_daemon(data_dir=tmp_path, http_port=-1) as d:
        assert d.snapshots.restored == {"m": 2}
        assert len(d.snapshots.corrupt) == 1
        assert_bitwise_equal(snapshot(d.registry.get("m")), at_2)


def test_keeps_last_k_and_cleans_temp_files(tmp_path: Path) -> None:
    with running_daemon(data_dir=tmp_path, http_port=-1, snapshot_keep=2) as d:
        with Client(d.grpc_address) as c:
            _create(c)
            for k in range(4):
                _push(c, range(k, k + 1))
                c.snapshot("m")
        (tmp_path / "m" / ".tmp-snap-0000000099-v9.safetensors").write_bytes(b"torn")
    files = fmt.list_snapshots(tmp_path / "m")
    assert [f.version for f in files] == [3, 4]
    assert len(list((tmp_path / "m").glob("snap-*.safetensors"))) == 2
    with running_daemon(data_dir=tmp_path, http_port=-1) as d:
        assert d.snapshots.restored == {"m": 4}
        assert not list((tmp_path / "m").glob(".tmp-*"))


def test_periodic_every_n_steps_and_every_t_seconds(tmp_path: Path) -> None:
    with (
        running_daemon(data_dir=tmp_path, http_port=-1, snapshot_every_steps=3) as d,
        Client(d.grpc_address) as c,
    ):
        _create(c)
        _push(c, range(7))
        deadline = time.monotonic() + 10
        while [f.version for f in fmt.list_snapshots(tmp_path / "m")] != [3, 6]:
            assert time.monotonic() < deadline
            time.sleep(0.02)
    # The graceful stop adds the final state.
    assert [f.version for f in fmt.list_snapshots(tmp_path / "m")] == [3, 6, 7]
    timed = tmp_path / "timed"
    with (
        running_daemon(data_dir=timed, http_port=-1, snapshot_every_s=0.2) as d,
        Client(d.grpc_address) as c,
    ):
        _create(c)
        _push(c, range(2))
        deadline = time.monotonic() + 10
        while not fmt.list_snapshots(timed / "m") or _newest(timed).version != 2:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        n = len(fmt.list_snapshots(timed / "m"))
        time.sleep(0.8)  # nothing changed: no new snapshot
        assert len(fmt.list_snapshots(timed / "m")) == n


def test_durable_push_is_on_disk_when_acknowledged(tmp_path: Path) -> None:
    with (
        running_daemon(data_dir=tmp_path, http_port=-1, durable=True) as d,
        Client(d.grpc_address) as c,
    ):
        _create(c)
        # Creation is durable too.
        assert fmt.load(_newest(tmp_path)).manifest["version"] == 0
        for k in range(4):
            r = c.push_grad("m", _grads(k, SHAPES), push_id=f"d-{k}")
            loaded = fmt.load(_newest(tmp_path))
            assert loaded.manifest["version"] == r.version == k + 1
            assert f"d-{k}" in fmt.push_results(loaded.manifest)


def _edit(c: Client) -> None:
    """Changes that are not steps: a hyperparameter, a new param group, loaded state."""
    c.set_hyperparams("m", group=1, lr=0.777)
    c.add_param_group("m", {"extra": torch.ones(3)}, lr=0.5)
    state = c.get_state("m")["state"]
    state["w"]["exp_avg"] = torch.full(SHAPES["w"], 42.0)
    c.load_state("m", state)


def _check_edited(loaded: fmt.Loaded) -> None:
    assert loaded.manifest["groups"][1]["options"]["lr"] == 0.777
    assert loaded.manifest["groups"][2]["params"] == ["extra"]
    assert torch.equal(loaded.tensors["param/extra"], torch.ones(3))
    assert torch.equal(loaded.tensors["state/w/exp_avg"], torch.full(SHAPES["w"], 42.0))


def test_edits_are_durable_and_in_the_final_snapshot(tmp_path: Path) -> None:
    """Edits change what a restart must restore as much as steps do."""
    durable_dir, graceful_dir = tmp_path / "durable", tmp_path / "graceful"
    with (
        running_daemon(data_dir=durable_dir, http_port=-1, durable=True) as d,
        Client(d.grpc_address) as c,
    ):
        _create(c)
        _push(c, range(2))
        _edit(c)  # each call returned only once on disk
        _check_edited(fmt.load(_newest(durable_dir)))
    with (
        running_daemon(data_dir=graceful_dir, http_port=-1, snapshot_every_s=0) as d,
        Client(d.grpc_address) as c,
    ):
        _create(c)
        _push(c, range(2))
        c.snapshot("m")
        _edit(c)  # no step after the edits: only they make the model dirty
    _check_edited(fmt.load(_newest(graceful_dir)))


def test_delete_removes_snapshots(tmp_path: Path) -> None:
    with running_daemon(data_dir=tmp_path, http_port=-1) as d, Client(d.grpc_address) as c:
        _create(c)
        _push(c, range(1))
        c.snapshot("m")
        c.delete_model("m")
        assert not (tmp_path / "m").exists()
    with running_daemon(data_dir=tmp_path, http_port=-1) as d:
        assert d.registry.names() == []


def _local(steps: range, module: torch.nn.Module, opt: torch.optim.Optimizer) -> None:
    shapes = {n: tuple(p.shape) for n, p in module.named_parameters()}
    for k in steps:
        opt.zero_grad()
        for n, p in module.named_parameters():
            p.grad = _grads(k, shapes)[n]
        opt.step()


class Net(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.lin = torch.nn.Linear(8, 4)
        self.out = torch.nn.Linear(4, 2)
        self.register_buffer("running", torch.ones(2))  # not a parameter: import skips it


def _adam(net: Net) -> torch.optim.Adam:
    return torch.optim.Adam(
        [
            {"params": list(net.lin.named_parameters(prefix="lin")), "lr": 0.01},
            {"params": list(net.out.named_parameters(prefix="out")), "amsgrad": True},
        ],
        lr=0.003,
        fused=True,
    )


def _local_checkpoint(tmp_path: Path, steps: int) -> tuple[Net, Path]:
    """A net trained `steps` steps locally and its torch checkpoint {"model", "optimizer"}."""
    net = Net()
    opt = _adam(net)
    _local(range(steps), net, opt)
    ckpt = tmp_path / "local.pt"
    torch.save({"model": net.state_dict(), "optimizer": opt.state_dict()}, ckpt)
    return net, ckpt


def test_export_import_round_trip_equals_local_adam(tmp_path: Path) -> None:
    """Train locally, continue on the server (import), come back (export), finish locally:
    bitwise equal to training locally all along (both sides run fused Adam on CPU)."""
    ref = Net()
    ref_opt = _adam(ref)
    _local(range(9), ref, ref_opt)

    net, ckpt = _local_checkpoint(tmp_path, 3)
    data = tmp_path / "data"
    with running_daemon(data_dir=data, http_port=-1) as d:
        assert cli_main(["snapshot", "import", str(ckpt), "net", "--server", d.grpc_address]) == 0
        with Client(d.grpc_address) as c:
            shapes = {n: tuple(p.shape) for n, p in net.named_parameters()}
            for k in range(3, 6):
                c.push_grad("net", _grads(k, shapes))
        assert cli_main(["snapshot", "save", "net", "--server", d.grpc_address]) == 0
    out = tmp_path / "exported.pt"
    assert cli_main(["snapshot", "export", "net", str(out), "--data-dir", str(data)]) == 0
    assert cli_main(["snapshot", "list", "--data-dir", str(data), "--verify"]) == 0

    back = torch.load(out, weights_only=True)
    net2 = Net()
    opt2 = _adam(net2)
    net2.load_state_dict(back["model"], strict=False)  # parameters only; buffers stay local
    opt2.load_state_dict(back["optimizer"])
    _local(range(6, 9), net2, opt2)
    for (n, a), (_, b) in zip(ref.named_parameters(), net2.named_parameters()):
        assert torch.equal(a, b), n
    ref_sd, sd2 = ref_opt.state_dict(), opt2.state_dict()
    for i, s in ref_sd["state"].items():
        for key, t in s.items():
            assert torch.equal(t, sd2["state"][i][key]), (i, key)
    for g_ref, g2 in zip(ref_sd["param_groups"], sd2["param_groups"]):
        assert g_ref == g2


def test_snapshot_commands_report_errors_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _, ckpt = _local_checkpoint(tmp_path, 2)
    broken = tmp_path / "broken.pt"
    saved = torch.load(ckpt, weights_only=True)
    del saved["optimizer"]["state"][0]["exp_avg"]  # the server refuses incomplete state
    torch.save(saved, broken)
    with running_daemon(data_dir=tmp_path / "data", http_port=-1) as d:
        server = ["--server", d.grpc_address]
        assert cli_main(["snapshot", "save", "nope", *server]) == 1
        assert cli_main(["snapshot", "import", str(ckpt), "net", *server]) == 0
        assert cli_main(["snapshot", "import", str(ckpt), "net", *server]) == 1  # exists
        assert cli_main(["snapshot", "import", str(broken), "net2", *server]) == 1
        assert "net2" not in d.registry.names()  # not left half-imported
        missing = str(tmp_path / "missing.pt")
        assert cli_main(["snapshot", "import", missing, "net3", *server]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert [line.split(":")[0] for line in err] == [
        "adamd snapshot save",
        "adamd snapshot import",
        "adamd snapshot import",
        "adamd snapshot import",
    ], err
    assert "nope" in err[0] and "lacks ['exp_avg']" in err[2] and "missing.pt" in err[3]


def test_import_refuses_pickled_objects(tmp_path: Path) -> None:
    from adamd.server.storage.interop import CheckpointError, load_checkpoint

    evil = tmp_path / "evil.pt"
    torch.save({"model": {}, "optimizer": {"x": Path("/")}}, evil)  # not tensors-only
    with pytest.raises(CheckpointError, match="tensors-only"):
        load_checkpoint(evil)


def test_complex_params_and_state_survive_a_restart_bitwise(tmp_path: Path) -> None:
    """safetensors has no complex128: complex tensors are stored as real views and come back."""
    params = {
        "c64": torch.randn(3, 2, dtype=torch.complex64),
        "c128": torch.randn(4, dtype=torch.complex128),
        "r": torch.randn(2),
    }
    with running_daemon(data_dir=tmp_path, http_port=-1) as d, Client(d.grpc_address) as c:
        c.create_model("cx", params, foreach=False, amsgrad=True)
        for _ in range(3):
            c.push_grad("cx", {n: torch.randn_like(p) for n, p in params.items()})
        before = snapshot(d.registry.get("cx"))
        c.snapshot("cx")
    manifest = json.loads(_newest(tmp_path, "cx").manifest.read_text())
    assert manifest["complex"]["param/c128"] == "complex128"
    with running_daemon(data_dir=tmp_path, http_port=-1) as d, Client(d.grpc_address) as c:
        model = d.registry.get("cx")
        assert_bitwise_equal(snapshot(model), before)
        assert model.params["c128"].dtype == torch.complex128
        c.push_grad("cx", {n: torch.randn_like(p) for n, p in params.items()})
        assert c.describe("cx").version == 4
