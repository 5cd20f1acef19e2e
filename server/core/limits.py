"""What one caller may ask of the daemon: sizes and counts, checked before anything is allocated.

A request declares its tensors (names, shapes, dtypes) in a header before any bytes follow. These
checks run on the header alone, so a 40-byte request declaring a [1<<40] tensor is refused as
LimitExceeded (RESOURCE_EXHAUSTED, HTTP 413) without a byte of it being allocated. The values come
from ServerConfig (`serve --max-*`); docs/security.md says what each one protects.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from adamd.server.errors import InvalidArgument, LimitExceeded

TensorSpecs = Sequence[tuple[str, tuple[int, ...], torch.dtype]]

MAX_DIMS = 32  # torch tensors have at most a few dozen dims; more is never a real model


@dataclass(frozen=True)
class Limits:
    max_model_bytes: int = 32 << 30  # parameter bytes per model (Adam state adds 2-3x this)
    max_tensors: int = 65536  # tensors in one request: a model's parameters, a push, a state
    max_name_bytes: int = 1024  # a parameter's name (UTF-8); model names are 1-128 characters
    max_push_id_bytes: int = 256  # a push id, remembered for exactly-once and in snapshots
    max_message_bytes: int = 64 << 20  # one gRPC message, either way
    max_stream_bytes: int = 0  # one request stream in all; 0: 4 x max_model_bytes + a message

    @property
    def stream_bytes(self) -> int:
        """The stream cap in force: by default room for a full LoadState with amsgrad (three
        state tensors per parameter, each as large as the parameters) plus its header."""
        if self.max_stream_bytes:
            return self.max_stream_bytes
        return 4 * self.max_model_bytes + self.max_message_bytes

    def check_specs(self, what: str, specs: TensorSpecs) -> int:
        """Count, names, dims and total size of declared tensors; returns their bytes."""
        if len(specs) > self.max_tensors:
            raise LimitExceeded(
                f"{what} declares {len(specs)} tensors; this server takes at most"
                f" {self.max_tensors} (--max-tensors)"
            )
        total = 0
        for name, shape, dtype in specs:
            self.check_name(what, name)
            total += tensor_bytes(name, shape, dtype)
            if total > self.max_model_bytes:
                raise LimitExceeded(
                    f"{what} declares more than {self.max_model_bytes} bytes of tensors"
                    " (--max-model-bytes)"
                )
        return total

    def check_name(self, what: str, name: str) -> None:
        if len(name.encode()) > self.max_name_bytes:
            raise LimitExceeded(
                f"{what}: a tensor name of {len(name.encode())} bytes; at most"
                f" {self.max_name_bytes} (--max-name-bytes)"
            )

    def check_push_id(self, push_id: str) -> None:
        if len(push_id.encode()) > self.max_push_id_bytes:
            raise LimitExceeded(
                f"push_id of {len(push_id.encode())} bytes; at most {self.max_push_id_bytes}"
                " (--max-push-id-bytes)"
            )

    def check_model_bytes(self, what: str, nbytes: int) -> None:
        if nbytes > self.max_model_bytes:
            raise LimitExceeded(
                f"{what} would hold {nbytes} bytes of parameters; this server takes at most"
                f" {self.max_model_bytes} per model (--max-model-bytes)"
            )


def tensor_bytes(name: str, shape: Sequence[int], dtype: torch.dtype) -> int:
    """Bytes of a declared tensor, refusing shapes torch cannot or should not allocate.

    Python integers do not overflow, so [1<<32, 1<<32] is simply a very large number here."""
    if len(shape) > MAX_DIMS:
        raise InvalidArgument(f"tensor {name!r} has {len(shape)} dims; at most {MAX_DIMS}")
    n = 1
    for d in shape:
        if d < 0:
            raise InvalidArgument(f"tensor {name!r} has a negative dimension {list(shape)}")
        n *= int(d)
    return n * dtype.itemsize
