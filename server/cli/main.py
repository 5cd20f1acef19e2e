"""`adamd` command line: serve, demo, inspect, snapshot. `main()` only wires config, core and adapters."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from collections.abc import Sequence
from typing import Any

from adamd.server.cli.args import add_server_arguments, config_from_args
from adamd.server.config import ConfigError, adamd_version
from adamd.server.errors import StartupError
from adamd.server.transport.tls import exposure_warnings

logger = logging.getLogger("adamd")


def _serve(args: argparse.Namespace) -> int:
    from adamd.server.cli.daemon import Daemon

    config = config_from_args(args)
    for warning in exposure_warnings(config):
        logger.warning(warning)
    daemon = Daemon(config)

    def on_signal(signum: int, frame: Any) -> None:
        logger.info("received %s, stopping", signal.Signals(signum).name)
        daemon.request_stop()

    def on_hangup(signum: int, frame: Any) -> None:
        logger.info("received SIGHUP: reloading the auth file, reopening the audit log")
        daemon.request_reload()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGHUP, on_hangup)
    daemon.start()
    daemon.wait_for_stop_request()
    daemon.stop()
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="adamd",
        description="adamd: Adam as a service. A server holds parameters and Adam state; workers push gradients over gRPC.",
    )
    parser.add_argument("--version", action="version", version=f"adamd {adamd_version()}")
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

    from adamd.server.cli import demo

    demo.register(sub)
    for name in ("inspect_cmd", "snapshot_cmd", "auth_cmd"):
        try:
            module = __import__(f"adamd.server.cli.{name}", fromlist=["register"])
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
