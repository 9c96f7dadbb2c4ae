"""The cluster view: what ``monitor`` and ``demo`` know of a cluster, fed by beat frames and claims."""

from __future__ import annotations

import threading
from typing import Any

import attrs

from .. import BeatClock, BeatFrame, ProtocolError, StatusClaim, parse_message
from ._base import HEALTH_TASK_ID

__all__ = ["ClusterView", "notes_kind", "task_line"]


@attrs.define
class Task:
    cluster_id: str
    agent_id: str
    node_id: str
    task_id: str
    operation_type: str | None
    state: str
    phase: str | None
    progress: float
    beats_left: int
    peer_count: int | None
    notes: str
    beat_index: int
    sent_at: str
    finished_at: int | None = None

    @property
    def final(self) -> bool:
        return self.state in ("done", "failed")

    def to_json(self) -> dict[str, Any]:
        return {
            "cluster_id": self.cluster_id,
            "agent_id": self.agent_id,
            "node_id": self.node_id,
            "task_id": self.task_id,
            "operation_type": self.operation_type,
            "state": self.state,
            "phase": self.phase,
            "progress": self.progress,
            "beats_left": self.beats_left,
            "peer_count": self.peer_count,
            "notes": self.notes,
            "last_beat": self.beat_index,
            "sent_at": self.sent_at,
        }


@attrs.define
class ClusterState:
    cluster_id: str
    clock: BeatClock
    last_frame: BeatFrame | None = None
    frames: int = 0


class ClusterView:
    """What a monitor knows of one or more clusters: their beat and every agent's tasks.

    Feed it beat frames and status claims (from NATS, or from an integration's
    ``on_beat``/``on_claim``); read :meth:`snapshot`. Finished tasks stay one
    bar, then fade out. Thread-safe.

    Args:
        cluster_id: only keep messages of this cluster (None: every cluster).
    """

    def __init__(self, cluster_id: str | None = None) -> None:
        self.cluster_id = cluster_id
        self._lock = threading.Lock()
        self._clusters: dict[str, ClusterState] = {}
        self._tasks: dict[tuple[str, str, str], Task] = {}
        self._agents: dict[tuple[str, str], Task] = {}
        self.messages = 0
        self.frames = 0
        self.invalid = 0
        self.last_invalid = ""

    def _cluster(self, cluster_id: str, frame: BeatFrame | None = None) -> ClusterState:
        c = self._clusters.get(cluster_id)
        if c is None:
            tempo = frame.tempo_bpm if frame is not None else 60.0
            bar = frame.bar_length if frame is not None else 4
            c = self._clusters[cluster_id] = ClusterState(
                cluster_id, BeatClock(tempo_bpm=tempo, bar_length=bar)
            )
        return c

    def feed(self, data: bytes) -> list[str]:
        """Parse one message off the wire and take it in.

        Returns:
            Plain event lines worth printing (see :meth:`frame` and :meth:`claim`).
        """
        try:
            message = parse_message(data)
        except ProtocolError as exc:
            with self._lock:
                self.invalid += 1
                self.last_invalid = str(exc)
            return []
        if isinstance(message, BeatFrame):
            return self.frame(message)
        return self.claim(message)

    def frame(self, frame: BeatFrame, arrival: float | None = None) -> list[str]:
        """Take in a beat frame.

        Returns:
            A line for each downbeat (bar, beat, tempo, measured BPM, drift).
        """
        if self.cluster_id is not None and frame.cluster_id != self.cluster_id:
            return []
        with self._lock:
            self.messages += 1
            c = self._cluster(frame.cluster_id, frame)
            if not c.clock.observe(frame, arrival).observation.accepted:
                return []
            c.last_frame = frame
            c.frames += 1
            self.frames += 1
            self._fade(c)
            if not frame.downbeat:
                return []
            snap = c.clock.snapshot()
        bar = frame.beat_index // max(1, frame.bar_length)
        return [
            f"{frame.cluster_id}: bar {bar} beat {frame.beat_index} tempo {frame.tempo_bpm:g} BPM"
            f" measured {snap.measured_bpm:.1f} BPM drift {snap.tempo_drift}"
        ]

    def claim(self, claim: StatusClaim) -> list[str]:
        """Take in a status claim.

        Returns:
            A line when a task appears, changes state or phase, or gets a new kind of
            notes (budget warnings), and when an agent's health state changes.
        """
        if self.cluster_id is not None and claim.cluster_id != self.cluster_id:
            return []
        task = Task(
            cluster_id=claim.cluster_id,
            agent_id=claim.agent_id,
            node_id=claim.node_id,
            task_id=claim.task_id,
            operation_type=claim.operation_type,
            state=claim.state,
            phase=claim.phase,
            progress=claim.progress,
            beats_left=claim.beats_left,
            peer_count=claim.peer_count,
            notes=claim.notes,
            beat_index=claim.beat_index,
            sent_at=claim.sent_at,
        )
        with self._lock:
            self.messages += 1
            c = self._cluster(claim.cluster_id)
            if claim.task_id == HEALTH_TASK_ID:
                key2 = (claim.cluster_id, claim.agent_id)
                before = self._agents.get(key2)
                self._agents[key2] = task
                if before is not None and before.state == task.state:
                    return []
                return [f"{claim.cluster_id}/{claim.agent_id}: health {claim.state}: {claim.notes}"]
            key = (claim.cluster_id, claim.agent_id, claim.task_id)
            before = self._tasks.get(key)
            if task.final:
                task.finished_at = self._beat(c, claim.beat_index)
            self._tasks[key] = task
            agent = self._agents.get((claim.cluster_id, claim.agent_id))
            if agent is None or agent.task_id != HEALTH_TASK_ID:
                self._agents[(claim.cluster_id, claim.agent_id)] = attrs.evolve(task, task_id="")
            changed = (
                before is None
                or before.state != task.state
                or before.phase != task.phase
                or notes_kind(before.notes) != notes_kind(task.notes)
            )
        return [task_line(task)] if changed else []

    @staticmethod
    def _beat(c: ClusterState, fallback: int) -> int:
        return c.last_frame.beat_index if c.last_frame is not None else fallback

    def _fade(self, c: ClusterState) -> None:
        """Drop this cluster's tasks that finished more than a bar ago (lock held)."""
        if c.last_frame is None:
            return
        now, bar = c.last_frame.beat_index, max(1, c.last_frame.bar_length)
        for key, task in list(self._tasks.items()):
            if (
                task.cluster_id == c.cluster_id
                and task.finished_at is not None
                and now - task.finished_at > bar
            ):
                del self._tasks[key]

    def snapshot(self) -> dict[str, Any]:
        """Everything known now, as plain JSON-able data.

        Returns:
            ``{"clusters": [...], "agents": [...], "tasks": [...], "messages": n, "invalid_messages": n}``;
            each cluster has ``cluster_id``, ``current_beat``, ``bar``, ``beat_in_bar``, ``bar_length``,
            ``tempo_bpm``, ``measured_bpm``, ``tempo_drift``, ``window_id``, ``seconds_since_beat``;
            each task has the claim's fields (``last_beat`` is its ``beat_index``) and each
            agent its last health claim (or last claim of any task).
        """
        with self._lock:
            clusters = []
            for c in sorted(self._clusters.values(), key=lambda c: c.cluster_id):
                snap = c.clock.snapshot()
                f = c.last_frame
                bar_length = f.bar_length if f is not None else snap.bar_length
                clusters.append(
                    {
                        "cluster_id": c.cluster_id,
                        "current_beat": f.beat_index if f is not None else None,
                        "bar": f.beat_index // bar_length if f is not None else None,
                        "beat_in_bar": f.beat_index % bar_length + 1 if f is not None else None,
                        "bar_length": bar_length,
                        "tempo_bpm": f.tempo_bpm if f is not None else None,
                        "measured_bpm": round(snap.measured_bpm, 3),
                        "tempo_drift": snap.tempo_drift,
                        "window_id": f.window_id if f is not None else None,
                        "seconds_since_beat": round(snap.seconds_since_frame, 3) if f is not None else None,
                    }
                )
            agents = [
                {
                    "cluster_id": a.cluster_id,
                    "agent_id": a.agent_id,
                    "node_id": a.node_id,
                    "health": a.state if a.task_id == HEALTH_TASK_ID else None,
                    "notes": a.notes if a.task_id == HEALTH_TASK_ID else None,
                    "last_beat": a.beat_index,
                }
                for _, a in sorted(self._agents.items())
            ]
            tasks = [t.to_json() for _, t in sorted(self._tasks.items())]
            return {
                "clusters": clusters,
                "agents": agents,
                "tasks": tasks,
                "messages": self.messages,
                "invalid_messages": self.invalid,
            }


def notes_kind(notes: str) -> str:
    """Notes up to the first digit: a budget warning differs from the phase line, a beat count does not."""
    for i, ch in enumerate(notes):
        if ch.isdigit():
            return notes[:i]
    return notes


def task_line(task: Task) -> str:
    where = f"{task.agent_id}/{task.task_id}"
    what = task.state if task.phase is None else f"{task.state}:{task.phase}"
    if task.state == "failed":
        return f"  beat {task.beat_index} {where} {what} - {task.notes}"
    peers = f" peers {task.peer_count}" if task.peer_count is not None else ""
    extra = "" if task.notes.startswith("P2P ") else f" - {task.notes}"  # e.g. a budget warning
    progress = f"{task.progress:.0%} {task.beats_left} beats left"
    return f"  beat {task.beat_index} {where} {what} {progress}{peers}{extra}"
