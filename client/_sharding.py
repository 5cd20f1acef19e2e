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
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, NoReturn, TypeVar

import torch

from adamd.client._client import Client
from adamd.client._exceptions import (
    AdamdError,
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    NonFiniteGradient,
    NotFound,
    StalePush,
)
from adamd.client._types import ModelInfo, PullResult, PushResult
from adamd.protocol.frames import wire_dtype_of
from adamd.protocol.layout import DEFAULT_SLICE_BYTES, Layout
from adamd.v1 import adamd_pb2 as pb

T = TypeVar("T")
_WAIT_ROUNDS = 4  # pulls re-asked of shards behind, before giving up on one version


def _on_shard(k: int, address: str, exc: AdamdError) -> AdamdError:
    """`exc`, naming the shard it came from (same class, same code)."""
    text = str(exc)
    where = f"shard {k} ({address})"
    out = type(exc)(f"{where}: {text.removeprefix(address + ': ')}")
    out.code = exc.code
    return out


def _gather(
    futures: Mapping[int, Future[T]],
) -> tuple[dict[int, T], tuple[int, BaseException] | None]:
    """Every future's result, and the first failure by shard order (after all finished)."""
    out: dict[int, T] = {}
    failure: tuple[int, BaseException] | None = None
    for k, f in futures.items():
        try:
            out[k] = f.result()
        except BaseException as exc:
            failure = failure or (k, exc)
    return out, failure


def _finite_on_the_wire(g: torch.Tensor, wire_dtype: torch.dtype | None) -> bool:
    """Whether `g` stays finite as it travels: a float16 wire turns values past 65504 into inf,
    which the shard holding them would refuse while the others applied the push."""
    if not (g.is_floating_point() or g.is_complex()):
        return True
    wire = wire_dtype_of(g.dtype, wire_dtype)
    if wire != g.dtype and wire.is_floating_point:
        g = g.to(wire)
    return bool(torch.isfinite(g).all())


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
        out, failure = _gather({k: self._pool.submit(fn, k, self.shards[k]) for k in ks})
        if failure is not None:
            self._raise(failure)
        return out

    def _raise(self, failure: tuple[int, BaseException]) -> NoReturn:
        k, err = failure
        if isinstance(err, AdamdError):
            raise _on_shard(k, self.servers[k], err) from err
        raise err

    # --- layout ---------------------------------------------------------------------------------

    def layout(self, model: str) -> Layout:
        """The model's layout (read from the shards on first use, and checked)."""
        if model not in self._layouts:
            self.describe(model)
        return self._layouts[model]

    def _check_layouts(self, model: str, infos: Mapping[int, ModelInfo]) -> Layout:
        layouts = {}
        for k, info in infos.items():
            if not info.layout:
                raise FailedPrecondition(
                    f"model {model!r} on shard {k} ({self.servers[k]}) is not sharded: it was"
                    " created on that server alone; address it with that server only"
                )
            layout, index = Layout.from_record(info.layout)
            if list(layout.servers) != self.servers or index != k:
                raise FailedPrecondition(
                    f"model {model!r} was created over servers {list(layout.servers)}"
                    f" ({self.servers[k]} as shard {index}); this client lists {self.servers}:"
                    " pass the same servers in the same order"
                )
            layouts[k] = layout
        ids = {layout.id for layout in layouts.values()}
        if len(ids) > 1:
            raise FailedPrecondition(
                f"model {model!r}: the shards disagree on the layout"
                f" ({ {k: v.id for k, v in layouts.items()} }); a create or add_param_group was"
                " interrupted: delete the model and create it again"
            )
        return layouts[0]

    def _merge(self, model: str, infos: Mapping[int, ModelInfo], layout: Layout) -> ModelInfo:
        first = infos[0]
        groups = [
            {**{k: v for k, v in g.items() if k != "params"}, "params": list(names)}
            for g, names in zip(first.param_groups, layout.groups)
        ]
        self._layouts[model] = layout
        self._modes[model] = first.mode
        return ModelInfo(
            name=first.name,
            version=min(i.version for i in infos.values()),
            mode=first.mode,
            world_size=first.world_size,
            device=first.device,
            params={n: (p.shape, p.dtype) for n, p in layout.params.items()},
            param_groups=groups,
            max_staleness=first.max_staleness,
            round_timeout_s=first.round_timeout_s,
            created=all(i.created for i in infos.values()),
            skipped_steps=max(i.skipped_steps for i in infos.values()),
            elastic=first.elastic,
            lease_s=first.lease_s,
            layout=layout.record(0),
            shard_versions=tuple(infos[k].version for k in sorted(infos)),
            master_dtype=first.master_dtype,
        )

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
        for g in groups:
            unknown = [n for n in g["params"] if n not in params]
            if unknown:
                raise InvalidArgument(f"param group names unknown parameters {unknown}")
        spec = {n: (tuple(t.shape), t.dtype) for n, t in params.items()}
        try:
            layout = Layout.plan(
                self.servers, spec, [g["params"] for g in groups], self.slice_bytes
            )
        except ValueError as exc:
            raise InvalidArgument(str(exc)) from None

        def create(k: int, c: Client) -> ModelInfo:
            on = set(layout.names_on(k))
            shard_groups = [
                {
                    **{o: v for o, v in g.items() if o != "params"},
                    "params": [n for n in g["params"] if n in on],
                }
                for g in groups
            ]
            return c.create_model(
                model,
                layout.shard_params(k, {n: params[n] for n in names if n in on}),
                param_groups=shard_groups,
                exist_ok=exist_ok,
                layout=layout.record(k),
                **kwargs,
            )

        futures = {k: self._pool.submit(create, k, c) for k, c in enumerate(self.shards)}
        infos, failure = _gather(futures)
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
        infos = self._each(lambda k, c: c.snapshot(model))
        ordered = [infos[k] for k in sorted(infos)]
        return pb.SnapshotInfo(
            model=model,
            version=min(i.version for i in ordered),
            path=";".join(i.path for i in ordered),
            bytes=sum(i.bytes for i in ordered),
            seconds=max(i.seconds for i in ordered),
        )

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
        clash = [n for n in names if n in layout.params]
        if clash:
            raise InvalidArgument(f"parameters {clash} exist already")
        if sorted(set(listed)) != sorted(names):
            raise InvalidArgument("the new group's params must be exactly the parameters sent")
        new = layout.with_group({n: (tuple(t.shape), t.dtype) for n, t in params.items()}, listed)

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
        return self._pushed(model, *_gather(futures))

    def _check_grads(
        self, model: str, grads: Mapping[str, torch.Tensor], found_inf: bool
    ) -> Layout:
        """The model's layout, with `grads` checked against it whole (before any shard sees
        them): known names, the parameters' shapes, finite as they travel."""
        layout = self.layout(model)
        for name, g in grads.items():
            place = layout.params.get(name)
            if place is None:
                raise NotFound(f"model {model!r} has no parameter {name!r}")
            if tuple(g.shape) != place.shape:
                raise InvalidArgument(
                    f"gradient {name!r} has shape {list(g.shape)}, the parameter {list(place.shape)}"
                )
            if not found_inf and not _finite_on_the_wire(g, self.wire_dtype):
                raise NonFiniteGradient(
                    f"gradient {name!r} holds inf or nan (as it travels: {self.wire_dtype});"
                    " nothing was applied (AMP: pass found_inf to skip the step)"
                )
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
        rs = [results[k] for k in sorted(results)]
        if sync and len({r.version for r in rs}) > 1:
            self._diverged(model, "the shards stepped to different versions")
        return PushResult(
            version=min(r.version for r in rs),
            applied=all(r.applied for r in rs),
            found_inf=any(r.found_inf for r in rs),
            contributors=min(r.contributors for r in rs),
            duplicate=all(r.duplicate for r in rs),
            partial=any(r.partial for r in rs),
        )

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
        self._check_out(model, layout, names, out)
        per_shard = {k: [n for n in names if layout.part(n, k)] for k in range(len(self.shards))}
        views = {k: layout.shard_params(k, {n: out[n] for n in ns}) for k, ns in per_shard.items()}
        kw = dict(push_id=push_id or uuid.uuid4().hex, found_inf=found_inf, wire_dtype=wire_dtype)

        def one_step(k: int, c: Client) -> tuple[PushResult, PullResult | None]:
            part = layout.shard_params(k, grads)
            if not per_shard[k]:  # nothing to pull from this shard: its push alone
                return c.push_grad(model, part, **kw, **push), None
            return c.step(model, part, views[k], **kw, **push)

        done, failure = _gather(
            {k: self._pool.submit(one_step, k, c) for k, c in enumerate(self.shards)}
        )
        pushed = self._pushed(model, {k: r[0] for k, r in done.items()}, failure)
        results = {k: r[1] for k, r in done.items() if r[1] is not None}

        def one(k: int, c: Client, **extra: Any) -> PullResult:
            return c.pull(model, per_shard[k], out=views[k], wire_dtype=wire_dtype, **extra)

        results = self._one_version(model, results, one)
        version = min(r.version for r in results.values())
        return pushed, PullResult(version, self._assemble(layout, names, results, out))

    def _check_out(
        self,
        model: str,
        layout: Layout,
        wanted: Sequence[str],
        out: Mapping[str, torch.Tensor] | None,
    ) -> None:
        """Every wanted name a parameter of the model, `out`'s tensors of its shapes."""
        for n in wanted:
            place = layout.params.get(n)
            if place is None:
                raise NotFound(f"model {model!r} has no parameter {n!r}")
            if out is not None and n in out and tuple(out[n].shape) != place.shape:
                raise InvalidArgument(
                    f"out[{n!r}] has shape {list(out[n].shape)}, the parameter {list(place.shape)}"
                )

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
        self._check_out(model, layout, wanted, out)
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
            min(r.version for r in results.values()), self._assemble(layout, wanted, results, out)
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
            waited, failure = _gather(
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

    @staticmethod
    def _assemble(
        layout: Layout,
        wanted: Sequence[str],
        results: Mapping[int, PullResult],
        out: Mapping[str, torch.Tensor] | None,
    ) -> dict[str, torch.Tensor]:
        params = {}
        for n in wanted:
            place = layout.params[n]
            if out is not None and n in out:
                params[n] = out[n]  # the shards wrote their rows into it
            elif not place.sliced:
                params[n] = results[place.parts[0].shard].params[n]
            else:
                params[n] = torch.cat([results[q.shard].params[n] for q in place.parts])
        return params

    # --- optimizer state ------------------------------------------------------------------------

    def get_state(self, model: str) -> dict[str, Any]:
        """Client.get_state of the whole model: sliced parameters' state put back together."""
        layout = self.layout(model)
        states = self._each(lambda k, c: c.get_state(model))
        versions = {k: s["version"] for k, s in states.items()}
        if self._modes.get(model) != "async" and len(set(versions.values())) > 1:
            raise AdamdError(f"model {model!r}: shards at different versions {versions}")
        merged: dict[str, dict[str, torch.Tensor]] = {}
        for name, place in layout.params.items():
            entries = [states[q.shard]["state"].get(name) for q in place.parts]
            if all(e is None for e in entries):
                continue
            if any(e is None for e in entries):
                raise AdamdError(f"model {model!r}: {name!r} has state on some shards only")
            parts = [e for e in entries if e is not None]
            merged[name] = {
                key: parts[0][key]
                if key == "step" or not place.sliced
                else torch.cat([e[key] for e in parts])
                for key in parts[0]
            }
        first = states[0]["param_groups"]
        groups = [
            {**{k: v for k, v in g.items() if k != "params"}, "params": list(names)}
            for g, names in zip(first, layout.groups)
        ]
        return {
            "state": merged,
            "param_groups": groups,
            "version": min(versions.values()),
        }

    def load_state(
        self,
        model: str,
        state: Mapping[str, Mapping[str, torch.Tensor]],
        param_groups: Sequence[Mapping[str, Any]] | None = None,
    ) -> ModelInfo:
        """Client.load_state of the whole model: each shard gets its parameters' state (rows of
        sliced ones). Checked whole first, so state every shard would refuse reaches none."""
        layout = self.layout(model)
        for name, entry in state.items():
            place = layout.params.get(name)
            if place is None:
                raise InvalidArgument(f"state names unknown parameter {name!r}")
            for key, value in entry.items():
                t = value if isinstance(value, torch.Tensor) else torch.tensor(float(value))
                if key != "step" and tuple(t.shape) != place.shape:
                    raise InvalidArgument(
                        f"state {key} of {name!r} has shape {list(t.shape)}, its parameter"
                        f" {list(place.shape)}"
                    )
                if (t.is_floating_point() or t.is_complex()) and not bool(torch.isfinite(t).all()):
                    raise InvalidArgument(f"state {key} of {name!r} holds inf or nan")

        def load(k: int, c: Client) -> ModelInfo:
            part_state = {}
            for name, entry in state.items():
                part = layout.part(name, k)
                if part is None:
                    continue
                place = layout.params[name]
                part_state[name] = {
                    key: v
                    if key == "step" or not isinstance(v, torch.Tensor)
                    else place.piece(v, part)
                    for key, v in entry.items()
                }
            on = set(layout.names_on(k))
            groups = [
                {**g, "params": [n for n in g["params"] if n in on]} for g in (param_groups or ())
            ]
            return c.load_state(model, part_state, groups or None)

        infos = self._each(load)
        return self._merge(model, infos, layout)
