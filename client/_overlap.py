"""Pushing gradients while backward still runs: RemoteAdam(overlap=True).

RemoteAdam registers a post-accumulate-grad hook on every parameter. The first hook of a step
opens a push stream whose header names every parameter that requires grad; each gradient, once
backward has produced it, is queued and its bytes go out from grpc's request thread (in the order
backward produced them, cut into the client's chunks) while backward computes the rest. `step()`
queues what is left, ends the stream and waits for the reply, so by the end of backward most bytes
are already on the server.

The stream's end is what makes the server take the push. What is known only at the step (the
loss of `step(closure)`, hyperparameter edits made after backward) rides on a closing header on
the stream's last frame. A stream that cannot be used (AMP: GradScaler unscales at the step, or
found inf; a gradient accumulated again or changed in place after it was sent; a gradient that
stayed None) is cancelled without that end, so the server discards it, and `step()` pushes
everything as it would without overlap, under the same push id: a push is applied exactly once
either way. A server too old for closing headers refuses the stream, and the same fallback pushes.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import socket
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from typing import Any

import grpc
import torch

from adamd.client._exceptions import from_rpc_error
from adamd.client._failed_call import FAILED_CALLS, code_of
from adamd.client._transport.bulk import BulkChannel, BulkError, Unreachable, answer
from adamd.client._types import PushResult
from adamd.protocol.bulk import DONE, END, PUSH, FrameSocket
from adamd.protocol.frames import encode_frame, wire_chunks
from adamd.protocol.hyper import same_value
from adamd.v1 import adamd_pb2 as pb

logger = logging.getLogger(__name__)
_END = object()
# After this many steps in a row that could not use their streamed push, overlap turns itself
# off for the optimizer (it would only send every gradient twice).
MAX_FALLBACKS = 2


@dataclass
class Queued:
    index: int
    grad: torch.Tensor
    version: int  # grad._version when queued: a later in-place change shows as another number
    ready: Any = None  # a CUDA event recorded where backward produced the gradient

    @classmethod
    def of(cls, index: int, grad: torch.Tensor) -> Queued:
        ready = None
        if grad.device.type == "cuda":  # on the stream current here (backward's, in a hook)
            ready = torch.cuda.Event()
            ready.record()
        return cls(index, grad, grad._version, ready)


class StreamingPush:
    """One push stream opened before its gradients are all known.

    `send(i, grad)` queues gradient i (the header's order); grpc's request thread sends it.
    `finish()` ends the stream and returns the reply (or raises grpc.RpcError); `cancel()` stops
    it without ending it, so the server never applies it."""

    def __init__(
        self,
        push: Any,  # the Client's PushGrad stream-unary callable
        header: pb.PushHeader,
        wire_dtype: torch.dtype | None,
        chunk_bytes: int,
        call_kw: Mapping[str, Any],
    ):
        self.header = header
        self.wire_dtype = wire_dtype
        self.chunk_bytes = chunk_bytes
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._future = push.future(self._frames(), **call_kw)

    def _frames(self) -> Iterator[bytes]:
        yield encode_frame(self.header.SerializeToString())
        while True:
            item = self._queue.get()
            if item is _END:
                return  # grpc ends the stream, unless the call was cancelled first
            if isinstance(item, pb.PushHeader):  # the closing header, then the end
                yield encode_frame(item.SerializeToString())
                return
            if item.ready is not None:
                item.ready.synchronize()
            for start, chunk in wire_chunks(item.grad, self.wire_dtype, self.chunk_bytes):
                yield encode_frame(None, item.index, start, chunk)

    def send(self, item: Queued) -> None:
        self._queue.put(item)

    def finish(
        self, closing: pb.PushHeader | None = None, timeout: float | None = None
    ) -> pb.PushReply:
        """End the stream (after `closing`, a header whose found_inf, loss, scalars and
        hyperparameter edits replace the first one's) and wait for the reply."""
        self._queue.put(_END if closing is None else closing)
        return self._future.result(timeout)

    def cancel(self) -> None:
        # Cancel first: grpc then never sends the stream's end, even if the request thread
        # reaches _END while the cancellation is being processed.
        self._future.cancel()
        self._queue.put(_END)


class BulkStreamingPush:
    """StreamingPush over the bulk-data channel: a thread of its own sends the queued gradients
    on one connection (a hook only queues, as with gRPC); `cancel()` closes the connection, so
    the server never applies the push."""

    def __init__(
        self,
        channel: BulkChannel,
        header: pb.PushHeader,
        wire_dtype: torch.dtype | None,
        chunk_bytes: int,
    ):
        self.header = header
        self.wire_dtype = wire_dtype
        self.chunk_bytes = chunk_bytes
        self._channel = channel
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._reply: Future[pb.PushReply] = Future()
        self._conn: FrameSocket | None = None
        self._cancelled = False
        threading.Thread(target=self._run, name="adamd-overlap", daemon=True).start()

    def _run(self) -> None:
        try:
            with self._channel.connection() as conn:
                self._conn = conn
                if self._cancelled:
                    raise ConnectionAbortedError("the streamed push was cancelled")
                conn.send(PUSH, self.header.SerializeToString())
                while True:
                    item = self._queue.get()
                    if item is _END or isinstance(item, pb.PushHeader):
                        closing = item if isinstance(item, pb.PushHeader) else None
                        conn.send(END, closing.SerializeToString() if closing else b"")
                        self._channel.await_reply(conn, time.monotonic())
                        reply = pb.PushReply.FromString(answer(conn, DONE).header)
                        break
                    if item.ready is not None:
                        item.ready.synchronize()
                    conn.send_tensor(item.index, item.grad, self.wire_dtype, self.chunk_bytes)
            self._reply.set_result(reply)
        except Unreachable as exc:
            self._reply.set_exception(BulkError(grpc.StatusCode.UNAVAILABLE, str(exc)))
        except BaseException as exc:
            self._reply.set_exception(exc)

    def send(self, item: Queued) -> None:
        self._queue.put(item)

    def finish(
        self, closing: pb.PushHeader | None = None, timeout: float | None = None
    ) -> pb.PushReply:
        self._queue.put(_END if closing is None else closing)
        try:
            return self._reply.result(timeout)
        except FutureTimeout:
            raise grpc.FutureTimeoutError() from None

    def cancel(self) -> None:
        self._cancelled = True
        conn = self._conn
        if conn is not None:  # the sending thread fails at once and drops the connection
            with contextlib.suppress(OSError):
                conn.sock.shutdown(socket.SHUT_RDWR)
        self._queue.put(_END)


# A streamed push refused with one of these is refused for good (a stale or duplicate rank, a
# model gone, a limit, a bad token): raised as a push would raise it. Anything
# else (connection loss, a deadline, a server without closing headers) pushes again whole.
_DEFINITIVE = (
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.UNAUTHENTICATED,
    grpc.StatusCode.PERMISSION_DENIED,
)


def finish(
    stream: StreamingPush | BulkStreamingPush,
    closing: pb.PushHeader | None,
    timeout: float | None,
) -> pb.PushReply | None:
    """End the stream and wait for its reply; None where it failed in a way that pushing again
    whole (under the same push id) may mend. The server's definitive answers are raised as the
    client's exceptions."""
    try:
        return stream.finish(closing, timeout)
    except FAILED_CALLS as exc:  # gRPC's, or the bulk channel's BulkError
        stream.cancel()
        if code_of(exc) in _DEFINITIVE:  # the server's answer: pushing again would repeat it
            raise from_rpc_error(exc) from None
        logger.debug("a streamed push failed (%s)", exc)
        return None
    except grpc.FutureTimeoutError:
        stream.cancel()
        return None


@dataclass
class OpenPush:
    """The streamed push of the current step, and what was queued for it."""

    stream: StreamingPush | BulkStreamingPush
    names: list[str]  # the header's, in order
    updates: list[tuple[int, dict[str, Any]]]  # hyperparameter edits the header carries
    loss: float | None
    queued: dict[int, Queued] = field(default_factory=dict)
    spoiled: str | None = None  # why this push cannot be used, once known


class GradStreamer:
    """RemoteAdam's side of overlap: hooks in, one OpenPush per step out."""

    def __init__(self) -> None:
        self.enabled = True
        self._lock = threading.Lock()
        self._open: OpenPush | None = None
        self._declined = False  # the opener said no for this step: later hooks skip it too
        self._index: dict[str, int] = {}
        self.fallbacks = 0  # steps in a row that could not use their streamed push
        self.streamed = 0  # steps that did use it
        self.last_fallback: str | None = None

    def grad_ready(self, name: str, grad: torch.Tensor, opener: Any) -> None:
        """A parameter's gradient is final for this backward (post-accumulate-grad hook).
        `opener()` makes the step's OpenPush (None: no overlap for this step). Never raises
        into backward: a failure here only means this step pushes without overlap."""
        if not self.enabled:
            return
        try:
            self._grad_ready(name, grad, opener)
        except Exception as exc:
            logger.debug("overlap: could not stream %s (%s)", name, exc)
            with self._lock:
                if self._open is not None and self._open.spoiled is None:
                    self._spoil(self._open, f"streaming failed: {exc}")

    def _grad_ready(self, name: str, grad: torch.Tensor, opener: Any) -> None:
        with self._lock:
            if self._declined:
                return
            if self._open is None:
                self._open = opener()
                if self._open is None:
                    self._declined = True
                    return
                self._index = {n: i for i, n in enumerate(self._open.names)}
            op = self._open
            if op.spoiled is not None:
                return
            index = self._index.get(name)
            if index is None:
                return
            if index in op.queued:
                self._spoil(op, "a gradient accumulated again after it was sent")
                return
            item = Queued.of(index, grad)
            op.queued[index] = item
            op.stream.send(item)

    @staticmethod
    def _spoil(op: OpenPush, why: str) -> None:
        op.spoiled = why
        op.stream.cancel()  # stop sending bytes nobody will use

    def take(self) -> OpenPush | None:
        """The step's open push (and forget it: the next backward opens another)."""
        with self._lock:
            op, self._open = self._open, None
            self._declined = False
            return op

    def discard(self) -> None:
        op = self.take()
        if op is not None:
            op.stream.cancel()

    def __del__(self) -> None:
        # An optimizer dropped between backward and step: end its stream (grpc's request thread
        # would otherwise wait on the queue for good).
        try:
            self.discard()
        except Exception:
            pass

    @staticmethod
    def usable(op: OpenPush, grads: Mapping[str, torch.Tensor]) -> str | None:
        """Why `op` cannot carry this step's gradients, or None when it can."""
        if op.spoiled is not None:
            return op.spoiled
        if set(grads) != set(op.names):
            return "a parameter that requires grad has no gradient at the step"
        for index, item in op.queued.items():
            g = grads[op.names[index]]
            if g is not item.grad or g._version != item.version:
                return "a gradient changed after backward (clipping, unscale_, accumulation)"
        return None

    def finish_step(
        self,
        grads: Mapping[str, torch.Tensor],
        found_inf: torch.Tensor | None,
        skipped: bool,
        finish: Callable[[OpenPush], PushResult | None],
    ) -> tuple[PushResult | None, str | None]:
        """End this step's streamed push with `finish` where it can carry `grads` (else cancel
        it): (its result, None where the step must push as usual; the push id that push
        reuses, None where no stream was opened). `found_inf`: GradScaler's, when it steps."""
        op = self.take()
        if op is None:
            return None, None
        why = GradStreamer.usable(op, grads)
        if why is None and found_inf is not None:
            # GradScaler unscales here, or unscale_() did in place, which torch does not
            # count as a change of the gradient (nor do edits through .data)
            why = "GradScaler unscales the gradients after backward"
        if why is None and not skipped:
            result = finish(op)
            # A stream that keeps failing (a server without closing headers, an idle
            # deadline shorter than backward) stops overlap like any other fallback.
            self.note(None if result is not None else "the streamed push failed")
            return result, op.stream.header.push_id
        op.stream.cancel()
        if not skipped:  # an overflow now and then is no reason to stop overlapping
            self.note(why)
        return None, op.stream.header.push_id

    def note(self, fallback: str | None) -> None:
        """Record one step's outcome; turn overlap off after MAX_FALLBACKS in a row."""
        if fallback is None:
            self.fallbacks = 0
            self.streamed += 1
            return
        self.fallbacks += 1
        self.last_fallback = fallback
        if self.fallbacks >= MAX_FALLBACKS and self.enabled:
            self.enabled = False
            logger.warning(
                "RemoteAdam overlap is off from now on: %d steps in a row could not use the"
                " gradients streamed during backward (%s); pass overlap=False to silence this",
                self.fallbacks,
                fallback,
            )


def same_updates(
    a: Sequence[tuple[int, Mapping[str, Any]]],
    b: Sequence[tuple[int, Mapping[str, Any]]],
    same_value: Any,
) -> bool:
    if [i for i, _ in a] != [i for i, _ in b]:
        return False
    for (_, x), (_, y) in zip(a, b):
        if set(x) != set(y) or not all(same_value(x[k], y[k]) for k in x):
            return False
    return True


def finish_open(
    op: OpenPush,
    grads: Mapping[str, torch.Tensor],
    loss: float | None,
    updates: list[tuple[int, dict[str, Any]]],
    finish_push: Callable[..., PushResult | None],
) -> PushResult | None:
    """Send the gradients backward did not hand over, end the stream (with a closing header
    when the loss or the hyperparameter edits are not what the opening one said: Client's
    `finish_push`), and wait for the reply. None when the stream failed (the caller pushes again
    under the same id)."""
    for index, name in enumerate(op.names):
        if index not in op.queued:
            op.stream.send(Queued.of(index, grads[name]))
    amend = loss != op.loss or not same_updates(updates, op.updates, same_value)
    result = finish_push(op.stream, amend=amend, loss=loss, hyper_updates=updates)
    if result is None:
        logger.debug("model %s: the streamed push failed; pushing again", op.stream.header.model)
    return result
