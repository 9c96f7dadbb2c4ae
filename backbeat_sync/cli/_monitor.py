"""``backbeat-sync monitor``: watch a cluster's beats and every agent's tasks, live or once."""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from typing import Any, Final

from loguru import logger

from .. import BackbeatConfig
from ._base import EXIT_NO_BEAT, EXIT_OK, PROG, Command, Out, UsageError, config_from_args, seconds
from ._render import Screen, plain_table, render_view
from ._view import ClusterView


def _monitor_link(cfg: BackbeatConfig, subject: str, on_message: Callable[[bytes], None]) -> Any:
    """A NATS connection (the transport's link: reconnects, auth, TLS) subscribed to ``subject``."""
    from ..transport.base import TransportEvent
    from ..transport.nats import SubscriberLink

    def report(event: TransportEvent, detail: str) -> None:
        if event in (TransportEvent.DISCONNECTED, TransportEvent.ERROR, TransportEvent.RECONNECTED):
            logger.warning(f"monitor: {detail}")

    return SubscriberLink(
        cfg, report, subject, on_message, client_name=f"{PROG}-monitor", thread_name="backbeat-monitor"
    )


def _cmd_monitor(args: argparse.Namespace, out: Out) -> int:
    """``monitor``: subscribe to ``backbeat.>`` and show beats, tempo, drift and every task."""
    if args.json and not args.once:
        raise UsageError("--json prints one snapshot: use it with --once")
    cfg = config_from_args(args)
    if cfg.is_local:
        raise UsageError("monitor watches a NATS server: give one with --nats nats://HOST:4222")
    view = ClusterView(args.cluster)
    screen: Screen | None = None

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
        with Screen(out, view, f"backbeat-sync monitor · {cfg.masked_url}") as screen:
            try:
                while True:
                    time.sleep(0.25)
            except KeyboardInterrupt:
                pass
        return EXIT_OK
    finally:
        out.logs_open.clear()  # what a normal stop logs is not news
        link.stop(1.0)


def _monitor_once(args: argparse.Namespace, out: Out, view: ClusterView) -> int:
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
        for line in plain_table(
            ["agent", "task", "type", "state", "phase", "progress", "left", "beat"], rows
        ):
            out.line(line)
    if snapshot["messages"] == 0:
        print(f"{PROG} monitor: nothing on {args.subject} within {args.timeout:g} s", file=sys.stderr)
        return EXIT_NO_BEAT
    return EXIT_OK


def _arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--subject", default="backbeat.>", help="subject to subscribe to (default backbeat.>)")
    p.add_argument("--once", action="store_true", help="print one snapshot after a full beat, then exit")
    p.add_argument("--json", action="store_true", help="with --once: the snapshot as JSON")
    p.add_argument(
        "--timeout",
        type=seconds,
        default=75.0,
        metavar="S",
        help="with --once: give up after S seconds (default 75)",
    )


COMMAND: Final = Command(
    name="monitor",
    help="watch a cluster: beats, tempo, drift, every agent's tasks",
    epilog="""examples:
  backbeat-sync monitor --nats nats://localhost:4222
  backbeat-sync monitor --nats nats://localhost:4222 --cluster chorus-dev
  backbeat-sync monitor --once --json | jq '.tasks[] | select(.state == "failed")'

--once listens until one full beat has passed (or --timeout) and prints one
snapshot; exit code 1 if nothing arrived in time.""",
    add_arguments=_arguments,
    run=_cmd_monitor,
)
