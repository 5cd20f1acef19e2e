"""Access control (server/auth, docs/security.md): principal x operation x model over gRPC, the
bulk-data channel and HTTP, each cell allowed or refused as granted and every refusal leaving the
model bitwise unchanged; listings that show only readable models; client certificates as
principals; reload and revoke under load; the audit log. (SIGHUP to the real process:
tests/system/test_cli.py.)

One daemon serves the matrix (module scope): principals read, train and admin over `team-a-*`,
admin over `team-b-*`, and an unknown token. Each cell is one call against a real server.
"""

from __future__ import annotations

import io
import json
import secrets
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
import torch
import trustme

from adamd.client import (
    Client,
    NotFound,
    PermissionDenied,
    TLSConfig,
    Unauthenticated,
)
from adamd.protocol.bulk import DATA, END, FAIL, HELO, PULL, PUSH, STEP, FrameSocket
from adamd.server import Daemon
from adamd.server.auth import AuthFileError, parse_policy, token_sha256
from adamd.server.cli.main import main as cli_main
from adamd.v1 import adamd_pb2 as pb

from ..conftest import assert_bitwise_equal, running_daemon, snapshot

RANK = {"read": 1, "train": 2, "admin": 3}
# principal -> (its token, the team it has a grant on, the role); "stranger" is unknown.
PRINCIPALS = {
    "a-reader": ("tok-a-reader", "team-a", "read"),
    "a-trainer": ("tok-a-trainer", "team-a", "train"),
    "a-admin": ("tok-a-admin", "team-a", "admin"),
    "b-admin": ("tok-b-admin", "team-b", "admin"),
    "stranger": ("tok-nobody-knows", None, None),
}
TEAMS = ("team-a", "team-b")


def auth_toml(principals: Mapping[str, tuple[str, str | None, str | None]], extra: str = "") -> str:
    out = []
    for name, (token, team, role) in principals.items():
        if team is None:
            continue
        metrics = "true" if role == "admin" and team == "team-a" else "false"
        out.append(
            f'[[principal]]\nname = "{name}"\ntoken_sha256 = "{token_sha256(token)}"\n'
            f'grants = {{ "{team}-*" = "{role}" }}\nmetrics = {metrics}\n'
        )
    return "\n".join(out) + extra


def expected(principal: str, team: str, need: str, creates: bool = False) -> str:
    """What the cell should answer: OK, or the error kind."""
    _, granted_team, role = PRINCIPALS[principal]
    if role is None:
        return "Unauthenticated"
    if granted_team != team:
        return "PermissionDenied" if creates else "NotFound"
    return "OK" if RANK[role] >= RANK[need] else "PermissionDenied"


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("access")
    (root / "auth.toml").write_text(auth_toml(PRINCIPALS))
    return {"auth": root / "auth.toml", "audit": root / "audit.log"}


@pytest.fixture(scope="module")
def daemon(files: dict[str, Path]) -> Iterator[Daemon]:
    with running_daemon(auth_file=files["auth"], audit_log=files["audit"], shm=False) as d:
        for team in TEAMS:
            with Client(d.grpc_address, token=f"tok-{team[-1]}-admin") as admin:
                admin.create_model(f"{team}-m", {"w": torch.zeros(8)}, lr=0.1)
                admin.push_grad(f"{team}-m", {"w": torch.ones(8)})  # Adam state to compare
                admin.create_model(f"{team}-elastic", {"w": torch.zeros(8)}, world_size="elastic")
        yield d


@pytest.fixture(scope="module")
def clients(daemon: Daemon) -> Iterator[dict[str, Client]]:
    made = {
        name: Client(daemon.grpc_address, token=token, transport="grpc", retry_timeout=2)
        for name, (token, _, _) in PRINCIPALS.items()
    }
    yield made
    for c in made.values():
        c.close()


def _owner(daemon: Daemon, team: str) -> Client:
    return Client(daemon.grpc_address, token=f"tok-{team[-1]}-admin", transport="grpc")


def _victim(daemon: Daemon, team: str) -> str:
    name = f"{team}-victim-{secrets.token_hex(4)}"
    with _owner(daemon, team) as owner:
        owner.create_model(name, {"w": torch.zeros(4)}, lr=0.1)
    return name


def _load_state(c: Client, m: str, d: Daemon, team: str) -> None:
    with _owner(d, team) as owner:
        state = owner.get_state(m)
    c.load_state(m, state["state"], state["param_groups"])


def _join(c: Client, m: str) -> None:
    c.leave(m, c.join(m))


# operation -> (role it needs, the model it acts on ("m", "elastic", "victim", "new"), the call)
GRPC_OPS: dict[str, tuple[str, str, Callable[[Client, str, Daemon, str], Any]]] = {
    "describe": ("read", "m", lambda c, m, d, t: c.describe(m)),
    "pull": ("read", "m", lambda c, m, d, t: c.pull_params(m)),
    "get_state": ("read", "m", lambda c, m, d, t: c.get_state(m)),
    "push": ("train", "m", lambda c, m, d, t: c.push_grad(m, {"w": torch.ones(8)})),
    "set_hyperparams": ("train", "m", lambda c, m, d, t: c.set_hyperparams(m, 0, lr=0.1)),
    "join_leave": ("train", "elastic", lambda c, m, d, t: _join(c, m)),
    "load_state": ("admin", "m", _load_state),
    "add_param_group": (
        "admin",
        "m",
        lambda c, m, d, t: c.add_param_group(m, {f"x{secrets.token_hex(3)}": torch.zeros(2)}),
    ),
    "snapshot": ("admin", "m", lambda c, m, d, t: c.snapshot(m)),
    "delete": ("admin", "victim", lambda c, m, d, t: c.delete_model(m)),
    "create": ("admin", "new", lambda c, m, d, t: c.create_model(m, {"w": torch.zeros(4)})),
}
KINDS = {
    "NotFound": NotFound,
    "PermissionDenied": PermissionDenied,
    "Unauthenticated": Unauthenticated,
}


def _target(daemon: Daemon, team: str, which: str) -> str:
    if which == "victim":
        return _victim(daemon, team)
    if which == "new":
        return f"{team}-new-{secrets.token_hex(4)}"
    return f"{team}-{which}"


def _state_of(daemon: Daemon, name: str) -> dict[str, torch.Tensor] | None:
    try:
        return snapshot(daemon.registry.get(name))
    except Exception:
        return None


@pytest.mark.parametrize("team", TEAMS)
@pytest.mark.parametrize("op", list(GRPC_OPS))
@pytest.mark.parametrize("principal", list(PRINCIPALS))
def test_grpc_matrix(
    daemon: Daemon, clients: dict[str, Client], principal: str, op: str, team: str
) -> None:
    need, which, call = GRPC_OPS[op]
    model = _target(daemon, team, which)
    want = expected(principal, team, need, creates=which == "new")
    before = _state_of(daemon, model)
    if want == "OK":
        call(clients[principal], model, daemon, team)
        if op == "create":
            assert model in daemon.registry.names()
        return
    with pytest.raises(KINDS[want]) as refused:
        call(clients[principal], model, daemon, team)
    if want == "PermissionDenied":
        assert f"needs the {need} role" in str(refused.value)
    if want == "NotFound":
        assert str(refused.value) == f"no model named {model!r}"  # as for a missing model
    after = _state_of(daemon, model)
    if before is None:
        assert after is None
    else:
        assert after is not None
        assert_bitwise_equal(after, before)


def test_listings_show_only_readable_models(daemon: Daemon, clients: dict[str, Client]) -> None:
    for principal, (token, team, _) in PRINCIPALS.items():
        if team is None:
            with pytest.raises(Unauthenticated):
                clients[principal].list_models()
            continue
        names = {m.name for m in clients[principal].list_models()}
        assert names and all(n.startswith(f"{team}-") for n in names), (principal, names)
        listed = httpx.get(
            f"{daemon.http_url}/v1/models", headers={"Authorization": f"Bearer {token}"}
        ).json()
        assert {m["name"] for m in listed["models"]} == names


# --- the bulk-data channel ------------------------------------------------------------------


def _open_bulk(daemon: Daemon, token: str) -> bytes:
    """A ticket from a real OpenBulk call with this token (as the client gets one)."""
    with grpc.insecure_channel(daemon.grpc_address) as channel:
        call = channel.unary_unary(
            "/adamd.v1.Optimizer/OpenBulk",
            request_serializer=pb.OpenBulkRequest.SerializeToString,
            response_deserializer=pb.OpenBulkReply.FromString,
        )
        reply = call(pb.OpenBulkRequest(), metadata=(("authorization", f"Bearer {token}"),))
    assert reply.accepted
    return bytes(reply.ticket)


def _bulk_request(conn: FrameSocket, kind: str, model: str) -> Any:
    spec = [pb.TensorSpec(name="w", dtype=pb.FLOAT32, shape=[8])]
    push = pb.PushHeader(model=model, grads=spec, push_id=secrets.token_hex(8))
    if kind == "PULL":
        conn.send(PULL, pb.PullRequest(model=model).SerializeToString())
    else:
        header = push if kind == "PUSH" else pb.BulkStep(push=push, pull=pb.PullRequest())
        conn.send(PUSH if kind == "PUSH" else STEP, header.SerializeToString())
        conn.send(DATA, b"", 0, 0, torch.ones(8).numpy())
        conn.send(END)
    return conn.recv()


@pytest.mark.parametrize("team", TEAMS)
@pytest.mark.parametrize("kind", ["PULL", "PUSH", "STEP"])
@pytest.mark.parametrize("principal", list(PRINCIPALS))
def test_bulk_matrix(daemon: Daemon, principal: str, kind: str, team: str) -> None:
    token, _, _ = PRINCIPALS[principal]
    assert daemon.bulk is not None
    if PRINCIPALS[principal][1] is None:  # no ticket for an unknown token
        with pytest.raises(grpc.RpcError) as refused:
            _open_bulk(daemon, token)
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
        return
    model = f"{team}-m"
    want = expected(principal, team, "read" if kind == "PULL" else "train")
    before = snapshot(daemon.registry.get(model))
    raw = socket.create_connection(("127.0.0.1", daemon.bulk.port), timeout=10)
    with FrameSocket(raw, 10) as conn:
        conn.send(HELO, _open_bulk(daemon, token))
        assert conn.recv().kind == HELO
        reply = _bulk_request(conn, kind, model)
    if want == "OK":
        assert reply.kind != FAIL
        return
    assert reply.kind == FAIL
    error = pb.BulkError.FromString(reply.header)
    assert error.kind == want, error.message
    assert_bitwise_equal(snapshot(daemon.registry.get(model)), before)


def test_client_over_bulk_raises_permission_denied(daemon: Daemon) -> None:
    with Client(daemon.grpc_address, token="tok-a-reader", transport="bulk") as c:
        c.pull_params("team-a-m")
        assert c._bulk is not None and not c._bulk.off_reason  # the channel is in use
        before = snapshot(daemon.registry.get("team-a-m"))
        with pytest.raises(PermissionDenied, match="needs the train role"):
            c.push_grad("team-a-m", {"w": torch.ones(8)})
        with pytest.raises(NotFound):
            c.pull_params("team-b-m")
        assert_bitwise_equal(snapshot(daemon.registry.get("team-a-m")), before)


def test_same_host_attach_is_checked(daemon: Daemon) -> None:
    with grpc.insecure_channel(daemon.grpc_address) as channel:
        attach = channel.unary_unary(
            "/adamd.v1.Optimizer/Attach",
            request_serializer=pb.AttachRequest.SerializeToString,
            response_deserializer=pb.AttachReply.FromString,
        )
        meta = (("authorization", "Bearer tok-a-reader"),)
        attach(pb.AttachRequest(model="team-a-m"), metadata=meta)  # answered (shm is off here)
        with pytest.raises(grpc.RpcError) as refused:
            attach(pb.AttachRequest(model="team-b-m"), metadata=meta)
        assert refused.value.code() == grpc.StatusCode.NOT_FOUND
        with pytest.raises(grpc.RpcError) as refused:
            attach(pb.AttachRequest(model="team-a-m"))
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED


# --- HTTP -----------------------------------------------------------------------------------

HTTP_ROUTES = {
    "describe": ("read", "GET", "/v1/models/{m}", None),
    "params": ("read", "GET", "/v1/models/{m}/params", None),
    "history": ("read", "GET", "/v1/models/{m}/history", None),
    "download": ("read", "GET", "/v1/models/{m}/snapshot", None),
    "hyperparams": ("train", "POST", "/v1/models/{m}/param_groups/0", {"lr": 0.1}),
    "snapshot": ("admin", "POST", "/v1/models/{m}/snapshot", None),
    "delete": ("admin", "DELETE", "/v1/models/{m}", None),
}
STATUS = {"OK": 200, "Unauthenticated": 401, "PermissionDenied": 403, "NotFound": 404}


@pytest.mark.parametrize("team", TEAMS)
@pytest.mark.parametrize("route", list(HTTP_ROUTES))
@pytest.mark.parametrize("principal", list(PRINCIPALS))
def test_http_matrix(daemon: Daemon, principal: str, route: str, team: str) -> None:
    need, method, path, body = HTTP_ROUTES[route]
    model = _victim(daemon, team) if route == "delete" else f"{team}-m"
    want = expected(principal, team, need)
    before = snapshot(daemon.registry.get(model))
    headers = {"Authorization": f"Bearer {PRINCIPALS[principal][0]}"}
    url = f"{daemon.http_url}{path.format(m=model)}"
    r = httpx.request(method, url, headers=headers, json=body)
    assert r.status_code == STATUS[want], r.text
    if want != "OK":
        assert r.json()["error"] == want
        assert_bitwise_equal(snapshot(daemon.registry.get(model)), before)


def test_metrics_need_their_grant(daemon: Daemon) -> None:
    url = f"{daemon.http_url}/metrics"
    assert httpx.get(url).status_code == 401
    assert httpx.get(url, headers={"Authorization": "Bearer tok-a-reader"}).status_code == 403
    ok = httpx.get(url, headers={"Authorization": "Bearer tok-a-admin"})
    assert ok.status_code == 200 and "adamd_" in ok.text
    assert httpx.get(f"{daemon.http_url}/healthz").status_code == 200  # probes stay open


def test_a_team_a_reader_cannot_see_or_touch_team_b(daemon: Daemon) -> None:
    """Done-when of the issue, by every transport: nothing of team-b-* shows or changes."""
    before = snapshot(daemon.registry.get("team-b-m"))
    auth = {"Authorization": "Bearer tok-a-reader"}
    with Client(daemon.grpc_address, token="tok-a-reader") as c:
        assert not [m for m in c.list_models() if m.name.startswith("team-b")]
        for call in (
            lambda: c.describe("team-b-m"),
            lambda: c.pull_params("team-b-m"),
            lambda: c.get_state("team-b-m"),
            lambda: c.push_grad("team-b-m", {"w": torch.ones(8)}),
            lambda: c.delete_model("team-b-m"),
        ):
            with pytest.raises(NotFound):
                call()
    listed = httpx.get(f"{daemon.http_url}/v1/models", headers=auth).json()["models"]
    assert "team-b" not in json.dumps(listed)
    for path in ("", "/params", "/history", "/snapshot"):
        assert (
            httpx.get(f"{daemon.http_url}/v1/models/team-b-m{path}", headers=auth).status_code
            == 404
        )
    assert_bitwise_equal(snapshot(daemon.registry.get("team-b-m")), before)


# --- the audit log --------------------------------------------------------------------------


def test_audit_log_records_changes_not_pushes_and_no_token(
    daemon: Daemon, files: dict[str, Path]
) -> None:
    victim = _victim(daemon, "team-a")
    reader = Client(daemon.grpc_address, token="tok-a-reader", transport="grpc")
    with reader, pytest.raises(PermissionDenied):
        reader.delete_model(victim)
    with Client(daemon.grpc_address, token="tok-a-admin", transport="grpc") as admin:
        admin.push_grad(victim, {"w": torch.ones(4)})
        admin.delete_model(victim)
    lines = [json.loads(line) for line in files["audit"].read_text().splitlines()]
    mine = [(e["principal"], e["operation"], e["outcome"]) for e in lines if e["model"] == victim]
    assert mine == [
        ("a-admin", "create", "OK"),
        ("a-reader", "delete", "PermissionDenied"),
        ("a-admin", "delete", "OK"),
    ]
    for e in lines:
        assert set(e) == {"time", "principal", "model", "operation", "outcome", "action"}
        assert e["time"].endswith("Z")
    assert not [e for e in lines if "push" in e["operation"].lower()]
    text = files["audit"].read_text()
    assert not [tok for tok, _, _ in PRINCIPALS.values() if tok in text]


# --- the auth file --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, line, says",
    [
        ('[[principal]]\nname = "x"\ntoken_sha256 = \n', 3, "does not parse"),
        (auth_toml(PRINCIPALS).replace('"read"', '"reed"'), 4, "unknown role 'reed'"),
        ('[[principal]]\nname = "x"\ntoken = "plain"\n', 3, "store the token's hash"),
        ('[[principal]]\nname = "x"\ncert = "c"\ngrants = { "a/b" = "read" }\n', 4, "pattern"),
        ('[[principal]]\nname = "x"\ncert = "c"\ngrant = {}\n', 4, "unknown key 'grant'"),
    ],
)
def test_an_auth_file_that_cannot_be_used_names_its_line(text: str, line: int, says: str) -> None:
    with pytest.raises(AuthFileError, match=says) as refused:
        parse_policy(text, "f.toml")
    assert f"line {line}" in str(refused.value)


def test_serve_refuses_a_bad_auth_file_and_hash_token_prints_the_hash(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    bad = tmp_path / "auth.toml"
    bad.write_text('[[principal]]\nname = "x"\n')
    argv = ["serve", "--grpc-port", "0", "--http-port", "-1", "--data-dir", str(tmp_path)]
    assert cli_main([*argv, "--auth-file", str(bad)]) == 2
    assert "line 2" in capsys.readouterr().err
    token = tmp_path / "token"
    token.write_text("t0k\n")
    assert cli_main([*argv, "--auth-file", str(bad), "--token-file", str(token)]) == 2
    assert "not both" in capsys.readouterr().err
    monkeypatch.setattr(sys, "stdin", io.StringIO("s3cret\n"))
    assert cli_main(["auth", "hash-token"]) == 0
    assert capsys.readouterr().out.strip() == token_sha256("s3cret")


# --- client certificates as principals ------------------------------------------------------


def test_client_certificate_identities_are_principals(tmp_path: Path) -> None:
    ca = trustme.CA()
    pems = {"ca": ca.cert_pem}
    for name, ident in (("server", "127.0.0.1"), ("reader", "reader.team-a"), ("other", "x.y")):
        issued = ca.issue_cert(ident) if name != "server" else ca.issue_cert(ident, "localhost")
        pems[f"{name}_cert"], pems[f"{name}_key"] = (
            issued.cert_chain_pems[0],
            issued.private_key_pem,
        )
    for name, blob in pems.items():
        blob.write_to_path(str(tmp_path / f"{name}.pem"))
    admin = token_sha256("tok-ops")
    (tmp_path / "auth.toml").write_text(
        f'[[principal]]\nname = "ops"\ntoken_sha256 = "{admin}"\ngrants = {{ "*" = "admin" }}\n'
        '[[principal]]\nname = "reader"\ncert = "reader.team-a"\n'
        'grants = { "team-a-*" = "read" }\n'
    )

    def tls(who: str) -> TLSConfig:
        p = tmp_path
        return TLSConfig(ca=p / "ca.pem", cert=p / f"{who}_cert.pem", key=p / f"{who}_key.pem")

    with running_daemon(
        http_port=-1,
        tls_cert=tmp_path / "server_cert.pem",
        tls_key=tmp_path / "server_key.pem",
        tls_client_ca=tmp_path / "ca.pem",
        auth_file=tmp_path / "auth.toml",
    ) as d:
        with Client(d.grpc_address, token="tok-ops", tls=tls("other")) as ops:
            for m in ("team-a-m", "team-b-m"):
                ops.create_model(m, {"w": torch.zeros(4)}, lr=0.1)
        with Client(d.grpc_address, tls=tls("reader")) as reader:
            assert [m.name for m in reader.list_models()] == ["team-a-m"]
            assert reader.pull_params("team-a-m")["w"].shape == (4,)
            with pytest.raises(PermissionDenied):
                reader.push_grad("team-a-m", {"w": torch.ones(4)})
            with pytest.raises(NotFound):
                reader.pull_params("team-b-m")
        stranger = Client(d.grpc_address, tls=tls("other"), retry_timeout=1)
        with stranger, pytest.raises(Unauthenticated):
            stranger.list_models()


# --- reload and revoke under load -----------------------------------------------------------


def _trainer(
    address: str, token: str, model: str, stop: threading.Event, out: dict[str, Any]
) -> None:
    """Push and pull until told to stop, over the bulk channel; records versions and errors."""
    try:
        with Client(address, token=token, transport="bulk") as c:
            while not stop.is_set():
                c.push_grad(model, {"w": torch.ones(8)})
                out["version"] = c.pull(model).version
    except Exception as exc:
        out["error"] = exc


def test_reload_revokes_without_stopping_the_granted(tmp_path: Path) -> None:
    keep = {"ops": ("tok-ops", "team", "admin"), "a": ("tok-a", "team-a", "train")}
    revoked = {**keep, "b": ("tok-b", "team-b", "train")}
    auth = tmp_path / "auth.toml"
    auth.write_text(auth_toml(revoked).replace('"team-*"', '"*"'))
    with running_daemon(http_port=-1, shm=False, auth_file=auth) as d:
        with Client(d.grpc_address, token="tok-ops") as ops:
            for m in ("team-a-run", "team-b-run"):
                ops.create_model(m, {"w": torch.zeros(8)}, lr=0.01)
        stop, out = threading.Event(), {"version": 0}
        thread = threading.Thread(
            target=_trainer, args=(d.grpc_address, "tok-a", "team-a-run", stop, out)
        )
        thread.start()
        try:
            with Client(d.grpc_address, token="tok-b", transport="bulk") as b:
                b.push_grad("team-b-run", {"w": torch.ones(8)})  # its bulk connection is open
                auth.write_text(auth_toml(keep).replace('"team-*"', '"*"'))
                assert d.reload()
                at_reload = out["version"]
                with pytest.raises(Unauthenticated):  # over the connection opened before
                    b.push_grad("team-b-run", {"w": torch.ones(8)})
                auth.write_text("[[principal]\n")  # does not parse: the grants stay as they are
                assert not d.reload()
                with pytest.raises(Unauthenticated):
                    b.pull_params("team-b-run")
            deadline = time.monotonic() + 30
            while out["version"] < at_reload + 5 and "error" not in out:
                assert time.monotonic() < deadline, out
                time.sleep(0.01)
        finally:
            stop.set()
            thread.join(30)
        assert "error" not in out, out.get("error")
        assert d.registry.get("team-b-run").version == 1


def test_same_host_sessions_are_checked_like_any_push(tmp_path: Path) -> None:
    """A reader attaches (read) and pulls through shared memory, but its session's pushes are
    PushGrad calls like any other: refused without train, the model unchanged."""
    auth = tmp_path / "auth.toml"
    auth.write_text(auth_toml(PRINCIPALS))
    with running_daemon(http_port=-1, bulk_port=-1, auth_file=auth) as d:
        with Client(d.grpc_address, token="tok-a-admin") as admin:
            admin.create_model("team-a-shm", {"w": torch.zeros(8)}, lr=0.1)
            admin.push_grad("team-a-shm", {"w": torch.ones(8)})
        before = snapshot(d.registry.get("team-a-shm"))
        with Client(d.grpc_address, token="tok-a-reader", transport="auto") as reader:
            assert torch.equal(reader.pull_params("team-a-shm")["w"], before["param/w"])
            assert reader._sessions.get("team-a-shm") is not None  # attached: shared memory
            with pytest.raises(PermissionDenied, match="needs the train role"):
                reader.push_grad("team-a-shm", {"w": torch.ones(8)})
        assert_bitwise_equal(snapshot(d.registry.get("team-a-shm")), before)


def test_policy_roles_globs_and_anonymous() -> None:
    policy = parse_policy(
        '[[principal]]\nname = "p"\ntoken_sha256 = "' + token_sha256("t") + '"\n'
        'grants = { "team-a-*" = "read", "team-a-lm?" = "admin", "shared.[xy]" = "train" }\n'
        '[anonymous]\ngrants = { "demo-*" = "read" }\nmetrics = true\n'
    )
    from adamd.server.auth import Caller, Role

    p = policy.identify(Caller.of("Bearer t"))
    assert (p.role_on("team-a-x"), p.role_on("team-a-lm2"), p.role_on("shared.y")) == (
        Role.READ,
        Role.ADMIN,
        Role.TRAIN,
    )
    assert p.role_on("team-b-x") is None and p.role_on("shared.z") is None
    anonymous = policy.identify(Caller.of(None))
    assert anonymous.name == "anonymous" and anonymous.metrics
    policy.permit(anonymous, "GET /v1/models/{model}", "demo-1")
    with pytest.raises(Exception, match="needs the train role"):
        policy.permit(anonymous, "PushGrad", "demo-1")
    for wrong in ("Bearer nope", "Basic dDp0", "t"):
        with pytest.raises(Exception, match="unknown or malformed token"):
            policy.identify(Caller.of(wrong))


def test_auth_check_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    good, bad = tmp_path / "good.toml", tmp_path / "bad.toml"
    good.write_text(auth_toml(PRINCIPALS))
    bad.write_text(auth_toml(PRINCIPALS) + "[[principal]]\nname = 'a-reader'\ncert = 'c'\n")
    assert cli_main(["auth", "check", str(good)]) == 0
    assert "4 principals" in capsys.readouterr().out
    assert cli_main(["auth", "check", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "named twice" in err and f"line {len(auth_toml(PRINCIPALS).splitlines()) + 2}" in err
