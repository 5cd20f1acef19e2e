"""The auth file (`--auth-file`, TOML): principals, their credentials and grants, as a Policy.

    [[principal]]
    name = "team-a-trainer"
    token_sha256 = "<64 hex digits: adamd auth hash-token>"
    grants = { "team-a-*" = "train" }

    [[principal]]
    name = "team-b-ci"
    cert = ["ci.team-b.example"]   # a client certificate's subject CN or a SAN (--tls-client-ca)
    grants = { "team-b-*" = "admin", "shared-*" = "read" }
    metrics = true                 # may read /metrics

    [anonymous]                    # optional: what a caller with no credential may do
    metrics = true

A file that does not parse, or says something that cannot be meant (an unknown key or role, a
plain token, a pattern with characters no model name has, a token or identity given twice), is
refused with its line: at start `adamd serve` exits 2; on SIGHUP the old grants stay in force.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

from adamd.server.auth.policy import Policy, Principal, Role

PATTERN = re.compile(r"[A-Za-z0-9._\-*?\[\]!]+")  # model names: letters, digits, . _ -; globs
SHA256 = re.compile(r"[0-9a-f]{64}")
PRINCIPAL_KEYS = {"name", "token_sha256", "cert", "grants", "metrics"}


class AuthFileError(ValueError):
    """An auth file that cannot be used; its message names the file and the line."""


def load_policy(path: Path) -> Policy:
    try:
        text = path.read_text()
    except OSError as exc:
        raise AuthFileError(f"cannot read auth file {path}: {exc.strerror}") from None
    return parse_policy(text, str(path))


def parse_policy(text: str, where: str = "the auth file") -> Policy:
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise AuthFileError(f"auth file {where} does not parse: {exc}") from None
    file = _File(text, where)
    unknown = set(doc) - {"principal", "anonymous"}
    if unknown:
        file.fail(sorted(unknown)[0], f"unknown key {sorted(unknown)[0]!r} (principal, anonymous)")
    entries = doc.get("principal", [])
    if not isinstance(entries, list):
        file.fail("principal", "principals are [[principal]] tables")
    by_token: dict[str, Principal] = {}
    by_identity: dict[str, Principal] = {}
    names: set[str] = set()
    for entry in entries:
        principal, token, certs = file.principal(entry)
        if principal.name in names:
            file.fail(principal.name, f"principal {principal.name!r} is named twice", last=True)
        names.add(principal.name)
        if token is not None:
            if token in by_token:
                file.fail(
                    token, f"principal {principal.name!r}: its token is another's too", last=True
                )
            by_token[token] = principal
        for identity in certs:
            if identity in by_identity:
                file.fail(identity, f"certificate identity {identity!r} is given twice", last=True)
            by_identity[identity] = principal
    anonymous = None
    if "anonymous" in doc:
        raw = doc["anonymous"]
        if not isinstance(raw, dict) or set(raw) - {"grants", "metrics"}:
            file.fail("anonymous", "[anonymous] takes only grants and metrics")
        anonymous = file.principal({"name": "anonymous", "cert": [], **raw}, anonymous=True)[0]
    return Policy(by_token, by_identity, anonymous, source=f"auth file {where}")


class _File:
    """The file's text, to say on which line something is wrong."""

    def __init__(self, text: str, where: str):
        self.lines = text.splitlines()
        self.where = where

    def fail(self, needle: object, message: str, last: bool = False) -> None:
        """Raise, naming the first line holding `needle` (`last`: the last such line)."""
        found = [i for i, t in enumerate(self.lines, 1) if str(needle) in t]
        line = (found[-1] if last else found[0]) if found else None
        at = f" line {line}" if line is not None else ""
        raise AuthFileError(f"auth file {self.where}{at}: {message}")

    def principal(
        self, entry: Any, anonymous: bool = False
    ) -> tuple[Principal, str | None, list[str]]:
        if not isinstance(entry, dict):
            self.fail("principal", "each principal is a [[principal]] table")
        name = entry.get("name")
        if not isinstance(name, str) or not name:
            self.fail("[[principal]]", "a principal needs a name")
        if "token" in entry:
            self.fail(
                "token",
                f"principal {name!r}: store the token's hash, token_sha256 ="
                " (adamd auth hash-token), never the token",
            )
        unknown = set(entry) - PRINCIPAL_KEYS
        if unknown:
            key = sorted(unknown)[0]
            self.fail(
                key,
                f"principal {name!r}: unknown key {key!r} ({', '.join(sorted(PRINCIPAL_KEYS))})",
            )
        token = entry.get("token_sha256")
        if token is not None and (not isinstance(token, str) or not SHA256.fullmatch(token)):
            self.fail(
                "token_sha256", f"principal {name!r}: token_sha256 must be 64 lowercase hex digits"
            )
        certs = entry.get("cert", [])
        certs = [certs] if isinstance(certs, str) else certs
        if not isinstance(certs, list) or not all(isinstance(c, str) and c for c in certs):
            self.fail("cert", f"principal {name!r}: cert is a name or a list of names")
        if token is None and not certs and not anonymous:
            self.fail(name, f"principal {name!r} has neither token_sha256 nor cert")
        metrics = entry.get("metrics", False)
        if not isinstance(metrics, bool):
            self.fail("metrics", f"principal {name!r}: metrics is true or false")
        return Principal(name, self.grants(name, entry.get("grants", {})), metrics), token, certs

    def grants(self, name: str, raw: Any) -> tuple[tuple[str, Role], ...]:
        if not isinstance(raw, dict):
            self.fail("grants", f'principal {name!r}: grants is a table, {{ "pattern" = "role" }}')
        out = []
        for pattern, role in raw.items():
            if not PATTERN.fullmatch(pattern):
                self.fail(
                    pattern,
                    f"principal {name!r}: pattern {pattern!r} can match no model"
                    " name (letters, digits, '.', '_', '-' and the globs * ? [ ])",
                )
            if not isinstance(role, str) or role.upper() not in Role.__members__:
                self.fail(
                    f"{role}", f"principal {name!r}: unknown role {role!r} (read, train, admin)"
                )
            out.append((pattern, Role[role.upper()]))
        return tuple(out)
