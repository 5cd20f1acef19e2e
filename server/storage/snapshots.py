"""Durability: when snapshots are written, restoring them at start, and durable acknowledgements.

`SnapshotManager` is a daemon extension. `start()` (before gRPC serves) restores every model under
`data_dir` from its newest valid snapshot; `stop()` (after gRPC drained, so no step is in flight)
writes a final snapshot of every model that changed since its last one.

Each model gets a `ModelSnapshots` with one writer thread. Anything that wants a snapshot (every N
steps, every T seconds, the Snapshot RPC, a durable push, shutdown) calls `request()`, which only
bumps a counter; the writer copies the model's state under its lock (a memory copy, so pushes stall
for that long only), then writes and fsyncs without the lock. One write serves every request made
before it started, so concurrent durable pushes coalesce into one write instead of queueing one
each.

Durable mode counts "changes" (steps applied or skipped, and edits: hyperparameters, param groups,
loaded state; seen by listeners under the model lock). A push or an edit is acknowledged once a
snapshot whose capture saw at least the changes present when it returned is on disk; that snapshot
holds the push's id, so a retry after a crash is answered from it instead of being applied again.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import shutil
import threading
import time
from pathlib import Path
from typing import Any

import grpc
import torch

from adamd.server.config import ServerConfig
from adamd.server.core.membership import DEFAULT_LEASE_S
from adamd.server.core.model import HostedModel, StepRecord
from adamd.server.core.precision import Precision
from adamd.server.core.registry import ModelRegistry
from adamd.server.errors import NotFound, ServerError, StartupError
from adamd.server.storage import format as fmt
from adamd.v1 import adamd_pb2 as pb

logger = logging.getLogger(__name__)


class NotDurable(ServerError):
    """A snapshot could not be written. UNAVAILABLE, so clients retry (a retried push under the
    same id is answered from memory and waits for the next write)."""

    code = grpc.StatusCode.UNAVAILABLE
    http_status = 503


class ModelSnapshots:
    """The snapshots of one model: its writer thread and what has been persisted."""

    def __init__(self, model: HostedModel, model_dir: Path, config: ServerConfig):
        self.model = model
        self.dir = model_dir
        self.keep = config.snapshot_keep
        self.every_steps = config.snapshot_every_steps
        self.changes = 0  # steps and edits seen (counted under the model lock)
        self.persisted_changes = -1  # changes covered by the newest snapshot on disk (-1: none)
        self.last_write = time.monotonic()
        self.last_file: fmt.SnapshotFile | None = None
        self._last_error: BaseException | None = None
        self._step_trigger = 0  # changes at the last every-N-steps request
        self._seq = fmt.next_seq(model_dir)
        self._cond = threading.Condition()
        self._requested = 0  # requests made
        self._started = 0  # requests the write in progress (or last) covers
        self._done = 0  # requests whose write finished (successfully or not)
        self._ok = 0  # requests whose write succeeded
        self._captured: tuple[int, fmt.Capture] | None = None  # (ticket, copy) from the observer
        self._closed = False
        self._thread = threading.Thread(
            target=self._run, name=f"adamd-snapshot-{model.name}", daemon=True
        )
        self._thread.start()
        model.observers.append(self._observe)
        model.edit_listeners.append(self._edited)

    # --- triggers ------------------------------------------------------------------------------

    def _observe(self, record: StepRecord) -> None:
        # Called with the model lock held, after every round: keep it to counter updates.
        self.changes += 1
        if self.every_steps > 0 and self.changes - self._step_trigger >= self.every_steps:
            self._step_trigger = self.changes
            # Copy now, while the step still holds the lock, so the snapshot is exactly this
            # version; the writer thread then only writes.
            with contextlib.suppress(NotDurable):
                self.request(fmt.capture(self.model, self.changes))

    def _edited(self) -> None:
        self.changes += 1  # model lock held; the periodic and final snapshots will see it

    @property
    def dirty(self) -> bool:
        return self.changes > self.persisted_changes

    def request(self, cap: fmt.Capture | None = None) -> int:
        """Ask for a snapshot taken from now on (or of `cap`, copied just now by the caller under
        the model lock); returns a ticket for wait()."""
        with self._cond:
            if self._closed:
                raise NotDurable(f"snapshots of model {self.model.name!r} are shut down")
            self._requested += 1
            if cap is not None:
                self._captured = (self._requested, cap)  # a newer copy supersedes an unwritten one
            self._cond.notify_all()
            return self._requested

    def wait(self, ticket: int, timeout: float | None = None) -> fmt.SnapshotFile:
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while self._done < ticket:
                if self._closed and not self._thread.is_alive():
                    raise NotDurable(f"snapshots of model {self.model.name!r} are shut down")
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise NotDurable(f"snapshot of model {self.model.name!r} timed out")
                self._cond.wait(remaining if remaining is not None else 1.0)
            if self._ok < ticket or self.last_file is None:
                raise NotDurable(
                    f"writing a snapshot of model {self.model.name!r} failed: {self._last_error}"
                )
            return self.last_file

    def snapshot_now(self, timeout: float | None = None) -> fmt.SnapshotFile:
        return self.wait(self.request(), timeout)

    def make_durable(self) -> None:
        """Return once everything this model has done so far is on disk."""
        target = self.changes
        if self.persisted_changes >= target:
            return
        self.wait(self.request())

    # --- the writer ----------------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._cond:
                while self._requested == self._started and not self._closed:
                    self._cond.wait()
                if self._requested == self._started:
                    return  # closed with nothing pending
                pre, self._captured = self._captured, None
                if pre is not None and pre[0] > self._started:
                    ticket, cap = pre  # covers every request made before it was copied
                else:
                    ticket, cap = self._requested, None
                self._started = ticket
            error: BaseException | None = None
            file = None
            try:
                if cap is None:
                    with self.model.locked():  # so `changes` matches what is copied
                        cap = fmt.capture(self.model, self.changes)
                changes = cap.changes
                file = fmt.write(cap, self.dir, self._seq)
                self._seq += 1
                fmt.prune(self.dir, self.keep)
                logger.debug(
                    "model %s: snapshot %s (%d bytes) in %.3fs",
                    self.model.name,
                    file.manifest.name,
                    file.nbytes,
                    file.seconds,
                )
            except Exception as exc:
                error = exc
                logger.exception("model %s: writing a snapshot failed", self.model.name)
            with self._cond:
                self._done = ticket
                if file is not None:
                    self._ok = ticket
                    self.last_file = file
                    self.persisted_changes = max(self.persisted_changes, changes)
                    self.last_write = time.monotonic()
                else:
                    self._last_error = error
                self._cond.notify_all()

    def close(self) -> None:
        """Finish the pending write, stop the thread, stop observing the model."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join()
        with contextlib.suppress(ValueError):
            self.model.observers.remove(self._observe)
        with contextlib.suppress(ValueError):
            self.model.edit_listeners.remove(self._edited)


class SnapshotManager:
    """The daemon extension: restore at start, periodic/on-demand/durable writes, final snapshots."""

    def __init__(self, config: ServerConfig, registry: ModelRegistry):
        self.config = config
        self.registry = registry
        self.data_dir = Path(config.data_dir)
        self._models: dict[str, ModelSnapshots] = {}
        self._lock = threading.Lock()
        self._restoring = False
        self._stop = threading.Event()
        self._timer: threading.Thread | None = None
        self.restored: dict[str, int] = {}  # model -> version restored at start
        self.corrupt: list[str] = []  # what failed verification at start (also logged)
        self._dir_lock: Any = None  # the open lock file while this server owns data_dir

    # --- lifecycle ------------------------------------------------------------------------------

    def start(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._dir_lock = _lock(self.data_dir)
        self.registry.on_create.append(self._on_create)
        self.registry.on_delete.append(self._on_delete)
        self._restoring = True
        try:
            for model_dir in fmt.model_dirs(self.data_dir):
                self._restore(model_dir)
        finally:
            self._restoring = False
        if self.config.snapshot_every_s > 0:
            self._timer = threading.Thread(
                target=self._tick, name="adamd-snapshot-timer", daemon=True
            )
            self._timer.start()

    def stop(self) -> None:
        """Write final snapshots (gRPC has drained: no step is in flight), then stop the writers."""
        self._stop.set()
        if self._timer is not None:
            self._timer.join()
        with self._lock:
            trackers = list(self._models.values())
        for t in trackers:
            if t.dirty:
                try:
                    file = t.snapshot_now()
                    logger.info(
                        "model %s: final snapshot at version %d", t.model.name, file.version
                    )
                except NotDurable:
                    logger.error("model %s: final snapshot failed", t.model.name)
            t.close()
        if self._dir_lock is not None:
            self._dir_lock.close()  # releases the lock
            self._dir_lock = None

    # --- restore --------------------------------------------------------------------------------

    def _restore(self, model_dir: Path) -> None:
        fmt.remove_temp_files(model_dir)
        for outcome in fmt.newest_valid(model_dir):
            if isinstance(outcome, fmt.CorruptSnapshot):
                logger.error("skipping invalid snapshot: %s", outcome)
                self.corrupt.append(str(outcome))
                continue
            model = build_model(outcome, self.registry)
            self.registry.add(model)  # _on_create attaches the tracker
            tracker = self._models[model.name]
            tracker.persisted_changes = tracker.changes  # what is in memory is on disk
            tracker.last_file = outcome.file
            self.restored[model.name] = model.version
            logger.info(
                "model %s: restored version %d from %s",
                model.name,
                model.version,
                outcome.file.manifest.name,
            )
            return
        if fmt.list_snapshots(model_dir):
            logger.error(
                "model %s: no valid snapshot in %s; not restored", model_dir.name, model_dir
            )

    # --- registry callbacks ---------------------------------------------------------------------

    def _on_create(self, model: HostedModel) -> None:
        tracker = ModelSnapshots(model, self.data_dir / model.name, self.config)
        with self._lock:
            self._models[model.name] = tracker
        if self.config.durable and not self._restoring:
            # The creating call is acknowledged only once the model is on disk.
            tracker.snapshot_now()

    def _on_delete(self, name: str) -> None:
        with self._lock:
            tracker = self._models.pop(name, None)
        if tracker is not None:
            tracker.close()
        # A deleted model must not come back at the next start.
        shutil.rmtree(self.data_dir / name, ignore_errors=True)

    def _tick(self) -> None:
        period = self.config.snapshot_every_s
        while not self._stop.wait(min(period, 0.5)):
            now = time.monotonic()
            with self._lock:
                trackers = list(self._models.values())
            for t in trackers:
                if t.dirty and now - t.last_write >= period:
                    t.last_write = now  # not again before the write lands
                    with contextlib.suppress(NotDurable):
                        t.request()

    # --- RPC hooks ------------------------------------------------------------------------------

    def tracker(self, name: str) -> ModelSnapshots:
        with self._lock:
            tracker = self._models.get(name)
        if tracker is None:
            raise NotFound(f"no model named {name!r}")
        return tracker

    def snapshot(self, name: str) -> pb.SnapshotInfo:
        """The Snapshot RPC (and the HTTP side): write one now, wait for it, say where it is."""
        file = self.tracker(name).snapshot_now()
        return pb.SnapshotInfo(
            model=name,
            version=file.version,
            path=str(file.manifest),
            bytes=file.nbytes,
            seconds=file.seconds,
        )

    def make_durable(self, name: str) -> None:
        """Durable mode: hold the reply to a push or an edit until it is on disk."""
        with self._lock:
            tracker = self._models.get(name)
        if tracker is not None:
            tracker.make_durable()


def _lock(data_dir: Path) -> Any:
    """Hold data_dir for this process: two servers writing one data dir would prune, delete and
    overwrite each other's snapshots. The kernel drops the lock when the process dies."""
    f = open(data_dir / ".adamd.lock", "a+")  # noqa: SIM115 (held open until stop)
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "another process"
        f.close()
        raise StartupError(
            f"data dir {data_dir} is in use by another adamd server ({holder});"
            " give each server its own --data-dir"
        ) from None
    f.seek(0)
    f.truncate()
    f.write(f"pid {os.getpid()}\n")
    f.flush()
    return f


def build_model(loaded: fmt.Loaded, registry: ModelRegistry) -> HostedModel:
    """A HostedModel with a snapshot's parameters, Adam state, counters and push ids."""
    m = loaded.manifest
    device = registry.device
    params = {
        n: t.to(device) if device.type != "cpu" else t for n, t in fmt.params_of(loaded).items()
    }
    groups = fmt.groups_of(loaded)
    model = HostedModel(
        m["model"],
        params,
        groups,
        device=device,
        world_size=m["world_size"],
        mode=m["mode"],
        max_staleness=m["max_staleness"],
        round_timeout_s=m["round_timeout_s"],
        elastic=m.get("elastic", False),  # older snapshots: not elastic
        lease_s=m.get("lease_s") or DEFAULT_LEASE_S,
        precision=Precision.from_record(m),  # older snapshots: no master weights
    )
    model.layout = m.get("layout", "")  # older snapshots: unsharded
    state = {
        name: {k: t if k == "step" else t.to(device) for k, t in entry.items()}
        for name, entry in fmt.state_by_name(loaded).items()
    }
    with torch.no_grad():
        model.load_state(state, groups)
    model.restore(m["version"], m["skipped_steps"], fmt.push_results(m))
    return model
