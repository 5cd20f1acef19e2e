"""What the sharded layer (client/_sharding.py) works out from a model's layout
(adamd.protocol.layout) alone, with no call of its own: the checks a call's tensors pass whole
before any shard sees them, each shard's part of optimizer state, and the shards' answers
(model infos, push results, pulled parameters, state, snapshots) merged into one, failures
naming the shard they came from.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from concurrent.futures import Future
from typing import Any, TypeVar

import torch

from adamd.client._exceptions import (
    AdamdError,
    FailedPrecondition,
    InvalidArgument,
    NonFiniteGradient,
    NotFound,
)
from adamd.client._types import ModelInfo, PullResult, PushResult
from adamd.protocol.frames import wire_dtype_of
from adamd.protocol.layout import Layout, join_state
from adamd.v1 import adamd_pb2 as pb

T = TypeVar("T")

# --- failures -------------------------------------------------------------------------------------


def on_shard(k: int, address: str, exc: AdamdError) -> AdamdError:
    """`exc`, naming the shard it came from (same class, same code)."""
    text = str(exc)
    where = f"shard {k} ({address})"
    out = type(exc)(f"{where}: {text.removeprefix(address + ': ')}")
    out.code = exc.code
    return out


def gather(
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


# --- checks before any shard sees a call ------------------------------------------------------


def _finite_on_the_wire(g: torch.Tensor, wire_dtype: torch.dtype | None) -> bool:
    """Whether `g` stays finite as it travels: a float16 wire turns values past 65504 into inf,
    which the shard holding them would refuse while the others applied the push."""
    if not (g.is_floating_point() or g.is_complex()):
        return True
    wire = wire_dtype_of(g.dtype, wire_dtype)
    if wire != g.dtype and wire.is_floating_point:
        g = g.to(wire)
    return bool(torch.isfinite(g).all())


def check_grads(
    model: str,
    layout: Layout,
    grads: Mapping[str, torch.Tensor],
    found_inf: bool,
    wire_dtype: torch.dtype | None,
) -> None:
    """`grads` checked against the layout whole: known names, the parameters' shapes, finite
    as they travel."""
    for name, g in grads.items():
        place = layout.params.get(name)
        if place is None:
            raise NotFound(f"model {model!r} has no parameter {name!r}")
        if tuple(g.shape) != place.shape:
            raise InvalidArgument(
                f"gradient {name!r} has shape {list(g.shape)}, the parameter {list(place.shape)}"
            )
        if not found_inf and not _finite_on_the_wire(g, wire_dtype):
            raise NonFiniteGradient(
                f"gradient {name!r} holds inf or nan (as it travels: {wire_dtype});"
                " nothing was applied (AMP: pass found_inf to skip the step)"
            )


def check_out(
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


def check_state(layout: Layout, state: Mapping[str, Mapping[str, Any]]) -> None:
    """Optimizer state keyed by parameter name, checked whole: known names, the parameters'
    shapes, finite values."""
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


# --- placing parameters, each shard's part ----------------------------------------------------


def plan(
    servers: Sequence[str],
    params: Mapping[str, torch.Tensor],
    groups: Sequence[Mapping[str, Any]],
    slice_bytes: int,
) -> Layout:
    """A new model's layout over `servers` (its groups naming only its parameters)."""
    for g in groups:
        unknown = [n for n in g["params"] if n not in params]
        if unknown:
            raise InvalidArgument(f"param group names unknown parameters {unknown}")
    spec = {n: (tuple(t.shape), t.dtype) for n, t in params.items()}
    try:
        return Layout.plan(servers, spec, [g["params"] for g in groups], slice_bytes)
    except ValueError as exc:
        raise InvalidArgument(str(exc)) from None


def with_group(layout: Layout, params: Mapping[str, torch.Tensor], listed: list[str]) -> Layout:
    """`layout` with a new group of new `params` (`listed`: the group's names in order, each
    parameter sent; one may be listed twice), placed over the shards' current loads."""
    clash = [n for n in params if n in layout.params]
    if clash:
        raise InvalidArgument(f"parameters {clash} exist already")
    if sorted(set(listed)) != sorted(params):
        raise InvalidArgument("the new group's params must be exactly the parameters sent")
    return layout.with_group({n: (tuple(t.shape), t.dtype) for n, t in params.items()}, listed)


def groups_on(groups: Sequence[Mapping[str, Any]], on: set[str]) -> list[dict[str, Any]]:
    """Param groups as a shard holding the parameters `on` has them (every group, each with
    the parameters it holds, possibly none), so group indices agree everywhere."""
    return [
        {
            **{o: v for o, v in g.items() if o != "params"},
            "params": [n for n in g["params"] if n in on],
        }
        for g in groups
    ]


def state_part(
    layout: Layout, state: Mapping[str, Mapping[str, Any]], k: int
) -> dict[str, dict[str, Any]]:
    """Shard k's part of `state`: the entries of its parameters, rows of sliced ones."""
    part_state = {}
    for name, entry in state.items():
        part = layout.part(name, k)
        if part is None:
            continue
        place = layout.params[name]
        part_state[name] = {
            key: v if key == "step" or not isinstance(v, torch.Tensor) else place.piece(v, part)
            for key, v in entry.items()
        }
    return part_state


# --- the shards' answers as one ---------------------------------------------------------------


def check_layouts(model: str, servers: Sequence[str], infos: Mapping[int, ModelInfo]) -> Layout:
    """The layout every shard recorded: one, over these `servers` in this order."""
    layouts = {}
    for k, info in infos.items():
        if not info.layout:
            raise FailedPrecondition(
                f"model {model!r} on shard {k} ({servers[k]}) is not sharded: it was"
                " created on that server alone; address it with that server only"
            )
        layout, index = Layout.from_record(info.layout)
        if list(layout.servers) != list(servers) or index != k:
            raise FailedPrecondition(
                f"model {model!r} was created over servers {list(layout.servers)}"
                f" ({servers[k]} as shard {index}); this client lists {list(servers)}:"
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


def merged_info(infos: Mapping[int, ModelInfo], layout: Layout) -> ModelInfo:
    """The shards' ModelInfos as the whole model's."""
    first = infos[0]
    return ModelInfo(
        name=first.name,
        version=min(i.version for i in infos.values()),
        mode=first.mode,
        world_size=first.world_size,
        device=first.device,
        params={n: (p.shape, p.dtype) for n, p in layout.params.items()},
        param_groups=layout.whole_groups(first.param_groups),
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


def merged_push(results: Mapping[int, PushResult]) -> PushResult:
    """The shards' push results as one push's."""
    rs = [results[k] for k in sorted(results)]
    return PushResult(
        version=min(r.version for r in rs),
        applied=all(r.applied for r in rs),
        found_inf=any(r.found_inf for r in rs),
        contributors=min(r.contributors for r in rs),
        duplicate=all(r.duplicate for r in rs),
        partial=any(r.partial for r in rs),
    )


def assemble(
    layout: Layout,
    wanted: Sequence[str],
    results: Mapping[int, PullResult],
    out: Mapping[str, torch.Tensor] | None,
) -> dict[str, torch.Tensor]:
    """The wanted parameters whole from the shards' pulls (sliced ones put back together, or
    already written into `out`)."""
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


def merged_state(
    model: str, layout: Layout, states: Mapping[int, dict[str, Any]], sync: bool
) -> dict[str, Any]:
    """The shards' get_state answers as the whole model's: sliced parameters' state put back
    together (sync: every shard at one version)."""
    versions = {k: s["version"] for k, s in states.items()}
    if sync and len(set(versions.values())) > 1:
        raise AdamdError(f"model {model!r}: shards at different versions {versions}")
    merged: dict[str, dict[str, torch.Tensor]] = {}
    for name, place in layout.params.items():
        entries = [states[q.shard]["state"].get(name) for q in place.parts]
        if all(e is None for e in entries):
            continue
        if any(e is None for e in entries):
            raise AdamdError(f"model {model!r}: {name!r} has state on some shards only")
        parts = [e for e in entries if e is not None]
        merged[name] = join_state(place, parts)
    return {
        "state": merged,
        "param_groups": layout.whole_groups(states[0]["param_groups"]),
        "version": min(versions.values()),
    }


def merged_snapshot(model: str, infos: Mapping[int, pb.SnapshotInfo]) -> pb.SnapshotInfo:
    """A snapshot on every shard as one: paths joined with ';'."""
    ordered = [infos[k] for k in sorted(infos)]
    return pb.SnapshotInfo(
        model=model,
        version=min(i.version for i in ordered),
        path=";".join(i.path for i in ordered),
        bytes=sum(i.bytes for i in ordered),
        seconds=max(i.seconds for i in ordered),
    )
