"""TLS settings for a Client: which CA to trust, and the client certificate for mutual TLS.

`tls=True` trusts the system's CA store; `TLSConfig(ca=...)` trusts a private CA (the usual case
for a cluster's own issuer); `cert` and `key` add a client certificate for servers started with
`--tls-client-ca`. Files are read once, when the Client is built.
"""

from __future__ import annotations

import os
import ssl
from dataclasses import dataclass
from pathlib import Path

import grpc


@dataclass(frozen=True)
class TLSConfig:
    ca: str | Path | None = (
        None  # CA bundle (PEM) the server's certificate must chain to; None: system store
    )
    cert: str | Path | None = None  # client certificate chain (PEM), for servers that require one
    key: str | Path | None = None  # the client certificate's private key (PEM)

    def __post_init__(self) -> None:
        if (self.cert is None) != (self.key is None):
            raise ValueError("TLSConfig: cert and key go together (give both or neither)")


def channel_credentials(tls: bool | TLSConfig) -> grpc.ChannelCredentials:
    """gRPC credentials for `tls` (True: the system trust store, no client certificate)."""
    config = TLSConfig() if tls is True else tls
    if not isinstance(config, TLSConfig):
        raise TypeError(f"tls must be True, False, None or a TLSConfig, got {tls!r}")
    ca = _read(config.ca) if config.ca is not None else _system_roots()
    return grpc.ssl_channel_credentials(
        root_certificates=ca,
        private_key=_read(config.key) if config.key is not None else None,
        certificate_chain=_read(config.cert) if config.cert is not None else None,
    )


def socket_context(tls: bool | TLSConfig) -> ssl.SSLContext:
    """The same trust and client certificate for a plain TLS socket (the bulk-data channel)."""
    config = TLSConfig() if tls is True else tls
    if not isinstance(config, TLSConfig):
        raise TypeError(f"tls must be True, False, None or a TLSConfig, got {tls!r}")
    ca = _read(config.ca) if config.ca is not None else None
    context = ssl.create_default_context(cadata=ca.decode() if ca is not None else None)
    if config.cert is not None:
        context.load_cert_chain(config.cert, config.key)
    return context


def _read(path: str | Path) -> bytes:
    return Path(path).read_bytes()


def _system_roots() -> bytes | None:
    """The system's CA bundle (what OpenSSL trusts here); None lets gRPC choose: the file named by
    GRPC_DEFAULT_SSL_ROOTS_FILE_PATH when set, else the roots bundled with grpcio."""
    if os.environ.get("GRPC_DEFAULT_SSL_ROOTS_FILE_PATH"):
        return None
    cafile = ssl.get_default_verify_paths().cafile
    if cafile is None:
        return None
    try:
        return Path(cafile).read_bytes()
    except OSError:
        return None
