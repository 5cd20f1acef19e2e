"""The client side of the same-host fast path: shared-memory files instead of gRPC streams.

When client and server run on one host, the server keeps a model's parameters in a file under
/dev/shm and gives each client session a gradient file of the same layout (see AttachReply in
protos/adamd/v1/adamd.proto). A push copies gradients into the session's file and sends only a
header; a pull copies parameters out of the shared file, checking the seqlock counter in its
header so a step running meanwhile is never read half-done. Nothing here is needed for
correctness: any failure drops the session and the client goes back to gRPC streams.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import grpc
import torch

from adamd.client._transport.base import Tensors, Transport
from adamd.client._transport.bulk import Unreachable
from adamd.client._transport.streams import SERVICE
from adamd.client._types import PullResult
from adamd.protocol.frames import dtype_from_pb, shape_of
from adamd.protocol.shared_files import SEQ, VERSION, SharedFile, host_id
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


class SameHostTransport:
    """The Transport through same-host sessions: gradients written into the session's file and
    only the header sent (over `grpc`), parameters read out of the shared file. Unreachable
    where the model has no session here or the tensors do not fit it."""

    def __init__(
        self,
        channel: grpc.Channel,
        grpc_push: Transport,
        kw: Callable[[], dict[str, Any]],
        metadata: Sequence[tuple[str, str]],
    ):
        self.sessions: dict[str, SameHostSession | None] = {}
        self._grpc, self._kw, self._metadata = grpc_push, kw, metadata
        ser = lambda m: m.SerializeToString()
        self._attach = channel.unary_unary(SERVICE + "Attach", ser, pb.AttachReply.FromString)
        self._detach = channel.unary_unary(SERVICE + "Detach", ser, pb.DetachReply.FromString)

    def close(self) -> None:
        for model in list(self.sessions):
            self.drop(model)

    def session(self, model: str) -> SameHostSession | None:
        """This model's shared-memory session, attached on first use; None means the network."""
        if model not in self.sessions:
            session = None
            try:
                reply = self._attach(pb.AttachRequest(model=model, host_id=host_id()), **self._kw())
            except grpc.RpcError:
                reply = pb.AttachReply(accepted=False)
            if reply.accepted:
                try:
                    session = SameHostSession(model, reply)
                except (OSError, ValueError, RuntimeError):
                    # Accepted but unusable (the files are not visible here): give them back.
                    self._detach_quietly(model, reply.session)
            self.sessions[model] = session
        session = self.sessions[model]
        if session is not None and not session.valid():
            self.drop(model)
            return self.session(model)
        return session

    def drop(self, model: str, *, reattach: bool = True) -> None:
        """Forget the model's session; without `reattach`, this client streams from now on."""
        session = self.sessions.pop(model, None)
        if not reattach:
            self.sessions[model] = None
        if session is not None:
            self._detach_quietly(model, session.id)

    def _detach_quietly(self, model: str, session: str) -> None:
        try:
            self._detach(
                pb.DetachRequest(model=model, session=session), timeout=5, metadata=self._metadata
            )
        except grpc.RpcError:
            pass

    @contextlib.contextmanager
    def claim(
        self, header: pb.PushHeader, grads: Mapping[str, torch.Tensor]
    ) -> Iterator[pb.PushHeader | None]:
        """The push's gradients written into the session's file, held there (no other push of
        this client writes it) until the block ends; yields the header to send, which names the
        session, or None where the push must stream. The file holds one push at a time (a sync
        round reads it until the round completes): a concurrent push streams instead."""
        session = self.session(header.model)
        if session is None or not session.fits(grads) or not session.busy.acquire(blocking=False):
            yield None
            return
        try:
            claimed = pb.PushHeader()
            claimed.CopyFrom(header)
            del claimed.grads[:]
            claimed.grads.extend(session.write_grads(grads))
            claimed.session = session.id
            yield claimed
        finally:
            session.busy.release()

    def push(
        self, header: pb.PushHeader, tensors: Sequence[torch.Tensor], wire: torch.dtype | None
    ) -> pb.PushReply:
        """Send a claimed header (its gradients are in the file already)."""
        return self._grpc.push(header, (), None)

    def pull(self, request: pb.PullRequest, out: Tensors | None) -> PullResult | None:
        """A pull served from shared memory (Unreachable where the network must answer)."""
        same = not request.wire_dtype and not request.HasField("wait_for_version")
        session = self.session(request.model) if same else None
        if session is None:
            raise Unreachable("no same-host session for this pull")
        wanted = list(request.names or session.param_views)
        if any(n not in session.param_views for n in wanted):
            raise Unreachable("let the server name what is missing")
        if out is not None and not all(t.device.type == "cpu" for t in out.values()):
            raise Unreachable("device tensors land through pinned buffers, not the file")
        views = session.param_views
        if out is not None and any(
            n in out and tuple(out[n].shape) != tuple(views[n].shape) for n in wanted
        ):
            raise Unreachable("out's shapes are the server's to judge")
        if request.HasField("if_newer_than") and session.version() <= request.if_newer_than:
            return PullResult(session.version(), {}, True)
        try:
            version, params = session.read_params(wanted, out)
        except TimeoutError:
            raise Unreachable("parameters kept changing in the file") from None
        if not session.valid():  # retired while we read: the server's copy moved
            self.drop(session.model)
            raise Unreachable("the session was retired while we read")
        return PullResult(version, params)

    def step(
        self,
        header: pb.PushHeader,
        tensors: Sequence[torch.Tensor],
        request: pb.PullRequest,
        out: Tensors,
    ) -> tuple[pb.PushReply, PullResult | None]:
        return self.push(header, tensors, None), None
