"""Frame ingest, on the transport's thread: parse strictly, check the cluster and the
signature, feed the clock, wake the watchdog, hand the beat to the beat thread."""

from __future__ import annotations

from typing import Final

from .._runtime import WATCHDOG
from ..clock import Observation
from ..errors import ProtocolError
from ..protocol import BeatFrame, parse_beat_frame
from ..transport import TransportEvent
from .base import IntegrationCore, IntegrationState

#: The stdlib logger its lines go to (``log_to_stdlib``): the package's, as before the split.
LOG_NAME: Final = "backbeat_sync.integration"
__all__ = ["IngestMixin"]


class IngestMixin(IntegrationCore):
    """``Integration``'s transport entry points (the ``TransportSink`` protocol, audience aside)."""

    def frame_received(self, data: bytes, arrival: float) -> None:
        """Transport entry point: a payload arrived on the beat subject. Never raises."""
        try:
            self._frame_received(data, arrival)
        except Exception as exc:  # a bug here must never stop the transport
            self.record_error(f"beat handling failed: {type(exc).__name__}: {exc}")

    def _frame_received(self, data: bytes, arrival: float) -> None:
        if self._state is not IntegrationState.RUNNING:
            return
        try:
            frame = parse_beat_frame(data)
        except ProtocolError as exc:
            self._record_rejection("rejected_frames", "rejected beat frame", "malformed frame", exc.reason)
            return
        if frame.cluster_id != self._config.cluster_id:
            self.count("foreign_frames")
            return
        if not self._accept_frame(frame):
            return
        result = self._clock.observe(frame, arrival)
        if not result.observation.accepted:
            return
        self._beat_seen.set()  # wait_for_beat()
        if result.observation in (Observation.FIRST, Observation.RESET, Observation.JUMP):
            self._registry.rebase(self._clock.beat_and_epoch[1], result.shift)
        if result.observation is Observation.GAP:
            self._ratelog.warn(
                "gap", f"BACKBEAT missed {result.missed} beat(s) before beat={frame.beat_index}"
            )
        elif result.observation is Observation.RESET:
            self.record_error(
                f"pulse reset: resynchronised to beat {frame.beat_index} after a bar of stale frames"
            )
        elif result.observation is Observation.JUMP:
            self.record_error(
                f"pulse reset forward: resynchronised to beat {frame.beat_index}, {result.excess:,.0f}"
                " beats ahead of the time elapsed (budgets count the elapsed beats)"
            )
        WATCHDOG.notify_only()  # tempo changes re-time the budgets' deadlines
        self._beat_queue.put(frame)

    def _accept_frame(self, frame: BeatFrame) -> bool:
        """With trusted pulse keys, only frames signed by one of them get through."""
        if self._verifier is None:
            return True
        verdict = self._verifier.verify(frame)
        if verdict == "ok":
            return True
        unsigned = verdict == "unsigned"
        self._record_rejection(
            "unsigned_frames" if unsigned else "forged_frames",
            "dropped beat frame",
            "unsigned frame" if unsigned else "forged frame",
            f"{verdict.replace('_', ' ')} (beat {frame.beat_index})",
        )
        return False

    def transport_event(self, event: TransportEvent, detail: str) -> None:
        """Transport entry point: the connection changed state."""
        if event is TransportEvent.ERROR:
            self.record_error(f"nats error: {detail}")
        elif event is TransportEvent.DISCONNECTED:
            self.record_error(f"disconnected from NATS: {detail}")
        elif event is TransportEvent.CLOSED and self._state is IntegrationState.RUNNING:
            self.record_error(f"nats connection closed: {detail}")  # unexpected: not our stop()
        elif event is TransportEvent.RECONNECTED:
            self._log.info(f"BACKBEAT reconnected to NATS: {detail}")
        elif event is TransportEvent.CONNECTED:
            self._log.debug(f"BACKBEAT connected: {detail}")
        elif event is TransportEvent.WARNING:
            self._log.warn(f"BACKBEAT {detail}")
