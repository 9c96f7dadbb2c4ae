"""The NATS transport: beat frames from NATS, status claims to NATS, through a :class:`ClaimLink`.

Application threads call :meth:`NatsTransport.publish`, which appends the
claim to the link's thread-safe :class:`Outbox` and wakes the loop at most
once per batch; they never wait on the network.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any, TypeVar

from nats.aio.client import Client

from ..._time import SYSTEM_TIME, TimeSource
from ...claims import Claim
from ...config import BackbeatConfig
from ...errors import TransportStateError
from ..base import ClaimEncoder, Transport, TransportEvent, TransportSink
from .claim_link import ClaimLink
from .outbox import Outbox
from .spool import Spool, SpoolError

if TYPE_CHECKING:
    from ...claims import ClaimFactory
    from ...operations import P2POperation

__all__ = ["NatsTransport"]

T = TypeVar("T")


class NatsTransport(Transport):
    """Beat frames from NATS, status claims to NATS, on one background loop thread.

    Args:
        config: servers, subjects, reconnect, outbox, auth and TLS settings.
        encoder: turns a claim into wire bytes (canonical JSON, maybe signed).
        time_source: arrival times of frames are read from it.

    Example:
        >>> from backbeat_sync import BackbeatConfig
        >>> from backbeat_sync.protocol import StatusClaim
        >>> t = NatsTransport(BackbeatConfig(agent_id="a", nats_url="nats://127.0.0.1:1"),
        ...                   StatusClaim.encode)
        >>> t.connected
        False
    """

    def __init__(
        self,
        config: BackbeatConfig,
        encoder: ClaimEncoder,
        time_source: TimeSource = SYSTEM_TIME,
    ) -> None:
        self._config = config
        self._encoder = encoder
        self._time = time_source
        self._link: ClaimLink | None = None
        self._pre_outbox = Outbox(config.outbox_limit)
        self._stopped = False

    def __repr__(self) -> str:
        state = "connected" if self.connected else "disconnected"
        return f"<NatsTransport servers={self._config.masked_url} {state}>"

    def start(self, sink: TransportSink) -> None:
        """Connect (or, with ``connect_in_background``, start trying) and subscribe to the beat subject.

        Raises:
            BackbeatConnectionError: no connection within ``config.connect_timeout``
                ("authorization violation" at once for refused credentials).
            ConfigError: a TLS or credentials setting cannot be used.
            TransportStateError: ``start()`` was already called (a RuntimeError).
        """
        if self._link is not None:
            raise TransportStateError("NatsTransport.start() may be called once")
        spool = self._spool()
        link = ClaimLink(self._config, self._encoder, self._time, sink, spool)
        # Claims published before start() (none in practice) are not lost.
        link.outbox.put_back(self._pre_outbox.take(len(self._pre_outbox) + 1))
        if spool is not None:
            # Final claims an earlier run of this agent could not deliver go first.
            try:
                claims, files, problems = spool.load()
            except SpoolError as exc:
                claims, files, problems = [], [], [str(exc)]
            for problem in problems:
                sink.transport_event(TransportEvent.ERROR, problem)
            link.adopt_spooled(claims, files)
        self._link = link
        try:
            link.start()
        except BaseException:
            self._link = None
            raise

    def _spool(self) -> Spool | None:
        path = self._config.spool_path
        if path is None:
            return None
        return Spool(path, self._config.cluster_id, self._config.agent_id)

    def publish(self, subject: str, claim: Claim) -> None:
        """Queue ``claim`` for ``subject``; thread-safe, returns at once (never waits on the network)."""
        link = self._link
        if link is None:
            self._pre_outbox.put(subject, claim)
            return
        if link.stopped:
            link.count_lost(1)  # nobody will send it: count it rather than queue it forever
            return
        if link.outbox.put(subject, claim):
            link.wake()

    def publish_many(self, subject: str, claims: list[Claim]) -> None:
        """Queue ``claims`` for ``subject`` in order, under one outbox lock; returns at once."""
        link = self._link
        if link is None:
            self._pre_outbox.put_many(subject, claims)
            return
        if link.stopped:
            link.count_lost(len(claims))
            return
        if link.outbox.put_many(subject, claims):
            link.wake()

    def publish_sweep(self, subject: str, factory: ClaimFactory, ops: list[P2POperation], beat: int) -> None:
        """Queue one chunk of a beat's sweep, encoded here (``factory.sweep``: runs of claims'
        bytes, which the outbox queues as one item each); returns at once."""
        link = self._link
        if link is None:
            self._pre_outbox.put_sweep(subject, factory.sweep(ops, beat))
            return
        if link.stopped:
            link.count_lost(len(ops))
            return
        if link.outbox.put_sweep(subject, factory.sweep(ops, beat)):
            link.wake()

    def run_on_loop(self, fn: Callable[[Client], Coroutine[Any, Any, T]]) -> Future[T | None] | None:
        """Run ``await fn(nc)`` on the loop thread with the live connection (any thread).

        Library work that needs nats-py (the shared budget history) goes through here, so
        only the loop thread touches the client. The future's result is None if the
        connection was down when the coroutine ran.

        Returns:
            A concurrent future, or None before ``start()`` or after ``stop()``.
        """
        link = self._link
        if link is None or link.stopped:
            return None

        async def run() -> T | None:
            nc = link._nc
            if nc is None or not nc.is_connected:
                return None
            return await fn(nc)

        try:
            fut: Future[T | None] = link.submit(run())
        except TransportStateError:
            return None
        return fut

    def stop(self, flush_timeout: float) -> None:
        """Publish what is queued and confirm final claims (at most ``flush_timeout`` s), close, join.

        Idempotent; returns within about ``flush_timeout`` + 2 s even when the server is gone.
        """
        link = self._link
        if link is not None:
            link.stop(flush_timeout)

    @property
    def connected(self) -> bool:
        """Whether the NATS connection is up now."""
        return self._link is not None and self._link.connected

    @property
    def reconnect_count(self) -> int:
        """How many times the connection was re-established after a loss."""
        return self._link.reconnect_count if self._link is not None else 0

    def stats(self) -> dict[str, int]:
        """Counters for health.

        Keys: ``claims_published`` (sent; final ones once confirmed), ``claims_dropped``
        (intermediate claims dropped past the outbox bound, plus claims given up at
        stop), ``claims_coalesced``, ``claims_queued`` (waiting or unconfirmed),
        ``claims_unconfirmed`` (with a claims stream: also those waiting for its PubAck),
        ``claims_resent`` (final claims sent again after a reconnect, or after the claims
        stream did not answer), ``frames_received``, ``frames_dropped`` (slow consumer),
        ``claims_spooled`` (final claims written to the spool at stop, not counted
        as dropped), ``claims_unspooled`` (final claims read from the spool at start),
        and ``claims_coalesced_{priority}`` for each priority (critical, high, normal, low).
        """
        link = self._link
        box = self._pre_outbox if link is None else link.outbox
        by_priority = {f"claims_coalesced_{p}": n for p, n in box.coalesced_by_priority.items()}
        if link is None:
            return by_priority | {
                "claims_published": 0,
                "claims_dropped": self._pre_outbox.dropped,
                "claims_coalesced": self._pre_outbox.coalesced,
                "claims_queued": len(self._pre_outbox),
                "claims_unconfirmed": 0,
                "claims_resent": 0,
                "frames_received": 0,
                "frames_dropped": 0,
                "claims_spooled": 0,
                "claims_unspooled": 0,
            }
        inflight = len(link.inflight)
        resent = link.resent
        if link.stream is not None:  # final claims waiting for the claims stream's PubAck
            inflight += len(link.stream.pending)
            resent += link.stream.resent
        return by_priority | {
            "claims_published": link.published,
            "claims_dropped": box.dropped + link.lost,
            "claims_coalesced": box.coalesced,
            "claims_queued": len(box) + inflight,
            "claims_unconfirmed": inflight,
            "claims_resent": resent,
            "frames_received": link.frames,
            "frames_dropped": link.slow_consumer_drops,
            "claims_spooled": link.spooled,
            "claims_unspooled": link.unspooled,
        }
