"""adamd's client: `Client` for push_grad / pull_params and the rest, and `RemoteAdam`, a drop-in
torch.optim.Optimizer whose Adam runs on an adamd server."""

from adamd.client._client import Client
from adamd.client._exceptions import (
    Aborted,
    AdamdError,
    AlreadyExists,
    DeadlineExceeded,
    DuplicatePush,
    FailedPrecondition,
    InvalidArgument,
    LimitExceeded,
    NonFiniteGradient,
    NotFound,
    PermissionDenied,
    StalePush,
    Unauthenticated,
    Unavailable,
)
from adamd.client._remote_adam import RemoteAdam
from adamd.client._tls import TLSConfig
from adamd.client._types import ModelInfo, PullResult, PushResult
from adamd.protocol.allocator import tune_malloc

tune_malloc()  # reuse large buffers instead of mapping them afresh every step

__all__ = [
    "Aborted",
    "AdamdError",
    "AlreadyExists",
    "Client",
    "DeadlineExceeded",
    "DuplicatePush",
    "FailedPrecondition",
    "InvalidArgument",
    "LimitExceeded",
    "ModelInfo",
    "NonFiniteGradient",
    "NotFound",
    "PermissionDenied",
    "PullResult",
    "PushResult",
    "RemoteAdam",
    "StalePush",
    "TLSConfig",
    "Unauthenticated",
    "Unavailable",
]
