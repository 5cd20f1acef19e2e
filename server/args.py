"""The daemon's command-line flags, shared by `adamd serve` and `adamd demo`, and how they
become a ServerConfig (flags over ADAMD_* environment over defaults, read once)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from .config import ConfigError, ServerConfig

LOOPBACK = ("127.0.0.1", "localhost", "::1")


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
        "--token-file",
        type=Path,
        help="file holding the token every call must carry (or env ADAMD_TOKEN)",
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
        help="do not offer same-host clients the shared-memory fast path (they stream over gRPC)",
    )
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")


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
            "snapshot_every_steps",
            "snapshot_every_s",
            "snapshot_keep",
            "durable",
            "stats_every",
            "shm",
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
        overrides["token"] = token
    overrides.update(extra)
    return ServerConfig.load(overrides)
