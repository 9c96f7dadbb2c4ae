"""``backbeat-sync monitor``: watch a cluster's beats and every agent's tasks, live or once.

Three outputs: the rich live panel (a terminal), plain lines (a pipe, ``--plain``)
and NDJSON events (``--json``: one object per line, for scripts). ``--once``
prints one snapshot instead.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from collections.abc import Callable
from typing import Any, Final

from ._base import (
    EXIT_NO_BEAT,
    EXIT_OK,
    PROG,
    Command,
    Out,
    UsageError,
    config_from_args,
    number,
    positive_int,
    seconds,
)
from ._link import Listener
from ._render import (
    Screen,
    collapsed_line,
    plain_table,
    progress_text,
    render_view,
    summary_line,
    task_label,
    tree_rows,
)
from ._view import DEFAULT_STALE_BEATS, STATES, ClusterView, Event, ViewFilter, event_line

#: Agents send a health claim every 8 beats (PROTOCOL.md); ``--once`` waits that long (and one more).
HEALTH_EVERY: Final = 8
TICK: Final = 0.25


def _filter(args: argparse.Namespace) -> ViewFilter:
    def items(values: list[str] | None) -> tuple[str, ...]:
        return tuple(v.strip() for value in values or () for v in value.split(",") if v.strip())

    states = items(args.state)
    unknown = [s for s in states if s not in STATES]
    if unknown:
        raise UsageError(f"--state {unknown[0]!r} is not one of {', '.join(STATES)}")
    return ViewFilter(
        agents=items(args.agent), types=items(args.type), states=states, hide_done=args.hide_done
    )


def _cmd_monitor(args: argparse.Namespace, out: Out) -> int:
    """``monitor``: subscribe to ``backbeat.>`` and show beats, tempo, drift and every task."""
    cfg = config_from_args(args)
    if cfg.is_local:
        raise UsageError("monitor watches a NATS server: give one with --nats nats://HOST:4222")
    view_filter = _filter(args)
    view = ClusterView(
        args.cluster, stale_beats=args.stale_beats, default_tempo=cfg.tempo_bpm, fade_bars=args.replay or 1
    )
    if args.replay:
        from ..streams import replay_claims

        for data in replay_claims(cfg, args.replay, stream=args.stream):  # what finished while away
            view.feed(data)
    emit: Callable[[list[Event]], None] = lambda events: None  # noqa: E731 - replaced below

    def on_message(data: bytes) -> None:
        emit(view.feed_events(data))

    listener = Listener(cfg, args.subject, on_message, name="monitor")
    listener.start()
    out.logs_open.set()
    try:
        if args.once:
            return _monitor_once(args, out, view, view_filter)
        if args.json:
            emit = lambda events: _print_json(out, events, view_filter)  # noqa: E731
        elif not out.rich:
            out.line(f"{PROG} monitor: {args.subject} on {cfg.masked_url}; Ctrl-C stops it.")
            emit = lambda events: _print_lines(out, events, view_filter)  # noqa: E731
        screen = Screen(out, view, f"backbeat-sync monitor · {cfg.masked_url}", view_filter=view_filter)
        with screen if out.rich and not args.json else contextlib.nullcontext():
            try:
                while True:
                    time.sleep(TICK)
                    emit(view.sweep())  # agents go stale when the pulse is silent too
            except KeyboardInterrupt:
                pass
        return EXIT_OK
    finally:
        out.logs_open.clear()  # what a normal stop logs is not news
        listener.stop()


def _print_json(out: Out, events: list[Event], view_filter: ViewFilter) -> None:
    for event in events:
        if view_filter.event(event):
            out.line(json.dumps(event, sort_keys=True))


def _print_lines(out: Out, events: list[Event], view_filter: ViewFilter) -> None:
    for event in events:
        if view_filter.event(event) and (line := event_line(event)) is not None:
            out.line(line)


def _wait(predicate: Callable[[], bool], until: float) -> bool:
    while not predicate():
        if time.monotonic() >= until:
            return False
        time.sleep(0.01)
    return True


def _monitor_once(args: argparse.Namespace, out: Out, view: ClusterView, view_filter: ViewFilter) -> int:
    """Listen for a full beat and every agent's health (or ``--timeout``); print one snapshot.

    Health claims come every 8 beats: the wait ends when two frames have arrived and
    every agent seen has sent one, or 9 beats after the first frame, or at ``--timeout``.
    Agents whose health did not come in time are named (``health_pending``, and a line
    on stderr).
    """
    started = time.monotonic()
    deadline = started + args.timeout
    spb = 0.0
    if _wait(lambda: view.frames >= 1, deadline):
        first = time.monotonic()
        tempo = max((c["tempo_bpm"] or 0.0) for c in view.snapshot()["clusters"]) or 60.0
        spb = 60.0 / tempo

        def complete() -> bool:
            snap = view.snapshot(view_filter)
            return view.frames >= 2 and all(a["health"] is not None for a in snap["agents"])

        _wait(complete, min(deadline, first + (HEALTH_EVERY + 1) * spb))
        time.sleep(min(0.25, 0.2 * spb))  # the claims that follow the beat
    snapshot: dict[str, Any] = view.snapshot(view_filter)
    pending = [a["agent_id"] for a in snapshot["agents"] if a["health"] is None]
    snapshot["health_pending"] = pending
    if args.json:
        out.line(json.dumps(snapshot, sort_keys=True))
    elif out.rich:
        out.console().print(render_view(snapshot, title="backbeat-sync monitor"))
    else:
        _print_plain_snapshot(out, snapshot)
    if snapshot["messages"] == 0:
        print(f"{PROG} monitor: nothing on {args.subject} within {args.timeout:g} s", file=sys.stderr)
        return EXIT_NO_BEAT
    if pending:
        every = f" ({HEALTH_EVERY * spb:.3g} s at this tempo)" if spb else ""
        shown = ", ".join(pending[:5]) + (f" and {len(pending) - 5} more" if len(pending) > 5 else "")
        print(
            f"{PROG} monitor: no health claim yet from {len(pending)} agent(s) ({shown}):"
            f" they come every {HEALTH_EVERY} beats{every}; a longer --timeout waits for them",
            file=sys.stderr,
        )
    return EXIT_OK


def _print_plain_snapshot(out: Out, snapshot: dict[str, Any]) -> None:
    for c in snapshot["clusters"]:
        out.line(
            f"{c['cluster_id']}: beat {c['current_beat']} tempo {c['tempo_bpm']} BPM"
            f" measured {c['measured_bpm']:.1f} BPM drift {c['tempo_drift']}"
        )
    rows = [
        ["", *collapsed_line(t["collapsed"]), "", "", "", "", ""]
        if "collapsed" in t
        else [
            t["agent_id"],
            task_label(t),
            t["operation_type"] or "",
            "stale" if t["stale"] else t["state"],
            t["phase"] or "",
            f"{t['progress']:.0%}{progress_text(t)}",
            t["beats_left"],
            t["last_beat"],
        ]
        for t in tree_rows(snapshot)
    ]
    for line in plain_table(["agent", "task", "type", "state", "phase", "progress", "left", "beat"], rows):
        out.line(line)
    if snapshot["hidden_tasks"]:
        out.line(summary_line(snapshot))
    agents = [
        [
            a["agent_id"],
            a["node_id"],
            "stale" if a["stale"] else (a["health"] or "-"),
            a["last_beat"],
        ]
        for a in snapshot["agents"]
    ]
    if agents:
        out.line()
        for line in plain_table(["agent", "node", "health", "beat"], agents):
            out.line(line)


def _arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--subject", default="backbeat.>", help="subject to subscribe to (default backbeat.>)")
    p.add_argument(
        "--once", action="store_true", help="print one snapshot (after a beat and the agents' health), exit"
    )
    p.add_argument(
        "--json",
        action="store_true",
        help="JSON: one event per line (NDJSON); with --once one snapshot object",
    )
    p.add_argument(
        "--timeout",
        type=seconds,
        default=75.0,
        metavar="S",
        help="with --once: give up after S seconds (default 75)",
    )
    p.add_argument(
        "--stale-beats",
        type=number(float, 1.0),
        default=DEFAULT_STALE_BEATS,
        metavar="N",
        help=f"an agent with no claim for N beats is stale, dropped at 2N (default {DEFAULT_STALE_BEATS:g})",
    )
    p.add_argument("--agent", action="append", metavar="GLOB", help="only agents matching GLOB (repeatable)")
    p.add_argument("--type", action="append", metavar="TYPE", help="only tasks of this operation type")
    p.add_argument(
        "--state",
        action="append",
        metavar="STATE",
        help=f"only tasks in this state: {', '.join(STATES)} (repeatable, or comma-separated)",
    )
    p.add_argument("--hide-done", action="store_true", help="leave out tasks that are done")
    p.add_argument(
        "--replay",
        type=positive_int,
        metavar="N",
        help="first fill the view from the claims stream's last N bars (JetStream)",
    )
    p.add_argument(
        "--stream",
        metavar="NAME",
        help="with --replay: the claims stream"
        " (default $CHORUS_BACKBEAT_CLAIMS_STREAM, else BACKBEAT_CLAIMS_{cluster})",
    )


COMMAND: Final = Command(
    name="monitor",
    help="watch a cluster: beats, tempo, drift, every agent's tasks",
    epilog="""examples:
  backbeat-sync monitor --nats nats://localhost:4222
  backbeat-sync monitor --nats nats://localhost:4222 --cluster chorus-dev --hide-done
  backbeat-sync monitor --agent 'worker-*' --state executing,failed
  backbeat-sync monitor --json | jq -c 'select(.event == "task" and .state == "failed")'
  backbeat-sync monitor --once --json | jq '.tasks[] | select(.state == "failed")'
  backbeat-sync monitor --nats nats://localhost:4222 --cluster chorus-dev --replay 4

--once listens for a full beat and each agent's health claim (every 8 beats),
at most --timeout, and prints one snapshot; exit code 1 if nothing arrived.""",
    add_arguments=_arguments,
    run=_cmd_monitor,
)
