"""What goes back to a bulk client: a pull's frames (HEAD, the parameters, END) and a STEP's
reply, whose parameters stream out a bucket at a time while the step updates them.
"""

from __future__ import annotations

import asyncio
import threading

from adamd.protocol.bulk import END, HEAD, FrameSocket, Step
from adamd.protocol.frames import spec_of
from adamd.server.dataplane import PullPlan
from adamd.server.transport.bulk.driving import FRAME, FrameDriver
from adamd.v1 import adamd_pb2 as pb


def send_pull(conn: FrameSocket, plan: PullPlan, reply: pb.PushReply | None = None) -> Step[None]:
    """HEAD, the parameters, END saying whether they are one version (and, for a STEP,
    carrying its push's reply)."""
    end = reply.SerializeToString() if reply is not None else b""
    if plan.tensors is None:
        header = pb.PullHeader(version=plan.version, not_modified=True)
        yield from conn.send_steps(HEAD, header.SerializeToString())
        yield from conn.send_steps(END, end, 1)
        return
    yield from conn.send_steps(HEAD, pull_header(plan, plan.version))
    for index, (t, wire) in enumerate(zip(plan.tensors, plan.wires)):
        yield from conn.send_tensor_steps(index, t, wire, plan.chunk)
        yield FRAME
    yield from conn.send_steps(END, end, int(plan.consistent()))


def pull_header(plan: PullPlan, version: int) -> bytes:
    assert plan.tensors is not None
    specs = [spec_of(n, t, w) for n, t, w in zip(plan.names, plan.tensors, plan.wires)]
    return pb.PullHeader(version=version, tensors=specs).SerializeToString()


class StepSender:
    """A STEP's parameters, sent a bucket at a time as the step updates them.

    `notify` is the push's PushTicket.on_stepped: called mid-step under the model lock, it only
    queues the bucket for a task on the loop that sends the queue (on the I/O threads, as the
    socket takes it). After the push, `finish` sends what the step did not touch and END. When no
    step of this push ran (a duplicate, found_inf, a round stepped by another rank's thread),
    nothing was queued and `finish` sends everything as a pull would, read then."""

    def __init__(self, driver: FrameDriver, conn: FrameSocket, plan: PullPlan):
        self.driver, self.conn, self.plan = driver, conn, plan
        self.loop = asyncio.get_running_loop()
        self.index = {n: i for i, n in enumerate(plan.names)}
        self.queue: asyncio.Queue[int | list[str] | None] = asyncio.Queue()
        self.drain = self.loop.create_task(self._drain())
        self.started = False  # HEAD queued
        self.sent: set[str] = set()
        self.seq_after = 0
        self._lock = threading.Lock()
        self._stopped = False  # the request is over: a late step (a round closed after a
        # cut) must not start sending

    def notify(self, names: list[str]) -> None:
        model = self.plan.model
        with self._lock:
            if self._stopped:
                return
            try:
                if not self.started:
                    # the version this step makes: HEAD
                    self.loop.call_soon_threadsafe(self.queue.put_nowait, model.version + 1)
                    self.started = True
                self.seq_after = model.write_seq + 1  # the seqlock once this step's write ends
                bucket = [n for n in names if n in self.index]
                self.loop.call_soon_threadsafe(self.queue.put_nowait, bucket)
            except RuntimeError:  # the loop is closed (the server is stopping)
                self._stopped = True

    async def _drain(self) -> None:
        while (item := await self.queue.get()) is not None:
            await self.driver.frames(self.conn, self._item(item))

    def _item(self, item: int | list[str]) -> Step[None]:
        if isinstance(item, int):
            yield from self.conn.send_steps(HEAD, pull_header(self.plan, item))
            return
        for name in item:
            yield from self._send(name)
            yield FRAME

    def _send(self, name: str) -> Step[None]:
        assert self.plan.tensors is not None
        i = self.index[name]
        yield from self.conn.send_tensor_steps(
            i, self.plan.tensors[i], self.plan.wires[i], self.plan.chunk
        )
        self.sent.add(name)

    async def stop(self) -> None:
        """No more buckets; wait until every queued one is sent (holding no thread)."""
        with self._lock:
            self._stopped = True
        # after every put notify scheduled (call_soon_threadsafe keeps their order)
        self.loop.call_soon(self.queue.put_nowait, None)
        await self.drain

    def finish(self, reply: pb.PushReply) -> Step[None]:
        """After the push and stop(): the rest, and END."""
        model = self.plan.model
        if not self.started:
            seq, version = model.read_begin()
            yield from self.conn.send_steps(HEAD, pull_header(self.plan, version))
        else:
            seq = self.seq_after
        for name in self.plan.names:
            if name not in self.sent:
                yield from self._send(name)
                yield FRAME
        yield from self.conn.send_steps(
            END, reply.SerializeToString(), int(model.read_consistent(seq))
        )
