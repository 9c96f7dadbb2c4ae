"""Tests for backbeat_sync._watchdog: the private C prototype, delivery rules, heap upkeep, re-timing."""

from __future__ import annotations

import ctypes
import functools
import operator
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

import backbeat_sync as bb
from backbeat_sync import _watchdog
from backbeat_sync._runtime import WATCHDOG
from backbeat_sync._watchdog import ThreadSlot, current_slot, set_async_exc
from tests.support import manual_integration, unique_bus, wait_until

#: Only a bug makes a test wait this long; "promptly" is asserted as well under half of it.
NEVER = 60.0


def spin_for(seconds: float) -> None:
    """Busy Python code for ``seconds`` (an exception set asynchronously lands in it)."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        pass


class Boom(Exception):
    """An exception class to set asynchronously."""


def spinning_thread(result: list[str], started: threading.Event, stop: threading.Event) -> threading.Thread:
    """A thread that spins in Python until ``stop`` is set, recording how it ended.

    The loop is in a function of its own, called inside the ``try``: CPython 3.13 raises an
    asynchronous exception that lands on a loop in the handler's own frame past the handler
    (cpython#139622; docs/budgets.md, Limits), and this test is about where it lands.
    """

    def spin() -> None:
        while not stop.is_set():
            pass

    def run() -> None:
        try:
            started.set()  # inside the try: the exception may land as soon as this returns
            spin()
            result.append("finished")
        except Boom:
            result.append("boom")

    th = threading.Thread(target=run)
    th.start()
    return th


def test_set_async_exc_raises_only_in_the_target_thread() -> None:
    """The exception lands in the target thread; the caller's thread carries on."""
    result: list[str] = []
    started, stop = threading.Event(), threading.Event()
    th = spinning_thread(result, started, stop)
    assert started.wait(NEVER)
    assert set_async_exc(th.ident or 0, Boom) == 1
    th.join(NEVER)
    stop.set()
    assert result == ["boom"]


def test_clear_async_exc_cancels_a_pending_exception() -> None:
    """A pending exception cleared before it can land is never raised; uncleared, it is.

    ``map(methodcaller("__call__"), [partial(...), ...])`` makes both C calls with
    no Python bytecode in between (map, methodcaller, partial and the ctypes
    function are all C; ``operator.call`` would do too, but only from 3.11), so
    nothing can land between setting and clearing.
    """
    me = threading.get_ident()
    setter = _watchdog._set_async
    clearer = _watchdog._clear_async
    call = operator.methodcaller("__call__")
    list(map(call, [functools.partial(setter, me, Boom), functools.partial(clearer, me, None)]))
    for _ in range(100):
        pass
    with pytest.raises(Boom):
        list(map(call, [functools.partial(setter, me, Boom)]))
        for _ in range(100):
            pass


def test_shared_pythonapi_prototype_is_left_alone(manual: Any) -> None:
    """The library never sets argtypes on ctypes.pythonapi.PyThreadState_SetAsyncExc."""

    @bb.beat_budget(0.5)
    def spin() -> None:
        while True:
            pass

    with pytest.raises(bb.BeatBudgetExceeded):
        spin()
    assert ctypes.pythonapi.PyThreadState_SetAsyncExc.argtypes is None


@pytest.fixture
def manual() -> Iterator[Any]:
    """A started integration on a manual pulse at 600 BPM."""
    with manual_integration(tempo_bpm=600.0) as parts:
        yield parts


class FakeTracker:
    """The minimum the watchdog reads, for unit tests of delivery and compaction."""

    def __init__(self, slot: ThreadSlot, seq: int, clock: Any, event_pos: float = 1e9) -> None:
        self.slot = slot
        self.seq = seq
        self.clock = clock
        self.event_pos = event_pos
        self.promoted = False
        self.fired = _watchdog.ARMED
        self.delivered = False
        self.exc_class = Boom

    def on_event(self, pos_now: float, now: float) -> float | None:
        return None


def test_deliver_loses_to_an_owner_that_left() -> None:
    """A budget no longer in its thread's live set is never fired."""
    slot = ThreadSlot()
    t = FakeTracker(slot, 1, None)
    assert WATCHDOG.deliver(t) == "lost"
    assert t.fired == _watchdog.ARMED


def test_deliver_hands_over_to_a_shielded_owner() -> None:
    """A shielded owner gets the budget in ``slot.sync`` instead of an asynchronous exception."""
    slot = ThreadSlot()
    t = FakeTracker(slot, 1, None)
    slot.live[t.seq] = [t]
    slot.shield = 1
    assert WATCHDOG.deliver(t) == "sync"
    assert (slot.sync, t.fired, slot.kick.is_set(), slot.live) == (t, _watchdog.SYNC, True, {})


def test_deliver_waits_while_another_exception_is_pending() -> None:
    """At most one of our exceptions is pending per thread: a second one is retried later."""
    slot = ThreadSlot()
    first, second = FakeTracker(slot, 1, None), FakeTracker(slot, 2, None)
    slot.live[second.seq] = [second]
    slot.pending = first
    assert WATCHDOG.deliver(second) == "retry"
    assert second.seq in slot.live


def test_deliver_does_not_interrupt_budgets_an_unwinding_exception_may_have_skipped() -> None:
    """Budgets entered after one whose exception is unwinding the thread are not interrupted."""
    slot = ThreadSlot()
    t = FakeTracker(slot, 5, None)
    slot.live[t.seq] = [t]
    slot.barrier = (3, 7)
    assert WATCHDOG.deliver(t) == "suspect"
    assert t.seq in slot.live


def test_compaction_drops_ended_entries_outside_the_lock(manual: Any) -> None:
    """Heap entries of budgets that ended are dropped by compaction; live ones stay."""
    integration, _, _ = manual
    slot = current_slot()
    ended = [FakeTracker(slot, i, integration.clock) for i in range(_watchdog.COMPACT_SLACK * 2)]
    kept = FakeTracker(slot, 10**9, integration.clock)
    slot.live[kept.seq] = [kept]
    try:
        for t in [*ended, kept]:
            WATCHDOG.push(t)
        for t in ended:
            t.fired = _watchdog.OWNER
        before = WATCHDOG.heap_size()
        WATCHDOG._maybe_compact()
        after = WATCHDOG.heap_size()
        with WATCHDOG._lock:
            entries = [e[2] for h in WATCHDOG._heaps.values() for e in h.entries]
    finally:
        del slot.live[kept.seq]
    assert before >= len(ended) + 1
    assert after <= before - len(ended)
    assert kept in entries


def test_a_tempo_change_re_times_the_deadline(manual: Any) -> None:
    """A frame with a faster tempo wakes the watchdog, which fires the budget earlier in real time."""
    _integration, pulse, _ = manual
    pulse.tempo_bpm = 60.0 / (NEVER / 2)
    pulse.beat(1)  # 30 s beats: a 2-beat budget would take a minute
    caught: list[bb.BeatBudgetExceeded] = []
    started = threading.Event()

    def worker() -> None:
        try:
            with bb.track_operation("retimed", "t", beats=2, warn_at=None):
                started.set()
                while True:
                    pass
        except bb.BeatBudgetExceeded as e:
            caught.append(e)

    th = threading.Thread(target=worker)
    t0 = time.monotonic()
    th.start()
    assert started.wait(NEVER)
    pulse.tempo_bpm = 6000.0
    pulse.beat(2)  # now 10 ms beats: the budget ends about one beat later
    th.join(NEVER + 10)  # without re-timing it would end after NEVER seconds
    assert len(caught) == 1
    assert time.monotonic() - t0 < NEVER / 2  # re-timed: not the minute the old tempo gave it
    assert caught[0].beats_used >= 2.0


def test_the_watchdog_thread_stops_when_idle_and_comes_back() -> None:
    """With nothing to watch the thread exits; the next budget starts it again."""
    cfg = bb.BackbeatConfig(cluster_id="w", agent_id="a", nats_url=f"local://{unique_bus()}", tempo_bpm=600)
    with bb.Integration(cfg, node_id="n") as integration:
        WATCHDOG.shutdown()
        assert not WATCHDOG.running
        with pytest.raises(bb.BeatBudgetExceeded):
            integration.execute_with_beat_budget(0.5, spin_for, NEVER)  # only the watchdog ends it
        assert WATCHDOG.running
    wait_until(lambda: not WATCHDOG.running, NEVER, "the idle watchdog to exit")


def test_a_stop_left_over_does_not_swallow_a_later_callback() -> None:
    """shutdown() with no callback thread alive leaves a stop request queued; the next callback
    thread must still run the callback queued after it (on_warning was lost after a shutdown)."""
    WATCHDOG.shutdown()
    WATCHDOG.shutdown()  # the second one finds no callback thread: its stop request stays queued
    ran = threading.Event()
    WATCHDOG.run_callback(ran.set)
    assert ran.wait(NEVER)
