"""The NATS link: one nats-py client on its own event-loop thread (connect, watch, close).

:class:`NatsLink` is the base of every connection the library makes: the
transport's claim link (:mod:`.claim_link`), the pulse's link
(:mod:`.pulse_link`) and the CLI's monitor. Only its loop thread touches the
nats-py client.
"""

from __future__ import annotations

import asyncio
import enum
import random
import threading
from collections.abc import Callable, Coroutine
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any, Final

import nats.errors as nats_errors
from nats.aio.client import Client

from ..._time import SYSTEM_TIME, TimeSource
from ...config import BackbeatConfig
from ...errors import BackbeatConnectionError, ConfigError, TransportStateError
from ..base import TransportEvent
from .client import GuardedClient, TlsNotOffered
from .options import cancel_and_wait, connect_options, describe_error, is_auth_error, server_label

__all__ = ["CLOSE_GRACE", "JOIN_TIMEOUT", "EventReporter", "NatsLink", "SubscriberLink"]

#: Extra time stop() allows past flush_timeout for closing the socket and the loop.
CLOSE_GRACE: Final = 2.0
#: How long stop() waits for the loop thread to end.
JOIN_TIMEOUT: Final = 10.0

EventReporter = Callable[[TransportEvent, str], None]


class _State(enum.Enum):
    NEW = "new"
    STARTING = "starting"
    RUNNING = "running"
    STOPPING = "stopping"
    STOPPED = "stopped"


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
        self._refusals = 0
        self._tls_refusal_reported = False
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
            TransportStateError: ``start()`` was already called (a RuntimeError).
        """
        with self._state_lock:
            if self._state is not _State.NEW:
                raise TransportStateError(f"NATS link already {self._state.value}")
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
            TransportStateError: the loop is not running (a RuntimeError).
        """
        if self._loop is None or self._loop.is_closed():
            coro.close()
            raise TransportStateError("NATS loop is not running")
        return asyncio.run_coroutine_threadsafe(coro, self._loop)

    # -- on the loop thread ---------------------------------------------------------

    async def _connect(self, options: dict[str, Any], background: bool) -> None:
        nc = GuardedClient()
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
        self._report(TransportEvent.CONNECTED, f"connected to {server_label(nc)}")

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
            # A server that refuses us (credentials) or that we refuse (tls:// without TLS)
            # will do so again: a start() that every server refused fails at once.
            refusal = "authorization violation" if is_auth_error(exc) else None
            if isinstance(exc, TlsNotOffered):
                refusal = cause
                if self._ever_connected and not self._tls_refusal_reported:
                    self._tls_refusal_reported = True  # once per outage: a downgrade is worth a line
                    self._report(TransportEvent.ERROR, cause)
            if refusal is not None:
                self._refusals += 1
                fatal = self._fatal
                if (
                    fatal is not None
                    and not fatal.done()
                    and not self._ever_connected
                    and not self._config.connect_in_background
                    and self._refusals >= len(self._config.servers)
                ):
                    fatal.set_result(refusal)
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
        self._tls_refusal_reported = False
        label = server_label(nc) if nc is not None else self.masked_servers
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


class SubscriberLink(NatsLink):
    """A link that subscribes to one subject and hands every payload to a callback (the CLI's monitor).

    Args:
        config: servers, reconnect, auth and TLS settings.
        report: receives connection events.
        subject: the subject (wildcards allowed).
        on_message: called with each payload, on the loop thread (must be quick and not raise).
        client_name: connection name shown in NATS monitoring.
        thread_name: name of the loop thread.
    """

    def __init__(
        self,
        config: BackbeatConfig,
        report: EventReporter,
        subject: str,
        on_message: Callable[[bytes], None],
        *,
        client_name: str | None = None,
        thread_name: str = "backbeat-nats",
    ) -> None:
        super().__init__(config, report, client_name=client_name, thread_name=thread_name)
        self.subject = subject
        self._on_message = on_message

    def request(self, subject: str, timeout: float) -> bytes | None:
        """Send one empty request on ``subject`` and return the first answer's payload.

        Args:
            subject: where to ask.
            timeout: seconds to wait for an answer.

        Returns:
            The answer, or None: nobody answered in time, no responders, not connected.
            Nothing raises: a missing answer is an answer too.
        """
        nc = self._nc
        if nc is None or not self.connected:
            return None

        async def ask() -> bytes:
            msg = await nc.request(subject, b"", timeout=timeout)
            data: bytes = msg.data
            return data

        try:
            return self.submit(ask()).result(timeout + 1.0)  # type: ignore[no-any-return]
        except Exception:
            return None

    async def _on_connect(self, nc: Client) -> None:
        on_message = self._on_message

        async def handler(msg: Any) -> None:
            on_message(msg.data)

        await nc.subscribe(self.subject, cb=handler)
