"""What every command shares: exit codes, the one-line usage error, argument types, output, logging.

A command is a :class:`Command` record (its name, help, epilog, arguments and
``run``) in its own module, listed once in :mod:`backbeat_sync.cli._registry`.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from types import FrameType
from typing import Any, Final, NoReturn, TextIO

import attrs
from loguru import logger

from .. import BackbeatConfig

PROG: Final = "backbeat-sync"
EXIT_OK: Final = 0
EXIT_NO_BEAT: Final = 1
EXIT_USAGE: Final = 2
EXIT_INTERRUPTED: Final = 130
HEALTH_TASK_ID: Final = "chorus-p2p-health"

# --------------------------------------------------------------------------------------------
# errors and argument types
# --------------------------------------------------------------------------------------------


class UsageError(Exception):
    """A user error: printed as one line on stderr, exit code 2."""


class Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (and no SystemExit inside ``main``).

    A command with subcommands of its own passes ``parser_class=Parser`` to
    ``add_subparsers`` so that its errors are one line too.
    """

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{self.prog}: {message} (see {self.prog} --help)")


def number(kind: type[float] | type[int], low: float, high: float | None = None) -> Callable[[str], Any]:
    """An argparse ``type=``: an int or a finite float in ``[low, high]``, with an error naming the bound."""

    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            what = "an integer" if kind is int else "a number"
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None
        if isinstance(value, float) and not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
        if value < low or (high is not None and value > high):
            bound = f">= {low:g}" if high is None else f"between {low:g} and {high:g}"
            raise argparse.ArgumentTypeError(f"{text!r} must be {bound}")
        return value

    parse.__name__ = kind.__name__
    return parse


def tempo(text: str) -> float:
    """An argparse ``type=``: a tempo in BPM, > 0 and <= 6000 (the wire's range)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not (math.isfinite(value) and 0 < value <= 6000):
        raise argparse.ArgumentTypeError(f"{text!r} must be a tempo in BPM, > 0 and <= 6000")
    return value


positive_int = number(int, 1)
port = number(int, 0, 65535)
seconds = number(float, 0.0)


def connection_args(p: argparse.ArgumentParser, *, nats_default: str = "$CHORUS_BACKBEAT_NATS_URL") -> None:
    """Add the shared flags: ``--nats``, ``--cluster``, ``--connect-timeout``, ``-v``, ``--plain``."""
    p.add_argument(
        "--nats",
        metavar="URL",
        help=f"NATS server URL(s), comma-separated; local:// = in-process pulse (default {nats_default})",
    )
    p.add_argument("--cluster", metavar="ID", help="cluster id (default $CHORUS_BACKBEAT_CLUSTER_ID)")
    p.add_argument(
        "--connect-timeout",
        type=seconds,
        metavar="S",
        help="give up connecting to NATS after S seconds (default 5)",
    )
    p.add_argument("-v", "--verbose", action="count", default=0, help="log more (-v info, -vv debug)")
    p.add_argument("--plain", action="store_true", help="plain lines even on a terminal (no rich view)")


def config_from_args(args: argparse.Namespace, **defaults: Any) -> BackbeatConfig:
    """The config from ``CHORUS_BACKBEAT_*``, then ``defaults``, then the flags."""
    overrides = dict(defaults)
    if getattr(args, "nats", None):
        overrides["nats_url"] = args.nats
    if getattr(args, "cluster", None):
        overrides["cluster_id"] = args.cluster
    if getattr(args, "connect_timeout", None) is not None:
        overrides["connect_timeout"] = args.connect_timeout
    return BackbeatConfig.from_env(**overrides)


def require_extra(module: str, extra: str, what: str) -> None:
    """Raise :class:`UsageError` (one line naming the extra) unless ``module`` imports.

    Args:
        module: the module the feature needs, e.g. ``"prometheus_client"``.
        extra: the package extra that installs it, e.g. ``"prometheus"``.
        what: the flag or feature that needs it, e.g. ``"--metrics-port"``.

    Raises:
        UsageError: the module is not installed.
    """
    try:
        __import__(module)
    except ImportError:
        raise UsageError(
            f"{what} needs {module}, which is not installed: pip install 'backbeat_sync[{extra}]'"
        ) from None


# --------------------------------------------------------------------------------------------
# commands
# --------------------------------------------------------------------------------------------


@attrs.frozen
class Command:
    """One ``backbeat-sync`` subcommand.

    Attributes:
        name: what the user types (``backbeat-sync NAME``).
        help: one line, shown in the top-level ``--help`` and as the command's description.
        epilog: the ``examples:`` block of the command's ``--help``.
        add_arguments: adds the command's own flags to its parser (the shared connection
            flags are added first, unless ``connection_flags`` is false).
        run: runs the command; returns the exit code. Raise :class:`UsageError` for a user
            error (one line, exit 2); library errors are turned into one line by ``main``.
        connection_flags: whether the command gets ``--nats``, ``--cluster``, ... .
        nats_default: how the ``--nats`` help names the default.
        quiet_logs: only library errors reach stderr (the command's view shows the rest).
    """

    name: str
    help: str
    epilog: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace, Out], int]
    connection_flags: bool = True
    nats_default: str = "$CHORUS_BACKBEAT_NATS_URL"
    quiet_logs: bool = False


# --------------------------------------------------------------------------------------------
# output, logging and signals
# --------------------------------------------------------------------------------------------


def rich_available() -> bool:
    """Whether rich (the ``cli`` extra) can be imported."""
    try:
        import rich  # noqa: F401
    except ImportError:
        return False
    return True


@attrs.define
class Out:
    """Where a command writes, and whether it draws rich views there."""

    stream: TextIO
    rich: bool
    #: Library log lines are held back until the command is connected: if connecting
    #: fails, the one error line says it all (``-v`` shows them anyway).
    logs_open: threading.Event = attrs.field(factory=threading.Event)

    @classmethod
    def for_args(cls, args: argparse.Namespace, stream: TextIO) -> Out:
        """Rich views only on a terminal, with rich installed, and without ``--plain``."""
        isatty = getattr(stream, "isatty", None)
        tty = bool(isatty()) if callable(isatty) else False
        return cls(stream, tty and not getattr(args, "plain", False) and rich_available())

    def line(self, text: str = "") -> None:
        """Write one line and flush (a pipe reader sees it at once)."""
        self.stream.write(text + "\n")
        self.stream.flush()

    def console(self) -> Any:
        """A rich console on this stream."""
        from rich.console import Console

        return Console(file=self.stream)


def _write_stderr(message: Any) -> None:
    sys.stderr.write(str(message))


#: The id of the stderr handler restored by the last ``main()`` (None: loguru's own, id 0).
_stderr_handler: int | None = None


@contextlib.contextmanager
def cli_logging(verbosity: int, gate: threading.Event, *, quiet: bool = False) -> Iterator[None]:
    """Send the library's log lines to stderr (WARNING, or INFO/DEBUG with -v/-vv); undo on exit.

    Without ``-v``, lines are dropped until ``gate`` is set (the command is connected);
    with ``quiet`` (the demo, whose view shows the budget warnings) only errors show.
    This is the only place the package configures loguru sinks.
    """
    global _stderr_handler
    level = ("ERROR" if quiet else "WARNING") if verbosity <= 0 else "INFO" if verbosity == 1 else "DEBUG"
    removed_default = True
    try:
        logger.remove(0 if _stderr_handler is None else _stderr_handler)
    except ValueError:
        removed_default = False

    def write(message: Any) -> None:
        if verbosity > 0 or gate.is_set():
            sys.stderr.write(str(message))  # looked up per line: rich's Live redirects stderr

    sink = logger.add(
        write,
        level=level,
        format="<dim>{time:HH:mm:ss}</dim> <level>{level: <7}</level> {message}",
        colorize=None,
    )
    logger.enable("backbeat_sync")
    try:
        yield
    finally:
        logger.disable("backbeat_sync")
        logger.remove(sink)
        if removed_default:  # put loguru's stderr handler back (looked up per line, as pytest swaps it)
            _stderr_handler = logger.add(_write_stderr, colorize=False)


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """In the main thread, turn SIGTERM into KeyboardInterrupt (so it stops as cleanly as Ctrl-C)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
