"""Logging: the seed's ``Logger`` interface, with loguru as the default.

As a library, backbeat_sync never configures loguru sinks; it logs under the
name ``backbeat_sync``, which ``logger.disable("backbeat_sync")`` silences and
``logger.enable("backbeat_sync")`` turns back on.

Every library line goes through :data:`library_logger` (or a
:class:`LoggerAdapter`), which writes to loguru, or, after
:func:`log_to_stdlib`, to the stdlib ``logging`` logger named after the
module that wrote the line (children of ``logging.getLogger("backbeat_sync")``).
"""

from __future__ import annotations

import logging
import sys
import threading
import traceback
from typing import Any, Protocol

from loguru import logger as _loguru

from ._time import SYSTEM_TIME, TimeSource

__all__ = [
    "LibraryLogger",
    "Logger",
    "LoggerAdapter",
    "RateLimitedLog",
    "StdlibLogging",
    "library_logger",
    "log_to_stdlib",
]

#: loguru level names -> stdlib level numbers (loguru's TRACE and SUCCESS fold into DEBUG and INFO).
_STDLIB_LEVELS = {
    "TRACE": logging.DEBUG,
    "DEBUG": logging.DEBUG,
    "INFO": logging.INFO,
    "SUCCESS": logging.INFO,
    "WARNING": logging.WARNING,
    "ERROR": logging.ERROR,
    "CRITICAL": logging.CRITICAL,
}

STDLIB_ROOT = "backbeat_sync"

# How many routes to stdlib are open (log_to_stdlib nests); read without the lock on every line.
_stdlib_routes = 0
_routes_lock = threading.Lock()


class StdlibLogging:
    """The handle :func:`log_to_stdlib` returns: ``close()`` (or leaving ``with``) undoes it.

    Attributes:
        logger: ``logging.getLogger("backbeat_sync")``, the parent of every logger the library uses.
    """

    def __init__(self, previous_level: int | None) -> None:
        self.logger = logging.getLogger(STDLIB_ROOT)
        self._previous_level = previous_level
        self._closed = False

    def close(self) -> None:
        """Send lines back to loguru once no other route is open; restore the level. Idempotent."""
        global _stdlib_routes
        with _routes_lock:
            if self._closed:
                return
            self._closed = True
            _stdlib_routes -= 1
            if self._previous_level is not None:
                self.logger.setLevel(self._previous_level)

    def __enter__(self) -> StdlibLogging:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def log_to_stdlib(level: int | str | None = None) -> StdlibLogging:
    """Send every library line to the stdlib ``logging`` module instead of loguru.

    Lines go to ``logging.getLogger("backbeat_sync.<module>")`` (for example
    ``backbeat_sync.integration`` for the seed's 🎵/🥁/🎼/🧹 lines; the modules
    inside the ``integration`` and ``budget`` packages log under the package's
    name, their ``LOG_NAME``), so the
    handlers, filters and level of ``logging.getLogger("backbeat_sync")`` and of
    the root logger apply as for any other library. Levels: debug, info,
    warning, error; a traceback rides as ``exc_info``. The structured fields
    (cluster, agent, pulse) are the record's ``backbeat`` attribute, a dict.
    A ``logging.NullHandler`` is added to ``backbeat_sync`` once, the stdlib
    convention for libraries, so an application without logging configured
    prints nothing. An ``Integration`` given its own ``logger=`` keeps writing
    there.

    Args:
        level: when given, ``logging.getLogger("backbeat_sync").setLevel(level)``
            (restored by ``close()``); when ``None`` the level is left as the
            application set it.

    Returns:
        A handle; ``close()`` or leaving ``with log_to_stdlib(): ...`` sends lines back to
        loguru (once every open handle is closed).

    Raises:
        ValueError: ``level`` is a name the ``logging`` module does not know.
        TypeError: ``level`` is neither an ``int``, a ``str`` nor ``None``.
    """
    global _stdlib_routes
    if level is not None and not isinstance(level, (int, str)):
        raise TypeError(f"level must be an int, a str or None, not {type(level).__name__}")
    root = logging.getLogger(STDLIB_ROOT)
    with _routes_lock:
        previous = None
        if level is not None:
            previous = root.level
            root.setLevel(level.upper() if isinstance(level, str) else level)
        if not any(isinstance(h, logging.NullHandler) for h in root.handlers):
            root.addHandler(logging.NullHandler())
        _stdlib_routes += 1
    return StdlibLogging(previous)


def _stdlib_emit(
    name: str, level: str, msg: str, fields: dict[str, Any], exc: bool, depth: int, args: Any, kwargs: Any
) -> None:
    target = logging.getLogger(name if name.startswith(STDLIB_ROOT) else STDLIB_ROOT)
    levelno = _STDLIB_LEVELS.get(level, logging.INFO)
    if not target.isEnabledFor(levelno):
        return
    if args or kwargs:
        msg = msg.format(*args, **kwargs)
    target.log(levelno, msg, exc_info=exc or None, stacklevel=depth + 2, extra={"backbeat": dict(fields)})


class LibraryLogger:
    """What the library's modules log through: loguru's calls, routed to stdlib when asked.

    Offers the part of loguru's interface the library uses: ``debug``,
    ``info``, ``warning``, ``error`` (with ``str.format`` arguments, as loguru),
    ``opt(exception=True)`` and ``bind(**fields)``.
    """

    __slots__ = ("_exception", "_fields", "_loguru")

    def __init__(self, fields: dict[str, Any] | None = None, exception: bool = False) -> None:
        self._fields = fields or {}
        self._exception = exception
        self._loguru = _loguru.bind(**self._fields) if self._fields else _loguru

    def bind(self, **fields: Any) -> LibraryLogger:
        """A logger that adds ``fields`` to every line (loguru ``extra``, stdlib ``record.backbeat``)."""
        return LibraryLogger({**self._fields, **fields}, self._exception)

    def opt(self, *, exception: bool = False) -> LibraryLogger:
        """A logger whose lines carry the exception being handled (a traceback)."""
        return LibraryLogger(self._fields, exception)

    def _log(self, level: str, msg: str, depth: int, args: Any, kwargs: Any) -> None:
        # depth counts frames above this one: 2 is the caller of debug()/info()/...
        if _stdlib_routes:
            g = sys._getframe(depth).f_globals
            # A package's inner modules log under the package's name (LOG_NAME), so the names
            # users configure stay the public ones (backbeat_sync.integration, not .facade).
            name = g.get("LOG_NAME") or g.get("__name__", STDLIB_ROOT)
            _stdlib_emit(name, level, msg, self._fields, self._exception, depth, args, kwargs)
        else:
            # loguru reads the module name (for enable/disable) and the line from that frame too.
            self._loguru.opt(depth=depth, exception=self._exception).log(level, msg, *args, **kwargs)

    def debug(self, msg: str, *args: Any, **kwargs: Any) -> None:
        """Log at debug level."""
        self._log("DEBUG", msg, 2, args, kwargs)

    def info(self, msg: str, *args: Any, **kwargs: Any) -> None:
        """Log at info level."""
        self._log("INFO", msg, 2, args, kwargs)

    def warning(self, msg: str, *args: Any, **kwargs: Any) -> None:
        """Log at warning level."""
        self._log("WARNING", msg, 2, args, kwargs)

    def error(self, msg: str, *args: Any, **kwargs: Any) -> None:
        """Log at error level."""
        self._log("ERROR", msg, 2, args, kwargs)


#: The logger the library's modules use instead of importing loguru's directly.
library_logger = LibraryLogger()


class Logger(Protocol):
    """Any object with ``info``, ``warn`` and ``error`` taking a message (the seed's interface)."""

    def info(self, msg: str, *args: Any) -> Any:
        """Log at info level."""
        ...

    def warn(self, msg: str, *args: Any) -> Any:
        """Log at warning level."""
        ...

    def error(self, msg: str, *args: Any) -> Any:
        """Log at error level."""
        ...


class LoggerAdapter:
    """Sends pre-formatted lines to a user logger, or to the library's logger bound with the agent's fields.

    Args:
        user: a logger with ``info/warn/error(msg)`` (the seed's interface); a
            stdlib ``logging.Logger`` works too (``warning``, and ``debug`` lines
            reach it as well, attributed to the library's line that wrote them).
        **fields: structured fields bound on the library's logger (cluster, agent).
    """

    def __init__(self, user: Any = None, **fields: Any) -> None:
        self._user = user
        self._lib = LibraryLogger(fields)
        self._warn: Any = None
        self._debug: Any = None
        self._stdlib = isinstance(user, (logging.Logger, logging.LoggerAdapter))
        if user is not None:
            self._warn = getattr(user, "warn", None) if not self._stdlib else None
            self._warn = self._warn or user.warning
            self._debug = getattr(user, "debug", None)

    def debug(self, msg: str) -> None:
        """Debug lines go to the library's logger, or to a user logger that has ``debug``."""
        if self._user is None:
            self._lib._log("DEBUG", msg, 2, (), {})
        elif self._stdlib:
            self._user.debug(msg, stacklevel=2)
        elif self._debug is not None:
            self._debug(msg)

    def info(self, msg: str) -> None:
        """Log ``msg`` at info level."""
        if self._user is None:
            self._lib._log("INFO", msg, 2, (), {})
        elif self._stdlib:
            self._user.info(msg, stacklevel=2)
        else:
            self._user.info(msg)

    def warn(self, msg: str) -> None:
        """Log ``msg`` at warning level."""
        if self._user is None:
            self._lib._log("WARNING", msg, 2, (), {})
        elif self._stdlib:
            self._user.warning(msg, stacklevel=2)
        else:
            self._warn(msg)

    def error(self, msg: str) -> None:
        """Log ``msg`` at error level."""
        if self._user is None:
            self._lib._log("ERROR", msg, 2, (), {})
        elif self._stdlib:
            self._user.error(msg, stacklevel=2)
        else:
            self._user.error(msg)

    def exception(self, msg: str, exc: BaseException, *, level: str = "error") -> None:
        """Log ``msg`` with the traceback of ``exc`` (call it while handling ``exc``).

        A stdlib logger gets it as ``exc_info``; a seed-interface logger as one message
        (``msg``, a newline, the traceback), since that interface takes a message only.

        Args:
            msg: the line.
            exc: the exception being handled.
            level: ``"error"`` or ``"warn"``.
        """
        warn = level == "warn"
        if self._user is None:
            LibraryLogger(self._lib._fields, exception=True)._log(
                "WARNING" if warn else "ERROR", msg, 2, (), {}
            )
        elif self._stdlib:
            (self._user.warning if warn else self._user.error)(msg, exc_info=exc, stacklevel=2)
        else:
            tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)).rstrip()
            (self._warn if warn else self._user.error)(f"{msg}\n{tb}")


class RateLimitedLog:
    """Logs the first event of a burst at once, then at most one summary per ``interval``.

    Args:
        log: where to write.
        interval: seconds between lines for the same key.
        time_source: where the time is read (the integration's; a ManualTime in tests).
    """

    def __init__(
        self, log: LoggerAdapter, interval: float = 5.0, time_source: TimeSource = SYSTEM_TIME
    ) -> None:
        self._log = log
        self._interval = interval
        self._time = time_source
        self._state: dict[str, tuple[float | None, int]] = {}

    def warn(self, key: str, msg: str) -> None:
        """Warn ``msg`` under ``key``, or count it if a line for ``key`` went out recently."""
        now = self._time.monotonic()
        last, suppressed = self._state.get(key, (None, 0))
        if last is None or now - last >= self._interval:
            extra = f" (+{suppressed} more since the last report)" if suppressed else ""
            self._state[key] = (now, 0)
            self._log.warn(msg + extra)
        else:
            self._state[key] = (last, suppressed + 1)
