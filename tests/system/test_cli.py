"""`adamd serve` as a user runs it: a real process, its log line, /healthz, tokens, clean stops."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
import torch

from adamd.client import Client, Unauthenticated
from adamd.server.auth import token_sha256

from ..processes import ADAMD, serve, stop


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_serve_logs_addresses_answers_health_and_stops_cleanly(tmp_path: Path, sig: int) -> None:
    with serve(tmp=tmp_path) as (proc, grpc_address, http_url, lines):
        assert httpx.get(f"{http_url}/healthz").status_code == 200
        with Client(grpc_address) as c:
            c.create_model("m", {"w": torch.zeros(3)})
            assert c.push_grad("m", {"w": torch.ones(3)}).version == 1
        assert stop(proc, sig, lines) == 0
    assert "adamd stopped" in "".join(lines)


def test_token_file(tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("abc123\n")
    with serve("--token-file", str(token), tmp=tmp_path) as (proc, grpc_address, http_url, lines):
        with Client(grpc_address) as c, pytest.raises(Unauthenticated):
            c.list_models()
        with Client(grpc_address, token="abc123") as c:
            assert c.list_models() == []
        assert httpx.get(f"{http_url}/healthz").status_code == 200
        assert stop(proc, signal.SIGTERM, lines) == 0


def _refused(*args: str, env: dict[str, str] | None = None) -> str:
    """Run `adamd serve` expecting it to refuse to start: exit 2 and one line saying why."""
    done = subprocess.run(
        [*ADAMD, "serve", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **(env or {})},
    )
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    return done.stderr.strip().splitlines()[-1]


@pytest.fixture
def refused_here(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> Callable[..., str]:
    """`adamd serve` refusing a configuration, run in this process (the checks happen before
    anything starts; `_refused` shows the same in a real process): exit 2 and one line."""
    from adamd.server.cli.main import main

    def refused(*args: str, **env: str) -> str:
        capsys.readouterr()
        with monkeypatch.context() as scoped:
            for name, value in env.items():
                scoped.setenv(name, value)
            assert main(["serve", *args]) == 2
        err = capsys.readouterr().err
        assert "Traceback" not in err, err
        return err.strip().splitlines()[-1]

    return refused


def test_a_configuration_that_cannot_work_is_refused_in_one_line(
    tmp_path: Path, refused_here: Callable[..., str]
) -> None:
    data = ["--data-dir", str(tmp_path / "data")]
    free = ["--grpc-port", "0", "--http-port", "0", *data]
    refused = refused_here
    assert "snapshot_keep must be at least 1" in refused("--snapshot-keep", "0", *free)
    assert "round_timeout_s must be positive" in refused("--round-timeout", "-1", *free)
    assert "ADAMD_MAX_STALENESS='x'" in refused(*free, ADAMD_MAX_STALENESS="x")
    missing = str(tmp_path / "no-such-token")
    assert f"cannot read token file {missing}" in refused("--token-file", missing, *free)
    if not torch.cuda.is_available():
        assert "CUDA is not available" in refused("--device", "cuda", *free)
    assert not (tmp_path / "data").exists() or not list((tmp_path / "data").iterdir())


def test_the_log_names_the_address_the_http_side_is_bound_to(tmp_path: Path) -> None:
    """--host 0.0.0.0 (the image's entrypoint) binds every interface, and the log says so rather
    than naming 127.0.0.1."""
    token = tmp_path / "token"
    token.write_text("s3cret\n")
    args = ("--host", "0.0.0.0", "--token-file", str(token))
    with serve(*args, tmp=tmp_path) as (proc, grpc_address, http_url, lines):
        port = int(http_url.rsplit(":", 1)[1])
        assert http_url == f"http://0.0.0.0:{port}", lines[-1]
        assert grpc_address.startswith("0.0.0.0:")
        for loopback in ("127.0.0.1", "127.0.0.2"):  # it answers on any local address
            assert httpx.get(f"http://{loopback}:{port}/healthz").status_code == 200
        assert stop(proc, signal.SIGTERM, lines) == 0


def test_a_server_that_cannot_start_says_why_in_one_line(tmp_path: Path) -> None:
    data = ["--data-dir", str(tmp_path / "data")]
    assert "grpc_port must be a port" in _refused("--grpc-port", "70000", *data)
    with serve(tmp=tmp_path) as (proc, grpc_address, http_url, lines):
        grpc_port, http_port = grpc_address.rsplit(":", 1)[1], http_url.rsplit(":", 1)[1]
        other = ["--data-dir", str(tmp_path / "other")]
        line = _refused("--grpc-port", grpc_port, "--http-port", "0", *other)
        assert f"cannot serve gRPC on 127.0.0.1:{grpc_port}" in line
        line = _refused("--grpc-port", "0", "--http-port", http_port, *other)
        assert f"cannot serve HTTP on 127.0.0.1:{http_port}" in line
        # Two servers on one data dir would delete and overwrite each other's snapshots.
        line = _refused("--grpc-port", "0", "--http-port", "0", *data)
        assert "is in use by another adamd server" in line and f"pid {proc.pid}" in line
        assert stop(proc, signal.SIGTERM, lines) == 0
    assert not list((tmp_path / "other").glob("*/snap-*"))  # the refused ones wrote nothing


def test_non_loopback_without_token_warns_loudly(tmp_path: Path) -> None:
    with serve("--host", "0.0.0.0", tmp=tmp_path) as (proc, _grpc, _http, lines):
        assert stop(proc, signal.SIGTERM, lines) == 0
    assert "without a token" in "".join(lines)


def test_non_loopback_with_a_token_but_no_tls_warns_of_clear_text(tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("abc123\n")
    with serve("--host", "0.0.0.0", "--token-file", str(token), tmp=tmp_path) as (proc, *_, lines):
        assert stop(proc, signal.SIGTERM, lines) == 0
    log = "".join(lines)
    assert "without TLS" in log and "clear text" in log
    assert "without a token" not in log


def test_tls_files_that_cannot_work_are_refused_at_start(
    tmp_path: Path, refused_here: Callable[..., str]
) -> None:
    free = ["--grpc-port", "0", "--http-port", "0", "--data-dir", str(tmp_path / "data")]
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate\n")

    refused = refused_here

    assert "tls_cert and tls_key go together" in refused("--tls-cert", str(junk), *free)
    assert "tls_client_ca needs tls_cert" in refused("--tls-client-ca", str(junk), *free)
    missing = str(tmp_path / "missing.pem")
    line = refused("--tls-cert", missing, "--tls-key", str(junk), *free)
    assert f"cannot read {missing}" in line
    line = refused("--tls-cert", str(junk), "--tls-key", str(junk), *free)
    assert "do not load" in line
    # ... and from the environment, in a real process (exit 2, one line, no traceback)
    line = _refused(*free, env={"ADAMD_TLS_CERT": str(junk), "ADAMD_TLS_KEY": str(junk)})
    assert "do not load" in line


def test_help_documents_the_contract(capsys: pytest.CaptureFixture[str]) -> None:
    from adamd.server.cli.main import main

    def help_of(*args: str) -> str:
        with pytest.raises(SystemExit) as stopped:
            main([*args, "--help"])
        assert stopped.value.code == 0
        return capsys.readouterr().out

    out = help_of("serve")
    for flag in ("--host", "--grpc-port", "--http-port", "--data-dir", "--device", "--token-file"):
        assert flag in out
    for flag in ("--tls-cert", "--tls-key", "--tls-client-ca"):
        assert flag in out
    top = help_of()
    assert "serve" in top and "demo" in top


def test_flags_reach_the_config(monkeypatch: pytest.MonkeyPatch) -> None:
    from adamd.server.cli.main import build_parser, config_from_args

    for key in [k for k in os.environ if k.startswith("ADAMD_")]:
        monkeypatch.delenv(key)
    parser = build_parser()
    defaults = config_from_args(parser.parse_args(["serve"]))
    assert (defaults.shm, defaults.stats_every, defaults.snapshot_every_s) == (True, 0, 60.0)
    args = ["serve", "--no-shm", "--stats-every", "5", "--snapshot-every-s", "0", "--durable"]
    config = config_from_args(parser.parse_args(args))
    assert (config.shm, config.stats_every, config.snapshot_every_s) == (False, 5, 0.0)
    assert config.durable
    monkeypatch.setenv("ADAMD_STATS_EVERY", "7")
    assert config_from_args(parser.parse_args(["serve"])).stats_every == 7


def test_daemon_docs_show_every_serve_flag() -> None:
    from adamd.server.cli.main import build_parser

    readme = (Path(__file__).resolve().parents[2] / "docs" / "daemon.md").read_text()
    serve = build_parser()._subparsers._group_actions[0].choices["serve"]  # type: ignore[union-attr]
    flags = [s for a in serve._actions for s in a.option_strings if s.startswith("--")]
    assert len(flags) > 10
    assert [f for f in flags if f not in readme] == []


def test_version_prints_the_installed_version() -> None:
    from importlib.metadata import version

    out = subprocess.run(
        [sys.executable, "-m", "adamd.server.cli", "--version"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    assert out.strip() == f"adamd {version('adamd')}"


def _admin_of_everything(name: str, token: str) -> str:
    """An --auth-file with one principal, admin over every model."""
    return (
        f'[[principal]]\nname = "{name}"\ntoken_sha256 = "{token_sha256(token)}"\n'
        'grants = { "*" = "admin" }\n'
    )


def test_sighup_reloads_the_file_and_reopens_the_audit_log(tmp_path: Path) -> None:
    """The real process: SIGHUP swaps the grants and reopens the audit log (logrotate's move)."""
    auth, audit = tmp_path / "auth.toml", tmp_path / "audit.log"
    auth.write_text(_admin_of_everything("ops", "tok-one"))
    args = ("--auth-file", str(auth), "--audit-log", str(audit), "--bulk-port", "-1")
    with serve(*args, tmp=tmp_path) as (proc, grpc_address, _, lines):
        with Client(grpc_address, token="tok-one", transport="grpc") as c:
            c.create_model("m1", {"w": torch.zeros(2)})
        audit.rename(tmp_path / "audit.log.1")
        auth.write_text(_admin_of_everything("ops2", "tok-two"))
        proc.send_signal(signal.SIGHUP)
        assert proc.stderr is not None
        while "reloaded" not in (line := proc.stderr.readline()):
            assert line, "".join(lines)
        revoked = Client(grpc_address, token="tok-one", transport="grpc", retry_timeout=1)
        with revoked, pytest.raises(Unauthenticated):
            revoked.delete_model("m1")
        with Client(grpc_address, token="tok-two", transport="grpc") as c:
            c.delete_model("m1")
        auth.write_text("[[principal]]\nname = 'x'\ncert = 'c'\ngrants = 3\n")
        proc.send_signal(signal.SIGHUP)
        while "previous grants stay" not in (line := proc.stderr.readline()):
            assert line
        assert "line 4" in line and "grants is a table" in line
        with Client(grpc_address, token="tok-two", transport="grpc") as c:
            c.create_model("m2", {"w": torch.zeros(2)})
    old = [json.loads(x)["operation"] for x in (tmp_path / "audit.log.1").read_text().splitlines()]
    new = [json.loads(x) for x in audit.read_text().splitlines()]
    assert old == ["create"]
    assert [(e["principal"], e["operation"], e["outcome"]) for e in new] == [
        ("(SIGHUP)", "reload_auth", "OK"),
        ("(unauthenticated)", "delete", "Unauthenticated"),
        ("ops2", "delete", "OK"),
        ("(SIGHUP)", "reload_auth", "Refused"),
        ("ops2", "create", "OK"),
    ]
