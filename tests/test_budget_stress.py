"""Stress tests for backbeat_sync.budget: exceptions land only inside their own call, never lost.

16 threads run 10,000 budgets, each busy until a moment drawn around its own
deadline, so the watchdog and the exiting code race at the exit over and over.
A switch interval of 1 ms (restored after) makes the threads interleave more.
"""

from __future__ import annotations

import random
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

import backbeat_sync as bb
from backbeat_sync import _runtime, _watchdog
from tests.support import unique_bus, wait_until

THREADS = 16
BUDGETS = 10_000
TEMPO = 6000.0  # 10 ms beats
BEATS = 0.4  # 4 ms budgets
SECONDS = BEATS * 60.0 / TEMPO


@pytest.fixture
def fast() -> Iterator[bb.Integration]:
    """A started integration at 6000 BPM, and a 1 ms switch interval for more interleaving."""
    cfg = bb.BackbeatConfig(
        cluster_id="stress", agent_id="a", nats_url=f"local://{unique_bus()}", tempo_bpm=TEMPO
    )
    old = sys.getswitchinterval()
    sys.setswitchinterval(0.001)
    try:
        with bb.Integration(cfg, node_id="n") as integration:
            yield integration
    finally:
        sys.setswitchinterval(old)


class Tally:
    """Outcomes counted by every worker (under a lock)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.ok = 0
        self.raised = 0
        self.stray: list[str] = []

    def add(self, ok: int, raised: int, stray: list[str]) -> None:
        with self.lock:
            self.ok += ok
            self.raised += raised
            self.stray.extend(stray)


def spin_until(end: float) -> None:
    """Sleep through most of the time left, then busy Python code until ``end`` (monotonic).

    Sleeping keeps 16 threads from queueing for the GIL; the busy tail is where
    the exception is interrupted in Python code rather than delivered late.
    """
    left = end - time.monotonic()
    if left > 0.002:
        time.sleep(left * 0.6)
    while time.monotonic() < end:
        pass


def run_workers(worker: Any) -> Tally:
    """Run ``worker(index, tally, barrier)`` in THREADS threads and join them."""
    tally = Tally()
    barrier = threading.Barrier(THREADS)
    threads = [threading.Thread(target=worker, args=(k, tally, barrier)) for k in range(THREADS)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(60)
    assert not any(th.is_alive() for th in threads)
    return tally


def test_decorated_calls_racing_their_deadline_never_stray_never_lost(fast: bb.Integration) -> None:
    """10,000 decorated calls ending right around their deadline: zero stray, zero lost, none twice."""
    fired_before = _runtime.WATCHDOG.fired_count
    per_thread = BUDGETS // THREADS

    def worker(k: int, tally: Tally, barrier: threading.Barrier) -> None:
        rng = random.Random(k)
        prefix = f"w{k}-"

        @bb.beat_budget(BEATS, name=f"w{k}", warn_at=None)
        def call(end: float) -> str:
            spin_until(end)
            return "done"

        ok = raised = 0
        stray: list[str] = []
        barrier.wait()
        for _ in range(per_thread):
            try:
                try:
                    end = time.monotonic() + SECONDS * rng.uniform(0.6, 1.4)
                    assert call(end) == "done"
                    ok += 1
                except bb.BeatBudgetExceeded as e:
                    if not e.operation_id.startswith(prefix):
                        stray.append(f"foreign {e.operation_id}")
                    raised += 1
                for _ in range(20):  # outside any budget: a stray exception would land here
                    pass
                time.monotonic()
            except bb.BeatBudgetExceeded as e:
                stray.append(f"outside {e.operation_id}")
        try:
            spin_until(time.monotonic() + 0.02)
        except bb.BeatBudgetExceeded as e:
            stray.append(f"after {e.operation_id}")
        tally.add(ok, raised, stray)

    tally = run_workers(worker)
    fired = _runtime.WATCHDOG.fired_count - fired_before
    health = fast.get_health()
    assert tally.stray == []
    assert tally.ok + tally.raised == per_thread * THREADS
    assert tally.raised == fired  # every budget the watchdog won raised exactly once in its call
    counted = health.get("budget_exhausted_interrupt_interrupted", 0) + health.get(
        "budget_exhausted_interrupt_late", 0
    )
    assert tally.raised == counted
    assert 0 < tally.raised < per_thread * THREADS  # the deadlines really were raced both ways
    assert fast.registry.active_count == 0
    assert [s for s in _watchdog.all_slots() if s.live or s.pending is not None or s.sync is not None] == []


def test_nested_blocks_racing_their_deadlines_never_stray(fast: bb.Integration) -> None:
    """Nested blocks (outer track_operation, inner decorated call) with close deadlines: no stray."""
    per_thread = 60

    def worker(k: int, tally: Tally, barrier: threading.Barrier) -> None:
        rng = random.Random(1000 + k)

        @bb.beat_budget(BEATS, name=f"in{k}", warn_at=None)
        def inner(end: float) -> None:
            spin_until(end)

        ok = raised = 0
        stray: list[str] = []
        barrier.wait()
        for i in range(per_thread):
            op_id = f"out{k}-{i}"
            try:
                try:
                    with bb.track_operation(op_id, "stress", beats=BEATS * 1.2, warn_at=None):
                        try:
                            inner(time.monotonic() + SECONDS * rng.uniform(0.7, 1.3))
                        except bb.BeatBudgetExceeded as e:
                            if not e.operation_id.startswith(f"in{k}-"):
                                raise
                        spin_until(time.monotonic() + SECONDS * rng.uniform(0.0, 0.6))
                    ok += 1
                except bb.BeatBudgetExceeded as e:
                    if e.operation_id != op_id:
                        stray.append(f"foreign {e.operation_id} in {op_id}")
                    raised += 1
                for _ in range(20):
                    pass
                time.monotonic()
            except bb.BeatBudgetExceeded as e:
                stray.append(f"outside {e.operation_id}")
        tally.add(ok, raised, stray)

    tally = run_workers(worker)
    assert tally.stray == []
    assert tally.ok + tally.raised == per_thread * THREADS
    assert fast.registry.active_count == 0


def test_calls_ending_around_beats_are_claimed_consistently() -> None:
    """Calls that end right as a beat announces them: each announced call gets exactly one final claim.

    The beat thread announces running calls while their owners leave; the claims of
    every call must end with one ``done`` and nothing after it, and no operation
    may be left active.
    """
    from tests.support import HandledBeats, ManualPulse

    bus = unique_bus()
    cfg = bb.BackbeatConfig(
        cluster_id="race", agent_id="a", nats_url=f"local://{bus}?pulse=manual", tempo_bpm=6000
    )
    claims: list[bb.StatusClaim] = []
    lock = threading.Lock()
    stop = threading.Event()

    def record(claim: bb.StatusClaim) -> None:
        with lock:
            claims.append(claim)

    with bb.Integration(cfg, node_id="n") as integration:
        integration.on_claim(record)
        pulse = ManualPulse(bus, "race", tempo_bpm=6000, handled=HandledBeats(integration))

        def worker(k: int) -> None:
            rng = random.Random(k)

            @bb.beat_budget(60_000, name=f"r{k}", warn_at=None)  # ten minutes: never runs out here
            def call(seconds: float) -> None:
                time.sleep(seconds)  # releases the GIL inside the call, as I/O does

            while not stop.is_set():
                call(rng.uniform(0, 0.002))
                for _ in range(rng.randrange(200)):  # a little Python between calls
                    pass

        threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
        for th in threads:
            th.start()
        for index in range(1, 1000):
            pulse.beat(index)  # returns once the beat (and its announcing) is handled
        stop.set()
        for th in threads:
            th.join(30)
        wait_until(lambda: integration.registry.active_count == 0, 30, "every operation finished")
    # stop() has drained the callback queue: every claim emitted reached on_claim
    by_task: dict[str, list[str]] = {}
    with lock:
        for c in claims:
            if c.task_id != "chorus-p2p-health":
                by_task.setdefault(c.task_id, []).append(c.state)
    assert len(by_task) > 100, len(by_task)  # calls really were announced, many times
    bad = {
        task: states for task, states in by_task.items() if states.count("done") != 1 or states[-1] != "done"
    }
    assert bad == {}
