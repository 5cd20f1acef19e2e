"""`python -m bench.bulk_hostile`: a normal client on the bulk-data channel while hostile peers hold
connections open against the same `adamd serve` (docs/security.md describes the defences).

Held open at once, from this process, on loopback: `--silent` silent connections (half never
send a byte, half stop after HELO with a valid ticket) and `--slow` connections that send one
byte per second (half trickling their HELO, half trickling a PUSH frame after HELO). Then a
normal `Client(transport="bulk")` makes `--calls` push+pull pairs of a `--size`-parameter
model; printed: their latency (p50, max), how many went over gRPC instead (the channel turned
off), and the server's threads, RSS and file descriptors before the peers came and after the
calls (from /proc), beside the same client against a server with no peers. It prints its
report section; `python -m bench` runs it at the defaults.

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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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


@dataclass
class _Peers:
    """The hostile connections held open: silent ones, and slow ones with the frame they trickle."""

    held: list[socket.socket] = field(default_factory=list)
    slow: list[tuple[socket.socket, bytes]] = field(default_factory=list)
    refused: int = 0  # ticketed ones the server shut before HELO

    def all(self) -> list[socket.socket]:
        return self.held + [s for s, _ in self.slow]


def _open_peers(opener: Client, host: str, port: int, model: str, args: Any) -> _Peers:
    """Ticketed peers first (a server that sheds handshakes would shut them otherwise), then the
    ones that never get past HELO."""
    bulk = opener._bulk
    assert bulk is not None
    peers = _Peers()

    def ticketed() -> socket.socket:
        s = socket.create_connection((host, port), timeout=10)
        reply = bulk._open()
        try:
            s.sendall(PREFIX.pack(HELO, len(reply.ticket), 0, 0, 0) + reply.ticket)
            if s.recv(PREFIX.size)[:4] != HELO:
                peers.refused += 1
        except OSError:
            peers.refused += 1
        return s

    half = args.silent // 2
    ticket = bulk._open().ticket
    push = pb.PushHeader(
        model=model, grads=[pb.TensorSpec(name="w", shape=[args.size], dtype=pb.FLOAT32)]
    ).SerializeToString()
    for _ in range(args.silent - half):
        peers.held.append(ticketed())
    for _ in range(args.slow // 2):
        peers.slow.append((ticketed(), PREFIX.pack(PUSH, len(push), 0, 0, 0) + push))
    for _ in range(half):
        peers.held.append(socket.create_connection((host, port), timeout=10))
    for _ in range(args.slow - args.slow // 2):
        s = socket.create_connection((host, port), timeout=10)
        peers.slow.append((s, PREFIX.pack(HELO, len(ticket), 0, 0, 0) + ticket))
    return peers


def _trickle(peers: _Peers, stop: threading.Event) -> None:
    at = 0
    while not stop.wait(1.0):
        for s, frame in peers.slow:
            if at < len(frame) - 1:  # never the whole frame
                try:
                    s.send(frame[at : at + 1])
                except OSError:
                    pass
        at += 1


def _calls(address: str, model: str, args: Any) -> tuple[list[float], int, str]:
    """A client that comes now: its first call connects (handshake) among the peers."""
    with Client(address, transport="bulk", timeout=30) as normal:
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
        return latencies, fallbacks, normal._bulk.off_reason or "the channel stayed on"


def measure(args: Any) -> dict[str, Any]:
    """The normal client's calls with the peers held open; latencies, fallbacks, server figures."""
    _raise_fd_limit(4 * (args.silent + args.slow) + 1024)  # this process and the server's
    with adamd_server(("--no-shm",)) as server:  # the network path, as from another host
        host = server.address.rsplit(":", 1)[0]
        model = "hostile-bench"
        with Client(server.address, transport="grpc") as admin:
            admin.create_model(model, {"w": torch.zeros(args.size)}, lr=1e-3)
        with Client(server.address, transport="bulk") as opener:
            assert opener._bulk is not None
            bulk_port = opener._bulk._open().port
            time.sleep(0.5)
            before = _proc(server.pid)
            peers = _open_peers(opener, host, bulk_port, model, args)
            stop = threading.Event()
            t = threading.Thread(target=_trickle, args=(peers, stop), daemon=True)
            t.start()
            time.sleep(2.0 if peers.all() else 0.1)
            loaded = _proc(server.pid)
            latencies, fallbacks, reason = _calls(server.address, model, args)
            after = _proc(server.pid)
            stop.set()
            t.join()
            still = sum(1 for s in peers.all() if _open(s))
            for s in peers.all():
                s.close()
    return {
        "silent": args.silent,
        "slow": args.slow,
        "calls": args.calls,
        "size": args.size,
        "first_ms": latencies[0] * 1e3,  # it connects: OpenBulk, TCP, HELO
        "p50_ms": statistics.median(latencies) * 1e3,
        "max_ms": max(latencies) * 1e3,
        "fallbacks": fallbacks,
        "channel": reason,
        "still_open": still,
        "refused": peers.refused,
        "server": {"before": before, "peers held": loaded, "after calls": after},
    }


REPORT_ARGV: list[str] = []  # the defaults: what `python -m bench` runs
QUICK_ARGV = ["--silent", "20", "--slow", "4", "--calls", "5", "--size", "4096"]


def _row(label: str, r: dict[str, Any]) -> tuple[object, ...]:
    f = r["server"]
    return (
        label,
        r["calls"],
        f"{r['p50_ms']:.1f}",
        f"{r['max_ms']:.1f} ({r['first_ms']:.1f})",
        r["fallbacks"],
        " / ".join(f"{f[k]['threads']:.0f}" for k in f),
        " / ".join(f"{f[k]['rss_mib']:.0f}" for k in f),
        " / ".join(f"{f[k]['fds']:.0f}" for k in f),
        f"{r['still_open']} of {r['silent'] + r['slow']}",
    )


def to_section(loaded: dict[str, Any], idle: dict[str, Any]) -> Any:
    from .compose import Section, table

    head = ["peers", "pairs", "p50 ms", "max ms (first call, connects)", "over gRPC instead"]
    head += ["server threads before / peers held / after", "RSS MiB, the same", "fds, the same"]
    head += ["peers still held at the end"]
    peers = f"{loaded['silent']:,} silent + {loaded['slow']} at 1 B/s"
    body = [
        *table(head, [_row(peers, loaded), _row("none", idle)]),
        "",
        f"- a new client's calls while the peers are held: {loaded['fallbacks']} of"
        f" {loaded['calls']} went over gRPC instead ({loaded['channel']}); the server shut"
        f" {loaded['refused']} ticketed peers before HELO.",
    ]
    how = [
        "One `adamd serve --no-shm` on loopback. Held open at once from the measuring process:"
        " silent connections (half never send a byte, half stop after HELO with a valid ticket)"
        " and slow ones sending one byte per second (half trickling their HELO, half a PUSH"
        ' frame after HELO). Then a new `Client(transport="bulk")` makes push + pull pairs;'
        " the *none* row repeats it against a server with no peers. The server's connection and"
        " handshake caps shed the oldest handshakes, so not every peer is still held at the end."
        " Server threads, RSS and descriptors from /proc.",
    ]
    run = (
        f"{peers}; {loaded['calls']} push + pull pairs of a {loaded['size']:,}-parameter"
        " fp32 model."
    )
    return Section("Bulk channel against slow and silent peers", run, body, how)


def section(quick: bool = False) -> Any:
    args = _parser().parse_args(QUICK_ARGV if quick else REPORT_ARGV)
    loaded = measure(args)
    args.silent = args.slow = 0
    return to_section(loaded, measure(args))


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.bulk_hostile", description=__doc__)
    p.add_argument("--silent", type=int, default=1000, help="silent connections (default 1000)")
    p.add_argument("--slow", type=int, default=200, help="1 byte/s connections (default 200)")
    p.add_argument("--calls", type=int, default=50, help="normal push+pull pairs (default 50)")
    p.add_argument("--size", type=int, default=1 << 18, help="model parameters (default 262144)")
    return p


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    loaded = measure(args)
    args.silent = args.slow = 0
    print(to_section(loaded, measure(args)).markdown())


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
