"""The beat clock: where the cluster's beat is now, and how well it is keeping time.

Between frames the position advances on the local monotonic clock at the last
known tempo (``position = last_index + (now - last_arrival) / beat_duration``);
a frame snaps it to its index. Budgets read :meth:`BeatClock.budget_position`,
which is the same position shifted so that it never jumps when the clock
first locks onto a pulse or resynchronises after a pulse reset.

All reads are lock-free (one tuple swapped atomically); frames are observed
under a lock.
"""

from __future__ import annotations

import enum
import threading
from collections import deque
from typing import Final

import attrs

from ._time import SYSTEM_TIME, TimeSource
from .protocol import BeatFrame

__all__ = ["BeatClock", "ClockSnapshot", "FrameResult", "Observation", "drift_class"]

MEASURE_WINDOW: Final = 8
ACCEPTABLE_DRIFT: Final = 0.05
WARNING_DRIFT: Final = 0.20


class Observation(enum.Enum):
    """What the clock made of a frame."""

    FIRST = "first"  #: the first frame seen: the clock locks on
    NEXT = "next"  #: the next beat, in order
    GAP = "gap"  #: accepted, but beats were missed before it
    STALE = "stale"  #: index below the last one: ignored
    DUPLICATE = "duplicate"  #: same index as the last one: ignored
    RESET = "reset"  #: a full bar of stale frames from a live pulse: resynchronised
    #: an index further ahead than the time since the last frame explains (by more than a
    #: bar): a pulse restarted at another tempo, or a stray frame; re-anchored on it
    JUMP = "jump"

    @property
    def accepted(self) -> bool:
        """Whether the frame moved the clock (and is a beat to handle)."""
        return self in (
            Observation.FIRST,
            Observation.NEXT,
            Observation.GAP,
            Observation.RESET,
            Observation.JUMP,
        )


@attrs.frozen
class FrameResult:
    """The outcome of :meth:`BeatClock.observe`.

    Attributes:
        observation: what the frame was.
        missed: beats skipped before this frame (GAP only).
        tempo_changed: the frame carried a new tempo.
        shift: with FIRST, RESET and JUMP, how far the index sequence moved (new index
            minus previous index).
        excess: with JUMP, beats beyond what the elapsed time explained.
    """

    observation: Observation
    missed: int = 0
    tempo_changed: bool = False
    shift: int = 0
    excess: float = 0.0


@attrs.frozen
class ClockSnapshot:
    """A consistent view of the clock at one moment (for health and claims)."""

    current_beat: int
    has_beat: bool
    tempo_bpm: float
    bar_length: int
    measured_bpm: float
    tempo_drift: str
    seconds_since_frame: float
    missed_in_current_bar: bool
    missed_beats: int
    stale_frames: int
    duplicate_frames: int
    resets: int
    beats_received: int


def drift_class(measured_bpm: float, tempo_bpm: float, samples: int) -> str:
    """Classify tempo drift as PROTOCOL.md says.

    Args:
        measured_bpm: measured beats per minute.
        tempo_bpm: the tempo the pulse announces.
        samples: frames the measurement is based on (fewer than 2 gives ``"unknown"``).

    Returns:
        ``"unknown"``, ``"acceptable"`` (<= 5 %), ``"warning"`` (<= 20 %) or ``"critical"``.
    """
    if samples < 2 or tempo_bpm <= 0:
        return "unknown"
    d = abs(measured_bpm - tempo_bpm) / tempo_bpm
    if d <= ACCEPTABLE_DRIFT:
        return "acceptable"
    if d <= WARNING_DRIFT:
        return "warning"
    return "critical"


class BeatClock:
    """Follows beat frames and extrapolates between them.

    Args:
        tempo_bpm: tempo assumed until the first frame says otherwise.
        bar_length: beats per bar assumed until the first frame says otherwise.
        time_source: where ``now`` comes from (inject a manual one in tests).

    Example:
        >>> from backbeat_sync._time import ManualTime
        >>> t = ManualTime()
        >>> clock = BeatClock(tempo_bpm=60, bar_length=4, time_source=t)
        >>> _ = clock.observe(BeatFrame(cluster_id="c", beat_index=10, downbeat=False,
        ...                             phase="upbeat", tempo_bpm=60, window_id="w-2"))
        >>> t.advance(0.5)
        >>> clock.position()
        10.5
    """

    def __init__(self, *, tempo_bpm: float, bar_length: int, time_source: TimeSource = SYSTEM_TIME) -> None:
        self._lock = threading.Lock()
        #: The time source this clock reads (read-only).
        self.time_source: Final[TimeSource] = time_source
        now = time_source.monotonic()
        #: ``(anchor_index, anchor_time, seconds_per_beat, budget_offset)``: where the position
        #: is extrapolated from. Read-only: the clock swaps the whole tuple (one store) under its
        #: lock, so a lock-free reader sees one anchor or the next, never a mix. The budget
        #: engine keeps it as a budget's start.
        self.anchor: tuple[float, float, float, float] = (0.0, now, 60.0 / tempo_bpm, 0.0)
        self._tempo = float(tempo_bpm)
        self._bar = bar_length
        #: ``(current_beat, epoch)`` read together (read-only; swapped whole like ``anchor``,
        #: but separately: just after a frame, a reader may see the new anchor with the old
        #: beat for an instant). The epoch grows at lock-on and at each pulse reset, so an
        #: operation can tell which index sequence its start beat belongs to.
        self.beat_and_epoch: tuple[int, int] = (0, 0)
        self._has_beat = False
        self._last_arrival = now
        self._arrivals: deque[tuple[int, float]] = deque(maxlen=MEASURE_WINDOW)
        self._stale_run: list[tuple[int, float]] = []
        self._gap_bar = -1
        self._missed = 0
        self._stale = 0
        self._duplicates = 0
        self._resets = 0
        self._received = 0

    # -- reads (lock-free) ---------------------------------------------------

    def position(self, now: float | None = None) -> float:
        """The beat position (in beat-index units) at ``now``, extrapolated from the last frame."""
        idx, t0, spb, _ = self.anchor
        if now is None:
            now = self.time_source.monotonic()
        return idx + (now - t0) / spb

    def budget_position(self, now: float | None = None) -> float:
        """A continuous position for budgets: like :meth:`position`, without lock-on jumps."""
        idx, t0, spb, off = self.anchor
        if now is None:
            now = self.time_source.monotonic()
        return idx + off + (now - t0) / spb

    def seconds_until(self, budget_position: float, now: float | None = None) -> float:
        """Seconds until :meth:`budget_position` reaches ``budget_position`` at the current tempo."""
        idx, t0, spb, off = self.anchor
        if now is None:
            now = self.time_source.monotonic()
        return (budget_position - idx - off) * spb - (now - t0)

    @property
    def current_beat(self) -> int:
        """Index of the last beat frame accepted (0 before any)."""
        return self.beat_and_epoch[0]

    @property
    def has_beat(self) -> bool:
        """Whether any frame has been accepted yet."""
        return self._has_beat

    @property
    def tempo_bpm(self) -> float:
        """The tempo of the last accepted frame (or the assumed one)."""
        return self._tempo

    @property
    def bar_length(self) -> int:
        """Beats per bar of the last accepted frame (or the assumed one)."""
        return self._bar

    @property
    def beat_duration(self) -> float:
        """Seconds per beat at the current tempo."""
        return self.anchor[2]

    def snapshot(self, now: float | None = None) -> ClockSnapshot:
        """All the clock's figures, read consistently."""
        with self._lock:
            if now is None:
                now = self.time_source.monotonic()
            samples = len(self._arrivals)
            measured = self._measured()
            return ClockSnapshot(
                current_beat=self.beat_and_epoch[0],
                has_beat=self._has_beat,
                tempo_bpm=self._tempo,
                bar_length=self._bar,
                measured_bpm=measured,
                tempo_drift=drift_class(measured, self._tempo, samples),
                seconds_since_frame=max(0.0, now - self._last_arrival),
                missed_in_current_bar=self._gap_bar == self.beat_and_epoch[0] // self._bar,
                missed_beats=self._missed,
                stale_frames=self._stale,
                duplicate_frames=self._duplicates,
                resets=self._resets,
                beats_received=self._received,
            )

    def _measured(self) -> float:
        if len(self._arrivals) < 2:
            return 0.0
        i0, t0 = self._arrivals[0]
        i1, t1 = self._arrivals[-1]
        if t1 <= t0:
            return 0.0
        return 60.0 * (i1 - i0) / (t1 - t0)

    # -- writes --------------------------------------------------------------

    def restart(self) -> None:
        """Start counting silence from now (called when an integration starts)."""
        with self._lock:
            self._last_arrival = self.time_source.monotonic()

    def observe(self, frame: BeatFrame, arrival: float | None = None) -> FrameResult:
        """Feed one frame (already parsed and for this cluster) to the clock.

        Args:
            frame: the frame.
            arrival: its monotonic arrival time (default: now).

        Returns:
            What the frame was; only accepted frames move the clock.
        """
        with self._lock:
            now = self.time_source.monotonic() if arrival is None else arrival
            index = frame.beat_index
            if self._has_beat and index <= self.beat_and_epoch[0]:
                return self._observe_old(frame, now)
            if not self._has_beat:
                return self._accept(frame, now, Observation.FIRST, keep_budget=True)
            missed = index - self.beat_and_epoch[0] - 1
            if missed >= self._bar:
                # Further ahead than the time since the last frame explains at our tempo,
                # plus a bar of slack: not missed beats but a new index sequence (a pulse
                # restarted at another tempo starts at its own wall-clock index; a stray
                # frame may carry any index). Re-anchor on it; budgets keep counting the
                # beats that really passed (keep_budget), never the jump.
                idx, t0, spb, _ = self.anchor
                excess = index - (idx + (now - t0) / spb)
                if excess > self._bar:
                    self._resets += 1
                    result = self._accept(frame, now, Observation.JUMP, keep_budget=True)
                    return attrs.evolve(result, excess=excess)
            if missed > 0:
                self._missed += missed
                self._gap_bar = index // frame.bar_length
                return self._accept(frame, now, Observation.GAP, missed=missed)
            return self._accept(frame, now, Observation.NEXT)

    def _observe_old(self, frame: BeatFrame, now: float) -> FrameResult:
        if frame.beat_index == self.beat_and_epoch[0]:
            self._duplicates += 1
            return FrameResult(Observation.DUPLICATE)
        self._stale += 1
        run = self._stale_run
        spb = 60.0 / frame.tempo_bpm
        if run and frame.beat_index > run[-1][0]:
            if now - run[-1][1] >= 0.5 * spb:  # arriving at the tempo: a live pulse
                run.append((frame.beat_index, now))
        else:
            run[:] = [(frame.beat_index, now)]
        if len(run) >= frame.bar_length:
            self._resets += 1
            return self._accept(frame, now, Observation.RESET, keep_budget=True)
        return FrameResult(Observation.STALE)

    def _accept(
        self,
        frame: BeatFrame,
        now: float,
        observation: Observation,
        *,
        missed: int = 0,
        keep_budget: bool = False,
    ) -> FrameResult:
        idx, t0, spb, off = self.anchor
        shift = frame.beat_index - self.beat_and_epoch[0] if keep_budget else 0
        if keep_budget:  # lock-on or resync: keep budget_position continuous
            off = idx + off + (now - t0) / spb - frame.beat_index
        tempo_changed = frame.tempo_bpm != self._tempo
        if tempo_changed or observation is Observation.RESET:
            self._arrivals.clear()
        self._tempo = frame.tempo_bpm
        self._bar = frame.bar_length
        epoch = self.beat_and_epoch[1] + (1 if keep_budget else 0)
        self.beat_and_epoch = (frame.beat_index, epoch)
        self._has_beat = True
        self._last_arrival = now
        self._received += 1
        self._arrivals.append((frame.beat_index, now))
        self._stale_run.clear()
        self.anchor = (float(frame.beat_index), now, 60.0 / frame.tempo_bpm, off)
        return FrameResult(observation, missed=missed, tempo_changed=tempo_changed, shift=shift)
