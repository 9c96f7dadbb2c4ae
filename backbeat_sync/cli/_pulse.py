"""``backbeat-sync pulse``: the cluster's metronome, publishing beat frames on NATS."""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any, Final

from .. import BackbeatConfig, BeatFrame, ProtocolError, Pulse, parse_beat_frame
from ._base import EXIT_OK, PROG, Command, Out, UsageError, config_from_args, number, positive_int, tempo
from ._link import Listener

#: The longest the start waits to hear another pulse (a slower one may be heard later: a warning).
CHECK_MAX: Final = 5.0
#: While running, the warning about another pulse repeats at most this often (seconds).
WARN_EVERY: Final = 60.0


class _OtherPulses:
    """Watches the beat subject for frames this process did not send: another pulse beats there.

    Our own frames are recorded as they go out (the pulse's ``sign`` hook sees each
    one before it is published), so their echo is told apart by ``(beat_index,
    sent_at)``.
    """

    def __init__(self, cfg: BackbeatConfig) -> None:
        self._cluster = cfg.cluster_id
        self._lock = threading.Lock()
        self._ours: deque[tuple[int, str | None]] = deque(maxlen=256)
        self.frames = 0
        self.last: BeatFrame | None = None
        self.seen = threading.Event()
        self.listener = Listener(cfg, cfg.beat_subject_for(), self._arrived, name="pulse-check")

    def hook(self, sign: Callable[[BeatFrame], BeatFrame] | None) -> Callable[[BeatFrame], BeatFrame]:
        """The pulse's ``sign`` hook: sign (if asked), then remember the frame as ours."""

        def record(frame: BeatFrame) -> BeatFrame:
            if sign is not None:
                frame = sign(frame)
            with self._lock:
                self._ours.append((frame.beat_index, frame.sent_at))
            return frame

        return record

    def _arrived(self, data: bytes) -> None:
        try:
            frame = parse_beat_frame(data)
        except ProtocolError:
            return
        if frame.cluster_id != self._cluster:
            return
        with self._lock:
            if (frame.beat_index, frame.sent_at) in self._ours:
                return
            self.frames += 1
            self.last = frame
        self.seen.set()

    def describe(self) -> str:
        """What the last foreign frame said."""
        f = self.last
        return "" if f is None else f"beat {f.beat_index} at {f.tempo_bpm:g} BPM"


def _cmd_pulse(args: argparse.Namespace, out: Out) -> int:
    """``pulse``: publish beat frames on NATS until interrupted (or ``--beats N``)."""
    overrides: dict[str, Any] = {}
    if args.tempo is not None:
        overrides["tempo_bpm"] = args.tempo
    if args.bar is not None:
        overrides["bar_length"] = args.bar
    cfg = config_from_args(args, **overrides)
    if cfg.is_local:
        raise UsageError(
            "a pulse on local:// would only beat inside this process; give a server: --nats nats://HOST:4222"
        )
    subject = cfg.beat_subject_for()
    default = not args.cluster and "CHORUS_BACKBEAT_CLUSTER_ID" not in os.environ
    which = " (the default: choose with --cluster or CHORUS_BACKBEAT_CLUSTER_ID)" if default else ""
    out.line(f"{PROG} pulse: cluster {cfg.cluster_id}{which}, subject {subject}, server {cfg.masked_url}")
    sign = None
    if cfg.signing_key is not None:  # CHORUS_BACKBEAT_SIGNING_KEY: sign every frame (the signing extra)
        from ..signing import SigningKey

        sign = SigningKey.load(cfg.signing_key, cfg.signing_key_id).sign_frame
    if args.ha:
        # Replicas of an HA pulse beat on one subject by design (one at a time): no check.
        return _run(
            args,
            out,
            cfg,
            Pulse(
                cfg,
                start_index=args.start_index,
                sign=sign,
                ha=True,
                bucket=args.bucket,
                max_beats=args.beats,
            ),
        )
    others = _OtherPulses(cfg)
    others.listener.start()
    try:
        # Another pulse beats within one of its beats; ours is the best guess of its tempo.
        check = min(CHECK_MAX, cfg.beat_duration + 0.5)
        if check >= 2.0 and sys.stderr.isatty():
            print(f"{PROG} pulse: checking {subject} for another pulse ({check:g} s) ...", file=sys.stderr)
        if others.seen.wait(check):
            what = f"another pulse already beats on {subject} ({others.describe()})"
            if not args.force:
                raise UsageError(
                    f"{what}: stop it, choose another --cluster, or --force to run a second pulse"
                )
            print(f"{PROG} pulse: warning: {what}; --force: starting a second one", file=sys.stderr)
        return _run(
            args,
            out,
            cfg,
            Pulse(cfg, start_index=args.start_index, sign=others.hook(sign), max_beats=args.beats),
            others,
        )
    finally:
        others.listener.stop()


def _run(
    args: argparse.Namespace, out: Out, cfg: BackbeatConfig, pulse: Pulse, others: _OtherPulses | None = None
) -> int:
    first = pulse.next_index
    pulse.start()
    out.logs_open.set()
    bar = pulse.bar_length
    out.line(
        f"{PROG} pulse: {pulse.tempo_bpm:g} BPM, {bar} beats per bar, first beat {first}. Ctrl-C stops it."
    )
    if args.ha:
        out.line(
            f"HA: bucket {args.bucket}; one replica leads, the others stand by"
            " (the bucket's grid and tempo win over --tempo, --bar and --start-index once it has them)."
        )
    live = None
    if out.rich:
        from rich.live import Live

        live = Live(console=out.console(), refresh_per_second=8, get_renderable=lambda: _render_pulse(pulse))
        live.start()
    seen = pulse.next_index
    leading = False
    warned_at, warned_frames = float("-inf"), others.frames if others is not None else 0
    try:
        # With --beats N the pulse itself stops after its N-th frame; we only wait for that.
        done = False
        while not done:
            step = min(0.1, 15.0 / pulse.tempo_bpm)
            if args.beats is None:
                time.sleep(step)
            else:
                done = pulse.wait(step)
            now = pulse.next_index
            if args.ha and live is None and pulse.is_leader != leading:
                leading = pulse.is_leader
                out.line(f"HA: {'leading from beat ' + str(now) if leading else 'standing by'}")
            if live is None:
                for index in range(seen, now):
                    if index % bar == 0:
                        out.line(
                            f"beat {index} (bar {index // bar}) tempo {pulse.tempo_bpm:g} BPM"
                            f" sent {pulse.frames_sent} skipped {pulse.frames_skipped}"
                            f"{'' if pulse.connected else ' DISCONNECTED'}"
                        )
            seen = now
            if (
                others is not None
                and others.frames > warned_frames
                and time.monotonic() - warned_at >= WARN_EVERY
            ):
                warned_at, warned_frames = time.monotonic(), others.frames
                print(
                    f"{PROG} pulse: warning: another pulse is beating on {cfg.beat_subject_for()} too"
                    f" ({others.describe()}): agents see two beat sequences; stop one of them",
                    file=sys.stderr,
                )
    except KeyboardInterrupt:
        pass
    finally:
        if live is not None:
            live.stop()
        out.logs_open.clear()  # what a normal stop logs is not news
        pulse.stop()
    foreign = f", {others.frames} frame(s) from another pulse" if others is not None and others.frames else ""
    out.line(
        f"{PROG} pulse: stopped after {pulse.frames_sent} beat(s)"
        f" ({pulse.frames_skipped} skipped while disconnected, {pulse.reconnect_count} reconnect(s){foreign})"
    )
    return EXIT_OK


def _render_pulse(pulse: Pulse) -> Any:
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


def _arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--tempo",
        type=tempo,
        metavar="BPM",
        help="beats per minute (default $CHORUS_BACKBEAT_TEMPO_BPM or 2)",
    )
    p.add_argument(
        "--bar",
        type=positive_int,
        metavar="N",
        help="beats per bar (default $CHORUS_BACKBEAT_BAR_LENGTH or 4)",
    )
    p.add_argument(
        "--start-index",
        type=number(int, 0),
        metavar="N",
        help="first beat index (default: from the wall clock)",
    )
    p.add_argument(
        "--beats", type=positive_int, metavar="N", help="stop after N beats (default: run until Ctrl-C)"
    )
    p.add_argument(
        "--force",
        action="store_true",
        help="start even when another pulse already beats on the subject (two beat sequences)",
    )
    p.add_argument(
        "--ha",
        action="store_true",
        help="one of several replicas: lead by a lease in a JetStream key-value bucket (docs/ha.md)",
    )
    p.add_argument(
        "--bucket",
        default="backbeat-pulse",
        metavar="NAME",
        help="with --ha: the key-value bucket (default backbeat-pulse, created if missing)",
    )


COMMAND: Final = Command(
    name="pulse",
    help="run the cluster's metronome: publish beat frames on NATS",
    epilog="""examples:
  backbeat-sync pulse --nats nats://localhost:4222 --cluster chorus-dev --tempo 60
  CHORUS_BACKBEAT_CLUSTER_ID=chorus-dev backbeat-sync pulse --tempo 2 --bar 4
  backbeat-sync pulse --ha --nats nats://n1:4222,nats://n2:4222 --cluster chorus-dev

Without --cluster or CHORUS_BACKBEAT_CLUSTER_ID it beats for chorus-production,
the seed's default cluster. It refuses to start when another pulse already beats
on the subject (--force starts a second one), and warns when one appears later;
with --ha, the replicas beat on one subject by design, one at a time.
Runs until Ctrl-C (or SIGTERM, or --beats N beats) and stops cleanly.""",
    add_arguments=_arguments,
    run=_cmd_pulse,
)
