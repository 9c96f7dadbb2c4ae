"""Prometheus metrics for an :class:`~backbeat_sync.Integration` (the optional ``prometheus`` extra).

Counters and gauges are read from :meth:`Integration.get_health` when the
registry is scraped, so nothing is counted twice and an idle agent costs
nothing. Two histograms are fed as things happen: ``backbeat_beat_handling_seconds``
after each beat the integration handles, ``backbeat_operation_beats_used`` as its
budget history takes in finished runs. Every series carries the labels ``cluster_id``
and ``agent_id``, so several integrations can share one registry.

Example:
    >>> from prometheus_client import CollectorRegistry, generate_latest
    >>> from backbeat_sync import BackbeatConfig, Integration
    >>> from backbeat_sync.metrics import instrument
    >>> registry = CollectorRegistry()
    >>> cfg = BackbeatConfig(cluster_id="dev", agent_id="doc", nats_url="local://metrics-doc")
    >>> with Integration(cfg, node_id="n1") as integration:
    ...     remove = instrument(integration, registry=registry)
    ...     text = generate_latest(registry).decode()
    ...     remove()
    >>> "backbeat_active_operations" in text
    True

``prometheus_client`` is imported only when a function of this module is
called; without it they raise :class:`ImportError` saying how to install it.
"""

from __future__ import annotations

import importlib
import threading
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from types import ModuleType, TracebackType
from typing import TYPE_CHECKING, Any, ClassVar, Final

from .errors import InvalidArgument
from .integration.health import HEALTH_FIELDS

if TYPE_CHECKING:
    from .integration import Integration

__all__ = [
    "BEATS_USED_BUCKETS",
    "BEAT_HANDLING_BUCKETS",
    "COUNTERS",
    "DRIFT_STATES",
    "EXHAUSTION_KEYS",
    "GAUGES",
    "BackbeatMetrics",
    "MetricsServer",
    "instrument",
    "liveness",
    "readiness",
    "serve_metrics",
]

#: Histogram buckets (seconds) for beat handling: sub-millisecond to a few seconds.
BEAT_HANDLING_BUCKETS: Final = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
)

#: Histogram buckets (beats) for ``backbeat_operation_beats_used``: a quarter beat to 100 beats.
BEATS_USED_BUCKETS: Final = (
    0.25,
    0.5,
    1.0,
    1.5,
    2.0,
    3.0,
    4.0,
    5.0,
    7.5,
    10.0,
    15.0,
    20.0,
    30.0,
    50.0,
    100.0,
)

#: Health key -> (counter name without ``_total``, help text): the counters of the one health
#: schema (``integration.health.HEALTH_FIELDS``), budget counters aside (exported below).
COUNTERS: Final[dict[str, tuple[str, str]]] = {
    f.key: (f.metric, f.help) for f in HEALTH_FIELDS if f.kind == "counter" and f.metric is not None
}

#: (mode, outcome) of ``backbeat_budget_exhaustions_total`` -> the budget engine's health key.
#: ``interrupted``: the exception landed on time; ``late``: the code was blocked in C and it
#: landed when the call returned; ``ran_on``: the mode lets the code run to its end.
EXHAUSTION_KEYS: Final[dict[tuple[str, str], str]] = {
    ("interrupt", "interrupted"): "budget_exhausted_interrupt_interrupted",
    ("interrupt", "late"): "budget_exhausted_interrupt_late",
    ("raise_after", "ran_on"): "budget_exhausted_raise_after",
    ("warn", "ran_on"): "budget_exhausted_warn",
}
_KNOWN_BUDGET_KEYS: Final = frozenset({"budget_warnings", *EXHAUSTION_KEYS.values()})

#: Health key -> (gauge name, help text), from the same schema. Booleans are exported as 0 or 1.
GAUGES: Final[dict[str, tuple[str, str]]] = {
    f.key: (f.metric, f.help) for f in HEALTH_FIELDS if f.kind == "gauge" and f.metric is not None
}

#: The values of health ``tempo_drift``; ``backbeat_tempo_drift{drift=...}`` is 1 for the current one.
DRIFT_STATES: Final = ("unknown", "acceptable", "warning", "critical")

_LABELS: Final = ("cluster_id", "agent_id")
_INSTALL_HINT: Final = (
    "backbeat_sync.metrics needs prometheus-client: "
    "python -m pip install 'backbeat_sync[prometheus]' (or prometheus-client)"
)


def _prometheus() -> ModuleType:
    """Import prometheus_client, or raise ImportError saying how to install it."""
    try:
        return importlib.import_module("prometheus_client")
    except ImportError as exc:
        raise ImportError(_INSTALL_HINT) from exc


def _budget_name(key: str) -> str:
    name = "backbeat_" + key
    return name[: -len("_total")] if name.endswith("_total") else name


class BackbeatMetrics:
    """The backbeat_sync metrics of one Prometheus registry.

    A collector that reads ``get_health()`` of each instrumented integration at
    scrape time, plus the ``backbeat_beat_handling_seconds`` histogram. Get the
    one of a registry with :meth:`for_registry` (or just call :func:`instrument`).

    Health keys exported: see :data:`COUNTERS` and :data:`GAUGES`; the budget
    engine's exhaustion counts become ``backbeat_budget_exhaustions_total{mode,
    outcome}`` (:data:`EXHAUSTION_KEYS`), and any other integer health key
    starting ``budget_`` the counter ``backbeat_<key>_total``; ``tempo_drift`` becomes
    ``backbeat_tempo_drift{drift=...}`` (1 for the current class, 0 for the
    others) and, once measured, ``backbeat_tempo_drift_ratio``.

    Args:
        registry: the ``prometheus_client`` registry to register on.
    """

    _instances: ClassVar[weakref.WeakKeyDictionary[Any, BackbeatMetrics]] = weakref.WeakKeyDictionary()
    _instances_lock: ClassVar[threading.Lock] = threading.Lock()

    def __init__(self, registry: Any) -> None:
        pc = _prometheus()
        self._pc = pc
        self._core = importlib.import_module("prometheus_client.core")
        self._lock = threading.Lock()
        # key (cluster_id, agent_id) -> (integration, remove-listener function)
        self._members: dict[tuple[str, str], tuple[Integration, Callable[[], None]]] = {}
        self.beat_handling = pc.Histogram(
            "backbeat_beat_handling_seconds",
            "Time the agent spent handling each beat (claims, health, clean-up), in seconds.",
            _LABELS,
            buckets=BEAT_HANDLING_BUCKETS,
            registry=registry,
        )
        self.beats_used = pc.Histogram(
            "backbeat_operation_beats_used",
            "Beats each finished budgeted run used, by operation type and outcome (done, failed, exceeded).",
            [*_LABELS, "operation_type", "outcome"],
            buckets=BEATS_USED_BUCKETS,
            registry=registry,
        )
        registry.register(self)

    @classmethod
    def for_registry(cls, registry: Any = None) -> BackbeatMetrics:
        """The metrics of ``registry`` (default: ``prometheus_client.REGISTRY``), made on first use.

        Raises:
            ImportError: prometheus-client is not installed.
        """
        if registry is None:
            registry = _prometheus().REGISTRY
        with cls._instances_lock:
            metrics = cls._instances.get(registry)
            if metrics is None:
                metrics = cls._instances[registry] = cls(registry)
            return metrics

    def add(self, integration: Integration) -> Callable[[], None]:
        """Export ``integration``'s metrics on this registry.

        An integration that is not running (never started, or stopped) is replaced
        by a new one with the same cluster and agent id, so a restarted agent can
        be instrumented again without removing the old one first.

        Returns:
            A function that stops exporting them (idempotent).

        Raises:
            InvalidArgument: another *running* integration with the same cluster and
                agent id is already exported here (their series would collide).
        """
        key = (integration.config.cluster_id, integration.config.agent_id)
        with self._lock:
            current = self._members.get(key)
            if current is not None and current[0] is not integration:
                if current[0].running:
                    raise InvalidArgument(
                        "integration",
                        integration,
                        f"a running integration for cluster_id={key[0]!r} agent_id={key[1]!r}"
                        " already exports metrics on this registry",
                    )
                current[1]()
                current = None
            if current is None:
                child = self.beat_handling.labels(*key)
                unlisten = integration.on_beat_handled(lambda _frame, seconds: child.observe(seconds))
                used = self.beats_used
                seen: set[tuple[str, str]] = set()

                def observe(sample: Any) -> None:
                    seen.add((sample.operation_type, sample.outcome))
                    used.labels(*key, sample.operation_type, sample.outcome).observe(sample.beats_used)

                unrecord = integration.history.add_listener(observe)

                def unlisten_all() -> None:
                    unlisten()
                    unrecord()
                    for labels in list(seen):
                        try:
                            used.remove(*key, *labels)
                        except KeyError:
                            pass

                integration.registry.counting = True  # operations by type, from now on
                self._members[key] = (integration, unlisten_all)
        return lambda: self._remove(key, integration)

    def _remove(self, key: tuple[str, str], integration: Integration) -> None:
        with self._lock:
            current = self._members.get(key)
            if current is None or current[0] is not integration:
                return
            del self._members[key]
        current[1]()
        try:
            self.beat_handling.remove(*key)
        except KeyError:
            pass

    def _live(self) -> list[tuple[tuple[str, str], Integration]]:
        with self._lock:
            return [(key, integration) for key, (integration, _) in self._members.items()]

    def describe(self) -> Iterator[Any]:
        """The fixed metric families (for the registry's duplicate check); budget ones are dynamic."""
        yield from self._families([])
        yield self._suggested([])
        yield from self._operation_families([])

    def collect(self) -> Iterator[Any]:
        """Read every instrumented integration's health and yield the metric families."""
        live = self._live()
        samples = [(key, integration.get_health()) for key, integration in live]
        yield from self._families(samples)
        yield self._suggested(live)
        yield from self._operation_families(live)

    def _suggested(self, live: list[tuple[tuple[str, str], Integration]]) -> Any:
        """``backbeat_budget_suggested_beats{operation_type}``: what ``"auto"`` would give each type now."""
        gauge = self._core.GaugeMetricFamily(
            "backbeat_budget_suggested_beats",
            'The budget "auto" would give a run of this operation type now, in beats.',
            labels=[*_LABELS, "operation_type"],
        )
        for key, integration in live:
            history = integration.history
            for typ in history.types():
                try:
                    beats = history.suggest(typ)
                except InvalidArgument:  # no profile and too little history: no suggestion yet
                    continue
                gauge.add_metric([*key, typ], beats)
        return gauge

    def _operation_families(self, live: list[tuple[tuple[str, str], Integration]]) -> Iterator[Any]:
        """Operations started and finished, and budget exhaustions, by ``operation_type``.

        The label values are the operation types (the seed's four, ``budget`` for a
        ``@beat_budget`` call, and up to ``MAX_COUNTED_TYPES`` user types, then
        ``other``): never operation ids, so the series stay bounded.
        """
        core = self._core
        labels = [*_LABELS, "operation_type"]
        started = core.CounterMetricFamily(
            "backbeat_operations_started",
            "Operations registered (start_p2p_operation, track_operation, budget calls that reached"
            " the registry), by operation type.",
            labels=labels,
        )
        finished = core.CounterMetricFamily(
            "backbeat_operations_finished",
            "Operations finished, by operation type and outcome (completed, failed).",
            labels=[*labels, "outcome"],
        )
        exhausted = core.CounterMetricFamily(
            "backbeat_operation_budget_exhaustions",
            "Beat budgets that ran out, by operation type, on_exhaust mode and outcome"
            " (interrupted, late, ran_on).",
            labels=[*labels, "mode", "outcome"],
        )
        for lv, integration in live:
            counts = integration.registry.operation_counts()
            for op_type, n in sorted(counts.started.items()):
                started.add_metric([*lv, op_type], float(n))
            for (op_type, outcome), n in sorted(counts.finished.items()):
                finished.add_metric([*lv, op_type, outcome], float(n))
            for (op_type, mode, outcome), n in sorted(counts.exhausted.items()):
                exhausted.add_metric([*lv, op_type, mode, outcome], float(n))
        yield started
        yield finished
        yield exhausted

    def _families(self, samples: Sequence[tuple[tuple[str, str], Mapping[str, Any]]]) -> Iterator[Any]:
        core = self._core
        labels = list(_LABELS)
        for key, (name, doc) in COUNTERS.items():
            counter = core.CounterMetricFamily(name, doc, labels=labels)
            for lv, health in samples:
                counter.add_metric(list(lv), float(health.get(key, 0)))
            yield counter
        for key, (name, doc) in GAUGES.items():
            gauge = core.GaugeMetricFamily(name, doc, labels=labels)
            for lv, health in samples:
                gauge.add_metric(list(lv), float(health.get(key, 0)))
            yield gauge
        duration = core.GaugeMetricFamily(
            "backbeat_beat_duration_seconds", "Seconds per beat at the announced tempo.", labels=labels
        )
        drift = core.GaugeMetricFamily(
            "backbeat_tempo_drift",
            "Tempo drift class (PROTOCOL.md): 1 for the current class, 0 for the others.",
            labels=[*labels, "drift"],
        )
        ratio = core.GaugeMetricFamily(
            "backbeat_tempo_drift_ratio",
            "|measured - announced| / announced tempo; absent until two beats were measured.",
            labels=labels,
        )
        info = core.InfoMetricFamily("backbeat_agent", "The agent behind these series.", labels=labels)
        for lv, health in samples:
            tempo = float(health.get("current_tempo", 0.0))
            measured = float(health.get("measured_bpm", 0.0))
            if tempo > 0:
                duration.add_metric(list(lv), 60.0 / tempo)
                if measured > 0:
                    ratio.add_metric(list(lv), abs(measured - tempo) / tempo)
            state = str(health.get("tempo_drift", "unknown"))
            for name in DRIFT_STATES:
                drift.add_metric([*lv, name], 1.0 if name == state else 0.0)
            info.add_metric(list(lv), {"node_id": str(health.get("node_id", ""))})
        yield duration
        yield drift
        yield ratio
        yield info
        exhaustions = core.CounterMetricFamily(
            "backbeat_budget_exhaustions",
            "Beat budgets that ran out, by on_exhaust mode and outcome (interrupted, late, ran_on).",
            labels=[*labels, "mode", "outcome"],
        )
        for lv, health in samples:
            for (mode, outcome), key in EXHAUSTION_KEYS.items():
                exhaustions.add_metric([*lv, mode, outcome], float(health.get(key, 0)))
        yield exhaustions
        budget_keys = sorted(
            {
                k
                for _, health in samples
                for k, v in health.items()
                if k.startswith("budget_")
                and k not in _KNOWN_BUDGET_KEYS
                and isinstance(v, int)
                and not isinstance(v, bool)
            }
        )
        for key in budget_keys:
            counter = core.CounterMetricFamily(
                _budget_name(key), f"Budget engine counter {key!r} (health key).", labels=labels
            )
            for lv, health in samples:
                if key in health:
                    counter.add_metric(list(lv), float(health[key]))
            yield counter


def instrument(integration: Integration, *, registry: Any = None) -> Callable[[], None]:
    """Export ``integration``'s metrics on a Prometheus registry (without serving them).

    Use it when your application already exposes a registry (its own, or
    ``prometheus_client.REGISTRY``, the default).

    Args:
        integration: the integration to export (started or not).
        registry: a ``prometheus_client.CollectorRegistry``; default the global ``REGISTRY``.

    Returns:
        A function that stops exporting this integration's series.

    Raises:
        ImportError: prometheus-client is not installed.
        InvalidArgument: another integration with the same cluster and agent id is
            already exported on that registry.
    """
    return BackbeatMetrics.for_registry(registry).add(integration)


class MetricsServer:
    """An HTTP endpoint serving a registry in the Prometheus text format; stop it with :meth:`close`.

    Returned by :func:`serve_metrics` and :meth:`Integration.serve_metrics`. Also a
    context manager (``with integration.serve_metrics(9464): ...``).

    Attributes:
        port: the TCP port it listens on (the real one when 0 was asked for).
        addr: the address it is bound to.
    """

    def __init__(self, httpd: Any, thread: threading.Thread, addr: str, remove: Callable[[], None]) -> None:
        self._httpd = httpd
        self._thread = thread
        self._remove = remove
        self._closed = False
        self._close_lock = threading.Lock()
        self.addr = addr
        self.port: int = int(httpd.server_address[1])

    @property
    def url(self) -> str:
        """``http://HOST:PORT/metrics`` (HOST is ``127.0.0.1`` when bound to every address)."""
        host = "127.0.0.1" if self.addr in ("", "0.0.0.0", "::") else self.addr
        if ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{self.port}/metrics"

    def close(self) -> None:
        """Stop serving, join the server thread and stop exporting the integration. Idempotent."""
        with self._close_lock:
            if self._closed:
                return
            self._closed = True
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join()
        self._remove()

    def __enter__(self) -> MetricsServer:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else "serving"
        return f"<MetricsServer {self.url} {state}>"


def serve_metrics(
    integration: Integration,
    port: int,
    *,
    addr: str = "0.0.0.0",
    registry: Any = None,
    max_age_beats: float = 2.0,
) -> MetricsServer:
    """Export ``integration``'s metrics and serve them over HTTP on ``port``, with health probes.

    Paths: ``/metrics`` (the registry, Prometheus text format); ``/healthz``
    (liveness: 200 while the integration runs and its beat loop is alive);
    ``/readyz`` (readiness: 200 when also connected and the last beat is at most
    ``max_age_beats`` beats old). A failing probe is 503 with a JSON body
    ``{"ok": false, "reason": ..., "detail": ...}`` (see :func:`readiness`);
    any other path is 404.

    Args:
        integration: the integration to export.
        port: TCP port (0 picks a free one; read it from ``.port``).
        addr: address to bind (``"0.0.0.0"``: every IPv4 interface, as prometheus_client does).
        registry: the registry to add the metrics to and to serve; default the
            global ``prometheus_client.REGISTRY`` (so your own default-registry
            metrics are served too).
        max_age_beats: ``/readyz`` fails when the last beat is older than this many beats.

    Returns:
        The running server; ``close()`` it (or use ``with``) to stop it. Stopping the
        integration does not stop the server.

    Raises:
        ImportError: prometheus-client is not installed.
        InvalidArgument: ``port`` is not an integer in 0..65535, or ``max_age_beats`` not > 0.
        OSError: the port cannot be bound (already in use, no permission).
    """
    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
        raise InvalidArgument("port", port, "must be an integer in 0..65535")
    if (
        isinstance(max_age_beats, bool)
        or not isinstance(max_age_beats, (int, float))
        or not max_age_beats > 0
    ):
        raise InvalidArgument("max_age_beats", max_age_beats, "must be a number > 0")
    pc = _prometheus()
    if registry is None:
        registry = pc.REGISTRY
    remove = instrument(integration, registry=registry)
    try:
        app = _Routes(pc.make_wsgi_app(registry), integration, float(max_age_beats))
        httpd, thread = _start_http(app, port, addr)
    except BaseException:
        remove()
        raise
    thread.name = "backbeat-metrics"  # prometheus_client names it Thread-N; ours carry the prefix
    return MetricsServer(httpd, thread, addr, remove)


# -- the HTTP endpoint: /metrics, /healthz, /readyz ------------------------------------------

#: Paths the metrics server answers; anything else is 404.
METRICS_PATH: Final = "/metrics"
LIVE_PATH: Final = "/healthz"
READY_PATH: Final = "/readyz"


def liveness(integration: Integration) -> tuple[bool, str | None, str]:
    """Whether ``integration`` is live: started, and its threads (the beat loop) still run.

    Returns:
        ``(ok, reason, detail)``; ``reason`` is None when ok, else ``not_running``
        or ``loop_stopped``.
    """
    if not integration.running:
        return False, "not_running", f"the integration is {integration.state.value}"
    if not integration.alive:
        return False, "loop_stopped", "a thread of the integration (beat handling, callbacks) ended"
    return True, None, "running"


def readiness(integration: Integration, max_age_beats: float = 2.0) -> tuple[bool, str | None, str]:
    """Whether ``integration`` is ready: live, connected, and a beat within ``max_age_beats`` beats.

    Returns:
        ``(ok, reason, detail)``; ``reason`` is None when ok, else
        ``not_running``, ``loop_stopped``, ``unreachable`` (not connected) or ``no_beat``
        (no beat frame yet, or the last one older than ``max_age_beats`` beats at the tempo).
    """
    live, reason, detail = liveness(integration)
    if not live:
        return live, reason, detail
    health = integration.get_health()
    if not health["connected"]:
        return False, "unreachable", f"not connected to {integration.config.masked_url}"
    snap = integration.clock.snapshot()
    limit = max_age_beats * 60.0 / snap.tempo_bpm
    if not snap.has_beat:
        return False, "no_beat", f"no beat frame yet on {integration.config.beat_subject_for()}"
    if snap.seconds_since_frame > limit:
        return (
            False,
            "no_beat",
            f"last beat {snap.seconds_since_frame:.3g} s ago, more than {max_age_beats:g} beats"
            f" ({limit:.3g} s at {snap.tempo_bpm:g} BPM)",
        )
    return True, None, f"beat {snap.current_beat} {snap.seconds_since_frame:.3g} s ago"


class _Routes:
    """The WSGI app: metrics on /metrics, JSON verdicts on /healthz and /readyz, 404 elsewhere."""

    def __init__(
        self, metrics_app: Callable[..., Any], integration: Integration, max_age_beats: float
    ) -> None:
        self._metrics = metrics_app
        self._integration = weakref.ref(integration)
        self._max_age = max_age_beats

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
        path = environ.get("PATH_INFO") or "/"
        if path == METRICS_PATH:
            return self._metrics(environ, start_response)
        integration = self._integration()
        if path in (LIVE_PATH, READY_PATH):
            verdict: tuple[bool, str | None, str]
            if integration is None:
                verdict = (False, "not_running", "the integration is gone")
            elif path == LIVE_PATH:
                verdict = liveness(integration)
            else:
                verdict = readiness(integration, self._max_age)
            ok, reason, detail = verdict
            body: dict[str, Any] = {"ok": ok, "reason": reason, "detail": detail}
            if path == READY_PATH:
                body["max_age_beats"] = self._max_age
            return _json(start_response, "200 OK" if ok else "503 Service Unavailable", body)
        missing = {"ok": False, "reason": "not_found", "detail": f"{path} is not served here"}
        missing["paths"] = [METRICS_PATH, LIVE_PATH, READY_PATH]
        return _json(start_response, "404 Not Found", missing)


def _json(start_response: Callable[..., Any], status: str, body: dict[str, Any]) -> list[bytes]:
    import json

    data = json.dumps(body, sort_keys=True).encode()
    start_response(
        status,
        [
            ("Content-Type", "application/json"),
            ("Content-Length", str(len(data))),
            ("Cache-Control", "no-store"),
        ],
    )
    return [data]


def _start_http(app: Callable[..., Any], port: int, addr: str) -> tuple[Any, threading.Thread]:
    """Serve ``app`` on a daemon thread (threaded, quiet), as prometheus_client's own server does."""
    import socket
    import socketserver
    from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

    family = socket.getaddrinfo(addr or None, port, type=socket.SOCK_STREAM)[0][0]

    class Server(socketserver.ThreadingMixIn, WSGIServer):
        # Request threads are joined by close() (each ends within the handler's timeout),
        # so no thread of the server outlives it.
        daemon_threads = False
        block_on_close = True
        address_family = family

    class QuietHandler(WSGIRequestHandler):
        timeout = 10.0  # a client that connects and sends nothing cannot hold close() longer

        def log_message(self, format: str, *args: Any) -> None:
            """No access log on stderr."""

    httpd = make_server(addr, port, app, server_class=Server, handler_class=QuietHandler)
    thread = threading.Thread(target=httpd.serve_forever, name="backbeat-metrics", daemon=True)
    thread.start()
    return httpd, thread
