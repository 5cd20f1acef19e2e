"""Elastic mode's live membership: which worker ranks are registered, each by a lease.

A worker registers by joining (the server picks the lowest free rank when none is asked for) or
by pushing; every push renews its lease, and a lease not renewed within `lease_s` lapses: the rank
leaves, and the open round (rounds.py) stops waiting for it. A rank that lapsed is not handed to
a newcomer for one more lease, so a worker that was merely slow finds its rank still its own when
its next push re-registers it. Leaving frees the rank at once.

No networking and no lock of its own: `Rounds` calls it under the host's lock. Expiries use
time.monotonic; what views show uses time.time.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from adamd.server.errors import LimitExceeded

DEFAULT_LEASE_S = 30.0
MAX_MEMBERS = 65536  # registered plus lately lapsed ranks: what joins can make a model hold


@dataclass
class Member:
    rank: int
    joined_at: float  # time.time() of its join (or of the push that registered it)
    last_seen: float  # time.time() of its last join or push
    expires: float  # time.monotonic() when its lease lapses unless renewed


class Membership:
    """Leases by rank. Callers hold the host's lock."""

    def __init__(self, lease_s: float = DEFAULT_LEASE_S):
        if not lease_s > 0:
            raise ValueError(f"lease_s must be positive, got {lease_s}")
        self.lease_s = lease_s
        self.members: dict[int, Member] = {}
        self._lapsed: dict[int, float] = {}  # rank -> monotonic time its lease lapsed

    def join(self, rank: int | None) -> int:
        """Register `rank` (or the lowest rank neither live nor lately lapsed) and return it.
        Joining with a live rank renews it: the same worker, restarted."""
        now = time.monotonic()
        self.prune()
        if rank is None:
            cooling = {r for r, t in self._lapsed.items() if now - t < self.lease_s}
            rank = 0
            while rank in self.members or rank in cooling:
                rank += 1
        self.renew(rank)
        return rank

    def renew(self, rank: int) -> None:
        """Heard from `rank` (a join or a push): its lease starts over; registered if it was not."""
        wall = time.time()
        member = self.members.get(rank)
        if member is None:
            if len(self.members) + len(self._lapsed) >= MAX_MEMBERS and rank not in self._lapsed:
                self.prune()
                if len(self.members) + len(self._lapsed) >= MAX_MEMBERS:
                    raise LimitExceeded(f"{MAX_MEMBERS} workers registered already")
            member = self.members[rank] = Member(rank, wall, wall, 0.0)
            self._lapsed.pop(rank, None)
        member.last_seen = wall
        member.expires = time.monotonic() + self.lease_s

    def leave(self, rank: int) -> bool:
        """Deregister `rank` now; False when it was not registered."""
        self.prune()
        return self.members.pop(rank, None) is not None

    def prune(self) -> list[int]:
        """Drop every member whose lease lapsed; the ranks dropped."""
        now = time.monotonic()
        gone = [r for r, m in self.members.items() if m.expires <= now]
        for r in gone:
            del self.members[r]
            self._lapsed[r] = now
        for r, t in list(self._lapsed.items()):
            if now - t >= self.lease_s:
                del self._lapsed[r]
        return gone

    def live(self) -> set[int]:
        """The ranks registered now (lapsed leases dropped first)."""
        self.prune()
        return set(self.members)

    def first_expiry(self, ranks: Iterable[int]) -> float | None:
        """The earliest lease expiry (monotonic) among these ranks that are registered."""
        return min((self.members[r].expires for r in ranks if r in self.members), default=None)

    def view(self) -> list[dict[str, Any]]:
        """The members for /v1/models/{model}: rank, joined and last seen (unix seconds), when the
        lease lapses (unix seconds) and how long that is from now."""
        mono, wall = time.monotonic(), time.time()
        return [
            {
                "rank": m.rank,
                "joined_at": m.joined_at,
                "last_seen": m.last_seen,
                "lease_expires_at": wall + (m.expires - mono),
                "lease_left_s": max(0.0, m.expires - mono),
            }
            for m in sorted(self.members.values(), key=lambda m: m.rank)
        ]
