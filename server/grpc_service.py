"""The gRPC adapter: decodes frames, calls the core, encodes replies. No optimizer logic here.

Tensor-carrying methods take and return raw frame bytes (see adamd.protocol.frames) so chunks are
written straight into preallocated tensors; unary methods use the generated protobuf classes.
Every ServerError becomes `context.abort(code, message)` with its kind in the trailing metadata.
"""

from __future__ import annotations

import functools
import hmac
import logging
import time
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import torch

from adamd.protocol import ProtocolError
from adamd.protocol.frames import (
    DEFAULT_CHUNK_BYTES,
    TensorSink,
    decode_frame,
    dtype_from_pb,
    identity,
    iter_frames,
    spec_of,
    to_wire,
)
from adamd.v1 import adamd_pb2 as pb

from . import convert
from .errors import (
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    ServerError,
    SessionExpired,
    Unauthenticated,
)
from .model import PushMeta
from .registry import ModelRegistry

logger = logging.getLogger(__name__)

SERVICE = "adamd.v1.Optimizer"


class RpcHooks:
    """Optional collaborators the adapter reports to (metrics, snapshots, same-host sessions)."""

    def __init__(self) -> None:
        self.on_call: Callable[[str, str, float, int, int], None] | None = (
            None  # method, outcome, seconds, bytes in, bytes out
        )
        self.snapshot: Callable[[str], pb.SnapshotInfo] | None = None
        self.attach: Callable[[pb.AttachRequest], pb.AttachReply] | None = None
        self.detach: Callable[[pb.DetachRequest], pb.DetachReply] | None = None
        # same-host pushes: (model, session, names) -> the session's gradient tensors
        self.session_grads: Callable[[Any, str, list[str]], list[torch.Tensor]] | None = None
        # model; after a push or an edit (hyperparameters, param group, state) has taken effect,
        # before the reply (durable mode waits here until it is on disk)
        self.after_change: Callable[[str], None] | None = None

    def changed(self, model: str) -> None:
        if self.after_change is not None:
            self.after_change(model)


def _first(request_iterator: Iterator[bytes], header_cls: Any) -> tuple[Any, Any, Iterator[bytes]]:
    it = iter(request_iterator)
    try:
        frame = decode_frame(next(it))
    except StopIteration:
        raise InvalidArgument("empty stream: the first frame must carry a header") from None
    except ProtocolError as exc:
        raise InvalidArgument(str(exc)) from exc
    if frame.header is None:
        raise InvalidArgument("the first frame of a stream must carry a header")
    try:
        header = header_cls.FromString(bytes(frame.header))
    except Exception as exc:
        raise InvalidArgument(f"unreadable header: {exc}") from exc
    return header, frame, it


def _receive(sink: TensorSink | None, first: Any, rest: Iterator[bytes]) -> int:
    """Write the first frame's chunk and all following chunks into `sink` (None: drain)."""
    nbytes = first.data.nbytes
    try:
        if sink is not None and nbytes:
            sink.write(first.tensor, first.offset, first.data)
        for raw in rest:
            frame = decode_frame(raw)
            if frame.header is not None:
                raise ProtocolError("only the first frame of a stream may carry a header")
            nbytes += frame.data.nbytes
            if sink is not None:
                sink.write(frame.tensor, frame.offset, frame.data)
    except ProtocolError as exc:
        raise InvalidArgument(str(exc)) from exc
    return nbytes


def _counted(frames: Iterator[bytes], sizes: list[int]) -> Iterator[bytes]:
    """The request stream, adding each raw frame's length to sizes[0] (for metrics)."""
    for raw in frames:
        sizes[0] += len(raw)
        yield raw


class OptimizerService:
    def __init__(
        self,
        registry: ModelRegistry,
        *,
        token: str | None = None,
        hooks: RpcHooks | None = None,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    ):
        self.registry = registry
        self.token = token
        self.hooks = hooks or RpcHooks()
        self.chunk_bytes = chunk_bytes

    # --- plumbing -------------------------------------------------------------------------------

    def _check_token(self, context: grpc.ServicerContext) -> None:
        if self.token is None:
            return
        for key, value in context.invocation_metadata():
            if key == "authorization" and hmac.compare_digest(
                value.encode(), f"Bearer {self.token}".encode()
            ):
                return
        raise Unauthenticated(
            "missing or wrong token: send metadata 'authorization: Bearer <token>'"
        )

    def _abort(self, context: grpc.ServicerContext, exc: ServerError) -> None:
        context.set_trailing_metadata((("adamd-error", exc.kind),))
        context.abort(exc.code, str(exc))

    def handler(self) -> grpc.GenericRpcHandler:
        def unary(fn: Callable[..., Any], req_cls: Any) -> grpc.RpcMethodHandler:
            return grpc.unary_unary_rpc_method_handler(
                self._wrap(fn), req_cls.FromString, lambda m: m.SerializeToString()
            )

        def stream_in(fn: Callable[..., Any]) -> grpc.RpcMethodHandler:
            return grpc.stream_unary_rpc_method_handler(
                self._wrap(fn), identity, lambda m: m.SerializeToString()
            )

        def stream_out(fn: Callable[..., Any], req_cls: Any) -> grpc.RpcMethodHandler:
            return grpc.unary_stream_rpc_method_handler(
                self._wrap_stream(fn), req_cls.FromString, identity
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
            },
        )

    def _wrap(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        method = fn.__name__.title().replace("_", "")  # push_grad -> PushGrad

        @functools.wraps(fn)
        def call(request: Any, context: grpc.ServicerContext) -> Any:
            t0, outcome, sizes = time.perf_counter(), "OK", [0, 0]  # bytes in, out
            if self.hooks.on_call is not None and not hasattr(request, "ByteSize"):
                request = _counted(request, sizes)  # a stream of raw frames
            try:
                self._check_token(context)
                reply = fn(request, context)
                if self.hooks.on_call is not None:
                    sizes[0] += request.ByteSize() if hasattr(request, "ByteSize") else 0
                    sizes[1] = reply.ByteSize()
                return reply
            except (ServerError, ProtocolError) as exc:
                err = exc if isinstance(exc, ServerError) else InvalidArgument(str(exc))
                outcome = err.kind
                self._abort(context, err)
            except Exception as exc:
                outcome = "internal"
                logger.exception("%s failed", fn.__name__)
                self._abort(context, ServerError(f"internal error: {type(exc).__name__}: {exc}"))
            finally:
                if self.hooks.on_call is not None:
                    self.hooks.on_call(method, outcome, time.perf_counter() - t0, *sizes)

        return call

    def _wrap_stream(self, fn: Callable[..., Iterator[bytes]]) -> Callable[..., Iterator[bytes]]:
        method = fn.__name__.title().replace("_", "")

        @functools.wraps(fn)
        def call(request: Any, context: grpc.ServicerContext) -> Iterator[bytes]:
            t0, outcome, sent = time.perf_counter(), "OK", 0
            try:
                self._check_token(context)
                for frame in fn(request, context):
                    sent += len(frame)
                    yield frame
            except (ServerError, ProtocolError) as exc:
                err = exc if isinstance(exc, ServerError) else InvalidArgument(str(exc))
                outcome = err.kind
                self._abort(context, err)
            except Exception as exc:
                outcome = "internal"
                logger.exception("%s failed", fn.__name__)
                self._abort(context, ServerError(f"internal error: {type(exc).__name__}: {exc}"))
            finally:
                if self.hooks.on_call is not None:
                    self.hooks.on_call(
                        method, outcome, time.perf_counter() - t0, request.ByteSize(), sent
                    )

        return call

    # --- models ---------------------------------------------------------------------------------

    def create_model(
        self, request_iterator: Iterator[bytes], context: grpc.ServicerContext
    ) -> pb.ModelInfo:
        cfg, first, rest = _first(request_iterator, pb.ModelConfig)
        spec = convert.model_spec_from_pb(cfg)
        pending = self.registry.begin_create(spec)
        _receive(pending.sink if pending.existing is None else None, first, rest)
        model, created = self.registry.commit(pending)
        return convert.model_info(model, created=created)

    def describe_model(self, request: pb.ModelRef, context: grpc.ServicerContext) -> pb.ModelInfo:
        return convert.model_info(self.registry.get(request.model))

    def list_models(
        self, request: pb.ListModelsRequest, context: grpc.ServicerContext
    ) -> pb.ListModelsReply:
        return pb.ListModelsReply(models=[convert.model_info(m) for m in self.registry.models()])

    def delete_model(self, request: pb.ModelRef, context: grpc.ServicerContext) -> pb.DeleteReply:
        self.registry.delete(request.model)
        return pb.DeleteReply(deleted=True)

    def set_hyperparams(
        self, request: pb.SetHyperparamsRequest, context: grpc.ServicerContext
    ) -> pb.ModelInfo:
        model = self.registry.get(request.model)
        model.set_hyperparams(convert.updates_from_pb(request.updates))
        self.hooks.changed(model.name)
        return convert.model_info(model)

    def add_param_group(
        self, request_iterator: Iterator[bytes], context: grpc.ServicerContext
    ) -> pb.ModelInfo:
        header, first, rest = _first(request_iterator, pb.GroupHeader)
        model = self.registry.get(header.model)
        specs = convert.specs_from_pb(header.params)
        group = convert.group_from_pb(header.group)
        if sorted(group["params"]) != sorted(n for n, _, _ in specs):
            raise InvalidArgument(
                "the new group's params must be exactly the parameters sent with it"
            )
        if any(n in model.params for n, _, _ in specs):
            existing = [n for n, _, _ in specs if n in model.params]
            raise InvalidArgument(f"parameters {existing} exist already")
        tensors = {n: torch.empty(shape, dtype=dtype) for n, shape, dtype in specs}
        sink = TensorSink(list(tensors.values()), [d for _, _, d in specs])
        _receive(sink, first, rest)
        try:
            sink.check_complete()
        except ProtocolError as exc:
            raise InvalidArgument(str(exc)) from exc
        on_device = {n: t.to(model.device) for n, t in tensors.items()}
        model.add_param_group(on_device, group)
        self.hooks.changed(model.name)
        return convert.model_info(model)

    # --- pushes and pulls -----------------------------------------------------------------------

    def push_grad(
        self, request_iterator: Iterator[bytes], context: grpc.ServicerContext
    ) -> pb.PushReply:
        header, first, rest = _first(request_iterator, pb.PushHeader)
        model = self.registry.get(header.model)
        meta = PushMeta(
            rank=header.rank,
            version=header.version if header.HasField("version") else None,
            push_id=header.push_id,
            found_inf=header.found_inf,
            loss=header.loss if header.HasField("loss") else None,
            scalars=dict(header.scalars),
            hyper_updates=convert.updates_from_pb(header.hyper_updates),
        )
        buffers = None
        if header.session:
            session_grads = self.hooks.session_grads
            if session_grads is None:
                raise SessionExpired(
                    "same-host sessions are off on this server; push over the stream"
                )
            session = header.session
            buffers = lambda names: session_grads(model, session, names)
        ticket = model.begin_push(meta, convert.specs_from_pb(header.grads), buffers)
        try:
            _receive(ticket.sink, first, rest)
        except BaseException:
            model.abort_push(ticket)
            raise
        result = model.finish_push(ticket).wait()
        self.hooks.changed(model.name)
        return pb.PushReply(
            version=result.version,
            applied=result.applied,
            found_inf=result.found_inf,
            contributors=result.contributors,
            duplicate=result.duplicate,
            partial=result.partial,
        )

    def pull_params(
        self, request: pb.PullRequest, context: grpc.ServicerContext
    ) -> Iterator[bytes]:
        model = self.registry.get(request.model)
        if request.HasField("wait_for_version"):
            timeout = request.wait_timeout_s or 60.0
            if not model.wait_for_version(request.wait_for_version, timeout):
                raise DeadlineExceeded(
                    f"model {model.name!r} did not reach version {request.wait_for_version} within {timeout}s"
                )
        names = list(request.names) or list(model.params)
        missing = [n for n in names if n not in model.params]
        if missing:
            raise InvalidArgument(f"model {model.name!r} has no parameters {missing}")
        wire = dtype_from_pb(request.wire_dtype) if request.wire_dtype else None
        if wire is not None and not wire.is_floating_point:
            raise InvalidArgument("wire_dtype must be a float dtype")
        seq, version = model.read_begin()
        if request.HasField("if_newer_than") and version <= request.if_newer_than:
            yield pb.PullFrame(
                header=pb.PullHeader(version=version, not_modified=True)
            ).SerializeToString()
            return
        tensors = [to_wire(model.params[n], wire) for n in names]
        header = pb.PullHeader(
            version=version, tensors=[spec_of(n, t) for n, t in zip(names, tensors)]
        )
        yield from iter_frames(header.SerializeToString(), tensors, self.chunk_bytes)
        context.set_trailing_metadata(
            (("adamd-consistent", "1" if model.read_consistent(seq) else "0"),)
        )

    # --- optimizer state ------------------------------------------------------------------------

    def get_state(
        self, request: pb.GetStateRequest, context: grpc.ServicerContext
    ) -> Iterator[bytes]:
        model = self.registry.get(request.model)
        state, groups, version = model.state_by_name()
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
        yield from iter_frames(header.SerializeToString(), tensors, self.chunk_bytes)

    def load_state(
        self, request_iterator: Iterator[bytes], context: grpc.ServicerContext
    ) -> pb.ModelInfo:
        header, first, rest = _first(request_iterator, pb.StateHeader)
        model = self.registry.get(header.model)
        specs = convert.specs_from_pb(header.tensors)
        tensors = [torch.empty(shape, dtype=dtype) for _, shape, dtype in specs]
        sink = TensorSink(tensors, [d for _, _, d in specs])
        _receive(sink, first, rest)
        try:
            sink.check_complete()
        except ProtocolError as exc:
            raise InvalidArgument(str(exc)) from exc
        state = {}
        for entry in header.states:
            if any(i >= len(tensors) for i in entry.tensors.values()):
                raise InvalidArgument(f"state of {entry.param!r} points past the tensors sent")
            state[entry.param] = {k: tensors[i] for k, i in entry.tensors.items()}
        groups = [convert.group_from_pb(g) for g in header.groups] or None
        model.load_state(state, groups)
        self.hooks.changed(model.name)
        return convert.model_info(model)

    # --- durability and same-host fast path -----------------------------------------------------

    def snapshot(self, request: pb.ModelRef, context: grpc.ServicerContext) -> pb.SnapshotInfo:
        self.registry.get(request.model)
        if self.hooks.snapshot is None:
            raise FailedPrecondition("snapshots are not enabled on this server")
        return self.hooks.snapshot(request.model)

    def attach(self, request: pb.AttachRequest, context: grpc.ServicerContext) -> pb.AttachReply:
        self.registry.get(request.model)
        if self.hooks.attach is None:
            return pb.AttachReply(
                accepted=False, reason="the same-host fast path is off on this server"
            )
        return self.hooks.attach(request)

    def detach(self, request: pb.DetachRequest, context: grpc.ServicerContext) -> pb.DetachReply:
        if self.hooks.detach is None:
            return pb.DetachReply()
        return self.hooks.detach(request)
