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
SPB = 60.0 / FAST_BPM
#: How long a budgeted loop or wait would last if no budget stopped it. Only a bug costs
#: this time; a test that checks "stopped early" asserts well under half of it, so a slow
#: or busy machine (a thread descheduled for a second or two) cannot fail the test.
NEVER = 60.0
EARLY = NEVER / 2
#: A budget (in beats) that must not run out during the test, however slow the machine.
BIG = 10 * NEVER / SPB


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


def busy_until_interrupted(limit: float = NEVER) -> None:
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

    wrapped = bb.beat_budget(BIG)(add)
    assert wrapped(1, 2, scale=3) == 9
    assert wrapped.__name__ == "add"
    assert wrapped.__doc__ == "Add two numbers."
    assert inspect.signature(add) == inspect.signature(wrapped)


def test_exceptions_and_tracebacks_unchanged(live: Any) -> None:
    """An exception from the function propagates as the same object with its traceback."""
    _integration, log = live
    boom = ValueError("boom")

    @bb.beat_budget(BIG, name="raiser")
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

        @bb.beat_budget(BIG)
        def method(self, x: int) -> int:
            return self.n * x

        @bb.beat_budget(BIG)
        @classmethod
        def klass(cls, x: int) -> int:
            return cls.factor * x

        @classmethod
        @bb.beat_budget(BIG)
        def klass_inner(cls, x: int) -> int:
            return cls.factor + x

        @bb.beat_budget(BIG)
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
    assert Store.method(s, 4) == 8  # looked up on the class, the instance passed by hand


def test_plain_function_wrapper_calls_the_engine_without_wrapts_probe(live: Any) -> None:
    """A decorated plain function is a wrapt FunctionWrapper whose own ``__call__`` runs the
    engine: wrapt's C call would first ask the function for ``__self__`` (an AttributeError
    made and cleared on every call, most of the decorator's cost; docs/performance.md).
    Methods, classmethods and staticmethods keep wrapt's own binding (test above)."""
    import wrapt

    def work(x: int) -> int:
        """Work."""
        return x * 2

    budgeted = bb.beat_budget(BIG, name="probe-free")(work)
    assert isinstance(budgeted, wrapt.FunctionWrapper)
    assert type(budgeted).__call__ is not wrapt.FunctionWrapper.__call__
    assert budgeted.__wrapped__ is work
    assert (budgeted.__name__, budgeted.__qualname__, budgeted.__doc__) == (
        "work",
        work.__qualname__,
        "Work.",
    )
    # It is the budgeted engine that runs: a call shows as a live budget in its thread.
    from backbeat_sync._watchdog import current_slot

    seen: list[bool] = []

    def inside() -> None:
        seen.append(bool(current_slot().live))

    bb.beat_budget(BIG)(inside)()
    assert seen == [True]
    # A call that outlives its budget is interrupted inside, as with wrapt's own call path.
    spent = bb.beat_budget(1, name="probe-free-spent")(busy_until_interrupted)
    with pytest.raises(bb.BeatBudgetExceeded):
        spent()
    assert budgeted(21) == 42
    # Each class is its function's own: two decorated functions do not share a __call__.
    other = bb.beat_budget(BIG)(work)
    assert type(other) is not type(budgeted)
    assert other(1) == 2


def test_plain_function_wrapper_runs_plainly_when_the_gate_is_closed() -> None:
    """With the budget gate closed (no integration running, the fallback logged), the call
    goes straight to the function, as wrapt's ``enabled`` did."""
    from backbeat_sync._runtime import RUNTIME

    calls: list[int] = []

    def work(x: int) -> int:
        calls.append(x)
        return x

    budgeted = bb.beat_budget(BIG)(work)
    saved = list(RUNTIME.budgets_on)
    RUNTIME.budgets_on[:] = []
    try:
        assert budgeted(5) == 5
        assert calls == [5]
    finally:
        RUNTIME.budgets_on[:] = saved
    strict = bb.beat_budget(BIG, strict=True)(work)
    with pytest.raises(bb.IntegrationNotStarted):
        strict(6)  # strict always runs the engine, which refuses
    assert calls == [5]


# -- exhaustion ---------------------------------------------------------------------------


def raised_in(e: BaseException) -> str:
    """Name of the function whose frame the exception was raised in (where it landed)."""
    return traceback.extract_tb(e.__traceback__)[-1].name


def spent_note(e: bb.BeatBudgetExceeded) -> str:
    """The failed claim's notes for a budget exception (``late`` says whether a suffix is added)."""
    late = f" (late by {e.beats_over:.2f} beats)" if e.late else ""
    return (
        f"P2P operation failed: beat budget exceeded: used {e.beats_used:.2f}"
        f" of {e.budget_beats:g} beats{late} (type: budget)"
    )


def test_busy_loop_interrupted_in_main_thread(live: Any) -> None:
    """A busy Python loop is interrupted inside the loop once its budget runs out, in the main thread.

    Whether it landed within LATE_SECONDS (``late``) depends on the machine's load; that
    figure is measured in benchmarks/. Here: it lands in the loop, long before the loop
    would end, never before the budget is spent, and is claimed and counted as it says.
    """
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
    assert raised_in(e) == "busy_until_interrupted"  # delivered into the running Python loop
    assert e.operation_id.startswith("spin-")
    assert e.budget_beats == 1.0
    assert e.beats_used >= 1.0
    assert e.beats_used == pytest.approx(1.0 + e.beats_over)
    assert elapsed < EARLY  # the loop would have run NEVER seconds
    log.wait_for(lambda cs: any(c.task_id == e.operation_id and c.state == "failed" for c in cs))
    notes = [c.notes for c in log.for_task(e.operation_id) if c.state == "failed"]
    assert [spent_note(e)] == notes
    health = integration.get_health()  # a counter appears once it counts something
    counted = [health.get(f"budget_exhausted_interrupt_{k}") for k in ("interrupted", "late")]
    assert counted == ([None, 1] if e.late else [1, None])


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
    th.join(NEVER + 5)
    assert len(caught) == 1
    assert raised_in(caught[0]) == "busy_until_interrupted"


def test_blocked_in_c_is_raised_late(manual: Any) -> None:
    """A call blocked in C gets the exception when it returns, marked late, with beats_over.

    The call blocks in C (a lock) until the watchdog has claimed it "blocked", which it
    does a follow-up (50 ms) after the budget ran out: so it is late by construction,
    however slow the machine. No frames come (a manual pulse), so the position runs on
    the local clock alone and beats_over can be bounded by the wall time measured.
    """
    integration, _pulse, log = manual
    gate = threading.Lock()
    gate.acquire()

    def release_when_claimed_blocked() -> None:
        log.wait_for(lambda cs: any("blocked" in c.notes for c in cs), timeout=NEVER)
        gate.release()

    releaser = threading.Thread(target=release_when_claimed_blocked, daemon=True)
    releaser.start()

    @bb.beat_budget(1, name="blocked")
    def blocked() -> None:
        assert gate.acquire(timeout=NEVER)  # blocked in C until the watchdog says so

    t0 = time.monotonic()
    with pytest.raises(bb.BeatBudgetExceeded) as info:
        blocked()
    elapsed = time.monotonic() - t0
    releaser.join(5)
    e = info.value
    assert e.late
    assert elapsed < EARLY
    # at least the follow-up (half a beat after the deadline), at most the wall time measured
    assert 0.5 - 1e-6 <= e.beats_over <= elapsed / SPB - 1.0 + 1e-6
    assert e.beats_used == pytest.approx(1.0 + e.beats_over)
    log.wait_for(lambda cs: any(c.task_id == e.operation_id and c.state == "failed" for c in cs))
    failed = [c.notes for c in log.for_task(e.operation_id) if c.state == "failed"]
    assert f"(late by {e.beats_over:.2f} beats)" in failed[0]
    blocked_note = [c.notes for c in log.for_task(e.operation_id) if "blocked" in c.notes]
    assert len(blocked_note) == 1
    assert integration.get_health()["budget_exhausted_interrupt_late"] == 1


def test_raise_after_runs_to_the_end_and_attaches_result(live: Any) -> None:
    """on_exhaust="raise_after": the code finishes, then BeatBudgetExceeded carries its result."""
    integration, log = live
    finished = []

    @bb.beat_budget(1, on_exhaust="raise_after", name="after")
    def slow() -> str:
        # runs past its budget: returns once the watchdog has claimed it spent
        log.wait_for(lambda cs: any("raised when the call returns" in c.notes for c in cs), timeout=NEVER)
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
        # runs past its budget: returns once the watchdog has claimed it spent
        log.wait_for(lambda cs: any("warn only" in c.notes for c in cs), timeout=NEVER)
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
    ):
        assert done.wait(NEVER)  # both warnings called back while the block runs
    assert seen == [0.25, 0.5]
    log.wait_for(lambda cs: sum("warning" in c.notes for c in cs if c.task_id == "warned-op") == 2)
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
    with bb.track_operation("dht-store-k", "dht_store", beats=BIG, peers=3, manual_phases=True) as op:
        op.set_phase(bb.OperationPhase.CONNECTING)
        op.set_phase("negotiating", peers=5)
    log.wait_for(lambda cs: any(c.task_id == "dht-store-k" and c.state == "done" for c in cs))
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
    with pytest.raises(KeyError), bb.track_operation("op-fail", "election", beats=BIG):
        raise KeyError("missing")
    log.wait_for(lambda cs: any(c.task_id == "op-fail" and c.state == "failed" for c in cs))
    got = [(c.state, c.phase) for c in log.for_task("op-fail")]
    assert got == [("executing", "started"), ("executing", "executing"), ("failed", "failed")]
    assert log.for_task("op-fail")[-1].notes == "P2P operation failed: KeyError: 'missing' (type: election)"


def test_set_phase_backwards_is_refused(manual: Any) -> None:
    """Phases only move forward; a final phase is refused too."""
    with bb.track_operation("op-back", "election", beats=BIG) as op:
        with pytest.raises(bb.InvalidPhaseTransition):
            op.set_phase("connecting")
        with pytest.raises(InvalidArgument):
            op.set_phase("completed")


def test_quick_calls_cost_no_claim(manual: Any) -> None:
    """Calls that start and end between two beats send no claim and leave no operation."""
    integration, _pulse, log = manual

    @bb.beat_budget(BIG, name="quick")
    def quick(x: int) -> int:
        return x

    assert sum(quick(i) for i in range(1000)) == 499500
    with bb.track_operation("marker", "t", beats=BIG):
        pass
    log.wait_for(lambda cs: any(c.task_id == "marker" and c.state == "done" for c in cs))
    assert [c for c in log.snapshot() if c.task_id.startswith("quick")] == []
    assert integration.registry.active_count == 0


def test_call_running_at_a_beat_is_claimed_from_then_on(manual: Any) -> None:
    """A call still running at a beat appears in that beat's claims, and its end is claimed."""
    _integration, pulse, log = manual
    started, release = threading.Event(), threading.Event()

    @bb.beat_budget(BIG, name="longcall", warn_at=None)
    def long_call() -> str:
        started.set()
        release.wait(NEVER)
        return "done"

    out: list[str] = []
    th = threading.Thread(target=lambda: out.append(long_call()))
    th.start()
    assert started.wait(NEVER)
    pulse.beat(1)
    log.wait_for(lambda cs: any(c.task_id.startswith("longcall-") for c in cs))
    pulse.beat(2)
    release.set()
    th.join(NEVER)
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

    with pytest.raises(bb.BeatBudgetExceeded) as info, bb.track_operation("outer", "t", beats=BIG):
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

    with bb.track_operation("outer-ok", "t", beats=BIG) as op:
        with pytest.raises(bb.BeatBudgetExceeded):
            inner()
        op.check()
    log.wait_for(lambda cs: any(c.task_id == "outer-ok" and c.state == "done" for c in cs))


def test_outer_budget_running_out_inside_inner_names_the_outer(live: Any) -> None:
    """An outer budget that runs out first interrupts the inner code and names the outer."""
    integration, _log = live

    @bb.beat_budget(BIG, name="long-inner")
    def inner() -> None:
        busy_until_interrupted()

    with pytest.raises(bb.BeatBudgetExceeded) as info, bb.track_operation("short-outer", "t", beats=1):
        inner()
    assert info.value.operation_id == "short-outer"
    assert integration.registry.active_count == 0


# -- cooperative waits ----------------------------------------------------------------------


# These run on a manual pulse that sends no frame: the budget position advances on the
# local clock alone, so "not before the budget is spent" is exact (elapsed >= 1 beat).
# How soon after that they return is a benchmark figure; here only "long before the
# sleep or wait would have ended" is asserted.


def test_op_sleep_stops_when_the_budget_runs_out(manual: Any) -> None:
    """op.sleep returns (by raising) once the budget is spent, not when the sleep ends."""
    t0 = time.monotonic()
    with pytest.raises(bb.BeatBudgetExceeded) as info, bb.track_operation("sleeper", "t", beats=1) as op:
        op.sleep(NEVER)
    elapsed = time.monotonic() - t0
    e = info.value
    assert SPB - 1e-3 <= elapsed < EARLY
    assert 0.0 <= e.beats_over <= elapsed / SPB - 1.0 + 1e-3
    assert e.beats_used == pytest.approx(1.0 + e.beats_over)


def test_op_wait_returns_true_when_set_and_stops_when_spent(manual: Any) -> None:
    """op.wait behaves like Event.wait, and is cut short by the budget."""
    ev = threading.Event()
    setter = threading.Thread(target=ev.set)
    with bb.track_operation("waiter-1", "t", beats=BIG) as op:
        setter.start()
        assert op.wait(ev, NEVER)
        assert not op.wait(threading.Event(), 0.01)
    setter.join()
    t0 = time.monotonic()
    with pytest.raises(bb.BeatBudgetExceeded), bb.track_operation("waiter-2", "t", beats=1) as op:
        op.wait(threading.Event(), NEVER)
    assert SPB - 1e-3 <= time.monotonic() - t0 < EARLY


def test_op_sleep_in_warn_mode_returns_early_without_raising(manual: Any) -> None:
    """With on_exhaust="warn", op.sleep returns when the budget runs out and nothing is raised."""
    t0 = time.monotonic()
    with bb.track_operation("soft", "t", beats=1, on_exhaust="warn") as op:
        op.sleep(NEVER)
        assert SPB - 1e-3 <= time.monotonic() - t0 < EARLY
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
        assert (info.value.beats_over, info.value.late) == (0.0, False)  # raised by its owner, on time


def test_a_tempo_change_mid_budget_stretches_it_exactly() -> None:
    """Budgets count beats: halve the tempo as a 4-beat budget opens and it takes twice the time.

    On a manual clock and a hand-driven pulse at 300 BPM (0.2 s beats): steady, 4 beats
    take 0.8 s; with the tempo halved from the next beat on (as Pulse.set_tempo does), the
    frames come 0.4 s apart and the same budget takes 1.6 s. Until the first slow frame
    arrives the clock extrapolates at the tempo it knew (PROTOCOL.md, the beat clock).
    """
    from tests.support import HandledBeats, ManualPulse

    t = ManualTime()
    bus = unique_bus()
    url = f"local://{bus}?pulse=manual"
    cfg = bb.BackbeatConfig(cluster_id="m", agent_id="a", nats_url=url, tempo_bpm=300)
    integration = bb.Integration(cfg, node_id="n", time_source=t)
    pulse = ManualPulse(bus, "m", tempo_bpm=300, handled=HandledBeats(integration))

    def budget_seconds(beat: int, slow_down: bool) -> float:
        """Open a 4-beat budget just after ``beat``; beat on until check() raises; manual seconds taken."""
        with bb.track_operation(
            f"stretch-{slow_down}", "t", beats=4, integration=integration, warn_at=None, on_exhaust="warn"
        ) as op:
            opened = t.monotonic()
            if slow_down:
                pulse.tempo_bpm = 150
                t.advance(0.4)  # the next frame is due one new beat later; until it comes:
                assert op.beats_used == pytest.approx(2.0)  # extrapolated at the tempo known
                pulse.beat(beat + 1)  # snaps to its index at the new tempo
                assert op.beats_used == pytest.approx(1.0)
                beat += 1
            while not op.spent:
                op.check()
                t.advance(60.0 / pulse.tempo_bpm)
                beat += 1
                pulse.beat(beat)
            with pytest.raises(bb.BeatBudgetExceeded) as info:
                op.check()
            assert info.value.beats_used == pytest.approx(4.0)
            return t.monotonic() - opened

    with integration:
        pulse.beat(1)
        steady = budget_seconds(1, slow_down=False)
        stretched = budget_seconds(integration.clock.current_beat, slow_down=True)
    assert steady == pytest.approx(0.8)
    assert stretched == pytest.approx(1.6)


def test_execute_with_beat_budget_runs_and_interrupts(live: Any) -> None:
    """Integration.execute_with_beat_budget returns the result, or raises when spent."""
    integration, _ = live
    assert integration.execute_with_beat_budget(BIG, lambda a, b: a + b, 3, b=4) == 7
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
