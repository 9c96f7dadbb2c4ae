"""Health: one schema of every ``get_health()`` key, the counters behind it, and ``get_health``.

:data:`HEALTH_FIELDS` is the one list of health keys: each with its Python type,
its help text, and how ``backbeat_sync.metrics`` exports it (a counter, a gauge,
or not directly). :class:`Health` (a ``TypedDict``) is the same list for type
checkers (a test keeps the two equal), and ``metrics.COUNTERS``/``GAUGES`` are
built from it. The integration's own counters and its ``errors`` live in one
:class:`HealthCounters`, under one lock, whichever thread counts.
"""

from __future__ import annotations

import threading
from collections import deque
from typing import TYPE_CHECKING, Any, Final, Literal, TypedDict

import attrs

from .._time import format_rfc3339
from .base import IntegrationCore

if TYPE_CHECKING:
    from .._logging import RateLimitedLog

#: The stdlib logger its lines go to (``log_to_stdlib``): the package's, as before the split.
LOG_NAME: Final = "backbeat_sync.integration"
__all__ = [
    "ERRORS_KEPT",
    "HEALTH_FIELDS",
    "Health",
    "HealthCounters",
    "HealthField",
    "HealthMixin",
]

#: Messages kept in health ``errors`` (the newest).
ERRORS_KEPT: Final = 10

Kind = Literal["counter", "gauge", "field"]


@attrs.frozen
class HealthField:
    """One health key.

    Attributes:
        key: the ``get_health()`` key.
        type: its Python type (``None`` may be one of a union's; see :class:`Health`).
        help: what it means (the Prometheus help text when exported).
        kind: ``"counter"`` (only grows), ``"gauge"``, or ``"field"`` (not exported as a
            plain series: text, lists, or exported another way by ``metrics``).
        metric: the Prometheus name (counters without ``_total``), or None.
        counted: kept by :class:`HealthCounters` (``Integration.count``), not read elsewhere.
        lazy: absent from ``get_health()`` until it first counts something.
    """

    key: str
    type: Any
    help: str
    kind: Kind = "field"
    metric: str | None = None
    counted: bool = False
    lazy: bool = False


def _c(
    key: str, help: str, metric: str | None = None, *, counted: bool = False, lazy: bool = False
) -> HealthField:
    return HealthField(key, int, help, "counter", metric or f"backbeat_{key}", counted, lazy)


def _g(key: str, type: Any, help: str, metric: str | None = None) -> HealthField:
    return HealthField(key, type, help, "gauge", metric or f"backbeat_{key}")


def _x(key: str, help: str) -> HealthField:
    return HealthField(key, int, help, "counter", None, counted=True, lazy=True)


def _f(key: str, type: Any, help: str) -> HealthField:
    return HealthField(key, type, help)


#: Every health key, in ``get_health()`` order: PROTOCOL.md's first, then the rest.
HEALTH_FIELDS: Final[tuple[HealthField, ...]] = (
    _f("enabled", bool, "Whether the integration is enabled (always true: a disabled one cannot be made)."),
    _g("started", bool, "1 while the integration runs, else 0."),
    _g("connected", bool, "1 while the transport can publish, else 0."),
    _g("current_beat", int, "Index of the last beat frame accepted."),
    _g("current_tempo", float, "Tempo announced by the pulse, in beats per minute.", "backbeat_tempo_bpm"),
    _g(
        "measured_bpm",
        float,
        "Tempo measured from the arrival of the last 8 beat frames, in beats per minute (0 until 2).",
        "backbeat_measured_tempo_bpm",
    ),
    _f("tempo_drift", str, "Tempo drift class (PROTOCOL.md): unknown, acceptable, warning or critical."),
    _c("reconnect_count", "Times the NATS connection was re-established.", "backbeat_reconnects"),
    _g("active_operations", int, "Operations not yet completed or failed."),
    _g("local_degradation", bool, "1 while the agent is degraded (PROTOCOL.md)."),
    _f("errors", list[str], f"The last {ERRORS_KEPT} errors recorded, oldest first."),
    _f("node_id", str, "This agent's P2P node id."),
    _f("cluster_id", str, "The cluster this agent is in."),
    _f("agent_id", str, "This agent's id."),
    _f("beat_position", float, "The beat position now, extrapolated from the last frame."),
    _c("beats_received", "Beat frames accepted by the beat clock."),
    _c("missed_beats", "Beats skipped over (gaps in the beat index)."),
    _c("stale_frames", "Beat frames ignored because their index was behind."),
    _c("duplicate_frames", "Beat frames ignored because their index repeated."),
    _c("pulse_resets", "Times the agent resynchronised to a restarted pulse."),
    _c("claims_published", "Status claims handed to the transport's wire."),
    _c("claims_dropped", "Status claims dropped (outbox full while disconnected, or refused by the server)."),
    _c("claims_coalesced", "Intermediate status claims replaced by a later claim of the same operation."),
    _f(
        "claims_coalesced_by_priority",
        dict[str, int],
        "claims_coalesced by the priority of the replacing claim: critical, high, normal, low.",
    ),
    _g("claims_queued", int, "Status claims waiting in the outbox."),
    _f("blocked_callback", str | None, "The user callback running for more than a beat, if any."),
    _f("beat_handling_seconds", float, "How long the last beat's handling took (see the histogram)."),
    _g(
        "budgets_below_history",
        int,
        "(operation type, fixed budget) pairs found below the p50 of their type's history.",
    ),
    _c("claims_emitted", "Status claims emitted (operations and health).", counted=True),
    _c(
        "rejected_frames",
        "Beat frames rejected as malformed (not JSON, bad fields, too large).",
        counted=True,
    ),
    _c("foreign_frames", "Beat frames for another cluster, ignored.", counted=True),
    _c(
        "unsigned_frames",
        "Beat frames dropped for carrying no signature (trusted_pulse_keys set).",
        counted=True,
    ),
    _c("forged_frames", "Beat frames dropped for a signature no trusted pulse key verifies.", counted=True),
    _c("callback_errors", "User callbacks that raised.", counted=True),
    _c("callbacks_dropped", "User callback calls dropped (queue full).", counted=True),
    _c("budget_warnings", "Beat budget warnings (each warn_at fraction reached).", counted=True, lazy=True),
    # Counters exported together as backbeat_budget_exhaustions_total{mode, outcome}
    # (metrics.EXHAUSTION_KEYS), not one series each: no metric name of their own.
    _x("budget_exhausted_interrupt_interrupted", "Budgets interrupted on time."),
    _x("budget_exhausted_interrupt_late", "Budgets whose exception landed late (the code was blocked in C)."),
    _x("budget_exhausted_raise_after", "raise_after budgets that ran out."),
    _x("budget_exhausted_warn", "warn budgets that ran out."),
)


class _HealthRequired(TypedDict):
    enabled: bool
    started: bool
    connected: bool
    current_beat: int
    current_tempo: float
    measured_bpm: float
    tempo_drift: str
    reconnect_count: int
    active_operations: int
    local_degradation: bool
    errors: list[str]
    node_id: str
    cluster_id: str
    agent_id: str
    beat_position: float
    beats_received: int
    missed_beats: int
    stale_frames: int
    duplicate_frames: int
    pulse_resets: int
    claims_published: int
    claims_dropped: int
    claims_coalesced: int
    claims_coalesced_by_priority: dict[str, int]
    claims_queued: int
    blocked_callback: str | None
    beat_handling_seconds: float
    budgets_below_history: int
    claims_emitted: int
    rejected_frames: int
    foreign_frames: int
    unsigned_frames: int
    forged_frames: int
    callback_errors: int
    callbacks_dropped: int


class Health(_HealthRequired, total=False):
    """What ``Integration.get_health()`` returns: :data:`HEALTH_FIELDS` as a ``TypedDict``.

    The budget counters (``budget_*``) appear once they count something. Keys
    counted with ``Integration.count`` that the schema does not name are added too
    (a ``dict`` at run time).
    """

    budget_warnings: int
    budget_exhausted_interrupt_interrupted: int
    budget_exhausted_interrupt_late: int
    budget_exhausted_raise_after: int
    budget_exhausted_warn: int


class Tally:
    """One health ``errors`` entry standing for every rejection of one kind (a junk flood).

    ``errors`` keeps ten entries; ten thousand malformed frames would push every real
    error out. So rejections of one kind (one counter) share an entry, kept newest,
    that reads ``rejected beat frame: <last reason> (12,431 malformed frames since
    <time>; also: <other recent reasons>)``.
    """

    __slots__ = ("count", "last", "noun", "prefix", "reasons", "since")

    def __init__(self, prefix: str, noun: str, since: str) -> None:
        self.prefix = prefix
        self.noun = noun
        self.since = since
        self.count = 0
        self.last = ""
        self.reasons: list[str] = []  # the last few distinct reasons, newest last

    def add(self, reason: str) -> None:
        """One more rejection, for ``reason``."""
        self.count += 1
        if reason != self.last:
            self.last = reason
            reasons = self.reasons
            if reason in reasons:
                reasons.remove(reason)
            reasons.append(reason)
            if len(reasons) > TALLY_REASONS:
                del reasons[0]

    def __str__(self) -> str:
        noun = self.noun if self.count == 1 else self.noun + "s"
        text = f"{self.prefix}: {self.last} ({self.count:,} {noun} since {self.since}"
        others = self.reasons[:-1]
        if others:
            text += "; also: " + "; ".join(reversed(others))
        return text + ")"


#: Distinct recent reasons an aggregated errors entry names.
TALLY_REASONS: Final = 3


class HealthCounters:
    """The integration's counters and its ``errors``, under one lock (any thread writes).

    The lock is a leaf: nothing else is acquired while it is held, so any code,
    holding any other lock (the registry's, the callback queue's), may count.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: dict[str, int] = {f.key: 0 for f in HEALTH_FIELDS if f.counted and not f.lazy}
        self._errors: deque[str | Tally] = deque(maxlen=ERRORS_KEPT)
        self._tallies: dict[str, Tally] = {}
        #: The beat at which the last error was recorded (None: none yet).
        self.last_error_beat: int | None = None

    def add(self, key: str, n: int = 1) -> None:
        """Add ``n`` to ``key`` (a key the schema does not name starts at 0)."""
        with self._lock:
            self._counts[key] = self._counts.get(key, 0) + n

    def record(self, message: str, beat: int) -> None:
        """Keep ``message`` in ``errors`` (the newest :data:`ERRORS_KEPT`), seen at ``beat``."""
        with self._lock:
            self._errors.append(message)
            self.last_error_beat = beat

    def reject(self, counter: str, prefix: str, noun: str, reason: str, beat: int, now: str) -> None:
        """Count a rejection under ``counter``; its ``errors`` entry is the counter's one :class:`Tally`.

        The tally moves to the newest place (it is the most recent error); if ten
        newer errors pushed it out, it comes back, its count running on.

        Args:
            counter: the health counter (``rejected_frames``, ``unsigned_frames``, ...).
            prefix: how the entry starts (``rejected beat frame``).
            noun: what one rejection is (``malformed frame``).
            reason: why this one was rejected.
            beat: the current beat.
            now: the time, RFC 3339 (the tally's "since", on its first rejection).
        """
        with self._lock:
            self._counts[counter] = self._counts.get(counter, 0) + 1
            tally = self._tallies.get(counter)
            if tally is None:
                tally = self._tallies[counter] = Tally(prefix, noun, now)
            tally.add(reason)
            errors = self._errors
            if not errors or errors[-1] is not tally:
                try:
                    errors.remove(tally)
                except ValueError:  # pushed out by ten newer errors (or the first one)
                    pass
                errors.append(tally)
            self.last_error_beat = beat

    def errors(self) -> list[str]:
        """A copy of ``errors``, oldest first."""
        with self._lock:
            return [str(e) for e in self._errors]

    def counts(self) -> dict[str, int]:
        """A copy of every counter."""
        with self._lock:
            return dict(self._counts)


class HealthMixin(IntegrationCore):
    """``Integration``'s health: ``get_health``, ``record_error``, ``count``."""

    _health: HealthCounters
    _ratelog: RateLimitedLog

    def get_health(self) -> Health:
        """The agent's health: every key of PROTOCOL.md, and a few more counters.

        Returns:
            A :class:`~backbeat_sync.integration.health.Health` dict. PROTOCOL.md's keys:
            ``enabled``, ``started``, ``connected``, ``current_beat``, ``current_tempo``,
            ``measured_bpm``, ``tempo_drift``, ``reconnect_count``, ``active_operations``,
            ``local_degradation``, ``errors``, ``node_id``; then ``cluster_id``,
            ``agent_id``, ``beat_position``, ``beats_received``, ``missed_beats``,
            ``stale_frames``, ``duplicate_frames``, ``pulse_resets``,
            ``claims_published``, ``claims_dropped``, ``claims_coalesced``,
            ``claims_coalesced_by_priority`` (a dict: critical, high, normal, low),
            ``claims_queued``, ``blocked_callback``, ``beat_handling_seconds``,
            ``budgets_below_history``, ``claims_emitted``, ``rejected_frames``, ``foreign_frames``,
            ``unsigned_frames``, ``forged_frames``, ``callback_errors``,
            ``callbacks_dropped``; and, once they count something, ``budget_warnings``,
            ``budget_exhausted_interrupt_interrupted``, ``budget_exhausted_interrupt_late``,
            ``budget_exhausted_raise_after``, ``budget_exhausted_warn``. What each
            means: :data:`HEALTH_FIELDS`.

        Raises:
            ForkedIntegration: inherited across ``os.fork()`` (it is the parent's).
        """
        self.refuse_if_forked()
        snap = self._clock.snapshot()
        started = self.running
        transport = self._transport
        connected = self._connected()
        tstats = transport.stats() if transport is not None else {}
        health: dict[str, Any] = {
            "enabled": self._config.enabled,
            "started": started,
            "connected": connected,
            "current_beat": snap.current_beat,
            "current_tempo": snap.tempo_bpm,
            "measured_bpm": round(snap.measured_bpm, 3),
            "tempo_drift": snap.tempo_drift,
            "reconnect_count": transport.reconnect_count if transport is not None else 0,
            "active_operations": self._registry.active_count,
            "local_degradation": self._degraded(snap.seconds_since_frame, snap.missed_in_current_bar)
            if started
            else False,
            "errors": self._health.errors(),
            "node_id": self._node_id,
            "cluster_id": self._config.cluster_id,
            "agent_id": self._config.agent_id,
            "beat_position": self._clock.position(),
            "beats_received": snap.beats_received,
            "missed_beats": snap.missed_beats,
            "stale_frames": snap.stale_frames,
            "duplicate_frames": snap.duplicate_frames,
            "pulse_resets": snap.resets,
            "claims_published": tstats.get("claims_published", 0),
            "claims_dropped": tstats.get("claims_dropped", 0),
            "claims_coalesced": tstats.get("claims_coalesced", 0),
            "claims_coalesced_by_priority": {
                p: tstats.get(f"claims_coalesced_{p}", 0) for p in ("critical", "high", "normal", "low")
            },
            "claims_queued": tstats.get("claims_queued", 0),
            "blocked_callback": self._blocked_callback(),
            "beat_handling_seconds": self._last_handling,
            "budgets_below_history": self.history.budgets_below_history,
        }
        health.update(self._health.counts())
        health["claims_emitted"] += self._registry.unheard
        return health  # type: ignore[return-value]  # a dict with Health's keys (a test checks)

    def _connected(self) -> bool:
        transport = self._transport
        return bool(self.running and transport is not None and transport.connected)

    def _degraded(self, since_frame: float, missed_in_bar: bool) -> bool:
        spb = self._clock.beat_duration
        return since_frame > 2 * spb or missed_in_bar or self._last_handling > 0.5 * spb

    def record_error(self, message: str) -> None:
        """Add ``message`` to health ``errors`` (the last 10 are kept) and log it."""
        self._health.record(message, self._clock.current_beat)
        self._ratelog.warn(message.split(":", 1)[0], f"BACKBEAT error: {message}")

    def count(self, key: str, n: int = 1) -> None:
        """Add ``n`` to the health counter ``key`` (created at 0 on first use)."""
        self._health.add(key, n)

    def _record_rejection(self, counter: str, prefix: str, noun: str, reason: str) -> None:
        """Count a rejected message and record it, aggregated per counter (see :class:`Tally`).

        The log gets the first at once and then one line per burst, as :meth:`record_error`.
        """
        now = format_rfc3339(self._time.time())
        self._health.reject(counter, prefix, noun, reason, self._clock.current_beat, now)
        self._ratelog.warn(counter, f"BACKBEAT error: {prefix}: {reason}")
