"""The policy in force, and its reload (SIGHUP): swapped whole, so a call sees the old grants or
the new ones, never a mix, and no connection is dropped. A file that does not load leaves the
old grants in force (logged, and written to the audit log)."""

from __future__ import annotations

import logging
from pathlib import Path

from adamd.server.auth.audit import AuditLog
from adamd.server.auth.loader import AuthFileError, load_policy
from adamd.server.auth.policy import OPEN, Policy

logger = logging.getLogger(__name__)


class Access:
    def __init__(
        self, policy: Policy = OPEN, path: Path | None = None, audit: AuditLog | None = None
    ):
        """`path`: the auth file `policy` came from (None: nothing to reload)."""
        self.policy = policy  # replaced whole by reload(); readers take one reference per call
        self.path = path
        self.audit = audit or AuditLog(None)

    @classmethod
    def from_file(cls, path: Path, audit: AuditLog | None = None) -> Access:
        """Raises AuthFileError (naming the line) when the file cannot be used."""
        return cls(load_policy(path), path, audit)

    def reload(self) -> bool:
        """Read the auth file again; False (the old grants stay) when it cannot be used."""
        self.audit.reopen()
        if self.path is None:
            return True
        try:
            policy = load_policy(self.path)
        except AuthFileError as exc:
            # The audit line first: whoever waits for the log line finds the reload audited.
            self.audit.write("(SIGHUP)", None, "reload_auth", "Refused", "reload")
            logger.error("%s; the previous grants stay in force", exc)
            return False
        self.policy = policy
        self.audit.write("(SIGHUP)", None, "reload_auth", "OK", "reload")
        logger.info("auth file %s reloaded: %d principals", self.path, len(policy.principal_names))
        return True
