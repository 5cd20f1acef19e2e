"""`RemoteAdam`: a torch.optim.Optimizer whose Adam runs on an adamd server.

Construct it exactly like torch.optim.Adam, plus where the server is. `step()` pushes the
non-None gradients, the server steps its real torch.optim.Adam, and the fresh parameters are
written into the local tensors in place. Edits to `param_groups[i][...]` (what lr schedulers do)
ride along with the next push. `state_dict()` / `load_state_dict()` speak torch.optim.Adam's
format, so checkpoints move freely between a local Adam and a remote one, and run torch's
state-dict hooks exactly as torch.optim.Optimizer does. `state` mirrors the server's Adam state.
"""

from __future__ import annotations

import logging
import weakref
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch

from adamd.client._client import Client
from adamd.client._compression import check_mode as check_compression
from adamd.client._exceptions import AdamdError, NotFound, StalePush
from adamd.client._overlap import GradStreamer, OpenPush, finish_open
from adamd.client._param_groups import (
    adopt_options,
    changed_options,
    check_joinable,
    check_same_model,
    checked_like_torch,
    clone,
    gradients,
    group_for_server,
    name_new_params,
    options_of,
    world,
)
from adamd.client._protocol import ModelClient
from adamd.client._remote_state import ServerState, by_param, for_server
from adamd.client._tls import TLSConfig
from adamd.client._types import ModelInfo, PullResult, PushResult
from adamd.protocol.frames import spec_of
from adamd.protocol.hyper import (
    ADAM_DEFAULTS,
)

logger = logging.getLogger(__name__)


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
        params = checked_like_torch(params, options)
        self.model = model
        self.master_dtype = master_dtype
        self.elastic, self.world_size, self.rank = world(world_size, rank, mode)
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
        self.state: defaultdict[Any, Any] = ServerState(self._fetch_state)
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
        self._synced = [options_of(g) for g in self.param_groups]
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
                param_groups=[
                    group_for_server(g, [self._name_of(p) for p in g["params"]])
                    for g in self.param_groups
                ],
                world_size="elastic" if self.elastic else self.world_size,
                mode=self.mode,
                max_staleness=max_staleness,
                round_timeout_s=round_timeout_s,
                lease_s=lease_s,
                exist_ok=True,
                master_dtype=self.master_dtype,
            )
        where = None if self._client.sharded else self._client.address
        check_joinable(self.model, info, where, self.elastic, self.master_dtype)
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

    def _unique_params(self) -> list[torch.Tensor]:
        seen: dict[int, torch.Tensor] = {}
        for g in self.param_groups:
            for p in g["params"]:
                seen.setdefault(id(p), p)
        return list(seen.values())

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """torch's add_param_group; after construction the new group is created on the server too
        (the local values initialize it, unless the server has it already)."""
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        name_new_params(group, self._names)
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
        self._synced.append(options_of(group))
        self._state_version = None
        self._hook_params(group["params"])

    def _join(self, info: ModelInfo, local: dict[str, torch.Tensor]) -> None:
        """The model exists: the server's parameters and hyperparameters win."""
        here = [[self._name_of(p) for p in g["params"]] for g in self.param_groups]
        check_same_model(self.model, info, local, here)
        adopt_options(self.param_groups, info.param_groups)
        self._pull_into(local)

    def _pull_into(self, params: Mapping[str, torch.Tensor]) -> None:
        result = self._client.pull(self.model, list(params), out=params)
        self.version = result.version

    # --- stepping -------------------------------------------------------------------------------

    def report_loss(self, loss: float | torch.Tensor) -> None:
        """Attach a loss to the next push, for the server's charts (step(closure) does it too)."""
        self._pending_loss = float(loss.detach()) if isinstance(loss, torch.Tensor) else float(loss)

    def _updates(self) -> list[tuple[int, dict[str, Any]]]:
        return changed_options(self.param_groups, self._synced)

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
        grads = gradients(self.param_groups, self._name_of)
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
            self._synced[i].update({k: clone(v) for k, v in changed.items()})
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
        push_id = None
        if self._streamer is not None:

            def finish(op: OpenPush) -> PushResult | None:
                finish_push = self._single().finish_push
                return finish_open(op, grads, self._pending_loss, updates, finish_push)

            result, push_id = self._streamer.finish_step(grads, found_inf, skipped, finish)
            if result is not None:
                return result, None
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
        out = by_param(remote, self._unique_params(), self._name_of)
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
        saved, state, local, server_groups = for_server(groups, state_dict, self._name_of)
        self._client.load_state(self.model, state, server_groups)
        for g, s in zip(groups, saved):
            s["params"] = g["params"]
            if "param_names" in g and "param_names" not in s:
                s["param_names"] = g["param_names"]
        self.param_groups = saved
        self._synced = [options_of(g) for g in saved]
        self.state = ServerState(self._fetch_state)
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
        self.state = ServerState(self._fetch_state)
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
