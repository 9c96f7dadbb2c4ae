"""The one place backbeat_sync reads time.

Everything that needs "now" takes a :class:`TimeSource`; tests pass a
:class:`ManualTime` (or use freezegun, which patches the ``time`` module that
:class:`SystemTime` reads through) so clock and budget maths run without sleeps.
"""

from __future__ import annotations

import threading
import time
from typing import Protocol

__all__ = ["SYSTEM_TIME", "ManualTime", "SystemTime", "TimeSource", "format_rfc3339"]


class TimeSource(Protocol):
    """Where the library reads the time."""

    def monotonic(self) -> float:
        """Seconds on a clock that never goes back (arrival times, deadlines)."""
        ...

    def time(self) -> float:
        """Seconds since the epoch, UTC (timestamps on the wire)."""
        ...


class SystemTime:
    """The real clocks, looked up on the ``time`` module at each call (freezegun-friendly)."""

    __slots__ = ()

    def monotonic(self) -> float:
        """Return ``time.monotonic()``."""
        return time.monotonic()

    def time(self) -> float:
        """Return ``time.time()``."""
        return time.time()


SYSTEM_TIME = SystemTime()


class ManualTime:
    """A time source that only moves when told to; for tests.

    Args:
        start: initial monotonic reading.
        wall: initial wall-clock reading (epoch seconds).
    """

    def __init__(self, start: float = 1000.0, wall: float = 1_790_000_000.0) -> None:
        self._lock = threading.Lock()
        self._mono = start
        self._wall = wall

    def monotonic(self) -> float:
        """Return the current manual monotonic reading."""
        return self._mono

    def time(self) -> float:
        """Return the current manual wall-clock reading."""
        return self._wall

    def advance(self, seconds: float) -> None:
        """Move both clocks forward by ``seconds``."""
        if seconds < 0:
            raise ValueError(f"seconds={seconds!r}: time only moves forward")
        with self._lock:
            self._mono += seconds
            self._wall += seconds


def format_rfc3339(epoch: float) -> str:
    """Format epoch seconds as an RFC 3339 UTC timestamp with millisecond precision and ``Z``."""
    whole = int(epoch)
    millis = round((epoch - whole) * 1000)
    if millis >= 1000:
        whole += 1
        millis -= 1000
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole)) + f".{millis:03d}Z"
