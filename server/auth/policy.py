"""Who may do what: principals, their grants of a role over model-name patterns, and the check.

Roles are ordered, each holding the one below: **read** (list, inspect, pull, get_state,
history, dashboard data), **train** (read + push, step, join/leave, hyperparameter edits),
**admin** (train + create, delete, load_state, add_param_group, snapshots). `/metrics` is a grant
of its own (`metrics = true`), apart from any model.

`ACTIONS` is the one table of what every way in needs: each gRPC method, each bulk-channel
request kind and each HTTP route, by name. The operations layer (`Operations.guard`) calls
`Policy.identify` and `Policy.permit` for every call; transports only extract the credential (a
bearer token, a client certificate's identities) into a `Caller`.

Refusals: an unknown caller is `Unauthenticated`; a known one without the role is
`PermissionDenied` naming the role it needs, except that a model it may not even read is
`NotFound`, worded as for a model that does not exist, so names do not leak.
"""

from __future__ import annotations

import enum
import fnmatch
import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field

from adamd.server.errors import NotFound, PermissionDenied, Unauthenticated


class Role(enum.IntEnum):
    READ = 1
    TRAIN = 2
    ADMIN = 3

    def __str__(self) -> str:
        return self.name.lower()


@dataclass(frozen=True)
class Need:
    """What one action needs. `role` None: any known caller (no model involved)."""

    role: Role | None
    audit: str = ""  # the audit log's name for a change ("": not audited)
    metrics: bool = False  # needs the metrics grant instead of a role
    creates: bool = False  # the model need not exist: no grant at all is PermissionDenied


R, T, A = Role.READ, Role.TRAIN, Role.ADMIN
ACTIONS: Mapping[str, Need] = {
    # gRPC (adamd.v1.Optimizer)
    "ListModels": Need(None),  # lists only the models the caller may read
    "DescribeModel": Need(R),
    "PullParams": Need(R),
    "GetState": Need(R),
    "Attach": Need(R),  # same-host: the parameters' shared memory (pushes still need train)
    "Detach": Need(R),
    "OpenBulk": Need(None),  # the ticket carries the caller; each bulk request is checked
    "PushGrad": Need(T),
    "Join": Need(T, audit="join"),
    "Leave": Need(T, audit="leave"),
    "SetHyperparams": Need(T, audit="set_hyperparams"),
    "CreateModel": Need(A, audit="create", creates=True),
    "DeleteModel": Need(A, audit="delete"),
    "LoadState": Need(A, audit="load_state"),
    "AddParamGroup": Need(A, audit="add_param_group"),
    "Snapshot": Need(A, audit="snapshot"),
    # the bulk-data channel (server/transport/bulk/), by request kind
    "bulk PULL": Need(R),
    "bulk PUSH": Need(T),
    "bulk STEP": Need(T),  # a push and then a pull of the same model
    # HTTP (server/http/app.py)
    "GET /v1/models": Need(None),  # lists only the models the caller may read
    "GET /v1/models/{model}": Need(R),
    "GET /v1/models/{model}/params": Need(R),
    "GET /v1/models/{model}/history": Need(R),
    "GET /v1/models/{model}/snapshot": Need(R),  # the weights and state, as a pull + GetState
    "POST /v1/models/{model}/param_groups/{group}": Need(T, audit="set_hyperparams"),
    "POST /v1/models/{model}/snapshot": Need(A, audit="snapshot"),
    "DELETE /v1/models/{model}": Need(A, audit="delete"),
    "GET /metrics": Need(None, metrics=True),
}


def token_sha256(token: str) -> str:
    """How an auth file stores a token: its SHA-256, hex (`adamd auth hash-token`)."""
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass(frozen=True)
class Caller:
    """A call's credentials as its transport found them; never the token itself."""

    token_sha256: str | None = None  # None: no token sent; "": a header that is no bearer token
    identities: tuple[str, ...] = ()  # the client certificate's subject CN and SANs (mTLS)

    @classmethod
    def of(cls, authorization: str | None, identities: tuple[str, ...] = ()) -> Caller:
        """`authorization`: the 'Bearer <token>' a gRPC call's metadata or an HTTP header holds."""
        if authorization is None:
            return cls(None, identities)
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or not token:
            return cls("", identities)
        return cls(token_sha256(token), identities)


ANYONE = Caller()


@dataclass(frozen=True)
class Principal:
    name: str
    grants: tuple[tuple[str, Role], ...] = ()  # (model-name glob, role)
    metrics: bool = False  # may read /metrics
    # Only these actions (None: any): the legacy `--token-file` server leaves a few HTTP
    # statistics routes open to callers without the token, and nothing else.
    only: frozenset[str] | None = None

    def role_on(self, model: str) -> Role | None:
        """The highest role any of its grants gives over `model` (None: none)."""
        roles = [role for pattern, role in self.grants if fnmatch.fnmatchcase(model, pattern)]
        return max(roles) if roles else None


@dataclass(frozen=True)
class Policy:
    by_token: Mapping[str, Principal] = field(default_factory=dict)  # token sha256 -> principal
    by_identity: Mapping[str, Principal] = field(default_factory=dict)  # cert CN or SAN
    anonymous: Principal | None = None  # a caller with no credential (None: refused)
    source: str = "no access control"

    @property
    def principal_names(self) -> list[str]:
        """The names of every principal known by a token or a certificate identity."""
        return sorted({p.name for p in (*self.by_token.values(), *self.by_identity.values())})

    @property
    def open(self) -> bool:
        """Anyone may do anything (no --auth-file, no --token-file)."""
        a = self.anonymous
        return a is not None and a.only is None and a.metrics and ("*", Role.ADMIN) in a.grants

    def identify(self, caller: Caller) -> Principal:
        """Who `caller` is. A token sent must be known (a wrong one is refused, whatever else
        the call carries); without one, the client certificate's identity, then anonymous."""
        if caller.token_sha256 is not None:
            found = self.by_token.get(caller.token_sha256)
            if found is None:
                raise Unauthenticated(
                    "unknown or malformed token: send 'authorization: Bearer <token>'"
                    " (gRPC metadata or HTTP header) with a token the server knows"
                )
            return found
        for identity in caller.identities:
            if identity in self.by_identity:
                return self.by_identity[identity]
        if self.anonymous is None:
            raise Unauthenticated(
                "this server needs credentials: a token ('authorization: Bearer <token>')"
                " or a client certificate it knows"
            )
        return self.anonymous

    def permit(self, who: Principal, action: str, model: str | None) -> None:
        """Raise unless `who` may do `action` (a key of ACTIONS) on `model`."""
        need = ACTIONS[action]
        if who.only is not None and action not in who.only:
            raise Unauthenticated(
                "missing or wrong token: send 'authorization: Bearer <token>'"
                " (gRPC metadata or HTTP header)"
            )
        if need.metrics and not who.metrics:
            raise PermissionDenied(f"/metrics needs the metrics grant; {who.name!r} has none")
        if need.role is None or model is None:
            return
        have = who.role_on(model)
        if have is None and not need.creates:
            raise NotFound(f"no model named {model!r}")  # as the registry says it
        if have is None or have < need.role:
            raise PermissionDenied(
                f"{action} on model {model!r} needs the {need.role} role;"
                f" {who.name!r} has {have or 'no role'} there"
            )

    def may_read(self, who: Principal, model: str) -> bool:
        role = who.role_on(model)
        return role is not None and role >= Role.READ


OPEN = Policy(anonymous=Principal("anonymous", (("*", Role.ADMIN),), metrics=True))

# Without the token, a --token-file server answers these (as before access control) and no more.
LEGACY_OPEN_ROUTES = frozenset(
    {"GET /v1/models", "GET /v1/models/{model}", "GET /v1/models/{model}/history", "GET /metrics"}
)


def token_policy(token: str) -> Policy:
    """`--token-file`: one admin principal over every model; the open HTTP statistics stay open."""
    admin = Principal("token", (("*", Role.ADMIN),), metrics=True)
    anonymous = Principal("anonymous", (("*", Role.READ),), metrics=True, only=LEGACY_OPEN_ROUTES)
    return Policy({token_sha256(token): admin}, {}, anonymous, source="--token-file")
