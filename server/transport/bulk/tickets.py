"""One-use tickets for the bulk-data channel's connections, handed out by gRPC's `OpenBulk`.

`OpenBulk` is authorized like every gRPC call; the ticket carries the caller it was issued to, so
a connection that redeems it serves that caller (its requests are checked against the grants in
force then, connections.py).
"""

from __future__ import annotations

import collections
import secrets
import threading
import time

from adamd.protocol.bulk import TICKET_BYTES
from adamd.server.auth import Caller

TICKET_S = 30.0  # a ticket not used within this is void
MAX_TICKETS = 4096  # tickets outstanding at once (one more voids the oldest)


class Tickets:
    """One-use tickets for new connections, each valid for TICKET_S seconds, each carrying the
    caller it was issued to. At most MAX_TICKETS are outstanding: a new one voids the oldest, so
    a caller asking for tickets it never uses cannot lock others out (their tickets are used
    within a round trip)."""

    def __init__(self) -> None:
        self._open: collections.OrderedDict[bytes, tuple[float, Caller]] = collections.OrderedDict()
        self._lock = threading.Lock()

    def issue(self, caller: Caller) -> bytes:
        now = time.monotonic()
        with self._lock:
            while self._open:  # oldest first: expired ones, then the oldest past the cap
                oldest, (until, _) = next(iter(self._open.items()))
                if until >= now and len(self._open) < MAX_TICKETS:
                    break
                del self._open[oldest]
            ticket = secrets.token_bytes(TICKET_BYTES)
            self._open[ticket] = (now + TICKET_S, caller)
            return ticket

    def redeem(self, ticket: bytes) -> Caller | None:
        """The caller the ticket was issued to; None: unknown, expired or voided."""
        with self._lock:
            until, caller = self._open.pop(ticket, (0.0, None))
        return caller if until >= time.monotonic() else None

    def __len__(self) -> int:
        return len(self._open)
