"""Budget maths on a ManualTime source: no sleeps, exact figures (issue 11: the TimeSource
reaches the budget engine, the watchdog and the rate-limited log)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import pytest

import backbeat_sync as bb
from backbeat_sync._logging import RateLimitedLog
from backbeat_sync._runtime import WATCHDOG

from .support import PATIENCE, ClaimLog, ManualPulse, unique_bus, wait_until


@pytest.fixture
def manual() -> Iterator[tuple[bb.Integration, bb.ManualTime, ManualPulse, ClaimLog]]:
    """A started integration at 60 BPM whose every clock reading is a ManualTime."""
    t = bb.ManualTime()
    bus = unique_bus()
    cfg = bb.BackbeatConfig(cluster_id="test", nats_url=f"local://{bus}?pulse=manual", tempo_bpm=60)
    integration = bb.Integration(cfg, node_id="n", time_source=t)
    log = ClaimLog()
    integration.on_claim(log)
    with integration:
        yield integration, t, ManualPulse(bus, "test", tempo_bpm=60), log


def test_block_figures_follow_manual_time_exactly(manual: Any) -> None:
    """beats_used, beats_left, progress, spent and the exception's figures, to the beat."""
    _integration, t, _pulse, _log = manual
    with bb.track_operation("m-1", "t", beats=4, warn_at=None, on_exhaust="warn") as op:
        assert op.beats_used == 0.0
        t.advance(1.5)
        assert (op.beats_used, op.beats_left, op.progress, op.spent) == (1.5, 2.5, 0.375, False)
        t.advance(2.5)
        assert (op.beats_used, op.beats_left, op.progress, op.spent) == (4.0, 0.0, 1.0, True)
        t.advance(0.5)
        with pytest.raises(bb.BeatBudgetExceeded) as info:
            op.check()
    exc = info.value
    assert (exc.budget_beats, exc.beats_used, exc.beats_over, exc.late) == (4.0, 4.5, 0.5, False)


def test_a_tempo_change_stretches_the_budget(manual: Any) -> None:
    """At twice the tempo, the same seconds are twice the beats (the budget counts beats)."""
    integration, t, pulse, _log = manual
    pulse.beat(10)
    integration.wait_for_beat(PATIENCE)
    with bb.track_operation("m-2", "t", beats=8, warn_at=None, on_exhaust="warn") as op:
        t.advance(1.0)
        assert op.beats_used == 1.0
        pulse.beat(11, tempo_bpm=120)  # the clock re-anchors on beat 11, at 120 BPM
        wait_until(lambda: integration.clock.tempo_bpm == 120.0, what="the new tempo")
        t.advance(1.0)
        assert op.beats_used == 3.0


def test_the_watchdog_fires_warnings_at_the_clocks_manual_time(manual: Any) -> None:
    """The watchdog reads the budget's clock: a warning and a warn-only exhaustion are claimed
    when manual time passes them, with figures exact to the hundredth of a beat."""
    integration, t, _pulse, log = manual
    warned = threading.Event()
    with bb.track_operation(
        "m-3", "t", beats=2, warn_at=(0.5,), on_exhaust="warn", on_warning=lambda *_: warned.set()
    ) as op:
        t.advance(1.0)
        WATCHDOG.notify()
        assert warned.wait(PATIENCE)
        t.advance(1.5)
        WATCHDOG.notify()
        wait_until(lambda: op.exhausted, what="the exhaustion")
    warning = "beat budget warning: 50% of 2 beats used, 1.00 beats left (type: t)"
    exceeded = "beat budget exceeded: used 2.50 of 2 beats (warn only)"

    def notes() -> list[str]:
        return [c.notes for c in log.for_task("m-3")]

    # The claims reach ``log`` through the callback thread: wait for them, then read them.
    wait_until(lambda: warning in notes() and exceeded in notes(), what="both claims at on_claim")
    assert integration.get_health()["budget_exhausted_warn"] == 1


def test_rate_limited_log_reads_its_time_source() -> None:
    """The first line of a burst goes out at once; the next only an interval later, with a count."""
    t = bb.ManualTime(start=0.0)
    lines: list[str] = []

    class Sink:
        def warn(self, msg: str) -> None:
            lines.append(msg)

    log = RateLimitedLog(Sink(), interval=5.0, time_source=t)  # type: ignore[arg-type]
    log.warn("gap", "first")
    log.warn("gap", "second")
    t.advance(4.999)
    log.warn("gap", "third")
    t.advance(0.001)
    log.warn("gap", "fourth")
    assert lines == ["first", "fourth (+2 more since the last report)"]
