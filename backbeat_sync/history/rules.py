"""The rules of budget history: the seed's profiles, the ``"auto"`` constants, and small helpers."""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping
from typing import Any, Final

from ..errors import ConfigError

__all__ = [
    "BUSY_TIMEOUT_SECONDS",
    "DEFAULT_KEEP",
    "DEFAULT_MARGIN",
    "DEFAULT_MIN_SAMPLES",
    "DEFAULT_NAMES",
    "DEFAULT_PROFILES",
    "EXCEEDED_KINDS",
    "FLOOR_BEATS",
    "OTHER_NAME",
    "OUTCOMES",
    "PENDING_LIMIT",
    "RUN_LOG_LIMIT",
    "SCHEMA_VERSION",
    "SOURCES",
    "check_profiles",
    "name_of",
    "quantile",
    "round_up_quarter",
]

#: The seed's "Beat Budget Guidelines", as ``(min, max)`` beats per operation type.
DEFAULT_PROFILES: Final[Mapping[str, tuple[float, float]]] = {
    "peer_discovery": (2.0, 5.0),
    "dht_store": (2.0, 4.0),
    "dht_retrieve": (1.0, 3.0),
    "pubsub_sync": (1.0, 2.0),
    "election": (3.0, 10.0),
    "task_coordination": (5.0, 20.0),
}
#: Runs (done or exceeded) of a type needed before ``"auto"`` learns from them.
DEFAULT_MIN_SAMPLES: Final = 20
#: ``"auto"`` gives ``p95 * margin`` once it has learned.
DEFAULT_MARGIN: Final = 1.25
#: Samples kept per (type, name), in memory and on disk: the newest win.
DEFAULT_KEEP: Final = 1000
#: Names kept per type; the runs of names past it share :data:`OTHER_NAME` (ids with no
#: numbered suffix, such as ``"fetch-" + url``, would otherwise grow the history without bound).
DEFAULT_NAMES: Final = 1000
#: The one name the runs of a type's names past its cap are kept under.
OTHER_NAME: Final = "(other)"
#: The smallest budget ``"auto"`` gives a type without a profile.
FLOOR_BEATS: Final = 0.25
#: The on-disk schema version (``PRAGMA user_version``); see ``docs/learning.md``.
SCHEMA_VERSION: Final = 1
#: How long a writer waits for another process's lock on the file (SQLite busy timeout).
BUSY_TIMEOUT_SECONDS: Final = 10.0
#: Finished runs (of the slower paths) that may wait between two drains; past this the oldest are dropped.
PENDING_LIMIT: Final = 1_000_000
#: Fast-path runs one budget's settings keep between two drains: the newest win (see :class:`RunLog`).
RUN_LOG_LIMIT: Final = 1024
OUTCOMES: Final = ("done", "failed", "exceeded")
EXCEEDED_KINDS: Final = ("interrupted", "late")
SOURCES: Final = ("fixed", "profile", "history")


def round_up_quarter(beats: float) -> float:
    """``beats`` rounded up to the next quarter beat (1.3 -> 1.5; 1.5 stays 1.5)."""
    return math.ceil(beats * 4.0 - 1e-9) / 4.0


def check_profiles(value: Any, field: str = "budget_profiles") -> dict[str, tuple[float, float]]:
    """Validate a mapping of ``operation type -> (min, max)`` beats.

    Args:
        value: the mapping to check.
        field: the name used in the error.

    Returns:
        A plain dict of floats.

    Raises:
        ConfigError: not a mapping of non-empty strings to pairs with ``0 < min <= max``.
    """
    if not isinstance(value, Mapping):
        raise ConfigError(field, value, "must be a mapping of operation type to (min, max) beats")
    out: dict[str, tuple[float, float]] = {}
    for key, pair in value.items():
        if not isinstance(key, str) or not key:
            raise ConfigError(field, value, f"operation type {key!r} must be a non-empty string")
        try:
            lo, hi = pair
        except (TypeError, ValueError):
            raise ConfigError(field, value, f"profile of {key!r} must be a (min, max) pair") from None
        for x in (lo, hi):
            if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x):
                raise ConfigError(field, value, f"profile of {key!r} must hold finite numbers")
        if not 0 < lo <= hi:
            raise ConfigError(field, value, f"profile of {key!r} needs 0 < min <= max, got ({lo}, {hi})")
        out[key] = (float(lo), float(hi))
    return out


_SEPARATORS: Final = "-_:./"


@functools.lru_cache(maxsize=1024)
def name_of(operation_id: str) -> str:
    """The history name of an operation id: the id without a trailing part that holds a digit.

    ``"election-17"`` -> ``"election"``, ``"upload:3f2a"`` -> ``"upload"``,
    ``"dht-store-k"`` stays. So the runs of one kind of operation share a name.

    Cached (the newest 1,024 ids): it runs for every recorded run of an explicit operation,
    and working it out costs ~1.5 us, remembering it ~60 ns.
    """
    cut = max(operation_id.rfind(c) for c in _SEPARATORS)
    if cut > 0 and any(ch.isdigit() for ch in operation_id[cut + 1 :]):
        return operation_id[:cut]
    return operation_id


def quantile(ordered: list[float], q: float) -> float:
    """Nearest-rank quantile of a sorted, non-empty list (the smallest value with ``q`` at or below)."""
    rank = max(1, math.ceil(q * len(ordered) - 1e-9))
    return ordered[rank - 1]
