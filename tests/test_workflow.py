"""Tests for backbeat_sync.workflow: parents and correlation, dependencies, progress, priorities.

In-process (``local://``); the two-agent and outage tests on a real nats-server are in
``test_workflow_nats.py``.
"""

from __future__ import annotations

import contextvars
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

import backbeat_sync as bb
from backbeat_sync._time import ManualTime
from backbeat_sync.claims import ClaimFactory
from backbeat_sync.errors import InvalidArgument
from backbeat_sync.operations import OperationPhase, P2POperation
from backbeat_sync.protocol import StatusClaim
from backbeat_sync.transport.nats.outbox import Outbox
from backbeat_sync.workflow import Flow
from tests.support import ClaimLog, HandledBeats, ManualPulse, manual_integration, unique_bus, wait_until

FAST_BPM = 600.0  # 100 ms beats
SPB = 60.0 / FAST_BPM
NEVER = 60.0  # what a wait would last if nothing stopped it (only a bug costs this)
EARLY = NEVER / 2
BIG = 10 * NEVER / SPB  # a budget that cannot run out during a test


@pytest.fixture
def manual() -> Iterator[Any]:
    """A started integration on a manual pulse at 600 BPM, its pulse and its claim log."""
    with manual_integration(tempo_bpm=FAST_BPM) as parts:
        yield parts


@pytest.fixture
def live() -> Iterator[tuple[bb.Integration, ClaimLog]]:
    """A started integration with a running in-process pulse at 600 BPM, and its claim log."""
    cfg = bb.BackbeatConfig(
        cluster_id="wf", agent_id="a1", nats_url=f"local://{unique_bus()}", tempo_bpm=FAST_BPM
    )
    integration = bb.Integration(cfg, node_id="node-1")
    log = ClaimLog()
    integration.on_claim(log)
    with integration:
        yield integration, log


def busy_until_interrupted(limit: float = NEVER) -> None:
    """Spin in Python until an exception lands (fails the test after ``limit`` seconds)."""
    end = time.monotonic() + limit
    while time.monotonic() < end:
        pass
    raise AssertionError("the budget never interrupted the loop")


def ids(claims: list[StatusClaim], task: str) -> set[tuple[str | None, str | None]]:
    """The (parent_id, correlation_id) pairs the claims of ``task`` carried."""
    return {(c.parent_id, c.correlation_id) for c in claims if c.task_id == task}


def claim_at(log: ClaimLog, task: str, beat: int) -> StatusClaim:
    """The last claim of ``task`` at ``beat`` (waits for it: claims reach on_claim asynchronously)."""
    log.wait_for(lambda cs: any(c.task_id == task and c.beat_index == beat for c in cs))
    return [c for c in log.for_task(task) if c.beat_index == beat][-1]


def claim_with(log: ClaimLog, task: str, text: str) -> StatusClaim:
    """The first claim of ``task`` whose notes contain ``text`` (waits for it)."""
    log.wait_for(lambda cs: any(c.task_id == task and text in c.notes for c in cs))
    return next(c for c in log.for_task(task) if text in c.notes)


def finished(log: ClaimLog, task: str) -> None:
    log.wait_for(lambda cs: any(c.task_id == task and c.state in ("done", "failed") for c in cs))


# -- parents and correlation ------------------------------------------------------------


def test_nesting_on_one_thread_records_parent_and_root(manual: Any) -> None:
    """Blocks and a decorated call nested on one thread: each claim names its parent and the root."""
    _integration, pulse, log = manual
    seen: dict[str, Any] = {}

    @bb.beat_budget(BIG, name="leaf")
    def leaf() -> str:
        op = bb.current_operation()
        assert op is not None
        seen["leaf"] = op
        pulse.beat(1)  # still running at a beat: claimed from now on
        return op.operation_id

    assert bb.current_operation() is None
    with bb.track_operation("root", "wf", beats=BIG) as root:
        assert bb.current_operation() is root
        with bb.track_operation("mid", "wf", beats=BIG) as mid:
            assert bb.current_operation() is mid
            leaf_id = leaf()
            assert bb.current_operation() is mid
        assert bb.current_operation() is root
    assert bb.current_operation() is None
    finished(log, "root")
    claims = log.snapshot()
    assert ids(claims, "root") == {(None, "root")}  # a root carries its own id
    assert ids(claims, "mid") == {("root", "root")}
    assert ids(claims, leaf_id) == {("mid", "root")}
    assert (root.parent_id, root.correlation_id) == (None, "root")
    assert (mid.parent, mid.parent_id, mid.correlation_id) == (root, "root", "root")
    assert (mid.parent_type, root.parent_type) == ("wf", None)  # what history records
    assert seen["leaf"].parent is mid


def test_a_block_whose_exit_never_ran_is_not_the_open_operation(manual: Any) -> None:
    """A block left without its exit (an exception landed on its first instruction) stays in the
    context variable, but it is no longer open in its thread: it is nobody's parent there."""
    out: list[Any] = []

    def run() -> None:  # in a thread of its own: what is left in its context goes with it
        op = bb.track_operation("never-exited", "t", beats=BIG, warn_at=None)
        op.__enter__()
        op.slot.live.pop(op.seq)  # as the watchdog does when it fires; the exit never runs
        out.append(bb.current_operation())
        with bb.track_operation("after", "t", beats=BIG) as after:
            out.append(after.parent_id)

    th = threading.Thread(target=run)
    th.start()
    th.join(NEVER)
    assert out == [None, None]


def test_deep_nesting_finds_the_root_without_recursion(manual: Any) -> None:
    """3,000 nested blocks (past the interpreter's recursion limit): each names its parent, all the root."""
    blocks = [bb.track_operation(f"deep-{i}", "t", beats=BIG, warn_at=None) for i in range(3000)]
    for b in blocks:
        b.__enter__()
    try:
        assert blocks[-1].correlation_id == "deep-0"
        assert blocks[-1].parent_id == "deep-2998"
    finally:
        for b in reversed(blocks):
            b.__exit__(None, None, None)
    assert bb.current_operation() is None


def test_quick_nested_calls_still_cost_no_claim(manual: Any) -> None:
    """Coalescing is kept: decorated calls inside a block that end before a beat send nothing."""
    _integration, _pulse, log = manual

    @bb.beat_budget(BIG, name="quickchild")
    def quick(x: int) -> int:
        return x

    with bb.track_operation("holder", "wf", beats=BIG):
        assert sum(quick(i) for i in range(500)) == 124750
    finished(log, "holder")
    assert [c for c in log.snapshot() if c.task_id.startswith("quickchild")] == []


def test_thread_pool_children_through_bind(manual: Any) -> None:
    """op.bind carries the operation into pool threads: children there name it; unbound ones do not."""
    _integration, _pulse, log = manual

    def child(name: str) -> tuple[bb.Tracker | None, str, str]:
        outer = bb.current_operation()
        with bb.track_operation(name, "wf", beats=BIG) as op:
            return outer, op.parent_id or "", op.correlation_id

    with bb.track_operation("pool-root", "wf", beats=BIG) as root, ThreadPoolExecutor(2) as pool:
        bound = [pool.submit(root.bind(child), f"bound-{i}") for i in range(4)]
        unbound = pool.submit(child, "unbound").result()
        results = [f.result() for f in bound]
    assert all(r == (root, "pool-root", "pool-root") for r in results)
    assert unbound == (None, "", "unbound")
    finished(log, "pool-root")
    claims = log.snapshot()
    for i in range(4):
        assert ids(claims, f"bound-{i}") == {("pool-root", "pool-root")}
    assert ids(claims, "unbound") == {(None, "unbound")}


def test_copy_context_run_carries_the_operation(manual: Any) -> None:
    """contextvars.copy_context().run in another thread finds the block as the open operation."""
    _integration, _pulse, log = manual
    out: list[Any] = []

    def child() -> None:
        with bb.track_operation("ctx-child", "wf", beats=BIG) as op:
            out.append((bb.current_operation() is op, op.parent_id))

    with bb.track_operation("ctx-root", "wf", beats=BIG):
        ctx = contextvars.copy_context()
        th = threading.Thread(target=ctx.run, args=(child,))
        th.start()
        th.join(NEVER)
    assert out == [(True, "ctx-root")]
    finished(log, "ctx-root")
    assert ids(log.snapshot(), "ctx-child") == {("ctx-root", "ctx-root")}


def test_child_in_another_thread_is_stopped_at_the_parent_deadline(live: Any) -> None:
    """A child budget longer than what its parent has left is cut to it and raises in its own thread."""
    _integration, log = live
    raised: list[BaseException] = []
    cut: list[tuple[bool, float]] = []
    done = threading.Event()

    @bb.beat_budget(BIG, name="long-call")
    def long_call() -> None:
        busy_until_interrupted()

    def child_block() -> None:
        try:
            with bb.track_operation("long-child", "wf", beats=BIG) as op:
                cut.append((op.cut, op.budget_beats))
                busy_until_interrupted()
        except bb.BeatBudgetExceeded as exc:
            raised.append(exc)

    def child_call() -> None:
        try:
            long_call()
        except bb.BeatBudgetExceeded as exc:
            raised.append(exc)

    t0 = time.monotonic()
    with pytest.raises(bb.BeatBudgetExceeded) as outer, bb.track_operation("parent", "wf", beats=3) as parent:
        threads = [threading.Thread(target=parent.bind(f)) for f in (child_block, child_call)]
        for th in threads:
            th.start()
        parent.wait(done, NEVER)  # the parent runs out too, here, in its own thread
    for th in threads:
        th.join(NEVER)
    assert time.monotonic() - t0 < EARLY
    assert outer.value.operation_id == "parent"
    assert len(cut) == 1
    assert cut[0][0] is True
    assert cut[0][1] <= 3.0
    assert sorted(e.operation_id.rstrip("0123456789") for e in raised) == ["long-call-", "long-child"]
    assert all(e.budget_beats <= 3.0 for e in raised)
    log.wait_for(lambda cs: any(c.task_id == "long-child" and c.state == "failed" for c in cs))


def test_in_one_thread_the_parent_deadline_stops_a_longer_child(live: Any) -> None:
    """In one thread a child longer than its parent's remainder is stopped at the parent's deadline:
    the parent's own exception unwinds it, and the child fails with it."""
    _integration, log = live
    t0 = time.monotonic()
    with (
        pytest.raises(bb.BeatBudgetExceeded) as info,
        bb.track_operation("short-parent", "wf", beats=2),
        bb.track_operation("long-child", "wf", beats=BIG) as child,
    ):
        assert child.parent_id == "short-parent"
        busy_until_interrupted()
    assert time.monotonic() - t0 < EARLY
    assert info.value.operation_id == "short-parent"
    log.wait_for(lambda cs: any(c.task_id == "long-child" and c.state == "failed" for c in cs))
    assert "beat budget exceeded" in log.for_task("long-child")[-1].notes


def test_a_warn_only_parent_cuts_nothing(manual: Any) -> None:
    """A parent that only warns stops nothing, so a child in another thread keeps its own budget."""
    out: list[tuple[bool, float]] = []

    def child() -> None:
        with bb.track_operation("free-child", "wf", beats=BIG) as op:
            out.append((op.cut, op.budget_beats))

    with bb.track_operation("soft-parent", "wf", beats=2, on_exhaust="warn") as parent:
        th = threading.Thread(target=parent.bind(child))
        th.start()
        th.join(NEVER)
    assert out == [(False, BIG)]


def test_workflow_continued_from_another_agent(manual: Any) -> None:
    """correlation_id= and parent_id= continue a workflow started elsewhere, on all faces."""
    integration, _pulse, log = manual
    with bb.track_operation("remote-child", "wf", beats=BIG, correlation_id="wf-1", parent_id="a2-op") as op:
        assert (op.correlation_id, op.parent_id) == ("wf-1", "a2-op")
        integration.start_p2p_operation("p2p-in-block", "election", 3)
    integration.start_p2p_operation("p2p-remote", "election", 3, correlation_id="wf-2", parent_id="x")
    integration.start_p2p_operation("p2p-parent-only", "election", 3, parent_id="y")
    for task in ("p2p-in-block", "p2p-remote", "p2p-parent-only"):
        integration.complete_p2p_operation(task, 1)
    finished(log, "p2p-parent-only")
    claims = log.snapshot()
    assert ids(claims, "remote-child") == {("a2-op", "wf-1")}
    assert ids(claims, "p2p-in-block") == {("remote-child", "wf-1")}
    assert ids(claims, "p2p-remote") == {("x", "wf-2")}
    assert ids(claims, "p2p-parent-only") == {("y", "y")}


@pytest.mark.parametrize(
    "bad",
    [
        {"correlation_id": ""},
        {"parent_id": 3},
        {"depends_on": "a"},
        {"parent_id": "p" * 257},
        {"depends_on": ["d" * 300]},
        {"depends_on": [f"d{i}" for i in range(65)]},
    ],
)
def test_bad_workflow_ids_are_refused(bad: dict[str, Any], manual: Any) -> None:
    """Empty or non-string ids, and a bare string as depends_on, raise InvalidArgument naming them."""
    integration, _pulse, _log = manual
    name = next(iter(bad))
    with pytest.raises(InvalidArgument, match=name):
        bb.track_operation("x", "t", beats=1, **bad)
    with pytest.raises(InvalidArgument, match=name):
        integration.start_p2p_operation("x", "t", 1, **bad)


# -- dependencies -------------------------------------------------------------------------


def test_dependency_waiting_then_normal_claims(manual: Any) -> None:
    """While a known dependency runs the operation claims waiting; when it finishes, normal claims."""
    integration, pulse, log = manual
    integration.start_p2p_operation("dep-a", "dht_store", 5)
    with bb.track_operation("needs-a", "wf", beats=BIG, depends_on=["dep-a", "elsewhere"]) as op:
        assert op.depends_on == ("dep-a", "elsewhere")
        pulse.beat(1)
        log.wait_for(lambda cs: any(c.task_id == "needs-a" and c.beat_index == 1 for c in cs))
        waiting = log.for_task("needs-a")
        assert [c.state for c in waiting] == ["waiting", "waiting", "waiting"]  # start, executing, beat 1
        assert {c.notes for c in waiting} == {"P2P wf: waiting for dep-a (node: node-1)"}
        assert {c.depends_on for c in waiting} == {("dep-a", "elsewhere")}  # as given
        integration.complete_p2p_operation("dep-a", 1)
        log.wait_for(lambda cs: len([c for c in cs if c.task_id == "needs-a"]) == 4)
        moved = log.for_task("needs-a")[-1]
        assert (moved.state, moved.notes) == ("executing", "P2P wf: executing (peers: 0, node: node-1)")
        pulse.beat(2)
        assert op.dependencies_failed == ()
    finished(log, "needs-a")
    after = [c.state for c in log.for_task("needs-a")[3:]]
    assert after == ["executing", "executing", "done"]


def test_failed_dependency_is_named(manual: Any) -> None:
    """A dependency that fails is named in the next claim's notes and in op.dependencies_failed."""
    integration, pulse, log = manual
    integration.start_p2p_operation("dep-b", "dht_store", 5)
    integration.start_p2p_operation("p2p-needs-b", "pubsub_sync", 5, depends_on=["dep-b"])
    with bb.track_operation("needs-b", "wf", beats=BIG, depends_on=["dep-b"]) as op:
        integration.fail_p2p_operation("dep-b", "no quorum")
        log.wait_for(lambda cs: sum(1 for c in cs if "dependency failed" in c.notes) == 2)
        note = [c for c in log.for_task("needs-b") if "dependency failed" in c.notes]
        assert [(c.state, c.notes) for c in note] == [
            ("executing", "P2P wf: executing (peers: 0, node: node-1); dependency failed: dep-b")
        ]
        assert op.dependencies_failed == ("dep-b",)
        pulse.beat(1)
        log.wait_for(lambda cs: any(c.task_id == "needs-b" and c.beat_index == 1 for c in cs))
        assert log.for_task("needs-b")[-1].notes == "P2P wf: executing (peers: 0, node: node-1)"  # said once
    finished(log, "needs-b")
    p2p = [c for c in log.for_task("p2p-needs-b") if "dependency failed" in c.notes]
    assert [c.notes for c in p2p] == [
        "P2P pubsub_sync: started (peers: 0, node: node-1); dependency failed: dep-b"
    ]
    # an operation started after its dependency failed says so in its start claims
    with bb.track_operation("late-b", "wf", beats=BIG, depends_on=["dep-b"]) as late:
        assert late.dependencies_failed == ("dep-b",)
    finished(log, "late-b")
    assert "dependency failed: dep-b" in log.for_task("late-b")[0].notes


def test_wait_for_wakes_when_the_dependency_finishes(manual: Any) -> None:
    """op.wait_for waits (claiming waiting) and returns True when its dependency's final claim goes out."""
    integration, _pulse, log = manual
    integration.start_p2p_operation("slow-dep", "election", 5)
    result: list[bool] = []
    t0 = time.monotonic()

    def waiter() -> None:
        with bb.track_operation("waiter", "wf", beats=BIG) as op:
            result.append(op.wait_for(["slow-dep", "someone-elses"]))

    th = threading.Thread(target=waiter)
    th.start()
    log.wait_for(lambda cs: any(c.task_id == "waiter" and c.state == "waiting" for c in cs))
    assert result == []
    integration.complete_p2p_operation("slow-dep", 3)
    th.join(NEVER)
    assert result == [True]
    assert time.monotonic() - t0 < EARLY
    waiting = [c for c in log.for_task("waiter") if c.state == "waiting"]
    assert {c.notes for c in waiting} == {"P2P wf: waiting for slow-dep (node: node-1)"}


def test_wait_for_raises_the_operations_own_exception_on_budget(manual: Any) -> None:
    """If the budget runs out first, wait_for raises the operation's own BeatBudgetExceeded."""
    integration, _pulse, _log = manual
    integration.start_p2p_operation("never-ends", "election", 5)
    t0 = time.monotonic()
    with pytest.raises(bb.BeatBudgetExceeded) as info, bb.track_operation("impatient", "wf", beats=1) as op:
        op.wait_for(["never-ends"])
    assert info.value.operation_id == "impatient"
    assert SPB - 1e-3 <= time.monotonic() - t0 < EARLY


def test_wait_for_beats_and_unknown_ids(manual: Any) -> None:
    """wait_for(beats=n) returns False after n beats; ids nobody here knows never block."""
    integration, _pulse, _log = manual
    integration.start_p2p_operation("forever", "election", 5)
    with bb.track_operation("bounded-wait", "wf", beats=BIG) as op:
        t0 = time.monotonic()
        assert op.wait_for(["forever"], beats=1) is False
        assert SPB - 1e-3 <= time.monotonic() - t0 < EARLY
        assert op.wait_for(["not-here", "nor-here"]) is True
        assert op.wait_for([]) is True
        with pytest.raises(InvalidArgument, match="ids"):
            op.wait_for("forever")


# -- work progress ---------------------------------------------------------------------------


@pytest.fixture
def manual_clock() -> Iterator[tuple[bb.Integration, ManualPulse, ClaimLog, ManualTime]]:
    """An integration on a manual clock and a manual pulse at 60 BPM (1 s beats, exact maths)."""
    t = ManualTime()
    bus = unique_bus()
    cfg = bb.BackbeatConfig(
        cluster_id="m", agent_id="a", nats_url=f"local://{bus}?pulse=manual", tempo_bpm=60
    )
    integration = bb.Integration(cfg, node_id="n", time_source=t)
    log = ClaimLog()
    integration.on_claim(log)
    pulse = ManualPulse(bus, "m", tempo_bpm=60, handled=HandledBeats(integration))
    with integration:
        pulse.beat(1)
        yield integration, pulse, log, t


def test_report_goes_out_with_the_next_claims_and_projects_the_finish(manual_clock: Any) -> None:
    """op.report: claims carry work_done, details and eta_beats next to the unchanged progress."""
    _integration, pulse, log, t = manual_clock
    with bb.track_operation("reporter", "wf", beats=8, warn_at=None) as op:
        t.advance(2.0)
        pulse.beat(3)
        op.report(done=0.5, details={"items": 10, "of": 20})
        assert op.work_done == 0.5
        pulse.beat(4)
        claim = claim_at(log, "reporter", 4)
        assert (claim.beat_index, claim.progress, claim.work_done) == (4, 0.375, 0.5)
        assert claim.details == {"items": 10, "of": 20}
        assert claim.eta_beats == 1.0  # 2 beats for half the work: 4 in all, 3 passed
        assert claim.to_dict()["details"] == {"items": 10, "of": 20}
    finished(log, "reporter")


def test_projected_overrun_is_claimed_at_once_and_calls_back(manual_clock: Any) -> None:
    """A projection past the budget, with time left, is claimed at once and calls on_warning, once."""
    integration, _pulse, log, t = manual_clock
    calls: list[float] = []
    called = threading.Event()

    def on_warning(op: bb.Tracker, fraction: float) -> None:
        calls.append(fraction)
        called.set()

    with bb.track_operation("overrun", "wf", beats=4, warn_at=None, on_warning=on_warning) as op:
        t.advance(1.3)
        op.report(0.2)
        warned = claim_with(log, "overrun", "projected")
        assert (
            warned.notes == "beat budget warning: projected 6.5 beats, budget 4, 2.70 beats left (type: wf)"
        )
        assert called.wait(NEVER)
        op.report(0.25)  # still over: warned already
        t.advance(0.1)
    finished(log, "overrun")
    assert calls == [pytest.approx(6.5 / 4)]
    assert integration.get_health()["budget_warnings"] == 1
    assert sum("projected" in c.notes for c in log.for_task("overrun")) == 1


def test_no_warning_when_the_projection_fits(manual_clock: Any) -> None:
    """A projection within the budget, or a report once the work is done, claims no warning."""
    integration, _pulse, log, t = manual_clock
    with bb.track_operation("fits", "wf", beats=4, warn_at=None) as op:
        t.advance(1.0)
        op.report(0.5)
        op.report(1.0)
    finished(log, "fits")
    assert not any("warning" in c.notes for c in log.for_task("fits"))
    assert integration.get_health().get("budget_warnings", 0) == 0


def test_integration_report_progress(manual_clock: Any) -> None:
    """integration.report_progress does the same for a seed-API operation; bad input is refused."""
    integration, pulse, log, t = manual_clock
    integration.start_p2p_operation("p2p-progress", "dht_store", 4)
    t.advance(1.0)
    pulse.beat(2)
    integration.report_progress("p2p-progress", 0.1, {"peers_done": 1})
    claim_with(log, "p2p-progress", "beat budget warning: projected 10.0 beats, budget 4")
    pulse.beat(3)
    claim = claim_at(log, "p2p-progress", 3)
    assert (claim.work_done, claim.details, claim.eta_beats) == (0.1, {"peers_done": 1}, 8.0)
    with pytest.raises(InvalidArgument, match="done"):
        integration.report_progress("p2p-progress", 1.5)
    with pytest.raises(InvalidArgument, match="details"):
        integration.report_progress("p2p-progress", 0.5, {"blob": "x" * 2000})
    with pytest.raises(InvalidArgument, match="details"):
        integration.report_progress("p2p-progress", 0.5, {"obj": object()})
    with pytest.raises(bb.OperationNotFound):
        integration.report_progress("nobody", 0.5)


# -- priorities ------------------------------------------------------------------------------


def test_the_sweep_sends_critical_and_high_first(manual: Any) -> None:
    """Each beat's claims go out critical, high, normal, low (each in start order), whatever the face."""
    integration, pulse, log = manual
    order = ["low", "normal", "critical", "high"] * 3
    for i, priority in enumerate(order):
        integration.start_p2p_operation(f"p-{i}", "t", 50, priority=priority)
    with (
        bb.track_operation("blk-low", "t", beats=BIG, priority="low"),
        bb.track_operation("blk-crit", "t", beats=BIG, priority="critical"),
    ):
        pulse.beat(1)
        claim_at(log, "blk-low", 1)
    sweep = [c for c in log.snapshot() if c.beat_index == 1 and c.state == "executing"]
    sent = [c.priority or "normal" for c in sweep]
    assert sent == ["critical"] * 4 + ["high"] * 3 + ["normal"] * 3 + ["low"] * 4
    assert [c.task_id for c in sweep][:4] == ["p-2", "p-6", "p-10", "blk-crit"]
    assert all(c.to_dict().get("priority") == c.priority for c in sweep)
    assert "priority" not in next(c for c in sweep if c.priority is None).to_dict()  # normal: omitted


def test_priority_is_checked_on_every_face(manual: Any) -> None:
    """An unknown priority is refused by track_operation, @beat_budget and start_p2p_operation."""
    integration, _pulse, _log = manual
    with pytest.raises(InvalidArgument, match="priority"):
        bb.track_operation("x", "t", beats=1, priority="urgent")  # type: ignore[arg-type]
    with pytest.raises(InvalidArgument, match="priority"):
        bb.beat_budget(1, priority="urgent")  # type: ignore[arg-type]
    with pytest.raises(InvalidArgument, match="priority"):
        integration.start_p2p_operation("x", "t", 1, priority="urgent")


def test_decorated_calls_claim_their_priority(manual: Any) -> None:
    """A @beat_budget(priority=...) call running at a beat claims its priority."""
    _integration, pulse, log = manual

    @bb.beat_budget(BIG, name="hot", priority="high")
    def hot() -> None:
        pulse.beat(1)

    hot()
    log.wait_for(lambda cs: any(c.task_id.startswith("hot-") and c.state == "done" for c in cs))
    assert {c.priority for c in log.snapshot() if c.task_id.startswith("hot-")} == {"high"}


def _claim(task: str, priority: str | None, state: str = "executing", beat: int = 1) -> StatusClaim:
    return StatusClaim(
        cluster_id="c",
        agent_id="a",
        node_id="n",
        task_id=task,
        beat_index=beat,
        state=state,
        beats_left=1,
        progress=0.5,
        notes="n",
        sent_at="2026-01-01T00:00:00Z",
        priority=priority,
    )


def test_outbox_coalesces_low_priority_progress_first() -> None:
    """Behind (a low op's last claim still queued), its new claim replaces it at the back; finals stay."""
    box = Outbox(limit=100)
    box.bounded = False  # connected: nothing is bounded, yet the outbox is behind
    box.put("s", _claim("low-1", "low", beat=1))
    box.put("s", _claim("crit-1", "critical", beat=1))
    box.put_many("s", [_claim("crit-1", "critical", beat=2), _claim("low-1", "low", beat=2)])
    box.put("s", _claim("low-1", "low", "done", beat=2))
    box.put("s", _claim("low-1", "low", "done", beat=2))
    assert len(box) == 5
    taken = [(e.claim.task_id, e.claim.beat_index, e.claim.state) for e in box.take(10)]
    assert taken == [
        ("crit-1", 1, "executing"),
        ("crit-1", 2, "executing"),
        ("low-1", 2, "executing"),
        ("low-1", 2, "done"),
        ("low-1", 2, "done"),
    ]
    assert box.coalesced_by_priority == {"critical": 0, "high": 0, "normal": 0, "low": 1}


def test_outbox_stays_small_through_a_long_outage_of_low_operations() -> None:
    """Many beats of one claim per low operation keep one entry each (replaced ones are compacted)."""
    box = Outbox(limit=1_000_000)
    for beat in range(50):
        box.put_many("s", [_claim(f"low-{i}", "low", beat=beat) for i in range(1000)])
    assert len(box) == 1000
    assert len(box._items) < 3000  # compacted, not 50,000 entries
    assert box.coalesced_by_priority["low"] == 49_000
    assert {e.claim.beat_index for e in box.take(2000)} == {49}


# -- the wire ---------------------------------------------------------------------------------


def test_workflow_fields_round_trip_and_are_checked() -> None:
    """The optional fields encode, parse back equal, and a wrong type is rejected naming the field."""
    f = ClaimFactory("c", "a", "n", ManualTime(wall=1_790_000_000.0))
    flow = Flow(
        correlation_id="root",
        parent_id="mid",
        priority="critical",
        depends_on=("x", "y"),
        work_done=0.5,
        details={"k": [1, 2]},
        projected=4.0,
    )
    op = P2POperation("leaf", "wf", 100, 6, OperationPhase.EXECUTING, 2, flow=flow)
    claim = f.for_operation(op, 101)
    d = claim.to_dict()
    assert {k: d[k] for k in ("parent_id", "correlation_id", "depends_on", "priority", "work_done")} == {
        "parent_id": "mid",
        "correlation_id": "root",
        "depends_on": ["x", "y"],
        "priority": "critical",
        "work_done": 0.5,
    }
    assert (d["details"], d["eta_beats"]) == ({"k": [1, 2]}, 3.0)
    assert StatusClaim.parse(claim.encode()) == claim
    for field, bad in [
        ("priority", "urgent"),
        ("work_done", 1.5),
        ("eta_beats", -1),
        ("details", [1]),
        ("depends_on", "x"),
        ("parent_id", 3),
    ]:
        with pytest.raises(bb.ProtocolError, match=field):
            StatusClaim.from_dict({**d, field: bad})


# -- the monitor ------------------------------------------------------------------------------


def test_monitor_shows_workflows_as_trees(manual: Any) -> None:
    """The cluster view orders tasks as trees (children under parents), shows what waits on what,
    priorities and reported work; a large workflow collapses to its root and one line of counts."""
    import io

    from rich.console import Console

    from backbeat_sync.cli import ClusterView, render_view
    from backbeat_sync.cli._render import tree_rows

    integration, pulse, _log = manual
    view = ClusterView()
    integration.on_claim(view.claim)
    integration.start_p2p_operation("elect", "election", 50, priority="critical")
    integration.start_p2p_operation("solo", "dht_store", 50)
    integration.start_p2p_operation("big", "bulk", 50)  # outside any block: a root
    for i in range(11):
        integration.start_p2p_operation(f"big-{i}", "bulk", 50, correlation_id="big", parent_id="big")
    with (
        bb.track_operation("wf", "workflow", beats=BIG) as root,
        bb.track_operation("wf-a", "step", beats=BIG, depends_on=["elect"]),
    ):
        integration.start_p2p_operation("wf-a-1", "dht_store", 50)
        with bb.track_operation("wf-b", "step", beats=BIG) as b:
            b.report(0.5, {"items": 3})
            pulse.beat(1)
            # the view is fed on the callback thread: wait until it has the last claim of the sweep
            wait_until(
                lambda: any(t["task_id"] == "wf-b" and t["last_beat"] == 1 for t in view.snapshot()["tasks"]),
                what="the view to take in beat 1",
            )
            snap = view.snapshot()
    assert root.correlation_id == "wf"
    rows = [(t["task_id"], t["depth"]) for t in snap["tasks"]]
    assert rows[:5] == [("big", 0), ("big-0", 1), ("big-1", 1), ("big-2", 1), ("big-3", 1)]  # natural order
    assert rows[12:] == [("elect", 0), ("solo", 0), ("wf", 0), ("wf-a", 1), ("wf-a-1", 2), ("wf-b", 2)]
    by_id = {t["task_id"]: t for t in snap["tasks"]}
    assert (by_id["wf-a"]["state"], by_id["wf-a"]["depends_on"]) == ("waiting", ["elect"])
    assert by_id["elect"]["priority"] == "critical"
    workflows = {w["correlation_id"]: w for w in snap["workflows"]}
    assert workflows["wf"]["operations"] == 4
    assert workflows["wf"]["waiting"] == ["wf-a"]
    assert workflows["big"]["operations"] == 12
    assert "solo" not in workflows  # alone: not a workflow
    collapsed = [r["collapsed"] for r in tree_rows(snap) if "collapsed" in r]
    assert collapsed == [
        {"correlation_id": "big", "operations": 11, "agents": ["agent-1"], "states": {"executing": 11}}
    ]
    console = Console(file=io.StringIO(), force_terminal=True, width=220, color_system=None)
    console.print(render_view(snap, title="T"))
    text = console.file.getvalue()  # type: ignore[attr-defined]
    for needle in (
        "elect [critical]",
        "└ wf-a",
        "  └ wf-a-1",
        "waiting for elect",
        "work 50% eta",
        "└ … 11 more",
        "in workflow big on agent-1: 11 executing",
    ):
        assert needle in text, text
    assert "big-3" not in text
