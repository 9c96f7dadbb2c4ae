"""A read-only subscription for the commands that only listen (``monitor``, ``status``, ``pulse``'s check).

Over NATS it is the transport's link (reconnects, auth, TLS, secrets scrubbed)
with one subscription and nothing published. On ``local://`` it subscribes to
the in-process bus, and can join the bus's in-process pulse as an agent would
(the only beat there is in a process of its own).
"""

from __future__ import annotations

from collections.abc import Callable
from urllib.parse import parse_qs, urlsplit

from loguru import logger

from .. import BackbeatConfig
from .._time import SYSTEM_TIME
from ..transport.base import TransportEvent
from ..transport.local import LocalBus
from ..transport.nats import SubscriberLink
from ._base import PROG

__all__ = ["Listener"]

OnMessage = Callable[[bytes], None]


def _report(name: str) -> Callable[[TransportEvent, str], None]:
    """Connection events as warnings (an outage, and its end), named by the command."""

    def report(event: TransportEvent, detail: str) -> None:
        if event in (TransportEvent.DISCONNECTED, TransportEvent.ERROR, TransportEvent.RECONNECTED):
            logger.warning(f"{name}: {detail}")

    return report


class Listener:
    """Call ``on_message(data)`` for every message on ``subject``; publish nothing.

    Args:
        config: servers, credentials, TLS (``nats_url`` may be ``local://NAME``).
        subject: what to subscribe to (NATS wildcards allowed).
        on_message: called with each message's bytes (on the link's loop thread, or
            the local pulse's thread): must be quick and must not raise.
        name: for the connection name and the log lines (``monitor``, ``status``).
        local_pulse: on ``local://``, join (or start) the bus's in-process pulse for
            the config's cluster while listening, as an agent on that bus would.
    """

    def __init__(
        self,
        config: BackbeatConfig,
        subject: str,
        on_message: OnMessage,
        *,
        name: str,
        local_pulse: bool = False,
    ) -> None:
        self.config = config
        self.subject = subject
        self._on_message = on_message
        self._link: SubscriberLink | None = None
        self._bus: LocalBus | None = None
        self._unsubscribe: Callable[[], None] | None = None
        self._pulse = False
        if config.is_local:
            url = urlsplit(config.nats_url.strip())
            self._bus = LocalBus.named(url.netloc + url.path.strip("/"))
            manual = parse_qs(url.query).get("pulse", [""])[0] == "manual"
            self._pulse = local_pulse and not manual
        else:
            self._link = SubscriberLink(
                config,
                _report(name),
                subject,
                on_message,
                client_name=f"{PROG}-{name}",
                thread_name=f"backbeat-{name}",
            )

    @property
    def connected(self) -> bool:
        """Whether the subscription is live now (always, on ``local://``, between start and stop)."""
        if self._link is not None:
            return self._link.connected
        return self._unsubscribe is not None

    def start(self) -> None:
        """Connect and subscribe.

        Raises:
            BackbeatConnectionError: no connection within ``config.connect_timeout``.
            ConfigError: a TLS or credentials setting cannot be used.
        """
        if self._link is not None:
            self._link.start()
            return
        assert self._bus is not None
        self._unsubscribe = self._bus.subscribe(self.subject, lambda _subject, data: self._on_message(data))
        if self._pulse:
            self._bus.acquire_pulse(self.config, SYSTEM_TIME)

    def request(self, subject: str, timeout: float) -> bytes | None:
        """Ask once on ``subject`` (an empty request) and return the first answer, or None.

        On NATS this is a request on the listener's connection; on ``local://`` the
        bus's responders answer at once. None when nobody answers within ``timeout``
        (or there are no responders, or the connection is down); nothing raises.
        """
        if self._link is not None:
            return self._link.request(subject, timeout)
        if self._bus is None:
            return None
        return self._bus.request(subject)

    def stop(self) -> None:
        """Unsubscribe and close. Idempotent."""
        if self._link is not None:
            self._link.stop(1.0)
            return
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None
            if self._pulse and self._bus is not None:
                self._bus.release_pulse(self.config)
