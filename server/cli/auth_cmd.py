"""`adamd auth`: what an auth file needs. `hash-token` prints a token's SHA-256 (what the file
stores, so the file never holds a token); `check FILE` loads a file as the server would."""

from __future__ import annotations

import argparse
import secrets
import sys
from pathlib import Path
from typing import Any

from adamd.server.auth import AuthFileError, load_policy, token_sha256


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "auth",
        help="auth-file helpers: hash a token, check a file",
        description="Helpers for --auth-file (docs/security.md).",
    )
    sub = p.add_subparsers(dest="auth_command", required=True, metavar="ACTION")
    h = sub.add_parser(
        "hash-token",
        help="print a token's token_sha256 (reads the token from stdin; --new makes one)",
    )
    h.add_argument(
        "--new",
        action="store_true",
        help="make a fresh random token: prints it, then its hash (give the token to the client)",
    )
    h.set_defaults(func=_hash_token)
    c = sub.add_parser("check", help="load an auth file as `adamd serve` would; exit 2 if refused")
    c.add_argument("file", type=Path)
    c.set_defaults(func=_check)


def _hash_token(args: argparse.Namespace) -> int:
    if args.new:
        token = secrets.token_urlsafe(32)
        print(f"token:        {token}")
        print(f"token_sha256: {token_sha256(token)}")
        return 0
    token = sys.stdin.readline().strip()
    if not token:
        print(
            "adamd: give the token on stdin (echo -n TOKEN | adamd auth hash-token)",
            file=sys.stderr,
        )
        return 2
    print(token_sha256(token))
    return 0


def _check(args: argparse.Namespace) -> int:
    try:
        policy = load_policy(args.file)
    except AuthFileError as exc:
        print(f"adamd: {exc}", file=sys.stderr)
        return 2
    names = policy.principal_names
    print(f"{args.file}: {len(names)} principals: {', '.join(names)}")
    return 0
