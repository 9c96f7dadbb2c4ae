"""Rendering a :class:`ClusterView` snapshot: the rich panel, plain tables, the live screen."""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import Any, Final

from ._base import Out
from ._view import COLLAPSE_AT, NO_FILTER, STATES, ClusterView, ViewFilter

__all__ = [
    "Screen",
    "collapsed_line",
    "plain_table",
    "print_table",
    "progress_text",
    "render_view",
    "summary_line",
    "task_label",
    "tree_rows",
]

_DRIFT_STYLE: Final = {"acceptable": "green", "warning": "yellow", "critical": "bold red", "unknown": "dim"}
_STATE_STYLE: Final = {
    "executing": "cyan",
    "waiting": "dim",
    "done": "green",
    "failed": "red",
    "stale": "yellow",
}


_PRIORITY_STYLE: Final = {"critical": "bold red", "high": "yellow", "low": "dim"}


def tree_rows(snapshot: dict[str, Any]) -> list[dict[str, Any]]:
    """The snapshot's tasks as the tree view shows them: a workflow of more than ``COLLAPSE_AT``
    tasks keeps its roots, and the rest become one row ``{"collapsed": {...}}`` of counts."""
    big = {
        (w["cluster_id"], w["correlation_id"])
        for w in snapshot.get("workflows", ())
        if w["operations"] > COLLAPSE_AT
    }
    hidden: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for t in snapshot["tasks"]:
        key = (t["cluster_id"], t.get("correlation_id", t["task_id"]))
        if key in big and t.get("depth", 0) > 0:
            hidden.setdefault(key, []).append(t)
    rows: list[dict[str, Any]] = []
    for t in snapshot["tasks"]:
        key = (t["cluster_id"], t.get("correlation_id", t["task_id"]))
        members = hidden.get(key)
        if members is None or t.get("depth", 0) == 0:
            rows.append(t)
        elif t is members[0]:
            states: dict[str, int] = {}
            for m in members:
                states[m["state"]] = states.get(m["state"], 0) + 1
            rows.append(
                {
                    "collapsed": {
                        "correlation_id": key[1],
                        "operations": len(members),
                        "agents": sorted({m["agent_id"] for m in members}),
                        "states": dict(sorted(states.items())),
                    }
                }
            )
    return rows


def collapsed_line(c: dict[str, Any]) -> tuple[str, str]:
    """The task and notes cells of a collapsed workflow: ``└ … 14 more`` and
    ``in workflow wf-1 on a1, a2: 2 done, 9 executing, 3 waiting``."""
    states = ", ".join(f"{n} {state}" for state, n in c["states"].items())
    where = f"in workflow {c['correlation_id']} on {', '.join(c['agents'])}: {states}"
    return f"└ … {c['operations']} more", where


def task_label(t: dict[str, Any]) -> str:
    """The task cell: indented under its parent, with a mark for a priority other than normal."""
    depth = t.get("depth", 0)
    label = ("  " * (depth - 1) + "└ " if depth else "") + t["task_id"]
    priority = t.get("priority", "normal")
    return label if priority in (None, "normal") else f"{label} [{priority}]"


def progress_text(t: dict[str, Any]) -> str:
    """`` work 40% eta 3.5`` when the code reported its progress, else empty."""
    if t.get("work_done") is None:
        return ""
    eta = t.get("eta_beats")
    return f" work {t['work_done']:.0%}" + ("" if eta is None else f" eta {eta:g}")


def render_view(
    snapshot: dict[str, Any], *, title: str = "BACKBEAT", footer: str = "", height: int | None = None
) -> Any:
    """A rich renderable of a :meth:`ClusterView.snapshot` (header, tasks, agents, footer).

    Args:
        snapshot: what :meth:`ClusterView.snapshot` returned.
        title: the panel's title.
        footer: a dim line at the bottom.
        height: the lines the panel may take (a terminal's height). When the rows do
            not fit, the agents table keeps a share, the tasks table shows what fits,
            then a "N more" row and a summary line (counts by state, and how to filter).

    Returns:
        A ``rich.panel.Panel``.
    """
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
    all_tasks = tree_rows(snapshot)
    agents_shown = snapshot["agents"]
    task_rows, agent_rows = len(all_tasks), len(agents_shown)
    if height is not None:
        # panel borders, the cluster lines, the footer, the tasks' header, one line of slack
        room = height - 2 - len(parts) - (1 if footer else 0) - 1 - 1
        agent_rows = min(agent_rows, max(1, room // 3)) if agent_rows else 0
        room -= agent_rows + 1 if agent_rows else 0
        if task_rows > room:
            task_rows = max(0, room - 2)  # the "N more" row and the summary line
    cropped = task_rows < len(all_tasks)
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
    for t in all_tasks[:task_rows]:
        if "collapsed" in t:
            label, where = collapsed_line(t["collapsed"])
            blank = [""] * (len(columns) - 2 - (1 if several_agents else 0))
            tasks.add_row(*([""] if several_agents else []), label, *blank, Text(where, style="dim"))
            continue
        state = "stale" if t["stale"] else t["state"]
        filled = round(10 * t["progress"])
        bar = Text("█" * filled, style=_STATE_STYLE.get(state, "cyan"))
        bar.append("░" * (10 - filled), style="dim")
        bar.append(f" {t['progress']:4.0%}")
        bar.append(progress_text(t), style="bold")
        cells: list[Any] = [t["agent_id"]] if several_agents else []
        notes = f"last claimed {t['state']}: {t['notes']}" if t["stale"] else t["notes"]
        tasks.add_row(
            *cells,
            Text(task_label(t), style=_PRIORITY_STYLE.get(t.get("priority", "normal"), "")),
            t["operation_type"] or "",
            Text(state, style=_STATE_STYLE.get(state, "")),
            t["phase"] or "",
            bar,
            str(t["beats_left"]),
            str(t["last_beat"]),
            Text(notes, style="red" if state == "failed" else "dim"),
            style="dim" if state in ("done", "stale") else "",
        )
    if cropped:
        more = [""] if several_agents else []
        tasks.add_row(*more, Text(f"… {len(all_tasks) - task_rows} more", style="bold"))
    parts.append(tasks if all_tasks else Text("no tasks", style="dim"))
    if cropped or snapshot.get("hidden_tasks"):
        parts.append(Text(summary_line(snapshot), style="bold" if cropped else "dim"))
    if agent_rows:
        agents = Table(box=None, pad_edge=False, header_style="bold", expand=True)
        for name in ("agent", "node", "health", "beat"):
            agents.add_column(name, no_wrap=True)
        agents.add_column("notes", no_wrap=True, overflow="ellipsis", ratio=1, min_width=8)
        cut = agent_rows < len(agents_shown)
        for a in agents_shown[: agent_rows - 1 if cut else agent_rows]:
            health = "stale" if a["stale"] else a["health"] or "-"
            if a["stale"]:
                notes = f"no claim for {a['silent_beats']:g} beats"
            else:
                notes = a["notes"] or "no health claim yet (one comes every 8 beats)"
            agents.add_row(
                a["agent_id"],
                a["node_id"],
                Text(health, style=_STATE_STYLE.get(health, "")),
                str(a["last_beat"]),
                Text(notes or "", style="dim"),
            )
        if cut:
            agents.add_row(Text(f"… {len(agents_shown) - agent_rows + 1} more agents", style="bold"))
        parts.append(agents)
    if footer:
        parts.append(Text(footer, style="dim"))
    return Panel(Group(*parts), title=title, border_style="blue")


def summary_line(snapshot: dict[str, Any]) -> str:
    """``N tasks: 3 executing, 1 failed · M hidden by filters · filter with ...`` for a snapshot."""
    counts = snapshot.get("task_counts", {})
    order = [s for s in STATES if s in counts] + sorted(s for s in counts if s not in STATES)
    by_state = ", ".join(f"{counts[s]} {s}" for s in order)
    text = f"{len(snapshot['tasks'])} tasks" + (f": {by_state}" if by_state else "")
    hidden = snapshot.get("hidden_tasks", 0)
    if hidden:
        text += f" · {hidden} hidden by filters"
    return text + " · narrow with --agent, --type, --state, --hide-done"


def plain_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    cells = [[str(h) for h in headers]] + [[str(v) for v in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    out = ["  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip() for r in cells]
    out.insert(1, "  ".join("-" * w for w in widths))
    return out


def print_table(out: Out, title: str, headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
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
        for line in plain_table(headers, rows):
            out.line(line)


class Screen:
    """Shows a :class:`ClusterView` live: a rich panel redrawn a few times a second, or plain lines."""

    def __init__(
        self,
        out: Out,
        view: ClusterView,
        title: str,
        footer: Callable[[], str] = str,
        view_filter: ViewFilter = NO_FILTER,
    ) -> None:
        self._out = out
        self._filter = view_filter
        self._view = view
        self._title = title
        self._footer = footer
        self._lock = threading.Lock()
        self._live: Any = None

    def __enter__(self) -> Screen:
        if self._out.rich:
            from rich.live import Live

            console = self._out.console()
            self._live = Live(
                console=console,
                refresh_per_second=8,
                get_renderable=lambda: render_view(
                    self._view.snapshot(self._filter),
                    title=self._title,
                    footer=self._footer(),
                    height=console.size.height,
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
