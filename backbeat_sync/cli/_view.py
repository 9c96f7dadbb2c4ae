"""The cluster view: what ``monitor`` and ``demo`` know of a cluster, fed by beat frames and claims.

The view turns messages into *events* (plain dicts: ``monitor --json`` prints
them as NDJSON, :func:`event_line` as the plain lines) and keeps a snapshot:
each cluster's beat, each agent (with its health and whether it went silent),
each task. Lists are in natural order (``peer-discovery-8`` before ``-12``).
"""

from __future__ import annotations

import fnmatch
import re
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any, Final

import attrs

from .. import BeatClock, BeatFrame, ProtocolError, StatusClaim, parse_message
from ._base import HEALTH_TASK_ID

__all__ = [
    "COLLAPSE_AT",
    "DEFAULT_STALE_BEATS",
    "NO_FILTER",
    "STATES",
    "ClusterView",
    "Event",
    "ViewFilter",
    "event_line",
    "natural_key",
    "notes_kind",
]

#: One thing that happened, as JSON-able data; ``event`` is ``beat``, ``task`` or ``agent``.
Event = dict[str, Any]

#: The task states a filter can ask for: the claim states, and ``stale`` (its agent went silent).
STATES: Final = ("waiting", "executing", "done", "failed", "stale")

#: Health claims come every 8 beats (PROTOCOL.md): an agent silent for two such periods is stale.
DEFAULT_STALE_BEATS: Final = 16.0

_DIGITS: Final = re.compile(r"(\d+)")


def natural_key(text: str) -> tuple[str | int, ...]:
    """Sort key that orders the numbers inside ``text`` by value: ``task-8`` before ``task-12``.

    ``re.split`` with a group alternates text and digits (text first, maybe empty),
    so two keys always compare text with text and numbers with numbers.
    """
    return tuple(int(part) if i % 2 else part.casefold() for i, part in enumerate(_DIGITS.split(text)))


@attrs.frozen
class ViewFilter:
    """What ``monitor --agent/--type/--state/--hide-done`` keeps (empty: no condition).

    Attributes:
        agents: glob patterns on ``agent_id`` (``worker-*``); any may match.
        types: operation types; any may match.
        states: task states from :data:`STATES`; any may match (a stale agent's tasks are ``stale``).
        hide_done: leave out tasks in state ``done``.
    """

    agents: tuple[str, ...] = ()
    types: tuple[str, ...] = ()
    states: tuple[str, ...] = ()
    hide_done: bool = False

    def agent(self, agent_id: str) -> bool:
        """Whether this agent's rows are shown."""
        return not self.agents or any(fnmatch.fnmatchcase(agent_id, p) for p in self.agents)

    def task(self, task: dict[str, Any]) -> bool:
        """Whether this task (as in a snapshot, with ``stale``) is shown."""
        state = "stale" if task.get("stale") else task["state"]
        if self.hide_done and task["state"] == "done":
            return False
        if self.types and task.get("operation_type") not in self.types:
            return False
        if self.states and state not in self.states:
            return False
        return self.agent(task["agent_id"])

    def event(self, event: Event) -> bool:
        """Whether this event is shown (beats always are)."""
        if event["event"] == "task":
            return self.task(event)
        if event["event"] == "agent":
            return self.agent(event["agent_id"])
        return True


NO_FILTER: Final = ViewFilter()


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
    # optional workflow fields (docs/workflows.md)
    parent_id: str | None = None
    correlation_id: str | None = None
    depends_on: tuple[str, ...] | None = None
    priority: str | None = None
    work_done: float | None = None
    eta_beats: float | None = None

    @property
    def final(self) -> bool:
        return self.state in ("done", "failed")

    @property
    def workflow(self) -> str:
        """The correlation id (a task that sends none is its own workflow)."""
        return self.correlation_id or self.task_id

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
            "parent_id": self.parent_id,
            "correlation_id": self.workflow,
            "depends_on": None if self.depends_on is None else list(self.depends_on),
            "priority": self.priority or "normal",
            "work_done": self.work_done,
            "eta_beats": self.eta_beats,
        }


@attrs.define
class Agent:
    cluster_id: str
    agent_id: str
    node_id: str
    last_beat: int
    last_seen: float
    health: str | None = None
    notes: str | None = None
    stale: bool = False

    def to_json(self, silent_beats: float) -> dict[str, Any]:
        return {
            "cluster_id": self.cluster_id,
            "agent_id": self.agent_id,
            "node_id": self.node_id,
            "health": self.health,
            "notes": self.notes,
            "last_beat": self.last_beat,
            "stale": self.stale,
            "silent_beats": round(silent_beats, 1),
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
    bar (``fade_bars``), then fade out. An agent with no claim for ``stale_beats`` beats is
    marked stale (its tasks show ``stale``); after twice that it is dropped with
    its tasks. Thread-safe.

    Args:
        cluster_id: only keep messages of this cluster (None: every cluster).
        stale_beats: beats of silence after which an agent is stale (dropped at twice that).
        default_tempo: the tempo (BPM) that counts beats of silence for a cluster
            whose beat frames have not been seen.
        clock: monotonic time source (tests pass their own).
        fade_bars: bars a finished task stays (``monitor --replay N`` keeps N).
    """

    def __init__(
        self,
        cluster_id: str | None = None,
        *,
        stale_beats: float = DEFAULT_STALE_BEATS,
        default_tempo: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
        fade_bars: int = 1,
    ) -> None:
        self.cluster_id = cluster_id
        self.fade_bars = max(1, fade_bars)
        self.stale_beats = stale_beats
        self.default_tempo = default_tempo
        self._now = clock
        self._lock = threading.Lock()
        self._clusters: dict[str, ClusterState] = {}
        self._tasks: dict[tuple[str, str, str], Task] = {}
        self._agents: dict[tuple[str, str], Agent] = {}
        self.messages = 0
        self.frames = 0
        self.invalid = 0
        self.last_invalid = ""

    def _cluster(self, cluster_id: str, frame: BeatFrame | None = None) -> ClusterState:
        c = self._clusters.get(cluster_id)
        if c is None:
            tempo = frame.tempo_bpm if frame is not None else self.default_tempo
            bar = frame.bar_length if frame is not None else 4
            clock = BeatClock(tempo_bpm=tempo, bar_length=bar)
            c = self._clusters[cluster_id] = ClusterState(cluster_id, clock)
        return c

    # -- taking messages in ------------------------------------------------------------

    def feed(self, data: bytes) -> list[str]:
        """Parse one message off the wire and take it in.

        Returns:
            Plain event lines worth printing (see :meth:`frame` and :meth:`claim`).
        """
        return _lines(self.feed_events(data))

    def feed_events(self, data: bytes) -> list[Event]:
        """Parse one message off the wire and take it in.

        Returns:
            The events it caused (none for a message that breaks the protocol: it is counted).
        """
        try:
            message = parse_message(data)
        except ProtocolError as exc:
            with self._lock:
                self.invalid += 1
                self.last_invalid = str(exc)
            return []
        if isinstance(message, BeatFrame):
            return self.frame_events(message)
        return self.claim_events(message)

    def frame(self, frame: BeatFrame, arrival: float | None = None) -> list[str]:
        """Take in a beat frame.

        Returns:
            A line for each downbeat (bar, beat, tempo, measured BPM, drift), and for
            each agent that went stale or was dropped.
        """
        return _lines(self.frame_events(frame, arrival))

    def frame_events(self, frame: BeatFrame, arrival: float | None = None) -> list[Event]:
        """Take in a beat frame.

        Returns:
            A ``beat`` event for an accepted frame, then any ``agent`` stale/dropped events.
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
            beat = {"event": "beat", "downbeat": frame.downbeat, **self._cluster_json(c)}
            return [beat, *self._sweep()]

    def claim(self, claim: StatusClaim) -> list[str]:
        """Take in a status claim.

        Returns:
            A line when a task appears, changes state or phase, or gets a new kind of
            notes (budget warnings), and when an agent's health state changes.
        """
        return _lines(self.claim_events(claim))

    def claim_events(self, claim: StatusClaim) -> list[Event]:
        """Take in a status claim.

        Returns:
            A ``task`` event when a task appears or changes (``change``: ``new``,
            ``state``, ``phase``, ``notes``); an ``agent`` event when an agent's
            health changes (``health``) or a stale agent speaks again (``back``).
        """
        if self.cluster_id is not None and claim.cluster_id != self.cluster_id:
            return []
        now = self._now()
        with self._lock:
            self.messages += 1
            c = self._cluster(claim.cluster_id)
            key2 = (claim.cluster_id, claim.agent_id)
            events: list[Event] = []
            agent = self._agents.get(key2)
            if agent is None:
                agent = self._agents[key2] = Agent(
                    claim.cluster_id, claim.agent_id, claim.node_id, claim.beat_index, now
                )
            elif agent.stale:
                silent = self._silent_beats(agent, now)
                agent.stale = False
                events.append(self._agent_event(agent, "back", silent))
            agent.node_id, agent.last_beat, agent.last_seen = claim.node_id, claim.beat_index, now
            if claim.task_id == HEALTH_TASK_ID:
                changed = agent.health != claim.state
                agent.health, agent.notes = claim.state, claim.notes
                if changed:
                    events.append(self._agent_event(agent, "health", 0.0))
                return events
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
                parent_id=claim.parent_id,
                correlation_id=claim.correlation_id,
                depends_on=claim.depends_on,
                priority=claim.priority,
                work_done=claim.work_done,
                eta_beats=claim.eta_beats,
            )
            key = (claim.cluster_id, claim.agent_id, claim.task_id)
            before = self._tasks.get(key)
            if task.final:
                task.finished_at = self._beat(c, claim.beat_index)
            self._tasks[key] = task
        if before is None:
            change = "new"
        elif before.state != task.state:
            change = "state"
        elif before.phase != task.phase:
            change = "phase"
        elif notes_kind(before.notes) != notes_kind(task.notes):
            change = "notes"
        else:
            return events
        events.append({"event": "task", "change": change, **task.to_json(), "stale": False})
        return events

    def sweep(self) -> list[Event]:
        """Mark agents silent for ``stale_beats`` beats stale, drop those silent for twice that.

        Called on every beat frame; call it also on a timer, so that agents go stale
        when the pulse is silent too.

        Returns:
            An ``agent`` event (``change``: ``stale`` or ``dropped``) for each.
        """
        with self._lock:
            return self._sweep()

    def _sweep(self) -> list[Event]:
        now = self._now()
        events: list[Event] = []
        for key, agent in list(self._agents.items()):
            silent = self._silent_beats(agent, now)
            if silent >= 2 * self.stale_beats:
                del self._agents[key]
                for tkey in [k for k in self._tasks if k[:2] == key]:
                    del self._tasks[tkey]
                events.append(self._agent_event(agent, "dropped", silent))
            elif silent >= self.stale_beats and not agent.stale:
                agent.stale = True
                events.append(self._agent_event(agent, "stale", silent))
        return events

    def _silent_beats(self, agent: Agent, now: float) -> float:
        c = self._clusters.get(agent.cluster_id)
        f = c.last_frame if c is not None else None
        tempo = f.tempo_bpm if f is not None else self.default_tempo
        return (now - agent.last_seen) * tempo / 60.0

    @staticmethod
    def _agent_event(agent: Agent, change: str, silent: float) -> Event:
        return {"event": "agent", "change": change, **agent.to_json(silent)}

    @staticmethod
    def _beat(c: ClusterState, fallback: int) -> int:
        return c.last_frame.beat_index if c.last_frame is not None else fallback

    def _fade(self, c: ClusterState) -> None:
        """Drop this cluster's tasks that finished more than a bar ago (lock held)."""
        if c.last_frame is None:
            return
        now, bar = c.last_frame.beat_index, max(1, c.last_frame.bar_length) * self.fade_bars
        for key, task in list(self._tasks.items()):
            if (
                task.cluster_id == c.cluster_id
                and task.finished_at is not None
                and now - task.finished_at > bar
            ):
                del self._tasks[key]

    # -- reading -------------------------------------------------------------------------

    @staticmethod
    def _cluster_json(c: ClusterState) -> dict[str, Any]:
        snap = c.clock.snapshot()
        f = c.last_frame
        bar_length = f.bar_length if f is not None else snap.bar_length
        return {
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

    def snapshot(self, view_filter: ViewFilter = NO_FILTER) -> dict[str, Any]:
        """Everything known now (that ``view_filter`` keeps), as plain JSON-able data.

        Returns:
            ``{"clusters": [...], "agents": [...], "tasks": [...], "task_counts": {...},
            "hidden_tasks": n, "messages": n, "invalid_messages": n}``; each cluster has
            ``cluster_id``, ``current_beat``, ``bar``, ``beat_in_bar``, ``bar_length``,
            ``tempo_bpm``, ``measured_bpm``, ``tempo_drift``, ``window_id``,
            ``seconds_since_beat``; each agent ``health`` and ``notes`` (of its last
            health claim; null before one), ``last_beat``, ``stale``, ``silent_beats``;
            each task the claim's fields (``last_beat`` is its ``beat_index``) and
            ``stale``. ``task_counts`` counts the shown tasks by state (``stale``
            for a stale agent's), ``hidden_tasks`` those the filter left out. Tasks
            come in tree order (children after their parent, each with its ``depth``;
            ``priority`` is ``normal`` and ``correlation_id`` the task's own id when its
            claim had none); ``workflows`` has each workflow of two or more tasks, with counts.
        """
        now = self._now()
        with self._lock:
            clusters = [self._cluster_json(c) for c in sorted(self._clusters.values(), key=_cluster_key)]
            agents = [
                a.to_json(self._silent_beats(a, now))
                for a in sorted(self._agents.values(), key=_agent_key)
                if view_filter.agent(a.agent_id)
            ]
            stale = {k for k, a in self._agents.items() if a.stale}
            every = [
                {**t.to_json(), "stale": (t.cluster_id, t.agent_id) in stale, "depth": depth}
                for t, depth in tree_order(sorted(self._tasks.values(), key=_task_key))
            ]
            messages, invalid = self.messages, self.invalid
        tasks = [t for t in every if view_filter.task(t)]
        counts: dict[str, int] = {}
        for t in tasks:
            state = "stale" if t["stale"] else t["state"]
            counts[state] = counts.get(state, 0) + 1
        return {
            "clusters": clusters,
            "agents": agents,
            "tasks": tasks,
            "task_counts": counts,
            "hidden_tasks": len(every) - len(tasks),
            "workflows": workflows(tasks),
            "messages": messages,
            "invalid_messages": invalid,
        }


#: A workflow (correlation group) of more operations than this is shown collapsed (its roots
#: and one line of counts) in the rich view; the JSON snapshot always has every task.
COLLAPSE_AT: Final = 10


def tree_order(tasks: list[Task]) -> list[tuple[Task, int]]:
    """``tasks`` as trees: each workflow's roots in the given order, each followed by its children
    (by ``parent_id``, across agents), depth first; with each task its depth (0 for a root).

    A task whose parent is not among ``tasks`` (finished and faded, or never seen) is a root.
    """
    by_id: dict[tuple[str, str, str], Task] = {}
    for t in tasks:
        by_id.setdefault((t.cluster_id, t.workflow, t.task_id), t)
    children: dict[int, list[Task]] = {}
    roots: list[Task] = []
    for t in tasks:
        parent = None if t.parent_id is None else by_id.get((t.cluster_id, t.workflow, t.parent_id))
        if parent is None or parent is t:
            roots.append(t)
        else:
            children.setdefault(id(parent), []).append(t)
    first: dict[tuple[str, str], int] = {}  # a workflow's roots together, at its first one's place
    for i, t in enumerate(roots):
        first.setdefault((t.cluster_id, t.workflow), i)
    roots.sort(key=lambda t: first[(t.cluster_id, t.workflow)])
    out: list[tuple[Task, int]] = []
    seen: set[int] = set()

    def walk(t: Task, depth: int) -> None:
        if id(t) in seen:  # a cycle of parent ids (a confused sender): each task once
            return
        seen.add(id(t))
        out.append((t, depth))
        for child in children.get(id(t), ()):
            walk(child, depth + 1)

    for root in roots:
        walk(root, 0)
    for t in tasks:  # only tasks caught in a cycle are left
        if id(t) not in seen:
            walk(t, 0)
    return out


def workflows(tasks: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One summary per workflow of two or more tasks (snapshot rows in tree order)."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for t in tasks:
        groups.setdefault((t["cluster_id"], t["correlation_id"]), []).append(t)
    out = []
    for (cluster_id, correlation_id), members in groups.items():
        if len(members) < 2:
            continue
        states: dict[str, int] = {}
        for t in members:
            states[t["state"]] = states.get(t["state"], 0) + 1
        out.append(
            {
                "cluster_id": cluster_id,
                "correlation_id": correlation_id,
                "operations": len(members),
                "agents": sorted({t["agent_id"] for t in members}),
                "states": dict(sorted(states.items())),
                "waiting": [t["task_id"] for t in members if t["state"] == "waiting"],
            }
        )
    return out


def _cluster_key(c: ClusterState) -> tuple[str | int, ...]:
    return natural_key(c.cluster_id)


def _agent_key(a: Agent) -> tuple[tuple[str | int, ...], ...]:
    return (natural_key(a.cluster_id), natural_key(a.agent_id))


def _task_key(t: Task) -> tuple[tuple[str | int, ...], ...]:
    return (natural_key(t.cluster_id), natural_key(t.agent_id), natural_key(t.task_id))


def notes_kind(notes: str) -> str:
    """Notes up to the first digit: a budget warning differs from the phase line, a beat count does not."""
    for i, ch in enumerate(notes):
        if ch.isdigit():
            return notes[:i]
    return notes


def event_line(event: Event) -> str | None:
    """The plain line of an event (None for an event that has none: a beat that is no downbeat)."""
    kind = event["event"]
    if kind == "beat":
        if not event["downbeat"]:
            return None
        return (
            f"{event['cluster_id']}: bar {event['bar']} beat {event['current_beat']}"
            f" tempo {event['tempo_bpm']:g} BPM"
            f" measured {event['measured_bpm']:.1f} BPM drift {event['tempo_drift']}"
        )
    where = f"{event['cluster_id']}/{event['agent_id']}"
    if kind == "agent":
        change = event["change"]
        if change == "health":
            return f"{where}: health {event['health']}: {event['notes']}"
        if change == "back":
            return f"{where}: back after {event['silent_beats']:g} silent beats"
        return f"{where}: {change}, no claim for {event['silent_beats']:g} beats"
    return _task_line(event)


def _task_line(task: dict[str, Any]) -> str:
    where = f"{task['agent_id']}/{task['task_id']}"
    if task.get("parent_id") is not None:
        where += f" (in {task['parent_id']})"
    if task.get("priority", "normal") != "normal":
        where += f" [{task['priority']}]"
    what = task["state"] if task["phase"] is None else f"{task['state']}:{task['phase']}"
    if task["state"] == "failed":
        return f"  beat {task['last_beat']} {where} {what} - {task['notes']}"
    peers = f" peers {task['peer_count']}" if task["peer_count"] is not None else ""
    extra = "" if task["notes"].startswith("P2P ") else f" - {task['notes']}"  # e.g. a budget warning
    progress = f"{task['progress']:.0%} {task['beats_left']} beats left"
    return f"  beat {task['last_beat']} {where} {what} {progress}{peers}{extra}"


def _lines(events: Iterable[Event]) -> list[str]:
    return [line for e in events if (line := event_line(e)) is not None]
