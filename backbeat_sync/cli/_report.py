"""``backbeat-sync report``: what a budget history file says, as a table, JSON, or a picture."""

from __future__ import annotations

import argparse
import json
import os
from typing import Any, Final

from .. import BudgetHistory, InvalidArgument
from ._base import EXIT_OK, Command, Out, UsageError, require_extra

#: Plot colours: done, exceeded (interrupted), exceeded (late), budget, suggested, profile.
_DONE: Final = "#3a76af"
_INTERRUPTED: Final = "#d6452e"
_LATE: Final = "#8e2a9c"
_BUDGET: Final = "#222222"
_SUGGESTED: Final = "#1d9a4a"
_PROFILE: Final = "#d9d9d9"


def report_rows(history: BudgetHistory) -> list[dict[str, Any]]:
    """One row per operation type: the figures of ``backbeat-sync report`` (public API only).

    Args:
        history: an opened history.

    Returns:
        Dicts with ``operation_type``, ``runs``, ``done``, ``failed``, ``exceeded``,
        ``interrupted``, ``late``, ``on_time_rate``, ``p50``, ``p95``, ``max``,
        ``budget`` (of the newest run), ``suggested`` (None when ``"auto"`` would refuse),
        ``suggested_source`` and ``profile`` (``[min, max]`` or None).
    """
    rows = []
    for typ in history.types():
        st = history.stats(typ)
        samples = history.samples(typ)
        newest = max(samples, key=lambda s: s.recorded_at) if samples else None
        try:
            suggested: float | None
            suggested, source = history.resolve(typ)
        except InvalidArgument:
            suggested, source = None, None
        prof = history.profile(typ)
        rows.append(
            {
                "operation_type": typ,
                "runs": st.count,
                "done": st.done,
                "failed": st.failed,
                "exceeded": st.exceeded,
                "interrupted": st.interrupted,
                "late": st.late,
                "on_time_rate": round(st.on_time_rate, 4),
                "p50": round(st.p50, 4),
                "p95": round(st.p95, 4),
                "max": round(st.max, 4),
                "budget": newest.budget if newest is not None else None,
                "suggested": suggested,
                "suggested_source": source,
                "profile": list(prof) if prof is not None else None,
            }
        )
    return rows


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}".rstrip("0").rstrip(".")


def _table(rows: list[dict[str, Any]], path: str) -> list[str]:
    head = (
        "operation type",
        "runs",
        "done",
        "failed",
        "exceeded (int/late)",
        "on time",
        "p50",
        "p95",
        "max",
        "budget",
        "suggested",
        "profile",
    )
    body = []
    for r in rows:
        prof = r["profile"]
        body.append(
            (
                r["operation_type"],
                str(r["runs"]),
                str(r["done"]),
                str(r["failed"]),
                f"{r['exceeded']} ({r['interrupted']}/{r['late']})",
                f"{100 * r['on_time_rate']:.0f}%" if r["done"] + r["exceeded"] else "-",
                _fmt(r["p50"]),
                _fmt(r["p95"]),
                _fmt(r["max"]),
                _fmt(r["budget"]),
                _fmt(r["suggested"]) + (f" ({r['suggested_source']})" if r["suggested_source"] else ""),
                f"{_fmt(prof[0])}-{_fmt(prof[1])}" if prof else "-",
            )
        )
    widths = [max(len(h), *(len(b[i]) for b in body)) for i, h in enumerate(head)]
    right = set(range(1, len(head)))

    def line(cells: tuple[str, ...]) -> str:
        pairs = enumerate(zip(cells, widths, strict=True))
        return "  ".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in pairs)

    out = [f"budget history {path}: {len(rows)} operation type(s), beats used per run", line(head)]
    out.append("  ".join("-" * w for w in widths))
    out.extend(line(b) for b in body)
    return out


def plot_history(history: BudgetHistory, rows: list[dict[str, Any]], out_path: str, title: str) -> None:
    """Draw, per type, the beats its runs used against its budget, suggestion and profile.

    One row per type: every done or exceeded run is a dot (jittered vertically), a box
    spans p50 to p95, a black bar marks the newest run's budget, a green diamond the
    budget ``"auto"`` would give now, and a grey band the type's profile range.

    Args:
        history: the opened history.
        rows: :func:`report_rows` of it.
        out_path: where to write (``.png`` or ``.svg``).
        title: the figure's title.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    n = len(rows)
    legend_h = 0.75  # inches kept free below the axes for the legend
    fig_h = 2.4 + legend_h + 0.62 * max(n, 1)
    fig, ax = plt.subplots(figsize=(11, fig_h), dpi=120)
    values: list[float] = []
    for i, r in enumerate(reversed(rows)):
        typ = r["operation_type"]
        y = float(i)
        prof = r["profile"]
        if prof:
            ax.fill_betweenx([y - 0.38, y + 0.38], prof[0], prof[1], color=_PROFILE, zorder=0, lw=0)
            values.extend(prof)
        samples = [s for s in history.samples(typ) if s.outcome != "failed"]
        for k, s in enumerate(samples):
            # a deterministic jitter (golden-ratio sequence) keeps dots apart without randomness
            jitter = ((k * 0.618034) % 1.0 - 0.5) * 0.5
            x = max(s.beats_used, 1e-3)
            if s.outcome == "done":
                ax.plot(x, y + jitter, "o", ms=3.2, color=_DONE, alpha=0.55, mew=0, zorder=2)
            elif s.exceeded_kind == "late":
                ax.plot(x, y + jitter, "o", ms=4, color=_LATE, alpha=0.8, mew=0, zorder=6)
            else:  # stopped at its budget: drawn over the budget bar, as crosses
                ax.plot(x, y + jitter, "x", ms=5, color=_INTERRUPTED, alpha=0.9, mew=1.4, zorder=6)
            values.append(s.beats_used)
        if samples:
            ax.add_patch(
                matplotlib.patches.Rectangle(
                    (max(r["p50"], 1e-3), y - 0.3),
                    max(r["p95"] - r["p50"], 0.0),
                    0.6,
                    fill=False,
                    ec="#555555",
                    lw=1.2,
                    zorder=3,
                )
            )
            ax.plot([r["p50"]] * 2, [y - 0.3, y + 0.3], color="#555555", lw=2, zorder=3)
        if r["budget"] is not None:
            ax.plot([r["budget"]] * 2, [y - 0.42, y + 0.42], color=_BUDGET, lw=2.6, zorder=4)
            values.append(r["budget"])
        if r["suggested"] is not None:
            ax.plot(r["suggested"], y, "D", ms=9, color=_SUGGESTED, mec="white", mew=1.2, zorder=5)
            values.append(r["suggested"])
        timed = r["done"] + r["exceeded"]
        note = f"{r['runs']} runs, {100 * r['on_time_rate']:.0f}% on time" if timed else f"{r['runs']} runs"
        if r["suggested"] is None:
            note += "\nno profile, too few runs to learn"
        bad = timed > 0 and r["on_time_rate"] < 0.9
        ax.annotate(
            note,
            xy=(1.01, y),
            xycoords=("axes fraction", "data"),
            va="center",
            fontsize=9,
            color=_INTERRUPTED if bad else "#333333",
            fontweight="bold" if bad else "normal",
        )
    positive = [v for v in values if v > 0]
    lo = min(positive) if positive else 0.1
    hi = max(positive) if positive else 10.0
    span = hi / lo if lo > 0 else 1.0
    if span > 30:  # runs from a tenth of a beat to tens of beats: a log axis keeps both readable
        ax.set_xscale("log")
        ax.set_xlim(lo / 1.5, hi * 1.5)
        ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _p: f"{v:g}"))
    else:
        ax.set_xlim(0, hi * 1.12 + 0.25)
    ax.set_yticks(range(n))
    ax.set_yticklabels([r["operation_type"] for r in reversed(rows)], fontsize=10)
    ax.set_ylim(-0.6, n - 0.4)
    ax.set_xlabel("beats used per run (beats; one beat = 60 / tempo seconds)", fontsize=10)
    ax.set_ylabel("operation type", fontsize=10)
    ax.set_title(title, fontsize=12, loc="left", pad=12)
    ax.grid(axis="x", color="#eeeeee", zorder=-1)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    legend = [
        Line2D([], [], ls="", marker="o", color=_DONE, label="done"),
        Line2D([], [], ls="", marker="x", color=_INTERRUPTED, mew=1.4, label="exceeded: interrupted"),
        Line2D([], [], ls="", marker="o", color=_LATE, label="exceeded: late"),
        Patch(fill=False, ec="#555555", label="p50 to p95"),
        Line2D([], [], color=_BUDGET, lw=2.6, label="budget (newest run)"),
        Line2D([], [], ls="", marker="D", color=_SUGGESTED, mec="white", label='suggested ("auto" now)'),
        Patch(color=_PROFILE, label="profile (min to max)"),
    ]
    fig.legend(
        handles=legend, loc="lower center", bbox_to_anchor=(0.5, 0.0), ncol=4, fontsize=9, frameon=False
    )
    fig.tight_layout(rect=(0.0, legend_h / fig_h, 1.0, 1.0))
    fig.savefig(out_path, bbox_inches="tight")
    plt.close(fig)


def _cmd_report(args: argparse.Namespace, out: Out) -> int:
    """``report``: read a history file; print a table or JSON; optionally draw it."""
    path = args.history
    if not os.path.isfile(path):
        raise UsageError(f"report: no history file at {path!r}")
    plot = args.plot
    if plot is not None:
        ext = os.path.splitext(plot)[1].lower()
        if ext not in (".png", ".svg"):
            raise UsageError(f"report: --plot {plot!r} must end in .png or .svg")
        require_extra("matplotlib", "report", "--plot")
    history = BudgetHistory(path)
    history.open()
    try:
        rows = report_rows(history)
        if args.type:
            rows = [r for r in rows if r["operation_type"] in set(args.type)]
        if args.format == "json":
            out.line(json.dumps({"history": path, "types": rows}, sort_keys=True))
        else:
            for text in _table(rows, path):
                out.line(text)
        if plot is not None:
            title = f"Budget history: beats used per run, by operation type\n{os.path.basename(path)}"
            plot_history(history, rows, plot, title)
            if args.format != "json":
                out.line(f"plot written to {plot}")
    finally:
        history.close()
    return EXIT_OK


def _arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--history", required=True, metavar="FILE", help="the SQLite history file (history_path)")
    p.add_argument("--format", choices=("table", "json"), default="table", help="table (default) or json")
    p.add_argument(
        "--plot", metavar="OUT", help="also draw the history to OUT.png or OUT.svg (the report extra)"
    )
    p.add_argument("--type", action="append", metavar="TYPE", help="only this operation type (repeatable)")


COMMAND: Final = Command(
    name="report",
    help="what the budget history says: runs, on-time rate, beats used, suggested budgets",
    epilog="""examples:
  backbeat-sync report --history /var/lib/chorus/budgets.sqlite
  backbeat-sync report --history budgets.sqlite --format json
  backbeat-sync report --history budgets.sqlite --plot budgets.png

exit codes: 0 printed; 2 no such file, not a history file, or bad argument.""",
    add_arguments=_arguments,
    run=_cmd_report,
    connection_flags=False,
)

__all__ = ["COMMAND", "plot_history", "report_rows"]
