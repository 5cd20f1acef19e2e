"""The command line: `adamd serve | demo | inspect | snapshot`, the flags, and the daemon that
wires config, core, storage and the adapters together."""

from adamd.server.cli.args import config_from_args
from adamd.server.cli.main import build_parser, main

__all__ = ["build_parser", "config_from_args", "main"]
