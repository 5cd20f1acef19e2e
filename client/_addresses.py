"""Where the servers are: one address, several (a list or a comma-separated string), the
StatefulSet form `adamd-{0..3}.adamd-headless:50051` (a brace range of ordinals), or, when no
address is given, the `ADAMD_SERVERS` environment variable. The order is the shards' order."""

from __future__ import annotations

import os
import re
from collections.abc import Sequence

DEFAULT_ADDRESS = "127.0.0.1:50051"
ENV = "ADAMD_SERVERS"
_RANGE = re.compile(r"\{(\d+)\.\.(\d+)\}")
MAX_SERVERS = 1024


def parse_servers(address: str | Sequence[str] | None) -> list[str]:
    """Every server address, in order. Raises ValueError naming what is wrong."""
    if address is None:
        address = os.environ.get(ENV) or DEFAULT_ADDRESS
    items = [address] if isinstance(address, str) else list(address)
    out: list[str] = []
    for item in items:
        if not isinstance(item, str):
            raise ValueError(f"a server address must be a string 'host:port', got {item!r}")
        for part in item.split(","):
            part = part.strip()
            if not part:
                raise ValueError(f"empty server address in {item!r}")
            out.extend(_expand(part))
    if not out:
        raise ValueError("no server address given")
    seen: set[str] = set()
    for a in out:
        if a in seen:
            raise ValueError(f"server {a!r} is listed twice: each shard needs its own server")
        seen.add(a)
    return out


def _expand(address: str) -> list[str]:
    m = _RANGE.search(address)
    if m is None:
        if "{" in address or "}" in address:
            raise ValueError(
                f"cannot read {address!r}: a range is written {{FIRST..LAST}}, e.g."
                " adamd-{0..3}.adamd-headless:50051"
            )
        return [address]
    lo, hi = int(m[1]), int(m[2])
    if hi < lo or hi - lo + 1 > MAX_SERVERS:
        raise ValueError(f"bad range {m[0]} in {address!r}: FIRST..LAST with FIRST <= LAST")
    return [
        a
        for i in range(lo, hi + 1)
        for a in _expand(address[: m.start()] + str(i) + address[m.end() :])
    ]
