"""adamd's server: the model registry and optimizer core, its gRPC and HTTP adapters, and the CLI.

`Daemon` and `ServerConfig` are imported on first use, so the core (`adamd.server.core.model`,
`registry`, `cuda_step`, ...) imports without the daemon's extras (prometheus-client, the gRPC
health and reflection services): the GPU tests of the core run on machines that lack them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from adamd.protocol.allocator import tune_malloc

if TYPE_CHECKING:
    from adamd.server.cli.daemon import Daemon
    from adamd.server.config import ServerConfig

__all__ = ["Daemon", "ServerConfig"]

tune_malloc()  # reuse large buffers instead of mapping them afresh every step (see allocator)


def __getattr__(name: str) -> Any:
    if name == "Daemon":
        from adamd.server.cli.daemon import Daemon

        return Daemon
    if name == "ServerConfig":
        from adamd.server.config import ServerConfig

        return ServerConfig
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
