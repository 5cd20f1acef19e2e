"""Access control: who a caller is, what its grants let it do, and the audit log of changes.

`policy` holds principals, roles and the one table of what each action needs; `loader` reads
`--auth-file`; `access` keeps the policy in force (reloaded on SIGHUP); `audit` writes
`--audit-log`. The operations layer runs the check (`Operations.guard`); transports only pass
the credentials they found (`Caller`).
"""

from adamd.server.auth.access import Access
from adamd.server.auth.audit import AuditLog
from adamd.server.auth.loader import AuthFileError, load_policy, parse_policy
from adamd.server.auth.policy import (
    ACTIONS,
    ANYONE,
    OPEN,
    Caller,
    Need,
    Policy,
    Principal,
    Role,
    token_policy,
    token_sha256,
)

__all__ = [
    "ACTIONS",
    "ANYONE",
    "OPEN",
    "Access",
    "AuditLog",
    "AuthFileError",
    "Caller",
    "Need",
    "Policy",
    "Principal",
    "Role",
    "load_policy",
    "parse_policy",
    "token_policy",
    "token_sha256",
]
