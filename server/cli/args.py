"""The daemon's command-line flags, shared by `adamd serve` and `adamd demo`, and how they
become a ServerConfig (flags over ADAMD_* environment over defaults, read once)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from adamd.server.config import ConfigError, ServerConfig, usable_token


def add_server_arguments(
    p: argparse.ArgumentParser,
    *,
    http_default: int | None = None,
    data_dir_default: str = "./adamd-data",
) -> None:
    """Flags shared by `serve` and `demo` (defaults come from ServerConfig and ADAMD_* env)."""
    p.add_argument("--host", help="address to bind (default 127.0.0.1, env ADAMD_HOST)")
    p.add_argument("--grpc-port", type=int, help="gRPC port (default 50051; 0 picks a free one)")
    p.add_argument(
        "--http-port",
        type=int,
        default=http_default,
        help="HTTP port for /healthz, /metrics, the API and the dashboard (default 8080; 0 picks a free one; -1 turns HTTP off)",
    )
    p.add_argument(
        "--data-dir", type=Path, help=f"where snapshots are written (default {data_dir_default})"
    )
    p.add_argument(
        "--device",
        choices=["auto", "cpu", "cuda"],
        help="where parameters and Adam state live (default auto: CUDA when available)",
    )
    p.add_argument(
        "--round-timeout",
        type=float,
        dest="round_timeout_s",
        help="sync rounds step without missing workers after this many seconds (default 60)",
    )
    p.add_argument(
        "--max-staleness",
        type=int,
        help="async: reject gradients more than this many versions old (default 16)",
    )
    p.add_argument(
        "--grpc-workers",
        type=int,
        help="threads for torch work: checks, steps, copies (default 8; waiting calls hold none)",
    )
    p.add_argument(
        "--stream-idle-s",
        type=float,
        help="end a request stream that sends nothing for this many seconds (default 60)",
    )
    p.add_argument(
        "--chunk-bytes",
        type=int,
        help="tensor bytes per frame of pull and state replies when the client asks none"
        " (default 4128768 = 4 MiB - 64 KiB; 65536..4128768)",
    )
    p.add_argument(
        "--stats-every",
        type=int,
        help="step statistics (gradient/update norms) every N steps (default 0: auto, at most 2%%"
        " of the time; -1: off)",
    )
    p.add_argument(
        "--no-shm",
        dest="shm",
        action="store_false",
        default=None,
        help="do not offer same-host clients the shared-memory fast path (they use the network:"
        " the bulk-data channel, or gRPC)",
    )
    p.add_argument(
        "--bulk-port",
        type=int,
        help="port of the bulk-data channel: pushes and pulls over a plain socket (TLS with"
        " --tls-cert), without gRPC's copies; clients learn it over gRPC and fall back to gRPC"
        " when it cannot be reached (default 0: a free port; behind a firewall choose one and"
        " open it; -1: off)",
    )
    add_access_arguments(p)
    add_tls_arguments(p)
    add_limit_arguments(p)
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")


def add_access_arguments(p: argparse.ArgumentParser) -> None:
    """Who may call what (docs/security.md): one token, or an auth file of principals and roles."""
    g = p.add_argument_group("access control (docs/security.md)")
    g.add_argument(
        "--token-file",
        type=Path,
        help="file holding the token every call must carry (or env ADAMD_TOKEN): one admin"
        " principal over every model",
    )
    g.add_argument(
        "--auth-file",
        type=Path,
        help="principals (a token's SHA-256 or a client certificate's name) and their roles"
        " (read, train, admin) over model-name patterns, TOML; SIGHUP reloads it"
        " (docs/security.md; env ADAMD_AUTH_FILE)",
    )
    g.add_argument(
        "--audit-log",
        type=Path,
        help="append one JSON line per change (create, delete, load_state, edits, snapshots,"
        " joins, leaves): who, which model, the outcome; reopened on SIGHUP",
    )


def add_tls_arguments(p: argparse.ArgumentParser) -> None:
    """One certificate for both ports (docs/security.md); with it, plaintext is refused on both."""
    g = p.add_argument_group("TLS (gRPC and HTTPS from the same files; env ADAMD_TLS_*)")
    g.add_argument(
        "--tls-cert", type=Path, help="server certificate chain, PEM (with --tls-key: TLS on)"
    )
    g.add_argument("--tls-key", type=Path, help="the certificate's private key, PEM")
    g.add_argument(
        "--tls-client-ca",
        type=Path,
        help="CA bundle, PEM: require every client to present a certificate it signed (mTLS)",
    )


def add_limit_arguments(p: argparse.ArgumentParser) -> None:
    """What one caller may ask; each is refused before anything is allocated (docs/security.md)."""
    d = ServerConfig
    g = p.add_argument_group("limits (refused before any allocation; env ADAMD_MAX_*)")
    g.add_argument(
        "--max-model-bytes",
        type=int,
        help=f"parameter bytes one model may hold (default {d.max_model_bytes} = 32 GiB)",
    )
    g.add_argument(
        "--max-tensors",
        type=int,
        help=f"tensors one request may declare (default {d.max_tensors})",
    )
    g.add_argument(
        "--max-name-bytes",
        type=int,
        help=f"bytes of one parameter name (default {d.max_name_bytes})",
    )
    g.add_argument(
        "--max-push-id-bytes",
        type=int,
        help=f"bytes of one push id (default {d.max_push_id_bytes})",
    )
    g.add_argument(
        "--max-message-bytes",
        type=int,
        help=f"bytes of one gRPC message, either way (default {d.max_message_bytes} = 64 MiB)",
    )
    g.add_argument(
        "--max-stream-bytes",
        type=int,
        help="bytes of one request stream in all (default 0: 4 x --max-model-bytes + one message)",
    )
    g.add_argument(
        "--max-transfer-bytes",
        type=int,
        help="host bytes all pulls and pushes in flight may hold at once; more wait their turn"
        " (default 0: a quarter of memory, at least 1 GiB, grown to fit the largest single"
        " need; -1: no budget)",
    )


def config_from_args(args: argparse.Namespace, **extra: Any) -> ServerConfig:
    overrides = {
        k: getattr(args, k, None)
        for k in (
            "host",
            "grpc_port",
            "http_port",
            "data_dir",
            "device",
            "round_timeout_s",
            "max_staleness",
            "grpc_workers",
            "stream_idle_s",
            "chunk_bytes",
            "snapshot_every_steps",
            "snapshot_every_s",
            "snapshot_keep",
            "durable",
            "stats_every",
            "shm",
            "bulk_port",
            "tls_cert",
            "tls_key",
            "tls_client_ca",
            "auth_file",
            "audit_log",
            "max_model_bytes",
            "max_tensors",
            "max_name_bytes",
            "max_push_id_bytes",
            "max_message_bytes",
            "max_stream_bytes",
            "max_transfer_bytes",
        )
    }
    token_file = getattr(args, "token_file", None)
    if token_file is not None:
        try:
            token = Path(token_file).read_text().strip()
        except OSError as exc:
            raise ConfigError(f"cannot read token file {token_file}: {exc.strerror}") from None
        if not token:
            raise ConfigError(f"token file {token_file} is empty")
        if not usable_token(token):
            raise ConfigError(
                f"token file {token_file} must hold one line of printable ASCII without spaces"
                " (a token with a line break or space inside cannot be sent by any client)"
            )
        overrides["token"] = token
    overrides.update(extra)
    return ServerConfig.load(overrides)
