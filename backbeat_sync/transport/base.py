"""The one seam between the integration and the network.

A transport delivers beat-frame payloads to a :class:`TransportSink` and takes
status claims to publish. ``publish`` is called from application threads: it
must be thread-safe, never block on the network, and return at once.
"""

from __future__ import annotations

import abc
import enum
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

from ..claims import Claim

if TYPE_CHECKING:
    from ..claims import ClaimFactory
    from ..operations import P2POperation

__all__ = ["ClaimEncoder", "Transport", "TransportEvent", "TransportSink", "subject_matches"]

#: Turns a claim (built first, if it is a LazyClaim) into the bytes that go on the wire.
ClaimEncoder = Callable[[Claim], bytes]


class TransportEvent(enum.Enum):
    """Connection events a transport reports to its sink."""

    CONNECTED = "connected"
    DISCONNECTED = "disconnected"
    RECONNECTED = "reconnected"
    ERROR = "error"
    CLOSED = "closed"
    #: Works, but not as configured (logged as a warning, not an error of the connection).
    WARNING = "warning"


class TransportSink(Protocol):
    """What a transport reports to (the integration)."""

    def frame_received(self, data: bytes, arrival: float) -> None:
        """A payload arrived on the beat subject at monotonic time ``arrival``.

        Called on the transport's own thread; must not block or raise.
        """
        ...

    def transport_event(self, event: TransportEvent, detail: str) -> None:
        """The connection changed state (``detail`` is safe to log: no secrets)."""
        ...

    def audience_changed(self) -> None:
        """Who receives claims may have changed: :meth:`Transport.delivers` may answer otherwise now."""
        ...


class Transport(abc.ABC):
    """A way to receive beat frames and publish claims."""

    @abc.abstractmethod
    def start(self, sink: TransportSink) -> None:
        """Connect and start delivering frames to ``sink``.

        Raises:
            BackbeatConnectionError: the first connection could not be made.
        """

    @abc.abstractmethod
    def publish(self, subject: str, claim: Claim) -> None:
        """Queue ``claim`` for ``subject``; thread-safe, returns at once."""

    def publish_many(self, subject: str, claims: list[Claim]) -> None:
        """Queue ``claims`` for ``subject``, in order (one beat's claims); thread-safe, returns at once."""
        for claim in claims:
            self.publish(subject, claim)

    def publish_sweep(self, subject: str, factory: ClaimFactory, ops: list[P2POperation], beat: int) -> None:
        """Queue the claims of one chunk of a beat's sweep: ``ops`` at ``beat``, in order.

        Called under the registry lock, so the operations cannot change meanwhile: take
        what is needed of them now, keep no reference to them. The claims are unsigned
        (the integration calls this only when claims are not signed). By default one
        snapshot each (``factory.lazy(op, beat, True)``) goes to :meth:`publish_many`.
        """
        self.publish_many(subject, [factory.lazy(op, beat, True) for op in ops])

    def delivers(self, subject: str) -> bool:
        """Whether a claim published on ``subject`` now can reach anyone (True unless the transport knows).

        The integration builds no claim that nobody would receive: while this is
        False (and no ``on_claim`` callback is registered) it only counts claims.
        A transport whose answer can change tells its sink ``audience_changed()``.
        """
        return True

    @abc.abstractmethod
    def stop(self, flush_timeout: float) -> None:
        """Publish what is queued (for at most ``flush_timeout`` s), close, join threads. Idempotent."""

    @property
    @abc.abstractmethod
    def connected(self) -> bool:
        """Whether the transport can publish now."""

    @property
    def reconnect_count(self) -> int:
        """How many times the connection was re-established."""
        return 0

    def stats(self) -> dict[str, int]:
        """Counters for health.

        Keys: ``claims_published``, ``claims_dropped``, ``claims_coalesced``, ``claims_queued``.
        """
        return {}


def subject_matches(pattern: str, subject: str) -> bool:
    """NATS subject matching: ``*`` matches one token, a final ``>`` one or more.

    >>> subject_matches("backbeat.status.>", "backbeat.status.c.a")
    True
    >>> subject_matches("backbeat.*.c", "backbeat.beat.c")
    True
    """
    p_tokens = pattern.split(".")
    s_tokens = subject.split(".")
    for i, p in enumerate(p_tokens):
        if p == ">":
            return len(s_tokens) > i
        if i >= len(s_tokens) or (p != "*" and p != s_tokens[i]):
            return False
    return len(p_tokens) == len(s_tokens)
