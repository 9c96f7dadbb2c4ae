"""The NATS transport: one event-loop thread per link owns the nats-py client.

Threads: application threads call :meth:`NatsTransport.publish`, which appends
the claim to a thread-safe :class:`Outbox` and wakes the loop at most once per
batch. The loop thread (``backbeat-nats``) runs an asyncio loop; it alone
touches nats-py: it connects, receives beat frames (handed to the sink at
once, cheaply), publishes claims in batches and watches the connection.

Delivery of final claims: core NATS is fire-and-forget, so bytes written just
before a server dies are lost. A final claim (``done``/``failed``) therefore
stays *in flight* after it is published until a flush round-trip (PING/PONG)
on the same connection confirms that the server has read it. When the
connection drops, every unconfirmed final claim goes back to the front of the
outbox and is sent again after the reconnect. A repeated final claim is
harmless (consumers key claims by task); a missing one is not.

While connected, every claim is queued and the loop drains the outbox in
batches. While disconnected, claims wait in the outbox. Past ``config.outbox_limit``
an intermediate claim replaces the queued intermediate claim of the same task
(latest wins, counted as coalesced); one with nothing to replace is dropped
(counted); a final claim is always kept.

Modules, each depending only on those above it:

| module | holds |
| --- | --- |
| :mod:`.client` | nats-py's ``Client``, refusing a ``tls://`` server that offers no TLS |
| :mod:`.options` | ``connect_options``, ``describe_error``, ``flush``, ``cancel_and_wait`` |
| :mod:`.link` | :class:`NatsLink`: the loop thread, connect, reconnect, close; :class:`SubscriberLink` |
| :mod:`.outbox` | :class:`Outbox`: the thread-safe bounded claim queue |
| :mod:`.spool` | final claims unconfirmed at stop, on disk for the next run (``spool_path``) |
| :mod:`.claim_link` | the transport's link: beat subscription, claim batches, confirmation |
| :mod:`.transport` | :class:`NatsTransport`: the :class:`~backbeat_sync.transport.Transport` face |
| :mod:`.pulse_link` | :class:`PulseLink`: the NATS side of a pulse |
"""

from __future__ import annotations

from .link import NatsLink, SubscriberLink
from .options import cancel_and_wait, connect_options, describe_error, flush
from .outbox import Outbox
from .pulse_link import PulseLink
from .transport import NatsTransport

__all__ = [
    "NatsLink",
    "NatsTransport",
    "Outbox",
    "PulseLink",
    "SubscriberLink",
    "cancel_and_wait",
    "connect_options",
    "describe_error",
    "flush",
]
