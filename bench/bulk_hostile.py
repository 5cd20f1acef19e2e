"""`python -m bench.bulk_hostile`: a normal client on the bulk-data channel while hostile peers hold
connections open against the same `adamd serve` (issue 25; figures in docs/security.md).

Held open at once, from this process, on loopback: `--silent` silent connections (half never
send a byte, half stop after HELO with a valid ticket) and `--slow` connections that send one
byte per second (half trickling their HELO, half trickling a PUSH frame after HELO). Then a
normal `Client(transport="bulk")` makes `--calls` push+pull pairs of a `--size`-parameter
model; printed: their latency (p50, max), how many went over gRPC instead (the channel turned
off), and the server's threads, RSS and file descriptors before the peers came and after the
calls (from /proc).

This is a measurement, not a test: the figures depend on the machine. The server's connection
and handshake caps apply (server/transport/bulk/connections.py: MAX_HANDSHAKES sheds the oldest handshake,
so not every unticketed or HELO-trickling peer is still held at the end; the script says how
many the server still holds).
"""

from __future__ import annotations

import argparse
import os
import resource
import socket
import statistics
import threading
import time
from pathlib import Path

import torch

from adamd.client import Client
from adamd.protocol.bulk import HELO, PREFIX, PUSH
from adamd.v1 import adamd_pb2 as pb

from .common import adamd_server


def _proc(pid: int) -> dict[str, float]:
    status = Path(f"/proc/{pid}/status").read_text().splitlines()
    fields = dict(line.split(":", 1) for line in status if ":" in line)
    return {
        "threads": int(fields["Threads"]),
        "rss_mib": int(fields["VmRSS"].split()[0]) / 1024,
        "fds": len(os.listdir(f"/proc/{pid}/fd")),
    }


def _raise_fd_limit(want: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(want, hard), hard))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.bulk_hostile", description=__doc__)
    p.add_argument("--silent", type=int, default=1000, help="silent connections (default 1000)")
    p.add_argument("--slow", type=int, default=200, help="1 byte/s connections (default 200)")
    p.add_argument("--calls", type=int, default=50, help="normal push+pull pairs (default 50)")
    p.add_argument("--size", type=int, default=1 << 18, help="model parameters (default 262144)")
    args = p.parse_args(argv)
    _raise_fd_limit(4 * (args.silent + args.slow) + 1024)  # this process and the server's

    with adamd_server(("--no-shm",)) as server:  # the network path, as from another host
        host = server.address.rsplit(":", 1)[0]
        model = "hostile-bench"
        with Client(server.address, transport="grpc") as admin:
            admin.create_model(model, {"w": torch.zeros(args.size)}, lr=1e-3)
        opener = Client(server.address, transport="bulk")
        assert opener._bulk is not None
        bulk_port = opener._bulk._open().port
        time.sleep(0.5)
        before = _proc(server.pid)

        refused = 0

        def ticketed() -> socket.socket:
            """Past HELO; a server that shut it instead counts in `refused`."""
            nonlocal refused
            s = socket.create_connection((host, bulk_port), timeout=10)
            reply = opener._bulk._open()  # type: ignore[union-attr]
            try:
                s.sendall(PREFIX.pack(HELO, len(reply.ticket), 0, 0, 0) + reply.ticket)
                if s.recv(PREFIX.size)[:4] != HELO:
                    refused += 1
            except OSError:
                refused += 1
            return s

        # Ticketed peers first (a server that sheds handshakes would shut them otherwise),
        # then the ones that never get past HELO.
        held: list[socket.socket] = []
        half = args.silent // 2
        ticket = opener._bulk._open().ticket
        push = pb.PushHeader(
            model=model, grads=[pb.TensorSpec(name="w", shape=[args.size], dtype=pb.FLOAT32)]
        ).SerializeToString()
        slow: list[tuple[socket.socket, bytes]] = []
        for _ in range(args.silent - half):
            held.append(ticketed())
        for _ in range(args.slow // 2):
            slow.append((ticketed(), PREFIX.pack(PUSH, len(push), 0, 0, 0) + push))
        for _ in range(half):
            held.append(socket.create_connection((host, bulk_port), timeout=10))
        for _ in range(args.slow - args.slow // 2):
            s = socket.create_connection((host, bulk_port), timeout=10)
            slow.append((s, PREFIX.pack(HELO, len(ticket), 0, 0, 0) + ticket))
        stop = threading.Event()

        def trickle() -> None:
            at = 0
            while not stop.wait(1.0):
                for s, frame in slow:
                    if at < len(frame) - 1:  # never the whole frame
                        try:
                            s.send(frame[at : at + 1])
                        except OSError:
                            pass
                at += 1

        t = threading.Thread(target=trickle, daemon=True)
        t.start()
        time.sleep(2.0)
        loaded = _proc(server.pid)

        # A client that comes now: its first call connects (handshake) among the peers.
        normal = Client(server.address, transport="bulk", timeout=30)
        assert normal._bulk is not None
        latencies, fallbacks = [], 0
        grad = {"w": torch.randn(args.size)}
        for _ in range(args.calls):
            t0 = time.perf_counter()
            normal.push_grad(model, grad)
            normal.pull(model)
            latencies.append(time.perf_counter() - t0)
            if not normal._bulk.usable():
                fallbacks += 1
        after = _proc(server.pid)
        stop.set()
        t.join()
        still = sum(1 for s in held + [s for s, _ in slow] if _open(s))
        for s in held:
            s.close()
        for s, _ in slow:
            s.close()
        normal.close()
        opener.close()

    first = latencies[0]  # it connects: OpenBulk, TCP, HELO
    latencies.sort()
    print(
        f"{args.silent} silent + {args.slow} slow (1 B/s) connections, {args.size} params,"
        f" {args.calls} push+pull pairs"
    )
    print(
        f"  latency p50 {statistics.median(latencies) * 1e3:.1f} ms,"
        f" max {latencies[-1] * 1e3:.1f} ms (the first, which connects: {first * 1e3:.1f} ms);"
        f" calls over gRPC instead: {fallbacks}"
        f" ({normal._bulk.off_reason or 'the channel stayed on'})"
    )
    print(f"  hostile connections still open at the end (the rest shed by the server): {still}")
    print(f"  ticketed hostile connections the server shut before HELO: {refused}")
    for name, fig in (("before", before), ("peers held", loaded), ("after calls", after)):
        print(
            f"  server {name:>11}: threads {fig['threads']:.0f}, RSS {fig['rss_mib']:.0f} MiB,"
            f" fds {fig['fds']:.0f}"
        )


def _open(s: socket.socket) -> bool:
    """Whether the server still holds `s` (no EOF or reset waiting on it)."""
    s.setblocking(False)
    try:
        return s.recv(1, socket.MSG_PEEK) != b""
    except BlockingIOError:
        return True
    except OSError:
        return False


if __name__ == "__main__":
    main()
