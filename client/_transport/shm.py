"""The client side of the same-host fast path: shared-memory files instead of gRPC streams.

When client and server run on one host, the server keeps a model's parameters in a file under
/dev/shm and gives each client session a gradient file of the same layout (see AttachReply in
protos/adamd/v1/adamd.proto). A push copies gradients into the session's file and sends only a
header; a pull copies parameters out of the shared file, checking the seqlock counter in its
header so a step running meanwhile is never read half-done. Nothing here is needed for
correctness: any failure drops the session and the client goes back to gRPC streams.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping, Sequence

import torch

from adamd.protocol.frames import dtype_from_pb, shape_of
from adamd.protocol.shared_files import SEQ, VERSION, SharedFile
from adamd.v1 import adamd_pb2 as pb


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
        # master weights: what a pull without `out` returns (the worker's dtype, rounded RNE)
        self.pull_dtypes = {
            s.name: dtype_from_pb(d) for s, d in zip(reply.tensors, reply.worker_dtypes)
        }
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
        judges them: a copy into the float views would turn an int or complex tensor into floats;
        a copy from the device into the file would be a pageable one)."""
        views = self.grad_views
        return all(
            n in views
            and views[n].shape == t.shape
            and t.is_floating_point()
            and t.device.type == "cpu"  # device tensors go through pinned buffers (pinned.py)
            for n, t in tensors.items()
        )

    def write_grads(self, grads: Mapping[str, torch.Tensor]) -> list[pb.TensorSpec]:
        with torch.no_grad():
            for name, g in grads.items():
                self.grad_views[name].copy_(g)
        return [self.specs[n] for n in grads]

    def version(self) -> int:
        return self.params.read_u64(VERSION)

    def read_params(
        self, names: Sequence[str], out: Mapping[str, torch.Tensor] | None, timeout: float = 30.0
    ) -> tuple[int, dict[str, torch.Tensor]]:
        """Copy parameters out under the seqlock: retried while a step writes them meanwhile."""
        deadline = time.monotonic() + timeout
        while True:
            seq = self.params.read_u64(SEQ)
            if seq % 2 == 0:
                version = self.params.read_u64(VERSION)
                result = {}
                with torch.no_grad():
                    for name in names:
                        src = self.param_views[name]
                        dst = out.get(name) if out is not None else None
                        if dst is None:
                            dst = src.to(self.pull_dtypes.get(name, src.dtype), copy=True)
                        else:
                            dst.copy_(src)
                        result[name] = dst
                if self.params.read_u64(SEQ) == seq:
                    return version, result
            if time.monotonic() > deadline:
                raise TimeoutError("parameters kept changing while being read")
            time.sleep(0.0005)
