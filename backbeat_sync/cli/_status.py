"""``backbeat-sync status``: check the connection and the beat; the HAP status line and health fields."""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from collections.abc import Mapping
from typing import Any, Final

from .. import BackbeatConnectionError, Integration
from ._base import EXIT_NO_BEAT, EXIT_OK, EXIT_USAGE, PROG, Command, Out, config_from_args, seconds


def _cmd_status(args: argparse.Namespace, out: Out) -> int:
    """``status``: connect, wait for beats, print the HAP line and the health fields."""
    cfg = config_from_args(args)
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


def _print_status(out: Out, args: argparse.Namespace, line: str, health: Mapping[str, Any]) -> None:
    if args.json:
        out.line(json.dumps({"status": line.split(" ", 1)[1].lower(), "health": health}, sort_keys=True))
        return
    out.line(f"BACKBEAT: {line}")
    for key in _STATUS_FIELDS:
        if key in health:
            value = health[key]
            shown = json.dumps(value) if isinstance(value, (bool, list)) else value
            out.line(f"  {key}: {shown}")


def _arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print the health as JSON")
    p.add_argument(
        "--timeout",
        type=seconds,
        metavar="S",
        help="wait at most S seconds for beats (default 1.5 beats, at least 5 s)",
    )


COMMAND: Final = Command(
    name="status",
    help="check the connection and the beat; the HAP status line and health fields",
    epilog="""examples:
  backbeat-sync status --nats nats://localhost:4222
  backbeat-sync status --json --timeout 10

exit codes: 0 connected and beats arrive; 1 connected but no beat in time, or
BACKBEAT disabled (CHORUS_BACKBEAT_ENABLED=false); 2 server unreachable or bad argument.""",
    add_arguments=_arguments,
    run=_cmd_status,
)
