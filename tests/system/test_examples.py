"""Every script in examples/ run as a user runs it (its own processes, the command in its
docstring) at a small size, against the session's server or the `adamd serve` it starts itself,
with what it prints checked against the server's own account. The resume and Lightning tests are
marked slow (two server starts, or Lightning's imports: 15-45 s each on a busy two-core machine);
`make test` runs them too."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from adamd.client import Client
from adamd.server import Daemon

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"
TORCHRUN = Path(sys.executable).with_name("torchrun")
TIMEOUT_S = 240  # generous: two busy cores, each process importing torch


def run(cmd: list[str], cwd: Path) -> str:
    """Run to completion; its stdout and stderr together, after checking it exited 0 cleanly."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    env.pop("RANK", None)
    env.pop("WORLD_SIZE", None)
    proc = subprocess.run(
        cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=TIMEOUT_S, check=False
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert "Traceback" not in out, out
    return out


def example(name: str, *args: str, cwd: Path) -> str:
    return run([sys.executable, str(EXAMPLES / name), *args], cwd)


def find(pattern: str, out: str) -> tuple[str, ...]:
    m = re.search(pattern, out)
    assert m, f"no {pattern!r} in:\n{out}"
    return m.groups()


def test_every_example_says_what_it_shows_and_how_to_run_it() -> None:
    import ast

    scripts = sorted(p for p in EXAMPLES.glob("*.py") if not p.name.startswith("_"))
    assert {p.name for p in scripts} >= {
        "char_lm.py",
        "amp.py",
        "actor_learner.py",
        "resume.py",
        "lightning_remote_adam.py",
    }
    readme = (ROOT / "README.md").read_text()
    for script in scripts:
        doc = ast.get_docstring(ast.parse(script.read_text()))
        assert doc and "Shows:" in doc and "Run it" in doc, script.name
        assert f"examples/{script.name}" in doc, script.name  # the command names the script
        assert f"(examples/{script.name})" in readme, f"README links no {script.name}"


LM_SIZE = ["--steps", "8", "--dim", "32", "--layers", "1", "--heads", "2", "--context", "32"]
LM_SIZE += ["--batch", "8", "--log-every", "4", "--sample", "20"]


def test_char_lm_under_torchrun_sync_starts_its_own_server(tmp_path: Path) -> None:
    cmd = [str(TORCHRUN), "--standalone", "--nproc-per-node", "2"]
    out = run([*cmd, str(EXAMPLES / "char_lm.py"), *LM_SIZE], tmp_path)
    assert "2 worker(s), sync mode" in out, out
    find(r"dashboard: http://127\.0\.0\.1:\d+/#char-lm-sync", out)
    before, after = map(float, find(r"held-out loss (\d+\.\d+) -> (\d+\.\d+)", out))
    assert after < before - 0.3, out
    assert find(r"final version (\d+)", out) == ("8",), out  # one step per round of both
    assert find(r"step 8/8  loss \d+\.\d+  v(\d+)", out) == ("8",), out


def test_char_lm_async_on_a_given_server_names_its_parameters(
    tmp_path: Path, daemon: Daemon, model_name: str
) -> None:
    cmd = [str(TORCHRUN), "--standalone", "--nproc-per-node", "2", str(EXAMPLES / "char_lm.py")]
    out = run(
        [*cmd, "--mode", "async", "--server", daemon.grpc_address, "--model", model_name, *LM_SIZE],
        tmp_path,
    )
    assert "2 worker(s), async mode" in out, out
    assert find(r"final version (\d+)", out) == ("16",), out  # every push of either worker
    before, after = map(float, find(r"held-out loss (\d+\.\d+) -> (\d+\.\d+)", out))
    assert after < before - 0.3, out
    model = daemon.registry.get(model_name)
    assert model.mode == "async" and model.version == 16
    assert "blocks.0.qkv.weight" in model.params and "head.bias" in model.params


def test_amp_skips_overflowing_steps_on_the_server_and_trains(
    tmp_path: Path, daemon: Daemon, model_name: str
) -> None:
    steps = 24
    out = example(
        "amp.py",
        "--server",
        daemon.grpc_address,
        "--model",
        model_name,
        "--steps",
        str(steps),
        "--log-every",
        "8",
        cwd=tmp_path,
    )
    applied, skipped, version = map(
        int, find(r"(\d+) steps applied, (\d+) skipped for overflow; server version (\d+)", out)
    )
    assert skipped >= 1 and applied + skipped == steps, out  # the 2**24 start overflows float16
    model = daemon.registry.get(model_name)
    assert version == applied == model.version and model.skipped_steps == skipped
    assert len(re.findall(r"skipped on the server \(version stays \d+\)", out)) == skipped, out
    first, last = map(float, find(r"loss (\d+\.\d+) -> (\d+\.\d+)", out))
    assert last < first, out


def test_actor_learner_keeps_staleness_bounded_and_the_evaluator_sees_the_policy_improve(
    tmp_path: Path, daemon: Daemon, model_name: str
) -> None:
    actors, pushes, bound = 2, 20, 1
    out = example(
        "actor_learner.py",
        "--server",
        daemon.grpc_address,
        "--model",
        model_name,
        "--actors",
        str(actors),
        "--pushes",
        str(pushes),
        "--max-staleness",
        str(bound),
        "--eval-interval",
        "0.2",
        cwd=tmp_path,
    )
    applied, stale, worst, version = map(
        int,
        find(
            r"(\d+) pushes applied, (\d+) refused as stale; the oldest applied gradient was (\d+) versions behind \(bound \d+\); server version (\d+)",
            out,
        ),
    )
    assert applied + stale == actors * pushes, out
    assert worst <= bound, out
    assert version == applied == daemon.registry.get(model_name).version, out
    evaluations, not_modified = map(
        int, find(r"evaluator: (\d+) evaluations, (\d+) pulls answered not-modified", out)
    )
    assert evaluations >= 2 and not_modified >= 1, out  # idle while the actors start up
    first, last = map(float, find(r"greedy reward (\d+\.\d+) -> (\d+\.\d+)", out))
    assert first < 0.4 and last > first + 0.15, out


@pytest.mark.slow
def test_resume_continues_from_the_servers_snapshot(tmp_path: Path) -> None:
    steps = 10
    # One worker (the example's default is two): four process starts are enough for this test.
    out = example(
        "resume.py", "--workers", "1", "--steps", str(steps), "--data-dir", str(tmp_path / "d"),
        cwd=tmp_path,
    )  # fmt: skip
    runs = re.findall(r"version (\d+) -> (\d+), loss (\d+\.\d+) -> (\d+\.\d+)", out)
    assert [(int(a), int(b)) for a, b, _, _ in runs] == [(0, steps), (steps, 2 * steps)], out
    (_, _, head1, tail1), (_, _, head2, _) = runs
    # Run 2 picks up where run 1 ended (seeded sync training: the same numbers every time),
    # not at the initial loss.
    assert float(head2) < float(tail1) < float(head1), out
    snaps = sorted(p.name for p in (tmp_path / "d" / "resume-demo").glob("*.safetensors"))
    assert [s.split("-v")[1] for s in snaps] == [f"{steps}.safetensors", f"{2 * steps}.safetensors"]


@pytest.mark.slow
def test_lightning_checkpoints_hold_torch_adam_state_and_resume_exactly(
    tmp_path: Path, daemon: Daemon, model_name: str
) -> None:
    """Run A trains 3 epochs, checkpointing each; run B resumes A's epoch-1 checkpoint into a new
    model on the server and trains to epoch 3: B ends bitwise where A did."""
    script, server = "lightning_remote_adam.py", daemon.grpc_address
    a, b = model_name + "-a", model_name + "-b"
    base = ["--server", server, "--epochs", "3", "--batch", "64"]
    out_a = example(script, *base, "--model", a, "--ckpt-dir", "ckpt", cwd=tmp_path)
    assert "1 process(es): epochs 3, global step 24" in out_a, out_a  # 512 / 64 per epoch

    # The checkpoint's optimizer state is torch.optim.Adam's: a local Adam loads it.
    ckpt = torch.load(tmp_path / "ckpt" / "epoch=0-step=8.ckpt", weights_only=False)
    saved = ckpt["optimizer_states"][0]
    assert sorted(saved["state"]) == [0, 1, 2, 3]
    assert all(float(s["step"]) == 8 for s in saved["state"].values())
    assert saved["param_groups"][0]["params"] == [0, 1, 2, 3]
    local = torch.optim.Adam(
        [torch.nn.Parameter(s["exp_avg"].clone()) for s in saved["state"].values()]
    )
    local.load_state_dict(saved)
    assert ckpt["lr_schedulers"][0]["last_epoch"] == 1

    out_b = example(
        script,
        *base,
        "--model",
        b,
        "--ckpt-dir",
        "ckpt-b",
        "--resume",
        str(tmp_path / "ckpt" / "epoch=0-step=8.ckpt"),
        cwd=tmp_path,
    )
    assert "Restored all states from the checkpoint" in out_b, out_b
    assert "1 process(es): epochs 3, global step 24" in out_b, out_b
    with Client(server) as c:
        pa, pb = c.pull_params(a), c.pull_params(b)
        sa, sb = c.get_state(a)["state"], c.get_state(b)["state"]
    assert list(pa) == ["net.0.weight", "net.0.bias", "net.2.weight", "net.2.bias"]
    for name in pa:
        assert torch.equal(pa[name], pb[name]), name
        for key in ("step", "exp_avg", "exp_avg_sq"):
            assert torch.equal(sa[name][key], sb[name][key]), (name, key)
    assert daemon.registry.get(b).version == 16  # B stepped epochs 1 and 2 only


@pytest.mark.slow
def test_lightning_ddp_two_processes_step_once_per_round(
    tmp_path: Path, daemon: Daemon, model_name: str
) -> None:
    out = example(
        "lightning_remote_adam.py",
        "--server",
        daemon.grpc_address,
        "--model",
        model_name,
        "--devices",
        "2",
        "--epochs",
        "1",
        "--batch",
        "64",
        "--ckpt-dir",
        "ckpt",
        cwd=tmp_path,
    )
    assert "distributed_backend=gloo" in out, out
    assert "2 process(es): epochs 1, global step 4" in out, out  # 512 / (64 * 2 ranks)
    model = daemon.registry.get(model_name)
    assert (model.world_size, model.version) == (2, 4)  # one step per round of both ranks
    assert sorted(model.last_heard) == [0, 1]
