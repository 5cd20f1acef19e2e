"""The gRPC adapter (grpc.aio): decodes frames, calls the operations layer, encodes replies.

Waits hold no thread. Handlers are coroutines on one event loop: a sync worker waiting for its
round awaits the push's future, a pull waiting for a version awaits another, and a slow or stalled
stream is a suspended coroutine, ended by the idle deadline. Work that computes or takes a model
lock (checks, steps, copies, snapshots) runs on a small thread pool (`--grpc-workers`), never on
the loop, so one model's step does not stall another model's pull.

Tensor-carrying methods take and return raw frame bytes (adamd.protocol.frames), so chunks are
written straight into preallocated tensors; unary methods use the generated protobuf classes.
Every ServerError becomes `context.abort(code, message)` with its kind in the trailing metadata.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import logging
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import Executor, ThreadPoolExecutor
from typing import Any, TypeVar

import grpc
import grpc.aio
import torch

from adamd.protocol import ProtocolError
from adamd.protocol.frames import (
    DEFAULT_CHUNK_BYTES,
    FRAME_HEADROOM,
    Frame,
    TensorSink,
    decode_frame,
    dtype_from_pb,
    identity,
    iter_frames,
    reply_chunk_bytes,
    spec_of,
    to_wire,
    wire_dtype_of,
)
from adamd.server.core.budget import TransferBudget
from adamd.server.core.limits import Limits
from adamd.server.core.model import HostedModel, PendingPush
from adamd.server.core.rounds import SYNC
from adamd.server.core.staging import ALIGN
from adamd.server.errors import (
    DeadlineExceeded,
    InvalidArgument,
    LimitExceeded,
    NotFound,
    ServerError,
    Unavailable,
)
from adamd.server.operations import Operations
from adamd.server.transport import grpc_convert as convert
from adamd.v1 import adamd_pb2 as pb

logger = logging.getLogger(__name__)

SERVICE = "adamd.v1.Optimizer"
DEFAULT_IDLE_S = 60.0
# Frames of one reply that grpc may hold at once, unsent or unread (the one being written and
# what the transport has taken beyond the client's flow-control window): a pull reserves these.
FRAMES_IN_FLIGHT = 3
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


@dataclasses.dataclass
class PullPlan:
    model: HostedModel
    names: list[str]
    tensors: list[torch.Tensor] | None  # None: not modified since the client's version
    wire: torch.dtype | None
    chunk: int  # bytes per frame where tensors are cut into chunks
    seq: int
    version: int

    def consistent(self) -> bool:
        """No step ran since the parameters were read (on the CPU they are sent as they are)."""
        return self.model.read_consistent(self.seq)


class OptimizerService:
    def __init__(
        self,
        ops: Operations,
        *,
        executor: Executor | None = None,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
        idle_s: float = DEFAULT_IDLE_S,
        on_call: OnCall | None = None,
        limits: Limits | None = None,
        budget: TransferBudget | None = None,
    ):
        self.ops = ops
        # Host memory of transfers in flight (server/core/budget.py); None here: counted, unbounded.
        self.budget = budget or TransferBudget(None)
        self.limits = limits or ops.limits
        self.executor = executor or ThreadPoolExecutor(4, thread_name_prefix="adamd-work")
        self.chunk_bytes = chunk_bytes
        self.idle_s = idle_s
        self.on_call = on_call
        # Set when the server stops and its grace period is nearly over: pushes and long-polls
        # still waiting answer UNAVAILABLE themselves (retried by clients) instead of being
        # cancelled by grpc, whose status for a cancelled call differs across versions.
        self._cut = asyncio.Event()
        # The bulk-data channel's tickets (server/transport/bulk.py: BulkServer.open), when it is on.
        self.bulk_tickets: Callable[[], pb.OpenBulkReply] | None = None

    def cut(self) -> None:
        """End, with UNAVAILABLE, the waits of calls still in flight (on the server's loop)."""
        self._cut.set()

    async def _until_cut(self, work: Awaitable[T]) -> T:
        """`work`, unless the server cuts in-flight calls first (then Unavailable; `work` is
        cancelled, so a push's cleanup runs: all or nothing)."""
        task = asyncio.ensure_future(work)
        cut = asyncio.ensure_future(self._cut.wait())
        try:
            await asyncio.wait({task, cut}, return_when=asyncio.FIRST_COMPLETED)
        finally:  # also when grpc cancels this call: never leave `work` running behind it
            cut.cancel()
            if not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        if task.cancelled():
            raise Unavailable("the server is stopping (SIGTERM); retry against its restart")
        return task.result()

    # --- plumbing -------------------------------------------------------------------------------

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        """Run blocking work (torch, model locks, files) on the worker threads."""
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)

    def _authorize(self, context: grpc.aio.ServicerContext) -> None:
        sent = None
        for key, value in context.invocation_metadata() or ():
            if key == "authorization":
                sent = value if isinstance(value, str) else value.decode()
        self.ops.authorize(sent)

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
            method = fn.__name__.title().replace("_", "")  # push_grad -> PushGrad
            self.on_call(method, outcome, time.perf_counter() - t0, n_in, n_out)

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
            stream = _Stream(frames, self.idle_s, self.limits.stream_bytes)
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
                self._authorize(context)
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
                self._authorize(context)
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
        done, _ = await asyncio.wait({write}, timeout=self.idle_s)
        if write in done:
            write.result()
        else:
            write.cancel()
            raise DeadlineExceeded(
                f"the client read nothing for {self.idle_s:g}s: the reply was ended"
                " (server --stream-idle-s)"
            ) from None

    # --- models ---------------------------------------------------------------------------------

    async def create_model(self, stream: _Stream, context: Any) -> pb.ModelInfo:
        cfg, first = await stream.header(pb.ModelConfig)
        spec = convert.model_spec_from_pb(cfg)
        if spec.mode == SYNC and not spec.elastic:
            sizes = (math.prod(shape) * dtype.itemsize for _, shape, dtype in spec.params)
            self._check_round(spec.world_size, _staging_bytes(sizes))
        pending = await self._run(self.ops.begin_create, spec)
        await stream.receive(pending.sink if pending.existing is None else None, first)
        model, created = await self._run(self.ops.commit_create, pending)
        return convert.model_info(model, created=created)

    async def describe_model(self, request: pb.ModelRef, context: Any) -> pb.ModelInfo:
        return convert.model_info(self.ops.model(request.model))

    async def list_models(self, request: pb.ListModelsRequest, context: Any) -> pb.ListModelsReply:
        return pb.ListModelsReply(models=[convert.model_info(m) for m in self.ops.models()])

    async def delete_model(self, request: pb.ModelRef, context: Any) -> pb.DeleteReply:
        await self._run(self.ops.delete, request.model)
        return pb.DeleteReply(deleted=True)

    async def set_hyperparams(
        self, request: pb.SetHyperparamsRequest, context: Any
    ) -> pb.ModelInfo:
        updates = convert.updates_from_pb(request.updates)
        model = await self._run(self.ops.set_hyperparams, request.model, updates)
        return convert.model_info(model)

    async def add_param_group(self, stream: _Stream, context: Any) -> pb.ModelInfo:
        header, first = await stream.header(pb.GroupHeader)
        specs = convert.specs_from_pb(header.params)
        group = convert.group_from_pb(header.group)
        tensors = await self._run(self.ops.new_group_tensors, header.model, specs, group)
        await stream.receive(TensorSink(list(tensors.values()), [d for _, _, d in specs]), first)
        model = await self._run(
            self.ops.add_param_group, header.model, tensors, group, header.layout
        )
        return convert.model_info(model)

    # --- pushes and pulls -----------------------------------------------------------------------

    async def push_grad(self, stream: _Stream, context: Any) -> pb.PushReply:
        header, first = await stream.header(pb.PushHeader)
        return await self.push(header, lambda sink: stream.receive(sink, first, closing=True))

    async def push(
        self,
        header: pb.PushHeader,
        receive: Callable[[TensorSink | None], Awaitable[bytes | memoryview | None]],
        on_stepped: Callable[[list[str]], None] | None = None,
    ) -> pb.PushReply:
        """One push, whatever carries it: `receive(sink)` writes the gradient's bytes into `sink`
        (None: drains them) and returns the closing header, if one came (gRPC: the stream's last
        frame; the bulk channel: its END frame). `on_stepped`: see PushTicket.on_stepped."""
        meta = convert.push_meta_from_pb(header)
        specs = convert.specs_from_pb(header.grads)
        # Its staging buffer (a whole gradient set), held until the step used it. Same-host
        # pushes write into their session's file instead; an unknown model is refused below.
        known = None if header.session else self._find(header.model)
        held = self._staging_of(known) if known is not None else 0
        if held:
            await self._until_cut(self.budget.reserve("the push", held, self.idle_s))
        try:
            model, ticket = await self._run(
                self.ops.begin_push, header.model, meta, specs, header.session
            )
            if ticket.grads is None:  # a duplicate or a retry joining its first copy
                self.budget.release(held)
                held = 0
            ticket.on_stepped = on_stepped
            try:
                closing = await self._until_cut(receive(ticket.sink))
                if closing is not None:
                    amend = convert.push_meta_from_pb(parse_request(pb.PushHeader, bytes(closing)))
                    await self._run(self.ops.amend_push, model, ticket, amend)
            except BaseException:
                await self._run(model.abort_push, ticket)
                raise
            pending = await self._run(model.finish_push, ticket)
            # Cut while waiting: a sync round that will not complete (its other ranks are
            # refused now). If it does step after all, the push id is in the ledger the final
            # snapshot keeps, and the client's retry is answered as a duplicate: exactly once.
            result = await self._until_cut(self._outcome(pending))
        finally:
            if held:
                self.budget.release(held)
        await self._run(self.ops.pushed, model)
        return convert.push_reply(result)

    async def _outcome(self, pending: PendingPush) -> Any:
        """Await a push's outcome; past the round's deadline, step with the ranks there are."""
        outcome = asyncio.wrap_future(pending.outcome)
        deadline = pending.deadline
        while True:
            timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                return await asyncio.wait_for(asyncio.shield(outcome), timeout)
            except asyncio.TimeoutError:
                # Elastic: a missing worker's lease is still good; wait until it lapses.
                deadline = await self._run(pending.expire) or deadline

    async def pull_params(self, request: pb.PullRequest, context: Any) -> AsyncIterator[bytes]:
        async with self.pull(request) as plan:
            if plan.tensors is None:
                header = pb.PullHeader(version=plan.version, not_modified=True)
                yield pb.PullFrame(header=header).SerializeToString()
                return
            header = pb.PullHeader(
                version=plan.version,
                tensors=[spec_of(n, t, plan.wire) for n, t in zip(plan.names, plan.tensors)],
            )
            for frame in iter_frames(
                header.SerializeToString(), plan.tensors, plan.chunk, plan.wire
            ):
                yield frame
            consistent = plan.consistent()
            context.set_trailing_metadata((("adamd-consistent", "1" if consistent else "0"),))

    def check_pull(
        self, request: pb.PullRequest
    ) -> tuple[HostedModel, list[str], torch.dtype | None]:
        """A pull request's model, parameter names and wire dtype, or the error it gets."""
        model = self.ops.model(request.model)
        names = list(request.names) or list(model.params)
        missing = [n for n in names if n not in model.params]
        if missing:
            raise InvalidArgument(f"model {model.name!r} has no parameters {missing}")
        try:
            wire = dtype_from_pb(request.wire_dtype) if request.wire_dtype else None
        except ProtocolError as exc:
            raise InvalidArgument(f"wire_dtype: {exc}") from exc
        if wire is not None and not wire.is_floating_point:
            raise InvalidArgument("wire_dtype must be a float dtype")
        return model, names, wire

    @contextlib.asynccontextmanager
    async def pull(self, request: pb.PullRequest, reserve: bool = True) -> AsyncIterator[PullPlan]:
        """What a pull sends, whatever carries it: checks the request, waits for the version
        asked, reserves the pull's transfer memory (given back on leaving the block; `reserve`
        False: the caller sends from the parameters' own memory and buffers of its own) and
        reads the parameters (under the seqlock: `plan.consistent()` after sending says whether
        a step ran meanwhile). `plan.tensors` is None when the client's copy is current."""
        model, names, wire = self.check_pull(request)
        if request.HasField("wait_for_version"):
            await self._until_cut(
                self._wait_for_version(model, request.wait_for_version, request.wait_timeout_s)
            )
        seq, version = await self._run(model.read_begin)
        chunk = reply_chunk_bytes(request.chunk_bytes, self.chunk_bytes)
        if request.HasField("if_newer_than") and version <= request.if_newer_than:
            yield PullPlan(model, names, None, wire, chunk, seq, version)
            return
        held = self._pull_bytes(model, names, wire, chunk) if reserve else 0
        if held and await self._until_cut(self.budget.reserve("the pull", held, self.idle_s)):
            seq, version = await self._run(model.read_begin)  # waited: read what is there now
        try:
            tensors = await self._run(model.host_copies, names, wire)
            yield PullPlan(model, names, tensors, wire, chunk, seq, version)
        finally:  # also when the client went away or stopped reading (the idle deadline)
            tensors = []
            self.budget.release(held)

    async def _wait_for_version(self, model: Any, version: int, timeout_s: float) -> None:
        if not math.isfinite(timeout_s) or timeout_s < 0:
            raise InvalidArgument(f"wait_timeout_s must be a finite number >= 0, got {timeout_s}")
        timeout = timeout_s or 60.0
        reached = await self._run(model.version_reached, version)
        try:
            await asyncio.wait_for(asyncio.wrap_future(reached), timeout)
        except asyncio.TimeoutError:
            raise DeadlineExceeded(
                f"model {model.name!r} did not reach version {version} within {timeout}s"
            ) from None

    # --- the transfer budget (server/core/budget.py) -------------------------------------------------

    def _find(self, name: str) -> HostedModel | None:
        try:
            return self.ops.model(name)
        except NotFound:
            return None

    def _frames_bytes(self, payload: int, chunk: int | None = None) -> int:
        """Reply frames grpc may hold at once for a reply of `payload` bytes in `chunk`-byte
        frames (default: the server's --chunk-bytes)."""
        frame = (chunk or self.chunk_bytes) + FRAME_HEADROOM
        return min(payload + FRAME_HEADROOM, FRAMES_IN_FLIGHT * frame)

    def _pull_bytes(
        self, model: HostedModel, names: list[str], wire: torch.dtype | None, chunk: int
    ) -> int:
        """Host memory a pull holds: copies of the parameters where they are made (CUDA, a
        non-contiguous tensor; on the CPU a narrower wire dtype is converted a chunk at a time
        into one reused buffer), and its frames in flight."""
        copies = payload = 0
        for name in names:
            p = model.params[name]
            dtype = wire_dtype_of(p.dtype, wire)
            nbytes = p.numel() * dtype.itemsize
            payload += nbytes
            if model.graphed is not None or p.device.type != "cpu" or not p.is_contiguous():
                copies += nbytes
        return copies + self._frames_bytes(payload, chunk)

    def _state_bytes(self, model: HostedModel) -> int:
        """GetState copies every state tensor (two per stepped parameter, three with amsgrad),
        and frames them. Worker thread: counted under the model lock."""
        with model.locked():
            state = sum(
                t.numel() * t.element_size()
                for entry in model.optimizer.state.values()
                for t in entry.values()
                if isinstance(t, torch.Tensor)
            )
        return state + self._frames_bytes(state)

    def _staging_of(self, model: HostedModel) -> int:
        return _staging_bytes(p.numel() * p.element_size() for p in model.params.values())

    def _check_round(self, world_size: int, staging: int) -> None:
        """A sync round of several ranks holds their staging buffers until the last one
        arrives: refuse a model whose round, plus one pull of it, cannot fit in the budget
        (its ranks would wait for bytes that only the round's step gives back)."""
        if world_size < 2:
            return  # one rank steps at once: its push never waits on another
        copies = staging if self.ops.registry.device.type != "cpu" else 0
        need = world_size * staging + copies + self._frames_bytes(staging)
        self.budget.check(
            f"a sync round of world_size {world_size} ({world_size} gradient buffers of"
            f" {staging} bytes, plus one pull)",
            need,
        )

    # --- optimizer state ------------------------------------------------------------------------

    async def get_state(self, request: pb.GetStateRequest, context: Any) -> AsyncIterator[bytes]:
        model = self.ops.model(request.model)
        held = await self._run(self._state_bytes, model)
        await self._until_cut(self.budget.reserve("GetState", held, self.idle_s))
        try:
            async for frame in self._state_frames(model):
                yield frame
        finally:
            self.budget.release(held)

    async def _state_frames(self, model: HostedModel) -> AsyncIterator[bytes]:
        state, groups, version = await self._run(model.state_by_name)
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
                convert.group_to_pb(g["params"], {k: v for k, v in g.items() if k != "params"})
                for g in groups
            ],
        )
        for frame in iter_frames(header.SerializeToString(), tensors, self.chunk_bytes):
            yield frame

    async def load_state(self, stream: _Stream, context: Any) -> pb.ModelInfo:
        header, first = await stream.header(pb.StateHeader)
        self.ops.model(header.model)  # NotFound before any bytes are taken
        specs = convert.specs_from_pb(header.tensors)
        entries = {e.param: dict(e.tensors) for e in header.states}
        # Checked against the model before anything is allocated (Operations.new_state_tensors).
        tensors = await self._run(self.ops.new_state_tensors, header.model, specs, entries)
        await stream.receive(TensorSink(tensors, [d for _, _, d in specs]), first)
        state = {p: {k: tensors[i] for k, i in index.items()} for p, index in entries.items()}
        groups = [convert.group_from_pb(g) for g in header.groups] or None
        model = await self._run(self.ops.load_state, header.model, state, groups)
        return convert.model_info(model)

    # --- durability and same-host fast path -----------------------------------------------------

    async def snapshot(self, request: pb.ModelRef, context: Any) -> pb.SnapshotInfo:
        return await self._run(self.ops.snapshot, request.model)

    async def attach(self, request: pb.AttachRequest, context: Any) -> pb.AttachReply:
        return await self._run(self.ops.attach, request)

    async def join(self, request: pb.JoinRequest, context: Any) -> pb.JoinReply:
        rank = request.rank if request.HasField("rank") else None
        known = self._find(request.model)
        if known is not None and known.elastic:
            members = known.rounds.members
            live = len(members.members) if members is not None else 0
            if rank is None or rank not in (members.members if members is not None else {}):
                live += 1
            self._check_round(live, self._staging_of(known))
        model, rank = await self._run(self.ops.join, request.model, rank)
        return pb.JoinReply(rank=rank, lease_s=model.lease_s, version=model.version)

    async def leave(self, request: pb.LeaveRequest, context: Any) -> pb.LeaveReply:
        left = await self._run(self.ops.leave, request.model, request.rank)
        return pb.LeaveReply(left=left)

    async def detach(self, request: pb.DetachRequest, context: Any) -> pb.DetachReply:
        return await self._run(self.ops.detach, request)

    async def open_bulk(self, request: pb.OpenBulkRequest, context: Any) -> pb.OpenBulkReply:
        if self.bulk_tickets is None:
            return pb.OpenBulkReply(accepted=False, reason="the bulk-data channel is off")
        return self.bulk_tickets()


def _staging_bytes(sizes: Any) -> int:
    """Bytes of one staging buffer (server/core/staging.py layout): each tensor 256-byte aligned."""
    return sum((n + ALIGN - 1) // ALIGN * ALIGN for n in sizes)


def _clip(message: str, limit: int = 2000) -> str:
    """Status details travel in a header, and clients refuse headers over 8 KiB (RESOURCE_EXHAUSTED
    instead of the error): a message quoting a 100 kB name is cut short."""
    if len(message) <= limit:
        return message
    return f"{message[: limit - 40]}... ({len(message)} characters in all)"


def parse_request(req_cls: Any, raw: bytes) -> Any:
    """`raw` as a `req_cls` message; bytes that are not one are the caller's INVALID_ARGUMENT."""
    try:
        return req_cls.FromString(raw)
    except Exception as exc:  # protobuf's DecodeError, or a RuntimeWarning-free ValueError
        raise InvalidArgument(
            f"the request is not a valid {req_cls.DESCRIPTOR.full_name}: {exc}"
        ) from None


def as_server_error(exc: BaseException, what: str) -> ServerError:
    """`exc` as a caller is answered: a ProtocolError is INVALID_ARGUMENT, anything that is not a
    ServerError is INTERNAL (and logged as `what` failing)."""
    if isinstance(exc, ProtocolError):
        return InvalidArgument(str(exc))
    if not isinstance(exc, ServerError):
        logger.error("%s failed", what, exc_info=exc)
        return ServerError(f"internal error: {type(exc).__name__}: {exc}")
    return exc


def _kind(exc: BaseException) -> str:
    if isinstance(exc, ServerError):
        return exc.kind
    if isinstance(exc, ProtocolError):
        return "InvalidArgument"
    return "internal"
