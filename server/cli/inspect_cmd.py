"""`adamd inspect [--http URL[,URL...]] [MODEL]`: the dashboard's information as terminal tables
(several URLs: a sharded model's shards side by side, with the shards behind marked).

It reads the daemon's JSON API (the same routes the dashboard polls), so it works against any
running daemon, local or remote, and needs nothing but the standard library and rich.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

from rich.console import Console
from rich.table import Table

logger = logging.getLogger(__name__)

DEFAULT_URL = "http://127.0.0.1:8080"
_SPARK = "▁▂▃▄▅▆▇█"


class InspectError(Exception):
    pass


def fetch(base: str, path: str, timeout: float = 10.0) -> Any:
    url = base.rstrip("/") + path
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return json.load(r)
    except urllib.error.HTTPError as exc:
        try:
            message = json.load(exc).get("message", exc.reason)
        except ValueError:
            message = exc.reason
        raise InspectError(f"{url}: {exc.code} {message}") from None
    except (urllib.error.URLError, OSError) as exc:
        raise InspectError(f"cannot reach {url}: {exc}") from None


def num(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return str(v)
    a = abs(v)
    if a == 0:
        return "0"
    if a >= 1e5 or a < 1e-3:
        return f"{v:.3e}"
    return f"{v:.4g}"


def size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def sparkline(values: list[float], width: int = 40) -> str:
    values = values[-width:]
    if not values:
        return "-"
    lo, hi = min(values), max(values)
    span = (hi - lo) or 1.0
    return "".join(_SPARK[int((v - lo) / span * (len(_SPARK) - 1))] for v in values)


def models_table(data: Any) -> Table:
    s = data["server"]
    t = Table(title=f"adamd {s['version']} on {s['device']} (gRPC {s['grpc_address']})")
    for col in ("model", "mode", "world", "version", "steps/s", "loss", "params", "memory"):
        t.add_column(col, justify="left" if col in ("model", "mode") else "right")
    for m in data["models"]:
        t.add_row(
            m["name"],
            m["mode"],
            str(m["world_size"]),
            str(m["version"]),
            num(m["step_rate"]),
            num(m["last_loss"]),
            f"{m['num_elements']:,}",
            size(m["memory"]["total"]),
        )
    return t


def shard_line(shard: Any) -> str:
    """Which shard of how many this server holds, of which layout, and over which servers."""
    where = ", ".join(shard["servers"])
    return f"{shard['index']} of {shard['of']} (layout {shard['layout_id']}): {where}"


def model_tables(m: Any, params: Any, history: Any) -> list[Table]:
    head = Table(title=f"model {m['name']}", show_header=False)
    head.add_column("key", style="bold")
    head.add_column("value")
    steps = history["steps"]
    losses = [e["loss"] for e in steps if e["loss"] is not None]
    rows = [
        ("mode", f"{m['mode']} (world_size {m['world_size']})"),
        ("version", f"{m['version']} ({m['skipped_steps']} skipped)"),
        ("device", f"{m['device']} ({', '.join(m['dtypes'])})"),
        ("parameters", f"{m['num_elements']:,} in {m['num_params']} tensors"),
        ("memory", ", ".join(f"{k} {size(v)}" for k, v in m["memory"].items())),
        ("step rate", f"{num(m['step_rate'])} steps/s"),
        ("loss", f"{num(m['last_loss'])}  {sparkline(losses)}"),
        (
            "workers",
            ", ".join(f"rank {w['rank']}: lag {w['lag']}" for w in m["workers"]) or "none yet",
        ),
    ]
    shard = m.get("shard")
    if shard and "index" in shard:  # one shard of a model sharded over several servers
        rows.insert(1, ("shard", shard_line(shard)))
    if m.get("elastic"):  # the live membership: who a round waits for, and for how long
        members = [f"rank {w['rank']}: lease {num(w['lease_left_s'])} s" for w in m["members"]]
        rows.insert(1, ("members", ", ".join(members) or "none registered"))
    for k, v in rows:
        head.add_row(k, v)
    groups = Table(title="param groups")
    for col in ("group", "lr", "betas", "eps", "weight_decay", "impl", "params"):
        groups.add_column(col)
    for g in m["param_groups"]:
        hp = g["hyperparameters"]
        groups.add_row(
            str(g["index"]),
            num(hp.get("lr")),
            ", ".join(num(b) for b in hp.get("betas") or []),
            num(hp.get("eps")),
            num(hp.get("weight_decay")),
            g["implementation"],
            ", ".join(g["params"]),
        )
    table = Table(title=f"parameters at version {params['version']}")
    cols = (
        "name",
        "shape",
        "dtype",
        "step",
        "norm",
        "grad norm",
        "exp_avg norm",
        "exp_avg_sq mean",
    )
    for col in (*cols, "update/weight"):
        table.add_column(col, justify="left" if col in ("name", "shape", "dtype") else "right")
    for p in params["params"]:
        table.add_row(
            p["name"],
            str(p["shape"]),
            p["dtype"],
            str(p["step"]),
            num(p["norm"]),
            num(p["grad_norm"]),
            num(p["exp_avg_norm"]),
            num(p["exp_avg_sq_mean"]),
            num(p["update_to_weight"]),
        )
    recent = Table(title="recent steps")
    for col in ("version", "loss", "grad norm", "update norm", "lr", "step ms", "workers"):
        recent.add_column(col, justify="right")
    for e in steps[-8:]:
        recent.add_row(
            str(e["version"]),
            num(e["loss"]),
            num(e["grad_norm"]),
            num(e["update_norm"]),
            ", ".join(num(x) for x in e["lr"]),
            num(e["step_ms"]),
            str(e["workers"]),
        )
    return [head, groups, table, recent]


def shards_table(model: str, views: list[tuple[str, Any]]) -> Table:
    """One sharded model over several servers, side by side: each shard's part and version, and
    which shards are behind the newest."""
    newest = max(m["version"] for _, m in views)
    table = Table(title=f"model {model}: {len(views)} shards")
    for col in ("shard", "server", "version", "behind", "tensors here", "elements", "memory"):
        table.add_column(col)
    for base, m in views:
        shard = m.get("shard") or {}
        behind = newest - m["version"]
        table.add_row(
            str(shard.get("index", "?")),
            base,
            str(m["version"]),
            f"[red]{behind}[/]" if behind else "0",
            str(m["num_params"]),
            f"{m['num_elements']:,}",
            size(m["memory"]["total"]),
        )
    return table


def run_shards(console: Console, bases: list[str], model: str | None) -> int:
    """Several servers (a sharded model's shards): each listed, or the model side by side."""
    try:
        if model is None:
            for base in bases:
                console.print(base)
                console.print(models_table(fetch(base, "/v1/models")))
            return 0
        name = urllib.parse.quote(model, safe="")
        views = [(base, fetch(base, f"/v1/models/{name}")) for base in bases]
    except InspectError as exc:
        Console(stderr=True).print(f"[red]adamd inspect:[/] {exc}")
        return 1
    console.print(shards_table(model, views))
    return 0


def run(args: argparse.Namespace) -> int:
    console = Console(width=args.width)
    bases = [b if "://" in b else "http://" + b for b in args.http.split(",") if b.strip()]
    if len(bases) > 1:
        return run_shards(console, bases, args.model)
    base = bases[0]
    try:
        if args.model is None:
            console.print(models_table(fetch(base, "/v1/models")))
            return 0
        name = urllib.parse.quote(args.model, safe="")
        m = fetch(base, f"/v1/models/{name}")
        params = fetch(base, f"/v1/models/{name}/params")
        history = fetch(base, f"/v1/models/{name}/history?limit=200")
    except InspectError as exc:
        Console(stderr=True).print(f"[red]adamd inspect:[/] {exc}")
        return 1
    for table in model_tables(m, params, history):
        console.print(table)
    return 0


def register(sub: Any) -> None:
    p = sub.add_parser(
        "inspect",
        help="show models, parameters and recent steps of a running daemon",
        description="Read a running daemon's HTTP API and print its models (or one model's "
        "groups, per-parameter statistics and recent steps) as tables.",
    )
    p.add_argument(
        "--http",
        default=os.environ.get("ADAMD_HTTP_URL", DEFAULT_URL),
        help=f"the daemon's HTTP address (default {DEFAULT_URL}, env ADAMD_HTTP_URL); several,"
        " comma-separated: the shards of a sharded model, side by side",
    )
    p.add_argument("--width", type=int, default=None, help="console width (default: terminal)")
    p.add_argument("model", nargs="?", help="a model to show in detail (default: list models)")
    p.set_defaults(func=run)
