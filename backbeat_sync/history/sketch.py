"""A mergeable sketch of beats used: fixed log-spaced bucket counts, never raw samples.

The cluster's shared history (``BackbeatConfig(history_bucket=...)``, ``docs/ha.md``)
keeps one :class:`Sketch` per agent and operation type. Two sketches merge by adding
their counts bucket by bucket, so the cluster's figure is the sum over its agents.

The bucket scheme: a run that used ``x >= MIN_BEATS`` beats counts in bucket
``i = ceil(log(x) / log(GAMMA))``, which holds ``(GAMMA**(i-1), GAMMA**i]``, with
``GAMMA = (1 + ALPHA) / (1 - ALPHA)``. A quantile is answered with the bucket's
representative ``2 * GAMMA**i / (GAMMA + 1)`` (capped at the exact maximum), whose
relative error against any value of its bucket is at most ``ALPHA`` (2 %). Runs below
``MIN_BEATS`` share one zero bucket, answered as 0.0 (an absolute error below
``MIN_BEATS``). The quantile rank is the local history's: nearest rank over the runs
that ended done or exceeded, so the sketch's ``p95`` is the local ``p95`` within 2 %.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Final

from .records import OperationStats, Sample

__all__ = ["ALPHA", "GAMMA", "MIN_BEATS", "Sketch"]

#: The relative error bound of a quantile read from a sketch.
ALPHA: Final = 0.02
#: The ratio of one bucket's upper bound to the previous one's.
GAMMA: Final = (1.0 + ALPHA) / (1.0 - ALPHA)
#: Runs that used fewer beats than this count in the zero bucket.
MIN_BEATS: Final = 1e-3
_LOG_GAMMA: Final = math.log(GAMMA)
#: The key of the zero bucket in the JSON form.
_ZERO: Final = "z"


def bucket_of(beats: float) -> int | None:
    """The bucket index of ``beats`` (None: the zero bucket)."""
    if not beats >= MIN_BEATS:
        return None
    return math.ceil(math.log(beats) / _LOG_GAMMA - 1e-12)


def representative(index: int | None) -> float:
    """The value a quantile in bucket ``index`` is answered with (0.0 for the zero bucket)."""
    if index is None:
        return 0.0
    return 2.0 * GAMMA**index / (GAMMA + 1.0)


class Sketch:
    """Counts of one operation type's runs: outcomes, and beats used in log-spaced buckets.

    Not thread-safe (its owner locks). ``buckets`` maps an index (None: the zero bucket)
    to the runs that ended done or exceeded with beats used in that bucket.
    """

    __slots__ = ("buckets", "done", "exceeded", "failed", "late", "max")

    def __init__(self) -> None:
        self.done = self.failed = self.exceeded = self.late = 0
        self.max = 0.0
        self.buckets: dict[int | None, int] = {}

    @property
    def count(self) -> int:
        """Every run counted (done + failed + exceeded)."""
        return self.done + self.failed + self.exceeded

    @property
    def timed(self) -> int:
        """Runs with a duration in the buckets (done + exceeded)."""
        return self.done + self.exceeded

    def add(self, sample: Sample) -> None:
        """Count one finished run."""
        if sample.outcome == "failed":
            self.failed += 1
            return
        if sample.outcome == "done":
            self.done += 1
        else:
            self.exceeded += 1
            if sample.exceeded_kind == "late":
                self.late += 1
        used = sample.beats_used
        key = bucket_of(used)
        self.buckets[key] = self.buckets.get(key, 0) + 1
        if used > self.max:
            self.max = used

    def merge(self, other: Sketch) -> Sketch:
        """Add ``other``'s counts to this sketch (in place). Returns this sketch."""
        self.done += other.done
        self.failed += other.failed
        self.exceeded += other.exceeded
        self.late += other.late
        self.max = max(self.max, other.max)
        for key, n in other.buckets.items():
            self.buckets[key] = self.buckets.get(key, 0) + n
        return self

    def copy(self) -> Sketch:
        """An independent copy."""
        return Sketch().merge(self)

    def without(self, part: Sketch) -> Sketch:
        """A new sketch of this one's runs that are not in ``part`` (counted in it earlier).

        Counts subtract exactly (never below zero). ``max`` stays this sketch's: a maximum
        cannot be taken away, and where ``part`` is still counted (the cluster's retired
        entry) the cluster's maximum, the largest of its entries', does not change by it.
        """
        out = Sketch()
        out.done = max(0, self.done - part.done)
        out.failed = max(0, self.failed - part.failed)
        out.exceeded = max(0, self.exceeded - part.exceeded)
        out.late = max(0, self.late - part.late)
        out.max = self.max
        for key, n in self.buckets.items():
            left = n - part.buckets.get(key, 0)
            if left > 0:
                out.buckets[key] = left
        return out

    def quantile(self, q: float) -> float:
        """The nearest-rank ``q`` quantile of beats used (0.0 without timed runs), within ``ALPHA``."""
        total = sum(self.buckets.values())
        if total <= 0:
            return 0.0
        rank = max(1, math.ceil(q * total - 1e-9))
        seen = 0
        zero = self.buckets.get(None, 0)
        if zero:
            seen = zero
            if seen >= rank:
                return 0.0
        for key in sorted(k for k in self.buckets if k is not None):
            seen += self.buckets[key]
            if seen >= rank:
                return min(representative(key), self.max)
        return self.max

    def stats(self, operation_type: str) -> OperationStats:
        """The sketch as :class:`OperationStats` (p50/p95 within ``ALPHA``; ``max`` exact)."""
        timed = self.timed
        return OperationStats(
            operation_type=operation_type,
            name=None,
            count=self.count,
            done=self.done,
            failed=self.failed,
            exceeded=self.exceeded,
            interrupted=self.exceeded - self.late,
            late=self.late,
            p50=self.quantile(0.5),
            p95=self.quantile(0.95),
            max=self.max if timed else 0.0,
            on_time_rate=self.done / timed if timed else 0.0,
        )

    def to_json(self) -> dict[str, Any]:
        """The JSON form: ``{"d", "f", "e", "l": counts, "m": max, "b": {index or "z": count}}``."""
        return {
            "d": self.done,
            "f": self.failed,
            "e": self.exceeded,
            "l": self.late,
            "m": self.max,
            "b": {(_ZERO if k is None else str(k)): n for k, n in self.buckets.items()},
        }

    @classmethod
    def from_json(cls, data: Any) -> Sketch:
        """Read the JSON form back.

        Raises:
            ValueError: not a sketch (a missing or negative count, a bad bucket key).
        """
        if not isinstance(data, Mapping):
            raise ValueError(f"a sketch must be an object, got {type(data).__name__}")
        s = cls()
        try:
            s.done, s.failed, s.exceeded, s.late = (_count(data[k]) for k in ("d", "f", "e", "l"))
            m = data["m"]
            buckets = data["b"]
        except KeyError as exc:
            raise ValueError(f"a sketch needs {exc.args[0]!r}") from None
        if isinstance(m, bool) or not isinstance(m, (int, float)) or not math.isfinite(m) or m < 0:
            raise ValueError(f"a sketch's max must be a number >= 0, got {m!r}")
        s.max = float(m)
        if not isinstance(buckets, Mapping):
            raise ValueError("a sketch's buckets must be an object")
        for key, n in buckets.items():
            if key == _ZERO:
                index: int | None = None
            else:
                try:
                    index = int(key)
                except (TypeError, ValueError):
                    raise ValueError(f"bad bucket key {key!r}") from None
            s.buckets[index] = _count(n)
        if sum(s.buckets.values()) != s.timed or s.late > s.exceeded:
            raise ValueError("a sketch's bucket counts do not add up to its done + exceeded runs")
        return s

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Sketch):
            return NotImplemented
        return self.to_json() == other.to_json()

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        counts = f"done={self.done} failed={self.failed} exceeded={self.exceeded}"
        return f"<Sketch {counts} buckets={len(self.buckets)}>"


def _count(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"a count must be an integer >= 0, got {value!r}")
    return value
