"""The ``backbeat-sync`` command: ``demo``, ``pulse``, ``monitor`` and ``status``.

Run ``backbeat-sync --help`` (or ``python -m backbeat_sync --help``). Every
command reads the ``CHORUS_BACKBEAT_*`` environment variables; flags win over
them. A user error (bad flag value, no server at that URL, wrong credentials)
prints one line on stderr and exits with code 2, never a traceback.

Live views use rich (the ``cli`` extra) when stdout is a terminal; otherwise,
or with ``--plain``, output is plain lines that scripts and logs can read.
This module is the only place the package configures loguru sinks.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from types import FrameType
from typing import Any, Final, NoReturn, TextIO

import attrs
from loguru import logger

from . import (
    BackbeatConfig,
    BackbeatConnectionError,
    BackbeatDisabled,
    BackbeatError,
    BeatBudgetExceeded,
    BeatClock,
    BeatFrame,
    Integration,
    OperationPhase,
    ProtocolError,
    StatusClaim,
    __version__,
    beat_budget,
    parse_message,
    track_operation,
)

__all__ = ["ClusterView", "main"]

PROG: Final = "backbeat-sync"
EXIT_OK: Final = 0
EXIT_NO_BEAT: Final = 1
EXIT_USAGE: Final = 2
HEALTH_TASK_ID: Final = "chorus-p2p-health"
DEMO_CLUSTER: Final = "backbeat-demo"
DEMO_AGENT: Final = "demo-agent"
DEMO_NODE: Final = "12D3KooWDemoAgent"

# --------------------------------------------------------------------------------------------
# errors and argument parsing
# --------------------------------------------------------------------------------------------


class _UsageError(Exception):
    """A user error: printed as one line on stderr, exit code 2."""


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (and no SystemExit inside ``main``)."""

    def error(self, message: str) -> NoReturn:
        raise _UsageError(f"{self.prog}: {message} (see {self.prog} --help)")


def _number(kind: type[float] | type[int], low: float, high: float | None = None) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            what = "an integer" if kind is int else "a number"
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None
        if isinstance(value, float) and not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
        if value < low or (high is not None and value > high):
            bound = f">= {low:g}" if high is None else f"between {low:g} and {high:g}"
            raise argparse.ArgumentTypeError(f"{text!r} must be {bound}")
        return value

    parse.__name__ = kind.__name__
    return parse


def _tempo(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not (math.isfinite(value) and 0 < value <= 6000):
        raise argparse.ArgumentTypeError(f"{text!r} must be a tempo in BPM, > 0 and <= 6000")
    return value


_positive_int = _number(int, 1)
_port = _number(int, 0, 65535)
_seconds = _number(float, 0.0)

_EPILOGS: Final = {
    "demo": """examples:
  backbeat-sync demo                         # in-process pulse, 120 BPM, 8 bars
  backbeat-sync demo --bars 2 --tempo 240    # shorter and faster
  backbeat-sync demo --nats nats://localhost:4222          # the same on a real server
  backbeat-sync demo --metrics-port 9464     # and serve Prometheus metrics meanwhile

The demo never joins your real cluster: it uses --cluster (default backbeat-demo),
and on a real server it runs its own pulse for that cluster unless --no-pulse.""",
    "pulse": """examples:
  backbeat-sync pulse --nats nats://localhost:4222 --cluster chorus-dev --tempo 60
  CHORUS_BACKBEAT_CLUSTER_ID=chorus-dev backbeat-sync pulse --tempo 2 --bar 4

Runs until Ctrl-C (or SIGTERM, or --beats N beats) and stops cleanly.""",
    "monitor": """examples:
  backbeat-sync monitor --nats nats://localhost:4222
  backbeat-sync monitor --nats nats://localhost:4222 --cluster chorus-dev
  backbeat-sync monitor --once --json | jq '.tasks[] | select(.state == "failed")'

--once listens until one full beat has passed (or --timeout) and prints one
snapshot; exit code 1 if nothing arrived in time.""",
    "status": """examples:
  backbeat-sync status --nats nats://localhost:4222
  backbeat-sync status --json --timeout 10

exit codes: 0 connected and beats arrive; 1 connected but no beat in time, or
BACKBEAT disabled (CHORUS_BACKBEAT_ENABLED=false); 2 server unreachable or bad argument.""",
}


def _connection_args(p: argparse.ArgumentParser, *, nats_default: str = "$CHORUS_BACKBEAT_NATS_URL") -> None:
    p.add_argument(
        "--nats",
        metavar="URL",
        help=f"NATS server URL(s), comma-separated; local:// = in-process pulse (default {nats_default})",
    )
    p.add_argument("--cluster", metavar="ID", help="cluster id (default $CHORUS_BACKBEAT_CLUSTER_ID)")
    p.add_argument(
        "--connect-timeout",
        type=_seconds,
        metavar="S",
        help="give up connecting to NATS after S seconds (default 5)",
    )
    p.add_argument("-v", "--verbose", action="count", default=0, help="log more (-v info, -vv debug)")
    p.add_argument("--plain", action="store_true", help="plain lines even on a terminal (no rich view)")


def build_parser() -> argparse.ArgumentParser:
    """The ``backbeat-sync`` argument parser (exposed for the docs and tests)."""
    parser = _Parser(
        prog=PROG,
        description="Follow, drive and inspect a BACKBEAT cluster (a distributed metronome over NATS).",
        epilog="Start with: backbeat-sync demo   (no server needed). Each command has --help.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    def command(name: str, help_text: str) -> argparse.ArgumentParser:
        return sub.add_parser(
            name,
            help=help_text,
            description=help_text,
            epilog=_EPILOGS[name],
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )

    demo = command("demo", "run a sample agent: four operation flows, budgets, a live view, a summary")
    _connection_args(demo, nats_default="local://, the in-process pulse")
    demo.add_argument(
        "--tempo", type=_tempo, default=120.0, metavar="BPM", help="beats per minute (default 120)"
    )
    demo.add_argument("--bar", type=_positive_int, default=4, metavar="N", help="beats per bar (default 4)")
    demo.add_argument("--bars", type=_positive_int, default=8, metavar="N", help="bars to run (default 8)")
    demo.add_argument("--no-pulse", action="store_true", help="with --nats: follow a pulse that already runs")
    demo.add_argument("--metrics-port", type=_port, metavar="PORT", help="serve Prometheus metrics on PORT")

    pulse = command("pulse", "run the cluster's metronome: publish beat frames on NATS")
    _connection_args(pulse)
    pulse.add_argument(
        "--tempo",
        type=_tempo,
        metavar="BPM",
        help="beats per minute (default $CHORUS_BACKBEAT_TEMPO_BPM or 2)",
    )
    pulse.add_argument(
        "--bar",
        type=_positive_int,
        metavar="N",
        help="beats per bar (default $CHORUS_BACKBEAT_BAR_LENGTH or 4)",
    )
    pulse.add_argument(
        "--start-index",
        type=_number(int, 0),
        metavar="N",
        help="first beat index (default: from the wall clock)",
    )
    pulse.add_argument(
        "--beats", type=_positive_int, metavar="N", help="stop after N beats (default: run until Ctrl-C)"
    )

    monitor = command("monitor", "watch a cluster: beats, tempo, drift, every agent's tasks")
    _connection_args(monitor)
    monitor.add_argument(
        "--subject", default="backbeat.>", help="subject to subscribe to (default backbeat.>)"
    )
    monitor.add_argument(
        "--once", action="store_true", help="print one snapshot after a full beat, then exit"
    )
    monitor.add_argument("--json", action="store_true", help="with --once: the snapshot as JSON")
    monitor.add_argument(
        "--timeout",
        type=_seconds,
        default=75.0,
        metavar="S",
        help="with --once: give up after S seconds (default 75)",
    )

    status = command("status", "check the connection and the beat; the HAP status line and health fields")
    _connection_args(status)
    status.add_argument("--json", action="store_true", help="print the health as JSON")
    status.add_argument(
        "--timeout",
        type=_seconds,
        metavar="S",
        help="wait at most S seconds for beats (default 1.5 beats, at least 5 s)",
    )
    return parser


# --------------------------------------------------------------------------------------------
# output, logging and signals
# --------------------------------------------------------------------------------------------


def _rich_available() -> bool:
    try:
        import rich  # noqa: F401
    except ImportError:
        return False
    return True


@attrs.define
class _Out:
    """Where a command writes, and whether it draws rich views there."""

    stream: TextIO
    rich: bool
    #: Library log lines are held back until the command is connected: if connecting
    #: fails, the one error line says it all (``-v`` shows them anyway).
    logs_open: threading.Event = attrs.field(factory=threading.Event)

    @classmethod
    def for_args(cls, args: argparse.Namespace, stream: TextIO) -> _Out:
        isatty = getattr(stream, "isatty", None)
        tty = bool(isatty()) if callable(isatty) else False
        return cls(stream, tty and not args.plain and _rich_available())

    def line(self, text: str = "") -> None:
        self.stream.write(text + "\n")
        self.stream.flush()

    def console(self) -> Any:
        from rich.console import Console

        return Console(file=self.stream)


def _write_stderr(message: Any) -> None:
    sys.stderr.write(str(message))


#: The id of the stderr handler restored by the last ``main()`` (None: loguru's own, id 0).
_stderr_handler: int | None = None


@contextlib.contextmanager
def _cli_logging(verbosity: int, gate: threading.Event, *, quiet: bool = False) -> Iterator[None]:
    """Send the library's log lines to stderr (WARNING, or INFO/DEBUG with -v/-vv); undo on exit.

    Without ``-v``, lines are dropped until ``gate`` is set (the command is connected);
    with ``quiet`` (the demo, whose view shows the budget warnings) only errors show.
    """
    global _stderr_handler
    level = ("ERROR" if quiet else "WARNING") if verbosity <= 0 else "INFO" if verbosity == 1 else "DEBUG"
    removed_default = True
    try:
        logger.remove(0 if _stderr_handler is None else _stderr_handler)
    except ValueError:
        removed_default = False

    def write(message: Any) -> None:
        if verbosity > 0 or gate.is_set():
            sys.stderr.write(str(message))  # looked up per line: rich's Live redirects stderr

    sink = logger.add(
        write,
        level=level,
        format="<dim>{time:HH:mm:ss}</dim> <level>{level: <7}</level> {message}",
        colorize=None,
    )
    logger.enable("backbeat_sync")
    try:
        yield
    finally:
        logger.disable("backbeat_sync")
        logger.remove(sink)
        if removed_default:  # put loguru's stderr handler back (looked up per line, as pytest swaps it)
            _stderr_handler = logger.add(_write_stderr, colorize=False)


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """In the main thread, turn SIGTERM into KeyboardInterrupt (so it stops as cleanly as Ctrl-C)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _config(args: argparse.Namespace, **defaults: Any) -> BackbeatConfig:
    """The config from ``CHORUS_BACKBEAT_*``, then ``defaults``, then the flags."""
    overrides = dict(defaults)
    if getattr(args, "nats", None):
        overrides["nats_url"] = args.nats
    if getattr(args, "cluster", None):
        overrides["cluster_id"] = args.cluster
    if getattr(args, "connect_timeout", None) is not None:
        overrides["connect_timeout"] = args.connect_timeout
    return BackbeatConfig.from_env(**overrides)


# --------------------------------------------------------------------------------------------
# the cluster view: what demo and monitor show
# --------------------------------------------------------------------------------------------


@attrs.define
class _Task:
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
class _Cluster:
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
        self._clusters: dict[str, _Cluster] = {}
        self._tasks: dict[tuple[str, str, str], _Task] = {}
        self._agents: dict[tuple[str, str], _Task] = {}
        self.messages = 0
        self.frames = 0
        self.invalid = 0
        self.last_invalid = ""

    def _cluster(self, cluster_id: str, frame: BeatFrame | None = None) -> _Cluster:
        c = self._clusters.get(cluster_id)
        if c is None:
            tempo = frame.tempo_bpm if frame is not None else 60.0
            bar = frame.bar_length if frame is not None else 4
            c = self._clusters[cluster_id] = _Cluster(cluster_id, BeatClock(tempo_bpm=tempo, bar_length=bar))
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
        task = _Task(
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
                or _notes_kind(before.notes) != _notes_kind(task.notes)
            )
        return [_task_line(task)] if changed else []

    @staticmethod
    def _beat(c: _Cluster, fallback: int) -> int:
        return c.last_frame.beat_index if c.last_frame is not None else fallback

    def _fade(self, c: _Cluster) -> None:
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


def _notes_kind(notes: str) -> str:
    """Notes up to the first digit: a budget warning differs from the phase line, a beat count does not."""
    for i, ch in enumerate(notes):
        if ch.isdigit():
            return notes[:i]
    return notes


def _task_line(task: _Task) -> str:
    where = f"{task.agent_id}/{task.task_id}"
    what = task.state if task.phase is None else f"{task.state}:{task.phase}"
    if task.state == "failed":
        return f"  beat {task.beat_index} {where} {what} - {task.notes}"
    peers = f" peers {task.peer_count}" if task.peer_count is not None else ""
    extra = "" if task.notes.startswith("P2P ") else f" - {task.notes}"  # e.g. a budget warning
    progress = f"{task.progress:.0%} {task.beats_left} beats left"
    return f"  beat {task.beat_index} {where} {what} {progress}{peers}{extra}"


# --------------------------------------------------------------------------------------------
# rich rendering
# --------------------------------------------------------------------------------------------

_DRIFT_STYLE: Final = {"acceptable": "green", "warning": "yellow", "critical": "bold red", "unknown": "dim"}
_STATE_STYLE: Final = {"executing": "cyan", "waiting": "dim", "done": "green", "failed": "red"}


def render_view(snapshot: dict[str, Any], *, title: str = "BACKBEAT", footer: str = "") -> Any:
    """A rich renderable of a :meth:`ClusterView.snapshot` (header, agents, tasks)."""
    from rich.console import Group
    from rich.panel import Panel
    from rich.table import Table
    from rich.text import Text

    parts: list[Any] = []
    if not snapshot["clusters"]:
        parts.append(Text("waiting for the first beat ...", style="dim"))
    for c in snapshot["clusters"]:
        line = Text()
        line.append(f"{c['cluster_id']}  ", style="bold")
        if c["current_beat"] is None:
            line.append("no beat yet", style="dim")
        else:
            marks = "".join(
                "●" if i + 1 == c["beat_in_bar"] else "○" for i in range(min(int(c["bar_length"]), 16))
            )
            line.append(f"beat {c['current_beat']}  bar {c['bar']} ")
            line.append(marks, style="magenta")
            line.append(f"  tempo {c['tempo_bpm']:g} BPM  measured {c['measured_bpm']:.1f} BPM  drift ")
            line.append(c["tempo_drift"], style=_DRIFT_STYLE.get(c["tempo_drift"], ""))
        parts.append(line)
    tasks = Table(expand=True, box=None, pad_edge=False, header_style="bold")
    several_agents = len({(t["cluster_id"], t["agent_id"]) for t in snapshot["tasks"]}) > 1
    columns: list[tuple[str, dict[str, Any]]] = [
        ("task", {"no_wrap": True}),
        ("type", {"no_wrap": True}),
        ("state", {"no_wrap": True, "min_width": 9}),
        ("phase", {"no_wrap": True, "min_width": 11}),
        ("progress", {"no_wrap": True, "min_width": 15}),
        ("left", {"justify": "right", "no_wrap": True, "min_width": 4}),
        ("beat", {"justify": "right", "no_wrap": True}),
        ("notes", {"overflow": "ellipsis", "no_wrap": True, "ratio": 1}),
    ]
    if several_agents:
        columns.insert(0, ("agent", {"no_wrap": True}))
    for name, kw in columns:
        tasks.add_column(name, **kw)
    for t in snapshot["tasks"]:
        state = t["state"]
        filled = round(10 * t["progress"])
        bar = Text("█" * filled, style=_STATE_STYLE.get(state, "cyan"))
        bar.append("░" * (10 - filled), style="dim")
        bar.append(f" {t['progress']:4.0%}")
        cells: list[Any] = [t["agent_id"]] if several_agents else []
        tasks.add_row(
            *cells,
            t["task_id"],
            t["operation_type"] or "",
            Text(state, style=_STATE_STYLE.get(state, "")),
            t["phase"] or "",
            bar,
            str(t["beats_left"]),
            str(t["last_beat"]),
            Text(t["notes"], style="red" if state == "failed" else "dim"),
            style="dim" if state == "done" else "",
        )
    parts.append(tasks if snapshot["tasks"] else Text("no tasks", style="dim"))
    health = [a for a in snapshot["agents"] if a["health"] is not None]
    if health:
        agents = Table(box=None, pad_edge=False, header_style="bold", expand=True)
        for name in ("agent", "node", "health", "beat"):
            agents.add_column(name, no_wrap=True)
        agents.add_column("notes", no_wrap=True, overflow="ellipsis", ratio=1, min_width=8)
        for a in health:
            agents.add_row(
                a["agent_id"],
                a["node_id"],
                Text(a["health"], style=_STATE_STYLE.get(a["health"], "")),
                str(a["last_beat"]),
                Text(a["notes"], style="dim"),
            )
        parts.append(agents)
    if footer:
        parts.append(Text(footer, style="dim"))
    return Panel(Group(*parts), title=title, border_style="blue")


def _plain_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    cells = [[str(h) for h in headers]] + [[str(v) for v in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    out = ["  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip() for r in cells]
    out.insert(1, "  ".join("-" * w for w in widths))
    return out


def _print_table(out: _Out, title: str, headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    if out.rich:
        from rich.table import Table

        table = Table(title=title, title_justify="left")
        for h in headers:
            table.add_column(h)
        for row in rows:
            table.add_row(*(str(v) for v in row))
        out.console().print(table)
    else:
        out.line(title)
        for line in _plain_table(headers, rows):
            out.line(line)


class _Screen:
    """Shows a :class:`ClusterView` live: a rich panel redrawn a few times a second, or plain lines."""

    def __init__(self, out: _Out, view: ClusterView, title: str, footer: Callable[[], str] = str) -> None:
        self._out = out
        self._view = view
        self._title = title
        self._footer = footer
        self._lock = threading.Lock()
        self._live: Any = None

    def __enter__(self) -> _Screen:
        if self._out.rich:
            from rich.live import Live

            self._live = Live(
                console=self._out.console(),
                refresh_per_second=8,
                get_renderable=lambda: render_view(
                    self._view.snapshot(), title=self._title, footer=self._footer()
                ),
            )
            self._live.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._live is not None:
            self._live.refresh()
            self._live.stop()

    def lines(self, lines: list[str]) -> None:
        """Print event lines (plain mode only; the rich view shows the state instead)."""
        if self._live is not None or not lines:
            return
        with self._lock:
            for line in lines:
                self._out.line(line)


# --------------------------------------------------------------------------------------------
# the demo agent
# --------------------------------------------------------------------------------------------


@attrs.define
class _Outcome:
    flow: str
    outcome: str  # "done", "stopped" (budget), "failed"
    beats_used: float
    detail: str = ""


#: flow name -> (API shown in the summary, beat budget)
_FLOWS: Final = {
    "election": ("track_operation", 5),
    "dht_store": ("track_operation", 3),
    "pubsub_sync": ("@beat_budget", 2),
    "peer_discovery": ("@beat_budget", 3),
}


class _Demo:
    """A sample agent: each bar, the seed's four flows run in threads under beat budgets."""

    def __init__(self, args: argparse.Namespace, out: _Out) -> None:
        self.args = args
        self.out = out
        overrides: dict[str, Any] = {
            "cluster_id": args.cluster or DEMO_CLUSTER,
            "agent_id": DEMO_AGENT,
            "tempo_bpm": args.tempo,
            "bar_length": args.bar,
        }
        if args.nats:
            overrides["nats_url"] = args.nats
        if args.connect_timeout is not None:
            overrides["connect_timeout"] = args.connect_timeout
        self.config = BackbeatConfig.from_env(defaults={"nats_url": f"local://{DEMO_CLUSTER}"}, **overrides)
        self.view = ClusterView(self.config.cluster_id)
        self.results: list[_Outcome] = []
        self._lock = threading.Lock()
        self._beat = threading.Condition()
        self._last_beat: BeatFrame | None = None
        self._round = 0
        self._screen: _Screen | None = None
        self.integration: Integration | None = None

    # -- callbacks (the integration's callback thread) ---------------------------------

    def _on_beat(self, frame: BeatFrame) -> None:
        lines = self.view.frame(frame)
        if self._screen is not None:
            self._screen.lines(lines)
        with self._beat:
            self._last_beat = frame
            self._beat.notify_all()

    def _on_claim(self, claim: StatusClaim) -> None:
        lines = self.view.claim(claim)
        if self._screen is not None:
            self._screen.lines(lines)

    def _wait_beat(self, predicate: Callable[[BeatFrame], bool], timeout: float) -> bool:
        with self._beat:
            return self._beat.wait_for(
                lambda: self._last_beat is not None and predicate(self._last_beat), timeout
            )

    # -- the four flows ------------------------------------------------------------------

    def _beats(self, n: float) -> float:
        assert self.integration is not None
        return n * self.integration.clock.beat_duration

    def _busy(self, beats: float) -> None:
        """Plain blocking work, in short slices (a budget can interrupt it between two)."""
        end = time.monotonic() + self._beats(beats)
        while (left := end - time.monotonic()) > 0:
            time.sleep(min(left, 0.005))

    def _flows(self) -> dict[str, Callable[[int], object]]:
        integration = self.integration

        def election(r: int) -> object:
            with track_operation(
                f"election-{r}",
                "election",
                beats=5,
                integration=integration,
                manual_phases=True,
                data={"candidates": 3, "quorum": 2},
            ) as op:
                op.set_phase(OperationPhase.CONNECTING, peers=3)
                op.sleep(self._beats(0.75))
                op.set_phase(OperationPhase.NEGOTIATING, peers=3)
                op.sleep(self._beats(1.25))
                op.set_phase(OperationPhase.EXECUTING, peers=3)
                op.sleep(self._beats(0.75))
            return "leader elected"

        def dht_store(r: int) -> object:
            with track_operation(
                f"dht-store-k{r}",
                "dht_store",
                beats=3,
                peers=3,
                integration=integration,
                data={"key": f"k{r}"},
            ) as op:
                op.sleep(self._beats(0.5))
                op.set_phase(OperationPhase.EXECUTING, peers=5)
                op.sleep(self._beats(1.25))
            return "stored"

        @beat_budget(2, integration=integration, operation_type="pubsub_sync", name="pubsub-sync")
        def sync_topic(topic: str) -> int:
            self._busy(1.0)
            return 3

        @beat_budget(3, integration=integration, operation_type="peer_discovery", name="peer-discovery")
        def discover_peers(target: int) -> list[str]:
            peers = []
            for n in range(target):  # 10 peers at half a beat each: 5 beats, over its budget of 3
                self._busy(0.5)
                peers.append(f"peer-{n}")
            return peers

        return {
            "election": election,
            "dht_store": dht_store,
            "pubsub_sync": lambda r: sync_topic(f"chorus/tasks/{r}"),
            "peer_discovery": lambda r: discover_peers(10),
        }

    def _run_flow(self, name: str, fn: Callable[[int], object], r: int) -> None:
        assert self.integration is not None
        clock = self.integration.clock
        start = clock.budget_position()
        try:
            fn(r)
        except BeatBudgetExceeded as exc:
            how = "late" if exc.late else "interrupted"
            outcome = _Outcome(name, "stopped", exc.beats_used, f"{how} at {exc.beats_used:.2f} beats")
        except Exception as exc:  # the demo must finish and report, whatever a flow does
            outcome = _Outcome(
                name, "failed", clock.budget_position() - start, f"{type(exc).__name__}: {exc}"
            )
        else:
            outcome = _Outcome(name, "done", clock.budget_position() - start)
        with self._lock:
            self.results.append(outcome)

    # -- the run ---------------------------------------------------------------------

    def _footer(self) -> str:
        with self._lock:
            stopped = sum(1 for o in self.results if o.outcome == "stopped")
            done = sum(1 for o in self.results if o.outcome == "done")
        return (
            f"round {self._round}/{self.args.bars}  ·  operations done {done}, stopped by budget {stopped}"
            "  ·  Ctrl-C to stop"
        )

    def run(self) -> int:
        args, cfg = self.args, self.config
        where = "the in-process pulse" if cfg.is_local else cfg.masked_url
        seconds = args.bars * args.bar * 60.0 / args.tempo
        self.out.line(
            f"{PROG} demo: agent {cfg.agent_id} in cluster {cfg.cluster_id} on {where}, {args.tempo:g} BPM,"
            f" {args.bars} bar(s) of {args.bar} beats (about {seconds:.0f} s)"
        )
        pulse = None
        if not cfg.is_local and not args.no_pulse:
            from .pulse import Pulse

            sign = None
            if cfg.signing_key is not None:
                from .signing import SigningKey

                sign = SigningKey.load(cfg.signing_key, cfg.signing_key_id).sign_frame
            pulse = Pulse(cfg, tempo_bpm=args.tempo, bar_length=args.bar, sign=sign)
            pulse.start()
        try:
            return self._run_agent()
        finally:
            if pulse is not None:
                pulse.stop()

    def _run_agent(self) -> int:
        args = self.args
        integration = self.integration = Integration(self.config, node_id=DEMO_NODE)
        integration.on_beat(self._on_beat)
        integration.on_claim(self._on_claim)
        server = None
        with integration:
            self.out.logs_open.set()
            if args.metrics_port is not None:
                server = integration.serve_metrics(args.metrics_port)
                self.out.line(f"metrics: {server.url}")
            try:
                flows = self._flows()
                spb = 60.0 / args.tempo
                with _Screen(
                    self.out, self.view, f"backbeat-sync demo · {self.config.cluster_id}", self._footer
                ) as screen:
                    self._screen = screen
                    if not self._wait_beat(lambda f: True, max(5.0, 4 * spb)):
                        print(
                            f"{PROG} demo: no beat on {self.config.beat_subject_for()}:"
                            " is a pulse running (drop --no-pulse)?",
                            file=sys.stderr,
                        )
                        return EXIT_NO_BEAT
                    for r in range(1, args.bars + 1):
                        self._round = r
                        self._run_round(flows, r, spb)
                    last = self._last_beat.beat_index if self._last_beat is not None else 0
                    self._wait_beat(lambda f: f.beat_index > last, 2 * spb)
                    self._screen = None
                self.out.logs_open.clear()  # what a normal stop logs is not news
                health = integration.get_health()
            finally:
                if server is not None:
                    server.close()
        self._summary(health)
        return EXIT_OK

    def _run_round(self, flows: dict[str, Callable[[int], object]], r: int, spb: float) -> None:
        threads = [
            threading.Thread(target=self._run_flow, args=(name, fn, r), name=f"demo-{name}-{r}", daemon=True)
            for name, fn in flows.items()
        ]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 12 * spb + 2.0
        for t in threads:
            t.join(max(0.0, deadline - time.monotonic()))

    def _summary(self, health: dict[str, Any]) -> None:
        rows = []
        for name, (api, budget) in _FLOWS.items():
            mine = [o for o in self.results if o.flow == name]
            used = [o.beats_used for o in mine]
            mean = f"{sum(used) / len(used):.2f}" if used else "-"
            rows.append(
                [
                    name,
                    api,
                    budget,
                    len(mine),
                    sum(1 for o in mine if o.outcome == "done"),
                    sum(1 for o in mine if o.outcome == "stopped"),
                    sum(1 for o in mine if o.outcome == "failed"),
                    mean,
                ]
            )
        self.out.line()
        _print_table(
            self.out,
            "Operations",
            [
                "flow",
                "API",
                "budget",
                "runs",
                "done",
                "stopped",
                "failed",
                "beats used",
            ],
            rows,
        )
        figures: list[list[Any]] = [
            ["beats received", health.get("beats_received")],
            ["missed beats", health.get("missed_beats")],
            ["tempo (BPM)", f"{health.get('current_tempo', 0):g}"],
            ["measured (BPM)", f"{health.get('measured_bpm', 0.0):.2f}"],
            ["tempo drift", health.get("tempo_drift")],
            ["claims emitted", health.get("claims_emitted")],
            ["local degradation", health.get("local_degradation")],
        ]
        from .metrics import EXHAUSTION_KEYS  # a plain mapping; prometheus-client is not needed

        figures.append(["budget warnings", health.get("budget_warnings", 0)])
        for (mode, outcome), key in EXHAUSTION_KEYS.items():
            if health.get(key):
                figures.append([f"budgets exhausted ({mode}, {outcome})", health[key]])
        self.out.line()
        _print_table(self.out, "Agent health", ["figure", "value"], figures)
        stopped = [o for o in self.results if o.outcome == "stopped"]
        failed = [o for o in self.results if o.outcome == "failed"]
        self.out.line()
        if stopped:
            self.out.line(
                f"{len(stopped)} overrunning operation(s) stopped by their budget"
                f" ({stopped[0].flow}: {stopped[0].detail}); BeatBudgetExceeded was raised in its own thread."
            )
        for o in failed:
            self.out.line(f"unexpected failure in {o.flow}: {o.detail}")
        self.out.line(
            "Next: docs/quickstart.md, and examples/decorate_functions.py to budget your own function."
        )


# --------------------------------------------------------------------------------------------
# commands
# --------------------------------------------------------------------------------------------


def _cmd_status(args: argparse.Namespace, out: _Out) -> int:
    """``status``: connect, wait for beats, print the HAP line and the health fields."""
    cfg = _config(args)
    if not cfg.enabled:
        _print_status(out, args, "❌ Disabled", {"enabled": False})
        return EXIT_NO_BEAT
    probe = cfg.evolve(agent_id=f"{cfg.agent_id}-status", connect_in_background=False)
    timeout = args.timeout if args.timeout is not None else max(5.0, 1.5 * cfg.beat_duration)
    integration = Integration(probe, node_id=f"backbeat-sync-status-{os.getpid()}")
    beats = threading.Semaphore(0)
    integration.on_beat(lambda _frame: beats.release())
    try:
        integration.start()
        out.logs_open.set()
    except BackbeatConnectionError as exc:
        _print_status(out, args, "⚠️ Disconnected", {"connected": False, "errors": [str(exc)]})
        raise
    try:
        deadline = time.monotonic() + timeout
        if beats.acquire(timeout=max(0.0, deadline - time.monotonic())):
            # a second beat gives the measured tempo and the drift
            second = min(deadline, time.monotonic() + 1.5 * integration.clock.beat_duration)
            beats.acquire(timeout=max(0.0, second - time.monotonic()))
        health = integration.get_health()
    finally:
        out.logs_open.clear()  # what a normal stop logs is not news
        integration.stop()
    connected = bool(health["connected"])
    _print_status(out, args, "✅ Connected" if connected else "⚠️ Disconnected", health)
    if not connected:
        print(f"{PROG} status: the connection to {probe.masked_url} was lost", file=sys.stderr)
        return EXIT_USAGE
    if health["beats_received"] == 0:
        print(f"{PROG} status: no beat on {probe.beat_subject_for()} within {timeout:g} s", file=sys.stderr)
        return EXIT_NO_BEAT
    return EXIT_OK


_STATUS_FIELDS: Final = (
    "enabled",
    "started",
    "connected",
    "current_beat",
    "current_tempo",
    "measured_bpm",
    "tempo_drift",
    "reconnect_count",
    "active_operations",
    "local_degradation",
    "errors",
    "node_id",
    "cluster_id",
    "beats_received",
    "missed_beats",
)


def _print_status(out: _Out, args: argparse.Namespace, line: str, health: dict[str, Any]) -> None:
    if args.json:
        out.line(json.dumps({"status": line.split(" ", 1)[1].lower(), "health": health}, sort_keys=True))
        return
    out.line(f"BACKBEAT: {line}")
    for key in _STATUS_FIELDS:
        if key in health:
            value = health[key]
            shown = json.dumps(value) if isinstance(value, (bool, list)) else value
            out.line(f"  {key}: {shown}")


def _cmd_demo(args: argparse.Namespace, out: _Out) -> int:
    """``demo``: a sample agent runs the seed's four flows under budgets, with a live view and a summary."""
    demo = _Demo(args, out)
    return demo.run()


def _cmd_pulse(args: argparse.Namespace, out: _Out) -> int:
    """``pulse``: publish beat frames on NATS until interrupted (or ``--beats N``)."""
    from .pulse import Pulse

    overrides: dict[str, Any] = {}
    if args.tempo is not None:
        overrides["tempo_bpm"] = args.tempo
    if args.bar is not None:
        overrides["bar_length"] = args.bar
    cfg = _config(args, **overrides)
    if cfg.is_local:
        raise _UsageError(
            "a pulse on local:// would only beat inside this process; give a server: --nats nats://HOST:4222"
        )
    sign = None
    if cfg.signing_key is not None:  # CHORUS_BACKBEAT_SIGNING_KEY: sign every frame (the signing extra)
        from .signing import SigningKey

        sign = SigningKey.load(cfg.signing_key, cfg.signing_key_id).sign_frame
    pulse = Pulse(cfg, start_index=args.start_index, sign=sign)
    first = pulse.next_index
    pulse.start()
    out.logs_open.set()
    bar = pulse.bar_length
    out.line(
        f"{PROG} pulse: cluster {cfg.cluster_id} on {cfg.masked_url}, {pulse.tempo_bpm:g} BPM,"
        f" {bar} beats per bar, subject {cfg.beat_subject_for()}, first beat {first}."
        " Ctrl-C stops it."
    )
    live = None
    if out.rich:
        from rich.live import Live

        live = Live(console=out.console(), refresh_per_second=8, get_renderable=lambda: _render_pulse(pulse))
        live.start()
    seen = pulse.next_index
    try:
        while args.beats is None or pulse.frames_sent < args.beats:
            time.sleep(min(0.1, 15.0 / pulse.tempo_bpm))
            now = pulse.next_index
            if live is None:
                for index in range(seen, now):
                    if index % bar == 0:
                        out.line(
                            f"beat {index} (bar {index // bar}) tempo {pulse.tempo_bpm:g} BPM"
                            f" sent {pulse.frames_sent} skipped {pulse.frames_skipped}"
                            f"{'' if pulse.connected else ' DISCONNECTED'}"
                        )
            seen = now
    except KeyboardInterrupt:
        pass
    finally:
        if live is not None:
            live.stop()
        out.logs_open.clear()  # what a normal stop logs is not news
        pulse.stop()
    out.line(
        f"{PROG} pulse: stopped after {pulse.frames_sent} beat(s)"
        f" ({pulse.frames_skipped} skipped while disconnected, {pulse.reconnect_count} reconnect(s))"
    )
    return EXIT_OK


def _render_pulse(pulse: Any) -> Any:
    from rich.panel import Panel
    from rich.text import Text

    index = pulse.next_index - 1
    bar = pulse.bar_length
    text = Text()
    text.append(f"beat {max(index, 0)}  bar {max(index, 0) // bar} ")
    text.append("".join("●" if i == index % bar else "○" for i in range(min(bar, 16))), style="magenta")
    text.append(
        f"  tempo {pulse.tempo_bpm:g} BPM  sent {pulse.frames_sent}  skipped {pulse.frames_skipped}  "
    )
    text.append(
        "connected" if pulse.connected else "DISCONNECTED", style="green" if pulse.connected else "bold red"
    )
    return Panel(text, title="backbeat-sync pulse", border_style="blue")


def _monitor_link(cfg: BackbeatConfig, subject: str, on_message: Callable[[bytes], None]) -> Any:
    """A NATS connection (the transport's link: reconnects, auth, TLS) subscribed to ``subject``."""
    from .transport.base import TransportEvent
    from .transport.nats import NatsLink

    def report(event: TransportEvent, detail: str) -> None:
        if event in (TransportEvent.DISCONNECTED, TransportEvent.ERROR, TransportEvent.RECONNECTED):
            logger.warning(f"monitor: {detail}")

    class MonitorLink(NatsLink):
        async def _on_connect(self, nc: Any) -> None:
            async def handler(msg: Any) -> None:
                on_message(msg.data)

            await nc.subscribe(subject, cb=handler)

    return MonitorLink(cfg, report, client_name=f"{PROG}-monitor", thread_name="backbeat-monitor")


def _cmd_monitor(args: argparse.Namespace, out: _Out) -> int:
    """``monitor``: subscribe to ``backbeat.>`` and show beats, tempo, drift and every task."""
    if args.json and not args.once:
        raise _UsageError("--json prints one snapshot: use it with --once")
    cfg = _config(args)
    if cfg.is_local:
        raise _UsageError("monitor watches a NATS server: give one with --nats nats://HOST:4222")
    view = ClusterView(args.cluster)
    screen: _Screen | None = None

    def on_message(data: bytes) -> None:
        lines = view.feed(data)
        if screen is not None:
            screen.lines(lines)

    link = _monitor_link(cfg.evolve(agent_id=f"{cfg.agent_id}-monitor"), args.subject, on_message)
    link.start()
    out.logs_open.set()
    try:
        if args.once:
            return _monitor_once(args, out, view)
        if not out.rich:
            out.line(f"{PROG} monitor: {args.subject} on {cfg.masked_url}; Ctrl-C stops it.")
        with _Screen(out, view, f"backbeat-sync monitor · {cfg.masked_url}") as screen:
            try:
                while True:
                    time.sleep(0.25)
            except KeyboardInterrupt:
                pass
        return EXIT_OK
    finally:
        out.logs_open.clear()  # what a normal stop logs is not news
        link.stop(1.0)


def _monitor_once(args: argparse.Namespace, out: _Out, view: ClusterView) -> int:
    """Listen for one full beat (two frames) or ``--timeout``, then print one snapshot."""
    deadline = time.monotonic() + args.timeout

    def wait(predicate: Callable[[], bool], until: float) -> bool:
        while not predicate():
            if time.monotonic() >= until:
                return False
            time.sleep(0.01)
        return True

    if wait(lambda: view.frames >= 1, deadline):
        first = view.snapshot()["clusters"]
        tempo = max((c["tempo_bpm"] or 0.0) for c in first) or 60.0
        spb = 60.0 / tempo
        wait(lambda: view.frames >= 2, min(deadline, time.monotonic() + 1.5 * spb))
        time.sleep(min(0.25, 0.2 * spb))  # the claims that follow the beat
    snapshot = view.snapshot()
    if args.json:
        out.line(json.dumps(snapshot, sort_keys=True))
    elif out.rich:
        out.console().print(render_view(snapshot, title="backbeat-sync monitor"))
    else:
        for c in snapshot["clusters"]:
            out.line(
                f"{c['cluster_id']}: beat {c['current_beat']} tempo {c['tempo_bpm']} BPM"
                f" measured {c['measured_bpm']:.1f} BPM drift {c['tempo_drift']}"
            )
        rows = [
            [
                t["agent_id"],
                t["task_id"],
                t["operation_type"] or "",
                t["state"],
                t["phase"] or "",
                f"{t['progress']:.0%}",
                t["beats_left"],
                t["last_beat"],
            ]
            for t in snapshot["tasks"]
        ]
        for line in _plain_table(
            ["agent", "task", "type", "state", "phase", "progress", "left", "beat"], rows
        ):
            out.line(line)
    if snapshot["messages"] == 0:
        print(f"{PROG} monitor: nothing on {args.subject} within {args.timeout:g} s", file=sys.stderr)
        return EXIT_NO_BEAT
    return EXIT_OK


_COMMANDS: Final[dict[str, Callable[[argparse.Namespace, _Out], int]]] = {
    "demo": _cmd_demo,
    "pulse": _cmd_pulse,
    "monitor": _cmd_monitor,
    "status": _cmd_status,
}


def main(argv: list[str] | None = None) -> int:
    """Run ``backbeat-sync`` with ``argv`` (default ``sys.argv[1:]``).

    Args:
        argv: the arguments after the program name.

    Returns:
        The exit code: 0 success, 1 no beat in time or BACKBEAT disabled, 2 a user
        error (bad flag, unreachable server, wrong credentials), 130 interrupted
        before the command could finish cleanly.
    """
    parser = build_parser()
    try:
        args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    except _UsageError as exc:
        print(exc, file=sys.stderr)
        return EXIT_USAGE
    except SystemExit as exc:  # --help, --version
        return exc.code if isinstance(exc.code, int) else EXIT_OK
    out = _Out.for_args(args, sys.stdout)
    prefix = f"{PROG} {args.command}: error:"
    try:
        quiet = args.command == "demo"
        with _cli_logging(args.verbose, out.logs_open, quiet=quiet), _sigterm_as_interrupt():
            return _COMMANDS[args.command](args, out)
    except _UsageError as exc:
        print(f"{prefix} {exc}", file=sys.stderr)
    except BackbeatDisabled as exc:
        print(f"{prefix} {exc}", file=sys.stderr)
        return EXIT_NO_BEAT
    except BackbeatError as exc:
        print(f"{prefix} {exc}", file=sys.stderr)
    except OSError as exc:  # e.g. --metrics-port already in use
        print(f"{prefix} {exc.strerror or exc}", file=sys.stderr)
    except KeyboardInterrupt:
        print(f"{PROG} {args.command}: interrupted", file=sys.stderr)
        return 130
    return EXIT_USAGE
