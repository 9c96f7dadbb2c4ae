"""``backbeat-sync streams``: the JetStream stream that holds a cluster's final claims exactly once."""

from __future__ import annotations

import argparse
from typing import Final

from ._base import (
    EXIT_OK,
    PROG,
    Command,
    Out,
    Parser,
    UsageError,
    config_from_args,
    connection_args,
    number,
)


def _cmd_streams(args: argparse.Namespace, out: Out) -> int:
    """``streams create``: create (or bring up to date) the claims stream of ``--cluster``."""
    from ..streams import create_claims_stream

    cfg = config_from_args(args)
    if cfg.is_local:
        raise UsageError(
            "streams live on a NATS server with JetStream: give one with --nats nats://HOST:4222"
        )
    made = create_claims_stream(
        cfg,
        name=args.name,
        replicas=args.replicas,
        duplicate_window=args.duplicate_window,
        max_age=args.max_age,
    )
    verb = "created" if made.created else "found (settings brought up to date)"
    out.line(
        f"{PROG} streams: {made.name} {verb}: subjects {', '.join(made.subjects)}, file storage,"
        f" {made.replicas} replica(s), duplicate window {made.duplicate_window:g} s,"
        f" max age {made.max_age:g} s, max bytes {made.max_bytes}, {made.messages} message(s)."
    )
    out.line(f"Agents use it with CHORUS_BACKBEAT_CLAIMS_STREAM={made.name}")
    return EXIT_OK


def _arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="action", metavar="ACTION", parser_class=Parser)
    sub.required = True
    create = sub.add_parser("create", help="create the claims stream (or bring its settings up to date)")
    # The shared flags work before and after the action (``streams create --nats URL``); here
    # they default to "not given", so they never overwrite what came before the action.
    connection_args(create)
    for action in create._actions:
        if action.dest in {"nats", "cluster", "connect_timeout", "verbose", "plain"}:
            action.default = argparse.SUPPRESS
    create.add_argument("--name", metavar="NAME", help="stream name (default BACKBEAT_CLAIMS_{cluster})")
    create.add_argument(
        "--replicas", type=number(int, 1, 5), metavar="N", help="replicas (default: 3 on a cluster, else 1)"
    )
    create.add_argument(
        "--duplicate-window",
        type=number(float, 1.0),
        default=300.0,
        metavar="S",
        help="seconds a Nats-Msg-Id is remembered (default 300)",
    )
    create.add_argument(
        "--max-age",
        type=number(float, 1.0),
        default=86_400.0,
        metavar="S",
        help="seconds a claim is kept (default 86400, a day)",
    )


COMMAND: Final = Command(
    name="streams",
    help="manage the JetStream stream that holds final claims exactly once",
    epilog="""examples:
  backbeat-sync streams create --nats nats://localhost:4222 --cluster chorus-dev
  backbeat-sync streams create --nats nats://localhost:4222 --cluster chorus-dev --name CLAIMS

The stream captures backbeat.status.{cluster}.> (every claim of the cluster);
agents with CHORUS_BACKBEAT_CLAIMS_STREAM set publish their final claims to it
with a Nats-Msg-Id, so it holds each one exactly once.""",
    add_arguments=_arguments,
    run=_cmd_streams,
)
