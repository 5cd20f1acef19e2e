"""`ShardedClient`: one model over several adamd servers, as a thin layer over one ordinary
`Client` per server.

`Client("a:50051,b:50051,c:50051")` (or a list, the `adamd-{0..2}.adamd-headless:50051` form, or
`ADAMD_SERVERS`) returns one of these. Each parameter lives on one shard, or, above
`slice_bytes`, in row slices on several (`adamd.protocol.layout`); every call fans out to the shards
concurrently on a thread pool, each shard's transfer on its own connection (shared memory where
that shard is on this host). The layout is recorded on every shard at creation; a client listing
other servers, or another order, is refused. Sync mode: every push goes to every shard (an empty
one where a shard holds none of the gradients) under one push id, so each shard runs the same
rounds and applies each push exactly once; a pull returns parameters of one version on every
shard, waiting for a shard that is behind. Async mode: each shard counts its own steps; a pull
may combine shards that applied a different number of pushes (the version returned is the
lowest).
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, NoReturn, TypeVar

import torch

from adamd.client._client import Client
from adamd.client._exceptions import (
    AdamdError,
    DeadlineExceeded,
    FailedPrecondition,
    NotFound,
    StalePush,
)
from adamd.client._shard_layout import (
    assemble,
    check_grads,
    check_layouts,
    check_out,
    check_state,
    gather,
    groups_on,
    merged_info,
    merged_push,
    merged_snapshot,
    merged_state,
    on_shard,
    plan,
    state_part,
    with_group,
)
from adamd.client._types import ModelInfo, PullResult, PushResult
from adamd.protocol.layout import DEFAULT_SLICE_BYTES, Layout
from adamd.v1 import adamd_pb2 as pb

T = TypeVar("T")
_WAIT_ROUNDS = 4  # pulls re-asked of shards behind, before giving up on one version


class ShardedClient:
    """One model over several adamd servers: one `Client` per shard behind the calls a single
    server's Client offers (adamd.client._protocol.ModelClient)."""

    sharded = True

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
        tls: Any = None,
        slice_bytes: int = DEFAULT_SLICE_BYTES,
        grad_compression: str | None = None,
    ):
        if grad_compression is not None:
            raise ValueError(
                "grad_compression is not offered for a model sharded over several servers yet"
            )
        from adamd.client._addresses import parse_servers

        servers = parse_servers(address)
        if slice_bytes < 1:
            raise ValueError(f"slice_bytes must be at least 1, got {slice_bytes}")
        kw = dict(
            token=token,
            timeout=timeout,
            retry_timeout=retry_timeout,
            chunk_bytes=chunk_bytes,
            wire_dtype=wire_dtype,
            transport=transport,
            tls=tls,
        )
        self.shards = [Client(a, **kw) for a in servers]  # type: ignore[arg-type]
        self.servers = servers
        self.address = ",".join(servers)
        self.slice_bytes = slice_bytes
        self.timeout = timeout
        self.retry_timeout = retry_timeout
        self.chunk_bytes = self.shards[0].chunk_bytes
        self.wire_dtype = wire_dtype
        self.transport = transport
        self.tls = bool(tls)
        self._layouts: dict[str, Layout] = {}
        self._modes: dict[str, str] = {}
        self._pool = ThreadPoolExecutor(len(servers), thread_name_prefix="adamd-shard")

    def close(self) -> None:
        for c in self.shards:
            c.close()
        self._pool.shutdown(wait=False)

    def __deepcopy__(self, memo: dict[int, Any]) -> ShardedClient:
        return self  # connections, not values (as Client)

    def __enter__(self) -> ShardedClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- fan-out --------------------------------------------------------------------------------

    def _each(
        self, fn: Callable[[int, Client], T], shards: Sequence[int] | None = None
    ) -> dict[int, T]:
        """fn(k, shard k's client) on every shard (or `shards`) concurrently; waits for all,
        then raises the first failure (by shard order), naming its shard."""
        ks = range(len(self.shards)) if shards is None else shards
        out, failure = gather({k: self._pool.submit(fn, k, self.shards[k]) for k in ks})
        if failure is not None:
            self._raise(failure)
        return out

    def _raise(self, failure: tuple[int, BaseException]) -> NoReturn:
        k, err = failure
        if isinstance(err, AdamdError):
            raise on_shard(k, self.servers[k], err) from err
        raise err

    # --- layout ---------------------------------------------------------------------------------

    def layout(self, model: str) -> Layout:
        """The model's layout (read from the shards on first use, and checked)."""
        if model not in self._layouts:
            self.describe(model)
        return self._layouts[model]

    def _check_layouts(self, model: str, infos: Mapping[int, ModelInfo]) -> Layout:
        return check_layouts(model, self.servers, infos)

    def _merge(self, model: str, infos: Mapping[int, ModelInfo], layout: Layout) -> ModelInfo:
        """The shards' infos as one, their layout and mode remembered."""
        self._layouts[model] = layout
        self._modes[model] = infos[0].mode
        return merged_info(infos, layout)

    # --- models ---------------------------------------------------------------------------------

    def create_model(
        self,
        model: str,
        params: Mapping[str, torch.Tensor],
        *,
        param_groups: Sequence[Mapping[str, Any]] | None = None,
        exist_ok: bool = False,
        **kwargs: Any,
    ) -> ModelInfo:
        """Client.create_model over the shards: place the parameters, create each shard's part
        with the layout recorded. If a shard refuses, the parts this call created are deleted."""
        names = list(params)
        groups = list(param_groups or [{"params": names}])
        layout = plan(self.servers, params, groups, self.slice_bytes)

        def create(k: int, c: Client) -> ModelInfo:
            on = set(layout.names_on(k))
            return c.create_model(
                model,
                layout.shard_params(k, {n: params[n] for n in names if n in on}),
                param_groups=groups_on(groups, on),
                exist_ok=exist_ok,
                layout=layout.record(k),
                **kwargs,
            )

        futures = {k: self._pool.submit(create, k, c) for k, c in enumerate(self.shards)}
        infos, failure = gather(futures)
        if failure is not None:
            for k, info in infos.items():
                if info.created:
                    self.shards[k].delete_model(model)
            self._raise(failure)
        return self._merge(model, infos, self._check_layouts(model, infos))

    def describe(self, model: str) -> ModelInfo:
        infos = self._each(lambda k, c: c.describe(model))
        return self._merge(model, infos, self._check_layouts(model, infos))

    def list_models(self) -> list[ModelInfo]:
        """The sharded models every shard holds (whole)."""
        out = []
        for info in self.shards[0].list_models():
            try:
                out.append(self.describe(info.name))
            except (NotFound, FailedPrecondition):
                continue  # on shard 0 only, or not sharded over these servers
        return out

    def join(self, model: str, rank: int | None = None) -> int:
        if rank is None:
            rank = self.shards[0].join(model, None)
        r = rank
        self._each(lambda k, c: c.join(model, r))
        return r

    def leave(self, model: str, rank: int) -> bool:
        return all(self._each(lambda k, c: c.leave(model, rank)).values())

    def delete_model(self, model: str) -> None:
        self._layouts.pop(model, None)
        missing = []

        def delete(k: int, c: Client) -> None:
            try:
                c.delete_model(model)
            except NotFound:
                missing.append(k)

        self._each(delete)
        if len(missing) == len(self.shards):
            raise NotFound(f"no model named {model!r} on any of {self.servers}")

    def snapshot(self, model: str) -> pb.SnapshotInfo:
        """A snapshot on every shard; paths joined with ';'."""
        return merged_snapshot(model, self._each(lambda k, c: c.snapshot(model)))

    def set_hyperparams(self, model: str, group: int = 0, **options: Any) -> ModelInfo:
        return self.set_group_options(model, [(group, options)])

    def set_group_options(
        self, model: str, updates: Sequence[tuple[int, Mapping[str, Any]]]
    ) -> ModelInfo:
        layout = self.layout(model)
        infos = self._each(lambda k, c: c.set_group_options(model, updates))
        return self._merge(model, infos, layout)

    def add_param_group(
        self,
        model: str,
        params: Mapping[str, torch.Tensor],
        *,
        listed: Sequence[str] | None = None,
        **options: Any,
    ) -> ModelInfo:
        """A new group, its parameters placed over the shards' current loads. Every shard gets
        the group (empty where it holds none of it), so group indices agree everywhere."""
        layout = self.layout(model)
        names = list(params)
        listed = list(listed) if listed is not None else names
        new = with_group(layout, params, listed)

        def add(k: int, c: Client) -> ModelInfo:
            on = set(new.names_on(k))
            return c.add_param_group(
                model,
                new.shard_params(k, {n: params[n] for n in names if n in on}),
                listed=[n for n in listed if n in on],
                layout=new.record(k),
                **options,
            )

        infos = self._each(add)
        return self._merge(model, infos, new)

    # --- pushes and pulls -----------------------------------------------------------------------

    def push_grad(
        self,
        model: str,
        grads: Mapping[str, torch.Tensor],
        *,
        push_id: str | None = None,
        found_inf: bool = False,
        **kwargs: Any,
    ) -> PushResult:
        """Client.push_grad on every shard at once, each with its part of `grads` (possibly
        none) and the same push id. Checked whole first: a gradient every shard would refuse
        reaches none."""
        layout = self._check_grads(model, grads, found_inf)
        pid = push_id or uuid.uuid4().hex
        futures = {
            k: self._pool.submit(
                c.push_grad,
                model,
                layout.shard_params(k, grads),
                push_id=pid,
                found_inf=found_inf,
                **kwargs,
            )
            for k, c in enumerate(self.shards)
        }
        return self._pushed(model, *gather(futures))

    def _check_grads(
        self, model: str, grads: Mapping[str, torch.Tensor], found_inf: bool
    ) -> Layout:
        """The model's layout, with `grads` checked against it whole (before any shard sees
        them): known names, the parameters' shapes, finite as they travel."""
        layout = self.layout(model)
        check_grads(model, layout, grads, found_inf, self.wire_dtype)
        return layout

    def _pushed(
        self,
        model: str,
        results: dict[int, PushResult],
        failure: tuple[int, BaseException] | None,
    ) -> PushResult:
        """The shards' push results as one (sync: the same version on every shard, else the
        model stops as _diverged says)."""
        sync = self._modes.get(model) != "async"
        if failure is not None:
            if sync and results and isinstance(failure[1], StalePush):
                self._diverged(model, f"shard {failure[0]} refused the push ({failure[1]})")
            self._raise(failure)
        if sync and len({r.version for r in results.values()}) > 1:
            self._diverged(model, "the shards stepped to different versions")
        return merged_push(results)

    def _diverged(self, model: str, what: str) -> NoReturn:
        """Sync mode, a shard is not at the version the others are (it restarted from an older
        snapshot): stop with the versions side by side rather than train a mixed model."""
        versions: dict[int, int | str] = {}
        for k, c in enumerate(self.shards):
            try:
                versions[k] = c.describe(model).version
            except AdamdError as exc:
                versions[k] = f"unknown ({type(exc).__name__})"
        numbers = [v for v in versions.values() if isinstance(v, int)]
        newest = max(numbers) if numbers else 0
        behind = [
            f"shard {k} ({self.servers[k]}) at version {v}"
            for k, v in versions.items()
            if v != newest
        ]
        raise FailedPrecondition(
            f"model {model!r}: {what}; {', '.join(behind) or 'a shard'} behind the others at"
            f" version {newest}: a shard restarted from an older snapshot. Training stops rather"
            " than mix versions; run sharded models with --durable so a restarted shard loses"
            " nothing, or restore every shard from one version"
        )

    def step(
        self,
        model: str,
        grads: Mapping[str, torch.Tensor],
        out: Mapping[str, torch.Tensor],
        *,
        push_id: str | None = None,
        found_inf: bool = False,
        wire_dtype: torch.dtype | None = None,
        **push: Any,
    ) -> tuple[PushResult, PullResult]:
        """Client.step on every shard at once, each with its part of `grads` and of `out` under
        one push id, so each shard's step is one exchange where its transport has one (the bulk
        channel's STEP); then one version over the shards, as `pull` gives it."""
        names = list(out)
        if not names:  # a pull of no names is a pull of every parameter
            pushed = self.push_grad(model, grads, push_id=push_id, found_inf=found_inf,
                wire_dtype=wire_dtype, **push)  # fmt: skip
            return pushed, self.pull(model, names, out=out, wire_dtype=wire_dtype)
        layout = self._check_grads(model, grads, found_inf)
        check_out(model, layout, names, out)
        per_shard = {k: [n for n in names if layout.part(n, k)] for k in range(len(self.shards))}
        views = {k: layout.shard_params(k, {n: out[n] for n in ns}) for k, ns in per_shard.items()}
        kw = dict(push_id=push_id or uuid.uuid4().hex, found_inf=found_inf, wire_dtype=wire_dtype)

        def one_step(k: int, c: Client) -> tuple[PushResult, PullResult | None]:
            part = layout.shard_params(k, grads)
            if not per_shard[k]:  # nothing to pull from this shard: its push alone
                return c.push_grad(model, part, **kw, **push), None
            return c.step(model, part, views[k], **kw, **push)

        done, failure = gather(
            {k: self._pool.submit(one_step, k, c) for k, c in enumerate(self.shards)}
        )
        pushed = self._pushed(model, {k: r[0] for k, r in done.items()}, failure)
        results = {k: r[1] for k, r in done.items() if r[1] is not None}

        def one(k: int, c: Client, **extra: Any) -> PullResult:
            return c.pull(model, per_shard[k], out=views[k], wire_dtype=wire_dtype, **extra)

        results = self._one_version(model, results, one)
        version = min(r.version for r in results.values())
        return pushed, PullResult(version, assemble(layout, names, results, out))

    def pull_params(
        self, model: str, names: Sequence[str] | None = None, **kwargs: Any
    ) -> dict[str, torch.Tensor]:
        return self.pull(model, names, **kwargs).params

    def pull(
        self,
        model: str,
        names: Sequence[str] | None = None,
        *,
        out: Mapping[str, torch.Tensor] | None = None,
        if_newer_than: int | None = None,
        wait_for_version: int | None = None,
        **kwargs: Any,
    ) -> PullResult:
        """Client.pull from every shard holding a wanted parameter, at once; sliced parameters
        come back whole (or straight into `out`). Sync mode: one version on every shard (a shard
        behind is waited for); async: the lowest version is returned."""
        layout = self.layout(model)
        wanted = list(names) if names else list(layout.params)
        check_out(model, layout, wanted, out)
        per_shard = {k: [n for n in wanted if layout.part(n, k)] for k in range(len(self.shards))}
        asked = [k for k, ns in per_shard.items() if ns]
        views = (
            {
                k: layout.shard_params(k, {n: out[n] for n in per_shard[k] if n in out})
                for k in asked
            }
            if out is not None
            else {}
        )

        def one(k: int, c: Client, **extra: Any) -> PullResult:
            return c.pull(model, per_shard[k], out=views.get(k), **{**kwargs, **extra})

        results = self._each(
            lambda k, c: one(k, c, if_newer_than=if_newer_than, wait_for_version=wait_for_version),
            asked,
        )
        if if_newer_than is not None:
            if all(r.not_modified for r in results.values()):
                return PullResult(min(r.version for r in results.values()), {}, True)
            stale = [k for k, r in results.items() if r.not_modified]
            results.update(self._each(lambda k, c: one(k, c), stale))
        results = self._one_version(model, results, one)
        return PullResult(
            min(r.version for r in results.values()), assemble(layout, wanted, results, out)
        )

    def _one_version(
        self, model: str, results: dict[int, PullResult], one: Callable[..., PullResult]
    ) -> dict[int, PullResult]:
        """Sync mode: re-pull the shards behind (waiting for the newest version seen) until
        every shard answered the same version."""
        if self._modes.get(model) == "async":
            return results
        for _ in range(_WAIT_ROUNDS):
            versions = {k: r.version for k, r in results.items()}
            target = max(versions.values())
            behind = [k for k, v in versions.items() if v != target]
            if not behind:
                return results
            waited, failure = gather(
                {
                    k: self._pool.submit(one, k, self.shards[k], wait_for_version=target)
                    for k in behind
                }
            )
            if failure is not None:
                if isinstance(failure[1], DeadlineExceeded):
                    self._diverged(model, f"a pull waited for every shard to reach {target}")
                self._raise(failure)
            results.update(waited)
        self._diverged(model, "the shards kept answering different versions")

    # --- optimizer state ------------------------------------------------------------------------

    def get_state(self, model: str) -> dict[str, Any]:
        """Client.get_state of the whole model: sliced parameters' state put back together."""
        layout = self.layout(model)
        states = self._each(lambda k, c: c.get_state(model))
        return merged_state(model, layout, states, sync=self._modes.get(model) != "async")

    def load_state(
        self,
        model: str,
        state: Mapping[str, Mapping[str, torch.Tensor]],
        param_groups: Sequence[Mapping[str, Any]] | None = None,
    ) -> ModelInfo:
        """Client.load_state of the whole model: each shard gets its parameters' state (rows of
        sliced ones). Checked whole first, so state every shard would refuse reaches none."""
        layout = self.layout(model)
        check_state(layout, state)

        def load(k: int, c: Client) -> ModelInfo:
            groups = groups_on(param_groups or (), set(layout.names_on(k)))
            return c.load_state(model, state_part(layout, state, k), groups or None)

        infos = self._each(load)
        return self._merge(model, infos, layout)
