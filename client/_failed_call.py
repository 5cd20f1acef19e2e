"""A call that failed, whichever transport carried it.

gRPC reports a failure as grpc.RpcError (status code, details, the `adamd-error` kind in its
trailing metadata); the bulk-data channel as its own BulkError (client/_transport/bulk.py), a
`FailedCall` carrying the same three. The code that retries failed calls (client/_retry.py,
for Client.call) and the one that maps them to the client's exceptions
(_exceptions.from_rpc_error) take either, through `FAILED_CALLS` and the readers below.
"""

from __future__ import annotations

from typing import TypeAlias

import grpc


class FailedCall(Exception):
    """A call's failure as a transport other than gRPC reports it: the gRPC status code the
    server (or the transport) gave it, the details, and the adamd error kind ("" when none)."""

    def __init__(self, code: grpc.StatusCode, details: str, kind: str = ""):
        super().__init__(details)
        self._code, self._details, self.kind = code, details, kind

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details


# What `except` clauses that retry or map a failed call catch.
FAILED_CALLS: tuple[type[Exception], ...] = (grpc.RpcError, FailedCall)
AnyFailedCall: TypeAlias = grpc.RpcError | FailedCall


def code_of(err: AnyFailedCall) -> grpc.StatusCode | None:
    """The failure's status code (None: a grpc.RpcError that is no call, which has none)."""
    code = getattr(err, "code", None)
    return code() if callable(code) else None


def details_of(err: AnyFailedCall) -> str:
    details = getattr(err, "details", None)
    return (details() if callable(details) else None) or ""


def kind_of(err: AnyFailedCall) -> str:
    """The adamd error kind: a FailedCall's own, or gRPC's `adamd-error` trailing metadata."""
    if isinstance(err, FailedCall):
        return err.kind
    trailing = getattr(err, "trailing_metadata", None)
    for key, value in (trailing() if callable(trailing) else None) or ():
        if key == "adamd-error":
            return str(value)
    return ""
