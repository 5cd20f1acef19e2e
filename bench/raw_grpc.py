"""The transport ceiling: raw bytes through Python grpcio over loopback, no schema at all.

Generic handlers with identity serializers; the client streams preallocated 4 MiB `bytes` chunks
(push) and the server streams them back (pull), the chunking adamd uses. Nothing is copied in
Python and no tensor is touched, so this is what grpcio alone can move. The server runs in its own
process (`python -m bench.raw_grpc PORT`), as the adamd server does, so neither side shares a GIL.
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass

import grpc

from .common import free_port, python_subprocess_env, stop_process, wait_for_channel

CHUNK = 4 << 20
_OPTS = [("grpc.max_receive_message_length", -1), ("grpc.max_send_message_length", -1)]
_SERVICE = "bench.Raw"


def _ident(b: bytes) -> bytes:
    return b


def _sink(it: Iterator[bytes], ctx: grpc.ServicerContext) -> bytes:
    n = 0
    for b in it:
        n += len(b)
    return n.to_bytes(8, "little")


def _source(req: bytes, ctx: grpc.ServicerContext) -> Iterator[bytes]:
    total, chunk = int.from_bytes(req[:8], "little"), int.from_bytes(req[8:16], "little")
    blob = bytes(chunk)
    sent = 0
    while sent < total:
        n = min(chunk, total - sent)
        yield blob if n == chunk else blob[:n]
        sent += n


def serve(port: int) -> None:
    srv = grpc.server(futures.ThreadPoolExecutor(4), options=_OPTS)
    handler = grpc.method_handlers_generic_handler(
        _SERVICE,
        {
            "Sink": grpc.stream_unary_rpc_method_handler(_sink, _ident, _ident),
            "Source": grpc.unary_stream_rpc_method_handler(_source, _ident, _ident),
        },
    )
    srv.add_generic_rpc_handlers((handler,))
    srv.add_insecure_port(f"127.0.0.1:{port}")
    srv.start()
    srv.wait_for_termination()


@dataclass
class RawClient:
    """Client side of the ceiling: push/pull `total` bytes in CHUNK pieces."""

    channel: grpc.Channel

    def __post_init__(self) -> None:
        self._sink = self.channel.stream_unary(f"/{_SERVICE}/Sink", _ident, _ident)
        self._source = self.channel.unary_stream(f"/{_SERVICE}/Source", _ident, _ident)
        self._blob = bytes(CHUNK)

    def push(self, total: int) -> None:
        blob, full, rest = self._blob, total // CHUNK, total % CHUNK
        chunks = [blob] * full + ([blob[:rest]] if rest else [])
        got = int.from_bytes(self._sink(iter(chunks)), "little")
        if got != total:
            raise RuntimeError(f"raw push moved {got} of {total} bytes")

    def pull(self, total: int) -> None:
        req = total.to_bytes(8, "little") + CHUNK.to_bytes(8, "little")
        got = sum(len(b) for b in self._source(req))
        if got != total:
            raise RuntimeError(f"raw pull moved {got} of {total} bytes")


@contextlib.contextmanager
def raw_server() -> Iterator[RawClient]:
    """The raw server in a subprocess, and a client bound to it."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "bench.raw_grpc", str(port)], env=python_subprocess_env()
    )
    try:
        address = f"127.0.0.1:{port}"
        wait_for_channel(address, timeout=30)
        with grpc.insecure_channel(address, options=_OPTS) as ch:
            yield RawClient(ch)
    finally:
        stop_process(proc, timeout=10)


if __name__ == "__main__":
    serve(int(sys.argv[1]))
