"""Retrying a failed call (Client.call): transient failures (the server restarting, a connection
dropped, over gRPC or the bulk-data channel) again with backoff until the retry deadline, every
other failure raised as the client's exception. Every call is safe to repeat: pushes carry their
push id, which the server's exactly-once ledger applies once."""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from typing import TypeVar

import grpc

from adamd.client._exceptions import Unavailable, from_rpc_error
from adamd.client._failed_call import FAILED_CALLS, AnyFailedCall, code_of, details_of

T = TypeVar("T")
RETRYABLE = (grpc.StatusCode.UNAVAILABLE,)
# grpc's details for a call cancelled on this side (by the application, or because the request
# iterator raised): not transient.
_LOCAL_CANCEL = ("Locally cancelled", "Exception iterating requests", "Exception serializing")


def transient(err: AnyFailedCall) -> grpc.StatusCode | None:
    """The call's status code, with a cancel by the server counted as UNAVAILABLE: a server that
    stops past its grace period cancels the calls still in flight (adamd answers UNAVAILABLE
    itself first, but work running on its threads at that moment cannot be cut short). Every
    call is safe to repeat (pushes by their id), so a training loop never sees a restart."""
    code = code_of(err)
    if code == grpc.StatusCode.CANCELLED and not any(
        mark in details_of(err) for mark in _LOCAL_CANCEL
    ):
        return grpc.StatusCode.UNAVAILABLE
    return code


def with_retries(fn: Callable[[], T], retry_timeout: float, address: str) -> T:
    """Run `fn`, retrying transient failures with backoff for `retry_timeout` seconds; map
    errors to ours (Unavailable, naming `address`, for a server gone longer than that)."""
    deadline = time.monotonic() + retry_timeout
    delay = 0.05
    while True:
        try:
            return fn()
        except FAILED_CALLS as err:  # gRPC's, or a FailedCall (the bulk channel's BulkError)
            code = transient(err)
            if code in RETRYABLE and time.monotonic() + delay < deadline:
                time.sleep(delay * (0.5 + random.random()))
                delay = min(delay * 2, 2.0)
                continue
            exc = from_rpc_error(err)
            if code in RETRYABLE:  # a server gone for longer than the retry deadline
                raise Unavailable(f"{address}: {exc}") from None
            raise exc from None
