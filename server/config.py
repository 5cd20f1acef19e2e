"""The daemon's configuration: read once at start (flags over ADAMD_* env over defaults), then frozen.

Values out of range raise ConfigError (a ValueError) naming the field, so `adamd serve` can say
what is wrong in one line instead of failing somewhere later."""

from __future__ import annotations

import os
from dataclasses import dataclass, fields
from importlib import metadata
from pathlib import Path
from typing import Any

from adamd.server.core.budget import auto_budget
from adamd.server.core.limits import Limits

# Host names that reach only this machine: binding one of these needs no token or TLS.
LOOPBACK = ("127.0.0.1", "localhost", "::1")


def adamd_version() -> str:
    """The installed package's version ("unknown" from a source tree never installed)."""
    try:
        return metadata.version("adamd")
    except metadata.PackageNotFoundError:
        return "unknown"


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"  # address both servers bind
    grpc_port: int = 50051  # 0 picks a free port
    http_port: int = 8080  # 0 picks a free port; -1 disables the HTTP side
    data_dir: Path = Path("./adamd-data")  # snapshots live here
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    token: str | None = None  # when set, every call but health must carry it (one admin)
    auth_file: Path | None = (
        None  # principals and grants (server/auth/loader.py); reloaded on SIGHUP
    )
    audit_log: Path | None = None  # one JSON line per change (server/auth/audit.py)
    grpc_workers: int = 8  # threads for torch work (checks, steps, copies); waits hold none
    stream_idle_s: float = 60.0  # a request stream silent this long is ended (DEADLINE_EXCEEDED)
    chunk_bytes: int = (4 << 20) - (64 << 10)  # tensor bytes per reply frame when a pull names none
    round_timeout_s: float = 60.0  # default for sync rounds whose worker went missing
    max_staleness: int = 16  # default async staleness bound (versions)
    snapshot_every_steps: int = 0  # 0: off
    snapshot_every_s: float = 60.0  # 0: off (the default bounds what a crash loses: RPO)
    snapshot_keep: int = 3  # snapshots kept per model
    durable: bool = False  # acknowledge a push only once its step is on disk
    stats_every: int = 0  # step statistics every N steps; 0: auto (at most 2% of the time); <0: off
    shm: bool = True  # offer the same-host shared-memory fast path
    # The bulk-data channel (server/transport/bulk/): pushes and pulls over a plain socket on this port,
    # next to gRPC (clients learn it over gRPC). 0 picks a free one; -1 turns it off (clients
    # then stream over gRPC).
    bulk_port: int = 0
    # TLS for gRPC and HTTP alike (server/transport/tls.py); cert and key together or neither:
    tls_cert: Path | None = None  # the server's certificate chain, PEM
    tls_key: Path | None = None  # its private key, PEM
    tls_client_ca: Path | None = None  # require client certificates signed by this CA (mTLS)
    # Limits on what one caller may ask (server/core/limits.py; refused before any allocation):
    max_model_bytes: int = Limits.max_model_bytes  # parameter bytes per model
    max_tensors: int = Limits.max_tensors  # tensors declared in one request
    max_name_bytes: int = Limits.max_name_bytes  # one parameter name, UTF-8 bytes
    max_push_id_bytes: int = Limits.max_push_id_bytes  # one push id, UTF-8 bytes
    max_message_bytes: int = Limits.max_message_bytes  # one gRPC message, either way
    max_stream_bytes: int = Limits.max_stream_bytes  # one request stream; 0: 4 x model + message
    # Host memory all transfers in flight may hold at once (server/core/budget.py); 0: auto (a
    # quarter of the memory the process may use, at least 1 GiB, grown to fit the largest single
    # transfer or sync round); -1: no budget.
    max_transfer_bytes: int = 0

    @classmethod
    def load(
        cls, overrides: dict[str, Any] | None = None, environ: dict[str, str] | None = None
    ) -> ServerConfig:
        """Defaults, then ADAMD_<FIELD> environment variables, then explicit (non-None) overrides."""
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for f in fields(cls):
            raw = env.get(f"ADAMD_{f.name.upper()}")
            if raw is not None:
                try:
                    values[f.name] = _parse(f.type, raw)
                except ValueError:
                    raise ConfigError(
                        f"ADAMD_{f.name.upper()}={raw!r} is not a valid {f.type}"
                    ) from None
        for key, value in (overrides or {}).items():
            if value is not None:
                values[key] = value
        for key in ("data_dir", "tls_cert", "tls_key", "tls_client_ca", "auth_file", "audit_log"):
            if values.get(key) is not None:
                values[key] = Path(values[key])
        return cls(**values)

    def __post_init__(self) -> None:
        checks = [
            ("grpc_port", 0 <= self.grpc_port <= 65535, "a port, 0-65535"),
            ("http_port", -1 <= self.http_port <= 65535, "a port, 0-65535, or -1 (off)"),
            ("bulk_port", -1 <= self.bulk_port <= 65535, "a port, 0-65535, or -1 (off)"),
            ("grpc_workers", self.grpc_workers >= 1, "at least 1"),
            ("stream_idle_s", 0 < self.stream_idle_s < float("inf"), "a positive number"),
            (
                "chunk_bytes",
                (64 << 10) <= self.chunk_bytes <= (4 << 20) - (64 << 10),
                "within 65536..4128768 (64 KiB .. 4 MiB - 64 KiB)",
            ),
            ("round_timeout_s", self.round_timeout_s > 0, "positive"),
            ("max_staleness", self.max_staleness >= 0, "0 or more"),
            ("snapshot_every_steps", self.snapshot_every_steps >= 0, "0 (off) or more"),
            ("snapshot_every_s", self.snapshot_every_s >= 0, "0 (off) or more"),
            ("snapshot_keep", self.snapshot_keep >= 1, "at least 1"),
            ("max_model_bytes", self.max_model_bytes >= 1, "at least 1"),
            ("max_tensors", self.max_tensors >= 1, "at least 1"),
            ("max_name_bytes", self.max_name_bytes >= 1, "at least 1"),
            ("max_push_id_bytes", self.max_push_id_bytes >= 1, "at least 1"),
            ("max_message_bytes", self.max_message_bytes >= 1 << 20, "at least 1 MiB (1048576)"),
            ("max_stream_bytes", self.max_stream_bytes >= 0, "0 (auto) or more"),
            ("max_transfer_bytes", self.max_transfer_bytes >= -1, "-1 (off), 0 (auto) or more"),
        ]
        for name, ok, want in checks:
            if not ok:
                raise ConfigError(f"{name} must be {want}, got {getattr(self, name)!r}")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ConfigError("tls_cert and tls_key go together: give both or neither")
        if self.tls_client_ca is not None and self.tls_cert is None:
            raise ConfigError(
                "tls_client_ca needs tls_cert and tls_key (client certificates need TLS)"
            )
        if self.token is not None and self.auth_file is not None:
            raise ConfigError(
                "give --auth-file or --token-file (ADAMD_TOKEN), not both: put the token in the"
                ' auth file as a principal with admin over "*"'
            )
        if self.token is not None and not usable_token(self.token):
            # A token the client cannot send (gRPC metadata and HTTP headers carry printable
            # ASCII only) would start a server nobody can call.
            raise ConfigError(
                "the token must be printable ASCII without spaces or line breaks"
                f" ({len(self.token)} characters given)"
            )

    @property
    def transfer_budget(self) -> int | None:
        """The transfer-memory budget in force, in bytes (None: no budget)."""
        if self.max_transfer_bytes == -1:
            return None
        return self.max_transfer_bytes or auto_budget()

    @property
    def limits(self) -> Limits:
        return Limits(
            max_model_bytes=self.max_model_bytes,
            max_tensors=self.max_tensors,
            max_name_bytes=self.max_name_bytes,
            max_push_id_bytes=self.max_push_id_bytes,
            max_message_bytes=self.max_message_bytes,
            max_stream_bytes=self.max_stream_bytes,
        )


class ConfigError(ValueError):
    """A configuration value that cannot work."""


def usable_token(token: str) -> bool:
    return bool(token) and all(33 <= ord(c) <= 126 for c in token)


def _parse(annotation: Any, raw: str) -> Any:
    text = str(annotation)
    if text.endswith("| None") and not raw.strip():
        return None  # ADAMD_TLS_CERT= (set but empty) means unset
    if text.startswith("bool"):
        return raw.strip().lower() in ("1", "true", "yes", "on")
    if text.startswith("int"):
        return int(raw)
    if text.startswith("float"):
        return float(raw)
    if text.startswith("Path"):
        return Path(raw)
    return raw
