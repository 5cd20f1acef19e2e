"""The client's exceptions. Every failure of a call surfaces as one of these, never grpc.RpcError.

    AdamdError
    ├── InvalidArgument        bad input: shapes, dtypes, names, hyperparameters, a broken stream
    │   ├── NonFiniteGradient  a pushed gradient held inf or nan (the push was rejected whole)
    │   └── LimitExceeded      a request over one of the server's size limits (RESOURCE_EXHAUSTED)
    ├── NotFound               unknown model or parameter
    ├── AlreadyExists          a model of that name exists with other parameters
    ├── FailedPrecondition     the push does not fit the model's state now
    │   ├── StalePush          the gradient was computed from a version too old to apply
    │   ├── DuplicatePush      this worker already pushed for this round
    │   └── SessionExpired     a same-host session is no longer current (the Client re-streams)
    ├── Aborted                a sync round failed
    ├── Unauthenticated        missing or wrong token (or a client certificate the server does not know)
    ├── PermissionDenied       known caller without the role the call needs (read, train, admin)
    ├── DeadlineExceeded       a wait (for a round, a version) ran out of time
    └── Unavailable            the server cannot be reached (after retries)

The server sends the precise kind in the trailing metadata key `adamd-error`; when it is missing
(a proxy, another implementation) the gRPC status code picks the class.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import grpc

from adamd.client._failed_call import AnyFailedCall, code_of, details_of, kind_of
from adamd.protocol import ProtocolError


class AdamdError(Exception):
    """Base of every error the adamd client raises."""

    code: grpc.StatusCode = grpc.StatusCode.UNKNOWN


class InvalidArgument(AdamdError, ValueError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class NonFiniteGradient(InvalidArgument):
    pass


class LimitExceeded(InvalidArgument):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class NotFound(AdamdError, KeyError):
    code = grpc.StatusCode.NOT_FOUND

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class AlreadyExists(AdamdError):
    code = grpc.StatusCode.ALREADY_EXISTS


class FailedPrecondition(AdamdError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class StalePush(FailedPrecondition):
    pass


class DuplicatePush(FailedPrecondition):
    pass


class SessionExpired(FailedPrecondition):
    pass


class Aborted(AdamdError):
    code = grpc.StatusCode.ABORTED


class Unauthenticated(AdamdError):
    code = grpc.StatusCode.UNAUTHENTICATED


class PermissionDenied(AdamdError, PermissionError):
    code = grpc.StatusCode.PERMISSION_DENIED


class DeadlineExceeded(AdamdError, TimeoutError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class Unavailable(AdamdError, ConnectionError):
    code = grpc.StatusCode.UNAVAILABLE


KINDS: dict[str, type[AdamdError]] = {
    cls.__name__: cls
    for cls in (
        AdamdError,
        InvalidArgument,
        NonFiniteGradient,
        LimitExceeded,
        NotFound,
        AlreadyExists,
        FailedPrecondition,
        StalePush,
        DuplicatePush,
        SessionExpired,
        Aborted,
        Unauthenticated,
        PermissionDenied,
        DeadlineExceeded,
        Unavailable,
    )
}
_BY_CODE = {cls.code: cls for cls in reversed(KINDS.values())}


def from_rpc_error(err: AnyFailedCall) -> AdamdError:
    """Translate a failed call (gRPC's, or the bulk channel's FailedCall) into the client's
    exception (the one place this happens)."""
    code = code_of(err) or grpc.StatusCode.UNKNOWN
    details = details_of(err) if hasattr(err, "details") else str(err)
    cls = KINDS.get(kind_of(err)) or _BY_CODE.get(code, AdamdError)
    exc = cls(details or code.name)
    exc.code = code
    return exc


@contextlib.contextmanager
def invalid_input() -> Iterator[None]:
    """What the wire protocol refuses to encode (a dtype or value that cannot travel) is the
    caller's bad input: the client's InvalidArgument, as the server would answer it."""
    try:
        yield
    except ProtocolError as exc:
        raise InvalidArgument(str(exc)) from exc
