"""The NATS transport: one event-loop thread per transport owns the nats-py client.

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
"""

from __future__ import annotations

import asyncio
import enum
import importlib.util
import os
import random
import ssl
import threading
from collections import deque
from collections.abc import Callable, Coroutine
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any, Final

import nats.errors as nats_errors
from nats.aio.client import Client
from nats.aio.msg import Msg

from .._time import SYSTEM_TIME, TimeSource
from ..claims import Claim
from ..config import BackbeatConfig
from ..errors import BackbeatConnectionError, ConfigError
from .base import ClaimEncoder, Transport, TransportEvent, TransportSink

__all__ = [
    "NatsLink",
    "NatsTransport",
    "Outbox",
    "PulseLink",
    "cancel_and_wait",
    "connect_options",
    "describe_error",
    "flush",
]

#: Claims taken from the outbox per batch before the loop lets frames through.
BATCH_SIZE: Final = 512
#: Beat-subject messages nats-py may hold for our callback before it reports a slow consumer.
PENDING_MSGS_LIMIT: Final = 65_536
#: Bytes nats-py may hold for our callback (a flood of 64 KiB frames cannot eat the heap).
PENDING_BYTES_LIMIT: Final = 64 * 1024 * 1024
#: Extra time stop() allows past flush_timeout for closing the socket and the loop.
CLOSE_GRACE: Final = 2.0
#: How long stop() waits for the loop thread to end.
JOIN_TIMEOUT: Final = 10.0
#: A final claim counts as confirmed by a PONG only if the connection was still up this long
#: after it went out. A PONG proves the server read the message, not that what the server
#: feeds from it (a JetStream stream, a route) has it: a server shutting down answers PINGs
#: for a moment after it stopped storing. A claim whose connection dies within this window
#: is sent again after the reconnect.
CONFIRM_SETTLE: Final = 0.1

EventReporter = Callable[[TransportEvent, str], None]


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


class _State(enum.Enum):
    NEW = "new"
    STARTING = "starting"
    RUNNING = "running"
    STOPPING = "stopping"
    STOPPED = "stopped"


def describe_error(exc: BaseException) -> str:
    """A short, secret-free cause for ``exc`` (as nats-py raises it), for messages and health.

    >>> describe_error(ConnectionRefusedError(111, "Connect call failed"))
    'connection refused'
    """
    text = str(exc)
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


def _is_auth_error(exc: BaseException) -> bool:
    return describe_error(exc) == "authorization violation"


def _ssl_context(config: BackbeatConfig) -> ssl.SSLContext | None:
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
        raise ConfigError(field, "***", "needs the nkeys package: pip install 'nats-py[nkeys]'")
    if config.creds_file is not None:
        if not os.path.isfile(config.creds_file):
            raise ConfigError("creds_file", config.creds_file, "no such file")
        opts["user_credentials"] = config.creds_file
    if config.nkey_seed is not None:
        if os.path.isfile(config.nkey_seed):
            opts["nkeys_seed"] = config.nkey_seed
        else:
            opts["nkeys_seed_str"] = config.nkey_seed
    ctx = _ssl_context(config)
    if ctx is not None:
        opts["tls"] = ctx
    return opts


async def flush(nc: Client, timeout: float) -> None:
    """One PING/PONG round-trip on ``nc`` (nats-py types the timeout as int; any float works)."""
    await nc.flush(timeout=timeout)  # type: ignore[arg-type]


def _server_label(nc: Client) -> str:
    """``scheme://host:port`` of the server ``nc`` talks to; never user info."""
    url = nc.connected_url
    if url is None:
        return "(no server)"
    return f"{url.scheme}://{url.hostname}:{url.port}"


class NatsLink:
    """One nats-py client on its own event-loop thread: connect, watch, close.

    Subclasses add what runs on the connection (:class:`NatsTransport` subscribes
    and publishes claims; :class:`~backbeat_sync.Pulse` publishes frames) by
    overriding the ``_on_*`` coroutines and :meth:`_background`.

    Connection events go to ``report(event, detail)``: one ``DISCONNECTED`` when
    an outage starts, one ``RECONNECTED`` when it ends; the failed attempts in
    between are only counted (no traceback storm). ``detail`` never holds a
    secret.

    Args:
        config: servers, reconnect, auth and TLS settings.
        report: receives connection events (called on the loop thread; must not raise).
        client_name: connection name shown in NATS monitoring.
        thread_name: name of the loop thread.
        time_source: where time is read.
    """

    def __init__(
        self,
        config: BackbeatConfig,
        report: EventReporter,
        *,
        client_name: str | None = None,
        thread_name: str = "backbeat-nats",
        time_source: TimeSource = SYSTEM_TIME,
    ) -> None:
        self._config = config
        self._report_cb = report
        self._client_name = client_name
        self._thread_name = thread_name
        self._time = time_source
        self._state = _State.NEW
        self._state_lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._nc: Client | None = None
        self._tasks: list[asyncio.Task[Any]] = []
        self._connect_task: asyncio.Task[Any] | None = None
        self._connected_evt: asyncio.Event | None = None
        self._fatal: asyncio.Future[str] | None = None
        self._secrets = tuple(
            s for s in (config.token, config.password, config.nkey_seed, *self._url_passwords()) if s
        )
        self._connected = False
        self._ever_connected = False
        self._closing = False
        self._reconnects = 0
        self._generation = 0
        self._outage_started: float | None = None
        self._failed_attempts = 0
        self._auth_failures = 0
        self._last_error = ""
        self._bg_error_reported = False
        self._errors_total = 0
        self._last_loop_error = float("-inf")

    def _url_passwords(self) -> list[str]:
        from urllib.parse import urlsplit

        found = []
        for url in self._config.servers:
            try:
                split = urlsplit(url)
            except ValueError:
                continue
            if split.password:
                found.append(split.password)
            elif split.username and split.password is None:
                found.append(split.username)  # nats://TOKEN@host: the user part is a token
        return found

    # -- public state -----------------------------------------------------------

    @property
    def connected(self) -> bool:
        """Whether the client is connected now."""
        return self._connected

    @property
    def reconnect_count(self) -> int:
        """How many times the connection was re-established after a loss."""
        return self._reconnects

    @property
    def stopped(self) -> bool:
        """True once ``stop()`` has finished."""
        return self._state is _State.STOPPED

    @property
    def masked_servers(self) -> str:
        """The configured servers with any password or token masked."""
        return self._config.masked_url

    def scrub(self, text: str) -> str:
        """``text`` with every configured secret replaced by ``***``."""
        for secret in self._secrets:
            text = text.replace(secret, "***")
        return text

    def _report(self, event: TransportEvent, detail: str) -> None:
        try:
            self._report_cb(event, self.scrub(detail))
        except Exception:  # a reporter must not break the loop
            pass

    # -- lifecycle ----------------------------------------------------------------

    def start(self) -> None:
        """Start the loop thread and connect.

        Returns once connected, or at once with ``config.connect_in_background``
        (the client keeps trying; :attr:`connected` is False meanwhile).

        Raises:
            BackbeatConnectionError: no connection within ``config.connect_timeout``
                (names the masked servers and the cause); nothing is left running.
            ConfigError: a TLS or credentials setting cannot be used.
            RuntimeError: ``start()`` was already called.
        """
        with self._state_lock:
            if self._state is not _State.NEW:
                raise RuntimeError(f"NATS link already {self._state.value}")
            self._state = _State.STARTING
        try:
            options = connect_options(self._config, name=self._client_name)
        except BaseException:
            with self._state_lock:
                self._state = _State.NEW
            raise
        loop = asyncio.new_event_loop()
        self._loop = loop
        ready = threading.Event()
        self._thread = threading.Thread(
            target=self._run_loop, args=(loop, ready), name=self._thread_name, daemon=True
        )
        self._thread.start()
        ready.wait()
        background = self._config.connect_in_background
        fut = asyncio.run_coroutine_threadsafe(self._connect(options, background), loop)
        if background:
            with self._state_lock:
                self._state = _State.RUNNING
            return
        try:
            # The coroutine enforces connect_timeout itself; this bound only guards a stuck loop.
            fut.result(timeout=self._config.connect_timeout + 2 * CLOSE_GRACE + self._config.reconnect_wait)
        except BaseException as exc:
            fut.cancel()
            self._teardown()
            with self._state_lock:
                self._state = _State.NEW
            if isinstance(exc, (BackbeatConnectionError, ConfigError)):
                raise
            cause = self._timeout_cause() if isinstance(exc, FutureTimeout) else describe_error(exc)
            raise BackbeatConnectionError(self.masked_servers, self.scrub(cause)) from None
        with self._state_lock:
            self._state = _State.RUNNING

    def stop(self, flush_timeout: float) -> None:
        """Run :meth:`_on_stop` (bounded by ``flush_timeout``), close, stop the loop, join. Idempotent.

        Works when the server is gone: what could not be sent in time is counted
        by the subclass, and the thread still ends.
        """
        with self._state_lock:
            if self._state in (_State.NEW, _State.STOPPED):
                self._state = _State.STOPPED
                return
            if self._state is not _State.RUNNING:
                return
            self._state = _State.STOPPING
        loop = self._loop
        if loop is not None and not loop.is_closed():
            fut = asyncio.run_coroutine_threadsafe(self._shutdown(flush_timeout), loop)
            try:
                fut.result(timeout=flush_timeout + CLOSE_GRACE + self._config.reconnect_wait)
            except BaseException:
                fut.cancel()
        self._teardown()
        with self._state_lock:
            self._state = _State.STOPPED

    def _teardown(self) -> None:
        loop, thread = self._loop, self._thread
        if loop is not None and not loop.is_closed():
            try:
                loop.call_soon_threadsafe(loop.stop)
            except RuntimeError:  # closed meanwhile
                pass
        if thread is not None and thread is not threading.current_thread():
            thread.join(JOIN_TIMEOUT)
        self._connected = False

    def _run_loop(self, loop: asyncio.AbstractEventLoop, ready: threading.Event) -> None:
        asyncio.set_event_loop(loop)
        loop.set_exception_handler(self._loop_exception)
        self._connected_evt = asyncio.Event()
        self._fatal = loop.create_future()
        loop.call_soon(ready.set)
        try:
            loop.run_forever()
        finally:
            try:
                tasks = [t for t in asyncio.all_tasks(loop) if not t.done()]
                for t in tasks:
                    t.cancel()
                if tasks:
                    loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
                loop.run_until_complete(loop.shutdown_asyncgens())
                loop.run_until_complete(loop.shutdown_default_executor())  # getaddrinfo threads
            finally:
                loop.close()

    def _loop_exception(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        """Unhandled errors in nats-py's background tasks: one line each, never a traceback."""
        if self._closing:
            return
        exc = context.get("exception")
        detail = describe_error(exc) if isinstance(exc, BaseException) else str(context.get("message"))
        now = self._time.monotonic()
        if now - self._last_loop_error >= 5.0:
            self._last_loop_error = now
            self._report(TransportEvent.ERROR, f"NATS client task failed: {detail}")

    def call_soon(self, fn: Callable[[], Any]) -> bool:
        """Schedule ``fn()`` on the loop thread from any thread. Returns False if the loop is gone."""
        loop = self._loop
        if loop is None:
            return False
        try:
            loop.call_soon_threadsafe(fn)
        except RuntimeError:
            return False
        return True

    def submit(self, coro: Coroutine[Any, Any, Any]) -> Any:
        """Run ``coro`` on the loop from another thread; returns a concurrent future.

        Raises:
            RuntimeError: the loop is not running.
        """
        if self._loop is None or self._loop.is_closed():
            coro.close()
            raise RuntimeError("NATS loop is not running")
        return asyncio.run_coroutine_threadsafe(coro, self._loop)

    # -- on the loop thread ---------------------------------------------------------

    async def _connect(self, options: dict[str, Any], background: bool) -> None:
        nc = Client()
        self._nc = nc
        loop = asyncio.get_running_loop()
        for coro in self._background():
            self._tasks.append(loop.create_task(coro))
        task = loop.create_task(
            nc.connect(
                **options,
                error_cb=self._error_cb,
                disconnected_cb=self._disconnected_cb,
                reconnected_cb=self._reconnected_cb,
                closed_cb=self._closed_cb,
            )
        )
        self._connect_task = task
        if background:
            try:
                await task
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self._report(
                    TransportEvent.ERROR,
                    f"gave up connecting to {self.masked_servers}: {describe_error(exc)}",
                )
                return
        else:
            assert self._fatal is not None
            waiting: list[asyncio.Future[Any]] = [task, self._fatal]
            done, _ = await asyncio.wait(
                waiting,
                timeout=self._config.connect_timeout,
                return_when=asyncio.FIRST_COMPLETED,
            )
            if task not in done or task.exception() is not None:
                if task in done:
                    cause = describe_error(task.exception())  # type: ignore[arg-type]
                elif self._fatal.done():
                    cause = self._fatal.result()
                else:
                    cause = self._timeout_cause()
                await cancel_and_wait(task, CLOSE_GRACE)
                await self._close_client(nc)
                raise BackbeatConnectionError(self.masked_servers, self.scrub(cause))
        self._connected = True
        self._ever_connected = True
        self._failed_attempts = 0
        self._last_error = ""
        assert self._connected_evt is not None
        self._connected_evt.set()
        await self._on_connect(nc)
        self._report(TransportEvent.CONNECTED, f"connected to {_server_label(nc)}")

    def _timeout_cause(self) -> str:
        last = f" (last error: {self._last_error})" if self._last_error else ""
        return f"no connection within {self._config.connect_timeout:g} s{last}"

    async def _close_client(self, nc: Client) -> None:
        try:
            if not nc.is_closed:
                await asyncio.wait_for(nc.close(), CLOSE_GRACE + self._config.reconnect_wait)
        except Exception:
            pass

    async def _shutdown(self, flush_timeout: float) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + flush_timeout
        try:
            await self._on_stop(deadline)
        except Exception as exc:
            self._report(TransportEvent.ERROR, f"stop: {describe_error(exc)}")
        self._closing = True
        if self._connect_task is not None and not self._connect_task.done():
            await cancel_and_wait(self._connect_task, CLOSE_GRACE)
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        nc = self._nc
        if nc is not None and not nc.is_closed:
            if nc.is_connected:
                try:
                    await asyncio.wait_for(nc.drain(), max(0.2, deadline - loop.time()))
                except Exception:
                    pass
            await self._close_client(nc)
        self._connected = False
        self._report(TransportEvent.CLOSED, f"closed connection to {self.masked_servers}")

    async def _error_cb(self, exc: Exception) -> None:
        self._errors_total += 1
        cause = self.scrub(describe_error(exc))
        self._last_error = cause
        if self._closing:
            return
        if isinstance(exc, nats_errors.SlowConsumerError):
            self._on_slow_consumer()
            return
        if not self._connected:
            self._failed_attempts += 1
            self._jitter()
            if _is_auth_error(exc):
                self._auth_failures += 1
                fatal = self._fatal
                if (
                    fatal is not None
                    and not fatal.done()
                    and not self._ever_connected
                    and not self._config.connect_in_background
                    and self._auth_failures >= len(self._config.servers)
                ):
                    fatal.set_result("authorization violation")
            if not self._ever_connected and not self._bg_error_reported:
                self._bg_error_reported = True
                self._report(
                    TransportEvent.ERROR,
                    f"cannot connect to {self.masked_servers} yet: {cause}; still trying",
                )
            return
        if isinstance(exc, (OSError, nats_errors.StaleConnectionError, nats_errors.ConnectionClosedError)):
            return  # the connection is going down: the DISCONNECTED line carries the cause
        self._report(TransportEvent.ERROR, cause)

    def _jitter(self) -> None:
        nc = self._nc
        if nc is not None:
            nc.options["reconnect_time_wait"] = self._config.reconnect_wait + random.uniform(
                0, self._config.reconnect_jitter
            )

    async def _disconnected_cb(self) -> None:
        if self._closing or not self._connected:
            return
        self._connected = False
        self._generation += 1
        self._outage_started = self._time.monotonic()
        self._failed_attempts = 0
        if self._connected_evt is not None:
            self._connected_evt.clear()
        self._jitter()
        self._on_disconnect()
        cause = f": {self._last_error}" if self._last_error else ""
        self._report(
            TransportEvent.DISCONNECTED,
            f"lost connection to NATS ({self.masked_servers}){cause}; reconnecting",
        )

    async def _reconnected_cb(self) -> None:
        if self._closing:
            return
        nc = self._nc
        self._connected = True
        self._reconnects += 1
        if self._connected_evt is not None:
            self._connected_evt.set()
        started = self._outage_started
        took = f" after {self._time.monotonic() - started:.1f} s" if started is not None else ""
        attempts = f" ({self._failed_attempts} failed attempts)" if self._failed_attempts else ""
        self._outage_started = None
        self._last_error = ""
        label = _server_label(nc) if nc is not None else self.masked_servers
        self._on_reconnect()
        self._report(TransportEvent.RECONNECTED, f"reconnected to {label}{took}{attempts}")

    async def _closed_cb(self) -> None:
        was = self._connected
        self._connected = False
        if self._connected_evt is not None:
            self._connected_evt.clear()
        if self._closing:
            return
        if was:
            self._on_disconnect()
        last = f": {self._last_error}" if self._last_error else ""
        self._report(TransportEvent.ERROR, f"connection to {self.masked_servers} closed for good{last}")
        self._report(TransportEvent.CLOSED, "closed by the client library")

    async def _wait_connected(self, deadline: float) -> bool:
        """Wait until connected or the loop time ``deadline``; True if connected."""
        evt = self._connected_evt
        if self._connected:
            return True
        if evt is None:
            return False
        remaining = deadline - asyncio.get_running_loop().time()
        if remaining <= 0:
            return False
        try:
            await asyncio.wait_for(evt.wait(), remaining)
        except asyncio.TimeoutError:
            return False
        return self._connected

    # -- hooks for subclasses -------------------------------------------------------

    def _background(self) -> list[Coroutine[Any, Any, None]]:
        """Coroutines to run on the loop for the link's lifetime (cancelled at stop)."""
        return []

    async def _on_connect(self, nc: Client) -> None:
        """Called once, after the first connection is made."""

    def _on_disconnect(self) -> None:
        """Called when a live connection is lost (on the loop thread)."""

    def _on_reconnect(self) -> None:
        """Called when the connection is back (on the loop thread)."""

    def _on_slow_consumer(self) -> None:
        """Called when nats-py dropped messages for a subscription that fell behind."""

    async def _on_stop(self, deadline: float) -> None:
        """Called at stop, before closing; finish by the loop time ``deadline``."""


class _Entry:
    __slots__ = ("claim", "final", "sent", "seq", "subject")

    def __init__(self, subject: str, claim: Claim, final: bool) -> None:
        self.subject = subject
        self.claim = claim
        self.final = final
        self.seq = 0  # publish sequence number, set when it goes on the wire
        self.sent = 0.0  # loop time it went on the wire


class Outbox:
    """Thread-safe, bounded queue of claims waiting for the loop.

    Below ``limit`` every claim is kept in order. At or past it, an
    intermediate claim replaces the queued intermediate claim of the same
    subject and task (latest wins, :attr:`coalesced`); with none to replace it
    is dropped (:attr:`dropped`). A final claim is always kept. The bound
    holds while :attr:`bounded` is true; the link clears it while connected,
    when the loop is draining the outbox anyway (one beat of 100,000 active
    operations queues 100,000 claims at once, and none of them may be lost).

    Args:
        limit: claims held before coalescing starts (>= 1).

    Example:
        >>> box = Outbox(limit=10)
        >>> box.__len__()
        0
    """

    def __init__(self, limit: int) -> None:
        if limit < 1:
            raise ConfigError("outbox_limit", limit, "must be an integer >= 1")
        self._limit = limit
        self._lock = threading.Lock()
        self._items: deque[_Entry] = deque()
        self._latest: dict[tuple[str, str], _Entry] = {}
        self._wake_pending = False
        #: Apply ``limit`` (True while disconnected; the link clears it while connected).
        self.bounded = True
        self.dropped = 0
        self.coalesced = 0

    def __len__(self) -> int:
        return len(self._items)

    def put(self, subject: str, claim: Claim) -> bool:
        """Queue ``claim`` for ``subject``.

        Returns:
            True if the caller must wake the loop (the first claim since the last batch was taken).
        """
        key = (subject, claim.task_id)
        final = claim.is_final
        with self._lock:
            if final:
                self._latest.pop(key, None)
                self._items.append(_Entry(subject, claim, True))
            elif self.bounded and len(self._items) >= self._limit:
                slot = self._latest.get(key)
                if slot is not None:
                    slot.claim = claim
                    self.coalesced += 1
                else:
                    self.dropped += 1
            else:
                entry = _Entry(subject, claim, False)
                self._items.append(entry)
                self._latest[key] = entry
            wake = not self._wake_pending
            self._wake_pending = True
            return wake

    def put_many(self, subject: str, claims: list[Claim]) -> bool:
        """Queue ``claims`` for ``subject`` in order, under one lock (one beat's claims).

        Returns:
            True if the caller must wake the loop (as :meth:`put`).
        """
        with self._lock:
            items, latest = self._items, self._latest
            for claim in claims:
                key = (subject, claim.task_id)
                if claim.is_final:
                    latest.pop(key, None)
                    items.append(_Entry(subject, claim, True))
                elif self.bounded and len(items) >= self._limit:
                    slot = latest.get(key)
                    if slot is not None:
                        slot.claim = claim
                        self.coalesced += 1
                    else:
                        self.dropped += 1
                else:
                    entry = _Entry(subject, claim, False)
                    items.append(entry)
                    latest[key] = entry
            wake = not self._wake_pending
            self._wake_pending = True
            return wake

    def rearm(self) -> None:
        """The loop is about to take a batch: the next ``put`` must wake it again."""
        with self._lock:
            self._wake_pending = False

    def take(self, n: int) -> list[_Entry]:
        """Remove and return up to ``n`` claims, oldest first."""
        out: list[_Entry] = []
        with self._lock:
            items, latest = self._items, self._latest
            while items and len(out) < n:
                entry = items.popleft()
                key = (entry.subject, entry.claim.task_id)
                if latest.get(key) is entry:
                    del latest[key]
                out.append(entry)
        return out

    def put_back(self, entries: list[_Entry]) -> None:
        """Return ``entries`` to the front, in their order (to be sent first)."""
        if not entries:
            return
        with self._lock:
            self._items.extendleft(reversed(entries))

    def finals(self) -> int:
        """How many final claims are queued."""
        with self._lock:
            return sum(1 for e in self._items if e.final)


class _ClaimLink(NatsLink):
    """The transport's link: beat subscription, claim batches, confirmation of finals."""

    def __init__(
        self,
        config: BackbeatConfig,
        encoder: ClaimEncoder,
        time_source: TimeSource,
        sink: TransportSink,
    ) -> None:
        super().__init__(config, sink.transport_event, client_name=config.agent_id, time_source=time_source)
        self._encoder = encoder
        self._sink = sink
        self.outbox = Outbox(config.outbox_limit)
        self.inflight: deque[_Entry] = deque()
        self._wake: asyncio.Event | None = None
        self._confirm: asyncio.Event | None = None
        self._flush_task: asyncio.Task[None] | None = None
        self.published = 0
        self.lost = 0
        self.resent = 0
        self.confirmed = 0
        self.frames = 0
        self._seq = 0
        self.slow_consumer_drops = 0
        self.publish_errors = 0

    def wake(self) -> None:
        """Wake the drainer (from any thread)."""
        wake = self._wake
        if wake is not None:
            self.call_soon(wake.set)

    def _background(self) -> list[Coroutine[Any, Any, None]]:
        self._wake = asyncio.Event()
        self._confirm = asyncio.Event()
        if len(self.outbox):
            self._wake.set()
        return [self._drainer(), self._confirmer()]

    async def _on_connect(self, nc: Client) -> None:
        await nc.subscribe(
            self._config.beat_subject_for(),
            cb=self._on_frame,
            pending_msgs_limit=PENDING_MSGS_LIMIT,
            pending_bytes_limit=PENDING_BYTES_LIMIT,
        )
        try:
            await flush(nc, self._config.flush_timeout)  # the server has our SUB
        except Exception:
            pass
        self.outbox.bounded = False
        if self._wake is not None:
            self._wake.set()

    async def _on_frame(self, msg: Msg) -> None:
        self.frames += 1
        self._sink.frame_received(msg.data, self._time.monotonic())

    def _on_slow_consumer(self) -> None:
        self.slow_consumer_drops += 1
        if self.slow_consumer_drops == 1 or self.slow_consumer_drops % 10_000 == 0:
            self._report(
                TransportEvent.ERROR,
                f"beat subscription fell behind: {self.slow_consumer_drops} message(s) dropped",
            )

    def _on_disconnect(self) -> None:
        self.outbox.bounded = True
        if self._flush_task is not None and not self._flush_task.done():
            self._flush_task.cancel()
        if self.inflight:
            self.resent += len(self.inflight)
            self.outbox.put_back(list(self.inflight))
            self.inflight.clear()

    def _on_reconnect(self) -> None:
        self.outbox.bounded = False
        if self._wake is not None:
            self._wake.set()

    async def _drainer(self) -> None:
        assert self._wake is not None
        while True:
            await self._wake.wait()
            self._wake.clear()
            self.outbox.rearm()
            await self._send_queued()

    async def _send_queued(self) -> None:
        """Publish queued claims in batches while connected."""
        nc = self._nc
        assert self._confirm is not None
        while nc is not None and self._connected and nc.is_connected:
            batch = self.outbox.take(BATCH_SIZE)
            if not batch:
                return
            finals = False
            for i, entry in enumerate(batch):
                try:
                    data = self._encoder(entry.claim)
                except Exception as exc:
                    self.lost += 1
                    self._report(TransportEvent.ERROR, f"cannot encode claim {entry.claim.task_id}: {exc}")
                    continue
                try:
                    await nc.publish(entry.subject, data)
                except (nats_errors.MaxPayloadError, nats_errors.BadSubjectError) as exc:
                    self.lost += 1
                    self._report(
                        TransportEvent.ERROR,
                        f"claim {entry.claim.task_id} refused: {describe_error(exc)}",
                    )
                    continue
                except Exception:
                    # Not connected after all: keep the rest for the reconnect.
                    self.publish_errors += 1
                    self.outbox.put_back(batch[i:])
                    if finals:
                        self._confirm.set()
                    return
                if entry.final:
                    self._seq += 1
                    entry.seq = self._seq
                    entry.sent = asyncio.get_running_loop().time()
                    self.inflight.append(entry)
                    finals = True
                else:
                    self.published += 1
            if finals:
                self._confirm.set()
            await asyncio.sleep(0)  # let beat frames through between batches

    async def _confirmer(self) -> None:
        """Confirm in-flight final claims with one flush round-trip at a time."""
        assert self._confirm is not None
        loop = asyncio.get_running_loop()
        while True:
            await self._confirm.wait()
            self._confirm.clear()
            while self.inflight and self._connected:
                wait = self.inflight[0].sent + CONFIRM_SETTLE - loop.time()
                if wait > 0:
                    await asyncio.sleep(wait)
                    continue  # the connection may have dropped meanwhile
                if not await self._confirm_once(self._config.flush_timeout, settle=CONFIRM_SETTLE):
                    await asyncio.sleep(CONFIRM_SETTLE)  # a failed flush: try again shortly

    async def _confirm_once(self, timeout: float, *, settle: float = 0.0) -> bool:
        """One PING/PONG; on the PONG, confirm the final claims sent ``settle`` s or more before the PING.

        Returns:
            True if the round-trip succeeded on the same connection.
        """
        nc = self._nc
        if not self.inflight or nc is None or not self._connected:
            return not self.inflight
        loop = asyncio.get_running_loop()
        generation, upto, cutoff = self._generation, self._seq, loop.time() - settle
        task = asyncio.ensure_future(flush(nc, max(timeout, 0.01)))
        self._flush_task = task
        await asyncio.wait({task})
        if self._flush_task is task:
            self._flush_task = None
        if task.cancelled() or task.exception() is not None or generation != self._generation:
            return False
        inflight = self.inflight
        while inflight and inflight[0].seq <= upto and inflight[0].sent <= cutoff:
            inflight.popleft()
            self.published += 1
            self.confirmed += 1
        return True

    async def _on_stop(self, deadline: float) -> None:
        loop = asyncio.get_running_loop()
        while len(self.outbox) or self.inflight:
            if not await self._wait_connected(deadline):
                break
            await self._send_queued()
            if self._flush_task is not None:
                await asyncio.wait({self._flush_task}, timeout=max(0.0, deadline - loop.time()))
            await self._confirm_once(max(0.01, deadline - loop.time()))
            if loop.time() >= deadline:
                break
            if len(self.outbox) and not self._connected:
                continue
            if len(self.outbox) or self.inflight:
                await asyncio.sleep(0.01)
        left = len(self.outbox) + len(self.inflight)
        if left:
            finals = self.outbox.finals() + len(self.inflight)
            self.lost += left
            self._report(
                TransportEvent.ERROR,
                f"stop: {left} claim(s) ({finals} final) not confirmed by NATS within the flush timeout",
            )


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
        self._link: _ClaimLink | None = None
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
        """
        if self._link is not None:
            raise RuntimeError("NatsTransport.start() may be called once")
        link = _ClaimLink(self._config, self._encoder, self._time, sink)
        # Claims published before start() (none in practice) are not lost.
        link.outbox.put_back(self._pre_outbox.take(len(self._pre_outbox) + 1))
        self._link = link
        try:
            link.start()
        except BaseException:
            self._link = None
            raise

    def publish(self, subject: str, claim: Claim) -> None:
        """Queue ``claim`` for ``subject``; thread-safe, returns at once (never waits on the network)."""
        link = self._link
        if link is None:
            self._pre_outbox.put(subject, claim)
            return
        if link.stopped:
            link.lost += 1  # nobody will send it: count it rather than queue it forever
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
            link.lost += len(claims)
            return
        if link.outbox.put_many(subject, claims):
            link.wake()

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
        ``claims_unconfirmed``, ``claims_resent`` (final claims sent again after a
        reconnect), ``frames_received``, ``frames_dropped`` (slow consumer).
        """
        link = self._link
        if link is None:
            return {
                "claims_published": 0,
                "claims_dropped": self._pre_outbox.dropped,
                "claims_coalesced": self._pre_outbox.coalesced,
                "claims_queued": len(self._pre_outbox),
                "claims_unconfirmed": 0,
                "claims_resent": 0,
                "frames_received": 0,
                "frames_dropped": 0,
            }
        box = link.outbox
        inflight = len(link.inflight)
        return {
            "claims_published": link.published,
            "claims_dropped": box.dropped + link.lost,
            "claims_coalesced": box.coalesced,
            "claims_queued": len(box) + inflight,
            "claims_unconfirmed": inflight,
            "claims_resent": link.resent,
            "frames_received": link.frames,
            "frames_dropped": link.slow_consumer_drops,
        }


class PulseLink(NatsLink):
    """The NATS side of a :class:`~backbeat_sync.Pulse`: sends each beat of a schedule on time.

    Frames are only sent while connected: a frame that would reach agents late
    (buffered through an outage) is worse than none, so missed beats are
    skipped (counted) and the schedule carries on by the clock.

    Args:
        config: servers, subjects, auth and TLS settings.
        schedule: the beat schedule to keep.
        report: receives connection events.
        sign: optional hook that returns a signed copy of each frame.
        time_source: real time; beats are due on its monotonic clock.
    """

    def __init__(
        self,
        config: BackbeatConfig,
        schedule: Any,
        report: EventReporter,
        *,
        sign: Callable[[Any], Any] | None = None,
        time_source: TimeSource = SYSTEM_TIME,
    ) -> None:
        super().__init__(
            config,
            report,
            client_name=f"backbeat-pulse-{config.cluster_id}",
            thread_name="backbeat-pulse",
            time_source=time_source,
        )
        self.schedule = schedule
        self._sign = sign
        self._subject = config.beat_subject_for()
        self._changed: asyncio.Event | None = None
        self.frames_sent = 0
        self.frames_skipped = 0
        self.send_errors = 0

    def tempo_changed(self) -> None:
        """Re-plan the next beat now (call after ``schedule.set_tempo``; any thread)."""
        changed = self._changed
        if changed is not None:
            self.call_soon(changed.set)

    def _background(self) -> list[Coroutine[Any, Any, None]]:
        self._changed = asyncio.Event()
        return [self._beats()]

    async def _beats(self) -> None:
        sched = self.schedule
        changed = self._changed
        assert changed is not None
        clock = self._time
        while True:
            if not self._connected:
                # Beats that fall in an outage (or before the first connection) are skipped.
                before = sched.next_index
                evt = self._connected_evt
                assert evt is not None
                await evt.wait()
                sched.skip_to(clock.monotonic() - 60.0 / sched.tempo_bpm)
                self.frames_skipped += sched.next_index - before
            now = clock.monotonic()
            sched.skip_to(now - 60.0 / sched.tempo_bpm)
            index = sched.next_index
            delay = sched.due(index) - now
            if delay > 0:
                changed.clear()
                try:
                    await asyncio.wait_for(changed.wait(), delay)
                    continue  # the tempo changed: plan again
                except asyncio.TimeoutError:
                    pass
            if sched.next_index != index:
                continue
            sched.advance()
            await self._send(index)

    async def _send(self, index: int) -> None:
        nc = self._nc
        if nc is None or not self._connected or not nc.is_connected:
            self.frames_skipped += 1
            return
        try:
            frame = self.schedule.frame(index, self._time.time())
            if self._sign is not None:
                frame = self._sign(frame)
            await nc.publish(self._subject, frame.encode())
        except Exception as exc:
            self.send_errors += 1
            if self.send_errors == 1 or self.send_errors % 100 == 0:
                self._report(
                    TransportEvent.ERROR,
                    f"beat {index} not sent ({self.send_errors} so far): {describe_error(exc)}",
                )
            return
        self.frames_sent += 1

    async def _on_stop(self, deadline: float) -> None:
        nc = self._nc
        if nc is not None and self._connected:
            remaining = deadline - asyncio.get_running_loop().time()
            try:
                await flush(nc, max(0.01, remaining))
            except Exception:
                pass
