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
neither side uses that connection again: the server stops writing at once, drops what the client
still sends of its request for a short while (so the client's send ends and it reads the FAIL,
rather than a reset) and closes it.
"""

from __future__ import annotations

import contextlib
import math
import select
import socket
import ssl
import struct
from collections import deque
from collections.abc import Generator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TypeVar

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
T = TypeVar("T")


@dataclass(frozen=True)
class Prefix:
    kind: bytes
    header: bytes
    tensor: int
    offset: int
    nbytes: int  # data bytes that follow (not read yet)


class Closed(ConnectionError):
    """The peer closed the connection (or it broke) before a whole frame arrived."""


# What an I/O step (a generator below) yields when the socket is non-blocking and cannot move
# bytes now: wait until it is readable (READ: a frame's prefix or header; DATA: a frame's data
# bytes) or writable (WRITE), then resume it. On a blocking socket the steps never yield.
READ, DATA_READ, WRITE = "read", "data", "write"
HEADER_READ_BYTES = 64 << 10  # a header grows by this much as its bytes arrive, no more at once

Step = Generator[str, None, T]


class FrameSocket:
    """One bulk connection's frames, both ways, from one thread at a time.

    Each operation has two forms: a generator (`*_steps`) that moves the bytes that can move
    now and yields READ / DATA_READ / WRITE when a non-blocking socket has to wait, so that a
    server resumes it only once the socket is ready (a silent peer holds no thread); and a plain
    call that runs it on a blocking socket, where every socket operation waits at most `timeout`
    seconds for progress (socket.timeout, an OSError, past it). `timeout=0`: non-blocking."""

    def __init__(self, sock: socket.socket, timeout: float | None):
        self.sock = sock
        sock.settimeout(timeout)
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._prefix = bytearray(PREFIX.size)
        self._scratch: np.ndarray | None = None
        # Conversions (bf16/fp16 wire) overlap the socket: a helper thread converts the next
        # chunk to send, or a received one, while this thread moves the bytes of another.
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

    def run(self, steps: Step[T]) -> T:
        """Run an operation's steps to the end, waiting (blocking, at most the socket's timeout
        each time) where a non-blocking socket is not ready."""
        try:
            while True:
                want = next(steps)
                timeout = self.sock.gettimeout()
                if not self.wait(want, None if timeout == 0 else timeout):
                    raise TimeoutError(f"the socket was not ready to {want} in time")
        except StopIteration as stop:
            return stop.value  # type: ignore[no-any-return]

    def wait(self, want: str, timeout: float | None) -> bool:
        """Block until the socket is ready for `want` (READ / DATA_READ / WRITE)."""
        if want != WRITE and self.readable_now():
            return True
        poll = select.poll()
        poll.register(self.sock, select.POLLOUT if want == WRITE else select.POLLIN)
        return bool(poll.poll(None if timeout is None else max(math.ceil(timeout * 1000), 0)))

    # --- sending --------------------------------------------------------------------------------

    def _send_all_steps(self, data: memoryview | bytes) -> Step[None]:
        view = memoryview(data).cast("B")
        sent = 0
        while sent < view.nbytes:
            try:
                n = self.sock.send(view[sent:])
                sent += n
                self.bytes_out += n
            except (BlockingIOError, ssl.SSLWantWriteError):
                yield WRITE
            except ssl.SSLWantReadError:
                yield READ

    def send_steps(
        self,
        kind: bytes,
        header: bytes = b"",
        tensor: int = 0,
        offset: int = 0,
        data: np.ndarray | memoryview | None = None,
    ) -> Step[None]:
        n = 0 if data is None else memoryview(data).nbytes  # type: ignore[arg-type]
        head = PREFIX.pack(kind, len(header), tensor, offset, n) + header
        if n and n <= 4096:  # a small chunk rides with its prefix: one system call
            head += memoryview(data).cast("B")  # type: ignore[arg-type]
            n = 0
        yield from self._send_all_steps(head)
        if n:
            yield from self._send_all_steps(memoryview(data))  # type: ignore[arg-type]

    def send(
        self,
        kind: bytes,
        header: bytes = b"",
        tensor: int = 0,
        offset: int = 0,
        data: np.ndarray | memoryview | None = None,
    ) -> None:
        self.run(self.send_steps(kind, header, tensor, offset, data))

    def send_tensor_steps(
        self,
        index: int,
        t: torch.Tensor,
        wire_dtype: torch.dtype | None,
        chunk_bytes: int = CONVERT_CHUNK_BYTES,
    ) -> Step[None]:
        """Tensor `t` as DATA frames: a contiguous CPU tensor that travels as itself goes out of
        its own memory in one frame; one that converts (bf16/fp16 wire) goes a chunk at a time
        through two reused buffers (frames.wire_chunks)."""
        if not t.numel():
            return
        same = wire_dtype_of(t.dtype, wire_dtype) == t.dtype
        if same and t.device.type == "cpu" and t.is_contiguous():
            yield from self.send_steps(DATA, b"", index, 0, byte_view(t.detach()))
            return
        if same or t.device.type != "cpu":
            for start, chunk in wire_chunks(t, wire_dtype, chunk_bytes):
                yield from self.send_steps(DATA, b"", index, start, chunk)
            return
        yield from self._send_converted(index, t, wire_dtype_of(t.dtype, wire_dtype), chunk_bytes)

    def send_tensor(
        self,
        index: int,
        t: torch.Tensor,
        wire_dtype: torch.dtype | None,
        chunk_bytes: int = CONVERT_CHUNK_BYTES,
    ) -> None:
        self.run(self.send_tensor_steps(index, t, wire_dtype, chunk_bytes))

    def _send_converted(
        self, index: int, t: torch.Tensor, wire: torch.dtype, chunk_bytes: int
    ) -> Step[None]:
        """The helper thread converts chunk k+1 into one buffer while chunk k goes out of the
        other (the rounding of Tensor.to: the same bits as frames.wire_chunks)."""
        flat = t.detach().reshape(-1)
        per = max(min(chunk_bytes, CONVERT_CHUNK_BYTES) // wire.itemsize, 1)
        buffers = self._buffers.get(wire)
        if buffers is None or buffers[0].numel() < per:
            buffers = self._buffers[wire] = [torch.empty(per, dtype=wire) for _ in range(2)]
        helper = self._helper_thread()
        starts = list(range(0, flat.numel(), per))

        def convert(k: int) -> None:
            i = starts[k]
            n = min(per, flat.numel() - i)
            buffers[k % 2][:n].copy_(flat[i : i + n])

        converting = helper.submit(convert, 0)
        try:
            for k, i in enumerate(starts):
                converting.result()
                if k + 1 < len(starts):
                    converting = helper.submit(convert, k + 1)
                n = min(per, flat.numel() - i)
                view = byte_view(buffers[k % 2])[: n * wire.itemsize]
                yield from self.send_steps(DATA, b"", index, i * wire.itemsize, view)
        finally:  # never leave a conversion running behind an error
            with contextlib.suppress(Exception):
                converting.result()

    def send_tensors_steps(
        self,
        tensors: Sequence[torch.Tensor],
        wire_dtype: torch.dtype | None,
        chunk_bytes: int = CONVERT_CHUNK_BYTES,
    ) -> Step[None]:
        for index, t in enumerate(tensors):
            yield from self.send_tensor_steps(index, t, wire_dtype, chunk_bytes)

    def send_tensors(
        self,
        tensors: Sequence[torch.Tensor],
        wire_dtype: torch.dtype | None,
        chunk_bytes: int = CONVERT_CHUNK_BYTES,
    ) -> None:
        self.run(self.send_tensors_steps(tensors, wire_dtype, chunk_bytes))

    # --- receiving ------------------------------------------------------------------------------

    def _recv_exact(self, view: memoryview, want_kind: str = READ) -> Step[None]:
        got, want = 0, view.nbytes
        while got < want:
            try:
                n = self.sock.recv_into(view[got:], want - got)
            except (BlockingIOError, ssl.SSLWantReadError):
                yield want_kind
                continue
            except ssl.SSLWantWriteError:
                yield WRITE
                continue
            if not n:
                raise Closed(f"connection closed with {want - got} bytes of a frame unread")
            got += n
            self.bytes_in += n  # as they come: a server checks a frame's pace by it

    def recv_steps(self, max_header: int = MAX_HEADER_BYTES) -> Step[Prefix]:
        """The next frame's prefix and header; its data (`nbytes`) is still to be read. The
        header's memory grows as its bytes arrive (a claimed size costs nothing until then)."""
        yield from self._recv_exact(memoryview(self._prefix))
        kind, hlen, tensor, offset, nbytes = PREFIX.unpack(self._prefix)
        if kind not in KINDS:
            raise ProtocolError(f"not an adamd bulk frame (kind {bytes(kind)!r})")
        if kind == DATA and hlen:
            raise ProtocolError("a DATA frame carries no header")
        if hlen > max_header:
            raise ProtocolError(f"a frame header of {hlen} bytes (at most {max_header})")
        header = bytearray()
        while len(header) < hlen:
            piece = bytearray(min(hlen - len(header), HEADER_READ_BYTES))
            yield from self._recv_exact(memoryview(piece))
            header += piece
        return Prefix(kind, bytes(header), tensor, offset, nbytes)

    def recv(self, max_header: int = MAX_HEADER_BYTES) -> Prefix:
        return self.run(self.recv_steps(max_header))

    def readable_now(self) -> bool:
        """Whether a read would find bytes at once (TLS: decrypted ones count too)."""
        pending = getattr(self.sock, "pending", None)
        if pending is not None and pending():
            return True
        poll = select.poll()
        poll.register(self.sock, select.POLLIN)
        return bool(poll.poll(0))

    def recv_into(self, view: np.ndarray | memoryview) -> None:
        self.run(self._recv_exact(memoryview(view).cast("B"), DATA_READ))  # type: ignore[arg-type]

    def _discard_steps(self, n: int) -> Step[None]:
        """Read and drop `n` data bytes."""
        scratch = self._scratch_bytes()
        while n:
            k = min(n, scratch.nbytes)
            yield from self._recv_exact(memoryview(scratch[:k]), DATA_READ)  # type: ignore[arg-type]
            n -= k

    def discard(self, n: int) -> None:
        self.run(self._discard_steps(n))

    def recv_data_steps(self, frame: Prefix, sink: TensorSink | None) -> Step[None]:
        """A DATA frame's bytes into `sink`, straight into the target where no conversion is
        needed (checked first: a chunk that does not fit its tensor is refused before a byte is
        read); else read into a scratch buffer and converted on the helper thread, where
        `sink.write` checks each piece before writing it (see `flush`). None drains them."""
        if sink is None:
            yield from self._discard_steps(frame.nbytes)
            return
        if not sink.converts(frame.tensor):
            view = sink.direct_view(frame.tensor, frame.offset, frame.nbytes)
            assert view is not None
            yield from self._recv_exact(memoryview(view).cast("B"), DATA_READ)  # type: ignore[arg-type]
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
            yield from self._recv_exact(memoryview(buf).cast("B"), DATA_READ)  # type: ignore[arg-type]
            self._pending.append((helper.submit(sink.write, frame.tensor, at, buf.data), b))
            at += k
            left -= k

    def recv_data(self, frame: Prefix, sink: TensorSink | None) -> None:
        self.run(self.recv_data_steps(frame, sink))

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
    per `next()` call (or `next_steps()`, see FrameSocket), so a server can wait for the next
    frame without holding a thread.

    `next()` returns MORE, or at END its header (a push's closing header; None when it has none).
    More than `max_bytes` in all, or a frame a request cannot hold, is a ProtocolError. After any
    error call `settle()` (conversions may still be writing into the sink's tensors)."""

    def __init__(self, conn: FrameSocket, first: Prefix, sink: TensorSink | None, max_bytes: int):
        self.conn, self.sink, self.max_bytes = conn, sink, max_bytes
        self.total = PREFIX.size + len(first.header)
        self._first: Prefix | None = first

    def next_steps(self, max_header: int = MAX_HEADER_BYTES) -> Step[object]:
        frame = self._first
        if frame is None:
            frame = yield from self.conn.recv_steps(max_header)
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
            yield from self.conn.recv_data_steps(frame, self.sink)
        return MORE

    def next(self, max_header: int = MAX_HEADER_BYTES) -> object:
        return self.conn.run(self.next_steps(max_header))

    def settle(self) -> None:
        self.conn.settle()


def check_ticket(frame: Prefix) -> bytes:
    if frame.kind != HELO or frame.nbytes or len(frame.header) != TICKET_BYTES:
        raise ProtocolError("a bulk connection starts with HELO and its ticket")
    return frame.header
