"""One torch checkpoint from the snapshots of a model sharded over several servers.

Each shard's data dir holds its own snapshots, each with the layout record the shard keeps (which
shard it is, where every parameter lives). Export picks the newest version every shard has a valid
snapshot of (shards keep `--snapshot-keep` snapshots each, so aligned `--snapshot-every-steps`
leave common versions behind even when one shard is ahead), checks the records agree, and puts
sliced parameters and their Adam state back together along dim 0.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from adamd.protocol.layout import Layout, join_state
from adamd.server.storage import format as fmt


class ShardExportError(ValueError):
    """The shards' snapshots do not make one model (missing, mismatched, no common version)."""


def newest_common(model_dirs: Sequence[Path]) -> list[fmt.Loaded]:
    """Every shard's valid snapshot of the newest version all of them hold, in the order given."""
    listed = [fmt.list_snapshots(d) for d in model_dirs]
    for d, files in zip(model_dirs, listed):
        if not files:
            raise ShardExportError(f"no snapshot in {d}")
    common = set.intersection(*({f.version for f in files} for files in listed))
    for version in sorted(common, reverse=True):
        loaded = []
        for files in listed:
            for f in sorted((f for f in files if f.version == version), key=lambda f: -f.seq):
                try:
                    loaded.append(fmt.load(f))
                    break
                except fmt.CorruptSnapshot:
                    continue
        if len(loaded) == len(listed):
            return loaded
    have = {str(d): sorted({f.version for f in files}) for d, files in zip(model_dirs, listed)}
    raise ShardExportError(f"the shards hold no valid snapshot of one version in common: {have}")


def merge(
    loaded: Sequence[fmt.Loaded],
) -> tuple[dict[str, torch.Tensor], list[dict[str, Any]], dict[str, dict[str, torch.Tensor]], int]:
    """(params, groups, Adam state by name, version) of the whole model."""
    by_shard: dict[int, fmt.Loaded] = {}
    layouts = {}
    for snap in loaded:
        record = snap.manifest.get("layout") or ""
        if not record:
            raise ShardExportError(
                f"snapshot of {snap.manifest['model']!r} is not of a sharded model"
            )
        layout, index = Layout.from_record(record)
        if index in by_shard:
            raise ShardExportError(f"two data dirs hold shard {index}")
        by_shard[index] = snap
        layouts[layout.id] = layout
    if len(layouts) != 1:
        raise ShardExportError(f"the snapshots are of different layouts {sorted(layouts)}")
    (layout,) = layouts.values()
    if sorted(by_shard) != list(range(len(layout.servers))):
        raise ShardExportError(
            f"the layout has {len(layout.servers)} shards ({list(layout.servers)}); got shards"
            f" {sorted(by_shard)}: give every shard's data dir"
        )
    params_k = {k: fmt.params_of(s) for k, s in by_shard.items()}
    state_k = {k: fmt.state_by_name(s) for k, s in by_shard.items()}
    params: dict[str, torch.Tensor] = {}
    state: dict[str, dict[str, torch.Tensor]] = {}
    for name, place in layout.params.items():
        ks = [q.shard for q in place.parts]
        params[name] = (
            torch.cat([params_k[k][name] for k in ks]) if place.sliced else params_k[ks[0]][name]
        )
        entries = [state_k[k].get(name) for k in ks]
        if all(e is not None for e in entries):
            parts = [e for e in entries if e is not None]
            state[name] = join_state(place, parts)
    groups = layout.whole_groups(fmt.groups_of(by_shard[0]))
    return params, groups, state, int(by_shard[0].manifest["version"])
