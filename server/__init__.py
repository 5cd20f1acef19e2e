"""adamd's server: the model registry and optimizer core, its gRPC and HTTP adapters, and the CLI."""

from .config import ServerConfig
from .daemon import Daemon

__all__ = ["Daemon", "ServerConfig"]
