"""What the dashboard knows of a cluster, from the messages on its subjects.

:class:`DashboardState` takes beat frames and status claims off the wire (the
bytes a subscriber receives) and keeps: the cluster's beat, every agent, every
active operation with its budget, the recently finished ones with their
outcome, and per operation type the beats used against the budget. A page
never gets all of it: :meth:`DashboardState.snapshot` returns totals and at
most ``limit`` rows of each list (the most urgent first), so 1,000 agents with
10 operations each are one small JSON document.
"""

from __future__ import annotations

import heapq
import threading
from collections import deque
from typing import Any

import attrs

from ..clock import BeatClock
from ..errors import ProtocolError
from ..protocol import BeatFrame, StatusClaim, parse_message

__all__ = ["DashboardState"]

HEALTH_TASK_ID = "chorus-p2p-health"

#: Beats without a claim after which an active operation is taken as lost (its agent went away).
LOST_AFTER_BEATS = 8
#: Beats without any claim after which an agent counts as degraded (three default health periods).
SILENT_AFTER_BEATS = 24
#: How many finished operations are kept for the "recently finished" list.
RECENT_FINISHED = 500
#: Beats without any claim after which an agent with no active operation is forgotten.
FORGET_AFTER_BEATS = 240
#: Most agents and active operations kept; what comes beyond is counted in ``dropped``
#: (a flood of made-up ids must not grow the dashboard without end).
MAX_AGENTS = 20_000
MAX_OPERATIONS = 200_000


@attrs.define
class _Op:
    agent_id: str
    task_id: str
    operation_type: str
    state: str
    phase: str
    progress: float
    beats_left: int
    peer_count: int
    notes: str
    start_beat: float
    budget: float | None
    last_beat: int
    #: The dashboard's beat when the last claim came (None before the first frame).
    seen_at: int | None = None
    #: False while the only claims came from an agent that had no beat yet (beat_index 0).
    start_known: bool = True
    warned: bool = False
    exceeded: bool = False

    def used(self, now: int) -> float:
        return max(0.0, now - self.start_beat) if self.start_known else 0.0


@attrs.define
class _Agent:
    agent_id: str
    node_id: str
    last_beat: int
    health: str | None = None
    health_notes: str = ""
    connected: bool | None = None
    health_beat: int | None = None
    active: int = 0


@attrs.define
class _TypeStats:
    finished: int = 0
    done: int = 0
    failed: int = 0
    exceeded: int = 0
    lost: int = 0
    used_sum: float = 0.0
    used_max: float = 0.0
    budget_sum: float = 0.0
    budgeted: int = 0


def _estimate(claim: StatusClaim) -> tuple[float | None, float]:
    """(budget, start beat) from one claim: beats_left = e - p and progress = p / e (PROTOCOL.md)."""
    if claim.state in ("done", "failed") or claim.progress >= 1.0:
        return None, float(claim.beat_index)
    if claim.progress <= 0.0:
        return float(claim.beats_left), float(claim.beat_index)
    budget = claim.beats_left / (1.0 - claim.progress)
    return budget, claim.beat_index - budget * claim.progress


def _connected_from(notes: str) -> bool | None:
    if "connected=true" in notes:
        return True
    if "connected=false" in notes:
        return False
    return None


class DashboardState:
    """The cluster as the dashboard shows it; fed with wire messages, read as snapshots. Thread-safe.

    Args:
        cluster_id: keep only this cluster's messages.
        warn_at: progress (share of the budget used) from which an active operation is shown
            as warned (red); an operation that claimed a budget warning is warned too.
    """

    def __init__(self, cluster_id: str, *, warn_at: float = 0.75) -> None:
        if not 0.0 < warn_at <= 1.0:
            raise ValueError(f"warn_at must be in (0, 1], not {warn_at!r}")
        self.cluster_id = cluster_id
        self.warn_at = warn_at
        self._lock = threading.Lock()
        self._clock: BeatClock | None = None
        self._frame: BeatFrame | None = None
        self._agents: dict[str, _Agent] = {}
        self._ops: dict[tuple[str, str], _Op] = {}
        self._finished: deque[dict[str, Any]] = deque(maxlen=RECENT_FINISHED)
        self._types: dict[str, _TypeStats] = {}
        self.messages = 0
        self.invalid = 0
        self.finished_total = 0
        #: Claims not kept because MAX_AGENTS or MAX_OPERATIONS was reached.
        self.dropped = 0
        #: Bumped on every change; a stream sends a snapshot only when it moved.
        self.version = 0

    # -- input ---------------------------------------------------------------------------

    def feed(self, data: bytes) -> None:
        """Take in one message off the wire; a malformed one is counted, never raised."""
        try:
            message = parse_message(data)
        except ProtocolError:
            with self._lock:
                self.invalid += 1
                self.version += 1
            return
        if isinstance(message, BeatFrame):
            self.frame(message)
        else:
            self.claim(message)

    def frame(self, frame: BeatFrame, arrival: float | None = None) -> None:
        """Take in a beat frame (other clusters' frames are ignored)."""
        if frame.cluster_id != self.cluster_id:
            return
        with self._lock:
            self.messages += 1
            if self._clock is None:
                self._clock = BeatClock(tempo_bpm=frame.tempo_bpm, bar_length=frame.bar_length)
            if not self._clock.observe(frame, arrival).observation.accepted:
                return
            self._frame = frame
            self._expire(frame.beat_index)
            self.version += 1

    def claim(self, claim: StatusClaim) -> None:
        """Take in a status claim (other clusters' claims are ignored)."""
        if claim.cluster_id != self.cluster_id:
            return
        with self._lock:
            self.messages += 1
            self.version += 1
            now = self._frame.beat_index if self._frame is not None else None
            if claim.beat_index == 0 and now is not None:
                # an agent that has not had a beat yet claims beat 0: count from the cluster's beat
                claim = attrs.evolve(claim, beat_index=now)
            agent = self._agents.get(claim.agent_id)
            if agent is None:
                if len(self._agents) >= MAX_AGENTS:
                    self.dropped += 1
                    return
                agent = self._agents[claim.agent_id] = _Agent(claim.agent_id, claim.node_id, claim.beat_index)
            agent.node_id = claim.node_id
            agent.last_beat = max(agent.last_beat, claim.beat_index)
            if claim.task_id == HEALTH_TASK_ID:
                agent.health = claim.state
                agent.health_notes = claim.notes
                agent.connected = _connected_from(claim.notes)
                agent.health_beat = claim.beat_index
                return
            key = (claim.agent_id, claim.task_id)
            op = self._ops.get(key)
            if op is None:
                budget, start = _estimate(claim)
                op = _Op(
                    agent_id=claim.agent_id,
                    task_id=claim.task_id,
                    operation_type=claim.operation_type or "",
                    state=claim.state,
                    phase=claim.phase or "",
                    progress=claim.progress,
                    beats_left=claim.beats_left,
                    peer_count=claim.peer_count or 0,
                    notes=claim.notes,
                    start_beat=start,
                    budget=budget,
                    last_beat=claim.beat_index,
                    seen_at=now,
                    start_known=claim.beat_index > 0,
                )
                if claim.state not in ("done", "failed"):
                    if len(self._ops) >= MAX_OPERATIONS:
                        self.dropped += 1
                        return
                    self._ops[key] = op
                    agent.active += 1
            else:
                op.state = claim.state
                op.phase = claim.phase or op.phase
                op.progress = claim.progress
                op.beats_left = claim.beats_left
                op.peer_count = claim.peer_count or op.peer_count
                op.notes = claim.notes
                op.last_beat = max(op.last_beat, claim.beat_index)
                op.seen_at = now
                active = claim.state not in ("done", "failed")
                if (op.budget is None or not op.start_known) and active and claim.beat_index > 0:
                    op.budget, op.start_beat = _estimate(claim)
                    op.start_known = True
            if "beat budget warning" in claim.notes:
                op.warned = True
            if "beat budget exceeded" in claim.notes:
                op.warned = op.exceeded = True
            if claim.state in ("done", "failed"):
                outcome = "exceeded" if op.exceeded else claim.state
                if self._ops.pop(key, None) is not None:
                    agent.active -= 1
                self._finish(op, outcome, claim.beat_index)

    def _finish(self, op: _Op, outcome: str, beat: int) -> None:
        used = op.used(beat)
        self.finished_total += 1
        self._finished.append(
            {
                "agent_id": op.agent_id,
                "task_id": op.task_id,
                "operation_type": op.operation_type,
                "outcome": outcome,
                "beats_used": round(used, 2),
                "budget": None if op.budget is None else round(op.budget, 2),
                "notes": op.notes,
                "finished_beat": beat,
            }
        )
        stats = self._types.setdefault(op.operation_type, _TypeStats())
        stats.finished += 1
        setattr(stats, outcome, getattr(stats, outcome) + 1)
        stats.used_sum += used
        stats.used_max = max(stats.used_max, used)
        if op.budget is not None:
            stats.budget_sum += op.budget
            stats.budgeted += 1

    def _expire(self, now: int) -> None:
        """Operations without a claim for LOST_AFTER_BEATS beats finish as ``lost`` (lock held)."""
        if now % 4:  # a sweep every few beats is enough, and keeps a beat cheap with 10,000 operations
            return
        for key, op in list(self._ops.items()):
            if op.seen_at is None:
                op.seen_at = now  # claimed before the first frame: count from this one
            elif now - op.seen_at > LOST_AFTER_BEATS:
                del self._ops[key]
                agent = self._agents.get(op.agent_id)
                if agent is not None:
                    agent.active -= 1
                self._finish(op, "lost", op.last_beat)
        for agent_id, agent in list(self._agents.items()):
            if agent.active <= 0 and now - agent.last_beat > FORGET_AFTER_BEATS:
                del self._agents[agent_id]

    # -- output --------------------------------------------------------------------------

    def snapshot(
        self, *, limit: int = 100, finished_limit: int = 30, filter_text: str = ""
    ) -> dict[str, Any]:
        """Totals and the first ``limit`` rows of each list, as JSON-able data.

        Args:
            limit: most rows of agents and of active operations.
            finished_limit: most rows of finished operations (newest first).
            filter_text: keep rows whose agent, task or operation type contains it (case-insensitive).

        Returns:
            ``{"cluster", "agents", "operations", "finished", "types", "messages", "invalid_messages",
            "version"}``; see docs/observability.md for every field.
        """
        needle = filter_text.strip().lower()

        def keep(*texts: str) -> bool:
            return not needle or any(needle in t.lower() for t in texts)

        with self._lock:
            frame = self._frame
            now = frame.beat_index if frame is not None else 0
            cluster: dict[str, Any] = {"cluster_id": self.cluster_id, "beat_index": None}
            if frame is not None and self._clock is not None:
                snap = self._clock.snapshot()
                cluster.update(
                    beat_index=frame.beat_index,
                    bar=frame.beat_index // max(1, frame.bar_length),
                    beat_in_bar=frame.beat_index % max(1, frame.bar_length) + 1,
                    bar_length=frame.bar_length,
                    tempo_bpm=frame.tempo_bpm,
                    measured_bpm=round(snap.measured_bpm, 2),
                    drift=snap.tempo_drift,
                    seconds_since_beat=round(snap.seconds_since_frame, 2),
                    window_id=frame.window_id,
                )
            # cheap numbers for every row; JSON only for the rows that are sent
            agent_flags = [(a, *self._agent_flags(a, now)) for a in self._agents.values()]
            op_marks = [(o, *self._op_progress(o, now)) for o in self._ops.values()]
            degraded = sum(1 for _, d, _c, _s in agent_flags if d)
            connected = sum(1 for _, _d, c, _s in agent_flags if c)
            warned = sum(1 for _, _p, w in op_marks if w)
            shown_agents = [f for f in agent_flags if keep(f[0].agent_id, f[0].node_id)]
            shown_ops = [m for m in op_marks if keep(m[0].agent_id, m[0].task_id, m[0].operation_type)]
            # degraded first, then by name; the most spent budget first (what is about to run out)
            agent_rows = [
                self._agent_json(*f)
                for f in heapq.nsmallest(limit, shown_agents, key=lambda f: (not f[1], f[0].agent_id))
            ]
            op_rows = [
                self._op_json(o, now, progress, warn)
                for o, progress, warn in heapq.nlargest(limit, shown_ops, key=lambda m: (m[1], m[0].task_id))
            ]
            agents_total, ops_total = len(agent_flags), len(op_marks)
            finished = list(self._finished)
            types = []
            active_by_type: dict[str, list[float]] = {}
            for op in self._ops.values():
                active_by_type.setdefault(op.operation_type, []).append(op.used(now))
            for name in sorted(set(self._types) | set(active_by_type)):
                s = self._types.get(name, _TypeStats())
                active = active_by_type.get(name, [])
                types.append(
                    {
                        "operation_type": name,
                        "active": len(active),
                        "finished": s.finished,
                        "done": s.done,
                        "failed": s.failed,
                        "exceeded": s.exceeded,
                        "lost": s.lost,
                        "mean_used": round(s.used_sum / s.finished, 2) if s.finished else None,
                        "max_used": round(max([s.used_max, *active]), 2),
                        "mean_budget": round(s.budget_sum / s.budgeted, 2) if s.budgeted else None,
                    }
                )
            counts = {
                "messages": self.messages,
                "invalid_messages": self.invalid,
                "dropped_claims": self.dropped,
                "version": self.version,
                "finished_total": self.finished_total,
            }
        shown_finished = [f for f in finished if keep(f["agent_id"], f["task_id"], f["operation_type"])]
        return {
            "cluster": cluster,
            "agents": {
                "total": agents_total,
                "connected": connected,
                "degraded": degraded,
                "matching": len(shown_agents),
                "rows": agent_rows,
            },
            "operations": {
                "total": ops_total,
                "warned": warned,
                "matching": len(shown_ops),
                "rows": op_rows,
            },
            "finished": {
                "total": counts.pop("finished_total"),
                "matching": len(shown_finished),
                "rows": shown_finished[::-1][:finished_limit],
            },
            "types": types,
            **counts,
        }

    @staticmethod
    def _agent_flags(a: _Agent, now: int) -> tuple[bool, bool, bool]:
        """(degraded, connected, silent) of one agent."""
        silent = now - a.last_beat > SILENT_AFTER_BEATS if now else False
        degraded = a.health == "failed" or a.connected is False or silent
        return degraded, bool(a.connected) and not silent, silent

    @staticmethod
    def _agent_json(a: _Agent, degraded: bool, connected: bool, silent: bool) -> dict[str, Any]:
        return {
            "agent_id": a.agent_id,
            "node_id": a.node_id,
            "health": a.health,
            "notes": a.health_notes,
            "connected": connected,
            "degraded": degraded,
            "silent": silent,
            "last_beat": a.last_beat,
            "active": a.active,
        }

    def _op_progress(self, o: _Op, now: int) -> tuple[float, bool]:
        """(share of the budget used, warned) of one operation; the share passes 1.0 when overrun."""
        progress = o.used(max(now, o.last_beat)) / o.budget if o.budget else o.progress
        return progress, o.warned or progress >= self.warn_at

    @staticmethod
    def _op_json(o: _Op, now: int, progress: float, warned: bool) -> dict[str, Any]:
        return {
            "agent_id": o.agent_id,
            "task_id": o.task_id,
            "operation_type": o.operation_type,
            "state": o.state,
            "phase": o.phase,
            "progress": round(progress, 3),
            "beats_used": round(o.used(max(now, o.last_beat)), 2),
            "budget": None if o.budget is None else round(o.budget, 2),
            "beats_left": o.beats_left,
            "peer_count": o.peer_count,
            "warned": warned,
            "exceeded": o.exceeded,
            "notes": o.notes,
            "last_beat": o.last_beat,
        }
