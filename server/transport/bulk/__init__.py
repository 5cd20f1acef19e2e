"""The bulk-data channel's server side (adamd.protocol.bulk): pushes and pulls over plain sockets.

What a request does is the data plane's `push` and `pull` (server/dataplane.py), as over gRPC:
the same checks, transfer budget, exactly-once ledger, sync rounds and SIGTERM cut; only the
carrier differs.

No thread waits on a socket. Every connection's socket is non-blocking and watched by the gRPC
loop: the handshake (TLS, HELO and its ticket) runs on the loop itself, a byte at a time if the
peer sends them so; a request's frames are read and written by FrameSocket's steps on a small
pool of I/O threads that only move the bytes already there (the kernel copies straight between
the socket and tensor memory with the GIL released) and hand the connection back to the loop
when it has to wait. A peer that goes quiet, mid-handshake, mid-frame, after a FAIL or while not
reading a reply, costs a file descriptor and a timer. Deadlines: the handshake within
HANDSHAKE_S; each frame's prefix and header within --stream-idle-s of its start; data bytes,
replies and the pause between a request's frames no quieter than --stream-idle-s. Handshakes are
counted when accepted: past MAX_HANDSHAKES the oldest is shut. A sync worker waiting for its round
holds no thread either (its push awaits the outcome on the loop, as over gRPC).

A connection starts with HELO and a ticket from `OpenBulk`, which is authorized like every gRPC
call; without a valid ticket it is closed. The ticket carries the caller it was issued to, and
each request on the connection is checked for that caller (Operations.check, server/auth) against
the grants in force then. The socket speaks TLS when gRPC does (same certificate,
same client-certificate rule).

The package, by concept:
- connections.py: `BulkServer`, the listener, accept, the handshake, each connection's life, stop;
- tickets.py: the one-use tickets `OpenBulk` hands out;
- driving.py: running FrameSocket's I/O steps on the I/O threads and the loop, the deadlines;
- requests.py: PUSH, PULL and STEP, FAIL;
- replies.py: a pull's frames and a STEP's reply streamed a bucket at a time.
"""

from adamd.server.transport.bulk.connections import (
    HANDSHAKE_S,
    KEEPALIVE_S,
    MAX_CONNECTIONS,
    MAX_HANDSHAKES,
    BulkServer,
)
from adamd.server.transport.bulk.driving import IO_THREADS, MIN_FRAME_BYTES_PER_S
from adamd.server.transport.bulk.tickets import MAX_TICKETS, TICKET_S, Tickets

# The limits are read here; to change one (a test), patch it in its own module.
__all__ = [
    "HANDSHAKE_S",
    "IO_THREADS",
    "KEEPALIVE_S",
    "MAX_CONNECTIONS",
    "MAX_HANDSHAKES",
    "MAX_TICKETS",
    "MIN_FRAME_BYTES_PER_S",
    "TICKET_S",
    "BulkServer",
    "Tickets",
]
