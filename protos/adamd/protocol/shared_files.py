"""The byte layout of the same-host shared-memory files, which client and server both map.

A file starts with a 64-byte header (magic, seqlock counter, version, nonce), then each tensor at
the offset the AttachReply announces (see protos/adamd/v1/adamd.proto). The server writes
parameters under the seqlock; a reader retries while the counter is odd or has moved.
"""

from __future__ import annotations

import mmap
import os
import struct
from collections.abc import Sequence

import torch

HEADER_BYTES = 64
MAGIC = b"ADAMDSHM"
# Header fields (little-endian u64 at these byte offsets): the seqlock counter (odd while a step
# writes), the model version, and the session nonce that proves a file is the one announced.
SEQ, VERSION, NONCE = 8, 16, 24


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
            and bytes(self.map[NONCE : NONCE + len(nonce)]) == nonce
        )
