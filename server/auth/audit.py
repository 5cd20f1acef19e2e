"""The audit log (`--audit-log F`): one JSON line per change, who made it and how it ended.

    {"time": "2026-12-07T13:40:02.118Z", "principal": "team-a-admin", "model": "team-a-lm",
     "operation": "delete", "outcome": "OK", "action": "DeleteModel"}

Changes are create, delete, load_state, add_param_group, set_hyperparams, snapshot, join and
leave (not each push), refused ones included (their outcome is the error kind), and each reload of
the auth file. Principals appear by name: a token never reaches this file. `reopen()` (SIGHUP)
closes and opens the path again, so logrotate can move the old file away.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from pathlib import Path
from typing import IO

logger = logging.getLogger(__name__)


class AuditLog:
    def __init__(self, path: Path | None):
        """`path` None: nothing is written."""
        self.path = path
        self._lock = threading.Lock()
        self._file: IO[str] | None = self._open() if path is not None else None

    def _open(self) -> IO[str]:
        assert self.path is not None
        return open(self.path, "a", encoding="utf-8", buffering=1)

    def write(
        self, principal: str, model: str | None, operation: str, outcome: str, action: str
    ) -> None:
        if self._file is None:
            return
        now = time.time()
        stamp = (
            time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)) + f".{int(now % 1 * 1000):03d}Z"
        )
        line = json.dumps(
            {
                "time": stamp,
                "principal": principal,
                "model": model,
                "operation": operation,
                "outcome": outcome,
                "action": action,
            }
        )
        with self._lock:
            try:
                self._file.write(line + "\n")
            except (OSError, ValueError) as exc:  # a full disk must not fail the change itself
                logger.error("audit log %s: cannot write (%s): %s", self.path, exc, line)

    def reopen(self) -> None:
        if self.path is None:
            return
        with self._lock:
            old, self._file = self._file, None
            if old is not None:
                old.close()
            try:
                self._file = self._open()
            except OSError as exc:
                logger.error("audit log %s: cannot reopen: %s", self.path, exc.strerror)

    def close(self) -> None:
        with self._lock:
            if self._file is not None:
                self._file.close()
                self._file = None
