"""`Client`: one connection to an adamd server and every call of its API.

Tensors stream as raw chunks (adamd.protocol.frames) over the transport client/_transport/route.py
picks (same-host shared memory, the bulk-data channel, gRPC); calls that fail transiently (the
server is restarting, a connection dropped) are retried with backoff, pushes under the same push id
so the server applies them exactly once. Every failure surfaces as an adamd.client exception.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, TypeVar

import torch

from adamd.client._addresses import parse_servers
from adamd.client._compression import Compressor, Encoded, Residuals, check_mode
from adamd.client._exceptions import invalid_input
from adamd.client._overlap import BulkStreamingPush, StreamingPush
from adamd.client._overlap import finish as finish_streamed
from adamd.client._retry import with_retries
from adamd.client._service import CHANNEL_OPTIONS, ServiceCalls, open_channel
from adamd.client._tls import TLSConfig
from adamd.client._transport.bulk import BulkChannel
from adamd.client._transport.route import Route
from adamd.client._transport.shm import SameHostSession
from adamd.client._types import ModelInfo, PullResult, PushResult
from adamd.client._wire import (
    closing_header,
    model_config,
    pull_request,
    push_header,
    push_result,
    read_state,
    state_header,
)
from adamd.client._wire import group_pb as _group_pb
from adamd.client._wire import model_info as _model_info
from adamd.protocol.frames import (
    DEFAULT_CHUNK_BYTES,
    MAX_CHUNK_BYTES,
    MAX_MESSAGE_BYTES,
    iter_frames,
    spec_of,
    to_wire,
)
from adamd.protocol.hyper import options_to_pb
from adamd.protocol.layout import DEFAULT_SLICE_BYTES
from adamd.v1 import adamd_pb2 as pb

__all__ = ["CHANNEL_OPTIONS", "Client", "push_result"]
T = TypeVar("T")


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

            # Not a Client subclass: one Client per shard behind the same calls (ModelClient).
            return ShardedClient(address, **kwargs)  # type: ignore[return-value]
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
        self.grad_compression = check_mode(grad_compression)  # read at every push
        self._residuals = Residuals(lambda: self.grad_compression)  # int8 error feedback, per mode
        self._metadata = (("authorization", f"Bearer {token}"),) if token else ()
        self.tls = bool(tls)
        self._channel = open_channel(target, tls)
        self._calls = ServiceCalls(self._channel)
        self._route = self._routes(target, tls)

    # --- plumbing -------------------------------------------------------------------------------

    def __deepcopy__(self, memo: dict[int, Any]) -> Client:
        # A connection, not a value: copies of what holds a Client (a RemoteAdam) share it.
        return self

    def close(self) -> None:
        if self._shm is not None:
            self._shm.close()
        if self._bulk is not None:
            self._bulk.close()
        self._channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def call(self, fn: Callable[[], T]) -> T:
        """Run one call, retrying transient failures with backoff; map errors to ours."""
        return with_retries(fn, self.retry_timeout, self.address)

    # --- transports ---------------------------------------------------------------------------

    def _routes(self, target: str, tls: bool | TLSConfig | None) -> Route:
        """The transports this client may use (by `transport`) and the route that picks one."""
        route = Route.open(self._channel, target, self.transport, tls, self._kw, self._metadata,
            self.timeout, lambda: self.chunk_bytes, self.call)  # fmt: skip
        self._bulk = route.bulk.channel if route.bulk is not None else None
        self._push, self._pull = route.grpc.push_stub, route.grpc.pull_stub  # raw gRPC streams
        self._shm = route.shm
        self._sessions = route.shm.sessions if route.shm is not None else {}
        return route

    def _bulk_channel(self) -> BulkChannel | None:
        """The bulk-data channel when it may be tried now; None: gRPC."""
        if self._bulk is None or not self._bulk.usable():
            return None
        return self._bulk

    def _session(self, model: str) -> SameHostSession | None:
        """This model's shared-memory session, attached on first use; None means the network."""
        return self._shm.session(model) if self._shm is not None else None

    def _drop_session(self, model: str, *, reattach: bool = True) -> None:
        if self._shm is not None:
            self._shm.drop(model, reattach=reattach)

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
        cfg, tensors = model_config(model, params, param_groups=param_groups,
            world_size=world_size, mode=mode, max_staleness=max_staleness,
            round_timeout_s=round_timeout_s, lease_s=lease_s, exist_ok=exist_ok, layout=layout,
            master_dtype=master_dtype, adam_kwargs=adam_kwargs)  # fmt: skip
        frames = self._upload(cfg.SerializeToString(), tensors)
        info = _model_info(self.call(lambda: self._calls.create(frames(), **self._kw())))
        if info.created:  # a new model: int8 residuals of an earlier one of this name are void
            self._residuals.forget(model)
        return info

    def describe(self, model: str) -> ModelInfo:
        return _model_info(
            self.call(lambda: self._calls.describe(pb.ModelRef(model=model), **self._kw()))
        )

    def list_models(self) -> list[ModelInfo]:
        reply = self.call(lambda: self._calls.list_models(pb.ListModelsRequest(), **self._kw()))
        return [_model_info(m) for m in reply.models]

    def join(self, model: str, rank: int | None = None) -> int:
        """Elastic model: register as a worker; returns the rank to push with (the server's
        lowest free rank when `rank` is None). Every push renews the registration."""
        req = pb.JoinRequest(model=model, rank=rank)
        return int(self.call(lambda: self._calls.join(req, **self._kw())).rank)

    def leave(self, model: str, rank: int) -> bool:
        """Elastic model: deregister `rank` now, so rounds stop waiting for it. False when it
        was not registered (its lease had lapsed)."""
        req = pb.LeaveRequest(model=model, rank=rank)
        return bool(self.call(lambda: self._calls.leave(req, **self._kw())).left)

    def delete_model(self, model: str) -> None:
        self.call(lambda: self._calls.delete(pb.ModelRef(model=model), **self._kw()))
        self._residuals.forget(model)

    def snapshot(self, model: str) -> pb.SnapshotInfo:
        """Write a snapshot of `model` now; returns where and how long it took."""
        return self.call(lambda: self._calls.snapshot(pb.ModelRef(model=model), **self._kw()))

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
        return _model_info(self.call(lambda: self._calls.set_hyper(req, **self._kw())))

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
        info = _model_info(self.call(lambda: self._calls.add_group(frames(), **self._kw())))
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
        header_kw: dict[str, Any] = dict(rank=rank, push_id=push_id or uuid.uuid4().hex,
            found_inf=found_inf, scalars=scalars, hyper_updates=hyper_updates, version=version,
            loss=loss)  # fmt: skip
        encoded = self._residuals.encode(model, rank, grads, grad_compression, found_inf)
        if encoded is not None:
            return self._push_encoded(model, encoded, **header_kw)
        wire = wire_dtype or self.wire_dtype
        tensors = list(grads.values())  # converted chunk by chunk as they stream
        header = push_header(model, [spec_of(n, t, wire) for n, t in grads.items()], **header_kw)
        return push_result(self._route.push(header, tensors, wire, grads=grads))

    def _push_encoded(self, model: str, encoded: Encoded, **header_kw: Any) -> PushResult:
        """An int8 push: its one payload sent (again on a retry), then its residuals moved on."""
        header = push_header(model, encoded.specs, **header_kw)
        r = self._route.push(header, encoded.payloads, None)
        encoded.commit()  # acknowledged (applied, or answered as a duplicate): once
        return push_result(r)

    def compressor(self, mode: str) -> Compressor:
        """The error-feedback residuals this client keeps for `mode` ("int8", "int8-noef")."""
        return self._residuals.compressor(mode)

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
        push_kw: dict[str, Any] = dict(version=version, rank=rank, push_id=push_id, loss=loss,
            scalars=scalars, found_inf=found_inf, hyper_updates=hyper_updates)  # fmt: skip
        if not self._route.one_exchange(model, grads, out, wire):
            pushed = self.push_grad(
                model, grads, wire_dtype=wire_dtype, grad_compression=grad_compression, **push_kw
            )
            return pushed, self.pull(model, names, out=out, wire_dtype=wire_dtype)
        encoded = self._residuals.encode(model, rank, grads, grad_compression, found_inf)
        if encoded is not None:
            tensors, specs = encoded.payloads, encoded.specs
        else:
            tensors = list(grads.values())
            specs = [spec_of(n, t, wire) for n, t in grads.items()]
        push_kw["push_id"] = push_id or uuid.uuid4().hex
        header = push_header(model, specs, **push_kw)
        request = pull_request(model, names, self._pull_chunk, wire)
        reply, pulled = self._route.step(header, tensors, request, out)
        if encoded is not None:
            encoded.commit()
        if pulled is not None:
            return push_result(reply), pulled
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
        header = push_header(
            model, specs, rank=rank, version=version, loss=loss, hyper_updates=hyper_updates
        )
        bulk = self._bulk_channel()
        if bulk is not None:
            return BulkStreamingPush(bulk, header, self.wire_dtype, self.chunk_bytes)
        return StreamingPush(self._push, header, self.wire_dtype, self.chunk_bytes, self._kw())

    def finish_push(
        self,
        stream: StreamingPush | BulkStreamingPush,
        *,
        amend: bool = False,
        loss: float | None = None,
        hyper_updates: Sequence[tuple[int, Mapping[str, Any]]] = (),
    ) -> PushResult | None:
        """End a stream from `open_push` (its gradients all sent) and wait for the reply. With
        `amend`, a closing header replaces the opening one's loss and hyperparameter edits with
        these. None where the stream failed (a dropped connection, a timeout, a server without
        closing headers): push again under the same push id. Answers that a push again would
        only repeat (FailedPrecondition, NotFound, LimitExceeded, Unauthenticated,
        PermissionDenied) are raised."""
        closing = closing_header(loss, hyper_updates) if amend else None
        reply = finish_streamed(stream, closing, self.timeout)
        return push_result(reply) if reply is not None else None

    def same_host(self, model: str) -> bool:
        """Whether `model`'s pushes and pulls from here go through same-host shared memory
        (attached on first use; False with `transport` other than "auto")."""
        return self._session(model) is not None

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
        req = pull_request(model, list(names or ()), self._pull_chunk, wire_dtype or self.wire_dtype,
            wait_timeout_s=wait_timeout, if_newer_than=if_newer_than,
            wait_for_version=wait_for_version)  # fmt: skip
        return self._route.pull(req, out)

    # --- optimizer state ------------------------------------------------------------------------

    def get_state(self, model: str) -> dict[str, Any]:
        """The optimizer's state keyed by parameter name:
        {"state": {name: {"step", "exp_avg", "exp_avg_sq"[, "max_exp_avg_sq"]}},
         "param_groups": [{**options, "params": [names]}], "version": int}."""
        return self.call(lambda: self._get_state_once(model))

    def _get_state_once(self, model: str) -> dict[str, Any]:
        return read_state(
            iter(self._calls.get_state(pb.GetStateRequest(model=model), **self._kw()))
        )

    @invalid_input()
    def load_state(
        self,
        model: str,
        state: Mapping[str, Mapping[str, torch.Tensor]],
        param_groups: Sequence[Mapping[str, Any]] | None = None,
    ) -> ModelInfo:
        """Load optimizer state keyed by parameter name (the shape get_state returns);
        `param_groups` (optional) also sets each group's hyperparameters."""
        header, tensors = state_header(model, state, param_groups)
        frames = self._upload(header.SerializeToString(), tensors)
        return _model_info(self.call(lambda: self._calls.load_state(frames(), **self._kw())))
