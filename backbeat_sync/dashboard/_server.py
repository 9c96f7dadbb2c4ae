"""The dashboard's web server: Starlette routes served by uvicorn on a thread of its own.

The page (``static/``) is shipped in the package; it opens ``/events``, a
server-sent event stream of :meth:`DashboardState.snapshot` documents, and
renders them with DOM text nodes only (nothing an agent sends is parsed as
HTML). The messages come from a subscriber on the cluster's beat and status
subjects, on NATS (the transport's link: reconnects, auth, TLS) or on the
in-process bus for ``local://``.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hmac
import ipaddress
import json
import socket
import threading
import time
from collections.abc import Awaitable, Callable, MutableMapping
from functools import partial
from importlib.resources import files
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from .._logging import library_logger as logger
from ..config import BackbeatConfig
from ..errors import ConfigError
from ._state import DashboardState

__all__ = ["Dashboard", "parse_listen", "read_auth"]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

STATIC = files("backbeat_sync.dashboard") / "static"

#: The page loads only its own files and talks only to its own server.
SECURITY_HEADERS = {
    "content-security-policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self';"
        " connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
    "cache-control": "no-store",
}

#: Seconds between two looks at the state for a stream; a snapshot goes out only if it changed.
STREAM_INTERVAL = 0.25
#: Seconds between keep-alive comments on a quiet stream.
KEEPALIVE = 15.0


def parse_listen(listen: str) -> tuple[str, int]:
    """``HOST:PORT`` (or ``[v6]:PORT``) -> (host, port).

    Raises:
        ConfigError: not ``HOST:PORT``, or the port is not 0..65535.
    """
    host, sep, port = listen.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ConfigError("listen", listen, "must be HOST:PORT, for example 127.0.0.1:8080")
    return host, int(port)


def read_auth(spec: str) -> tuple[str, str]:
    """``USER:PASSWORD-FILE`` -> (user, password read from the file's first line).

    Raises:
        ConfigError: no ``:``, an empty user, a file that cannot be read or holds no password.
    """
    user, sep, path = spec.partition(":")
    if not sep or not user or not path:
        raise ConfigError("auth", spec, "must be USER:PASSWORD-FILE")
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise ConfigError("auth", spec, f"cannot read the password file: {exc.strerror or exc}") from exc
    password = lines[0] if lines else ""
    if not password:
        raise ConfigError("auth", spec, "the password file's first line is empty")
    return user, password


def _is_wildcard(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_unspecified
    except ValueError:
        return host in ("", "*")


class _BasicAuth:
    """ASGI middleware: every request needs ``Authorization: Basic`` with the one user and password."""

    def __init__(self, app: ASGIApp, user: str, password: str) -> None:
        self._app = app
        self._expected = base64.b64encode(f"{user}:{password}".encode()).decode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self._app(scope, receive, send)
            return
        given = ""
        for name, value in scope.get("headers", []):
            if name == b"authorization":
                given = value.decode("latin-1")
        scheme, _, token = given.partition(" ")
        ok = False
        if scheme.lower() == "basic":
            try:
                base64.b64decode(token, validate=True)
                ok = hmac.compare_digest(token.strip().encode(), self._expected.encode())
            except (binascii.Error, ValueError):
                ok = False
        if ok:
            await self._app(scope, receive, send)
            return
        await send(
            {
                "type": "http.response.start",
                "status": 401,
                "headers": [
                    (b"www-authenticate", b'Basic realm="backbeat-sync dashboard", charset="UTF-8"'),
                    (b"content-type", b"text/plain; charset=utf-8"),
                ],
            }
        )
        await send({"type": "http.response.body", "body": b"authentication required\n"})


class _Source:
    """The subscriber: beat frames and every agent's status claims of one cluster, into the state."""

    def __init__(self, config: BackbeatConfig, state: DashboardState) -> None:
        self._config = config
        self._state = state
        self.subjects = (
            config.beat_subject_for(),
            config.status_subject.format(cluster_id=config.cluster_id, agent_id="*"),
        )
        self._stops: list[Callable[[], None]] = []
        self.connected = False

    def start(self) -> None:
        feed = self._state.feed
        if self._config.is_local:
            from ..transport.local import LocalBus

            url = urlsplit(self._config.nats_url.strip())
            bus = LocalBus.named(url.netloc + url.path.strip("/"))
            for subject in self.subjects:
                self._stops.append(bus.subscribe(subject, lambda _subject, data: feed(data)))
            self.connected = True
            return
        from ..transport.base import TransportEvent
        from ..transport.nats import NatsLink

        subjects = self.subjects
        source = self

        def report(event: TransportEvent, detail: str) -> None:
            if event in (TransportEvent.CONNECTED, TransportEvent.RECONNECTED):
                source.connected = True
            elif event in (TransportEvent.DISCONNECTED, TransportEvent.CLOSED):
                source.connected = False
            if event in (TransportEvent.DISCONNECTED, TransportEvent.ERROR, TransportEvent.RECONNECTED):
                logger.warning(f"dashboard: {detail}")

        class DashboardLink(NatsLink):
            async def _on_connect(self, nc: Any) -> None:
                async def handler(msg: Any) -> None:
                    feed(msg.data)

                for subject in subjects:
                    await nc.subscribe(subject, cb=handler)

        link = DashboardLink(
            self._config, report, client_name="backbeat-sync-dashboard", thread_name="backbeat-dashboard-nats"
        )
        link.start()
        self.connected = True
        self._stops.append(lambda: link.stop(1.0))

    def stop(self) -> None:
        while self._stops:
            self._stops.pop()()
        self.connected = False


class Dashboard:
    """A live web page of one cluster: beat, agents, operations against their budgets.

    Needs the ``dashboard`` extra (Starlette and uvicorn). The server runs on a
    thread of its own; the page updates itself from a server-sent event stream.

    Args:
        config: where to listen for the cluster (``nats_url``, ``cluster_id``, subjects, auth, TLS).
        listen: ``HOST:PORT`` to serve on; port 0 picks a free one (see :attr:`port`).
        auth: ``(user, password)`` for HTTP basic auth on every request, or None.
        warn_at: share of the budget from which an operation's bar turns red.

    Raises:
        ConfigError: ``listen`` is not ``HOST:PORT``.

    Example:
        >>> from backbeat_sync import BackbeatConfig
        >>> from backbeat_sync.dashboard import Dashboard
        >>> with Dashboard(BackbeatConfig(nats_url="local://doc-dash"), listen="127.0.0.1:0") as d:
        ...     d.url.startswith("http://127.0.0.1:")
        True
    """

    def __init__(
        self,
        config: BackbeatConfig,
        *,
        listen: str = "127.0.0.1:8080",
        auth: tuple[str, str] | None = None,
        warn_at: float = 0.75,
    ) -> None:
        self.config = config
        self.host, self._port = parse_listen(listen)
        self.auth = auth
        self.state = DashboardState(config.cluster_id, warn_at=warn_at)
        self._source = _Source(config, self.state)
        self._server: Any = None
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()

    @property
    def port(self) -> int:
        """The port served on (the one picked when ``listen`` asked for port 0)."""
        return self._port

    @property
    def url(self) -> str:
        """The page's address."""
        host = "127.0.0.1" if _is_wildcard(self.host) else self.host
        return f"http://{'[' + host + ']' if ':' in host else host}:{self._port}/"

    def app(self) -> ASGIApp:
        """The ASGI application (for tests, or to mount it in a server of your own)."""
        from starlette.applications import Starlette
        from starlette.concurrency import run_in_threadpool
        from starlette.requests import Request
        from starlette.responses import FileResponse, JSONResponse, Response, StreamingResponse
        from starlette.routing import Mount, Route
        from starlette.staticfiles import StaticFiles

        state = self.state
        stopping = self._stopping
        static_dir = Path(str(STATIC))

        def query(request: Request) -> dict[str, Any]:
            def number(name: str, default: int) -> int:
                try:
                    return max(1, min(int(request.query_params.get(name, default)), 1000))
                except ValueError:
                    return default

            return {
                "limit": number("limit", 100),
                "finished_limit": number("finished", 30),
                "filter_text": request.query_params.get("filter", "")[:200],
            }

        async def index(request: Request) -> Response:
            return FileResponse(static_dir / "index.html", headers=SECURITY_HEADERS)

        async def snapshot(request: Request) -> Response:
            snap = await run_in_threadpool(partial(state.snapshot, **query(request)))
            snap["source_connected"] = self._source.connected
            return JSONResponse(snap, headers=SECURITY_HEADERS)

        async def events(request: Request) -> Response:
            args = query(request)

            async def stream() -> Any:
                last = -1
                quiet_since = time.monotonic()
                yield "retry: 2000\n\n"
                while not stopping.is_set():
                    version = state.version
                    if version != last:
                        last = version
                        snap = await run_in_threadpool(partial(state.snapshot, **args))
                        snap["source_connected"] = self._source.connected
                        # json.dumps escapes newlines, so no field can end the event early
                        yield f"event: snapshot\ndata: {json.dumps(snap)}\n\n"
                        quiet_since = time.monotonic()
                    elif time.monotonic() - quiet_since > KEEPALIVE:
                        yield ": keep-alive\n\n"
                        quiet_since = time.monotonic()
                    await asyncio.sleep(STREAM_INTERVAL)

            return StreamingResponse(
                stream(),
                media_type="text/event-stream",
                headers={**SECURITY_HEADERS, "x-accel-buffering": "no"},
            )

        app: ASGIApp = Starlette(
            routes=[
                Route("/", index),
                Route("/api/snapshot", snapshot),
                Route("/events", events),
                Mount("/static", StaticFiles(directory=static_dir), name="static"),
            ]
        )
        if self.auth is not None:
            app = _BasicAuth(app, *self.auth)
        return app

    def start(self) -> Dashboard:
        """Subscribe to the cluster and start serving. Returns self.

        Raises:
            OSError: the address cannot be bound (in use, not this machine's).
            ImportError: the ``dashboard`` extra is not installed.
        """
        import uvicorn

        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((self.host, self._port))
            sock.listen(128)
        except OSError:
            sock.close()
            raise
        self._port = sock.getsockname()[1]
        if _is_wildcard(self.host):
            logger.warning(
                f"dashboard: listening on every interface ({self.host}:{self._port}):"
                " anyone who can reach this machine can open it" + ("" if self.auth else "; consider --auth")
            )
        self._source.start()
        config = uvicorn.Config(
            self.app(),
            log_config=None,
            access_log=False,
            lifespan="off",
            timeout_graceful_shutdown=2,
        )
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(
            target=self._server.run, kwargs={"sockets": [sock]}, name="backbeat-dashboard", daemon=True
        )
        self._thread.start()
        deadline = time.monotonic() + 30.0
        while not self._server.started and self._thread.is_alive() and time.monotonic() < deadline:
            time.sleep(0.01)
        if not self._server.started:
            self.stop()
            raise OSError(f"the dashboard server did not start on {self.host}:{self._port}")
        logger.info(f"dashboard: serving {self.url} for cluster {self.config.cluster_id}")
        return self

    def stop(self) -> None:
        """Stop serving (open streams end) and unsubscribe. Idempotent."""
        self._stopping.set()
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(10.0)
            self._thread = None
        self._source.stop()

    def __enter__(self) -> Dashboard:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
