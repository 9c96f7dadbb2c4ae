"""Tests for backbeat_sync.budget: track_operation, @beat_budget, execute_with_beat_budget."""

from __future__ import annotations

import inspect
import pickle
import threading
import time
import traceback
from collections.abc import Iterator
from typing import Any

import pytest
from freezegun import freeze_time

import backbeat_sync as bb
from backbeat_sync import budget as budget_mod
from backbeat_sync._time import ManualTime
from backbeat_sync.errors import InvalidArgument
from tests.support import ClaimLog, manual_integration, unique_bus

FAST_BPM = 600.0  # 100 ms beats: budgets of a beat or two keep tests short


@pytest.fixture
def live() -> Iterator[tuple[bb.Integration, ClaimLog]]:
    """A started integration with a running in-process pulse at 600 BPM, and its claim log."""
    cfg = bb.BackbeatConfig(
        cluster_id="budget", agent_id="a1", nats_url=f"local://{unique_bus()}", tempo_bpm=FAST_BPM
    )
    integration = bb.Integration(cfg, node_id="node-1")
    log = ClaimLog()
    integration.on_claim(log)
    with integration:
        yield integration, log


@pytest.fixture
def manual() -> Iterator[Any]:
    """A started integration on a manual pulse at 600 BPM (no beats unless a test sends them)."""
    with manual_integration(tempo_bpm=FAST_BPM) as parts:
        yield parts


def busy_until_interrupted(limit: float = 5.0) -> None:
    """Spin in Python until an exception lands (fails the test after ``limit`` seconds)."""
    end = time.monotonic() + limit
    while time.monotonic() < end:
        pass
    raise AssertionError("the budget never interrupted the loop")


# -- decoration-time checks ------------------------------------------------------------


def test_async_function_is_refused_at_decoration() -> None:
    """An async def cannot be budgeted by a sync watchdog: TypeError saying why."""

    async def coro() -> None:
        pass

    with pytest.raises(TypeError, match="async function"):
        bb.beat_budget(3)(coro)


def test_generator_functions_are_refused_at_decoration() -> None:
    """Generator and async generator functions are refused with a TypeError."""

    def gen() -> Iterator[int]:
        yield 1

    async def agen() -> Any:
        yield 1

    with pytest.raises(TypeError, match="generator function"):
        bb.beat_budget(3)(gen)
    with pytest.raises(TypeError, match="async function"):
        bb.beat_budget(3)(agen)


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"beats": 0}, "beats"),
        ({"beats": -1}, "beats"),
        ({"beats": float("nan")}, "beats"),
        ({"beats": True}, "beats"),
        ({"beats": 1, "on_exhaust": "explode"}, "on_exhaust"),
        ({"beats": 1, "warn_at": (0.5, 1.5)}, "warn_at"),
        ({"beats": 1, "warn_at": 3}, "warn_at"),
    ],
)
def test_bad_arguments_name_the_argument(kwargs: dict[str, Any], name: str) -> None:
    """A bad option raises InvalidArgument naming the option."""
    beats = kwargs.pop("beats")
    with pytest.raises(InvalidArgument) as info:
        bb.beat_budget(beats, **kwargs)
    assert name == info.value.name


def test_track_operation_checks_its_arguments_every_time() -> None:
    """Settings are cached per set of arguments, but a bad value is refused even after a good lookalike."""
    bb.track_operation("ok-1", "dht_store", beats=1)  # caches the settings of beats=1
    with pytest.raises(InvalidArgument) as info:
        bb.track_operation("ok-2", "dht_store", beats=True)  # True == 1, yet not a number of beats
    assert info.value.name == "beats"
    for _ in range(2):
        with pytest.raises(InvalidArgument) as info:
            bb.track_operation("bad", "dht_store", beats=1, warn_at=[0.5, 2.0])  # unhashable: no cache
        assert info.value.name == "warn_at"
        with pytest.raises(InvalidArgument) as info:
            bb.track_operation("bad", "dht_store", beats=1, peers=True)
        assert info.value.name == "peers"
        with pytest.raises(InvalidArgument) as info:
            bb.track_operation("bad", "dht_store", beats=1, on_exhaust="explode")  # type: ignore[arg-type]
        assert info.value.name == "on_exhaust"
    assert bb.track_operation("list", "t", beats=2, warn_at=[0.25]).settings.warn_at == (0.25,)


def test_blocks_with_the_same_settings_keep_their_own_id_peers_and_data(manual: Any) -> None:
    """Two blocks that share cached settings still claim their own id, peers and data."""
    integration, _pulse, log = manual
    for n in (1, 2):
        with bb.track_operation(f"same-{n}", "dht_store", beats=4, peers=n, data={"n": n}):
            assert {"n": n} == integration.registry.get(f"same-{n}").data
    log.wait_for(lambda cs: sum(c.state == "done" for c in cs) == 2)
    claims = [(c.task_id, c.phase, c.peer_count) for c in log.snapshot()]
    assert claims == [
        ("same-1", "started", 1),
        ("same-1", "executing", 1),
        ("same-1", "completed", 1),
        ("same-2", "started", 2),
        ("same-2", "executing", 2),
        ("same-2", "completed", 2),
    ]


def test_track_operation_rejects_empty_id() -> None:
    """An empty operation id is refused with InvalidArgument."""
    with pytest.raises(InvalidArgument) as info:
        bb.track_operation("", "dht_store", beats=1)
    assert info.value.name == "operation_id"


# -- fallback with no integration ----------------------------------------------------------


def test_fallback_runs_plainly_without_integration() -> None:
    """With no started integration, a decorated call and a block run as they are."""
    with bb.set_default_integration(None):

        @bb.beat_budget(0.001)
        def slow() -> str:
            time.sleep(0.01)
            return "ran"

        assert slow() == "ran"
        with bb.track_operation("fallback-op", "dht_store", beats=0.001) as op:
            op.set_phase("connecting", peers=2)
            op.check()
            op.sleep(0.001)
        assert op.beats_used == 0.0
        assert budget_mod.execute_with_beat_budget(None, 1, lambda: 42) == 42


def test_strict_raises_integration_not_started() -> None:
    """strict=True refuses to run without a started integration."""
    with bb.set_default_integration(None):

        @bb.beat_budget(1, strict=True)
        def f() -> None:
            pass

        with pytest.raises(bb.IntegrationNotStarted):
            f()
        with pytest.raises(bb.IntegrationNotStarted):
            bb.track_operation("x", "t", beats=1, strict=True)


# -- behaviour unchanged when the budget is not spent ---------------------------------------


def test_return_values_and_signature_survive(live: Any) -> None:
    """The wrapped function's result, name, docstring and signature are unchanged."""

    def add(a: int, b: int = 2, *, scale: int = 1) -> int:
        """Add two numbers."""
        return (a + b) * scale

    wrapped = bb.beat_budget(10)(add)
    assert wrapped(1, 2, scale=3) == 9
    assert wrapped.__name__ == "add"
    assert wrapped.__doc__ == "Add two numbers."
    assert inspect.signature(add) == inspect.signature(wrapped)


def test_exceptions_and_tracebacks_unchanged(live: Any) -> None:
    """An exception from the function propagates as the same object with its traceback."""
    _integration, log = live
    boom = ValueError("boom")

    @bb.beat_budget(10, name="raiser")
    def raiser() -> None:
        raise boom

    with pytest.raises(ValueError) as info:
        raiser()
    assert boom is info.value
    frames = [f.name for f in traceback.extract_tb(info.value.__traceback__)]
    assert frames[-1] == "raiser"
    assert info.value.__context__ is None
    log.wait_for(lambda cs: any(c.task_id.startswith("raiser-") and c.state == "failed" for c in cs))
    failed = [c for c in log.snapshot() if c.task_id.startswith("raiser-") and c.state == "failed"]
    assert failed[0].notes == "P2P operation failed: ValueError: boom (type: budget)"


def test_methods_classmethods_and_staticmethods(live: Any) -> None:
    """The decorator works on methods, classmethods and staticmethods."""

    class Store:
        factor = 10

        def __init__(self) -> None:
            self.n = 2

        @bb.beat_budget(10)
        def method(self, x: int) -> int:
            return self.n * x

        @bb.beat_budget(10)
        @classmethod
        def klass(cls, x: int) -> int:
            return cls.factor * x

        @classmethod
        @bb.beat_budget(10)
        def klass_inner(cls, x: int) -> int:
            return cls.factor + x

        @bb.beat_budget(10)
        @staticmethod
        def static(x: int) -> int:
            return x + 1

    s = Store()
    assert (
        s.method(3),
        Store.klass(3),
        Store.klass_inner(3),
        Store.static(3),
        s.static(3),
    ) == (6, 30, 13, 4, 4)


# -- exhaustion ---------------------------------------------------------------------------


def test_busy_loop_interrupted_in_main_thread(live: Any) -> None:
    """A busy Python loop is interrupted soon after its budget runs out, in the main thread."""
    integration, log = live
    assert threading.current_thread() is threading.main_thread()

    @bb.beat_budget(1, name="spin")
    def spin() -> None:
        busy_until_interrupted()

    t0 = time.monotonic()
    with pytest.raises(bb.BeatBudgetExceeded) as info:
        spin()
    elapsed = time.monotonic() - t0
    e = info.value
    assert isinstance(e, TimeoutError)
    assert e.operation_id.startswith("spin-")
    assert (e.budget_beats, e.late) == (1.0, False)
    assert 1.0 <= e.beats_used < 1.5
    assert elapsed < 0.1 + 0.05
    log.wait_for(lambda cs: any(c.task_id == e.operation_id and c.state == "failed" for c in cs))
    notes = [c.notes for c in log.for_task(e.operation_id) if c.state == "failed"]
    assert [
        f"P2P operation failed: beat budget exceeded: used {e.beats_used:.2f} of 1 beats (type: budget)"
    ] == notes
    assert integration.get_health()["budget_exhausted_interrupt_interrupted"] == 1


def test_busy_loop_interrupted_in_worker_thread(live: Any) -> None:
    """The same holds in a worker thread, and the main thread is not touched."""
    caught: list[BaseException] = []

    @bb.beat_budget(1)
    def spin() -> None:
        busy_until_interrupted()

    def worker() -> None:
        try:
            spin()
        except bb.BeatBudgetExceeded as e:
            caught.append(e)

    th = threading.Thread(target=worker)
    th.start()
    th.join(5)
    assert len(caught) == 1
    assert not caught[0].late


def test_blocked_in_c_is_raised_late(live: Any) -> None:
    """A call blocked in C gets the exception when it returns, marked late, with beats_over."""
    integration, log = live

    @bb.beat_budget(1, name="blocked")
    def blocked() -> None:
        time.sleep(0.35)

    with pytest.raises(bb.BeatBudgetExceeded) as info:
        blocked()
    e = info.value
    assert e.late
    assert 2.0 < e.beats_over < 3.2
    log.wait_for(lambda cs: any(c.task_id == e.operation_id and c.state == "failed" for c in cs))
    failed = [c.notes for c in log.for_task(e.operation_id) if c.state == "failed"]
    assert f"(late by {e.beats_over:.2f} beats)" in failed[0]
    blocked_note = [c.notes for c in log.for_task(e.operation_id) if "blocked" in c.notes]
    assert len(blocked_note) == 1
    assert integration.get_health()["budget_exhausted_interrupt_late"] == 1


def test_raise_after_runs_to_the_end_and_attaches_result(live: Any) -> None:
    """on_exhaust="raise_after": the code finishes, then BeatBudgetExceeded carries its result."""
    integration, _ = live
    finished = []

    @bb.beat_budget(1, on_exhaust="raise_after")
    def slow() -> str:
        time.sleep(0.15)
        finished.append(True)
        return "value"

    with pytest.raises(bb.BeatBudgetExceeded) as info:
        slow()
    assert (finished, info.value.result) == ([True], "value")
    assert integration.get_health()["budget_exhausted_raise_after"] == 1


def test_warn_mode_claims_and_completes(live: Any) -> None:
    """on_exhaust="warn": the call completes; the exhaustion is claimed and counted."""
    integration, log = live

    @bb.beat_budget(1, on_exhaust="warn", name="warned")
    def slow() -> str:
        time.sleep(0.15)
        return "ok"

    assert slow() == "ok"
    log.wait_for(lambda cs: any(c.task_id.startswith("warned-") and c.state == "done" for c in cs))
    notes = [c.notes for c in log.snapshot() if c.task_id.startswith("warned-")]
    assert any("beat budget exceeded" in n and "warn only" in n for n in notes)
    assert integration.get_health()["budget_exhausted_warn"] == 1


def test_warnings_are_claimed_at_once_and_call_back(live: Any) -> None:
    """At each warn_at fraction a claim goes out and on_warning runs."""
    integration, log = live
    seen: list[float] = []
    done = threading.Event()

    def on_warning(op: bb.Tracker, fraction: float) -> None:
        seen.append(fraction)
        if len(seen) == 2:
            done.set()

    with bb.track_operation(
        "warned-op", "dht_store", beats=2, warn_at=(0.25, 0.5), on_warning=on_warning, on_exhaust="warn"
    ) as op:
        while op.progress < 0.6:
            time.sleep(0.01)
    assert done.wait(2)
    assert seen == [0.25, 0.5]
    notes = [c.notes for c in log.for_task("warned-op") if "warning" in c.notes]
    assert [n.split(",")[0] for n in notes] == [
        "beat budget warning: 25% of 2 beats used",
        "beat budget warning: 50% of 2 beats used",
    ]
    assert integration.get_health()["budget_warnings"] == 2


# -- claims -----------------------------------------------------------------------------


def test_track_operation_claims_start_phases_and_end(manual: Any) -> None:
    """track_operation claims at start, on each phase change and at the end, like start_p2p_operation."""
    _integration, _pulse, log = manual
    with bb.track_operation("dht-store-k", "dht_store", beats=50, peers=3, manual_phases=True) as op:
        op.set_phase(bb.OperationPhase.CONNECTING)
        op.set_phase("negotiating", peers=5)
    log.wait_for(lambda cs: any(c.state == "done" for c in cs))
    got = [(c.state, c.phase, c.peer_count) for c in log.for_task("dht-store-k")]
    assert got == [
        ("executing", "started", 3),
        ("executing", "connecting", 3),
        ("executing", "negotiating", 5),
        ("done", "completed", 5),
    ]


def test_track_operation_moves_to_executing_and_fails_with_reason(manual: Any) -> None:
    """Without manual_phases the block is EXECUTING; an exception fails it and propagates."""
    _integration, _pulse, log = manual
    with pytest.raises(KeyError), bb.track_operation("op-fail", "election", beats=50):
        raise KeyError("missing")
    log.wait_for(lambda cs: any(c.state == "failed" for c in cs))
    got = [(c.state, c.phase) for c in log.for_task("op-fail")]
    assert got == [("executing", "started"), ("executing", "executing"), ("failed", "failed")]
    assert log.for_task("op-fail")[-1].notes == "P2P operation failed: KeyError: 'missing' (type: election)"


def test_set_phase_backwards_is_refused(manual: Any) -> None:
    """Phases only move forward; a final phase is refused too."""
    with bb.track_operation("op-back", "election", beats=50) as op:
        with pytest.raises(bb.InvalidPhaseTransition):
            op.set_phase("connecting")
        with pytest.raises(InvalidArgument):
            op.set_phase("completed")


def test_quick_calls_cost_no_claim(manual: Any) -> None:
    """Calls that start and end between two beats send no claim and leave no operation."""
    integration, _pulse, log = manual

    @bb.beat_budget(20, name="quick")
    def quick(x: int) -> int:
        return x

    assert sum(quick(i) for i in range(1000)) == 499500
    with bb.track_operation("marker", "t", beats=50):
        pass
    log.wait_for(lambda cs: any(c.task_id == "marker" and c.state == "done" for c in cs))
    assert [c for c in log.snapshot() if c.task_id.startswith("quick")] == []
    assert integration.registry.active_count == 0


def test_call_running_at_a_beat_is_claimed_from_then_on(manual: Any) -> None:
    """A call still running at a beat appears in that beat's claims, and its end is claimed."""
    _integration, pulse, log = manual
    started, release = threading.Event(), threading.Event()

    @bb.beat_budget(50, name="longcall")
    def long_call() -> str:
        started.set()
        release.wait(5)
        return "done"

    out: list[str] = []
    th = threading.Thread(target=lambda: out.append(long_call()))
    th.start()
    assert started.wait(5)
    pulse.beat(1)
    log.wait_for(lambda cs: any(c.task_id.startswith("longcall-") for c in cs))
    pulse.beat(2)
    release.set()
    th.join(5)
    log.wait_for(lambda cs: any(c.task_id.startswith("longcall-") and c.state == "done" for c in cs))
    got = [(c.state, c.beat_index) for c in log.snapshot() if c.task_id.startswith("longcall-")]
    assert out == ["done"]
    assert got == [("executing", 1), ("executing", 2), ("done", 2)]


# -- nesting ----------------------------------------------------------------------------


def test_nested_earliest_deadline_wins_and_names_the_inner_budget(live: Any) -> None:
    """The inner (earlier) budget fires; its exception names it; the outer sees it propagate."""
    _integration, log = live

    @bb.beat_budget(1, name="inner")
    def inner() -> None:
        busy_until_interrupted()

    with pytest.raises(bb.BeatBudgetExceeded) as info, bb.track_operation("outer", "t", beats=20):
        inner()
    assert info.value.operation_id.startswith("inner-")
    log.wait_for(lambda cs: any(c.task_id == "outer" and c.state == "failed" for c in cs))
    assert "beat budget exceeded" in log.for_task("outer")[-1].notes


def test_outer_does_not_see_an_inner_exception_that_is_caught(live: Any) -> None:
    """When the inner exception is handled inside the outer block, the outer completes."""
    _integration, log = live

    @bb.beat_budget(1)
    def inner() -> None:
        busy_until_interrupted()

    with bb.track_operation("outer-ok", "t", beats=20) as op:
        with pytest.raises(bb.BeatBudgetExceeded):
            inner()
        op.check()
    log.wait_for(lambda cs: any(c.task_id == "outer-ok" and c.state == "done" for c in cs))


def test_outer_budget_running_out_inside_inner_names_the_outer(live: Any) -> None:
    """An outer budget that runs out first interrupts the inner code and names the outer."""
    integration, _log = live

    @bb.beat_budget(30, name="long-inner")
    def inner() -> None:
        busy_until_interrupted()

    with pytest.raises(bb.BeatBudgetExceeded) as info, bb.track_operation("short-outer", "t", beats=1):
        inner()
    assert info.value.operation_id == "short-outer"
    assert integration.registry.active_count == 0


# -- cooperative waits ----------------------------------------------------------------------


def test_op_sleep_stops_when_the_budget_runs_out(live: Any) -> None:
    """op.sleep returns (by raising) as soon as the budget is spent, not when the sleep ends."""
    with pytest.raises(bb.BeatBudgetExceeded) as info, bb.track_operation("sleeper", "t", beats=1) as op:
        t0 = time.monotonic()
        op.sleep(5)
    elapsed = time.monotonic() - t0
    assert 0.09 < elapsed < 0.1 + 0.03
    assert info.value.beats_over < 0.2
    assert not info.value.late


def test_op_wait_returns_true_when_set_and_stops_when_spent(live: Any) -> None:
    """op.wait behaves like Event.wait, and is cut short by the budget."""
    ev = threading.Event()
    threading.Timer(0.02, ev.set).start()
    with bb.track_operation("waiter-1", "t", beats=5) as op:
        assert op.wait(ev, 2)
        assert not op.wait(threading.Event(), 0.01)
    with pytest.raises(bb.BeatBudgetExceeded), bb.track_operation("waiter-2", "t", beats=1) as op:
        t0 = time.monotonic()
        op.wait(threading.Event())
    assert time.monotonic() - t0 < 0.1 + 0.03


def test_op_sleep_in_warn_mode_returns_early_without_raising(live: Any) -> None:
    """With on_exhaust="warn", op.sleep returns when the budget runs out and nothing is raised."""
    with bb.track_operation("soft", "t", beats=1, on_exhaust="warn") as op:
        t0 = time.monotonic()
        op.sleep(5)
        assert time.monotonic() - t0 < 0.15
        assert op.beats_left == 0.0


# -- maths and misc ----------------------------------------------------------------------


def test_beats_used_left_and_progress_follow_the_clock() -> None:
    """Budget maths on a manual clock: position advances at the tempo; check() raises once spent."""
    t = ManualTime()
    bus = unique_bus()
    cfg = bb.BackbeatConfig(
        cluster_id="m", agent_id="a", nats_url=f"local://{bus}?pulse=manual", tempo_bpm=60
    )
    with (
        bb.Integration(cfg, node_id="n", time_source=t) as integration,
        bb.track_operation(
            "maths", "t", beats=4, integration=integration, warn_at=None, on_exhaust="warn"
        ) as op,
    ):
        assert (op.beats_used, op.beats_left, op.progress) == (0.0, 4.0, 0.0)
        t.advance(1.0)
        assert (op.beats_used, op.beats_left, op.progress) == (1.0, 3.0, 0.25)
        op.check()
        t.advance(3.0)
        with pytest.raises(bb.BeatBudgetExceeded) as info:
            op.check()
        assert (info.value.beats_used, op.beats_left, op.progress) == (4.0, 0.0, 1.0)


def test_execute_with_beat_budget_runs_and_interrupts(live: Any) -> None:
    """Integration.execute_with_beat_budget returns the result, or raises when spent."""
    integration, _ = live
    assert integration.execute_with_beat_budget(5, lambda a, b: a + b, 3, b=4) == 7
    with pytest.raises(bb.BeatBudgetExceeded):
        integration.execute_with_beat_budget(1, busy_until_interrupted)


def test_delivered_exception_pickles_with_its_figures(live: Any) -> None:
    """The exception raised asynchronously pickles to a BeatBudgetExceeded with the same figures."""

    @bb.beat_budget(1)
    def spin() -> None:
        busy_until_interrupted()

    with pytest.raises(bb.BeatBudgetExceeded) as info:
        spin()
    e = info.value
    copy = pickle.loads(pickle.dumps(e))
    assert (e.operation_id, e.budget_beats, e.beats_used, e.late) == (
        copy.operation_id,
        copy.budget_beats,
        copy.beats_used,
        copy.late,
    )
    assert str(e) == str(copy)


def test_budgets_read_the_frozen_time_under_freezegun() -> None:
    """Under freezegun a budget reads the same (frozen) time as the beat clock: tick() spends it."""
    with freeze_time("2026-11-28 01:00:00") as frozen:
        cfg = bb.BackbeatConfig(
            cluster_id="fz", agent_id="a", nats_url=f"local://{unique_bus()}?pulse=manual", tempo_bpm=60
        )
        with (
            bb.Integration(cfg, node_id="n") as integration,
            bb.track_operation(
                "frozen", "t", beats=4, integration=integration, warn_at=None, on_exhaust="warn"
            ) as op,
        ):
            assert op.beats_used == 0.0
            frozen.tick(1.0)
            assert op.beats_used == pytest.approx(1.0)
            frozen.tick(3.0)
            with pytest.raises(bb.BeatBudgetExceeded):
                op.check()
