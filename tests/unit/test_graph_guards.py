"""The per-stream lock captures rely on (server/cuda/graph_guards.py), with real threads: device work
shares a stream, a capture has it alone, and a waiting capture is not starved by new work."""

from __future__ import annotations

import threading
import time

from adamd.server.cuda.graph_guards import SharedExclusive


def test_shared_holders_run_together_and_a_capture_waits_for_them() -> None:
    lock = SharedExclusive()
    events: list[str] = []
    first_in, second_in, release = threading.Event(), threading.Event(), threading.Event()

    def work(entered: threading.Event, name: str) -> None:
        with lock.shared():
            entered.set()
            release.wait(10)
            events.append(f"{name} done")

    def capture() -> None:
        with lock.exclusive():
            events.append("capture")

    a = threading.Thread(target=work, args=(first_in, "a"))
    b = threading.Thread(target=work, args=(second_in, "b"))
    a.start()
    b.start()
    assert first_in.wait(10) and second_in.wait(10), "two shared holders at once"
    c = threading.Thread(target=capture)
    c.start()
    time.sleep(0.2)
    assert events == [], "the capture must wait for the shared holders"
    release.set()
    for t in (a, b, c):
        t.join(10)
    assert events[-1] == "capture" and sorted(events[:2]) == ["a done", "b done"]


def test_a_waiting_capture_keeps_new_work_out() -> None:
    lock = SharedExclusive()
    order: list[str] = []
    holding, release = threading.Event(), threading.Event()

    def first() -> None:
        with lock.shared():
            holding.set()
            release.wait(10)

    def capture() -> None:
        with lock.exclusive():
            order.append("capture")

    def late_work() -> None:
        with lock.shared():
            order.append("late work")

    t1 = threading.Thread(target=first)
    t1.start()
    assert holding.wait(10)
    t2 = threading.Thread(target=capture)
    t2.start()
    time.sleep(0.2)  # the capture now waits for `first`
    t3 = threading.Thread(target=late_work)
    t3.start()
    time.sleep(0.2)
    assert order == [], "new shared work must queue behind the waiting capture"
    release.set()
    for t in (t1, t2, t3):
        t.join(10)
    assert order == ["capture", "late work"]
