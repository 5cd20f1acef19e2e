"""TLS for both ports from one set of PEM files: gRPC credentials and uvicorn's ssl settings.

`--tls-cert` / `--tls-key` turn TLS on for gRPC and HTTP alike; `--tls-client-ca` also requires
every client (worker, browser, Prometheus) to present a certificate signed by that CA (mutual TLS).
The files are read and checked once at start, so a wrong path or a key that does not match its
certificate stops `adamd serve` with one line instead of failing at the first handshake.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from adamd.server.config import LOOPBACK, ServerConfig
from adamd.server.errors import StartupError


@dataclass(frozen=True)
class TLSFiles:
    cert: Path  # the server's certificate chain, PEM
    key: Path  # its private key, PEM (unencrypted)
    client_ca: Path | None  # CA bundle client certificates must chain to; None: no client certs
    cert_pem: bytes
    key_pem: bytes
    client_ca_pem: bytes | None

    def grpc_credentials(self) -> grpc.ServerCredentials:
        return grpc.ssl_server_credentials(
            [(self.key_pem, self.cert_pem)],
            root_certificates=self.client_ca_pem,
            require_client_auth=self.client_ca_pem is not None,
        )

    def ssl_context(self) -> ssl.SSLContext:
        """The server side of TLS on a plain socket (the bulk-data channel)."""
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(self.cert, self.key)
        if self.client_ca is not None:
            context.load_verify_locations(cafile=self.client_ca)
            context.verify_mode = ssl.CERT_REQUIRED
        return context

    def uvicorn_options(self) -> dict[str, Any]:
        options: dict[str, Any] = {"ssl_certfile": str(self.cert), "ssl_keyfile": str(self.key)}
        if self.client_ca is not None:
            options.update(ssl_ca_certs=str(self.client_ca), ssl_cert_reqs=ssl.CERT_REQUIRED)
        return options


def load_tls(config: ServerConfig) -> TLSFiles | None:
    """The configured files, read and checked (StartupError naming the file), or None (no TLS)."""
    if config.tls_cert is None or config.tls_key is None:
        return None
    cert, key, ca = config.tls_cert, config.tls_key, config.tls_client_ca
    pems = {path: _read(path) for path in (cert, key, ca) if path is not None}
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_cert_chain(cert, key)
    except (ssl.SSLError, ValueError) as exc:
        raise StartupError(f"--tls-cert {cert} and --tls-key {key} do not load: {exc}") from None
    if ca is not None:
        try:
            context.load_verify_locations(cafile=ca)
        except (ssl.SSLError, ValueError) as exc:
            raise StartupError(f"--tls-client-ca {ca} holds no usable CA: {exc}") from None
    return TLSFiles(cert, key, ca, pems[cert], pems[key], pems[ca] if ca is not None else None)


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise StartupError(f"cannot read {path}: {exc.strerror}") from None


def exposure_warnings(config: ServerConfig) -> list[str]:
    """What a bind beyond this host leaves open: no authentication, or everything in clear text."""
    if config.host in LOOPBACK:
        return []
    warnings = []
    if not config.token and config.auth_file is None and config.tls_client_ca is None:
        warnings.append(
            f"!!! binding {config.host} without a token or client certificates: anyone who can"
            " reach this address can read and change every model. Pass --token-file (or set"
            " ADAMD_TOKEN) or --tls-client-ca. !!!"
        )
    if config.tls_cert is None:
        warnings.append(
            f"!!! binding {config.host} without TLS: the token, gradients and parameters cross"
            " the network in clear text. Pass --tls-cert and --tls-key. !!!"
        )
    return warnings
