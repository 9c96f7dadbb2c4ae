"""The ``backbeat-sync`` command: ``demo``, ``pulse``, ``monitor``, ``status`` and more.

Run ``backbeat-sync --help`` (or ``python -m backbeat_sync --help``). Every
command reads the ``CHORUS_BACKBEAT_*`` environment variables; flags win over
them. A user error (bad flag value, no server at that URL, wrong credentials, a
missing extra) prints one line on stderr and exits with code 2, never a traceback.

Live views use rich (the ``cli`` extra) when stdout is a terminal; otherwise,
or with ``--plain``, output is plain lines that scripts and logs can read.
This package is the only place the library configures loguru sinks.

Layout: ``_base`` (exit codes, argument types, output, logging, the
:class:`Command` record), ``_registry`` (the one list of commands), one module
per command (``_demo``, ``_pulse``, ``_monitor``, ``_status``, ...),
``_view`` (the cluster view) and ``_render`` (rich and plain rendering).
"""

from __future__ import annotations

import argparse
import sys

from .. import BackbeatDisabled, BackbeatError, __version__
from ._base import (
    EXIT_INTERRUPTED,
    EXIT_NO_BEAT,
    EXIT_OK,
    EXIT_USAGE,
    PROG,
    Out,
    Parser,
    UsageError,
    cli_logging,
    connection_args,
    sigterm_as_interrupt,
)
from ._registry import COMMANDS
from ._render import render_view
from ._view import ClusterView

__all__ = ["ClusterView", "build_parser", "main", "render_view"]


def build_parser() -> argparse.ArgumentParser:
    """The ``backbeat-sync`` argument parser (exposed for the docs and tests).

    Returns:
        The parser; each command's namespace carries ``command`` (its name).
    """
    parser = Parser(
        prog=PROG,
        description="Follow, drive and inspect a BACKBEAT cluster (a distributed metronome over NATS).",
        epilog="Start with: backbeat-sync demo   (no server needed). Each command has --help.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    sub.required = True
    for command in COMMANDS:
        p = sub.add_parser(
            command.name,
            help=command.help,
            description=command.help,
            epilog=command.epilog,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        if command.connection_flags:
            connection_args(p, nats_default=command.nats_default)
        command.add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run ``backbeat-sync`` with ``argv`` (default ``sys.argv[1:]``).

    Args:
        argv: the arguments after the program name.

    Returns:
        The exit code: 0 success, 1 no beat in time or BACKBEAT disabled, 2 a user
        error (bad flag, unreachable server, wrong credentials, a missing extra),
        130 interrupted before the command could finish cleanly.
    """
    parser = build_parser()
    try:
        args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    except UsageError as exc:
        print(exc, file=sys.stderr)
        return EXIT_USAGE
    except SystemExit as exc:  # --help, --version
        return exc.code if isinstance(exc.code, int) else EXIT_OK
    command = next(c for c in COMMANDS if c.name == args.command)
    out = Out.for_args(args, sys.stdout)
    prefix = f"{PROG} {args.command}: error:"
    try:
        verbose = getattr(args, "verbose", 0)
        with cli_logging(verbose, out.logs_open, quiet=command.quiet_logs), sigterm_as_interrupt():
            return command.run(args, out)
    except UsageError as exc:
        print(f"{prefix} {exc}", file=sys.stderr)
    except BackbeatDisabled as exc:
        print(f"{prefix} {exc}", file=sys.stderr)
        return EXIT_NO_BEAT
    except BackbeatError as exc:
        print(f"{prefix} {exc}", file=sys.stderr)
    except ImportError as exc:  # an optional extra is missing: the library's message names it
        print(f"{prefix} {exc}", file=sys.stderr)
    except OSError as exc:  # e.g. --metrics-port already in use
        print(f"{prefix} {exc.strerror or exc}", file=sys.stderr)
    except KeyboardInterrupt:
        print(f"{PROG} {args.command}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    return EXIT_USAGE
