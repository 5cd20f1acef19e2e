"""glibc malloc thresholds for processes that move tensors: set once, in-process, at import.

Every step allocates and frees buffers of tens of MiB (frame bytes, wire-dtype copies, grpc's
slices). With glibc's defaults the large ones are fresh `mmap`s and the heap top is trimmed back
to the kernel after each free, so every step maps and faults in the same memory again: 14-21k
page faults per 25M-parameter fp32 step on the client, up to 13k on the server. Raising the mmap
threshold (256 MiB) and the trim threshold (512 MiB) keeps that memory in the heap and reuses it
(measured in bench/cpu_per_byte.py: see BENCHMARKS.md). Lowering them makes it worse.

The cost: up to the trim threshold of freed memory stays with the process instead of going back
to the kernel. `ADAMD_MALLOC_TUNE=0` in the environment leaves glibc's defaults alone. On a libc
that is not glibc (musl, macOS) nothing is done.
"""

from __future__ import annotations

import ctypes
import os
import platform

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_BYTES = 256 << 20
TRIM_THRESHOLD_BYTES = 512 << 20

_applied: bool | None = None


def tune_malloc() -> bool:
    """Raise glibc's mmap and trim thresholds once per process; True when they are set."""
    global _applied
    if _applied is not None:
        return _applied
    _applied = False
    if os.environ.get("ADAMD_MALLOC_TUNE", "1").strip().lower() in ("0", "false", "no", "off"):
        return False
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    ok = mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES) == 1
    ok = mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES) == 1 and ok
    _applied = ok
    return ok
