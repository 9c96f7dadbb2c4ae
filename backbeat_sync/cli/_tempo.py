"""``backbeat-sync tempo``: set the tempo (and bar length) of a cluster run by HA pulses."""

from __future__ import annotations

import argparse
from typing import Final

from ._base import EXIT_OK, PROG, Command, Out, UsageError, config_from_args, positive_int, tempo


def _cmd_tempo(args: argparse.Namespace, out: Out) -> int:
    """``tempo BPM``: write the tempo to the HA pulse bucket; the leader applies it at the next downbeat."""
    from ..ha import read_lease, write_tempo

    cfg = config_from_args(args)
    if cfg.is_local:
        raise UsageError(
            "tempo sets the tempo of HA pulses on NATS: give a server with --nats nats://HOST:4222"
        )
    revision = write_tempo(cfg, args.bpm, bar_length=args.bar, bucket=args.bucket)
    bar = f", {args.bar} beats per bar" if args.bar is not None else ""
    out.line(
        f"{PROG} tempo: cluster {cfg.cluster_id} set to {args.bpm:g} BPM{bar}"
        f" (bucket {args.bucket}, revision {revision})."
    )
    lease = read_lease(cfg, bucket=args.bucket)
    if lease is None or not lease.holder:
        out.line("No HA pulse leads this cluster now: whoever leads next applies it at its first downbeat.")
    else:
        out.line(
            f"The leader ({lease.holder}, now at {lease.grid.tempo_bpm:g} BPM)"
            " applies it at the next downbeat."
        )
    return EXIT_OK


def _arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("bpm", type=tempo, metavar="BPM", help="beats per minute, > 0 and <= 6000")
    p.add_argument(
        "--bar", type=positive_int, metavar="N", help="beats per bar from then on (default: unchanged)"
    )
    p.add_argument(
        "--bucket",
        default="backbeat-pulse",
        metavar="NAME",
        help="the HA pulse bucket (default backbeat-pulse)",
    )


COMMAND: Final = Command(
    name="tempo",
    help="set the tempo of a cluster run by HA pulses (pulse --ha)",
    epilog="""examples:
  backbeat-sync tempo --nats nats://localhost:4222 --cluster chorus-dev 120
  backbeat-sync tempo --nats nats://localhost:4222 --cluster chorus-dev 90 --bar 3

Writes the tempo to the cluster's key in the HA pulse bucket; the leading
pulse, or whichever replica leads next, applies it at the next downbeat.""",
    add_arguments=_arguments,
    run=_cmd_tempo,
)
