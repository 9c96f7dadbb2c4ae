"""Tests for backbeat_sync.clock: the beat clock's maths, on a manual time source (no sleeps)."""

from __future__ import annotations

import pytest
from freezegun import freeze_time

from backbeat_sync import BeatClock, BeatFrame, ManualTime
from backbeat_sync.clock import Observation, drift_class


def frame(index: int, tempo: float = 60.0, bar: int = 4) -> BeatFrame:
    return BeatFrame(
        cluster_id="c",
        beat_index=index,
        downbeat=index % bar == 0,
        phase="upbeat",
        tempo_bpm=tempo,
        window_id=f"w-{index // bar}",
        bar_length=bar,
    )


@pytest.fixture
def t() -> ManualTime:
    return ManualTime()


@pytest.fixture
def clock(t: ManualTime) -> BeatClock:
    return BeatClock(tempo_bpm=60, bar_length=4, time_source=t)


def test_position_extrapolates_between_frames(clock: BeatClock, t: ManualTime) -> None:
    """position = last_index + (now - last_arrival) / beat_duration."""
    assert clock.observe(frame(100)).observation is Observation.FIRST
    assert clock.position() == 100.0
    t.advance(0.25)
    assert clock.position() == pytest.approx(100.25)
    t.advance(2.0)  # silent pulse: keeps counting
    assert clock.position() == pytest.approx(102.25)
    assert clock.current_beat == 100


def test_frame_snaps_position(clock: BeatClock, t: ManualTime) -> None:
    """A frame snaps the position to its index, even when it arrives late."""
    clock.observe(frame(100))
    t.advance(1.3)
    assert clock.observe(frame(101)).observation is Observation.NEXT
    assert clock.position() == 101.0
    assert clock.current_beat == 101


def test_stale_and_duplicate_frames_are_ignored(clock: BeatClock, t: ManualTime) -> None:
    """A frame at or below the last index does not move the clock, and is counted."""
    clock.observe(frame(100))
    t.advance(1)
    clock.observe(frame(101))
    assert clock.observe(frame(101)).observation is Observation.DUPLICATE
    assert clock.observe(frame(99)).observation is Observation.STALE
    assert clock.current_beat == 101
    snap = clock.snapshot()
    assert (snap.duplicate_frames, snap.stale_frames) == (1, 1)


def test_gap_is_recorded_and_degrades_the_bar(clock: BeatClock, t: ManualTime) -> None:
    """A jump of more than one index is a gap: counted, and 'missed in current bar' until the bar ends."""
    clock.observe(frame(100))
    t.advance(3)
    result = clock.observe(frame(103))
    assert result.observation is Observation.GAP
    assert result.missed == 2
    snap = clock.snapshot()
    assert snap.missed_beats == 2
    assert snap.missed_in_current_bar
    t.advance(1)
    clock.observe(frame(104))  # next bar
    assert not clock.snapshot().missed_in_current_bar


def test_measured_bpm_and_drift(clock: BeatClock, t: ManualTime) -> None:
    """Measured BPM comes from the last 8 arrivals; drift is unknown until two frames."""
    clock.observe(frame(0))
    snap = clock.snapshot()
    assert (snap.measured_bpm, snap.tempo_drift) == (0.0, "unknown")
    for i in range(1, 12):
        t.advance(1.1)  # 10 % slow: 54.5 BPM measured against 60
        clock.observe(frame(i))
    snap = clock.snapshot()
    assert snap.measured_bpm == pytest.approx(60 / 1.1)
    assert snap.tempo_drift == "warning"


def test_measured_bpm_counts_missed_beats(clock: BeatClock, t: ManualTime) -> None:
    """Index differences, not frame counts, give the measured tempo across gaps."""
    clock.observe(frame(0))
    t.advance(3.0)
    clock.observe(frame(3))
    assert clock.snapshot().measured_bpm == pytest.approx(60.0)


@pytest.mark.parametrize(
    ("measured", "expected"),
    [
        (60.0, "acceptable"),
        (63.0, "acceptable"),
        (57.0, "acceptable"),
        (66.0, "warning"),
        (48.0, "warning"),
        (72.1, "critical"),
        (30.0, "critical"),
    ],
)
def test_drift_classes(measured: float, expected: str) -> None:
    """d <= 5 % acceptable, <= 20 % warning, above critical."""
    assert drift_class(measured, 60.0, samples=8) == expected
    assert drift_class(measured, 60.0, samples=1) == "unknown"


def test_tempo_change_is_followed(clock: BeatClock, t: ManualTime) -> None:
    """A frame with a new tempo changes the beat duration and restarts the measurement."""
    clock.observe(frame(0, tempo=60))
    t.advance(1)
    result = clock.observe(frame(1, tempo=120))
    assert result.tempo_changed
    assert clock.tempo_bpm == 120.0
    assert clock.beat_duration == 0.5
    t.advance(0.25)
    assert clock.position() == pytest.approx(1.5)
    t.advance(0.25)
    clock.observe(frame(2, tempo=120))
    snap = clock.snapshot()
    assert snap.measured_bpm == pytest.approx(120.0)
    assert snap.tempo_drift == "acceptable"


def test_budget_position_is_continuous_at_lock_on(clock: BeatClock, t: ManualTime) -> None:
    """Locking onto a pulse at index 5000 does not make budget_position jump."""
    t.advance(0.5)
    before = clock.budget_position()
    assert before == pytest.approx(0.5)
    clock.observe(frame(5000))
    assert clock.budget_position() == pytest.approx(before)
    assert clock.position() == 5000.0
    t.advance(1.0)
    assert clock.budget_position() == pytest.approx(before + 1.0)


def test_seconds_until_follows_tempo(clock: BeatClock, t: ManualTime) -> None:
    """seconds_until converts a budget position to seconds at the current tempo."""
    clock.observe(frame(10, tempo=60))
    target = clock.budget_position() + 2
    assert clock.seconds_until(target) == pytest.approx(2.0)
    t.advance(0.5)
    clock.observe(frame(11, tempo=120))  # snaps forward by 0.5 beat and doubles the tempo
    assert clock.seconds_until(target) == pytest.approx(0.5)


def test_pulse_reset_after_a_bar_of_live_stale_frames(clock: BeatClock, t: ManualTime) -> None:
    """A restarted pulse (lower indexes, at the tempo) is followed after a full bar of stale frames."""
    clock.observe(frame(1000))
    budget = clock.budget_position()
    for i in range(3):
        t.advance(1)
        assert clock.observe(frame(10 + i)).observation is Observation.STALE
    t.advance(1)
    result = clock.observe(frame(13))
    assert result.observation is Observation.RESET
    assert clock.current_beat == 13
    assert clock.snapshot().resets == 1
    assert clock.budget_position() == pytest.approx(budget + 4)  # budgets never jump
    t.advance(1)
    assert clock.observe(frame(14)).observation is Observation.NEXT


def test_replayed_burst_does_not_reset(clock: BeatClock, t: ManualTime) -> None:
    """Stale frames faster than the tempo (a replayed burst) never resynchronise the clock."""
    clock.observe(frame(1000))
    for i in range(20):
        t.advance(0.01)
        clock.observe(frame(10 + i))
    assert clock.current_beat == 1000
    assert clock.snapshot().resets == 0


def test_silence_is_measured(clock: BeatClock, t: ManualTime) -> None:
    """seconds_since_frame grows while the pulse is silent."""
    clock.observe(frame(1))
    t.advance(2.5)
    assert clock.snapshot().seconds_since_frame == pytest.approx(2.5)


def test_works_under_freezegun() -> None:
    """With the system time source, freezegun's tick moves the clock (time is read at each call)."""
    with freeze_time("2026-11-28 01:00:00") as frozen:
        clock = BeatClock(tempo_bpm=60, bar_length=4)
        clock.observe(frame(7))
        frozen.tick(1.5)
        assert clock.position() == pytest.approx(8.5)
