"""`python -m bench.tls`: what TLS costs, push and pull GB/s with and without it, in one run.

Two `adamd serve` processes on loopback, one plaintext and one with `--tls-cert/--tls-key` (a
certificate made for the run with trustme), each holding the same model. Repetitions alternate
between them (plain, TLS, plain, TLS...), so both see the same moments of a noisy machine; the
best of N is kept for each. All transfers use `transport="grpc"` (the same-host path would move
the tensors through /dev/shm and bypass the socket, TLS or not). Figures:
- push (transport): `push_grad(..., found_inf=True)`: streamed in full, then skipped (no step):
  the wire part of a push.
- push (full): the same push, checked and stepped: what a worker waits for.
- pull: `pull(model, out=...)` into preallocated tensors.
It prints its report section (`python -m bench` runs it at REPORT_ARGV).
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import torch
import trustme

from adamd.client import Client, TLSConfig

from .common import adamd_server, make_tensors, parse_size, size_label
from .compose import Section, table

OPS = ("push (transport)", "push (full)", "pull")


@contextlib.contextmanager
def _certificate() -> Iterator[tuple[Path, Path, Path]]:
    """(cert, key, ca) PEM files for 127.0.0.1, removed afterwards."""
    ca = trustme.CA()
    issued = ca.issue_cert("127.0.0.1", "localhost")
    with tempfile.TemporaryDirectory(prefix="adamd-bench-tls-") as tmp:
        cert, key, ca_file = (Path(tmp) / n for n in ("tls.crt", "tls.key", "ca.crt"))
        issued.cert_chain_pems[0].write_to_path(str(cert))
        issued.private_key_pem.write_to_path(str(key))
        ca.cert_pem.write_to_path(str(ca_file))
        yield cert, key, ca_file


def _ops(client: Client, n: int) -> dict[str, Callable[[], object]]:
    params = make_tensors(n, seed=1)
    grads = make_tensors(n, seed=2)
    for g in grads.values():
        g.mul_(1e-3)
    client.create_model("bench", params, lr=1e-3)
    out = {k: torch.empty_like(v) for k, v in params.items()}
    return {
        "push (transport)": lambda: client.push_grad("bench", grads, found_inf=True),
        "push (full)": lambda: client.push_grad("bench", grads),
        "pull": lambda: client.pull("bench", out=out),
    }


def measure(n: int, reps: int) -> dict[str, dict[str, float]]:
    """Best-of-`reps` seconds per operation, {"plain": {...}, "tls": {...}}, interleaved."""
    with _certificate() as (cert, key, ca):
        tls = TLSConfig(ca=ca)
        tls_args = ("--tls-cert", str(cert), "--tls-key", str(key))
        with (
            adamd_server() as plain_server,
            adamd_server(tls_args, credentials=_trusting(ca)) as tls_server,
            Client(plain_server.address, transport="grpc") as plain_client,
            Client(tls_server.address, transport="grpc", tls=tls) as tls_client,
        ):
            ops = {"plain": _ops(plain_client, n), "tls": _ops(tls_client, n)}
            best = {side: dict.fromkeys(OPS, float("inf")) for side in ops}
            for op in OPS:
                for side in ops:  # warm-up: connections, buffers, the first step
                    ops[side][op]()
                for _ in range(reps):
                    for side in ops:
                        t = time.perf_counter()
                        ops[side][op]()
                        best[side][op] = min(best[side][op], time.perf_counter() - t)
    return best


def _trusting(ca: Path) -> grpc.ChannelCredentials:
    return grpc.ssl_channel_credentials(root_certificates=ca.read_bytes())


REPORT_ARGV = ["--size", "25M", "--reps", "3"]  # what `python -m bench` runs
QUICK_ARGV = ["--size", "100k", "--reps", "1"]


def to_section(n: int, reps: int, best: dict[str, dict[str, float]]) -> Section:
    gb = 4 * n / 1e9
    rows = [
        (
            op,
            f"{gb / best['plain'][op]:.3g}",
            f"{gb / best['tls'][op]:.3g}",
            f"{best['tls'][op] / best['plain'][op]:.2f}x",
        )
        for op in OPS
    ]
    body = [
        *table(("operation", "plaintext GB/s", "TLS GB/s", "TLS time / plaintext time"), rows),
        "",
        "TLS encrypts and authenticates every byte (BoringSSL, inside gRPC) on both sides, on"
        " the same threads that copy the chunks; workers on the server's host can use the"
        ' same-host path (`transport="auto"`), which moves tensors through /dev/shm and pays'
        " nothing for TLS (docs/security.md).",
    ]
    how = [
        "Two `adamd serve` processes on loopback, one plaintext and one with `--tls-cert/"
        "--tls-key` (a certificate made for the run with trustme), each holding the same model;"
        " repetitions alternate between them, the best is kept for each. **push (transport)**:"
        " `push_grad(..., found_inf=True)`, streamed in full and not stepped; **push (full)**:"
        " checked and stepped; **pull**: `pull(model, out=...)` into preallocated tensors. All"
        ' over `transport="grpc"`.',
    ]
    run = (
        f"{size_label(n)} fp32 params ({gb * 1000:.0f} MB per transfer) in 8 tensors, best of"
        f" {reps}."
    )
    return Section("TLS cost (gRPC, loopback)", run, body, how)


def section(quick: bool = False) -> Section:
    args = _parser().parse_args(QUICK_ARGV if quick else REPORT_ARGV)
    n = parse_size(args.size)
    return to_section(n, args.reps, measure(n, args.reps))


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.tls", description=__doc__.splitlines()[0])
    p.add_argument("--size", default="25M", help="fp32 params (default 25M)")
    p.add_argument("--reps", type=int, default=5, help="timed repetitions, best kept (default 5)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    n = parse_size(args.size)
    print(to_section(n, args.reps, measure(n, args.reps)).markdown())
    return 0


if __name__ == "__main__":
    sys.exit(main())
