"""``backbeat-sync status``: a read-only probe of the cluster's beat, fit for scripts and Kubernetes.

It subscribes to the beat subject, then asks the pulse once for its latest frame
on the last-beat subject (an optional part of the protocol: a pulse that does
not answer within :data:`ASK_TIMEOUT` leaves the probe waiting for the next beat,
as before). It publishes no claim, and returns as soon as one frame is in (or when
the wait runs out). The verdict is the age of that beat against the tempo: a beat
within ``--max-age`` beats is ``ok``.
"""

from __future__ import annotations

import argparse
import json
import queue
import sys
import time
from datetime import datetime
from typing import Any, Final

from loguru import logger

from .. import BackbeatConfig, BackbeatConnectionError, BeatFrame, ProtocolError, parse_beat_frame
from ._base import (
    EXIT_NO_BEAT,
    EXIT_OK,
    EXIT_USAGE,
    PROG,
    Command,
    Out,
    config_from_args,
    number,
    seconds,
)
from ._link import Listener

#: Why a probe is not ok (``reason``); ``ok`` has reason None. Exit code 2 for unreachable, else 1.
REASONS: Final = ("no_beat", "unreachable", "disabled", "degraded")
DEFAULT_MAX_AGE: Final = 2.0
#: The shortest default wait: at a fast tempo, max_age beats are less than the time a
#: subscription takes to be in place on a loaded machine or a remote server.
MIN_WAIT: Final = 1.0
#: A beat's age is read against ``sent_at``, the pulse's wall clock: an age within this many
#: seconds is never held against it (clocks of two hosts differ; at 6000 BPM a beat is 10 ms).
CLOCK_TOLERANCE: Final = 1.0
#: How long the probe waits for the pulse to answer on the last-beat subject (seconds).
ASK_TIMEOUT: Final = 0.5


def _wall_age(frame: BeatFrame, wall_arrival: float) -> float | None:
    """Seconds between the frame's ``sent_at`` and its arrival here (None without ``sent_at``)."""
    if not frame.sent_at:
        return None
    try:
        sent = datetime.fromisoformat(frame.sent_at.replace("Z", "+00:00")).timestamp()
    except ValueError:  # pragma: no cover - the strict parser has checked the format
        return None
    return wall_arrival - sent


class _Probe:
    """Wait for one beat frame of the cluster on the beat subject; count what does not qualify."""

    def __init__(self, cfg: BackbeatConfig) -> None:
        self.cfg = cfg
        self.subject = cfg.beat_subject_for()
        self._inbox: queue.SimpleQueue[tuple[bytes, float, str]] = queue.SimpleQueue()
        self.rejected = 0
        self.last_rejection = ""
        self._verifier: Any = None
        if cfg.trusted_pulse_keys:
            from ..signing import Verifier

            self._verifier = Verifier.from_keys(cfg.trusted_pulse_keys, field="trusted_pulse_keys")
        self.listener = Listener(cfg, self.subject, self._arrived, name="status", local_pulse=True)

    def _arrived(self, data: bytes) -> None:
        self._inbox.put((data, time.time(), "subscription"))

    def ask(self, timeout: float) -> bool:
        """Ask the pulse for its latest frame; an answer is judged like an arrived beat.

        Returns:
            Whether an answer came (None of the pulse's business whether it is acceptable).
        """
        data = self.listener.request(self.cfg.last_beat_subject_for(), timeout)
        if data is None:
            return False
        self._inbox.put((data, time.time(), "request"))
        return True

    def wait(self, until: float) -> tuple[BeatFrame, float, str] | None:
        """The first acceptable frame, its wall-clock arrival and how it came (``request`` or
        ``subscription``), or None by monotonic ``until``."""
        while (left := until - time.monotonic()) > 0:
            try:
                data, wall, via = self._inbox.get(timeout=left)
            except queue.Empty:
                return None
            try:
                frame = parse_beat_frame(data)
            except ProtocolError as exc:
                self._reject(str(exc))
                continue
            if frame.cluster_id != self.cfg.cluster_id:
                continue  # another cluster's frame on a shared subject: not ours to judge
            if self._verifier is not None:
                verdict = self._verifier.verify(frame)
                if verdict != "ok":
                    self._reject(f"beat {frame.beat_index} is not signed by a trusted pulse key ({verdict})")
                    continue
            return frame, wall, via
        return None

    def _reject(self, why: str) -> None:
        self.rejected += 1
        self.last_rejection = why


def _report(cfg: BackbeatConfig, max_age: float) -> dict[str, Any]:
    return {
        "ok": False,
        "reason": None,
        "status": "connected",
        "detail": "",
        "cluster_id": cfg.cluster_id,
        "subject": cfg.beat_subject_for(),
        "server": cfg.masked_url,
        "max_age_beats": max_age,
        "waited_seconds": 0.0,
        "beat": None,
        "beat_age_seconds": None,
        "beat_age_beats": None,
        "rejected_frames": 0,
        "via": None,
    }


def _cmd_status(args: argparse.Namespace, out: Out) -> int:
    """``status``: ask the pulse for its last beat, or wait for one; judge its age, print the verdict."""
    cfg = config_from_args(args)
    max_age: float = args.max_age
    report = _report(cfg, max_age)
    if not cfg.enabled:
        report.update(status="disabled", reason="disabled", detail="BACKBEAT is disabled")
        report["detail"] += " (CHORUS_BACKBEAT_ENABLED=false)"
        _print(out, args, report)
        return EXIT_NO_BEAT
    # Until a frame tells the cluster's tempo, the wait is max_age beats at the configured one.
    wait = args.timeout if args.timeout is not None else max(MIN_WAIT, max_age * cfg.beat_duration)
    probe = _Probe(cfg)
    started = time.monotonic()
    try:
        probe.listener.start()
    except BackbeatConnectionError as exc:
        report.update(status="disconnected", reason="unreachable", detail=str(exc))
        _print(out, args, report)
        raise
    out.logs_open.set()
    logger.info(f"status: listening on {probe.subject} at {cfg.masked_url} for up to {wait:g} s")
    try:
        if wait >= 2.0 and not args.json and sys.stderr.isatty():
            print(
                f"{PROG} status: waiting up to {wait:g} s for a beat on {probe.subject}"
                f" (--max-age {max_age:g} beats at {cfg.tempo_bpm:g} BPM; --timeout S to change)",
                file=sys.stderr,
            )
        # The pulse's answer comes at once; a pulse without the responder: wait for a beat.
        probe.ask(min(ASK_TIMEOUT, wait))
        got = probe.wait(started + wait)
        connected = probe.listener.connected
    finally:
        out.logs_open.clear()  # what a normal stop logs is not news
        probe.listener.stop()
    report["waited_seconds"] = round(time.monotonic() - started, 3)
    report["rejected_frames"] = probe.rejected
    if got is not None:
        frame, wall, via = got
        report["via"] = via
        age = _wall_age(frame, wall)
        report["beat"] = {
            "beat_index": frame.beat_index,
            "tempo_bpm": frame.tempo_bpm,
            "bar_length": frame.bar_length,
            "downbeat": frame.downbeat,
            "window_id": frame.window_id,
            "sent_at": frame.sent_at,
        }
        if age is not None:
            report["beat_age_seconds"] = round(age, 3)
            report["beat_age_beats"] = round(age / frame.beat_duration, 3)
        if age is not None and age > CLOCK_TOLERANCE and age / frame.beat_duration > max_age:
            report.update(
                reason="degraded",
                detail=f"beat {frame.beat_index} arrived {age:.3g} s after it was sent, more than"
                f" {max_age:g} beats at {frame.tempo_bpm:g} BPM (a backlog, or clocks out of step)",
            )
        else:
            report.update(ok=True, detail=f"beat {frame.beat_index} at {frame.tempo_bpm:g} BPM")
    elif not connected:
        report.update(
            status="disconnected",
            reason="unreachable",
            detail=f"the connection to {cfg.masked_url} was lost while waiting for a beat",
        )
    elif probe.rejected:
        report.update(
            reason="degraded",
            detail=f"{probe.rejected} frame(s) on {probe.subject} rejected"
            f" within {wait:g} s; last: {probe.last_rejection}",
        )
    else:
        report.update(reason="no_beat", detail=f"no beat on {probe.subject} within {wait:g} s")
    _print(out, args, report)
    if report["ok"]:
        return EXIT_OK
    print(f"{PROG} status: {report['detail']}", file=sys.stderr)
    return EXIT_USAGE if report["reason"] == "unreachable" else EXIT_NO_BEAT


_LINES: Final = {"connected": "✅ Connected", "disconnected": "⚠️ Disconnected", "disabled": "❌ Disabled"}


def _print(out: Out, args: argparse.Namespace, report: dict[str, Any]) -> None:
    if args.json:
        out.line(json.dumps(report, sort_keys=True))
        return
    out.line(f"BACKBEAT: {_LINES[report['status']]}")
    out.line(f"  ok: {json.dumps(report['ok'])}")
    if report["reason"] is not None:
        out.line(f"  reason: {report['reason']}")
    out.line(f"  detail: {report['detail']}")
    if report["status"] == "disabled":
        return
    out.line(f"  cluster_id: {report['cluster_id']}")
    out.line(f"  subject: {report['subject']}")
    beat = report["beat"]
    if beat is not None:
        out.line(f"  current_beat: {beat['beat_index']}")
        out.line(f"  current_tempo: {beat['tempo_bpm']:g}")
        if report["beat_age_seconds"] is not None:
            out.line(
                f"  beat_age: {report['beat_age_seconds']:g} s ({report['beat_age_beats']:g} beats,"
                f" max {report['max_age_beats']:g})"
            )
    if report["status"] != "disconnected" or beat is not None:
        out.line(f"  waited: {report['waited_seconds']:g} s")


def _arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print the verdict as one JSON object")
    p.add_argument(
        "--max-age",
        type=number(float, 0.01),
        default=DEFAULT_MAX_AGE,
        metavar="BEATS",
        help="a beat older than BEATS beats is unhealthy; wait as long for one (default 2)",
    )
    p.add_argument(
        "--timeout",
        type=seconds,
        metavar="S",
        help="wait at most S seconds for a beat (default: --max-age beats at the tempo, at least 1 s)",
    )


COMMAND: Final = Command(
    name="status",
    help="probe the cluster's beat: ask the pulse for its last beat (or wait for one), judge its age",
    epilog="""examples:
  backbeat-sync status --nats nats://localhost:4222 --cluster chorus-dev
  backbeat-sync status --json --max-age 3 | jq .ok
  backbeat-sync status --timeout 5 || echo "no healthy beat"

exit codes: 0 ok (a beat within --max-age beats); 1 no_beat, degraded (a beat too old,
or only rejected frames) or disabled (CHORUS_BACKBEAT_ENABLED=false); 2 unreachable
(no server, wrong credentials, connection lost) or a bad argument.""",
    add_arguments=_arguments,
    run=_cmd_status,
)
