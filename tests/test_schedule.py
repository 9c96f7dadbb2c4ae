"""Tests for backbeat_sync.pulse.BeatSchedule: drift-free timing and frame contents."""

from __future__ import annotations

import pytest

from backbeat_sync import ConfigError
from backbeat_sync.pulse import BeatSchedule, wall_clock_start_index


def schedule(tempo: float = 60.0, start: int = 100) -> BeatSchedule:
    return BeatSchedule(cluster_id="c", tempo_bpm=tempo, bar_length=4, start_index=start, start_time=50.0)


def test_beats_are_due_on_a_fixed_grid() -> None:
    """Beat k is due at t0 + (k - k0) * 60 / bpm: computed, never accumulated."""
    s = schedule(tempo=120)
    assert s.due(100) == 50.0
    assert s.due(101) == 50.5
    assert s.due(100 + 10_000) == pytest.approx(50.0 + 5000.0)


def test_set_tempo_takes_effect_from_the_next_beat() -> None:
    """A tempo change re-anchors on the last beat sent: the next one comes one new beat later."""
    s = schedule(tempo=60)
    for _ in range(3):
        s.advance()  # beats 100, 101, 102 sent
    s.set_tempo(120)
    assert s.due(103) == pytest.approx(52.5)
    assert s.due(104) == pytest.approx(53.0)
    with pytest.raises(ConfigError, match="tempo_bpm"):
        s.set_tempo(0)


def test_frame_contents() -> None:
    """window_id is w-{index // bar}, downbeat on index % bar == 0, deadline one beat after sent_at."""
    s = schedule(tempo=2)
    f = s.frame(12344, wall_now=1_790_000_000.0)
    assert (f.beat_index, f.downbeat, f.window_id, f.bar_length, f.phase) == (
        12344,
        True,
        "w-3086",
        4,
        "downbeat",
    )
    assert f.tempo_bpm == 2
    assert f.sent_at == "2026-09-21T14:13:20.000Z"
    assert f.deadline_at == "2026-09-21T14:13:50.000Z"
    g = s.frame(12345, wall_now=1_790_000_030.0)
    assert (g.downbeat, g.phase, g.window_id) == (False, "upbeat", "w-3086")


def test_skip_to_jumps_over_beats_long_gone() -> None:
    """After a suspension the schedule skips to the beat due now instead of bursting."""
    s = schedule(tempo=60)
    s.skip_to(60.2)
    assert s.next_index == 110


def test_wall_clock_start_index_never_goes_back() -> None:
    """The default start index grows with the wall clock, so a restarted pulse does not go back."""
    assert wall_clock_start_index(2.0, 1_790_000_000.0) == 59_666_666
    assert wall_clock_start_index(2.0, 1_790_000_030.0) == 59_666_667


@pytest.mark.parametrize(
    ("field", "kwargs"), [("bar_length", {"bar_length": 0}), ("start_index", {"start_index": -1})]
)
def test_bad_schedule_arguments(field: str, kwargs: dict[str, int]) -> None:
    """Bad bar length or start index are refused naming the field."""
    args = {"cluster_id": "c", "tempo_bpm": 60.0, "bar_length": 4, "start_index": 0, "start_time": 0.0}
    args.update(kwargs)
    with pytest.raises(ConfigError, match=field):
        BeatSchedule(**args)  # type: ignore[arg-type]
