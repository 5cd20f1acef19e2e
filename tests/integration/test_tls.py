"""TLS and mutual TLS on both ports, with real certificates made at test time (trustme).

Every refusal here is a real handshake failing: a client that trusts another CA, a client without
a certificate on a server that requires one, plaintext sent to a TLS port (gRPC and HTTP).
"""

from __future__ import annotations

import socket
import ssl
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import torch
import trustme

from adamd.client import Client, RemoteAdam, TLSConfig, Unavailable
from adamd.server import Daemon

from ..conftest import running_daemon


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="module")
def pki(ca: trustme.CA, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """PEM files as an operator (or cert-manager) would hand them over."""
    root = tmp_path_factory.mktemp("pki")
    server = ca.issue_cert("127.0.0.1", "localhost")
    worker = ca.issue_cert("worker@adamd.test")
    other_ca = trustme.CA()
    stranger = other_ca.issue_cert("stranger@adamd.test")
    files = {
        "ca": ca.cert_pem,
        "server_cert": server.cert_chain_pems[0],
        "server_key": server.private_key_pem,
        "worker_cert": worker.cert_chain_pems[0],
        "worker_key": worker.private_key_pem,
        "other_ca": other_ca.cert_pem,
        "stranger_cert": stranger.cert_chain_pems[0],
        "stranger_key": stranger.private_key_pem,
    }
    paths = {}
    for name, blob in files.items():
        blob.write_to_path(str(root / f"{name}.pem"))
        paths[name] = root / f"{name}.pem"
    return paths


@pytest.fixture(scope="module")
def tls_daemon(pki: dict[str, Path]) -> Iterator[Daemon]:
    with running_daemon(tls_cert=pki["server_cert"], tls_key=pki["server_key"]) as d:
        yield d


@pytest.fixture(scope="module")
def mtls_daemon(pki: dict[str, Path]) -> Iterator[Daemon]:
    with running_daemon(
        tls_cert=pki["server_cert"], tls_key=pki["server_key"], tls_client_ca=pki["ca"]
    ) as d:
        yield d


def _roundtrip(client: Client, model: str) -> None:
    client.create_model(model, {"w": torch.zeros(1000)}, lr=0.5)
    reply = client.push_grad(model, {"w": torch.ones(1000)})
    assert reply.version == 1
    w = client.pull_params(model)["w"]
    assert torch.allclose(w, torch.full((1000,), -0.5))


def test_push_and_pull_over_tls(tls_daemon: Daemon, pki: dict[str, Path], model_name: str) -> None:
    with Client(tls_daemon.grpc_address, tls=TLSConfig(ca=pki["ca"]), transport="grpc") as c:
        _roundtrip(c, model_name)
        assert c.tls


def test_remote_adam_over_mutual_tls(
    mtls_daemon: Daemon, pki: dict[str, Path], model_name: str
) -> None:
    w = torch.nn.Parameter(torch.zeros(4))
    tls = TLSConfig(ca=pki["ca"], cert=pki["worker_cert"], key=pki["worker_key"])
    opt = RemoteAdam([w], lr=0.5, server=mtls_daemon.grpc_address, model=model_name, tls=tls)
    try:
        w.grad = torch.ones(4)
        opt.step()
        assert torch.allclose(w.detach(), torch.full((4,), -0.5))
    finally:
        opt.close()


def test_the_same_host_path_is_negotiated_over_mutual_tls(
    mtls_daemon: Daemon, pki: dict[str, Path], model_name: str
) -> None:
    """Attach travels over the authenticated channel; the tensors then move through /dev/shm."""
    assert mtls_daemon.same_host is not None
    tls = TLSConfig(ca=pki["ca"], cert=pki["worker_cert"], key=pki["worker_key"])
    with Client(mtls_daemon.grpc_address, tls=tls) as c:
        _roundtrip(c, model_name)
        if mtls_daemon.same_host.root is not None:  # a host with /dev/shm
            assert mtls_daemon.same_host.session_count(model_name) == 1
    assert mtls_daemon.same_host.session_count(model_name) == 0


def test_a_client_that_trusts_another_ca_is_refused(
    tls_daemon: Daemon, pki: dict[str, Path]
) -> None:
    message = _assert_refused(tls_daemon, TLSConfig(ca=pki["other_ca"]))
    assert "handshake failed" in message.lower()  # what docs/troubleshooting.md quotes
    _assert_refused(tls_daemon, True)  # the system store does not know a private CA either


def test_mutual_tls_refuses_clients_without_a_certificate_from_its_ca(
    mtls_daemon: Daemon, pki: dict[str, Path]
) -> None:
    refused = [
        TLSConfig(ca=pki["ca"]),  # no client certificate
        TLSConfig(ca=pki["ca"], cert=pki["stranger_cert"], key=pki["stranger_key"]),
    ]
    for tls in refused:
        _assert_refused(mtls_daemon, tls)
    ok = TLSConfig(ca=pki["ca"], cert=pki["worker_cert"], key=pki["worker_key"])
    with Client(mtls_daemon.grpc_address, tls=ok) as c:
        assert isinstance(c.list_models(), list)


@pytest.mark.parametrize("which", ["tls_daemon", "mtls_daemon"])
def test_plaintext_grpc_to_a_tls_port_is_refused(
    which: str, request: pytest.FixtureRequest
) -> None:
    _assert_refused(request.getfixturevalue(which), None)


def test_https_serves_healthz_and_plain_http_is_refused(
    tls_daemon: Daemon, pki: dict[str, Path]
) -> None:
    url = tls_daemon.http_url
    assert url is not None and url.startswith("https://")
    assert httpx.get(url + "/healthz", verify=_trusting(pki["ca"])).status_code == 200
    with pytest.raises(httpx.ConnectError):  # certificate verify failed
        httpx.get(url + "/healthz", verify=_trusting(pki["other_ca"]))
    _assert_plain_http_refused(tls_daemon)


def test_https_with_client_certificates(mtls_daemon: Daemon, pki: dict[str, Path]) -> None:
    url = mtls_daemon.http_url
    assert url is not None
    context = _trusting(pki["ca"])
    context.load_cert_chain(pki["worker_cert"], pki["worker_key"])
    assert httpx.get(url + "/healthz", verify=context).status_code == 200
    with pytest.raises((httpx.ConnectError, httpx.ReadError, httpx.RemoteProtocolError)):
        httpx.get(url + "/healthz", verify=_trusting(pki["ca"]))  # no client certificate
    _assert_plain_http_refused(mtls_daemon)


def _assert_refused(daemon: Daemon, tls: bool | TLSConfig | None) -> str:
    """The handshake fails: the client retries (UNAVAILABLE) until retry_timeout, then raises."""
    with (
        Client(daemon.grpc_address, tls=tls, retry_timeout=0.5) as c,
        pytest.raises(Unavailable) as e,
    ):
        c.list_models()
    return str(e.value)


def _trusting(ca: Path) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(ca))


def _assert_plain_http_refused(daemon: Daemon) -> None:
    """A plaintext request gets no HTTP answer: the TLS server drops what is not a handshake."""
    with socket.create_connection(("127.0.0.1", daemon.http_port or 0), timeout=10) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        reply = b""
        try:
            while chunk := sock.recv(4096):
                reply += chunk
        except ConnectionResetError:
            pass
    assert not reply.startswith(b"HTTP/"), reply[:200]
    assert b"200" not in reply
