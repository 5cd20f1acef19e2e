"""The bulk-data channel: pushes and pulls over a plain TCP (or TLS) socket, tensor memory in and
out with no copy but the kernel's.

Python's grpcio copies every chunk of a stream three times over (into the message bytes, into
grpc's own buffers on send, into Python bytes on receive) before adamd copies it into tensor
memory. On this channel a sender hands tensor memory to `socket.sendall` and a receiver
`recv_into`s the destination tensor (bench/two_host.py and BENCHMARKS.md measure what it buys).

A client asks for the channel over gRPC (`OpenBulk`, authorized like every other call: token,
client certificate) and gets a port and a one-use ticket. It connects to the host it reached gRPC
at, on that port (TLS when the gRPC port speaks TLS: same certificate, same client-certificate
rule), sends HELO with the ticket in its header, waits for the server's HELO (the ticket was
taken) and then makes requests one at a time. The server refuses a connection without a valid
ticket by closing it.

Everything on the connection is a frame, as on gRPC streams (adamd.v1's frame messages): a fixed
prefix

    kind (4 ASCII bytes) | header bytes (u32) | tensor (u32) | offset (u64) | data bytes (u64)

little-endian, then the header (a serialized protobuf message, for the kinds that have one),
then the data: raw bytes of the request's tensor number `tensor` from byte `offset` (the same
rules as gRPC frames: a tensor's chunks in order, no gaps, no overlaps).

- PUSH (PushHeader), DATA frames, END (optionally a closing PushHeader, as the last frame of a
  gRPC push may carry) -> DONE (PushReply) or FAIL (BulkError).
- PULL (PullRequest) -> HEAD (PullHeader), DATA frames, END (tensor = 1: the bytes sent are one
  consistent version; 0: a step ran meanwhile, pull again) or FAIL.
- STEP (BulkStep: a PushHeader and a PullRequest), DATA frames, END (optionally a closing
  PushHeader) -> HEAD (PullHeader), DATA frames, END (header: the PushReply; tensor: consistent)
  or FAIL. One round trip for RemoteAdam.step(): on a CPU server each parameter streams back as
  soon as the step has updated it, while later ones still step (the server steps in buckets),
  so the step hides behind the transfer. HEAD goes out once the pulled version is known.

FAIL carries what the gRPC call would have ended with (status code, kind, message). After a FAIL
the server reads and discards the rest of the failed request until the client closes the
connection; neither side uses that connection again.
"""

from __future__ import annotations

import select
import socket
import struct
from collections import deque
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

from .errors import ProtocolError
from .frames import MAX_CHUNK_BYTES, TensorSink, byte_view, wire_chunks, wire_dtype_of

PREFIX = struct.Struct("<4sIIQQ")
HELO, PUSH, PULL, STEP, DATA, END = b"HELO", b"PUSH", b"PULL", b"STEP", b"DATA", b"END_"
DONE, HEAD, FAIL = b"DONE", b"HEAD", b"FAIL"
KINDS = frozenset((HELO, PUSH, PULL, STEP, DATA, END, DONE, HEAD, FAIL))
TICKET_BYTES = 32
# Largest header either side reads (a PushHeader naming many tensors; the server's own limits on
# names and tensors come on top).
MAX_HEADER_BYTES = 64 << 20
# Bytes converted per frame when a tensor travels as another dtype (bf16/fp16): the scratch buffer
# a receiver converts from, and the chunk a sender converts into.
CONVERT_CHUNK_BYTES = MAX_CHUNK_BYTES


@dataclass(frozen=True)
class Prefix:
    kind: bytes
    header: bytes
    tensor: int
    offset: int
    nbytes: int  # data bytes that follow (not read yet)


class Closed(ConnectionError):
    """The peer closed the connection (or it broke) before a whole frame arrived."""


class FrameSocket:
    """One bulk connection's frames, both ways. Blocking I/O: call from one thread at a time.

    Every socket operation waits at most `timeout` seconds for progress (socket.timeout, an
    OSError, past it)."""

    def __init__(self, sock: socket.socket, timeout: float | None):
        self.sock = sock
        sock.settimeout(timeout)
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._prefix = bytearray(PREFIX.size)
        self._scratch: np.ndarray | None = None
        # Conversions (bf16/fp16 wire) overlap the socket: a helper thread sends a converted
        # chunk or converts a received one while this thread converts or receives the next.
        self._helper: ThreadPoolExecutor | None = None
        self._buffers: dict[torch.dtype, list[torch.Tensor]] = {}
        self._inbox: list[np.ndarray] = []
        self._pending: deque[tuple[Future[None], int]] = deque()  # conversions in flight
        self.bytes_in = 0
        self.bytes_out = 0

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass
        if self._helper is not None:
            self._helper.shutdown(wait=False)

    def _helper_thread(self) -> ThreadPoolExecutor:
        if self._helper is None:
            self._helper = ThreadPoolExecutor(1, thread_name_prefix="adamd-bulk-convert")
        return self._helper

    def __del__(self) -> None:
        # A Client dropped without close() (a RemoteAdam left to the garbage collector) closes
        # its idle connections here, as a gRPC channel would, without socket's ResourceWarning.
        try:
            self.close()
        except Exception:
            pass

    def __enter__(self) -> FrameSocket:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- sending --------------------------------------------------------------------------------

    def send(
        self,
        kind: bytes,
        header: bytes = b"",
        tensor: int = 0,
        offset: int = 0,
        data: np.ndarray | memoryview | None = None,
    ) -> None:
        n = 0 if data is None else memoryview(data).nbytes  # type: ignore[arg-type]
        head = PREFIX.pack(kind, len(header), tensor, offset, n) + header
        if n and n <= 4096:  # a small chunk rides with its prefix: one system call
            head += memoryview(data).cast("B")  # type: ignore[arg-type]
            n = 0
        self.sock.sendall(head)
        if n:
            self.sock.sendall(data)  # type: ignore[arg-type]
        self.bytes_out += len(head) + n

    def send_tensor(
        self,
        index: int,
        t: torch.Tensor,
        wire_dtype: torch.dtype | None,
        chunk_bytes: int = CONVERT_CHUNK_BYTES,
    ) -> None:
        """Tensor `t` as DATA frames: a contiguous CPU tensor that travels as itself goes out of
        its own memory in one frame; one that converts (bf16/fp16 wire) goes a chunk at a time
        through one reused buffer (frames.wire_chunks)."""
        if not t.numel():
            return
        same = wire_dtype_of(t.dtype, wire_dtype) == t.dtype
        if same and t.device.type == "cpu" and t.is_contiguous():
            self.send(DATA, b"", index, 0, byte_view(t.detach()))
            return
        if same or t.device.type != "cpu":
            for start, chunk in wire_chunks(t, wire_dtype, chunk_bytes):
                self.send(DATA, b"", index, start, chunk)
            return
        self._send_converted(index, t, wire_dtype_of(t.dtype, wire_dtype), chunk_bytes)

    def _send_converted(
        self, index: int, t: torch.Tensor, wire: torch.dtype, chunk_bytes: int
    ) -> None:
        """Convert chunk k+1 into one buffer while the helper thread sends chunk k from the
        other (the rounding of Tensor.to: the same bits as frames.wire_chunks)."""
        flat = t.detach().reshape(-1)
        per = max(min(chunk_bytes, CONVERT_CHUNK_BYTES) // wire.itemsize, 1)
        buffers = self._buffers.get(wire)
        if buffers is None or buffers[0].numel() < per:
            buffers = self._buffers[wire] = [torch.empty(per, dtype=wire) for _ in range(2)]
        helper = self._helper_thread()
        sending: list[Future[None] | None] = [None, None]
        try:
            for k, i in enumerate(range(0, flat.numel(), per)):
                b = k % 2
                if sending[b] is not None:
                    sending[b].result()  # type: ignore[union-attr]
                n = min(per, flat.numel() - i)
                buffers[b][:n].copy_(flat[i : i + n])
                view = byte_view(buffers[b])[: n * wire.itemsize]
                sending[b] = helper.submit(self.send, DATA, b"", index, i * wire.itemsize, view)
        finally:  # never leave a send running behind an error
            errors = []
            for f in sending:
                if f is not None:
                    try:
                        f.result()
                    except Exception as exc:
                        errors.append(exc)
            if errors:
                raise errors[0]

    def send_tensors(
        self,
        tensors: Sequence[torch.Tensor],
        wire_dtype: torch.dtype | None,
        chunk_bytes: int = CONVERT_CHUNK_BYTES,
    ) -> None:
        for index, t in enumerate(tensors):
            self.send_tensor(index, t, wire_dtype, chunk_bytes)

    # --- receiving ------------------------------------------------------------------------------

    def _recv_exact(self, view: memoryview) -> None:
        got, want = 0, view.nbytes
        while got < want:
            n = self.sock.recv_into(view[got:], want - got)
            if not n:
                raise Closed(f"connection closed with {want - got} bytes of a frame unread")
            got += n
        self.bytes_in += want

    def recv(self, max_header: int = MAX_HEADER_BYTES) -> Prefix:
        """The next frame's prefix and header; its data (`nbytes`) is still to be read."""
        self._recv_exact(memoryview(self._prefix))
        kind, hlen, tensor, offset, nbytes = PREFIX.unpack(self._prefix)
        if kind not in KINDS:
            raise ProtocolError(f"not an adamd bulk frame (kind {bytes(kind)!r})")
        if kind == DATA and hlen:
            raise ProtocolError("a DATA frame carries no header")
        if hlen > max_header:
            raise ProtocolError(f"a frame header of {hlen} bytes (at most {max_header})")
        header = bytearray(hlen)
        if hlen:
            self._recv_exact(memoryview(header))
        return Prefix(kind, bytes(header), tensor, offset, nbytes)

    def readable_now(self) -> bool:
        """Whether a read would find bytes at once (TLS: decrypted ones count too)."""
        pending = getattr(self.sock, "pending", None)
        if pending is not None and pending():
            return True
        poll = select.poll()
        poll.register(self.sock, select.POLLIN)
        return bool(poll.poll(0))

    def recv_into(self, view: np.ndarray | memoryview) -> None:
        self._recv_exact(memoryview(view).cast("B"))  # type: ignore[arg-type]

    def discard(self, n: int) -> None:
        """Read and drop `n` data bytes."""
        scratch = self._scratch_bytes()
        while n:
            k = min(n, scratch.nbytes)
            self.recv_into(scratch[:k])
            n -= k

    def recv_data(self, frame: Prefix, sink: TensorSink | None) -> None:
        """A DATA frame's bytes into `sink`, straight into the target where no conversion is
        needed (checked first: a chunk that does not fit its tensor is refused before a byte is
        read); else read into a scratch buffer and converted on the helper thread, where
        `sink.write` checks each piece before writing it (see `flush`). None drains them."""
        if sink is None:
            self.discard(frame.nbytes)
            return
        if not sink.converts(frame.tensor):
            view = sink.direct_view(frame.tensor, frame.offset, frame.nbytes)
            assert view is not None
            self.recv_into(view)
            sink.advance(frame.tensor, frame.offset + frame.nbytes)
            return
        # Converted on the helper thread while the next bytes arrive into the other buffer;
        # sink.write checks each piece there, in order.
        if not self._inbox:
            self._inbox = [np.empty(CONVERT_CHUNK_BYTES, dtype=np.uint8) for _ in range(2)]
        helper = self._helper_thread()
        at, left = frame.offset, frame.nbytes
        while left:
            if len(self._pending) == len(self._inbox):
                done, b = self._pending.popleft()
                done.result()
            else:
                busy = {b for _, b in self._pending}
                b = next(i for i in range(len(self._inbox)) if i not in busy)
            k = min(left, CONVERT_CHUNK_BYTES)
            buf = self._inbox[b][:k]
            self.recv_into(buf)
            self._pending.append((helper.submit(sink.write, frame.tensor, at, buf.data), b))
            at += k
            left -= k

    def flush(self) -> None:
        """Wait for the conversions of received chunks still in flight (their errors raise)."""
        while self._pending:
            done, _ = self._pending.popleft()
            done.result()

    def settle(self) -> None:
        """After a failed read: wait until no conversion writes into the request's tensors any
        more (their own errors do not matter then)."""
        while self._pending:
            done, _ = self._pending.popleft()
            try:
                done.result()
            except Exception:
                pass

    def _scratch_bytes(self) -> np.ndarray:
        if self._scratch is None:
            self._scratch = np.empty(CONVERT_CHUNK_BYTES, dtype=np.uint8)
        return self._scratch

    def request(self, first: Prefix, sink: TensorSink | None, max_bytes: int) -> RequestReader:
        """The reader of the request `first` opened: see RequestReader."""
        return RequestReader(self, first, sink, max_bytes)


MORE = object()  # RequestReader.next: the request goes on


class RequestReader:
    """The DATA frames of a request into `sink` (None drains them), through its END, one frame
    per `next()` call, so a server can wait for the next frame without holding a thread.

    `next()` returns MORE, or at END its header (a push's closing header; None when it has none).
    More than `max_bytes` in all, or a frame a request cannot hold, is a ProtocolError. After any
    error call `settle()` (conversions may still be writing into the sink's tensors)."""

    def __init__(self, conn: FrameSocket, first: Prefix, sink: TensorSink | None, max_bytes: int):
        self.conn, self.sink, self.max_bytes = conn, sink, max_bytes
        self.total = PREFIX.size + len(first.header)
        self._first: Prefix | None = first

    def next(self, max_header: int = MAX_HEADER_BYTES) -> object:
        frame = self._first
        if frame is None:
            frame = self.conn.recv(max_header)
            self.total += PREFIX.size + len(frame.header)
            if frame.kind == END:
                if frame.nbytes:
                    raise ProtocolError("an END frame carries no data")
                self.conn.flush()
                return frame.header or None
            if frame.kind != DATA:
                raise ProtocolError(f"a {frame.kind.decode()} frame inside a request")
        self._first = None
        self.total += frame.nbytes
        if self.total > self.max_bytes:
            raise ProtocolError(f"the request passed {self.max_bytes} bytes")
        if frame.nbytes:
            self.conn.recv_data(frame, self.sink)
        return MORE

    def next_ready(self, max_header: int = MAX_HEADER_BYTES) -> object:
        """Frames for as long as bytes are already waiting (one call instead of a wake-up per
        frame when they stream back to back); MORE once the peer pauses, or END's header."""
        while (out := self.next(max_header)) is MORE:
            if not self.conn.readable_now():
                return MORE
        return out

    def settle(self) -> None:
        self.conn.settle()


def check_ticket(frame: Prefix) -> bytes:
    if frame.kind != HELO or frame.nbytes or len(frame.header) != TICKET_BYTES:
        raise ProtocolError("a bulk connection starts with HELO and its ticket")
    return frame.header
