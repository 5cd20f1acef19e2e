"""Why adamd's gRPC server runs on threads, not grpc.aio: the same byte-moving handlers both ways.

    python -m bench.aio_vs_threads [--mb 100] [--reps 5] [--clients 1,2]

A server process per flavour (generic handlers, identity serializers, 4 MiB chunks, as the raw
ceiling in bench/raw_grpc.py), one to N client processes streaming MB megabytes to it (push) and
back (pull) at the same time. Prints the best aggregate GB/s of each; the handler copies every
received chunk into a preallocated buffer and sends copies out of one, as adamd's does.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import time
from concurrent import futures
from typing import Any

import grpc

CHUNK = 4 << 20
OPTIONS = [("grpc.max_receive_message_length", -1), ("grpc.max_send_message_length", -1)]


def _ident(b: bytes) -> bytes:
    return b


def _handler(sink: Any, source: Any) -> grpc.GenericRpcHandler:
    return grpc.method_handlers_generic_handler(
        "b.B",
        {
            "Sink": grpc.stream_unary_rpc_method_handler(sink, _ident, _ident),
            "Source": grpc.unary_stream_rpc_method_handler(source, _ident, _ident),
        },
    )


def _threads_server(port_q: Any, total: int) -> None:
    buf = bytearray(total)

    def sink(it: Any, ctx: Any) -> bytes:
        n = 0
        for b in it:
            buf[n : n + len(b)] = b
            n += len(b)
        return n.to_bytes(8, "little")

    def source(req: bytes, ctx: Any) -> Any:
        view = memoryview(buf)
        for start in range(0, total, CHUNK):
            yield bytes(view[start : start + CHUNK])

    server = grpc.server(futures.ThreadPoolExecutor(16), options=OPTIONS)
    server.add_generic_rpc_handlers((_handler(sink, source),))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    port_q.put(port)
    server.wait_for_termination()


def _aio_server(port_q: Any, total: int) -> None:
    buf = bytearray(total)

    async def sink(it: Any, ctx: Any) -> bytes:
        n = 0
        async for b in it:
            buf[n : n + len(b)] = b
            n += len(b)
        return n.to_bytes(8, "little")

    async def source(req: bytes, ctx: Any) -> Any:
        view = memoryview(buf)
        for start in range(0, total, CHUNK):
            yield bytes(view[start : start + CHUNK])

    async def main() -> None:
        server = grpc.aio.server(options=OPTIONS)
        server.add_generic_rpc_handlers((_handler(sink, source),))
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        port_q.put(port)
        await server.wait_for_termination()

    asyncio.run(main())


def _client(port: int, total: int, reps: int, start: Any, out: Any) -> None:
    channel = grpc.insecure_channel(f"127.0.0.1:{port}", options=OPTIONS)
    sink = channel.stream_unary("/b.B/Sink", _ident, _ident)
    source = channel.unary_stream("/b.B/Source", _ident, _ident)
    blob = bytes(CHUNK)
    received = bytearray(total)
    sink(iter([blob] * (total // CHUNK)))  # warm-up
    results = []
    for _ in range(reps):
        start.wait()
        t = time.perf_counter()
        sink(iter([blob] * (total // CHUNK)))
        push = time.perf_counter() - t
        start.wait()
        t = time.perf_counter()
        n = 0
        for b in source(b""):
            received[n : n + len(b)] = b
            n += len(b)
        results.append((push, time.perf_counter() - t))
    out.put(results)


def measure(flavour: str, clients: int, total: int, reps: int) -> tuple[float, float]:
    """Best aggregate (push GB/s, pull GB/s) over `reps` rounds of `clients` concurrent clients."""
    ctx = mp.get_context("spawn")
    port_q, out = ctx.Queue(), ctx.Queue()
    target = _threads_server if flavour == "threads" else _aio_server
    server = ctx.Process(target=target, args=(port_q, total), daemon=True)
    server.start()
    port = port_q.get(timeout=60)
    start = ctx.Barrier(clients)
    procs = [
        ctx.Process(target=_client, args=(port, total, reps, start, out)) for _ in range(clients)
    ]
    for p in procs:
        p.start()
    per_client = [out.get(timeout=600) for _ in procs]
    for p in procs:
        p.join()
    server.kill()
    best_push = min(max(c[i][0] for c in per_client) for i in range(reps))
    best_pull = min(max(c[i][1] for c in per_client) for i in range(reps))
    return clients * total / best_push / 1e9, clients * total / best_pull / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mb", type=int, default=100)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--clients", default="1,2")
    args = parser.parse_args()
    total = args.mb * 1_000_000 // CHUNK * CHUNK
    print("| server | clients | push GB/s (aggregate, best) | pull GB/s (aggregate, best) |")
    print("| --- | --- | --- | --- |")
    for clients in map(int, args.clients.split(",")):
        for flavour in ("threads", "aio"):
            push, pull = measure(flavour, clients, total, args.reps)
            print(f"| {flavour} | {clients} | {push:.2f} | {pull:.2f} |", flush=True)


if __name__ == "__main__":
    main()
