"""Building status claims exactly as PROTOCOL.md prescribes (fields, maths, notes)."""

from __future__ import annotations

from ._time import TimeSource, format_rfc3339
from .operations import OperationPhase, P2POperation
from .protocol import HEALTH_TASK_ID, StatusClaim

_COMPLETED = OperationPhase.COMPLETED
_FAILED = OperationPhase.FAILED

__all__ = ["ClaimFactory", "health_notes"]


def health_notes(connected: bool, operations: int, tempo_bpm: float, node_id: str) -> str:
    """``CHORUS P2P healthy: connected={true|false}, operations={n}, tempo={bpm} BPM, node={node_id}``."""
    flag = "true" if connected else "false"
    return (
        f"CHORUS P2P healthy: connected={flag}, operations={operations},"
        f" tempo={tempo_bpm:g} BPM, node={node_id}"
    )


class ClaimFactory:
    """Makes the claims of one agent.

    Args:
        cluster_id: the cluster.
        agent_id: this agent.
        node_id: this agent's P2P node id.
        time_source: where ``sent_at`` comes from.
    """

    def __init__(self, cluster_id: str, agent_id: str, node_id: str, time_source: TimeSource) -> None:
        self.cluster_id = cluster_id
        self.agent_id = agent_id
        self.node_id = node_id
        self._time = time_source
        self._stamp_ms = -1
        self._stamp = ""

    def sent_at(self) -> str:
        """The current time as an RFC 3339 timestamp (cached per millisecond)."""
        now = self._time.time()
        ms = int(now * 1000)
        if ms != self._stamp_ms:  # benign race: both threads compute the same string
            self._stamp = format_rfc3339(ms / 1000)
            self._stamp_ms = ms
        return self._stamp

    def for_operation(self, op: P2POperation, current_beat: int, *, notes: str | None = None) -> StatusClaim:
        """The claim for ``op`` at ``current_beat``.

        Args:
            op: the operation, in its current phase.
            current_beat: index of the last beat frame received.
            notes: override the notes line (budget warnings use this).
        """
        # The per-beat hot path (one call per active operation per beat), kept inline.
        # PROTOCOL.md: p = c - s; beats_left = max(0, e - p); progress = min(1.0, p / e).
        phase = op.phase
        value = phase.value
        if phase is _COMPLETED:
            state, beats_left, progress = "done", 0, 1.0
            line = f"P2P {op.type}: {value} (peers: {op.peer_count}, node: {self.node_id})"
        elif phase is _FAILED:
            state, beats_left, progress = "failed", 0, 0.0
            line = f"P2P operation failed: {op.reason or 'unknown'} (type: {op.type})"
        else:
            state = "executing"
            estimated = op.estimated_beats
            passed = current_beat - op.start_beat
            if passed < 0:
                passed = 0
            if passed < estimated:
                beats_left, progress = estimated - passed, passed / estimated
            else:
                beats_left, progress = 0, 1.0
            line = f"P2P {op.type}: {value} (peers: {op.peer_count}, node: {self.node_id})"
        return StatusClaim(
            self.cluster_id,
            self.agent_id,
            self.node_id,
            op.id,
            current_beat,
            state,
            beats_left,
            progress,
            line if notes is None else notes,
            self.sent_at(),
            op.type,
            value,
            op.peer_count,
        )

    def for_health(
        self,
        *,
        current_beat: int,
        connected: bool,
        operations: int,
        tempo_bpm: float,
        recent_errors: bool,
    ) -> StatusClaim:
        """The health claim (``task_id`` ``chorus-p2p-health``).

        State is ``failed`` with recent errors, else ``executing`` with active
        operations, else ``waiting``.
        """
        if recent_errors:
            state = "failed"
        elif operations > 0:
            state = "executing"
        else:
            state = "waiting"
        return StatusClaim(
            cluster_id=self.cluster_id,
            agent_id=self.agent_id,
            node_id=self.node_id,
            task_id=HEALTH_TASK_ID,
            beat_index=current_beat,
            state=state,
            beats_left=0,
            progress=1.0,
            notes=health_notes(connected, operations, tempo_bpm, self.node_id),
            sent_at=self.sent_at(),
        )
