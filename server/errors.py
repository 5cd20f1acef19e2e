"""The server's exceptions, and the one table mapping them to gRPC status codes and HTTP statuses.

    ServerError
    ├── InvalidArgument        (INVALID_ARGUMENT, 400)
    │   ├── NonFiniteGradient  (INVALID_ARGUMENT, 400)
    │   └── LimitExceeded      (RESOURCE_EXHAUSTED, 413: a size or count over a server limit)
    ├── NotFound               (NOT_FOUND, 404)
    ├── AlreadyExists          (ALREADY_EXISTS, 409)
    ├── FailedPrecondition     (FAILED_PRECONDITION, 409)
    │   ├── StalePush
    │   ├── DuplicatePush
    │   └── SessionExpired     (a same-host session to attach again; clients handle it)
    ├── Aborted                (ABORTED, 409)
    ├── Unauthenticated        (UNAUTHENTICATED, 401: no credential, or one the server does not know)
    ├── PermissionDenied       (PERMISSION_DENIED, 403: known, without the role it needs)
    ├── DeadlineExceeded       (DEADLINE_EXCEEDED, 504)
    └── Unavailable            (UNAVAILABLE, 503: stopping, or busy; clients retry)

Each class's name is the `adamd-error` kind sent to clients, which map it back to the client
exception of the same name (adamd.client exceptions); a test keeps the two trees in step.

StartupError stands apart: no caller sees it; `adamd serve` prints it in one line and exits 2.
"""

from __future__ import annotations

import logging

import grpc

from adamd.protocol import ProtocolError

logger = logging.getLogger(__name__)


class ServerError(Exception):
    """Base of every error the server reports to a caller. Raising one changes no state."""

    code = grpc.StatusCode.INTERNAL
    http_status = 500

    @property
    def kind(self) -> str:
        return type(self).__name__ if type(self) is not ServerError else "AdamdError"


class InvalidArgument(ServerError):
    code = grpc.StatusCode.INVALID_ARGUMENT
    http_status = 400


class NonFiniteGradient(InvalidArgument):
    pass


class LimitExceeded(InvalidArgument):
    """A request larger than the server's limits (server/core/limits.py), refused before allocating."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED
    http_status = 413


class NotFound(ServerError):
    code = grpc.StatusCode.NOT_FOUND
    http_status = 404


class AlreadyExists(ServerError):
    code = grpc.StatusCode.ALREADY_EXISTS
    http_status = 409


class FailedPrecondition(ServerError):
    code = grpc.StatusCode.FAILED_PRECONDITION
    http_status = 409


class StalePush(FailedPrecondition):
    pass


class DuplicatePush(FailedPrecondition):
    pass


class SessionExpired(FailedPrecondition):
    pass


class Aborted(ServerError):
    code = grpc.StatusCode.ABORTED
    http_status = 409


class Unauthenticated(ServerError):
    code = grpc.StatusCode.UNAUTHENTICATED
    http_status = 401


class PermissionDenied(ServerError):
    """A known caller whose grants do not give the role this call needs (server/auth/policy.py)."""

    code = grpc.StatusCode.PERMISSION_DENIED
    http_status = 403


class DeadlineExceeded(ServerError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED
    http_status = 504


class Unavailable(ServerError):
    """The server is stopping and could not finish this call within its grace period, or the
    call waited too long for transfer memory (server/core/budget.py); nothing of it took effect unless
    a retry (same push id) is told it was a duplicate."""

    code = grpc.StatusCode.UNAVAILABLE
    http_status = 503


class StartupError(Exception):
    """The daemon cannot start: a port taken, a data dir in use, a device that is not there."""


def as_server_error(exc: BaseException, what: str) -> ServerError:
    """`exc` as a caller is answered: a ProtocolError is INVALID_ARGUMENT, anything that is not a
    ServerError is INTERNAL (and logged as `what` failing)."""
    if isinstance(exc, ProtocolError):
        return InvalidArgument(str(exc))
    if not isinstance(exc, ServerError):
        logger.error("%s failed", what, exc_info=exc)
        return ServerError(f"internal error: {type(exc).__name__}: {exc}")
    return exc
