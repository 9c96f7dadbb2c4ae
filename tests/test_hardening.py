"""Shapes real services take that used to break the library (issue 10), each tested at its cause.

Tests that could hang run their scenario in a subprocess with a timeout, so a
hang is a failure, not a stuck suite.
"""

from __future__ import annotations

import asyncio
import re
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from loguru import logger as loguru_logger

from backbeat_sync import (
    BackbeatConfig,
    BeatClock,
    BeatFrame,
    BudgetOnEventLoop,
    Integration,
    IntegrationAlreadyStarted,
    IntegrationNotStarted,
    InvalidArgument,
    ManualTime,
    beat_budget,
    track_operation,
)
from backbeat_sync.budget import execute_with_beat_budget
from backbeat_sync.clock import Observation
from backbeat_sync.protocol import parse_beat_frame
from backbeat_sync.pulse import wall_clock_start_index

from .support import manual_integration, unique_bus, wait_until

TIMEOUT = 60.0


def run_child(code: str, timeout: float = TIMEOUT) -> str:
    """Run ``code`` in a fresh interpreter; return its stdout (fails on a hang or a non-zero exit)."""
    try:
        done = subprocess.run(
            [sys.executable, "-c", textwrap.dedent(code)],
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"the child hung for {timeout:g} s:\n{exc.stdout}\n{exc.stderr}")
    assert done.returncode == 0, f"exit {done.returncode}\n{done.stdout}\n{done.stderr}"
    return done.stdout


CHILD_HEAD = """
    import time
    from loguru import logger
    logger.remove()
    import backbeat_sync as bb
    cfg = bb.BackbeatConfig(cluster_id="r", agent_id="a", nats_url="local://hardening", tempo_bpm=600)
    integ = bb.Integration(cfg, node_id="n1")
    integ.start()

    @bb.beat_budget(2, integration=integ)
    def spin():
        while True:  # only an interrupt ends this
            pass

    def interrupted():
        try:
            spin()
        except bb.BeatBudgetExceeded as exc:
            return exc.beats_used
        raise AssertionError("spin() returned")
"""


# -- item 3: a RecursionError through nested budgets -------------------------------------


def test_recursion_error_through_nested_decorated_budgets_leaves_later_budgets_working() -> None:
    """``walk(5000)`` of a ``@beat_budget`` function hits the recursion limit; later budgets interrupt."""
    out = run_child(
        CHILD_HEAD
        + """
    @bb.beat_budget(100, integration=integ)
    def walk(n):
        return walk(n - 1)

    for attempt in range(3):
        try:
            walk(5000)
        except RecursionError:
            pass
        print("interrupted after", interrupted())
    print("active", integ.get_health()["active_operations"])
    integ.stop()
    """
    )
    assert out.count("interrupted after") == 3
    assert "active 0" in out


def test_recursion_error_through_nested_blocks_fails_their_operations() -> None:
    """The same through ``track_operation`` blocks: their operations end (none stays active), budgets work."""
    out = run_child(
        CHILD_HEAD
        + """
    def walk(n, attempt):
        with bb.track_operation(f"w-{attempt}-{n}", "walk", beats=100, integration=integ):
            return walk(n - 1, attempt)

    finals = {}
    integ.on_claim(lambda c: finals.__setitem__(c.task_id, c.state))
    for attempt in range(3):
        try:
            walk(5000, attempt)
        except RecursionError:
            pass
        print("interrupted after", interrupted())
    print("active", integ.get_health()["active_operations"])
    integ.stop()
    walks = {k: v for k, v in finals.items() if k.startswith("w-")}
    print("walk claims", len(walks), "not final", sum(v not in ("done", "failed") for v in walks.values()))
    """
    )
    assert out.count("interrupted after") == 3
    assert "active 0" in out
    assert " not final 0" in out


def test_recursion_error_caught_inside_an_outer_budget() -> None:
    """Caught inside an outer budgeted call, the rest of that call and later calls are still budgeted."""
    out = run_child(
        CHILD_HEAD
        + """
    @bb.beat_budget(100, integration=integ)
    def walk(n):
        return walk(n - 1)

    @bb.beat_budget(500, integration=integ)
    def outer():
        try:
            walk(5000)
        except RecursionError:
            pass
        return interrupted()

    print("inside", outer())
    print("after", interrupted())
    integ.stop()
    """
    )
    assert "inside" in out
    assert "after" in out


# -- item 4: a forward jump of the beat index ------------------------------------------------


def _frame(index: int, tempo: float = 60.0, bar: int = 4) -> BeatFrame:
    return BeatFrame(
        cluster_id="c",
        beat_index=index,
        downbeat=index % bar == 0,
        phase="upbeat",
        tempo_bpm=tempo,
        window_id=f"w-{index // bar}",
        bar_length=bar,
    )


def test_clock_treats_a_jump_beyond_elapsed_time_as_a_forward_reset() -> None:
    """A frame 10**6 ahead one second later is a JUMP: re-anchored, budget position continuous."""
    t = ManualTime()
    clock = BeatClock(tempo_bpm=60, bar_length=4, time_source=t)
    clock.observe(_frame(10))
    t.advance(1.0)
    assert clock.observe(_frame(11)).observation is Observation.NEXT
    t.advance(1.0)
    before = clock.budget_position()
    result = clock.observe(_frame(12 + 10**6))
    assert result.observation is Observation.JUMP
    assert result.shift == 10**6 + 1
    assert result.excess == pytest.approx(10**6)
    assert clock.current_beat == 12 + 10**6
    assert clock.budget_position() == pytest.approx(before)
    snap = clock.snapshot()
    assert (snap.resets, snap.missed_beats) == (1, 0)
    t.advance(1.0)
    assert clock.observe(_frame(13 + 10**6)).observation is Observation.NEXT
    assert clock.budget_position() == pytest.approx(before + 1.0)


def test_clock_gap_explained_by_elapsed_time_is_still_a_gap() -> None:
    """Up to one bar beyond what the silence explains is a gap (missed beats); one more beat is a jump."""
    t = ManualTime()
    clock = BeatClock(tempo_bpm=60, bar_length=4, time_source=t)
    clock.observe(_frame(100))
    t.advance(10.0)  # ten beats of silence at 60 BPM
    result = clock.observe(_frame(110 + 4))  # elapsed (10) plus exactly one bar (4)
    assert result.observation is Observation.GAP
    assert result.missed == 13
    t.advance(1.0)
    assert clock.observe(_frame(115 + 4 + 1)).observation is Observation.JUMP


def test_clock_pulse_restarted_at_another_tempo_jumps_forward() -> None:
    """A pulse restarted at 1200 BPM starts at its wall-clock index: a JUMP, and the new tempo is taken."""
    t = ManualTime()
    clock = BeatClock(tempo_bpm=600, bar_length=4, time_source=t)
    clock.observe(_frame(5, tempo=600))
    t.advance(0.1)
    before = clock.budget_position()
    result = clock.observe(_frame(wall_clock_start_index(1200, t.time()), tempo=1200))
    assert result.observation is Observation.JUMP
    assert clock.tempo_bpm == 1200
    assert clock.budget_position() == pytest.approx(before)
    t.advance(0.5)  # 10 beats at the new tempo
    assert clock.budget_position() == pytest.approx(before + 10.0)


@pytest.mark.parametrize("jump", ["stray_frame", "pulse_restart"])
def test_budget_does_not_fire_on_a_forward_jump(jump: str) -> None:
    """A 30-beat budget at 600 BPM (3 s) is not spent 0.5 s after the index jumps; the jump is in errors."""
    with manual_integration(tempo_bpm=600) as (integration, pulse, log):
        for i in range(4):
            pulse.beat(i)
        with track_operation("long-op", "dht_store", beats=30, integration=integration) as op:
            pulse.beat(3 + 10**6)  # one bad frame way ahead ...
            if jump == "pulse_restart":  # ... or a new pulse, at another tempo, on its wall-clock index
                pulse.tempo_bpm = 1200
                pulse.beat(wall_clock_start_index(1200, time.time()))
            op.sleep(0.5)  # raises BeatBudgetExceeded if the jump spent the budget
            used = op.beats_used
        assert used < 30
        health = integration.get_health()
        assert any(e.startswith("pulse reset forward") for e in health["errors"]), health["errors"]
        assert health["pulse_resets"] >= 1
        assert health["missed_beats"] == 0
        log.wait_for(lambda cs: any(c.task_id == "long-op" and c.state == "done" for c in cs))


def test_decorated_budget_survives_a_forward_jump() -> None:
    """The same for ``@beat_budget``: the call returns, it is not interrupted."""
    with manual_integration(tempo_bpm=600) as (integration, pulse, _log):
        for i in range(4):
            pulse.beat(i)

        @beat_budget(30, integration=integration)
        def work() -> str:
            pulse.beat(3 + 10**6)
            deadline = time.monotonic() + 0.5
            while time.monotonic() < deadline:  # busy: an interrupt would land here
                pass
            return "ok"

        assert work() == "ok"


# -- item 10: what cannot be budgeted is refused ------------------------------------------------


async def _coroutine_fn() -> int:
    return 1


def test_execute_with_beat_budget_refuses_async_like_the_decorator() -> None:
    """The same TypeError as ``@beat_budget``, before anything runs (no un-awaited coroutine)."""
    with pytest.raises(TypeError) as decorated:
        beat_budget(3)(_coroutine_fn)
    with manual_integration() as (integration, _pulse, _log), pytest.raises(TypeError) as executed:
        integration.execute_with_beat_budget(3, _coroutine_fn)
    assert type(executed.value) is type(decorated.value)
    assert str(executed.value).split(" cannot ")[1] == str(decorated.value).split(" cannot ")[1]

    def gen() -> object:
        yield 1

    with pytest.raises(TypeError, match="generator function"):
        Integration.execute_with_beat_budget(Integration(BackbeatConfig(), "n"), 3, gen)


def test_track_operation_on_a_running_event_loop_is_refused() -> None:
    """Inside a coroutine: BudgetOnEventLoop naming asyncio.to_thread; in a thread via to_thread it works."""

    def blocking() -> str:
        with track_operation("in-thread", "dht_store", beats=30, integration=integration):
            return "ok"

    async def main() -> str:
        with (
            pytest.raises(BudgetOnEventLoop, match=r"asyncio\.to_thread") as refused,
            track_operation("on-loop", "dht_store", beats=30, integration=integration),
        ):
            pass
        assert refused.value.operation_id == "on-loop"
        return await asyncio.to_thread(blocking)

    with manual_integration() as (integration, _pulse, log):
        assert asyncio.run(main()) == "ok"
        assert integration.get_health()["active_operations"] == 0
        log.wait_for(lambda cs: any(c.task_id == "in-thread" and c.state == "done" for c in cs))
        assert not any(c.task_id == "on-loop" for c in log.snapshot())


# -- item 11: refusals that name the mistake -------------------------------------------------------


@pytest.mark.parametrize("wrong", ["nope", BackbeatConfig()])
def test_integration_argument_is_checked_where_it_is_given(wrong: object) -> None:
    """Not an Integration: InvalidArgument at decoration (and from track_operation, execute_...)."""
    with pytest.raises(InvalidArgument, match="integration=") as exc:
        beat_budget(3, integration=wrong)  # type: ignore[arg-type]
    assert exc.value.name == "integration"
    with pytest.raises(InvalidArgument, match="must be an Integration"):
        track_operation("op", "t", beats=3, integration=wrong)  # type: ignore[arg-type]
    with pytest.raises(InvalidArgument, match="must be an Integration"):
        execute_with_beat_budget(wrong, 3, lambda: None)  # type: ignore[arg-type]


def test_start_after_stop_says_create_a_new_integration() -> None:
    """A stopped integration does not start again, and says what to do instead."""
    with manual_integration() as (integration, _pulse, _log):
        pass
    with pytest.raises(IntegrationAlreadyStarted, match="stopped; create a new Integration"):
        integration.start()


def test_operation_calls_before_start_raise_not_started() -> None:
    """Before start(): update/complete/fail raise IntegrationNotStarted, not OperationNotFound."""
    integration = Integration(BackbeatConfig(nats_url=f"local://{unique_bus()}"), node_id="n1")
    with pytest.raises(IntegrationNotStarted, match="start"):
        integration.update_p2p_operation_phase("op", "executing", 1)
    with pytest.raises(IntegrationNotStarted, match="start"):
        integration.complete_p2p_operation("op", 1)
    with pytest.raises(IntegrationNotStarted, match="start"):
        integration.fail_p2p_operation("op", "why")


# -- item 14: every line reaches the logger the user gave ------------------------------------------


class RecordingLogger:
    """The seed's logger interface, recording (level, message)."""

    def __init__(self) -> None:
        self.lines: list[tuple[str, str]] = []
        self._lock = threading.Lock()

    def _add(self, level: str, msg: str) -> None:
        with self._lock:
            self.lines.append((level, msg))

    def info(self, msg: str) -> None:
        self._add("info", msg)

    def warn(self, msg: str) -> None:
        self._add("warn", msg)

    def error(self, msg: str) -> None:
        self._add("error", msg)

    def text(self) -> str:
        with self._lock:
            return "\n".join(m for _, m in self.lines)


@pytest.fixture
def loguru_lines() -> Iterator[list[str]]:
    """Lines the library writes to loguru meanwhile (it is enabled for the test)."""
    lines: list[str] = []
    sink = loguru_logger.add(lambda m: lines.append(str(m)), level="DEBUG", filter="backbeat_sync")
    loguru_logger.enable("backbeat_sync")
    try:
        yield lines
    finally:
        loguru_logger.disable("backbeat_sync")
        loguru_logger.remove(sink)


def test_on_warning_traceback_reaches_the_user_logger(loguru_lines: list[str]) -> None:
    """A raising on_warning callback: its traceback goes to logger=, nothing to loguru; errors names it."""
    user = RecordingLogger()
    cfg = BackbeatConfig(
        cluster_id="test", agent_id="logs", nats_url=f"local://{unique_bus()}", tempo_bpm=1200
    )
    called = threading.Event()

    def on_warning(tracker: object, fraction: float) -> None:
        called.set()
        raise ZeroDivisionError("callback bug")

    with Integration(cfg, node_id="n1", logger=user) as integration:
        with track_operation(
            "warned", "t", beats=200, warn_at=(0.01,), integration=integration, on_warning=on_warning
        ) as op:
            assert called.wait(30)
            wait_until(lambda: "callback bug" in user.text(), what="the traceback at the user logger")
            op.check()
        errors = integration.get_health()["errors"]
    text = user.text()
    assert "BACKBEAT budget on_warning callback raised" in text
    assert "Traceback (most recent call last)" in text
    assert "ZeroDivisionError: callback bug" in text
    assert any("on_warning callback of warned raised ZeroDivisionError: callback bug" in e for e in errors), (
        errors
    )
    assert loguru_lines == []


def test_fallback_line_goes_to_the_named_integrations_logger() -> None:
    """A budget naming an integration that is not started says so through that integration's logger."""
    out = run_child(
        """
        from loguru import logger
        lines = []
        logger.add(lambda m: lines.append(str(m)), filter="backbeat_sync")
        logger.enable("backbeat_sync")
        import backbeat_sync as bb

        class Log:
            def __init__(self): self.lines = []
            def info(self, m): self.lines.append(m)
            def warn(self, m): self.lines.append(m)
            def error(self, m): self.lines.append(m)

        user = Log()
        integ = bb.Integration(bb.BackbeatConfig(nats_url="local://fallback"), node_id="n1", logger=user)

        @bb.beat_budget(3, integration=integ)
        def f():
            return 1

        assert f() == 1
        print("user:", user.lines)
        print("loguru:", len(lines))
        """
    )
    assert "runs without a beat budget" in out
    assert "loguru: 0" in out


# -- item 13: a junk flood on the beat subject --------------------------------------------------------


def test_junk_flood_is_one_errors_entry_and_keeps_real_errors() -> None:
    """10,000 bad frames of five kinds: one aggregated entry; the real error before them is still there."""

    def broken(frame: BeatFrame) -> None:
        raise RuntimeError("real problem")

    junk = [
        b"\xff\xfe garbage",
        b"not json at all",
        b'{"type": "backbeat.beatframe.v1", "beat_index": "x"}',
        b"[" * 5000 + b"]" * 5000,
        b'{"type": "other", "pad": "' + b"y" * 60_000 + b'"}',
    ]
    with manual_integration() as (integration, pulse, _log):
        integration.on_beat(broken)
        pulse.beat(1)
        wait_until(lambda: any("real problem" in e for e in integration.get_health()["errors"]))
        for n in range(10_000):
            pulse.raw(junk[n % len(junk)])
        pulse.beat(2)  # the beat goes on
        health = integration.get_health()
    assert health["rejected_frames"] == 10_000
    errors = health["errors"]
    assert any("real problem" in e for e in errors), errors
    [entry] = [e for e in errors if e.startswith("rejected beat frame")]
    assert "(10,000 malformed frames since " in entry
    assert errors[-1] == entry or "real problem" in errors[-1]
    assert health["current_beat"] == 2


@pytest.mark.parametrize(
    "spelling",
    [
        b'"backbeat.beatframe.v1"',
        b'"\\u0062ackbeat.beatframe.v1"',  # an escape: the screen cannot tell, the decoder does
    ],
)
def test_screening_keeps_every_valid_large_frame(spelling: bytes) -> None:
    """A valid frame over 1 KiB (padding, leading whitespace, escapes) still parses."""
    body = _frame(7).encode().replace(b'"backbeat.beatframe.v1"', spelling)
    padded = b" \n" + body[:-1] + b',"padding":"' + b"x" * 3000 + b'"}'
    assert parse_beat_frame(padded).beat_index == 7


# -- item 15: the cleanup pattern in docs/budgets.md runs --------------------------------------------


def test_budgets_page_cleanup_snippet_runs() -> None:
    """The runnable ``python`` blocks of "Cleanup inside a budget" (docs/budgets.md) run as they are."""
    text = (Path(__file__).resolve().parent.parent / "docs" / "budgets.md").read_text(encoding="utf-8")
    section = text.split("### Cleanup inside a budget", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"^```python\n(.*?)^```", section, re.S | re.M)
    assert len(blocks) == 1
    exec(compile(blocks[0], "docs/budgets.md[cleanup]", "exec"), {"__name__": "__docs__"})
