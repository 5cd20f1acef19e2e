"""Building the gRPC server (separate from running it, so tests bind port 0).

Threads, not grpc.aio: `python -m bench.aio_vs_threads` moved the same bytes through both at the
same rate within this machine's noise (2026-11-25, 100 MB streams, aggregate GB/s push/pull:
1 client threads 1.44-1.66/1.19-1.54 vs aio 1.25-1.38/1.05-1.11; 4 clients 1.33/1.39 vs
1.68/1.47), and the core is synchronous: torch steps, model locks and sync rounds that park a
handler until the last rank arrives, which on aio would each need an executor hop.
"""

from __future__ import annotations

from concurrent import futures

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from adamd.protocol.frames import MAX_MESSAGE_BYTES
from adamd.v1 import adamd_pb2 as pb

from .grpc_service import SERVICE, OptimizerService

SERVER_OPTIONS = [
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.so_reuseport", 0),
]


def create_grpc_server(
    service: OptimizerService, address: str, workers: int = 64
) -> tuple[grpc.Server, int, health.HealthServicer]:
    """A started-not-yet server with the optimizer, health and reflection services. Returns (server, port, health)."""
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="adamd-grpc"),
        options=SERVER_OPTIONS,
        maximum_concurrent_rpcs=None,
    )
    server.add_generic_rpc_handlers((service.handler(),))
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    names = (
        pb.DESCRIPTOR.services_by_name["Optimizer"].full_name,
        health.SERVICE_NAME,
        reflection.SERVICE_NAME,
    )
    reflection.enable_server_reflection(names, server)
    port = server.add_insecure_port(address)
    if port == 0:
        raise OSError(f"could not bind gRPC to {address}")
    health_servicer.set(SERVICE, health_pb2.HealthCheckResponse.NOT_SERVING)
    return server, port, health_servicer
