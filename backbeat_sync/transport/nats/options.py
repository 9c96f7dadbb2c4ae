"""Connect options, error descriptions and small asyncio helpers for the NATS links.

Everything here is a plain function of a :class:`~backbeat_sync.BackbeatConfig`
or of a nats-py client; nothing holds state.
"""

from __future__ import annotations

import asyncio
import importlib.util
import os
import ssl
from typing import Any

import nats.errors as nats_errors
from nats.aio.client import Client

from ...config import BackbeatConfig
from ...errors import ConfigError
from .client import TlsNotOffered

__all__ = [
    "cancel_and_wait",
    "connect_options",
    "describe_error",
    "flush",
    "is_auth_error",
    "server_label",
    "ssl_context",
]


async def cancel_and_wait(task: asyncio.Task[Any], grace: float) -> bool:
    """Cancel ``task`` and wait up to ``grace`` seconds for it to end; True if it ended.

    One ``cancel()`` is not always enough: nats-py's connect loop retries on
    ``except Exception`` forever, and on Python 3.11 ``asyncio.wait_for`` (which
    it uses for each socket attempt) swallows a cancellation that lands as the
    attempt ends, so the loop goes on to the next attempt. The task is cancelled
    again until it ends, and waiting on it is bounded.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + grace
    while not task.done():
        remaining = deadline - loop.time()
        if remaining <= 0:
            return False
        task.cancel()
        await asyncio.wait([task], timeout=min(0.05, remaining))
    if not task.cancelled():
        task.exception()  # retrieved: no "exception was never retrieved" at exit
    return True


def describe_error(exc: BaseException) -> str:
    """A short, secret-free cause for ``exc`` (as nats-py raises it), for messages and health.

    >>> describe_error(ConnectionRefusedError(111, "Connect call failed"))
    'connection refused'
    """
    text = str(exc)
    if isinstance(exc, TlsNotOffered):
        return text
    if isinstance(exc, nats_errors.AuthorizationError) or "authorization violation" in text.lower():
        return "authorization violation"
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, nats_errors.NoServersError):
        return "no servers available (reconnect attempts exhausted)"
    if isinstance(exc, (asyncio.TimeoutError, TimeoutError)):
        return "timed out"
    if isinstance(exc, ssl.SSLError):
        return f"TLS error: {exc.reason or text}"
    if isinstance(exc, OSError) and exc.strerror:
        return f"{type(exc).__name__}: {exc.strerror}"
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def is_auth_error(exc: BaseException) -> bool:
    return describe_error(exc) == "authorization violation"


def ssl_context(config: BackbeatConfig) -> ssl.SSLContext | None:
    """The TLS context for ``config`` (None: nats-py's default for ``tls://``).

    Raises:
        ConfigError: a TLS file cannot be read or used (names the field).
    """
    if config.tls_ca is None and config.tls_cert is None and config.tls_key is None:
        return None
    if (config.tls_cert is None) != (config.tls_key is None):
        missing = "tls_key" if config.tls_key is None else "tls_cert"
        raise ConfigError(missing, None, "tls_cert and tls_key must be given together")
    try:
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=config.tls_ca)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError("tls_ca", config.tls_ca, f"cannot load CA file: {describe_error(exc)}") from None
    if config.tls_cert is not None and config.tls_key is not None:
        try:
            ctx.load_cert_chain(config.tls_cert, config.tls_key)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(
                "tls_cert", config.tls_cert, f"cannot load certificate/key: {describe_error(exc)}"
            ) from None
    return ctx


def connect_options(config: BackbeatConfig, *, name: str | None = None) -> dict[str, Any]:
    """The nats-py ``connect()`` keyword arguments for ``config`` (without callbacks).

    Args:
        config: servers, reconnect, ping, auth and TLS settings.
        name: the connection name shown in NATS monitoring (default: the agent id).

    Returns:
        A dict for ``Client.connect(**options)``.

    Raises:
        ConfigError: a TLS or credentials file cannot be used, or nkeys is not installed.
    """
    attempts = config.max_reconnect_attempts
    opts: dict[str, Any] = {
        "servers": config.servers,
        "name": name or config.agent_id,
        "connect_timeout": config.connect_timeout,
        "allow_reconnect": attempts != 0,
        "max_reconnect_attempts": attempts if attempts > 0 else -1,
        "reconnect_time_wait": config.reconnect_wait,
        "ping_interval": config.ping_interval,
        "max_outstanding_pings": config.max_outstanding_pings,
        "pending_size": config.reconnect_buffer_size,
        "flush_timeout": config.flush_timeout,
    }
    if config.token is not None:
        opts["token"] = config.token
    if config.user is not None:
        opts["user"] = config.user
    if config.password is not None:
        opts["password"] = config.password
    # nats-py signs the server's nonce with nkeys for creds files and seeds.
    needs_nkeys = config.creds_file is not None or config.nkey_seed is not None
    if needs_nkeys and importlib.util.find_spec("nkeys") is None:
        field = "creds_file" if config.creds_file is not None else "nkey_seed"
        raise ConfigError(field, "***", "needs the nkeys package: pip install 'backbeat_sync[nkeys]'")
    if config.creds_file is not None:
        if not os.path.isfile(config.creds_file):
            raise ConfigError("creds_file", config.creds_file, "no such file")
        opts["user_credentials"] = config.creds_file
    if config.nkey_seed is not None:
        if os.path.isfile(config.nkey_seed):
            opts["nkeys_seed"] = config.nkey_seed
        else:
            opts["nkeys_seed_str"] = config.nkey_seed
    ctx = ssl_context(config)
    if ctx is not None:
        opts["tls"] = ctx
    return opts


async def flush(nc: Client, timeout: float) -> None:
    """One PING/PONG round-trip on ``nc`` (nats-py types the timeout as int; any float works)."""
    await nc.flush(timeout=timeout)  # type: ignore[arg-type]


def server_label(nc: Client) -> str:
    """``scheme://host:port`` of the server ``nc`` talks to; never user info."""
    url = nc.connected_url
    if url is None:
        return "(no server)"
    return f"{url.scheme}://{url.hostname}:{url.port}"
