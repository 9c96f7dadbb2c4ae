"""Rendering a :class:`ClusterView` snapshot: the rich panel, plain tables, the live screen."""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import Any, Final

from ._base import Out
from ._view import ClusterView

__all__ = ["Screen", "plain_table", "print_table", "render_view"]

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

    def __init__(self, out: Out, view: ClusterView, title: str, footer: Callable[[], str] = str) -> None:
        self._out = out
        self._view = view
        self._title = title
        self._footer = footer
        self._lock = threading.Lock()
        self._live: Any = None

    def __enter__(self) -> Screen:
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
