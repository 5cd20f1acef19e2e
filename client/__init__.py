"""adamd's client: `Client` for push_grad / pull_params and the rest, and `RemoteAdam`, a drop-in
torch.optim.Optimizer whose Adam runs on an adamd server."""

from adamd.protocol.allocator import tune_malloc

from ._client import Client
from ._exceptions import (
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
    StalePush,
    Unauthenticated,
    Unavailable,
)
from ._remote_adam import RemoteAdam
from ._tls import TLSConfig
from ._types import ModelInfo, PullResult, PushResult

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
    "PullResult",
    "PushResult",
    "RemoteAdam",
    "StalePush",
    "TLSConfig",
    "Unauthenticated",
    "Unavailable",
]
