"""``backbeat-sync pulse``: the cluster's metronome, publishing beat frames on NATS."""

from __future__ import annotations

import argparse
import time
from typing import Any, Final

from ._base import EXIT_OK, PROG, Command, Out, UsageError, config_from_args, number, positive_int, tempo


def _cmd_pulse(args: argparse.Namespace, out: Out) -> int:
    """``pulse``: publish beat frames on NATS until interrupted (or ``--beats N``)."""
    from ..pulse import Pulse

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
    sign = None
    if cfg.signing_key is not None:  # CHORUS_BACKBEAT_SIGNING_KEY: sign every frame (the signing extra)
        from ..signing import SigningKey

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


COMMAND: Final = Command(
    name="pulse",
    help="run the cluster's metronome: publish beat frames on NATS",
    epilog="""examples:
  backbeat-sync pulse --nats nats://localhost:4222 --cluster chorus-dev --tempo 60
  CHORUS_BACKBEAT_CLUSTER_ID=chorus-dev backbeat-sync pulse --tempo 2 --bar 4

Runs until Ctrl-C (or SIGTERM, or --beats N beats) and stops cleanly.""",
    add_arguments=_arguments,
    run=_cmd_pulse,
)
