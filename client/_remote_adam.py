"""`RemoteAdam`: a torch.optim.Optimizer whose Adam runs on an adamd server.

Construct it exactly like torch.optim.Adam, plus where the server is. `step()` pushes the
non-None gradients, the server steps its real torch.optim.Adam, and the fresh parameters are
written into the local tensors in place. Edits to `param_groups[i][...]` (what lr schedulers do)
ride along with the next push. `state_dict()` / `load_state_dict()` speak torch.optim.Adam's
format, so checkpoints move freely between a local Adam and a remote one, and run torch's
state-dict hooks exactly as torch.optim.Optimizer does. `state` mirrors the server's Adam state.
"""

from __future__ import annotations

import itertools
import logging
import os
import warnings
import weakref
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from copy import deepcopy
from typing import Any

import torch

from adamd.client._client import Client
from adamd.client._compression import check_mode as check_compression
from adamd.client._exceptions import AdamdError, NotFound, StalePush
from adamd.client._overlap import GradStreamer, OpenPush, Queued, same_updates
from adamd.client._protocol import ModelClient
from adamd.client._tls import TLSConfig
from adamd.client._types import ModelInfo, PullResult, PushResult
from adamd.protocol.frames import spec_of
from adamd.protocol.hyper import (
    ADAM_DEFAULTS,
    IMPLEMENTATION_KEYS,
    fused_refusal,
    same_value,
)

_STATE_ORDER = ("step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq")
logger = logging.getLogger(__name__)
_SYNCED_KEYS = tuple(k for k in ADAM_DEFAULTS if k not in IMPLEMENTATION_KEYS)
# The group keys torch.optim.Adam.__setstate__ fills in when a loaded state dict lacks them.
_SETSTATE_DEFAULTS = (
    "amsgrad",
    "maximize",
    "foreach",
    "capturable",
    "differentiable",
    "decoupled_weight_decay",
    "fused",
)


def _copy_for_probe(params: Any) -> Any:
    """A copy of the params argument torch.optim.Adam can consume without touching ours."""
    if isinstance(params, (torch.Tensor, set)) or not isinstance(params, Iterable):
        return params  # torch raises the right error
    out = []
    for p in params:
        out.append(dict(p) if isinstance(p, dict) else p)
    return out


def _as_list(params: Any) -> Any:
    return params if isinstance(params, (torch.Tensor, set)) else list(params)


def _clone(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, tuple):
        return tuple(_clone(v) for v in value)
    return value


class _ServerState(defaultdict):  # type: ignore[type-arg]
    """`RemoteAdam.state`: torch's per-parameter state, mirroring the server's.

    Entries keyed by a parameter hold the server's Adam state (step, exp_avg, exp_avg_sq,
    max_exp_avg_sq), fetched when the mapping is first read after the model changed; they are
    copies, so writing into them changes nothing on the server (load_state_dict does). Other keys
    stay local, as torch keeps them (state-dict hooks use such keys).
    """

    def __init__(self, fetch: Callable[[], dict[torch.Tensor, dict[str, Any]] | None]):
        super().__init__(dict)
        self._fetch = fetch

    def _sync(self) -> None:
        fresh = self._fetch()  # None: nothing changed since the last fetch
        if fresh is None:
            return
        for key in [k for k in dict.keys(self) if isinstance(k, torch.Tensor)]:
            dict.__delitem__(self, key)
        dict.update(self, fresh)

    def __getitem__(self, key: Any) -> Any:
        self._sync()
        return super().__getitem__(key)

    def __contains__(self, key: object) -> bool:
        self._sync()
        return super().__contains__(key)

    def __iter__(self) -> Iterator[Any]:
        self._sync()
        return super().__iter__()

    def __len__(self) -> int:
        self._sync()
        return super().__len__()

    def get(self, key: Any, default: Any = None) -> Any:
        self._sync()
        return super().get(key, default)

    def keys(self) -> Any:
        self._sync()
        return super().keys()

    def values(self) -> Any:
        self._sync()
        return super().values()

    def items(self) -> Any:
        self._sync()
        return super().items()

    def __repr__(self) -> str:
        self._sync()
        return super().__repr__()

    def __eq__(self, other: object) -> bool:
        self._sync()
        return super().__eq__(other)

    __hash__ = None  # type: ignore[assignment]

    def copy(self) -> defaultdict[Any, Any]:  # type: ignore[override]
        self._sync()
        return defaultdict(dict, dict.items(self))

    def __reduce__(self) -> Any:
        # Copies and pickles hold what was read, as a plain defaultdict (no server attached).
        self._sync()
        return (defaultdict, (dict,), None, None, iter(dict.items(self)))


def _checked_like_torch(params: Any, options: Mapping[str, Any]) -> Any:
    """torch's own checks, with torch's own messages (ValueError, TypeError, RuntimeError), on
    `params` made lists all the way down: a group's params may be a generator, which the probe
    would use up (torch takes those). Its warnings (a group listing a parameter twice) come once,
    from Optimizer.__init__ later."""
    if isinstance(params, Iterable) and not isinstance(params, (torch.Tensor, set)):
        params = [
            {**p, "params": _as_list(p["params"])} if isinstance(p, dict) and "params" in p else p
            for p in params
        ]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.optim.Adam(_copy_for_probe(params), **options)
    if options.get("differentiable"):
        raise ValueError(
            "differentiable=True is not supported by RemoteAdam: no autograd graph crosses the wire"
        )
    return params


def _env_rank() -> int | None:
    return int(os.environ["RANK"]) if "RANK" in os.environ else None


def _world(
    world_size: int | str | None, rank: int | None, mode: str
) -> tuple[bool, int, int | None]:
    """(elastic, world size, rank): a fixed world from the arguments or torchrun's variables;
    an elastic one has size 0 and a rank the server assigns at construction (None)."""
    if world_size == "elastic":
        return True, 0, rank if rank is not None else _env_rank()
    size = int(world_size if world_size is not None else os.environ.get("WORLD_SIZE", 1))
    return False, size, _rank(rank, size, mode)


def _rank(rank: int | None, world_size: int, mode: str) -> int:  # a fixed world_size
    """This worker's rank: `rank`, else $RANK; required once there are several workers, since
    every worker silently taking rank 0 only shows up later, as DuplicatePush in a sync round."""
    if rank is None and "RANK" in os.environ:
        rank = int(os.environ["RANK"])
    if rank is None:
        if world_size > 1:
            raise ValueError(
                f"world_size={world_size} needs this worker's rank: pass rank= (0..{world_size - 1})"
                " or set the RANK environment variable (torchrun sets RANK and WORLD_SIZE)"
            )
        return 0
    if mode == "sync" and not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside 0..{world_size - 1} for world_size={world_size}")
    return int(rank)


class RemoteAdam(torch.optim.Optimizer):
    """torch.optim.Adam, computed on an adamd server.

    Extra keyword arguments: `server` (host:port; several servers shard the model: a list, a
    comma-separated string or "adamd-{0..3}.adamd-headless:50051"; default $ADAMD_SERVERS, else
    127.0.0.1:50051), `slice_bytes` (sharded: tensors above it are split), `model` (name on the server), `world_size`
    (workers per sync step; default: $WORLD_SIZE or 1; "elastic": whichever workers are
    registered, see below), `rank` (default: $RANK; required when world_size > 1), `mode` ("sync"
    or "async"), `token`, `tls` (True, or a TLSConfig: see Client), `client` (an existing Client),
    `wire_dtype` (torch.bfloat16 / torch.float16 to halve the bytes on the wire), `transport`
    ("auto": shared memory when the server is on this host, else the bulk-data channel, else
    gRPC; "bulk": the channel, else gRPC; "grpc": always gRPC), `max_staleness`,
    `round_timeout_s` and `lease_s` (used when this worker creates the model), `chunk_bytes`
    (tensor bytes per gRPC frame, both ways), `overlap` (stream gradients to the server while
    backward still runs, over the channel or gRPC; see below), `master_dtype` (torch.float32:
    the server holds bf16/fp16 parameters and their Adam state in float32, while gradients and
    pulled parameters travel in the parameters' own dtype; off unless asked, see
    Client.create_model), `grad_compression` (None;
    "int8": gradients as blockwise absmax int8 with error feedback, about 1 byte per value, the
    quantization error kept per parameter on this worker and added to its next gradient;
    "int8-noef": without the feedback; no overlap with either; not for sharded models yet).

    Overlap (`overlap=True`; off by default): each gradient's bytes leave as soon as backward has
    produced it, and `step()` only sends what is left and waits. A step whose streamed push cannot
    be used falls back to an ordinary push of everything (same push id, applied once): AMP with
    a GradScaler (it unscales at the step; a step that found inf is skipped as always), gradient
    accumulation (a gradient accumulated again after it was sent), gradients changed in place
    after backward (clipping, `unscale_`), a parameter that requires grad left without one. A
    loss (`step(closure)`, `report_loss`) and hyperparameter edits known only at the step ride on
    the stream's closing header. After two such steps
    in a row overlap turns itself off for this optimizer (logged once), so such loops cost
    nothing extra later. Same-host shared memory does not stream, so overlap does not apply there.
    Changes are recognised by torch's version counter of each gradient: an in-place edit that
    torch does not count (through `.data`, or `torch.distributed.all_reduce(p.grad)`) after
    backward goes unseen, and the server would get the gradient as backward left it. That is why
    overlap is opt-in: turn it on where nothing edits gradients that way between backward and step.

    Elastic (`world_size="elastic"`): workers join and leave at any time. Construction registers
    this worker (with `rank` or $RANK if given, else a rank the server assigns, in `self.rank`);
    each step renews the registration, which lapses `lease_s` seconds after the last one; a round
    steps once every registered worker has pushed, averaging over those that did. A step whose
    round closed without it (this worker was slower than its lease) sends nothing more: its
    gradient is dropped, the fresh parameters are pulled, and `last_result` is None. `close()`
    leaves at once.
    """

    def __init__(
        self,
        params: Any,
        lr: float | torch.Tensor = 1e-3,
        betas: tuple[float | torch.Tensor, float | torch.Tensor] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0,
        amsgrad: bool = False,
        *,
        foreach: bool | None = None,
        maximize: bool = False,
        capturable: bool = False,
        differentiable: bool = False,
        fused: bool | None = None,
        decoupled_weight_decay: bool = False,
        server: str | Sequence[str] | None = None,
        model: str = "default",
        world_size: int | str | None = None,
        rank: int | None = None,
        mode: str = "sync",
        token: str | None = None,
        tls: bool | TLSConfig | None = None,
        client: ModelClient | None = None,
        wire_dtype: torch.dtype | None = None,
        transport: str = "auto",
        max_staleness: int = 0,
        round_timeout_s: float = 0.0,
        lease_s: float = 0.0,
        chunk_bytes: int | None = None,
        overlap: bool = False,
        slice_bytes: int | None = None,
        master_dtype: torch.dtype | None = None,
        grad_compression: str | None = None,
    ):
        options: dict[str, Any] = dict(  # torch.optim.Adam's order: param_groups print alike
            lr=lr,
            betas=betas,
            eps=eps,
            weight_decay=weight_decay,
            amsgrad=amsgrad,
            maximize=maximize,
            foreach=foreach,
            capturable=capturable,
            differentiable=differentiable,
            fused=fused,
            decoupled_weight_decay=decoupled_weight_decay,
        )
        params = _checked_like_torch(params, options)
        self.model = model
        self.master_dtype = master_dtype
        self.elastic, self.world_size, self.rank = _world(world_size, rank, mode)
        self.mode = mode
        self.version = 0
        self.last_result: PushResult | None = None
        self._ready = False
        self._registered = False  # elastic: joined, and leaves on close()
        self._names: dict[int, str] = {}
        self._synced: list[dict[str, Any]] = []
        self._pending_loss: float | None = None
        self._state_version: int | None = None  # version `state` was fetched at
        super().__init__(params, options)
        self.state: defaultdict[Any, Any] = _ServerState(self._fetch_state)
        sizes = (("chunk_bytes", chunk_bytes), ("slice_bytes", slice_bytes))
        extra: dict[str, Any] = {key: value for key, value in sizes if value is not None}
        self.grad_compression = check_compression(grad_compression)
        extra |= {"grad_compression": grad_compression} if grad_compression else {}
        self._client: ModelClient = client or Client(
            server, token=token, wire_dtype=wire_dtype, transport=transport, tls=tls, **extra
        )
        if grad_compression is not None and self._client.sharded:
            raise ValueError("grad_compression is not offered for a sharded model yet")
        self._owns_client = client is None
        self._connect(max_staleness, round_timeout_s, lease_s)
        self._synced = [self._options_of(g) for g in self.param_groups]
        # Overlap streams into one server; a sharded model pushes whole at step() (not yet).
        streams = overlap and not self._client.sharded and not grad_compression  # int8: at step()
        self._streamer: GradStreamer | None = GradStreamer() if streams else None
        self._hooks: dict[int, Any] = {}
        self._hook_params(self._unique_params())
        self._ready = True

    def _connect(self, max_staleness: int, round_timeout_s: float, lease_s: float) -> None:
        """Create the model on the server from the local parameters, or join it (the server's
        parameters win); elastic, register this worker."""
        local = self._named_params()
        try:
            info = self._client.describe(self.model)
        except NotFound:
            info = self._client.create_model(
                self.model,
                local,
                param_groups=[self._group_for_server(g) for g in self.param_groups],
                world_size="elastic" if self.elastic else self.world_size,
                mode=self.mode,
                max_staleness=max_staleness,
                round_timeout_s=round_timeout_s,
                lease_s=lease_s,
                exist_ok=True,
                master_dtype=self.master_dtype,
            )
        if info.layout and not self._client.sharded:
            raise ValueError(
                f"model {self.model!r} on {self._client.address} is one shard of a model sharded"
                " over several servers: pass server= all of them, in their order"
            )
        if info.elastic != self.elastic:
            raise ValueError(
                f"model {self.model!r} on the server is "
                f"{'elastic' if info.elastic else f'world_size={info.world_size}'}; pass"
                f" world_size={'elastic' if info.elastic else info.world_size!r} to join it"
            )
        if self.master_dtype is not None and info.master_dtype != self.master_dtype:
            raise ValueError(
                f"model {self.model!r} on the server has master_dtype {info.master_dtype}, here"
                f" it is {self.master_dtype}: not the same model"
            )
        if self.elastic:
            self.rank = self._client.join(self.model, self.rank)
            self._registered = True
        if not info.created:
            self._join(info, local)
        else:
            self.version = info.version

    # --- naming and groups ----------------------------------------------------------------------

    def _name_of(self, p: torch.Tensor) -> str:
        return self._names[id(p)]

    def _named_params(self) -> dict[str, torch.Tensor]:
        return {self._names[id(p)]: p for g in self.param_groups for p in g["params"]}

    @staticmethod
    def _options_of(group: Mapping[str, Any]) -> dict[str, Any]:
        return {k: _clone(group[k]) for k in _SYNCED_KEYS}

    def _unique_params(self) -> list[torch.Tensor]:
        seen: dict[int, torch.Tensor] = {}
        for g in self.param_groups:
            for p in g["params"]:
                seen.setdefault(id(p), p)
        return list(seen.values())

    def _group_for_server(self, group: Mapping[str, Any]) -> dict[str, Any]:
        opts = {k: group[k] for k in ADAM_DEFAULTS}
        return {**opts, "params": [self._name_of(p) for p in group["params"]]}

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """torch's add_param_group; after construction the new group is created on the server too
        (the local values initialize it, unless the server has it already)."""
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        names = group.get("param_names")
        start = len(self._names)
        taken = set(self._names.values())
        for i, p in enumerate(group["params"]):
            if id(p) in self._names:  # listed twice in this group: torch warned and keeps both
                continue
            name = str(names[i]) if names is not None else str(start + i)
            if name in taken:  # two modules' named_parameters() both have "weight": torch takes it
                name = next(f"{name}.{k}" for k in itertools.count(1) if f"{name}.{k}" not in taken)
            taken.add(name)
            self._names[id(p)] = name
        if not self._ready:
            return
        new = {self._name_of(p): p for p in group["params"]}
        listed = [self._name_of(p) for p in group["params"]]  # repeats included
        try:
            info = self._client.describe(self.model)
            index = len(self.param_groups) - 1
            if any(n in info.params for n in new):
                # Rejoining: the server has this group already (another worker added it first).
                there = info.param_groups[index]["params"] if index < len(info.param_groups) else []
                if there != listed:
                    raise ValueError(
                        f"model {self.model!r} on the server has param group {index} as {there},"
                        f" here it is {listed}: not the same model"
                    )
                self._pull_into(new)
            else:
                opts = {k: group[k] for k in ADAM_DEFAULTS}
                self._client.add_param_group(self.model, new, listed=listed, **opts)
        except Exception:
            self.param_groups.pop()
            for p in group["params"]:
                self._names.pop(id(p), None)
            raise
        self._synced.append(self._options_of(group))
        self._state_version = None
        self._hook_params(group["params"])

    def _join(self, info: ModelInfo, local: dict[str, torch.Tensor]) -> None:
        """The model exists: the server's parameters and hyperparameters win."""
        for name, p in local.items():
            have = info.params.get(name)
            if have is None or tuple(p.shape) != have[0]:
                raise ValueError(
                    f"model {self.model!r} on the server has {name!r} as {have}, here it is"
                    f" {tuple(p.shape)}: not the same model"
                )
        here = [[self._name_of(p) for p in g["params"]] for g in self.param_groups]
        there = [g["params"] for g in info.param_groups]
        if here != there[: len(here)]:  # fewer groups is fine: add_param_group rejoins later ones
            raise ValueError(
                f"model {self.model!r} on the server has param groups {there}, here they are"
                f" {here}: not the same model"
            )
        for group, remote in zip(self.param_groups, info.param_groups):
            for key in _SYNCED_KEYS:
                value = remote.get(key)
                if value is None:
                    continue
                if isinstance(group[key], torch.Tensor) and isinstance(value, torch.Tensor):
                    group[key].fill_(value.item())
                elif not same_value(group[key], value):
                    group[key] = value
        self._pull_into(local)

    def _pull_into(self, params: Mapping[str, torch.Tensor]) -> None:
        result = self._client.pull(self.model, list(params), out=params)
        self.version = result.version

    # --- stepping -------------------------------------------------------------------------------

    def report_loss(self, loss: float | torch.Tensor) -> None:
        """Attach a loss to the next push, for the server's charts (step(closure) does it too)."""
        self._pending_loss = float(loss.detach()) if isinstance(loss, torch.Tensor) else float(loss)

    def _updates(self) -> list[tuple[int, dict[str, Any]]]:
        out = []
        for i, (group, synced) in enumerate(zip(self.param_groups, self._synced)):
            changed = {k: group[k] for k in _SYNCED_KEYS if not same_value(group[k], synced[k])}
            if changed:
                out.append((i, changed))
        return out

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if loss is not None and self._pending_loss is None:
            self._pending_loss = (
                float(loss.detach()) if isinstance(loss, torch.Tensor) else float(loss)
            )
        grads: dict[str, torch.Tensor] = {}
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    if p.grad.is_sparse:
                        raise RuntimeError(
                            "Adam does not support sparse gradients, please consider SparseAdam instead"
                        )
                    if p.is_complex():
                        refusal = fused_refusal(group, p)
                        if refusal is not None:
                            raise RuntimeError(refusal)
                    grads[self._name_of(p)] = p.grad
        try:
            result, pulled = self._push(grads)
        except StalePush:
            # Nothing was applied. Pull the current parameters before raising, or every later
            # step would be computed from the same old version and refused again.
            self._pull_into(self._named_params())
            if not self.elastic:
                raise
            # Elastic: the round closed without this worker (its lease lapsed first). The
            # gradient is dropped; training goes on from the fresh parameters.
            self._pending_loss = None
            self.last_result = None
            return loss
        self._pending_loss = None
        for i, changed in self._updates():
            self._synced[i].update({k: _clone(v) for k, v in changed.items()})
        self.last_result = result
        if pulled is None:
            self._pull_into(self._named_params())
        else:
            self.version = pulled.version
        return loss

    def _push(self, grads: dict[str, torch.Tensor]) -> tuple[PushResult, PullResult | None]:
        """Push this step's gradients: by ending the push streamed during backward when it can
        carry them, else as one push (under the streamed push's id, if there was one) that
        brings the new parameters back with it (Client.step; None: pull them next)."""
        found_inf = getattr(self, "found_inf", None)  # set by torch.amp.GradScaler.step
        grad_scale = getattr(self, "grad_scale", None)
        skipped = found_inf is not None and bool(found_inf.item())
        updates = self._updates()
        streamer = self._streamer
        op = streamer.take() if streamer is not None else None
        push_id = None
        if streamer is not None and op is not None:
            push_id = op.stream.header.push_id
            why = GradStreamer.usable(op, grads)
            if why is None and found_inf is not None:
                # GradScaler unscales here, or unscale_() did in place, which torch does not
                # count as a change of the gradient (nor do edits through .data)
                why = "GradScaler unscales the gradients after backward"
            if why is None and not skipped:
                result = self._finish_streamed(op, grads, updates)
                # A stream that keeps failing (a server without closing headers, an idle
                # deadline shorter than backward) stops overlap like any other fallback.
                streamer.note(None if result is not None else "the streamed push failed")
                if result is not None:
                    return result, None
            else:
                op.stream.cancel()
                if not skipped:  # an overflow now and then is no reason to stop overlapping
                    streamer.note(why)
        if skipped:
            grads = {}
        elif grad_scale is not None:
            inv = grad_scale.double().reciprocal().float()
            grads = {n: g.float() * inv.to(g.device) for n, g in grads.items()}
        compression = {"grad_compression": self.grad_compression} if self.grad_compression else {}
        return self._client.step(
            self.model,
            grads,
            self._named_params(),
            version=self.version,
            rank=self.rank or 0,
            push_id=push_id,
            loss=self._pending_loss,
            found_inf=skipped,
            hyper_updates=updates,
            **compression,
        )

    def _finish_streamed(
        self,
        op: OpenPush,
        grads: Mapping[str, torch.Tensor],
        updates: list[tuple[int, dict[str, Any]]],
    ) -> PushResult | None:
        """Send the gradients backward did not hand over, end the stream (with a closing header
        when the loss or the hyperparameter edits are not what the opening one said), and wait
        for the reply. None when the stream failed (the caller pushes again under the same id)."""
        for index, name in enumerate(op.names):
            if index not in op.queued:
                op.stream.send(Queued.of(index, grads[name]))
        loss = self._pending_loss
        amend = loss != op.loss or not same_updates(updates, op.updates, same_value)
        client = self._single()
        result = client.finish_push(op.stream, amend=amend, loss=loss, hyper_updates=updates)
        if result is None:
            logger.debug("model %s: the streamed push failed; pushing again", self.model)
        return result

    def _single(self) -> Client:
        """The client of a model on one server (overlap streams into one; not sharded)."""
        if not isinstance(self._client, Client):
            raise TypeError(f"overlap needs a model on one server, not {type(self._client)}")
        return self._client

    def _open_push(self) -> OpenPush | None:
        """The push this step's gradients stream into while backward runs (the first gradient's
        hook opens it); None where it would not stream (same-host shared memory)."""
        client = self._single()
        if client.wire_dtype is None and client.same_host(self.model):
            return None
        params = [p for p in self._unique_params() if p.requires_grad]
        names = [self._name_of(p) for p in params]
        specs = [spec_of(n, p, client.wire_dtype) for n, p in zip(names, params)]
        updates = self._updates()
        loss = self._pending_loss
        stream = client.open_push(
            self.model,
            specs,
            version=self.version,
            rank=self.rank or 0,
            loss=loss,
            hyper_updates=updates,
        )
        return OpenPush(stream, names, updates, loss)

    def _hook_params(self, params: Iterable[torch.Tensor]) -> None:
        """Overlap: a post-accumulate-grad hook on each parameter hands its gradient over."""
        if self._streamer is None:
            return
        ref = weakref.ref(self)
        for p in params:
            if id(p) in self._hooks or not p.requires_grad:
                continue
            name = self._name_of(p)

            def hook(t: torch.Tensor, name: str = name) -> None:
                opt = ref()
                if opt is not None and opt._streamer is not None and t.grad is not None:
                    opt._streamer.grad_ready(name, t.grad, opt._open_push)

            self._hooks[id(p)] = p.register_post_accumulate_grad_hook(hook)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """torch's zero_grad; a push streamed since the last step is dropped (never applied)."""
        if getattr(self, "_streamer", None) is not None:
            self._streamer.discard()  # type: ignore[union-attr]
        super().zero_grad(set_to_none)

    # GradScaler hands us grad_scale / found_inf instead of skipping the step itself, so a
    # skipped step still reaches the server (a sync round must hear from every worker).
    _step_supports_amp_scaling = True

    # --- state ----------------------------------------------------------------------------------

    def _fetch_state(self) -> dict[torch.Tensor, dict[str, Any]] | None:
        """The server's Adam state by parameter, for `state`; None while it is what we have."""
        if not getattr(self, "_ready", False) or self._state_version == self.version:
            return None
        version = self.version
        remote = self._client.get_state(self.model)["state"]
        out: dict[torch.Tensor, dict[str, Any]] = {}
        for p in self._unique_params():
            entry = remote.get(self._name_of(p))
            if entry is None:
                continue  # no step yet: torch creates state lazily too
            out[p] = {
                k: entry[k] if k == "step" and p.device.type == "cpu" else entry[k].to(p.device)
                for k in _STATE_ORDER
                if k in entry
            }
        self._state_version = version
        return out

    def state_dict(self) -> dict[str, Any]:
        """torch.optim.Adam's state_dict, built by torch's own Optimizer.state_dict (its packing
        and its pre and post hooks) over `state` fetched fresh from the server."""
        self._state_version = None
        return super().state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state_dict saved by torch.optim.Adam (or RemoteAdam) into the server.

        Follows torch.optim.Optimizer.load_state_dict step for step: pre hooks on a shallow copy,
        the same checks and messages, saved groups replace ours (keeping our params, and our
        param_names where the saved ones have none), state not keyed by a parameter index stays
        local, post hooks last. The Adam state and hyperparameters go to the server in one call."""
        state_dict = state_dict.copy()
        for pre_hook in self._optimizer_load_state_dict_pre_hooks.values():
            hook_result = pre_hook(self, state_dict)
            if hook_result is not None:
                state_dict = hook_result
        groups = self.param_groups
        saved = deepcopy(state_dict["param_groups"])
        if len(groups) != len(saved):
            raise ValueError("loaded state dict has a different number of parameter groups")
        if any(len(g["params"]) != len(s["params"]) for g, s in zip(groups, saved)):
            raise ValueError(
                "loaded state dict contains a parameter group that doesn't match the size of optimizer's group"
            )
        id_to_name = {}
        for g, s in zip(groups, saved):
            for p, i in zip(g["params"], s["params"]):
                id_to_name[i] = self._name_of(p)
        state: dict[str, dict[str, torch.Tensor]] = {}
        local: dict[Any, Any] = {}
        for i, entry in state_dict["state"].items():
            if i not in id_to_name:
                local[i] = entry  # torch keeps such entries as they are
                continue
            state[id_to_name[i]] = {
                k: v if isinstance(v, torch.Tensor) else torch.tensor(float(v))
                for k, v in entry.items()
            }
        for s in saved:  # what torch.optim.Adam.__setstate__ fills into an older state dict
            for k in _SETSTATE_DEFAULTS:
                s.setdefault(k, ADAM_DEFAULTS[k])
        server_groups = []
        for g, s in zip(groups, saved):
            opts = {k: s[k] for k in _SYNCED_KEYS if k in s}
            server_groups.append({**opts, "params": [self._name_of(p) for p in g["params"]]})
        self._client.load_state(self.model, state, server_groups)
        for g, s in zip(groups, saved):
            s["params"] = g["params"]
            if "param_names" in g and "param_names" not in s:
                s["param_names"] = g["param_names"]
        self.param_groups = saved
        self._synced = [self._options_of(g) for g in saved]
        self.state = _ServerState(self._fetch_state)
        dict.update(self.state, local)
        self._state_version = None
        for post_hook in self._optimizer_load_state_dict_post_hooks.values():
            post_hook(self)

    # --- copies --------------------------------------------------------------------------------

    def __getstate__(self) -> dict[str, Any]:
        """Everything, so a deepcopy keeps torch's public attributes and ours; the copy steps the
        same server model through the same connection (a Client copies as itself)."""
        state = dict(self.__dict__)
        state["_names"] = [self._names[id(p)] for p in self._unique_params()]
        state["_owns_client"] = False
        state["_registered"] = False  # a copy closing must not deregister this worker
        state["_streamer"] = None  # hooks belong to these parameters: a copy does not overlap
        state["_hooks"] = {}
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        names = state.pop("_names", None)
        super().__setstate__(state)
        if names is None:  # torch's own (defaults, state, param_groups) form
            return
        self._names = {id(p): n for p, n in zip(self._unique_params(), names)}
        local = {k: v for k, v in dict.items(self.state) if not isinstance(k, torch.Tensor)}
        self.state = _ServerState(self._fetch_state)
        dict.update(self.state, local)
        self._state_version = None

    def close(self) -> None:
        """Elastic: leave the run (rounds stop waiting for this worker). Close the connection
        if this optimizer made it."""
        if getattr(self, "_streamer", None) is not None:
            self._streamer.discard()  # type: ignore[union-attr]
            self._streamer = None
        for handle in getattr(self, "_hooks", {}).values():
            handle.remove()
        self._hooks = {}
        if getattr(self, "_registered", False) and self.rank is not None:
            self._registered = False
            try:
                self._client.leave(self.model, self.rank)
            except AdamdError:
                logger.warning("model %s: rank %s could not leave", self.model, self.rank)
        if self._owns_client:
            self._client.close()

    @property
    def client(self) -> Client:
        return self._client
