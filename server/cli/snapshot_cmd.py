"""`adamd snapshot save|list|export|import`: snapshots from the command line.

    save MODEL          ask a running server to write a snapshot now (gRPC)
    list [MODEL]        the snapshots in a data dir, newest last (--verify checks checksums)
    export MODEL OUT    newest valid snapshot in a data dir -> a plain PyTorch checkpoint
    import FILE MODEL   a PyTorch checkpoint -> a new model on a running server (then snapshotted)

save and import talk to the server through the public Client; list and export only read files, so
they work on a stopped server's data dir (and on a copy of it).
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from adamd.server.config import ServerConfig
from adamd.server.storage import format as fmt
from adamd.server.storage import interop as interop
from adamd.server.storage.shard_export import ShardExportError, merge, newest_common

logger = logging.getLogger(__name__)


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "snapshot",
        help="save, list, export and import model snapshots",
        description="Snapshots of hosted models: save on a running server, list and export from a"
        " data dir, import a PyTorch checkpoint as a new model.",
    )
    sub = p.add_subparsers(dest="snapshot_command", required=True, metavar="ACTION")

    def server_args(q: argparse.ArgumentParser) -> None:
        q.add_argument("--server", default="127.0.0.1:50051", help="gRPC address of the server")
        q.add_argument("--token-file", type=Path, help="file holding the server's token")

    def data_dir_arg(q: argparse.ArgumentParser) -> None:
        q.add_argument("--data-dir", type=Path, help="the server's data dir (default ./adamd-data)")

    save = sub.add_parser("save", help="write a snapshot of MODEL on a running server now")
    save.add_argument("model")
    server_args(save)
    save.set_defaults(func=_save)

    ls = sub.add_parser("list", help="list snapshots in a data dir")
    ls.add_argument("model", nargs="?", help="only this model")
    data_dir_arg(ls)
    ls.add_argument("--verify", action="store_true", help="check every snapshot's checksums")
    ls.add_argument("--json", action="store_true", help="one JSON object per line")
    ls.set_defaults(func=_list)

    ex = sub.add_parser("export", help="export a snapshot to a PyTorch checkpoint (.pt)")
    ex.add_argument("model")
    ex.add_argument("out", type=Path, help="file to write: {'model': ..., 'optimizer': ...}")
    data_dir_arg(ex)
    ex.add_argument("--seq", type=int, help="this snapshot number instead of the newest valid")
    ex.add_argument(
        "--shard",
        type=Path,
        action="append",
        metavar="DATA_DIR",
        help="a sharded model: every shard's data dir (once each, any order); exports the newest"
        " version all of them hold as one checkpoint of the whole model",
    )
    ex.set_defaults(func=_export)

    im = sub.add_parser("import", help="create MODEL on a running server from a checkpoint")
    im.add_argument("file", type=Path, help="torch.save'd {'model': ..., 'optimizer': ...}")
    im.add_argument("model")
    server_args(im)
    im.add_argument("--world-size", type=int, default=1)
    im.add_argument("--mode", choices=["sync", "async"], default="sync")
    im.set_defaults(func=_import)


def _data_dir(args: argparse.Namespace) -> Path:
    return ServerConfig.load({"data_dir": args.data_dir}).data_dir


def _client(args: argparse.Namespace) -> Any:
    from adamd.client import Client

    token = args.token_file.read_text().strip() if args.token_file else None
    return Client(args.server, token=token, retry_timeout=10.0)


def _one_line(fn: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """Errors a user can act on (the server's answer, a bad file) as one line and exit code 1."""
    from adamd.client import AdamdError

    @functools.wraps(fn)
    def run(args: argparse.Namespace) -> int:
        try:
            return fn(args)
        except (AdamdError, interop.CheckpointError, ShardExportError, OSError) as exc:
            print(f"adamd snapshot {args.snapshot_command}: {exc}", file=sys.stderr)
            return 1

    return run


@_one_line
def _save(args: argparse.Namespace) -> int:
    with _client(args) as c:
        info = c.snapshot(args.model)
    print(
        f"{info.model} version {info.version}: {info.path} ({info.bytes} bytes, {info.seconds:.3f}s)"
    )
    return 0


@_one_line
def _list(args: argparse.Namespace) -> int:
    data_dir = _data_dir(args)
    dirs = [data_dir / args.model] if args.model else fmt.model_dirs(data_dir)
    bad = 0
    for d in dirs:
        for f in fmt.list_snapshots(d):
            status = ""
            if args.verify:
                try:
                    fmt.load(f)
                    status = "ok"
                except fmt.CorruptSnapshot as exc:
                    status, bad = f"CORRUPT: {exc}", bad + 1
            if args.json:
                row = {"model": f.model, "seq": f.seq, "version": f.version, "bytes": f.nbytes}
                print(json.dumps({**row, "path": str(f.manifest), "status": status}))
            else:
                print(
                    f"{f.model}\tseq {f.seq}\tversion {f.version}\t{f.nbytes} B\t{f.manifest}\t{status}"
                )
    return 1 if bad else 0


@_one_line
def _export(args: argparse.Namespace) -> int:
    if args.shard:
        return _export_sharded(args)
    model_dir = _data_dir(args) / args.model
    loaded = None
    if args.seq is not None:
        match = [f for f in fmt.list_snapshots(model_dir) if f.seq == args.seq]
        if not match:
            print(f"no snapshot {args.seq} of {args.model} in {model_dir}", file=sys.stderr)
            return 1
        loaded = fmt.load(match[0])
    else:
        for outcome in fmt.newest_valid(model_dir):
            if isinstance(outcome, fmt.CorruptSnapshot):
                print(f"skipping invalid snapshot: {outcome}", file=sys.stderr)
            else:
                loaded = outcome
        if loaded is None:
            print(f"no valid snapshot of {args.model} in {model_dir}", file=sys.stderr)
            return 1
    interop.save_checkpoint(interop.to_torch_checkpoint(loaded), args.out)
    print(f"{args.model} version {loaded.manifest['version']} -> {args.out}")
    return 0


def _export_sharded(args: argparse.Namespace) -> int:
    params, groups, state, version = merge(newest_common([d / args.model for d in args.shard]))
    interop.save_checkpoint(interop.checkpoint_of(params, groups, state), args.out)
    print(f"{args.model} version {version} ({len(args.shard)} shards) -> {args.out}")
    return 0


@_one_line
def _import(args: argparse.Namespace) -> int:
    params, groups, state, dropped = interop.from_torch_checkpoint(
        interop.load_checkpoint(args.file)
    )
    if dropped:
        print(f"ignoring param-group keys that are not Adam options: {dropped}", file=sys.stderr)
    with _client(args) as c:
        c.create_model(
            args.model, params, param_groups=groups, world_size=args.world_size, mode=args.mode
        )
        try:
            if state:
                c.load_state(args.model, state, groups)
            # On disk before we say it worked: the import survives a crash right after.
            info = c.snapshot(args.model)
        except BaseException:
            c.delete_model(args.model)  # no half-imported model left behind
            raise
    print(f"imported {args.file} as {args.model} ({len(params)} parameters), snapshot {info.path}")
    return 0
