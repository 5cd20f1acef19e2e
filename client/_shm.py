"""The client side of the same-host fast path: shared-memory files instead of gRPC streams.

When client and server run on one host, the server keeps a model's parameters in a file under
/dev/shm and gives each client session a gradient file of the same layout (see AttachReply in
protos/adamd/v1/adamd.proto). A push copies gradients into the session's file and sends only a
header; a pull copies parameters out of the shared file, checking the seqlock counter in its
header so a step running meanwhile is never read half-done. Nothing here is needed for
correctness: any failure drops the session and the client goes back to gRPC streams.
"""

from __future__ import annotations

import mmap
import os
import struct
import threading
import time
from collections.abc import Mapping, Sequence

import torch

from adamd.v1 import adamd_pb2 as pb

from ._wire import dtype_from_pb, shape_of

HEADER_BYTES = 64
MAGIC = b"ADAMDSHM"
_SEQ, _VERSION, _NONCE = 8, 16, 24


def host_id(root: str = "/dev/shm") -> str:
    """Who shares `root` with us: the kernel's boot id (different across hosts) and the device of
    the shared-memory mount (different across containers on one host, each with its own /dev/shm).
    Empty when either is missing."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
        return f"{boot}:{os.stat(root).st_dev}" if boot else ""
    except OSError:
        return ""


class SharedFile:
    """A file mapped read-write, with tensor views at fixed byte offsets."""

    def __init__(self, path: str, nbytes: int, *, create: bool):
        flags = os.O_RDWR | (os.O_CREAT | os.O_EXCL if create else 0)
        fd = os.open(path, flags, 0o600)
        try:
            if create:
                try:
                    # Reserve the pages now: a tmpfs that fills up later (Docker's /dev/shm is
                    # 64 MiB) would kill whoever writes with SIGBUS instead of raising here.
                    os.posix_fallocate(fd, 0, nbytes)
                except OSError:
                    os.unlink(path)
                    raise
            elif os.fstat(fd).st_size < nbytes:
                raise OSError(f"{path} is smaller than announced")
            self.map = mmap.mmap(fd, nbytes)
        finally:
            os.close(fd)
        self.path = path
        self.nbytes = nbytes

    def view(self, offset: int, shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
        count = 1
        for d in shape:
            count *= int(d)
        flat = torch.frombuffer(
            self.map, dtype=torch.uint8, count=count * dtype.itemsize, offset=offset
        )
        return flat.view(dtype).view(tuple(shape))

    def read_u64(self, at: int) -> int:
        return int(struct.unpack_from("<Q", self.map, at)[0])

    def write_u64(self, at: int, value: int) -> None:
        struct.pack_into("<Q", self.map, at, value)

    def valid(self, nonce: bytes) -> bool:
        return (
            bytes(self.map[: len(MAGIC)]) == MAGIC
            and bytes(self.map[_NONCE : _NONCE + len(nonce)]) == nonce
        )


class SameHostSession:
    """One client's mapped files for one model."""

    def __init__(self, model: str, reply: pb.AttachReply):
        self.model = model
        self.id = reply.session
        self.busy = threading.Lock()  # held while a push's gradients sit in the gradient file
        self.nonce = bytes(reply.nonce)
        self.params = SharedFile(reply.params_path, reply.nbytes, create=False)
        self.grads = SharedFile(reply.grads_path, reply.nbytes, create=False)
        if not self.params.valid(self.nonce):
            raise OSError("mapped a file that is not this session's (different /dev/shm?)")
        self.specs = {s.name: s for s in reply.tensors}
        self.param_views: dict[str, torch.Tensor] = {}
        self.grad_views: dict[str, torch.Tensor] = {}
        for spec, offset in zip(reply.tensors, reply.offsets):
            shape, dtype = shape_of(spec), dtype_from_pb(spec.dtype)
            self.param_views[spec.name] = self.params.view(offset, shape, dtype)
            self.grad_views[spec.name] = self.grads.view(offset, shape, dtype)

    def valid(self) -> bool:
        return self.params.valid(self.nonce)

    def fits(self, tensors: Mapping[str, torch.Tensor]) -> bool:
        """Whether these gradients can go through the files (else they stream, and the server
        judges them: a copy into the float views would turn an int or complex tensor into floats)."""
        views = self.grad_views
        return all(
            n in views and views[n].shape == t.shape and t.is_floating_point()
            for n, t in tensors.items()
        )

    def write_grads(self, grads: Mapping[str, torch.Tensor]) -> list[pb.TensorSpec]:
        with torch.no_grad():
            for name, g in grads.items():
                self.grad_views[name].copy_(g)
        return [self.specs[n] for n in grads]

    def version(self) -> int:
        return self.params.read_u64(_VERSION)

    def read_params(
        self, names: Sequence[str], out: Mapping[str, torch.Tensor] | None, timeout: float = 30.0
    ) -> tuple[int, dict[str, torch.Tensor]]:
        """Copy parameters out under the seqlock: retried while a step writes them meanwhile."""
        deadline = time.monotonic() + timeout
        while True:
            seq = self.params.read_u64(_SEQ)
            if seq % 2 == 0:
                version = self.params.read_u64(_VERSION)
                result = {}
                with torch.no_grad():
                    for name in names:
                        src = self.param_views[name]
                        dst = out.get(name) if out is not None else None
                        if dst is None:
                            dst = src.clone()
                        else:
                            dst.copy_(src)
                        result[name] = dst
                if self.params.read_u64(_SEQ) == seq:
                    return version, result
            if time.monotonic() > deadline:
                raise TimeoutError("parameters kept changing while being read")
            time.sleep(0.0005)
