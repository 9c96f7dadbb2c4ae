"""The nats-py client the links use: nats-py's own, with ``tls://`` made to mean TLS.

nats-py upgrades a connection to TLS only when the server's INFO says
``tls_required``: given ``tls://host`` and a plain server it connects in clear
and sends the credentials (a token, a password) in clear. :class:`GuardedClient`
checks the INFO of every connection to a ``tls://`` server, on the first
connect and on every reconnect, before nats-py writes CONNECT:

- a server that offers no TLS (neither ``tls_required`` nor ``tls_available``)
  is refused with :class:`TlsNotOffered`; nothing but the TCP handshake was
  sent to it;
- a server that offers TLS without requiring it is upgraded anyway.

The hook is nats-py's ``_process_info``, which it calls with the INFO dict
after reading it and before it decides on the TLS upgrade and writes CONNECT
(nats-py 2.x). It is the only place the library reaches into nats-py.
"""

from __future__ import annotations

from typing import Any

import nats.errors as nats_errors
from nats.aio.client import Client

__all__ = ["GuardedClient", "TlsNotOffered"]


class TlsNotOffered(nats_errors.Error):
    """A ``tls://`` server's INFO offers no TLS: the client refuses to go on in clear.

    A subclass of nats-py's ``Error``, so nats-py handles it as a failed
    connection attempt (closes the socket, tries the next server) and hands it
    to the error callback.

    Args:
        server: ``host:port`` of the server.
    """

    def __init__(self, server: str) -> None:
        self.server = server
        super().__init__(
            f"server {server} does not offer TLS, and a tls:// URL requires it:"
            " refused to connect in clear (no credentials were sent)"
        )

    def __str__(self) -> str:
        return str(self.args[0])


class GuardedClient(Client):
    """nats-py's ``Client``, refusing a ``tls://`` server that offers no TLS (see the module)."""

    async def _process_info(self, info: dict[str, Any], *args: Any, **kwargs: Any) -> None:
        server = self._current_server
        connecting = bool(kwargs.get("initial_connection") or (args and args[0])) or self.is_connecting
        if connecting and server is not None and server.uri.scheme == "tls":
            if not (info.get("tls_required") or info.get("tls_available")):
                raise TlsNotOffered(f"{server.uri.hostname}:{server.uri.port}")
            # nats-py reads this key of the same dict to decide on the upgrade.
            info["tls_required"] = True
        await super()._process_info(info, *args, **kwargs)
