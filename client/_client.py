"""`Client`: one connection to an adamd server and every call of its API.

Tensors stream as raw chunks (adamd.protocol.frames); calls that fail transiently (the server is
restarting, a connection dropped) are retried with backoff, pushes under the same push id so the
server applies them exactly once. Every failure surfaces as an adamd.client exception.
"""

from __future__ import annotations

import random
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, TypeVar

import grpc
import torch

from adamd.client._addresses import parse_servers
from adamd.client._compression import Compressor, Encoded
from adamd.client._compression import check_mode as check_compression
from adamd.client._exceptions import (
    AdamdError,
    InvalidArgument,
    SessionExpired,
    Unavailable,
    from_rpc_error,
    invalid_input,
)
from adamd.client._overlap import BulkStreamingPush, StreamingPush
from adamd.client._tls import TLSConfig, channel_credentials, socket_context
from adamd.client._transport.bulk import BulkChannel, Unreachable
from adamd.client._transport.shm import SameHostSession
from adamd.client._types import ModelInfo, PullResult, PushResult
from adamd.protocol import ProtocolError
from adamd.protocol.frames import (
    DEFAULT_CHUNK_BYTES,
    MAX_CHUNK_BYTES,
    MAX_MESSAGE_BYTES,
    TensorSink,
    decode_frame,
    dtype_from_pb,
    dtype_to_pb,
    identity,
    iter_frames,
    shape_of,
    spec_of,
    to_wire,
)
from adamd.protocol.hyper import options_from_pb, options_to_pb
from adamd.protocol.layout import DEFAULT_SLICE_BYTES
from adamd.protocol.pinned import Landing
from adamd.protocol.shared_files import host_id
from adamd.v1 import adamd_pb2 as pb

T = TypeVar("T")
_SERVICE = "/adamd.v1.Optimizer/"
_RETRYABLE = (grpc.StatusCode.UNAVAILABLE,)
# grpc's details for a call cancelled on this side (by the application, or because the request
# iterator raised): not transient.
_LOCAL_CANCEL = ("Locally cancelled", "Exception iterating requests", "Exception serializing")
_MODES = {"sync": pb.SYNC, "async": pb.ASYNC}
CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 2_000),
]


def _host_of(address: str) -> str:
    """The host part of "host:port" / "[v6]:port" ("" for other target forms: no bulk channel)."""
    if "://" in address or address.startswith(("unix:", "dns:", "ipv4:", "ipv6:")):
        return ""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        return ""
    return host[1:-1] if host.startswith("[") and host.endswith("]") else host


def _model_info(m: pb.ModelInfo) -> ModelInfo:
    return ModelInfo(
        name=m.model,
        version=m.version,
        mode="async" if m.mode == pb.ASYNC else "sync",
        world_size=m.world_size,
        device=m.device,
        params={s.name: (shape_of(s), dtype_from_pb(s.dtype)) for s in m.params},
        param_groups=[{**options_from_pb(g.options), "params": list(g.params)} for g in m.groups],
        max_staleness=m.max_staleness,
        round_timeout_s=m.round_timeout_s,
        created=m.created,
        skipped_steps=m.skipped_steps,
        elastic=m.elastic,
        lease_s=m.lease_s,
        layout=m.layout,
        master_dtype=dtype_from_pb(m.master_dtype) if m.master_dtype else None,
        worker_dtypes={s.name: dtype_from_pb(d) for s, d in zip(m.params, m.worker_dtypes)},
    )


def _group_pb(names: Sequence[str], options: Mapping[str, Any]) -> pb.ParamGroup:
    return pb.ParamGroup(params=list(names), options=options_to_pb(options))


def _transient(err: grpc.RpcError) -> grpc.StatusCode | None:
    """The call's status code, with a cancel by the server counted as UNAVAILABLE: a server that
    stops past its grace period cancels the calls still in flight (adamd answers UNAVAILABLE
    itself first, but work running on its threads at that moment cannot be cut short). Every
    call is safe to repeat (pushes by their id), so a training loop never sees a restart."""
    code = err.code() if hasattr(err, "code") else None
    if code == grpc.StatusCode.CANCELLED:
        details = (err.details() if hasattr(err, "details") else None) or ""
        if not any(mark in details for mark in _LOCAL_CANCEL):
            return grpc.StatusCode.UNAVAILABLE
    return code


def _push_header(
    model: str,
    specs: Sequence[pb.TensorSpec],
    *,
    rank: int = 0,
    session: str = "",
    push_id: str | None = None,
    found_inf: bool = False,
    scalars: Mapping[str, float] | None = None,
    hyper_updates: Sequence[tuple[int, Mapping[str, Any]]] = (),
    version: int | None = None,
    loss: float | None = None,
) -> pb.PushHeader:
    header = pb.PushHeader(
        model=model,
        grads=specs,
        rank=rank,
        session=session,
        push_id=push_id or uuid.uuid4().hex,
        found_inf=found_inf,
        scalars=dict(scalars or {}),
        hyper_updates=[pb.GroupUpdate(group=i, options=options_to_pb(o)) for i, o in hyper_updates],
    )
    if version is not None:
        header.version = version
    if loss is not None:
        header.loss = float(loss)
    return header


def _pull_targets(
    header: pb.PullHeader, out: Mapping[str, torch.Tensor] | None, landing: Landing
) -> tuple[TensorSink, dict[str, tuple[torch.Tensor | None, torch.Tensor, bool]]]:
    """Where a pull's tensors land: `out`'s tensors themselves where they are contiguous CPU
    tensors, pinned host buffers from `landing` for device tensors (a GPU worker's parameters),
    else new ones (copied into `out` by _pull_result)."""
    targets, finals = [], {}
    for s in header.tensors:
        shape, dtype = shape_of(s), dtype_from_pb(s.dtype)
        dst = out.get(s.name) if out is not None else None
        if dst is not None and tuple(dst.shape) != shape:
            raise InvalidArgument(
                f"out[{s.name!r}] has shape {list(dst.shape)}, server sent {list(shape)}"
            )
        direct = dst is not None and dst.device.type == "cpu" and dst.is_contiguous()
        if dst is not None and direct:
            buf = dst.detach()
        elif dst is not None and dst.device.type != "cpu":
            buf = landing.buffer_for(dst)  # copied up by landing.finish
            direct = True
        else:
            buf = torch.empty(shape, dtype=dst.dtype if dst is not None else dtype)
        targets.append(buf)
        finals[s.name] = (dst, buf, direct)
    return TensorSink(targets, [dtype_from_pb(s.dtype) for s in header.tensors]), finals


def _pull_result(
    header: pb.PullHeader,
    finals: Mapping[str, tuple[torch.Tensor | None, torch.Tensor, bool]],
    landing: Landing,
) -> PullResult:
    landing.finish()
    params = {}
    with torch.no_grad():
        for s in header.tensors:
            dst, buf, direct = finals[s.name]
            if dst is not None and not direct:
                dst.copy_(buf)
            params[s.name] = dst if dst is not None else buf
    return PullResult(header.version, params)


def _on_cpu(tensors: Mapping[str, torch.Tensor]) -> bool:
    return all(t.device.type == "cpu" for t in tensors.values())


def push_result(r: pb.PushReply) -> PushResult:
    return PushResult(r.version, r.applied, r.found_inf, r.contributors, r.duplicate, r.partial)


class Client:
    """A connection to an adamd server, or to several holding one model in shards.

    >>> with Client("127.0.0.1:50051") as c:
    ...     c.create_model("m", {"w": torch.zeros(3)}, lr=0.1)
    ...     c.push_grad("m", {"w": torch.ones(3)})
    ...     c.pull_params("m")["w"]

    `address`: "host:port"; several servers as a list, a comma-separated string or
    "adamd-{0..3}.adamd-headless:50051" (a `ShardedClient` is returned, same calls); None:
    $ADAMD_SERVERS, else 127.0.0.1:50051.
    """

    sharded = False

    def __new__(cls, address: str | Sequence[str] | None = None, **kwargs: Any) -> Client:
        if cls is Client and len(parse_servers(address)) > 1:
            from adamd.client._sharding import ShardedClient

            return ShardedClient(address, **kwargs)
        return super().__new__(cls)

    def __init__(
        self,
        address: str | Sequence[str] | None = None,
        *,
        token: str | None = None,
        timeout: float | None = None,
        retry_timeout: float = 60.0,
        chunk_bytes: int | None = None,
        wire_dtype: torch.dtype | None = None,
        transport: str = "auto",
        tls: bool | TLSConfig | None = None,
        slice_bytes: int = DEFAULT_SLICE_BYTES,
        grad_compression: str | None = None,
    ):
        """`timeout`: per-call deadline (None: none). `retry_timeout`: how long transient failures
        are retried before Unavailable is raised. `wire_dtype` (torch.bfloat16 / torch.float16):
        send gradients and receive parameters in that dtype, halving the bytes; the server keeps
        float32 master weights and state. `transport`: "auto" moves tensors through shared memory
        when the server is on this host (and accepts), else over the bulk-data channel (a plain
        socket negotiated over gRPC), else as gRPC streams; "bulk": the channel even on this
        host, else gRPC streams; "grpc": gRPC streams only.
        `chunk_bytes`: tensor bytes per stream frame, both ways (pulls ask the server for it,
        which keeps it within 64 KiB .. 4 MiB - 64 KiB); None: 4 MiB - 64 KiB for pushes, the
        server's --chunk-bytes for pulls. `tls`: None/False plaintext; True TLS
        trusting the system's CA store; a TLSConfig for a private CA and a client certificate
        (servers started with --tls-client-ca).
        `slice_bytes` (several servers only): tensors larger than this are split along dim 0
        over several shards (default 4 MiB). `grad_compression`: None, "int8" (int8 pushes with
        error feedback, adamd.client._compression) or "int8-noef" (without the feedback)."""
        servers = parse_servers(address)
        if len(servers) > 1:
            raise ValueError(f"{type(self).__name__} takes one server, got {servers}")
        target = servers[0]
        if transport not in ("auto", "bulk", "grpc"):
            raise ValueError(f"transport must be 'auto', 'bulk' or 'grpc', got {transport!r}")
        self.transport = transport
        self._sessions: dict[str, SameHostSession | None] = {}
        # Pulls ask for a chunk size only when one is given (0: the server's --chunk-bytes).
        self._pull_chunk = 0 if chunk_bytes is None else min(chunk_bytes, MAX_CHUNK_BYTES)
        chunk_bytes = DEFAULT_CHUNK_BYTES if chunk_bytes is None else chunk_bytes
        if chunk_bytes < 8 or chunk_bytes > MAX_MESSAGE_BYTES - (1 << 20):
            raise ValueError(f"chunk_bytes must be in 8..{MAX_MESSAGE_BYTES - (1 << 20)}")
        chunk_bytes -= chunk_bytes % 8  # whole elements of every dtype in every chunk
        self.address = target
        self.timeout = timeout
        self.retry_timeout = retry_timeout
        self.chunk_bytes = chunk_bytes
        self.wire_dtype = wire_dtype
        self.grad_compression = check_compression(grad_compression)
        self._compressors: dict[str, Compressor] = {}
        self._metadata = (("authorization", f"Bearer {token}"),) if token else ()
        self.tls = bool(tls)
        self._channel = (
            grpc.secure_channel(target, channel_credentials(tls), options=CHANNEL_OPTIONS)
            if tls
            else grpc.insecure_channel(target, options=CHANNEL_OPTIONS)
        )
        ser = lambda m: m.SerializeToString()
        ch = self._channel
        self._create = ch.stream_unary(_SERVICE + "CreateModel", identity, pb.ModelInfo.FromString)
        self._push = ch.stream_unary(_SERVICE + "PushGrad", identity, pb.PushReply.FromString)
        self._pull = ch.unary_stream(_SERVICE + "PullParams", ser, identity)
        self._get_state = ch.unary_stream(_SERVICE + "GetState", ser, identity)
        self._load_state = ch.stream_unary(
            _SERVICE + "LoadState", identity, pb.ModelInfo.FromString
        )
        self._add_group = ch.stream_unary(
            _SERVICE + "AddParamGroup", identity, pb.ModelInfo.FromString
        )
        self._set_hyper = ch.unary_unary(_SERVICE + "SetHyperparams", ser, pb.ModelInfo.FromString)
        self._describe = ch.unary_unary(_SERVICE + "DescribeModel", ser, pb.ModelInfo.FromString)
        self._list = ch.unary_unary(_SERVICE + "ListModels", ser, pb.ListModelsReply.FromString)
        self._delete = ch.unary_unary(_SERVICE + "DeleteModel", ser, pb.DeleteReply.FromString)
        self._snapshot = ch.unary_unary(_SERVICE + "Snapshot", ser, pb.SnapshotInfo.FromString)
        self._attach = ch.unary_unary(_SERVICE + "Attach", ser, pb.AttachReply.FromString)
        self._detach = ch.unary_unary(_SERVICE + "Detach", ser, pb.DetachReply.FromString)
        self._join = ch.unary_unary(_SERVICE + "Join", ser, pb.JoinReply.FromString)
        self._leave = ch.unary_unary(_SERVICE + "Leave", ser, pb.LeaveReply.FromString)
        self._bulk = self._bulk_of(target, tls) if transport != "grpc" else None

    # --- plumbing -------------------------------------------------------------------------------

    def __deepcopy__(self, memo: dict[int, Any]) -> Client:
        # A connection, not a value: copies of what holds a Client (a RemoteAdam) share it.
        return self

    def close(self) -> None:
        for model in list(self._sessions):
            self._drop_session(model)
        if self._bulk is not None:
            self._bulk.close()
        self._channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def call(self, fn: Callable[[], T]) -> T:
        """Run one call, retrying transient failures with backoff; map errors to ours."""
        deadline = time.monotonic() + self.retry_timeout
        delay = 0.05
        while True:
            try:
                return fn()
            except grpc.RpcError as err:
                code = _transient(err)
                if code in _RETRYABLE and time.monotonic() + delay < deadline:
                    time.sleep(delay * (0.5 + random.random()))
                    delay = min(delay * 2, 2.0)
                    continue
                exc = from_rpc_error(err)
                if code in _RETRYABLE:  # a server gone for longer than the retry deadline
                    raise Unavailable(f"{self.address}: {exc}") from None
                raise exc from None

    # --- same-host sessions ---------------------------------------------------------------------

    def _bulk_of(self, address: str, tls: bool | TLSConfig | None) -> BulkChannel | None:
        """The bulk-data channel to the server at `address` (None: a target form without a
        host, such as unix:)."""
        host = _host_of(address)
        if not host:
            return None
        ask = self._channel.unary_unary(
            _SERVICE + "OpenBulk", lambda m: m.SerializeToString(), pb.OpenBulkReply.FromString
        )
        return BulkChannel(
            host,
            lambda: ask(pb.OpenBulkRequest(), metadata=self._metadata, timeout=10),
            socket_context(tls) if tls else None,
            self.timeout,
        )

    def _bulk_channel(self) -> BulkChannel | None:
        """The bulk-data channel when it may be tried now; None: gRPC."""
        if self._bulk is None or not self._bulk.usable():
            return None
        return self._bulk

    def _session(self, model: str) -> SameHostSession | None:
        """This model's shared-memory session, attached on first use; None means the network."""
        if self.transport != "auto":
            return None
        if model not in self._sessions:
            session = None
            try:
                reply = self._attach(pb.AttachRequest(model=model, host_id=host_id()), **self._kw())
            except grpc.RpcError:
                reply = pb.AttachReply(accepted=False)
            if reply.accepted:
                try:
                    session = SameHostSession(model, reply)
                except (OSError, ValueError, RuntimeError):
                    # Accepted but unusable (the files are not visible here): give them back.
                    self._detach_quietly(model, reply.session)
            self._sessions[model] = session
        session = self._sessions[model]
        if session is not None and not session.valid():
            self._drop_session(model)
            return self._session(model)
        return session

    def _drop_session(self, model: str, *, reattach: bool = True) -> None:
        """Forget the model's session; without `reattach`, this client streams from now on."""
        session = self._sessions.pop(model, None)
        if not reattach:
            self._sessions[model] = None
        if session is not None:
            self._detach_quietly(model, session.id)

    def _detach_quietly(self, model: str, session: str) -> None:
        try:
            self._detach(
                pb.DetachRequest(model=model, session=session), timeout=5, metadata=self._metadata
            )
        except grpc.RpcError:
            pass

    def _kw(self) -> dict[str, Any]:
        return {"metadata": self._metadata, "timeout": self.timeout}

    def _upload(
        self,
        header: bytes,
        tensors: Sequence[torch.Tensor],
        wire_dtype: torch.dtype | None = None,
    ) -> Callable[[], Iterator[bytes]]:
        return lambda: iter_frames(header, tensors, self.chunk_bytes, wire_dtype)

    # --- models ---------------------------------------------------------------------------------

    @invalid_input()
    def create_model(
        self,
        model: str,
        params: Mapping[str, torch.Tensor],
        *,
        param_groups: Sequence[Mapping[str, Any]] | None = None,
        world_size: int | str = 1,
        mode: str = "sync",
        max_staleness: int = 0,
        round_timeout_s: float = 0.0,
        lease_s: float = 0.0,
        exist_ok: bool = False,
        layout: str = "",
        master_dtype: torch.dtype | None = None,
        **adam_kwargs: Any,
    ) -> ModelInfo:
        """Create `model` with these parameters (their values initialize it) and Adam options.

        `master_dtype=torch.float32` (master weights, off unless asked): bf16/fp16 parameters are
        held on the server, with their Adam state, in float32; their values, gradients and pulls
        still travel in the parameters' own dtype (a pull rounds to nearest even from the
        master). Wider and complex parameters are held as they are.

        `param_groups`: list of dicts {"params": [names], **options}; options missing from a group
        come from `adam_kwargs`, as torch.optim.Adam's defaults do. Without it, one group holds all.
        With `exist_ok`, an existing model with matching parameters is joined (ModelInfo.created False).
        `world_size="elastic"`: sync rounds over whichever workers are registered (`join`, or a
        push), each registration lasting `lease_s` seconds past its last push (0: the server's
        default, 30 s).
        """
        if mode not in _MODES:
            raise InvalidArgument(f"mode must be 'sync' or 'async', got {mode!r}")
        elastic = world_size == "elastic"
        if not elastic and not (isinstance(world_size, int) and world_size >= 1):
            raise InvalidArgument(f"world_size must be at least 1 or 'elastic', got {world_size!r}")
        names = list(params)
        groups = param_groups or [{"params": names}]
        tensors = [to_wire(params[n]) for n in names]
        cfg = pb.ModelConfig(
            model=model,
            params=[spec_of(n, t) for n, t in zip(names, tensors)],
            groups=[
                _group_pb(
                    g["params"], {**adam_kwargs, **{k: v for k, v in g.items() if k != "params"}}
                )
                for g in groups
            ],
            world_size=0 if elastic else int(world_size),
            mode=_MODES[mode],
            max_staleness=max_staleness,
            round_timeout_s=round_timeout_s,
            elastic=elastic,
            lease_s=lease_s,
            exist_ok=exist_ok,
            layout=layout,
        )
        if master_dtype is not None:
            if master_dtype not in (torch.float32, torch.float64):
                raise InvalidArgument(
                    f"master_dtype must be torch.float32 or torch.float64, got {master_dtype}"
                )
            cfg.master_dtype = dtype_to_pb(master_dtype)
        frames = self._upload(cfg.SerializeToString(), tensors)
        return _model_info(self.call(lambda: self._create(frames(), **self._kw())))

    def describe(self, model: str) -> ModelInfo:
        return _model_info(
            self.call(lambda: self._describe(pb.ModelRef(model=model), **self._kw()))
        )

    def list_models(self) -> list[ModelInfo]:
        reply = self.call(lambda: self._list(pb.ListModelsRequest(), **self._kw()))
        return [_model_info(m) for m in reply.models]

    def join(self, model: str, rank: int | None = None) -> int:
        """Elastic model: register as a worker; returns the rank to push with (the server's
        lowest free rank when `rank` is None). Every push renews the registration."""
        req = pb.JoinRequest(model=model, rank=rank)
        return int(self.call(lambda: self._join(req, **self._kw())).rank)

    def leave(self, model: str, rank: int) -> bool:
        """Elastic model: deregister `rank` now, so rounds stop waiting for it. False when it
        was not registered (its lease had lapsed)."""
        req = pb.LeaveRequest(model=model, rank=rank)
        return bool(self.call(lambda: self._leave(req, **self._kw())).left)

    def delete_model(self, model: str) -> None:
        self.call(lambda: self._delete(pb.ModelRef(model=model), **self._kw()))

    def snapshot(self, model: str) -> pb.SnapshotInfo:
        """Write a snapshot of `model` now; returns where and how long it took."""
        return self.call(lambda: self._snapshot(pb.ModelRef(model=model), **self._kw()))

    @invalid_input()
    def set_hyperparams(self, model: str, group: int = 0, **options: Any) -> ModelInfo:
        """Change options of one param group (lr, betas, eps, weight_decay, ...)."""
        return self.set_group_options(model, [(group, options)])

    @invalid_input()
    def set_group_options(
        self, model: str, updates: Sequence[tuple[int, Mapping[str, Any]]]
    ) -> ModelInfo:
        req = pb.SetHyperparamsRequest(
            model=model,
            updates=[pb.GroupUpdate(group=i, options=options_to_pb(o)) for i, o in updates],
        )
        return _model_info(self.call(lambda: self._set_hyper(req, **self._kw())))

    @invalid_input()
    def add_param_group(
        self,
        model: str,
        params: Mapping[str, torch.Tensor],
        *,
        listed: Sequence[str] | None = None,
        layout: str = "",
        **options: Any,
    ) -> ModelInfo:
        """torch's add_param_group: new parameters (values initialize them) in a new group.
        `listed`: the group's parameter names in order when it names one twice (which torch
        warns about and then steps twice per step); default: the names of `params`."""
        names = list(params)
        tensors = [to_wire(params[n]) for n in names]
        header = pb.GroupHeader(
            model=model,
            group=_group_pb(list(listed) if listed is not None else names, options),
            params=[spec_of(n, t) for n, t in zip(names, tensors)],
            layout=layout,
        )
        frames = self._upload(header.SerializeToString(), tensors)
        info = _model_info(self.call(lambda: self._add_group(frames(), **self._kw())))
        self._drop_session(model)  # the shared layout changed: attach again on next use
        return info

    # --- pushes and pulls -----------------------------------------------------------------------

    @invalid_input()
    def push_grad(
        self,
        model: str,
        grads: Mapping[str, torch.Tensor],
        *,
        version: int | None = None,
        rank: int = 0,
        push_id: str | None = None,
        loss: float | None = None,
        scalars: Mapping[str, float] | None = None,
        found_inf: bool = False,
        hyper_updates: Sequence[tuple[int, Mapping[str, Any]]] = (),
        wire_dtype: torch.dtype | None = None,
        grad_compression: str | None = None,
    ) -> PushResult:
        """Push gradients; returns once the step they feed has been applied (sync: the round).

        `version`: the version the gradients were computed from (sync rounds and async staleness
        check it). Parameters not in `grads` get no step. A retry (automatic on connection loss)
        reuses `push_id`, so the server applies the push exactly once. `grad_compression`: see
        Client ("int8": blockwise int8, error feedback; the default is the client's).
        """
        encoded = self._encode(model, rank, grads, grad_compression, found_inf)
        if encoded is not None:
            return self._push_encoded(model, encoded, rank=rank, push_id=push_id,
                found_inf=found_inf, scalars=scalars, hyper_updates=hyper_updates,
                version=version, loss=loss)  # fmt: skip
        names = list(grads)
        wire = wire_dtype or self.wire_dtype
        session = self._session(model) if wire is None else None
        # The session's gradient file holds one push at a time (a sync round reads it until the
        # round completes): a concurrent push from another thread streams instead.
        if session is not None and session.fits(grads) and session.busy.acquire(blocking=False):
            try:
                specs = session.write_grads(grads)
            except BaseException:
                session.busy.release()
                raise
            tensors: list[torch.Tensor] = []
        else:
            session = None
            tensors = [grads[n] for n in names]  # converted chunk by chunk as they stream
            specs = [spec_of(n, t, wire) for n, t in zip(names, tensors)]
        header = _push_header(
            model,
            specs,
            rank=rank,
            session=session.id if session else "",
            push_id=push_id,
            found_inf=found_inf,
            scalars=scalars,
            hyper_updates=hyper_updates,
            version=version,
            loss=loss,
        )
        try:
            r = self.call(lambda: self._push_once(header, tensors, wire, session is None))
        except SessionExpired:
            if session is None:
                raise
            session.busy.release()
            session = None
            # the session went stale (the model changed shape or was re-created): stream instead
            self._drop_session(model, reattach=False)
            return self.push_grad(
                model,
                grads,
                version=version,
                rank=rank,
                push_id=header.push_id,
                loss=loss,
                scalars=scalars,
                found_inf=found_inf,
                hyper_updates=hyper_updates,
                wire_dtype=wire_dtype,
            )
        finally:
            if session is not None:
                session.busy.release()
        return push_result(r)

    def _push_encoded(self, model: str, encoded: Encoded, **header_kw: Any) -> PushResult:
        """An int8 push: its one payload sent (again on a retry), then its residuals moved on."""
        header = _push_header(model, encoded.specs, **header_kw)
        r = self.call(lambda: self._push_once(header, encoded.payloads, None, True))
        encoded.commit()  # acknowledged (applied, or answered as a duplicate): once
        return push_result(r)

    def compressor(self, mode: str) -> Compressor:
        """The error-feedback residuals this client keeps for `mode` ("int8", "int8-noef")."""
        if mode not in self._compressors:
            self._compressors[mode] = Compressor(mode)
        return self._compressors[mode]

    def _encode(
        self,
        model: str,
        rank: int,
        grads: Mapping[str, torch.Tensor],
        grad_compression: str | None,
        found_inf: bool,
    ) -> Encoded | None:
        """The push's int8 encoding, or None where it travels raw: no compression, or a push
        with found_inf (skipped by the server whatever its values; the residuals stay)."""
        mode = check_compression(grad_compression or self.grad_compression)
        if mode is None or found_inf:
            return None
        return self.compressor(mode).encode(model, rank, grads)

    def _push_once(
        self,
        header: pb.PushHeader,
        tensors: Sequence[torch.Tensor],
        wire: torch.dtype | None,
        network: bool,
    ) -> pb.PushReply:
        """One try of a push: over the bulk-data channel where it may be used (`network`: the
        push is not in a same-host session's file), else as a gRPC stream."""
        bulk = self._bulk_channel() if network else None
        if bulk is not None:
            try:
                return bulk.push(header, tensors, wire, self.chunk_bytes)
            except Unreachable:
                pass  # gRPC, now and for a while (BulkChannel.turn_off)
        return self._push(self._upload(header.SerializeToString(), tensors, wire)(), **self._kw())

    @invalid_input()
    def step(
        self,
        model: str,
        grads: Mapping[str, torch.Tensor],
        out: Mapping[str, torch.Tensor],
        *,
        version: int | None = None,
        rank: int = 0,
        push_id: str | None = None,
        loss: float | None = None,
        scalars: Mapping[str, float] | None = None,
        found_inf: bool = False,
        hyper_updates: Sequence[tuple[int, Mapping[str, Any]]] = (),
        wire_dtype: torch.dtype | None = None,
        grad_compression: str | None = None,
    ) -> tuple[PushResult, PullResult]:
        """`push_grad`, then `pull(out=out)` of `out`'s parameters (what RemoteAdam.step does).

        Over the bulk-data channel this is one exchange in which each parameter comes back as
        soon as the server's step has updated it, so the step hides behind the transfer;
        elsewhere (shared memory, gRPC) it is the two calls."""
        wire = wire_dtype or self.wire_dtype
        names = list(out)
        push_kw: dict[str, Any] = dict(
            version=version,
            rank=rank,
            push_id=push_id,
            loss=loss,
            scalars=scalars,
            found_inf=found_inf,
            hyper_updates=hyper_updates,
        )
        on_host = (
            wire is None and _on_cpu(grads) and _on_cpu(out) and self._session(model) is not None
        )
        if self._bulk_channel() is None or on_host:
            pushed = self.push_grad(
                model, grads, wire_dtype=wire_dtype, grad_compression=grad_compression, **push_kw
            )
            return pushed, self.pull(model, names, out=out, wire_dtype=wire_dtype)
        encoded = self._encode(model, rank, grads, grad_compression, found_inf)
        if encoded is not None:
            tensors, specs = encoded.payloads, encoded.specs
        else:
            tensors = list(grads.values())
            specs = [spec_of(n, t, wire) for n, t in grads.items()]
        push_kw["push_id"] = push_id or uuid.uuid4().hex
        header = _push_header(model, specs, **push_kw)
        request = pb.PullRequest(model=model, names=names, chunk_bytes=self._pull_chunk)
        if wire is not None:
            request.wire_dtype = dtype_to_pb(wire)
        finals: dict[str, tuple[torch.Tensor | None, torch.Tensor, bool]] = {}
        landing = Landing()

        def targets(pulled: pb.PullHeader) -> TensorSink:
            sink, made = _pull_targets(pulled, out, landing)
            finals.update(made)
            return sink

        def attempt() -> tuple[pb.PushReply, pb.PullHeader | None, bool]:
            bulk = self._bulk_channel()
            if bulk is not None:
                try:
                    return bulk.step(header, tensors, request, targets, self.chunk_bytes)
                except Unreachable:
                    pass  # gRPC, now and for a while (BulkChannel.turn_off)
            return self._push_once(header, tensors, wire, network=False), None, False

        reply, pulled, consistent = self.call(attempt)
        if encoded is not None:
            encoded.commit()
        if pulled is not None and consistent:
            return push_result(reply), _pull_result(pulled, finals, landing)
        landing.release()
        return push_result(reply), self.pull(model, names, out=out, wire_dtype=wire_dtype)

    def open_push(
        self,
        model: str,
        specs: Sequence[pb.TensorSpec],
        *,
        version: int | None = None,
        rank: int = 0,
        loss: float | None = None,
        hyper_updates: Sequence[tuple[int, Mapping[str, Any]]] = (),
    ) -> StreamingPush | BulkStreamingPush:
        """A push stream whose header (these gradient specs) goes out now and whose gradients
        follow as they are sent (StreamingPush.send); over the bulk-data channel or gRPC, never
        shared memory. Used by
        RemoteAdam(overlap=True); `finish()` gives the reply, `cancel()` leaves nothing applied."""
        header = _push_header(
            model, specs, rank=rank, version=version, loss=loss, hyper_updates=hyper_updates
        )
        bulk = self._bulk_channel()
        if bulk is not None:
            return BulkStreamingPush(bulk, header, self.wire_dtype, self.chunk_bytes)
        return StreamingPush(self._push, header, self.wire_dtype, self.chunk_bytes, self._kw())

    def pull_params(
        self, model: str, names: Sequence[str] | None = None, **kwargs: Any
    ) -> dict[str, torch.Tensor]:
        """The model's parameters (all, or `names`) as CPU tensors. See `pull` for the options."""
        return self.pull(model, names, **kwargs).params

    @invalid_input()
    def pull(
        self,
        model: str,
        names: Sequence[str] | None = None,
        *,
        out: Mapping[str, torch.Tensor] | None = None,
        if_newer_than: int | None = None,
        wait_for_version: int | None = None,
        wait_timeout: float = 60.0,
        wire_dtype: torch.dtype | None = None,
    ) -> PullResult:
        """Pull parameters with their version.

        `out`: tensors to write into in place (any device/dtype; contiguous CPU ones are filled
        straight from the stream). `if_newer_than`: skip the transfer when the server's version is
        not newer. `wait_for_version`: block until the model reaches it (DeadlineExceeded after
        `wait_timeout`). The result is always one consistent version.
        """
        req = pb.PullRequest(
            model=model,
            names=list(names or ()),
            wait_timeout_s=wait_timeout,
            chunk_bytes=self._pull_chunk,
        )
        if if_newer_than is not None:
            req.if_newer_than = if_newer_than
        if wait_for_version is not None:
            req.wait_for_version = wait_for_version
        wire = wire_dtype or self.wire_dtype
        session = self._session(model) if wire is None and wait_for_version is None else None
        if session is not None:
            shared = self._pull_shared(session, names, out, if_newer_than)
            if shared is not None:
                return shared
        if wire is not None:
            req.wire_dtype = dtype_to_pb(wire)
        for _ in range(8):
            result = self.call(lambda: self._pull_once(req, out))
            if result is not None:
                return result
        raise AdamdError("parameters kept changing during the pull (async steps); try again")

    def _pull_shared(
        self,
        session: SameHostSession,
        names: Sequence[str] | None,
        out: Mapping[str, torch.Tensor] | None,
        if_newer_than: int | None,
    ) -> PullResult | None:
        """A pull served from shared memory, or None where the gRPC path must answer."""
        wanted = list(names or session.param_views)
        if any(n not in session.param_views for n in wanted):
            return None  # let the server name what is missing
        if out is not None and not _on_cpu(out):
            return None  # device tensors land through pinned buffers (pinned.py), not the file
        if out is not None and any(
            n in out and tuple(out[n].shape) != tuple(session.param_views[n].shape) for n in wanted
        ):
            return None
        if if_newer_than is not None and session.version() <= if_newer_than:
            return PullResult(session.version(), {}, True)
        try:
            version, params = session.read_params(wanted, out)
        except TimeoutError:
            return None
        if not session.valid():  # retired while we read: the server's copy moved
            self._drop_session(session.model)
            return None
        return PullResult(version, params)

    def _pull_once(
        self, req: pb.PullRequest, out: Mapping[str, torch.Tensor] | None
    ) -> PullResult | None:
        bulk = self._bulk_channel()
        if bulk is not None:
            try:
                return self._pull_bulk(bulk, req, out)
            except Unreachable:
                pass  # gRPC, now and for a while (BulkChannel.turn_off)
        call = self._pull(req, **self._kw())
        frames = iter(call)
        try:
            first = decode_frame(next(frames))
            if first.header is None:
                raise AdamdError("pull reply without a header")
            header = pb.PullHeader.FromString(bytes(first.header))
            if header.not_modified:
                return PullResult(header.version, {}, True)
            landing = Landing()
            sink, finals = _pull_targets(header, out, landing)
            if first.data.nbytes:
                sink.write(first.tensor, first.offset, first.data)
            for raw in frames:
                f = decode_frame(raw)
                sink.write(f.tensor, f.offset, f.data)
            sink.check_complete()
        except ProtocolError as exc:
            call.cancel()
            raise AdamdError(f"malformed pull reply: {exc}") from exc
        consistent = dict(call.trailing_metadata() or ()).get("adamd-consistent", "1") == "1"
        if not consistent:
            landing.release()
            return None
        return _pull_result(header, finals, landing)

    def _pull_bulk(
        self, bulk: BulkChannel, req: pb.PullRequest, out: Mapping[str, torch.Tensor] | None
    ) -> PullResult | None:
        finals: dict[str, tuple[torch.Tensor | None, torch.Tensor, bool]] = {}
        landing = Landing()

        def targets(header: pb.PullHeader) -> TensorSink:
            sink, made = _pull_targets(header, out, landing)
            finals.update(made)
            return sink

        header, consistent = bulk.pull(req, targets)
        if header.not_modified:
            return PullResult(header.version, {}, True)
        if not consistent:
            landing.release()
            return None
        return _pull_result(header, finals, landing)

    # --- optimizer state ------------------------------------------------------------------------

    def get_state(self, model: str) -> dict[str, Any]:
        """The optimizer's state keyed by parameter name:
        {"state": {name: {"step", "exp_avg", "exp_avg_sq"[, "max_exp_avg_sq"]}},
         "param_groups": [{**options, "params": [names]}], "version": int}."""
        return self.call(lambda: self._get_state_once(model))

    def _get_state_once(self, model: str) -> dict[str, Any]:
        frames = iter(self._get_state(pb.GetStateRequest(model=model), **self._kw()))
        first = decode_frame(next(frames))
        header = pb.StateHeader.FromString(bytes(first.header or b""))
        tensors = [torch.empty(shape_of(s), dtype=dtype_from_pb(s.dtype)) for s in header.tensors]
        sink = TensorSink(tensors, [t.dtype for t in tensors])
        if first.data.nbytes:
            sink.write(first.tensor, first.offset, first.data)
        for raw in frames:
            f = decode_frame(raw)
            sink.write(f.tensor, f.offset, f.data)
        sink.check_complete()
        return {
            "state": {
                e.param: {k: tensors[i] for k, i in e.tensors.items()} for e in header.states
            },
            "param_groups": [
                {**options_from_pb(g.options), "params": list(g.params)} for g in header.groups
            ],
            "version": header.version,
        }

    @invalid_input()
    def load_state(
        self,
        model: str,
        state: Mapping[str, Mapping[str, torch.Tensor]],
        param_groups: Sequence[Mapping[str, Any]] | None = None,
    ) -> ModelInfo:
        """Load optimizer state keyed by parameter name (the shape get_state returns);
        `param_groups` (optional) also sets each group's hyperparameters."""
        tensors: list[torch.Tensor] = []
        specs, entries = [], []
        for name, entry in state.items():
            index = {}
            for key, value in entry.items():
                t = to_wire(
                    value if isinstance(value, torch.Tensor) else torch.tensor(float(value))
                )
                index[key] = len(tensors)
                tensors.append(t)
                specs.append(spec_of(f"{name}/{key}", t))
            entries.append(pb.ParamState(param=name, tensors=index))
        groups = [
            _group_pb(
                g["params"], {k: v for k, v in g.items() if k not in ("params", "param_names")}
            )
            for g in (param_groups or ())
        ]
        header = pb.StateHeader(model=model, states=entries, tensors=specs, groups=groups)
        frames = self._upload(header.SerializeToString(), tensors)
        return _model_info(self.call(lambda: self._load_state(frames(), **self._kw())))
