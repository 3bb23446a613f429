"""The engine thread's gathering of a burst: woken from idle by a request, it keeps taking
the requests that follow within ``GATHER_GAP_S`` of each other (``GATHER_MAX_S`` in all), so a
client's burst gets one first step; a lone request or a non-request command waits for
nothing more. Real queues and threads, the real ``_EngineLoop.take``."""

from __future__ import annotations

import queue
import threading
import time

import pytest

from server import async_engine
from server.async_engine import _EngineLoop
from server.engine_client import Abort, Add

# Wider than the server's own (3 ms / 30 ms), so a busy test machine's thread wake-ups (a few
# ms late at worst) cannot turn a burst into a gap.
GAP, LIMIT = 0.2, 0.6


@pytest.fixture(autouse=True)
def wide_windows(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(async_engine, "GATHER_GAP_S", GAP)
    monkeypatch.setattr(async_engine, "GATHER_MAX_S", LIMIT)


def loop_over(commands: queue.Queue) -> _EngineLoop:
    loop = object.__new__(_EngineLoop)  # only its command queue is used by take()
    loop.commands = commands
    return loop


def send_later(commands: queue.Queue, items: list, spacing: float) -> threading.Thread:
    def run() -> None:
        for item in items:
            time.sleep(spacing)
            commands.put(item)

    thread = threading.Thread(target=run)
    thread.start()
    return thread


def adds(n: int) -> list[Add]:
    return [Add(sub=None, inputs=()) for _ in range(n)]  # type: ignore[arg-type]


def test_a_burst_is_taken_together() -> None:
    commands: queue.Queue = queue.Queue()
    first, rest = adds(1), adds(5)
    commands.put(first[0])
    sender = send_later(commands, rest, GAP / 10)
    taken = loop_over(commands).take(block=True, gather=True)
    sender.join()
    assert taken == first + rest


def test_gathering_stops_at_a_gap_and_at_its_limit() -> None:
    commands: queue.Queue = queue.Queue()
    late = adds(1)
    commands.put(adds(1)[0])
    sender = send_later(commands, late, GAP * 2)
    taken = loop_over(commands).take(block=True, gather=True)
    assert len(taken) == 1  # the second came after a gap: left for the next iteration
    sender.join()
    assert commands.get_nowait() is late[0]
    # A steady stream is cut at GATHER_MAX_S.
    stream = adds(int(LIMIT / (GAP / 10)) * 2)
    commands.put(adds(1)[0])
    sender = send_later(commands, stream, GAP / 10)
    start = time.monotonic()
    taken = loop_over(commands).take(block=True, gather=True)
    waited = time.monotonic() - start
    sender.join()
    assert 1 < len(taken) < 1 + len(stream)
    assert waited < LIMIT + GAP


def test_no_gathering_without_a_request_or_when_busy() -> None:
    commands: queue.Queue = queue.Queue()
    abort = Abort(request_ids=("r",))
    commands.put(abort)
    later = adds(1)
    sender = send_later(commands, later, GAP / 10)
    assert loop_over(commands).take(block=True, gather=True) == [abort]
    sender.join()
    commands.get_nowait()
    commands.put(later[0])
    sender = send_later(commands, adds(1), GAP / 10)
    assert len(loop_over(commands).take(block=False, gather=False)) == 1
    sender.join()
