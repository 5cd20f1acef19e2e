"""Every operation the daemon offers, once: who may call, the core call, and what follows a change.

The gRPC servicer and the FastAPI app both call these and only translate requests, replies and
errors. A mutating operation ends in `_changed(model)`, the one place durable mode waits until the
change is on disk, so no adapter route can forget it. Methods here may block (a step, a snapshot,
a durable write); the asynchronous gRPC adapter runs them on its worker threads, never on its
event loop.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import torch

from adamd.server.auth import ACTIONS, Access, Caller, Principal
from adamd.server.config import adamd_version
from adamd.server.core.limits import Limits, tensor_bytes
from adamd.server.core.model import HostedModel, PushMeta, PushTicket
from adamd.server.core.registry import ModelRegistry, ModelSpec, PendingModel
from adamd.server.errors import (
    FailedPrecondition,
    InvalidArgument,
    LimitExceeded,
    ServerError,
    SessionExpired,
)
from adamd.v1 import adamd_pb2 as pb

if TYPE_CHECKING:
    from adamd.server.core.stats import StatsBook
    from adamd.server.storage.snapshots import SnapshotManager

TensorSpecs = Sequence[tuple[str, tuple[int, ...], torch.dtype]]


class SameHostSessions(Protocol):
    """The same-host shared-memory sessions (`transport.same_host.SameHost`) as this layer uses
    them: where a session's pushed gradients lie, and the Attach/Detach calls."""

    def grads(self, model: HostedModel, session: str, names: list[str]) -> list[torch.Tensor]: ...

    def attach(self, req: pb.AttachRequest) -> pb.AttachReply: ...

    def detach(self, req: pb.DetachRequest) -> pb.DetachReply: ...


@dataclass
class ServerFacts:
    """What /v1/models says about the server itself (the address is known once gRPC is bound)."""

    device: torch.device
    grpc_address: str = ""
    started_at: float = 0.0
    stats_every: int = 0
    ready: bool = False  # gRPC serving and every snapshot restored


class Operations:
    def __init__(
        self,
        registry: ModelRegistry,
        *,
        access: Access | None = None,
        durable: bool = False,
        stats: StatsBook | None = None,
        snapshots: SnapshotManager | None = None,
        same_host: SameHostSessions | None = None,
        limits: Limits | None = None,
    ):
        self.registry = registry
        self.limits = limits or registry.limits
        # Who may call (server/auth; the daemon builds it from --auth-file or --token-file).
        # None: anyone may do anything.
        self.access = access or Access()
        self.durable = durable
        self.stats = stats
        self.snapshots = snapshots
        self.same_host = same_host
        self.facts = ServerFacts(device=registry.device, started_at=time.time())

    # --- who may call ---------------------------------------------------------------------------

    def admit(self, caller: Caller, action: str) -> Principal:
        """Who `caller` is, refused now (before a request's bytes are read) when it is nobody
        the policy knows or may not do `action` at all; the model's check is `guard`'s."""
        return self._permit(caller, action, None)

    def _permit(self, caller: Caller, action: str, model: str | None) -> Principal:
        """The principal `caller` is, if it may do `action` on `model`; a refused change (the
        table's `audit`) is written to the audit log before the refusal is raised."""
        need = ACTIONS[action]
        policy = self.access.policy
        name = "(unauthenticated)"
        try:
            who = policy.identify(caller)
            name = who.name
            policy.permit(who, action, model)
        except ServerError as exc:
            if need.audit:
                self.access.audit.write(name, model, need.audit, exc.kind, action)
            raise
        return who

    @contextlib.contextmanager
    def guard(self, caller: Caller, action: str, model: str | None = None) -> Iterator[Principal]:
        """The one check of every way in: `caller` may do `action` (a key of
        server/auth/policy.py's ACTIONS) on `model`, or this raises Unauthenticated,
        PermissionDenied or NotFound. A change (the table's `audit`) is written to the audit
        log with its outcome when the block ends, a refused one too."""
        who = self._permit(caller, action, model)
        audit = ACTIONS[action].audit
        if not audit:
            yield who
            return
        outcome = "OK"
        try:
            yield who
        except BaseException as exc:
            outcome = exc.kind if isinstance(exc, ServerError) else type(exc).__name__
            raise
        finally:
            self.access.audit.write(who.name, model, audit, outcome, action)

    def check(self, caller: Caller, action: str, model: str | None = None) -> Principal:
        """`guard` for an action that is not audited (a push, a pull): only the check."""
        return self._permit(caller, action, model)

    def readable(self, caller: Caller, action: str) -> list[HostedModel]:
        """The models `caller` may read (listings show no others), after `admit`."""
        policy = self.access.policy
        who = self.admit(caller, action)
        return [m for m in self.registry.models() if policy.may_read(who, m.name)]

    # --- reads ----------------------------------------------------------------------------------

    def model(self, name: str) -> HostedModel:
        return self.registry.get(name)

    def models(self) -> list[HostedModel]:
        return self.registry.models()

    def server_info(self) -> dict[str, Any]:
        return {
            "version": adamd_version(),
            "device": str(self.facts.device),
            "grpc_address": self.facts.grpc_address,
            "uptime_s": time.time() - self.facts.started_at,
            "stats_every": self.facts.stats_every,
            "token_required_for_operations": not self.access.policy.open,
            "torch": torch.__version__,
        }

    # --- models ---------------------------------------------------------------------------------

    def begin_create(self, spec: ModelSpec) -> PendingModel:
        return self.registry.begin_create(spec)

    def commit_create(self, pending: PendingModel) -> tuple[HostedModel, bool]:
        return self.registry.commit(pending)

    def delete(self, name: str) -> None:
        self.registry.delete(name)

    def snapshot(self, name: str) -> pb.SnapshotInfo:
        self.registry.get(name)
        if self.snapshots is None:
            raise FailedPrecondition("snapshots are not enabled on this server")
        return self.snapshots.snapshot(name)

    # --- edits ----------------------------------------------------------------------------------

    def set_hyperparams(
        self, name: str, updates: Sequence[tuple[int, Mapping[str, Any]]]
    ) -> HostedModel:
        model = self.registry.get(name)
        model.set_hyperparams(updates)
        self._changed(model)
        return model

    def new_group_tensors(
        self, name: str, specs: TensorSpecs, group: Mapping[str, Any]
    ) -> dict[str, torch.Tensor]:
        """Check a new param group's header; host tensors its values stream into."""
        model = self.registry.get(name)
        new_bytes = self.limits.check_specs(
            "the new param group", model.precision.held_specs(specs)
        )
        self.limits.check_model_bytes(
            f"model {name!r} with the new group", _param_bytes(model) + new_bytes
        )
        if len(model.params) + len(specs) > self.limits.max_tensors:
            raise LimitExceeded(
                f"model {name!r} would hold {len(model.params) + len(specs)} parameters; at most"
                f" {self.limits.max_tensors} (--max-tensors)"
            )
        if sorted(group["params"]) != sorted(n for n, _, _ in specs):
            raise InvalidArgument(
                "the new group's params must be exactly the parameters sent with it"
            )
        existing = [n for n, _, _ in specs if n in model.params]
        if existing:
            raise InvalidArgument(f"parameters {existing} exist already")
        return {n: torch.empty(shape, dtype=dtype) for n, shape, dtype in specs}

    def add_param_group(
        self,
        name: str,
        tensors: Mapping[str, torch.Tensor],
        group: Mapping[str, Any],
        layout: str = "",
    ) -> HostedModel:
        """`layout`: a sharded model's layout record with the new group (kept with the group)."""
        model = self.registry.get(name)
        if bool(layout) != bool(model.layout):
            raise FailedPrecondition(
                f"model {name!r} is {'sharded' if model.layout else 'not sharded'}: a new param"
                " group must come from a client with the same servers"
            )
        model.add_param_group({n: t.to(model.device) for n, t in tensors.items()}, group, layout)
        self._changed(model)
        return model

    def new_state_tensors(
        self, name: str, specs: TensorSpecs, entries: Mapping[str, Mapping[str, int]]
    ) -> list[torch.Tensor]:
        """Check a LoadState header against the model, then host tensors its values stream into.

        `entries[param][key]` is the index in `specs` of that state tensor. Each declared tensor
        must be one a state can hold (a parameter's shape, or one element for `step`), so what
        is allocated is bounded by the model itself, whatever the header says."""
        model = self.registry.get(name)
        if len(specs) > 4 * max(len(model.params), 1):
            raise LimitExceeded(
                f"state declares {len(specs)} tensors for {len(model.params)} parameters"
            )
        wanted: dict[int, tuple[int, ...] | None] = {}  # index -> shape (None: one element)
        for param, index in entries.items():
            p = model.params.get(param)
            if p is None:
                raise InvalidArgument(f"state names unknown parameter {param!r}")
            for key, i in index.items():
                if not 0 <= i < len(specs):
                    raise InvalidArgument(f"state of {param!r} points past the tensors sent")
                wanted[i] = None if key == "step" else tuple(p.shape)
        for i, (tname, shape, dtype) in enumerate(specs):
            tensor_bytes(tname, shape, dtype)  # dims sane
            want = wanted.get(i, ())
            if want == ():
                raise InvalidArgument(f"state tensor {i} ({tname!r}) belongs to no parameter")
            if (want is None and _numel(shape) != 1) or (want is not None and shape != want):
                raise InvalidArgument(
                    f"state tensor {tname!r} has shape {list(shape)}, its parameter needs"
                    f" {'one element' if want is None else list(want)}"
                )
        return [torch.empty(shape, dtype=dtype) for _, shape, dtype in specs]

    def load_state(
        self,
        name: str,
        state: Mapping[str, Mapping[str, torch.Tensor]],
        groups: Sequence[Mapping[str, Any]] | None,
    ) -> HostedModel:
        model = self.registry.get(name)
        for param, entry in state.items():
            for key, t in entry.items():
                if (t.is_floating_point() or t.is_complex()) and not bool(torch.isfinite(t).all()):
                    raise InvalidArgument(
                        f"state {key} of {param!r} holds inf or nan; a shared model must not"
                        " load it (every later step would spread it)"
                    )
        model.load_state(state, groups)
        self._changed(model)
        return model

    # --- pushes ---------------------------------------------------------------------------------

    def begin_push(
        self, name: str, meta: PushMeta, specs: TensorSpecs, session: str = ""
    ) -> tuple[HostedModel, PushTicket]:
        """Check a push's header and hand out where its gradient goes (stream buffers, or the
        same-host session's file)."""
        self.limits.check_push_id(meta.push_id)
        self.limits.check_specs("the push", specs)
        model = self.registry.get(name)
        buffers = None
        if session:
            same_host = self.same_host
            if same_host is None:
                raise SessionExpired(
                    "same-host sessions are off on this server; push over the stream"
                )
            buffers = lambda names: same_host.grads(model, session, names)
        return model, model.begin_push(meta, specs, buffers)

    @staticmethod
    def amend_push(model: HostedModel, ticket: PushTicket, closing: PushMeta) -> None:
        """A push's closing header (sent after its gradients): its found_inf, loss, scalars and
        hyperparameter edits replace the opening header's; its other fields are ignored."""
        model.groups.check(closing.hyper_updates)
        ticket.meta = dataclasses.replace(
            ticket.meta,
            found_inf=closing.found_inf,
            loss=closing.loss,
            scalars=closing.scalars,
            hyper_updates=closing.hyper_updates,
        )

    def pushed(self, model: HostedModel) -> None:
        """A push's outcome is known: what follows a change (durable mode waits here)."""
        self._changed(model)

    # --- elastic membership --------------------------------------------------------------------

    def join(self, name: str, rank: int | None) -> tuple[HostedModel, int]:
        """Register a worker with an elastic model; its rank (assigned when `rank` is None)."""
        model = self.registry.get(name)
        return model, model.rounds.join(rank)

    def leave(self, name: str, rank: int) -> bool:
        """Deregister a worker; a round that waited only for it steps now."""
        model = self.registry.get(name)
        left = model.rounds.leave(rank)
        self._changed(model)
        return left

    # --- same-host sessions ---------------------------------------------------------------------

    def attach(self, req: pb.AttachRequest) -> pb.AttachReply:
        self.registry.get(req.model)
        if self.same_host is None:
            return pb.AttachReply(
                accepted=False, reason="the same-host fast path is off on this server"
            )
        return self.same_host.attach(req)

    def detach(self, req: pb.DetachRequest) -> pb.DetachReply:
        if self.same_host is None:
            return pb.DetachReply()
        return self.same_host.detach(req)

    # --- what follows a change ------------------------------------------------------------------

    def _changed(self, model: HostedModel) -> None:
        if self.durable and self.snapshots is not None:
            self.snapshots.make_durable(model.name)


def _numel(shape: Sequence[int]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _param_bytes(model: HostedModel) -> int:
    return sum(p.numel() * p.element_size() for p in model.params.values())
