"""Logging: the seed's ``Logger`` interface, with loguru as the default.

As a library, backbeat_sync never configures loguru sinks; it logs under the
name ``backbeat_sync``, which ``logger.disable("backbeat_sync")`` silences and
``logger.enable("backbeat_sync")`` turns back on.
"""

from __future__ import annotations

import time
from typing import Any, Protocol

from loguru import logger as _loguru

__all__ = ["Logger", "LoggerAdapter", "RateLimitedLog"]


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
    """Sends pre-formatted lines to a user logger, or to loguru bound with the agent's fields.

    Args:
        user: a logger with ``info/warn/error(msg)``; stdlib loggers work too (``warning``).
        **fields: structured fields bound on the loguru logger (cluster, agent).
    """

    def __init__(self, user: Any = None, **fields: Any) -> None:
        self._user = user
        self._loguru = _loguru.bind(**fields)
        self._warn = None
        if user is not None:
            self._warn = getattr(user, "warn", None) or user.warning

    def debug(self, msg: str) -> None:
        """Debug lines go to loguru only (the seed's interface has no debug)."""
        if self._user is None:
            self._loguru.opt(depth=1).debug(msg)

    def info(self, msg: str) -> None:
        """Log ``msg`` at info level."""
        if self._user is not None:
            self._user.info(msg)
        else:
            self._loguru.opt(depth=1).info(msg)

    def warn(self, msg: str) -> None:
        """Log ``msg`` at warning level."""
        if self._warn is not None:
            self._warn(msg)
        else:
            self._loguru.opt(depth=1).warning(msg)

    def error(self, msg: str) -> None:
        """Log ``msg`` at error level."""
        if self._user is not None:
            self._user.error(msg)
        else:
            self._loguru.opt(depth=1).error(msg)


class RateLimitedLog:
    """Logs the first event of a burst at once, then at most one summary per ``interval``.

    Args:
        log: where to write.
        interval: seconds between lines for the same key.
    """

    def __init__(self, log: LoggerAdapter, interval: float = 5.0) -> None:
        self._log = log
        self._interval = interval
        self._state: dict[str, tuple[float, int]] = {}

    def warn(self, key: str, msg: str) -> None:
        """Warn ``msg`` under ``key``, or count it if a line for ``key`` went out recently."""
        now = time.monotonic()
        last, suppressed = self._state.get(key, (0.0, 0))
        if now - last >= self._interval:
            extra = f" (+{suppressed} more since the last report)" if suppressed else ""
            self._state[key] = (now, 0)
            self._log.warn(msg + extra)
        else:
            self._state[key] = (last, suppressed + 1)
