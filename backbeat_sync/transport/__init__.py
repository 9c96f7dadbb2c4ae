"""Transports: one interface (:class:`Transport`), an in-process one and a NATS one."""

from __future__ import annotations

from .._time import TimeSource
from ..config import BackbeatConfig
from .base import ClaimEncoder, Transport, TransportEvent, TransportSink, subject_matches
from .local import LocalBus, LocalTransport

__all__ = [
    "ClaimEncoder",
    "LocalBus",
    "LocalTransport",
    "Transport",
    "TransportEvent",
    "TransportSink",
    "make_transport",
    "subject_matches",
]


def make_transport(config: BackbeatConfig, encoder: ClaimEncoder, time_source: TimeSource) -> Transport:
    """The transport ``config.nats_url`` asks for: in-process for ``local://``, else NATS."""
    if config.is_local:
        return LocalTransport(config, encoder, time_source)
    from .nats import NatsTransport  # imported lazily: the local path never loads nats-py

    return NatsTransport(config, encoder, time_source)
