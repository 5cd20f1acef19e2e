"""The gRPC adapter (grpc.aio): decodes frames, calls the data plane and the operations layer,
encodes replies.

Waits hold no thread. Handlers are coroutines on one event loop: a sync worker waiting for its
round awaits the push's future, a pull waiting for a version awaits another, and a slow or stalled
stream is a suspended coroutine, ended by the idle deadline. Work that computes or takes a model
lock (checks, steps, copies, snapshots) runs on the data plane's worker threads (`--grpc-workers`),
never on the loop, so one model's step does not stall another model's pull.

Tensor-carrying methods take and return raw frame bytes (adamd.protocol.frames), so chunks are
written straight into preallocated tensors; unary methods use the generated protobuf classes.
Every ServerError becomes `context.abort(code, message)` with its kind in the trailing metadata.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import grpc
import grpc.aio
import torch

from adamd.protocol import ProtocolError
from adamd.protocol.frames import (
    Frame,
    TensorSink,
    decode_frame,
    identity,
    iter_frames,
    spec_of,
    to_wire,
)
from adamd.server.auth import Caller
from adamd.server.dataplane import DataPlane
from adamd.server.errors import (
    DeadlineExceeded,
    InvalidArgument,
    LimitExceeded,
    ServerError,
    as_server_error,
)
from adamd.server.transport import messages
from adamd.server.transport.messages import parse_request
from adamd.v1 import adamd_pb2 as pb

SERVICE = "adamd.v1.Optimizer"
T = TypeVar("T")
OnCall = Callable[[str, str, float, int, int], None]  # method, outcome, seconds, bytes in, out


class _Stream:
    """A request stream of raw frames: counts bytes, and ends a stream that goes quiet."""

    def __init__(self, frames: AsyncIterator[bytes], idle_s: float, max_bytes: int):
        self._frames = frames
        self._it: AsyncIterator[bytes] | None = None  # made on first read: an unread stream
        self._idle_s = idle_s  # (a call refused up front) leaves no generator behind
        self._max_bytes = max_bytes
        self.nbytes = 0

    async def next_frame(self) -> Frame | None:
        if self._it is None:
            self._it = self._frames.__aiter__()
        try:
            raw = await asyncio.wait_for(self._it.__anext__(), self._idle_s)
        except StopAsyncIteration:
            return None
        except asyncio.TimeoutError:
            raise DeadlineExceeded(
                f"no frame for {self._idle_s:g}s: the stream was closed (server --stream-idle-s)"
            ) from None
        self.nbytes += len(raw)
        if self.nbytes > self._max_bytes:
            raise LimitExceeded(
                f"the request stream passed {self._max_bytes} bytes (server --max-stream-bytes)"
            )
        try:
            return decode_frame(raw)
        except ProtocolError as exc:
            raise InvalidArgument(str(exc)) from exc

    async def header(self, header_cls: Any) -> tuple[Any, Frame]:
        first = await self.next_frame()
        if first is None:
            raise InvalidArgument("empty stream: the first frame must carry a header")
        if first.header is None:
            raise InvalidArgument("the first frame of a stream must carry a header")
        try:
            return header_cls.FromString(bytes(first.header)), first
        except Exception as exc:
            raise InvalidArgument(f"unreadable header: {exc}") from exc

    async def receive(
        self, sink: TensorSink | None, first: Frame, closing: bool = False
    ) -> memoryview | None:
        """Write the first frame's chunk and every later one into `sink` (None: drain).

        With `closing` (pushes), the stream's last frame may carry a second header, a closing
        one, which is returned (None when there was none)."""
        frame: Frame | None = first
        trailer = None
        try:
            while frame is not None:
                if trailer is not None:
                    raise ProtocolError("a closing header must be on the stream's last frame")
                if frame is not first and frame.header is not None:
                    if not closing:
                        raise ProtocolError("only the first frame of a stream may carry a header")
                    trailer = frame.header
                if sink is not None and frame.data.nbytes:
                    sink.write(frame.tensor, frame.offset, frame.data)
                frame = await self.next_frame()
            if sink is not None:
                sink.check_complete()
        except ProtocolError as exc:
            raise InvalidArgument(str(exc)) from exc
        return trailer


class OptimizerService:
    def __init__(self, plane: DataPlane, *, on_call: OnCall | None = None):
        self.plane = plane
        self.ops = plane.ops
        self.on_call = on_call
        # The bulk-data channel's tickets (transport/bulk/connections.py: BulkServer.open), when on.
        self.bulk_tickets: Callable[[Caller], pb.OpenBulkReply] | None = None

    def cut(self) -> None:
        """End, with UNAVAILABLE, the waits of calls still in flight (on the server's loop)."""
        self.plane.cut()

    # --- plumbing -------------------------------------------------------------------------------

    @staticmethod
    def _caller(context: grpc.aio.ServicerContext) -> Caller:
        """The call's credentials: its bearer token, its client certificate's CN and SANs."""
        sent = None
        for key, value in context.invocation_metadata() or ():
            if key == "authorization":
                sent = value if isinstance(value, str) else value.decode()
        auth = context.auth_context() or {}
        names = [
            *auth.get("x509_common_name", ()),
            *auth.get("x509_subject_alternative_name", ()),
        ]
        identities = tuple(n.decode() if isinstance(n, bytes) else str(n) for n in names)
        return Caller.of(sent, identities)

    def _guard(self, context: grpc.aio.ServicerContext, action: str, model: str) -> Any:
        """Operations.guard for this call's caller (a context manager)."""
        return self.ops.guard(self._caller(context), action, model)

    async def _abort(self, context: grpc.aio.ServicerContext, exc: BaseException) -> str:
        """Answer the call with `exc` (anything not ours is INTERNAL); returns its kind."""
        err = as_server_error(exc, "gRPC call")
        context.set_trailing_metadata((("adamd-error", err.kind),))
        await context.abort(err.code, _clip(str(err)))
        return err.kind  # not reached: abort raises

    def handler(self) -> grpc.GenericRpcHandler:
        def unary(fn: Callable[..., Awaitable[Any]], req_cls: Any) -> grpc.RpcMethodHandler:
            # Requests arrive as bytes and are parsed in the handler: bytes that are not the
            # message are the caller's fault (INVALID_ARGUMENT), not a deserializer failure.
            return grpc.unary_unary_rpc_method_handler(
                self._unary(fn, req_cls), identity, lambda m: m.SerializeToString()
            )

        def stream_in(fn: Callable[..., Awaitable[Any]]) -> grpc.RpcMethodHandler:
            return grpc.stream_unary_rpc_method_handler(
                self._stream_in(fn), identity, lambda m: m.SerializeToString()
            )

        def stream_out(fn: Callable[..., AsyncIterator[bytes]], req_cls: Any) -> Any:
            return grpc.unary_stream_rpc_method_handler(
                self._stream_out(fn, req_cls), identity, identity
            )

        return grpc.method_handlers_generic_handler(
            SERVICE,
            {
                "CreateModel": stream_in(self.create_model),
                "PushGrad": stream_in(self.push_grad),
                "PullParams": stream_out(self.pull_params, pb.PullRequest),
                "GetState": stream_out(self.get_state, pb.GetStateRequest),
                "LoadState": stream_in(self.load_state),
                "AddParamGroup": stream_in(self.add_param_group),
                "SetHyperparams": unary(self.set_hyperparams, pb.SetHyperparamsRequest),
                "DescribeModel": unary(self.describe_model, pb.ModelRef),
                "ListModels": unary(self.list_models, pb.ListModelsRequest),
                "DeleteModel": unary(self.delete_model, pb.ModelRef),
                "Snapshot": unary(self.snapshot, pb.ModelRef),
                "Attach": unary(self.attach, pb.AttachRequest),
                "Detach": unary(self.detach, pb.DetachRequest),
                "Join": unary(self.join, pb.JoinRequest),
                "Leave": unary(self.leave, pb.LeaveRequest),
                "OpenBulk": unary(self.open_bulk, pb.OpenBulkRequest),
            },
        )

    def _record(
        self, fn: Callable[..., Any], outcome: str, t0: float, n_in: int, n_out: int
    ) -> None:
        if self.on_call is not None:
            self.on_call(_method(fn), outcome, time.perf_counter() - t0, n_in, n_out)

    def _unary(
        self, fn: Callable[..., Awaitable[Any]], req_cls: Any
    ) -> Callable[..., Awaitable[Any]]:
        return self._one_reply(
            fn, lambda raw: (lambda: parse_request(req_cls, raw), lambda: len(raw))
        )

    def _stream_in(self, fn: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
        def open_stream(
            frames: AsyncIterator[bytes],
        ) -> tuple[Callable[[], Any], Callable[[], int]]:
            stream = _Stream(frames, self.plane.idle_s, self.plane.limits.stream_bytes)
            return (lambda: stream), (lambda: stream.nbytes)

        return self._one_reply(fn, open_stream)

    def _one_reply(
        self,
        fn: Callable[..., Awaitable[Any]],
        prepare: Callable[[Any], tuple[Callable[[], Any], Callable[[], int]]],
    ) -> Callable[..., Awaitable[Any]]:
        """A call with one reply: authorize, run `fn` on the request `prepare` makes of what
        arrived (parsed inside the error path, so bad bytes answer INVALID_ARGUMENT), answer
        errors with their status, record the call."""

        @functools.wraps(fn)
        async def call(incoming: Any, context: grpc.aio.ServicerContext) -> Any:
            t0, outcome, n_out = time.perf_counter(), "OK", 0
            request, bytes_in = prepare(incoming)
            try:
                self.ops.admit(self._caller(context), _method(fn))
                reply = await fn(request(), context)
                n_out = reply.ByteSize()
                return reply
            except Exception as exc:
                outcome = _kind(exc)
                await self._abort(context, exc)
            finally:
                self._record(fn, outcome, t0, bytes_in(), n_out)

        return call

    def _stream_out(
        self, fn: Callable[..., AsyncIterator[bytes]], req_cls: Any
    ) -> Callable[..., Awaitable[None]]:
        # A coroutine writing each frame (not an async generator yielding it), so that a client
        # that stops reading is ended by the idle deadline: a yield cannot be timed out, and a
        # pull's copies (and its share of the transfer budget) would stay held for as long as
        # the client keeps the connection open.
        @functools.wraps(fn)
        async def call(raw: bytes, context: grpc.aio.ServicerContext) -> None:
            t0, outcome, sent = time.perf_counter(), "OK", 0
            frames: AsyncIterator[bytes] | None = None
            try:
                self.ops.admit(self._caller(context), _method(fn))
                frames = fn(parse_request(req_cls, raw), context)
                async for frame in frames:
                    await self._write(context, frame)
                    sent += len(frame)
            except Exception as exc:
                outcome = _kind(exc)
                # The reply's cleanup first (its budget released): the status of a call whose
                # reader stopped reading is only sent once it reads again (or goes away).
                if frames is not None:
                    await frames.aclose()  # type: ignore[attr-defined]
                await self._abort(context, exc)
            finally:
                if frames is not None:  # also when grpc cancelled the call
                    await frames.aclose()  # type: ignore[attr-defined]
                self._record(fn, outcome, t0, len(raw), sent)

        return call

    async def _write(self, context: grpc.aio.ServicerContext, frame: bytes) -> None:
        # Not asyncio.wait_for: a write blocked by flow control does not end when cancelled,
        # and wait_for would wait for it. Past the deadline the call is answered and ended
        # without waiting (grpc then drops the write with the call).
        write = asyncio.ensure_future(context.write(frame))
        done, _ = await asyncio.wait({write}, timeout=self.plane.idle_s)
        if write in done:
            write.result()
        else:
            write.cancel()
            raise DeadlineExceeded(
                f"the client read nothing for {self.plane.idle_s:g}s: the reply was ended"
                " (server --stream-idle-s)"
            ) from None

    # --- models ---------------------------------------------------------------------------------

    async def create_model(self, stream: _Stream, context: Any) -> pb.ModelInfo:
        cfg, first = await stream.header(pb.ModelConfig)
        spec = messages.model_spec_from_pb(cfg)
        with self._guard(context, "CreateModel", spec.name):
            self.plane.check_create(spec)
            pending = await self.plane.run(self.ops.begin_create, spec)
            await stream.receive(pending.sink if pending.existing is None else None, first)
            model, created = await self.plane.run(self.ops.commit_create, pending)
        return messages.model_info(model, created=created)

    async def describe_model(self, request: pb.ModelRef, context: Any) -> pb.ModelInfo:
        with self._guard(context, "DescribeModel", request.model):
            return messages.model_info(self.ops.model(request.model))

    async def list_models(self, request: pb.ListModelsRequest, context: Any) -> pb.ListModelsReply:
        models = self.ops.readable(self._caller(context), "ListModels")
        return pb.ListModelsReply(models=[messages.model_info(m) for m in models])

    async def delete_model(self, request: pb.ModelRef, context: Any) -> pb.DeleteReply:
        with self._guard(context, "DeleteModel", request.model):
            await self.plane.run(self.ops.delete, request.model)
        return pb.DeleteReply(deleted=True)

    async def set_hyperparams(
        self, request: pb.SetHyperparamsRequest, context: Any
    ) -> pb.ModelInfo:
        updates = messages.updates_from_pb(request.updates)
        with self._guard(context, "SetHyperparams", request.model):
            model = await self.plane.run(self.ops.set_hyperparams, request.model, updates)
        return messages.model_info(model)

    async def add_param_group(self, stream: _Stream, context: Any) -> pb.ModelInfo:
        header, first = await stream.header(pb.GroupHeader)
        with self._guard(context, "AddParamGroup", header.model):
            specs = messages.specs_from_pb(header.params)
            group = messages.group_from_pb(header.group)
            tensors = await self.plane.run(self.ops.new_group_tensors, header.model, specs, group)
            sink = TensorSink(list(tensors.values()), [d for _, _, d in specs])
            await stream.receive(sink, first)
            model = await self.plane.run(
                self.ops.add_param_group, header.model, tensors, group, header.layout
            )
        return messages.model_info(model)

    # --- pushes and pulls -----------------------------------------------------------------------

    async def push_grad(self, stream: _Stream, context: Any) -> pb.PushReply:
        header, first = await stream.header(pb.PushHeader)
        self.ops.check(self._caller(context), "PushGrad", header.model)  # before its bytes

        async def receive(sink: TensorSink | None) -> Any:
            closing = await stream.receive(sink, first, closing=True)
            return messages.closing_meta(closing)

        result = await self.plane.push(
            header.model,
            messages.push_meta_from_pb(header),
            messages.specs_from_pb(header.grads),
            receive,
            session=header.session,
        )
        return messages.push_reply(result)

    async def pull_params(self, request: pb.PullRequest, context: Any) -> AsyncIterator[bytes]:
        self.ops.check(self._caller(context), "PullParams", request.model)
        async with self.plane.pull(messages.pull_ask_from_pb(request)) as plan:
            if plan.tensors is None:
                header = pb.PullHeader(version=plan.version, not_modified=True)
                yield pb.PullFrame(header=header).SerializeToString()
                return
            header = pb.PullHeader(
                version=plan.version,
                tensors=[spec_of(n, t, w) for n, t, w in zip(plan.names, plan.tensors, plan.wires)],
            )
            for frame in iter_frames(
                header.SerializeToString(), plan.tensors, plan.chunk, plan.wires
            ):
                yield frame
            consistent = plan.consistent()
            context.set_trailing_metadata((("adamd-consistent", "1" if consistent else "0"),))

    # --- optimizer state ------------------------------------------------------------------------

    async def get_state(self, request: pb.GetStateRequest, context: Any) -> AsyncIterator[bytes]:
        self.ops.check(self._caller(context), "GetState", request.model)
        async with self.plane.state(request.model) as (model, state, groups, version):
            tensors: list[torch.Tensor] = []
            specs: list[pb.TensorSpec] = []
            entries = []
            for name, entry in state.items():
                index = {}
                for key, t in entry.items():
                    index[key] = len(tensors)
                    t = to_wire(t)
                    tensors.append(t)
                    specs.append(spec_of(f"{name}/{key}", t))
                entries.append(pb.ParamState(param=name, tensors=index))
            header = pb.StateHeader(
                model=model.name,
                version=version,
                states=entries,
                tensors=specs,
                groups=[
                    messages.group_to_pb(g["params"], {k: v for k, v in g.items() if k != "params"})
                    for g in groups
                ],
            )
            chunk = self.plane.chunk_bytes
            for frame in iter_frames(header.SerializeToString(), tensors, chunk):
                yield frame

    async def load_state(self, stream: _Stream, context: Any) -> pb.ModelInfo:
        header, first = await stream.header(pb.StateHeader)
        with self._guard(context, "LoadState", header.model):
            self.ops.model(header.model)  # NotFound before any bytes are taken
            specs = messages.specs_from_pb(header.tensors)
            entries = {e.param: dict(e.tensors) for e in header.states}
            # Checked against the model before anything is allocated (Operations.new_state_tensors).
            tensors = await self.plane.run(self.ops.new_state_tensors, header.model, specs, entries)
            await stream.receive(TensorSink(tensors, [d for _, _, d in specs]), first)
            state = {p: {k: tensors[i] for k, i in index.items()} for p, index in entries.items()}
            groups = [messages.group_from_pb(g) for g in header.groups] or None
            model = await self.plane.run(self.ops.load_state, header.model, state, groups)
        return messages.model_info(model)

    # --- durability and same-host fast path -----------------------------------------------------

    async def snapshot(self, request: pb.ModelRef, context: Any) -> pb.SnapshotInfo:
        with self._guard(context, "Snapshot", request.model):
            return await self.plane.run(self.ops.snapshot, request.model)

    async def attach(self, request: pb.AttachRequest, context: Any) -> pb.AttachReply:
        with self._guard(context, "Attach", request.model):
            return await self.plane.run(self.ops.attach, request)

    async def join(self, request: pb.JoinRequest, context: Any) -> pb.JoinReply:
        rank = request.rank if request.HasField("rank") else None
        with self._guard(context, "Join", request.model):
            self.plane.check_join(request.model, rank)
            model, rank = await self.plane.run(self.ops.join, request.model, rank)
        return pb.JoinReply(rank=rank, lease_s=model.lease_s, version=model.version)

    async def leave(self, request: pb.LeaveRequest, context: Any) -> pb.LeaveReply:
        with self._guard(context, "Leave", request.model):
            left = await self.plane.run(self.ops.leave, request.model, request.rank)
        return pb.LeaveReply(left=left)

    async def detach(self, request: pb.DetachRequest, context: Any) -> pb.DetachReply:
        with self._guard(context, "Detach", request.model):
            return await self.plane.run(self.ops.detach, request)

    async def open_bulk(self, request: pb.OpenBulkRequest, context: Any) -> pb.OpenBulkReply:
        if self.bulk_tickets is None:
            return pb.OpenBulkReply(accepted=False, reason="the bulk-data channel is off")
        return self.bulk_tickets(self._caller(context))  # each request on it is checked


def _clip(message: str, limit: int = 2000) -> str:
    """Status details travel in a header, and clients refuse headers over 8 KiB (RESOURCE_EXHAUSTED
    instead of the error): a message quoting a 100 kB name is cut short."""
    if len(message) <= limit:
        return message
    return f"{message[: limit - 40]}... ({len(message)} characters in all)"


def _method(fn: Callable[..., Any]) -> str:
    return fn.__name__.title().replace("_", "")  # push_grad -> PushGrad


def _kind(exc: BaseException) -> str:
    if isinstance(exc, ServerError):
        return exc.kind
    if isinstance(exc, ProtocolError):
        return "InvalidArgument"
    return "internal"
