"""The beat thread (``backbeat-beat``): per-beat claims, budget announcements, downbeat
clean-up, the health claim, and how long it all took (``local_degradation``)."""

from __future__ import annotations

import queue
import time
from typing import Final

from ..budget import announce_running
from ..protocol import BeatFrame
from .base import STOP, STOP_REQUEST, IntegrationCore

#: The stdlib logger its lines go to (``log_to_stdlib``): the package's, as before the split.
LOG_NAME: Final = "backbeat_sync.integration"
__all__ = ["HISTORY_FLUSH_SECONDS", "BeatMixin"]

#: The beat thread writes budget history about this often (seconds; at a beat, or without one).
HISTORY_FLUSH_SECONDS: Final = 0.25
_real_monotonic: Final = time.monotonic


class BeatMixin(IntegrationCore):
    """``Integration``'s beat thread."""

    def _beat_loop(self) -> None:
        flush = self._flush_history
        while True:
            try:
                item = self._beat_queue.get(timeout=HISTORY_FLUSH_SECONDS)
            except queue.Empty:  # no beat for a while (a slow tempo, a silent pulse)
                flush(True)
                continue
            frames: list[BeatFrame] = []
            while item is not STOP:
                if item is STOP_REQUEST:
                    self._spawn_stopper()
                else:
                    assert isinstance(item, BeatFrame)
                    frames.append(item)
                try:  # a backlog (slow handling): claim once, for the newest beat
                    item = self._beat_queue.get_nowait()
                except queue.Empty:
                    break
            if frames:
                self._handle_frames(frames)
                flush(False)
            if item is STOP:
                return

    def _flush_history(self, due: bool) -> None:
        """Beat thread: write the budget runs finished since the last flush (never raises).

        At most every HISTORY_FLUSH_SECONDS (real time) unless ``due``: at a fast
        tempo, writing at every beat would cost more than it tells.
        """
        now = _real_monotonic()
        if not due and now - self._history_flushed_at < HISTORY_FLUSH_SECONDS:
            return
        self._history_flushed_at = now
        try:
            self.history.flush()
        except Exception as exc:
            self.record_error(f"budget history flush failed: {type(exc).__name__}: {exc}")

    def _handle_frames(self, frames: list[BeatFrame]) -> None:
        t0 = self._time.monotonic()
        try:
            self._handle_beat(frames)
        except Exception as exc:
            self.record_error(f"beat handling failed: {type(exc).__name__}: {exc}")
        self._last_handling = elapsed = self._time.monotonic() - t0
        for listener in self._handled_listeners:
            try:
                listener(frames[-1], elapsed)
            except Exception as exc:
                self.record_error(f"beat listener failed: {type(exc).__name__}: {exc}")

    def _handle_beat(self, frames: list[BeatFrame]) -> None:
        for f in frames:
            self._log.info(
                f"🥁 BACKBEAT beat received - beat={f.beat_index} phase={f.phase}"
                f" tempo={f.tempo_bpm:g} window={f.window_id}"
            )
        if len(frames) > 1:
            self._ratelog.warn(
                "backlog", f"BACKBEAT beat handling fell behind: {len(frames)} beats handled as one"
            )
        beat = self._clock.current_beat
        if beat != self._claimed_beat:  # each beat's claims go out once
            self._claimed_beat = beat
            self._registry.emit_active(emit_chunk=self._emit_operations)
        announce_running(self)  # budget calls still running are claimed from now on
        downbeats = [f for f in frames if f.downbeat]
        if downbeats:
            last = downbeats[-1]
            self._log.info(
                f"🎼 BACKBEAT downbeat - new bar started - beat={last.beat_index} window={last.window_id}"
            )
            self._registry.cleanup_finished()
            cluster = self.history.cluster
            if cluster is not None:  # once a bar: this agent's sketches go to the shared bucket
                self.history._drain()
                cluster.bar()
            self._log.info(f"🧹 BACKBEAT operations cleanup check - active: {self._registry.active_count}")
        if any(f.beat_index % self._config.health_every_beats == 0 for f in frames):
            self._emit_health()
        self._check_blocked()
        for f in frames:
            if self._callbacks.beat:
                self._queue_callback("beat", f)
            if f.downbeat and self._callbacks.downbeat:
                self._queue_callback("downbeat", f)
