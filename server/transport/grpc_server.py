"""The gRPC server: grpc.aio on an event loop of its own thread, built apart from running it.

`GrpcServer(service, address)` binds at once (port 0 picks a free one, known before `start()`),
`start()` serves, `stop(grace)` drains. The loop runs in a thread of its own, shared by every
server of the process, so the rest of the daemon (HTTP, snapshots, the CLI's signal wait) stays
ordinary synchronous code.

asyncio rather than a thread per call: a sync round parks every worker but the last, and a
thread pool of N handlers let N parked workers or N stalled streams starve everyone else. On the
loop a parked call is a suspended coroutine; torch work still runs on a few worker threads
(grpc_service.py). `python -m bench.concurrency` measures what this buys.
"""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import Future
from typing import Any, TypeVar

import grpc
import grpc.aio
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from adamd.protocol.frames import MAX_MESSAGE_BYTES
from adamd.server.transport.grpc_service import SERVICE, OptimizerService
from adamd.v1 import adamd_pb2 as pb

T = TypeVar("T")


def server_options(max_message_bytes: int = MAX_MESSAGE_BYTES) -> list[tuple[str, int]]:
    return [
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.so_reuseport", 0),
    ]


def _shared_loop() -> asyncio.AbstractEventLoop:
    """The process's one event loop for gRPC servers, started on first use and kept.

    grpc.aio binds every event loop that touches it to one process-wide completion queue; two
    loops then race for its wake-ups (grpc/grpc#25364). Every server in a process (tests run
    many) shares this loop, so there is only ever one."""
    global _LOOP
    with _LOOP_LOCK:
        if _LOOP is None:
            loop = asyncio.new_event_loop()
            threading.Thread(target=loop.run_forever, name="adamd-grpc-loop", daemon=True).start()
            _LOOP = loop
        return _LOOP


_LOOP: asyncio.AbstractEventLoop | None = None
_LOOP_LOCK = threading.Lock()


class GrpcServer:
    def __init__(
        self,
        service: OptimizerService,
        address: str,
        max_message_bytes: int = MAX_MESSAGE_BYTES,
        credentials: grpc.ServerCredentials | None = None,
    ):
        """`credentials`: TLS (server/transport/tls.py); the port then speaks TLS only."""
        self._loop = self.loop = _shared_loop()
        self._stopped = False
        self._service = service
        self._server, self.port, self._health = self._call(
            self._build(service, address, server_options(max_message_bytes), credentials)
        )

    def _call(self, coro: Any) -> Any:
        """Run a coroutine on the server's loop and wait for its result."""
        done: Future[Any] = asyncio.run_coroutine_threadsafe(coro, self._loop)
        return done.result()

    @staticmethod
    async def _build(
        service: OptimizerService,
        address: str,
        options: list[tuple[str, int]],
        credentials: grpc.ServerCredentials | None,
    ) -> tuple[grpc.aio.Server, int, Any]:
        server = grpc.aio.server(options=options, maximum_concurrent_rpcs=None)
        server.add_generic_rpc_handlers((service.handler(),))
        health_servicer = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
        names = (
            pb.DESCRIPTOR.services_by_name["Optimizer"].full_name,
            health.SERVICE_NAME,
            reflection.SERVICE_NAME,
        )
        reflection.enable_server_reflection(names, server)
        if credentials is None:
            port = server.add_insecure_port(address)
        else:
            port = server.add_secure_port(address, credentials)
        if port == 0:
            raise OSError(f"could not bind gRPC to {address}")
        await health_servicer.set(SERVICE, health_pb2.HealthCheckResponse.NOT_SERVING)
        return server, port, health_servicer

    def start(self) -> None:
        async def start() -> None:
            await self._server.start()
            for name in (SERVICE, ""):
                await self._health.set(name, health_pb2.HealthCheckResponse.SERVING)

        self._call(start())

    def stop(self, grace: float) -> None:
        """Refuse new calls (UNAVAILABLE), let those in flight finish for up to `grace` seconds;
        a push or long-poll still waiting near the end answers UNAVAILABLE itself (clients retry
        it, pushes under the same id), so grpc never has to cancel one."""
        if self._stopped:
            return
        self._stopped = True

        async def stop() -> None:
            await self._health.enter_graceful_shutdown()
            stopping = asyncio.ensure_future(self._server.stop(grace))
            try:  # the last part of the grace is for the cut calls' own answers
                await asyncio.wait_for(asyncio.shield(stopping), grace - min(1.0, grace / 5))
            except asyncio.TimeoutError:
                self._service.cut()
            await stopping

        self._call(stop())
