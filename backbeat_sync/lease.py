"""The values an HA pulse keeps in its JetStream key-value bucket, and the beat grid.

Per cluster, ``lease.{cluster}`` holds a :class:`LeaseState` (who leads, the highest
index won, the :class:`Grid`, the TTL) and ``tempo.{cluster}`` a :class:`TempoSetting`.
Both are canonical JSON; :mod:`backbeat_sync.ha` reads and writes them.
"""

from __future__ import annotations

import base64
import json
import math
import re
from typing import Any, Final

import attrs

from .errors import ConfigError, ProtocolError
from .protocol import MAX_TEMPO_BPM

__all__ = [
    "DEFAULT_BUCKET",
    "LEASE_BEATS",
    "MIN_LEASE_TTL",
    "Grid",
    "LeaseState",
    "TempoSetting",
    "check_bucket_name",
    "lease_key",
    "lease_ttl_for",
    "tempo_key",
    "valid_bar",
    "valid_tempo",
]

#: The key-value bucket an HA pulse uses unless told otherwise.
DEFAULT_BUCKET: Final = "backbeat-pulse"
#: The lease TTL in beats (at the tempo the leader runs at)...
LEASE_BEATS: Final = 3
#: ...but never shorter than this many seconds (a JetStream round trip must fit in it).
MIN_LEASE_TTL: Final = 1.0

_KEY_TOKEN = re.compile(r"\A[-_=A-Za-z0-9]+\Z")
_BUCKET_NAME = re.compile(r"\A[-_A-Za-z0-9]+\Z")


def _key_token(cluster_id: str) -> str:
    # Cluster ids are subject tokens; a KV key allows fewer characters. Ids that do not fit
    # are encoded ("b64." cannot collide: a cluster id has no ".").
    if _KEY_TOKEN.match(cluster_id):
        return cluster_id
    return "b64." + base64.urlsafe_b64encode(cluster_id.encode()).decode().rstrip("=")


def lease_key(cluster_id: str) -> str:
    """The bucket key holding the lease and beat grid of ``cluster_id``.

    >>> lease_key("chorus-dev")
    'lease.chorus-dev'
    """
    return f"lease.{_key_token(cluster_id)}"


def tempo_key(cluster_id: str) -> str:
    """The bucket key holding the tempo ``cluster_id`` should run at.

    >>> tempo_key("chorus-dev")
    'tempo.chorus-dev'
    """
    return f"tempo.{_key_token(cluster_id)}"


def lease_ttl_for(tempo_bpm: float, override: float | None = None) -> float:
    """The lease TTL in seconds at ``tempo_bpm``: ``LEASE_BEATS`` beats, at least ``MIN_LEASE_TTL``.

    Args:
        tempo_bpm: the tempo the leader runs at.
        override: a fixed TTL in seconds (``Pulse(lease_ttl=...)``), used as given.

    >>> lease_ttl_for(600), lease_ttl_for(2)
    (1.0, 90.0)
    """
    if override is not None:
        return override
    return max(MIN_LEASE_TTL, LEASE_BEATS * 60.0 / tempo_bpm)


def valid_tempo(value: Any) -> bool:
    """Whether ``value`` is a tempo the protocol allows (a number, 0 < x <= 6000)."""
    return (
        isinstance(value, (int, float))
        and not isinstance(value, bool)
        and math.isfinite(value)
        and 0 < value <= MAX_TEMPO_BPM
    )


def valid_bar(value: Any) -> bool:
    """Whether ``value`` is a bar length (an integer >= 1)."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


@attrs.frozen
class Grid:
    """A beat grid: beat ``k`` is due at wall time ``time + (k - index) * 60 / tempo_bpm``."""

    index: int
    time: float
    tempo_bpm: float
    bar_length: int

    @property
    def spb(self) -> float:
        """Seconds per beat."""
        return 60.0 / self.tempo_bpm

    def due(self, k: int) -> float:
        """Wall time beat ``k`` is due."""
        return self.time + (k - self.index) * self.spb

    def first_at(self, wall: float) -> int:
        """The smallest index due at or after wall time ``wall``."""
        return self.index + math.ceil((wall - self.time) / self.spb - 1e-9)

    def retempo(self, k: int, tempo_bpm: float) -> Grid:
        """The grid on which beat ``k`` comes one new beat after beat ``k - 1`` of this one."""
        return Grid(k - 1, self.due(k - 1), tempo_bpm, self.bar_length)


@attrs.frozen
class LeaseState:
    """The value of ``lease.{cluster}``: the lease and the cluster's beat grid.

    Attributes:
        holder: the replica holding the lease (``""``: released, anyone may take it).
        index: the highest beat index any leader has won (may have published); -1: none.
        grid: the beat grid frames are on.
        ttl: seconds the lease is good for after the write that set this value.
    """

    holder: str
    index: int
    grid: Grid
    ttl: float

    def encode(self) -> bytes:
        """Canonical JSON."""
        g = self.grid
        doc = {
            "v": 1,
            "holder": self.holder,
            "index": self.index,
            "anchor_index": g.index,
            "anchor_time": g.time,
            "tempo_bpm": g.tempo_bpm,
            "bar_length": g.bar_length,
            "ttl": self.ttl,
        }
        return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()

    @classmethod
    def decode(cls, data: bytes) -> LeaseState:
        """Parse a lease value.

        Raises:
            ProtocolError: not a lease value this library wrote.
        """
        try:
            doc = json.loads(data)
        except (ValueError, UnicodeDecodeError) as exc:
            raise ProtocolError("pulse lease", f"not JSON: {exc}") from None
        if not isinstance(doc, dict):
            raise ProtocolError("pulse lease", "not a JSON object")
        fields: dict[str, Any] = doc
        holder: Any = fields.get("holder")
        index: Any = fields.get("index")
        ttl: Any = fields.get("ttl")
        a_index: Any = fields.get("anchor_index")
        a_time: Any = fields.get("anchor_time")
        tempo: Any = fields.get("tempo_bpm")
        bar: Any = fields.get("bar_length")
        if not isinstance(holder, str):
            raise ProtocolError("pulse lease", "holder must be a string")
        for name, value in (("index", index), ("anchor_index", a_index)):
            if not isinstance(value, int) or isinstance(value, bool) or value < -1:
                raise ProtocolError("pulse lease", f"{name} must be an integer >= -1")
        for name, value in (("anchor_time", a_time), ("ttl", ttl)):
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
                raise ProtocolError("pulse lease", f"{name} must be a finite number")
        if not valid_tempo(tempo):
            raise ProtocolError("pulse lease", f"tempo_bpm must be 0 < x <= {MAX_TEMPO_BPM:g}")
        if not valid_bar(bar):
            raise ProtocolError("pulse lease", "bar_length must be an integer >= 1")
        if ttl <= 0:
            raise ProtocolError("pulse lease", "ttl must be > 0")
        grid = Grid(int(a_index), float(a_time), float(tempo), int(bar))
        return cls(holder, int(index), grid, float(ttl))


@attrs.frozen
class TempoSetting:
    """The value of ``tempo.{cluster}``: what the cluster should run at.

    Attributes:
        tempo_bpm: beats per minute (applied by the leader at the next downbeat).
        bar_length: beats per bar, or None to keep the current one (applied at the first
            beat that is a downbeat in the new bar length).
    """

    tempo_bpm: float
    bar_length: int | None = None

    def encode(self) -> bytes:
        """Canonical JSON."""
        doc: dict[str, Any] = {"v": 1, "tempo_bpm": self.tempo_bpm}
        if self.bar_length is not None:
            doc["bar_length"] = self.bar_length
        return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()

    @classmethod
    def decode(cls, data: bytes) -> TempoSetting:
        """Parse a tempo value.

        Raises:
            ProtocolError: not a tempo value this library wrote.
        """
        try:
            doc = json.loads(data)
        except (ValueError, UnicodeDecodeError) as exc:
            raise ProtocolError("tempo setting", f"not JSON: {exc}") from None
        if not isinstance(doc, dict) or not valid_tempo(doc.get("tempo_bpm")):
            raise ProtocolError("tempo setting", f"tempo_bpm must be 0 < x <= {MAX_TEMPO_BPM:g}")
        bar = doc.get("bar_length")
        if bar is not None and not valid_bar(bar):
            raise ProtocolError("tempo setting", "bar_length must be an integer >= 1")
        return cls(float(doc["tempo_bpm"]), bar)


def check_bucket_name(bucket: str) -> str:
    """Return ``bucket`` if it is a valid JetStream bucket name.

    Raises:
        ConfigError: it is not (letters, digits, ``-`` and ``_`` only).
    """
    if not isinstance(bucket, str) or not _BUCKET_NAME.match(bucket):
        raise ConfigError("bucket", bucket, "must be letters, digits, '-' or '_' (a JetStream bucket name)")
    return bucket
