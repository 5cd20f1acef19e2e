"""The daemon: one process holding the model registry, serving gRPC and HTTP over it.

`Daemon(config).start()` binds both servers (port 0 picks free ones), `stop()` drains them. The
HTTP side runs uvicorn in a thread over a socket bound here, so both addresses are known as soon as
start() returns.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from adamd.server.auth import Access, AuditLog, AuthFileError, token_policy
from adamd.server.config import ServerConfig
from adamd.server.core.budget import TransferBudget
from adamd.server.core.registry import ModelRegistry, resolve_device
from adamd.server.core.stats import StatsBook
from adamd.server.dataplane import DataPlane
from adamd.server.errors import StartupError
from adamd.server.http.metrics import Metrics
from adamd.server.operations import Operations
from adamd.server.storage.snapshots import SnapshotManager
from adamd.server.transport.bulk import BulkServer
from adamd.server.transport.grpc_server import GrpcServer
from adamd.server.transport.grpc_service import OptimizerService
from adamd.server.transport.same_host import SameHost
from adamd.server.transport.tls import load_tls

logger = logging.getLogger(__name__)


class Daemon:
    def __init__(self, config: ServerConfig):
        self.config = config
        self.access = self._access(config)  # first: a bad auth file stops the start at once
        self.tls = load_tls(config)  # None: plaintext on both ports
        try:
            self.device = resolve_device(config.device)
        except (ValueError, RuntimeError) as exc:
            raise StartupError(str(exc)) from None
        self.registry = ModelRegistry(
            self.device,
            max_staleness=config.max_staleness,
            round_timeout_s=config.round_timeout_s,
            limits=config.limits,
        )
        # Inspection: step history/norms and Prometheus metrics, fed by step observers and calls.
        self.stats = StatsBook(self.registry, every=config.stats_every)
        # Host memory of pulls and pushes in flight, granted in turn on the gRPC loop.
        self.transfers = TransferBudget(
            config.transfer_budget, grows=config.max_transfer_bytes == 0
        )
        self.metrics = Metrics(self.registry, self.stats, self.transfers)
        self.extensions: list[Any] = []  # things with start()/stop(), stopped in reverse
        # Same-host fast path: shared-memory parameters and per-session gradient files.
        same_host = self.same_host = SameHost(self.registry) if config.shm else None
        if same_host is not None:
            self.extensions.append(same_host)
        # Snapshots: restore at start, periodic/on-demand/durable writes, final ones at stop.
        self.snapshots = SnapshotManager(config, self.registry)
        self.extensions.append(self.snapshots)
        self.ops = Operations(
            self.registry,
            access=self.access,
            durable=config.durable,
            stats=self.stats,
            snapshots=self.snapshots,
            same_host=same_host,
        )
        self.ops.facts.stats_every = config.stats_every
        self.started_at = self.ops.facts.started_at
        self._workers = ThreadPoolExecutor(config.grpc_workers, thread_name_prefix="adamd-work")
        self.plane = DataPlane(
            self.ops,
            executor=self._workers,
            idle_s=config.stream_idle_s,
            chunk_bytes=config.chunk_bytes,
            budget=self.transfers,
        )
        self.service = OptimizerService(self.plane, on_call=self.metrics.on_call)
        address = f"{config.host}:{config.grpc_port}"
        try:
            self._grpc = GrpcServer(
                self.service,
                address,
                max_message_bytes=config.max_message_bytes,
                credentials=self.tls.grpc_credentials() if self.tls else None,
            )
        except (RuntimeError, OSError) as exc:
            self._workers.shutdown(wait=False)
            raise StartupError(f"cannot serve gRPC on {address}: {exc}") from None
        self.grpc_port = self._grpc.port
        # The bulk-data channel: the same pushes and pulls on a plain socket beside gRPC.
        self.bulk = self._bind_bulk(config)
        self.ops.facts.grpc_address = self.grpc_address
        self._http_server: Any = None
        self._http_thread: threading.Thread | None = None
        self.http_port: int | None = None
        self._stopped = threading.Event()
        self._stop_requested = threading.Event()
        self._reload_requested = threading.Event()
        self._wake = threading.Event()

    @staticmethod
    def _access(config: ServerConfig) -> Access:
        """Who may call: --auth-file, else --token-file's one admin, else anyone."""
        try:
            audit = AuditLog(config.audit_log)
        except OSError as exc:
            raise StartupError(
                f"cannot open --audit-log {config.audit_log}: {exc.strerror}"
            ) from None
        if config.auth_file is not None:
            try:
                return Access.from_file(config.auth_file, audit)
            except AuthFileError as exc:
                raise StartupError(str(exc)) from None
        if config.token is not None:
            return Access(token_policy(config.token), audit=audit)
        return Access(audit=audit)

    def reload(self) -> bool:
        """SIGHUP: the auth file read again (kept when it does not load), the audit log reopened.
        Connections and calls in flight stay; each call's next check sees the new grants."""
        return self.access.reload()

    def _bind_bulk(self, config: ServerConfig) -> BulkServer | None:
        if config.bulk_port < 0:
            return None
        tls = self.tls.ssl_context() if self.tls else None
        try:
            bulk = BulkServer(
                self.plane, config.host, config.bulk_port, tls=tls, on_call=self.metrics.on_call
            )
        except OSError as exc:
            self._grpc.stop(0)
            self._workers.shutdown(wait=False)
            raise StartupError(
                f"cannot serve the bulk-data channel on {config.host}:{config.bulk_port}:"
                f" {exc.strerror} (--bulk-port; -1 turns it off)"
            ) from None
        self.service.bulk_tickets = bulk.open
        return bulk

    @property
    def grpc_address(self) -> str:
        host = self.config.host
        return f"[{host}]:{self.grpc_port}" if ":" in host else f"{host}:{self.grpc_port}"

    @property
    def http_url(self) -> str | None:
        if self.http_port is None:
            return None
        host = self.config.host
        host = "127.0.0.1" if host in ("0.0.0.0", "") else host
        return f"{'https' if self.tls else 'http'}://{host}:{self.http_port}"

    @property
    def http_bound(self) -> str | None:
        """The address the HTTP socket is bound to (``0.0.0.0`` for all interfaces), for the log."""
        if self.http_port is None:
            return None
        host = self.config.host or "0.0.0.0"
        host = f"[{host}]" if ":" in host else host
        return f"{'https' if self.tls else 'http'}://{host}:{self.http_port}"

    def start(self) -> Daemon:
        try:
            for ext in self.extensions:
                ext.start()
            self._grpc.start()
            if self.bulk is not None:
                self.bulk.start(self._grpc.loop)
            self.ops.facts.ready = True
            if self.config.http_port >= 0:
                self._start_http()
        except BaseException:
            self.stop(grace=0)  # whatever did start
            raise
        logger.info(
            "adamd serving gRPC on %s and HTTP on %s (device %s; bulk-data channel: %s)",
            self.grpc_address,
            self.http_bound or "(off)",
            self.device,
            f"port {self.bulk.port}" if self.bulk is not None else "off",
        )
        return self

    def _start_http(self) -> None:
        import uvicorn

        from adamd.server.http.app import create_app

        family = socket.AF_INET6 if ":" in self.config.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((self.config.host, self.config.http_port))
        except OSError as exc:
            sock.close()
            raise StartupError(
                f"cannot serve HTTP on {self.config.host}:{self.config.http_port}: {exc.strerror}"
            ) from None
        sock.listen(128)
        self.http_port = sock.getsockname()[1]
        app = create_app(self.ops, self.metrics)
        server = uvicorn.Server(
            uvicorn.Config(
                app,
                log_level="warning",
                access_log=False,
                lifespan="off",
                **(self.tls.uvicorn_options() if self.tls else {}),
            )
        )
        self._http_server = server
        self._http_thread = threading.Thread(
            target=server.run, kwargs={"sockets": [sock]}, name="adamd-http", daemon=True
        )
        self._http_thread.start()
        deadline = time.monotonic() + 30
        while not server.started:
            if not self._http_thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the HTTP server did not start")
            time.sleep(0.01)

    def stop(self, grace: float = 5.0) -> None:
        """Stop accepting work, let in-flight calls finish (up to `grace`), stop extensions."""
        if self._stopped.is_set():
            return
        self._stopped.set()
        self.ops.facts.ready = False
        t0 = time.monotonic()
        self._grpc.stop(grace)
        if self.bulk is not None:
            self.bulk.stop(max(grace - (time.monotonic() - t0), 0.0))
        self._workers.shutdown(wait=True)
        if self._http_server is not None:
            self._http_server.should_exit = True
            if self._http_thread is not None:
                self._http_thread.join(timeout=grace + 5)
        for ext in reversed(self.extensions):
            ext.stop()
        self.access.audit.close()
        logger.info("adamd stopped")

    def request_stop(self) -> None:
        """Safe from a signal handler: wakes wait_for_stop_request()."""
        self._stop_requested.set()
        self._wake.set()

    def request_reload(self) -> None:
        """Safe from a signal handler (SIGHUP): wait_for_stop_request() reloads."""
        self._reload_requested.set()
        self._wake.set()

    def wait_for_stop_request(self) -> None:
        while not self._stop_requested.is_set():
            self._wake.wait(0.5)
            self._wake.clear()
            if self._reload_requested.is_set():
                self._reload_requested.clear()
                self.reload()
