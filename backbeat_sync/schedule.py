"""The beat schedule a pulse keeps, and the thread that keeps one.

:class:`BeatSchedule` is drift-free: beat ``k`` is due at
``anchor_time + (k - anchor_index) * 60 / bpm``, computed, never accumulated
from sleeps. A tempo change re-anchors on the last beat sent, so it takes
effect from the next beat. :class:`PulseThread` runs a schedule on a thread
(the in-process transport's pulse); :class:`~backbeat_sync.Pulse` runs one on
NATS. This module sits below both ``pulse.py`` and ``transport/local.py``.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable

from ._time import SYSTEM_TIME, TimeSource, format_rfc3339
from .errors import ConfigError
from .protocol import MAX_TEMPO_BPM, BeatFrame

__all__ = ["BeatSchedule", "PulseThread", "check_max_frames", "check_tempo", "wall_clock_start_index"]


def check_tempo(tempo_bpm: float) -> float:
    if (
        isinstance(tempo_bpm, bool)
        or not isinstance(tempo_bpm, (int, float))
        or not math.isfinite(tempo_bpm)
        or not 0 < tempo_bpm <= MAX_TEMPO_BPM
    ):
        raise ConfigError("tempo_bpm", tempo_bpm, f"must be 0 < x <= {MAX_TEMPO_BPM:g}")
    return float(tempo_bpm)


def check_max_frames(max_frames: int | None) -> int | None:
    """Validate a pulse's frame limit: None (no limit) or an integer >= 1.

    Raises:
        ConfigError: anything else.
    """
    if max_frames is not None and (
        not isinstance(max_frames, int) or isinstance(max_frames, bool) or max_frames < 1
    ):
        raise ConfigError("max_beats", max_frames, "must be an integer >= 1, or None")
    return max_frames


def wall_clock_start_index(tempo_bpm: float, epoch: float) -> int:
    """A start index derived from the wall clock, so a restarted pulse never goes back.

    It is the number of beats at ``tempo_bpm`` since the Unix epoch.
    """
    return int(epoch * tempo_bpm / 60.0)


class BeatSchedule:
    """When each beat is due and what its frame says.

    Args:
        cluster_id: the cluster the frames are for.
        tempo_bpm: beats per minute (0 < x <= 6000).
        bar_length: beats per bar (>= 1).
        start_index: index of the first beat.
        start_time: monotonic time the first beat is due.
    """

    def __init__(
        self,
        *,
        cluster_id: str,
        tempo_bpm: float,
        bar_length: int,
        start_index: int,
        start_time: float,
    ) -> None:
        if not isinstance(bar_length, int) or isinstance(bar_length, bool) or bar_length < 1:
            raise ConfigError("bar_length", bar_length, "must be an integer >= 1")
        if not isinstance(start_index, int) or start_index < 0:
            raise ConfigError("start_index", start_index, "must be an integer >= 0")
        self.cluster_id = cluster_id
        self.bar_length = bar_length
        self._lock = threading.Lock()
        self._tempo = check_tempo(tempo_bpm)
        self._anchor_index = start_index
        self._anchor_time = start_time
        self._next = start_index

    @property
    def tempo_bpm(self) -> float:
        """Current tempo."""
        return self._tempo

    @property
    def next_index(self) -> int:
        """Index of the next beat to send."""
        return self._next

    def due(self, index: int) -> float:
        """Monotonic time beat ``index`` is due."""
        with self._lock:
            return self._anchor_time + (index - self._anchor_index) * 60.0 / self._tempo

    def set_tempo(self, tempo_bpm: float) -> None:
        """Change the tempo from the next beat on (that beat comes one new beat after the last).

        Raises:
            ConfigError: tempo out of range.
        """
        tempo = check_tempo(tempo_bpm)
        with self._lock:
            last = self._next - 1
            last_due = self._anchor_time + (last - self._anchor_index) * 60.0 / self._tempo
            self._anchor_index, self._anchor_time, self._tempo = last, last_due, tempo

    def skip_to(self, now: float) -> None:
        """Move ``next_index`` past beats whose time is long gone (the pulse was suspended)."""
        with self._lock:
            spb = 60.0 / self._tempo
            behind = math.floor((now - self._anchor_time) / spb) + self._anchor_index
            if behind > self._next:
                self._next = behind

    def frame(self, index: int, wall_now: float) -> BeatFrame:
        """The frame for beat ``index``, sent at wall time ``wall_now``."""
        with self._lock:
            spb = 60.0 / self._tempo
            tempo = self._tempo
        downbeat = index % self.bar_length == 0
        return BeatFrame(
            cluster_id=self.cluster_id,
            beat_index=index,
            downbeat=downbeat,
            phase="downbeat" if downbeat else "upbeat",
            tempo_bpm=int(tempo) if tempo.is_integer() else tempo,
            window_id=f"w-{index // self.bar_length}",
            bar_length=self.bar_length,
            sent_at=format_rfc3339(wall_now),
            deadline_at=format_rfc3339(wall_now + spb),
        )

    def advance(self) -> int:
        """Mark the next beat as sent; returns its index."""
        with self._lock:
            index = self._next
            self._next += 1
            return index


class PulseThread:
    """Runs a :class:`BeatSchedule` on a thread, handing each frame to ``send``.

    Args:
        schedule: the schedule to keep.
        send: called with each frame on the pulse thread (exceptions are logged by the caller).
        time_source: real time; the thread waits on it.
        name: thread name.
        max_frames: stop by itself after handing this many frames to ``send``
            (None: run until :meth:`stop`); ``finished`` is set then.
    """

    def __init__(
        self,
        schedule: BeatSchedule,
        send: Callable[[BeatFrame], None],
        *,
        time_source: TimeSource = SYSTEM_TIME,
        name: str = "backbeat-local-pulse",
        max_frames: int | None = None,
    ) -> None:
        self.schedule = schedule
        self.max_frames = check_max_frames(max_frames)
        self.frames_sent = 0
        #: Set once ``max_frames`` frames were sent (never without ``max_frames``).
        self.finished = threading.Event()
        self._send = send
        self._time = time_source
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> None:
        """Start sending beats."""
        self._thread.start()

    def stop(self) -> None:
        """Stop and join the thread. Idempotent."""
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join()

    def _run(self) -> None:
        sched = self.schedule
        while not self._stop.is_set():
            now = self._time.monotonic()
            sched.skip_to(now - 60.0 / sched.tempo_bpm)
            index = sched.next_index
            delay = sched.due(index) - now
            if delay > 0 and self._stop.wait(delay):
                return
            sched.advance()
            self._send(sched.frame(index, self._time.time()))
            self.frames_sent += 1
            if self.max_frames is not None and self.frames_sent >= self.max_frames:
                self.finished.set()
                return
