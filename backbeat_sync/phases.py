"""The lifecycle of an operation (:class:`OperationPhase`) and the seed's operation types.

Both are re-exported by :mod:`backbeat_sync.operations` (and the package), where
the operations and their registry live.
"""

from __future__ import annotations

import enum

__all__ = ["OperationPhase", "OperationType"]


class OperationPhase(enum.Enum):
    """The lifecycle of an operation. Phases only move forward; FAILED may follow any active phase.

    ``STARTED -> CONNECTING -> NEGOTIATING -> EXECUTING -> COMPLETED``, or ``FAILED``
    from any of the first four. A phase may be skipped.
    """

    STARTED = "started"
    CONNECTING = "connecting"
    NEGOTIATING = "negotiating"
    EXECUTING = "executing"
    COMPLETED = "completed"
    FAILED = "failed"

    # Set on each member below: read on every phase change, and an Enum member's hash
    # (a dict lookup) costs a Python-level call.
    _rank: int
    _final: bool

    @property
    def rank(self) -> int:
        """Position in the lifecycle (STARTED is 0, COMPLETED 4, FAILED 5)."""
        return self._rank

    @property
    def is_final(self) -> bool:
        """True for COMPLETED and FAILED."""
        return self._final

    @classmethod
    def coerce(cls, value: OperationPhase | str) -> OperationPhase:
        """Accept a phase or its name (``"negotiating"``, ``"NEGOTIATING"``).

        Raises:
            ValueError: not a phase (the message lists the valid ones).
        """
        if isinstance(value, OperationPhase):
            return value
        if isinstance(value, str):
            try:
                return cls(value.lower())
            except ValueError:
                pass
        valid = ", ".join(p.value for p in cls)
        raise ValueError(f"phase={value!r} is not an operation phase ({valid})")


for _i, _p in enumerate(OperationPhase):
    _p._rank = _i
    _p._final = _p.value in ("completed", "failed")
del _i, _p


class OperationType(str, enum.Enum):
    """The seed's four operation types. Any other non-empty string is a valid user type."""

    ELECTION = "election"
    DHT_STORE = "dht_store"
    PUBSUB_SYNC = "pubsub_sync"
    PEER_DISCOVERY = "peer_discovery"

    def __str__(self) -> str:
        return self.value
