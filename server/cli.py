"""`adamd` command line: serve, demo, inspect, snapshot. `main()` only wires config, core and adapters."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .config import ConfigError, ServerConfig
from .errors import StartupError

logger = logging.getLogger("adamd")

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
        help="gRPC handler threads (default 64; a sync round parks one per waiting worker)",
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


def _serve(args: argparse.Namespace) -> int:
    from .daemon import Daemon

    config = config_from_args(args)
    if config.host not in LOOPBACK and not config.token:
        logger.warning(
            "!!! binding %s without a token: anyone who can reach this address can read and change"
            " every model. Pass --token-file or set ADAMD_TOKEN. !!!",
            config.host,
        )
    daemon = Daemon(config)

    def on_signal(signum: int, frame: Any) -> None:
        logger.info("received %s, stopping", signal.Signals(signum).name)
        daemon.request_stop()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    daemon.start()
    daemon.wait_for_stop_request()
    daemon.stop()
    return 0


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("adamd")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="adamd",
        description="adamd: Adam as a service. A server holds parameters and Adam state; workers push gradients over gRPC.",
    )
    parser.add_argument("--version", action="version", version=f"adamd {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = sub.add_parser(
        "serve",
        help="run the daemon (gRPC + HTTP)",
        description="Run the adamd daemon: gRPC for workers, HTTP for people and Prometheus.",
    )
    add_server_arguments(serve)
    serve.add_argument(
        "--snapshot-every-steps",
        type=int,
        help="write a snapshot every N steps per model (default 0: off)",
    )
    serve.add_argument(
        "--snapshot-every-s",
        type=float,
        help="write a snapshot every T seconds per model that changed (default 60; 0: off)",
    )
    serve.add_argument("--snapshot-keep", type=int, help="snapshots kept per model (default 3)")
    serve.add_argument(
        "--durable",
        action="store_true",
        default=None,
        help="acknowledge a push only after its step is on disk",
    )
    serve.set_defaults(func=_serve)

    from . import demo

    demo.register(sub)
    for name in ("inspect_cmd", "snapshot_cmd"):
        try:
            module = __import__(f"adamd.server.{name}", fromlist=["register"])
        except ModuleNotFoundError:
            continue
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if getattr(args, "verbose", False) else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        return int(args.func(args) or 0)
    except (StartupError, ConfigError) as exc:
        print(f"adamd: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
