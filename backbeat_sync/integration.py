"""The :class:`Integration`: an agent in a BACKBEAT cluster.

Threads (see ``docs/architecture.md``):

- application threads call the API; claims are built and *queued* under the
  registry lock, so one operation's claims leave in order; nothing waits on
  the network;
- the transport's thread (the pulse thread for ``local://``, the event-loop
  thread for NATS) parses each frame, feeds the clock and hands accepted
  beats to the beat thread;
- the beat thread (``backbeat-beat``) claims every active operation, emits
  the health claim, cleans up on downbeats and times itself;
- the callback thread (``backbeat-callbacks``) runs user callbacks, so a slow
  or failing callback never stalls beats or NATS.
"""

from __future__ import annotations

import enum
import os
import queue
import threading
from collections import deque
from collections.abc import Callable
from types import TracebackType
from typing import Any, Final, TypeVar

from ._logging import LoggerAdapter, RateLimitedLog
from ._runtime import RUNTIME, WATCHDOG
from ._time import SYSTEM_TIME, TimeSource
from .budget import announce_running, execute_with_beat_budget
from .claims import Claim, ClaimFactory, resolve
from .clock import BeatClock, Observation
from .config import BackbeatConfig
from .errors import (
    BackbeatDisabled,
    ConfigError,
    ForkedIntegration,
    IntegrationAlreadyStarted,
    IntegrationNotStarted,
    InvalidArgument,
    ProtocolError,
)
from .operations import OperationPhase, OperationRegistry, P2POperation
from .protocol import BeatFrame, StatusClaim, check_wire_id, parse_beat_frame
from .signing import SigningKey, Verifier
from .transport import Transport, TransportEvent, make_transport

__all__ = ["Integration", "IntegrationState"]

T = TypeVar("T")
BeatCallback = Callable[[BeatFrame], Any]
ClaimCallback = Callable[[StatusClaim], Any]

_STOP: Final = object()
#: User-callback items queued at most; past this the oldest are dropped (and counted).
CALLBACK_QUEUE_LIMIT: Final = 100_000
#: How long stop() waits for one user callback that is still running (a blocked one).
CALLBACK_JOIN_TIMEOUT: Final = 2.0
STOPPED_REASON: Final = "integration stopped"


class IntegrationState(enum.Enum):
    """Lifecycle of an :class:`Integration`."""

    NEW = "new"
    STARTING = "starting"
    RUNNING = "running"
    STOPPING = "stopping"
    STOPPED = "stopped"


class _Callbacks:
    """Copy-on-write lists of user callbacks."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.beat: tuple[BeatCallback, ...] = ()
        self.downbeat: tuple[BeatCallback, ...] = ()
        self.claim: tuple[ClaimCallback, ...] = ()

    def add(self, kind: str, cb: Callable[[Any], Any]) -> Callable[[], None]:
        with self._lock:
            setattr(self, kind, (*getattr(self, kind), cb))

        def remove() -> None:
            with self._lock:
                current = getattr(self, kind)
                if cb in current:
                    i = current.index(cb)
                    setattr(self, kind, current[:i] + current[i + 1 :])

        return remove


def _callback_name(cb: Callable[..., Any]) -> str:
    return getattr(cb, "__qualname__", None) or repr(cb)


class Integration:
    """An agent's membership of a BACKBEAT cluster: the beat, its operations, its claims.

    Args:
        config: how to join (``BackbeatConfig.from_env()`` or explicit).
        node_id: this agent's P2P node id (goes into every claim).
        logger: any object with ``info/warn/error(msg)``; default: loguru.
        time_source: where time is read (tests inject a manual one).
        transport: a transport to use instead of the one ``config.nats_url`` selects.

    Raises:
        BackbeatDisabled: ``config.enabled`` is false.
        ConfigError: ``node_id`` is empty or not a string.

    Example:
        >>> from backbeat_sync import BackbeatConfig, Integration
        >>> cfg = BackbeatConfig(cluster_id="dev", agent_id="doc", nats_url="local://doc",
        ...                      tempo_bpm=600)
        >>> with Integration(cfg, node_id="n1") as i:
        ...     i.start_p2p_operation("dht-store-k", "dht_store", 3)
        ...     i.complete_p2p_operation("dht-store-k", 3)
        ...     i.get_health()["active_operations"]
        0
    """

    def __init__(
        self,
        config: BackbeatConfig,
        node_id: str,
        logger: Any = None,
        *,
        time_source: TimeSource | None = None,
        transport: Transport | None = None,
    ) -> None:
        if not isinstance(config, BackbeatConfig):
            raise TypeError(f"config must be a BackbeatConfig, not {type(config).__name__}")
        if not config.enabled:
            raise BackbeatDisabled()
        if not isinstance(node_id, str) or not node_id.strip():
            raise ConfigError("node_id", node_id, "must be a non-empty string")
        self._config = config
        self._node_id = node_id
        self._time = time_source or SYSTEM_TIME
        self._log = LoggerAdapter(logger, cluster=config.cluster_id, agent=config.agent_id)
        self._ratelog = RateLimitedLog(self._log)
        self._otel: Any = None  #: backbeat_sync.otel.Instrumentation, with config.otel
        self._clock = BeatClock(
            tempo_bpm=config.tempo_bpm, bar_length=config.bar_length, time_source=self._time
        )
        self._claims = ClaimFactory(config.cluster_id, config.agent_id, node_id, self._time)
        self._status_subject = config.status_subject_for()
        self._registry = OperationRegistry(self._emit_operation)
        # Plain read-only attributes, not properties: the budget engine reads them on every
        # ``with track_operation(...)`` (a property costs ~35 ns a read there).
        #: The beat clock this integration feeds (read-only).
        self.clock: Final[BeatClock] = self._clock
        #: The registry of this integration's operations (read-only).
        self.registry: Final[OperationRegistry] = self._registry
        self._given_transport = transport
        self._transport: Transport | None = None
        self._state = IntegrationState.NEW
        self._state_lock = threading.Lock()
        self._audience_lock = threading.Lock()
        self._callbacks = _Callbacks()
        #: The clock budgets count on while this integration runs; None otherwise (BudgetHost).
        self.budget_clock: BeatClock | None = None
        self._pid = os.getpid()
        self._forked_in: int | None = None  # the fork child's pid, once inherited
        self._handled_listeners: tuple[Callable[[BeatFrame, float], None], ...] = ()
        self._encoder: Callable[[StatusClaim], bytes] = StatusClaim.encode
        self._verifier: Verifier | None = None
        if config.signing_key is not None:
            signer = SigningKey.load(config.signing_key, config.signing_key_id)
            self._encoder = signer.encode_claim
        if config.trusted_pulse_keys:
            self._verifier = Verifier.from_keys(config.trusted_pulse_keys, field="trusted_pulse_keys")

        self._errors: deque[str] = deque(maxlen=10)
        self._errors_lock = threading.Lock()
        self._last_error_beat: int | None = None
        self._counts: dict[str, int] = dict.fromkeys(
            (
                "claims_emitted",
                "rejected_frames",
                "foreign_frames",
                "callback_errors",
                "callbacks_dropped",
            ),
            0,
        )
        self._reconnects = 0
        self._last_handling = 0.0
        self._claimed_beat = -1
        self._beat_queue: queue.SimpleQueue[object] = queue.SimpleQueue()
        self._cb_items: deque[tuple[str, Any]] = deque()
        self._cb_cond = threading.Condition(threading.Lock())
        self._cb_running: tuple[str, float] | None = None
        self._cb_blocked_reported = False
        self._threads: list[threading.Thread] = []
        self._metrics_servers: list[Any] = []

    # -- properties ----------------------------------------------------------

    @property
    def config(self) -> BackbeatConfig:
        """The config this integration was made with."""
        return self._config

    @property
    def node_id(self) -> str:
        """The P2P node id this agent claims as."""
        return self._node_id

    @property
    def state(self) -> IntegrationState:
        """Where the integration is in its lifecycle."""
        return self._state

    @property
    def running(self) -> bool:
        """True between a successful ``start()`` and ``stop()``."""
        return self._state is IntegrationState.RUNNING

    @property
    def transport(self) -> Transport | None:
        """The transport in use (None before ``start()``)."""
        return self._transport

    @property
    def log(self) -> LoggerAdapter:
        """The logger this integration writes to."""
        return self._log

    # -- lifecycle -----------------------------------------------------------

    def start(self) -> None:
        """Connect, follow the beat, start the beat and callback threads.

        Raises:
            IntegrationAlreadyStarted: ``start()`` was already called.
            BackbeatConnectionError: the first NATS connection failed (nothing is
                left running; ``start()`` may be tried again).
        """
        self.refuse_if_forked()
        with self._state_lock:
            if self._state is not IntegrationState.NEW:
                raise IntegrationAlreadyStarted()
            self._state = IntegrationState.STARTING
            self._pid = os.getpid()
        try:
            if self._config.otel:
                self._otel = _instrument_otel(self)
            transport = self._given_transport or make_transport(self._config, self._encode, self._time)
            self._transport = transport
            self._threads = [
                threading.Thread(target=self._beat_loop, name="backbeat-beat", daemon=True),
                threading.Thread(target=self._callback_loop, name="backbeat-callbacks", daemon=True),
            ]
            for t in self._threads:
                t.start()
            self._clock.restart()
            with self._state_lock:
                self._state = IntegrationState.RUNNING
                self.budget_clock = self._clock
            transport.start(self)
            self.audience_changed()
        except BaseException:
            with self._state_lock:
                self._state = IntegrationState.STOPPING
                self.budget_clock = None
            self._stop_threads()
            self._transport = None
            if self._otel is not None:
                self._otel.uninstrument()
                self._otel = None
            with self._state_lock:
                self._state = IntegrationState.NEW
            raise
        RUNTIME.started(self, self._inherited_by_fork)
        self._log.info(
            f"🎵 CHORUS BACKBEAT integration started - cluster={self._config.cluster_id}"
            f" agent={self._config.agent_id}"
        )

    def stop(self) -> None:
        """Fail what is still active, publish what is queued, close, join every thread. Idempotent.

        Each operation still active gets a final ``failed`` claim with reason
        ``integration stopped`` before the connection closes.
        """
        with self._state_lock:
            if self._state is not IntegrationState.RUNNING:
                return
            self._state = IntegrationState.STOPPING
            self.budget_clock = None
        try:
            self._beat_queue.put(_STOP)
            for t in self._threads[:1]:
                t.join()
            failed = self._registry.fail_all(STOPPED_REASON)
            if failed:
                self._log.warn(f"BACKBEAT stop: {len(failed)} active operation(s) failed ({STOPPED_REASON})")
            if self._transport is not None:
                self._transport.stop(self._config.flush_timeout)
        finally:
            self._stop_threads()
            for server in self._metrics_servers:
                server.close()
            self._metrics_servers.clear()
            with self._state_lock:
                self._state = IntegrationState.STOPPED
            RUNTIME.stopped(self)
            if self._otel is not None:
                self._otel.uninstrument()
                self._otel = None
            self._log.info("🎵 CHORUS BACKBEAT integration stopped")

    def _inherited_by_fork(self) -> None:
        """Fork child (called by the runtime): this integration is the parent's; refuse its API.

        Its threads did not survive the fork; its connection, outbox and operations are
        the parent's. It is left STOPPED (``stop()`` does nothing) and every call raises
        :class:`ForkedIntegration`, so no claim made in the child is lost silently.
        """
        self._forked_in = os.getpid()
        self._state_lock = threading.Lock()
        self._state = IntegrationState.STOPPED
        self.budget_clock = None
        self._threads = []
        self._metrics_servers = []

    def refuse_if_forked(self) -> None:
        """Raise :class:`ForkedIntegration` if this integration was inherited across ``os.fork()``.

        Raises:
            ForkedIntegration: this process is a fork child and the integration is the parent's.
        """
        if self._forked_in is not None:
            raise ForkedIntegration(repr(self), self._pid, self._forked_in)

    def _stop_threads(self) -> None:
        self._beat_queue.put(_STOP)
        with self._cb_cond:
            self._cb_items.append(("stop", None))
            self._cb_cond.notify()
        for t in self._threads:
            if t is threading.current_thread() or not t.is_alive():
                continue
            if t.name == "backbeat-callbacks":
                self._join_callbacks(t)
            else:
                t.join()
        self._threads = []

    def _join_callbacks(self, thread: threading.Thread) -> None:
        """Wait while the callback thread works through what is queued (every claim reaches
        ``on_claim``); give up only on one callback running longer than CALLBACK_JOIN_TIMEOUT."""
        while thread.is_alive():
            thread.join(0.05)
            running = self._cb_running
            if running is not None and self._time.monotonic() - running[1] > CALLBACK_JOIN_TIMEOUT:
                self._log.warn(f"BACKBEAT stop: thread {thread.name} still busy in a user callback")
                return

    def __enter__(self) -> Integration:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        return (
            f"<Integration cluster={self._config.cluster_id} agent={self._config.agent_id}"
            f" node={self._node_id} state={self._state.value}>"
        )

    # -- operations (the seed's API) ------------------------------------------

    def start_p2p_operation(
        self,
        operation_id: str,
        operation_type: str,
        estimated_beats: int,
        data: Any = None,
    ) -> None:
        """Register an operation and claim its start.

        Args:
            operation_id: unique id (the claims' ``task_id``).
            operation_type: ``election``, ``dht_store``, ``pubsub_sync``, ``peer_discovery``
                (see :class:`OperationType`) or a user type.
            estimated_beats: beats it should take (>= 1).
            data: anything to keep with it.

        Raises:
            IntegrationNotStarted: not running.
            ForkedIntegration: inherited across ``os.fork()`` (it is the parent's).
            DuplicateOperation: an active operation has this id.
            InvalidArgument: an argument is empty or out of range, or the id or type is over 256 bytes.
        """
        self._require_running()
        self._registry.add(self._new_operation(operation_id, operation_type, estimated_beats, data))

    def _new_operation(
        self,
        operation_id: str,
        operation_type: str,
        estimated_beats: int,
        data: Any,
        *,
        announced: bool = True,
    ) -> P2POperation:
        check_wire_id("operation_id", operation_id)  # non-empty, at most 256 bytes: a claim must fit
        check_wire_id("operation_type", operation_type)
        if not isinstance(estimated_beats, int) or isinstance(estimated_beats, bool) or estimated_beats < 1:
            raise InvalidArgument("estimated_beats", estimated_beats, "must be an integer >= 1")
        start_beat, epoch = self._clock.beat_and_epoch
        return P2POperation(
            id=operation_id,
            type=str(operation_type),
            start_beat=start_beat,
            epoch=epoch,
            estimated_beats=estimated_beats,
            start_time=self._time.time(),
            data=data,
            announced=announced,
        )

    def update_p2p_operation_phase(
        self, operation_id: str, phase: OperationPhase | str, peer_count: int
    ) -> None:
        """Move an operation to a later phase and claim the change.

        Args:
            operation_id: the operation.
            phase: the new phase (forward only; the current one again updates the peer count).
            peer_count: peers involved now.

        Raises:
            OperationNotFound: no active operation has this id.
            InvalidPhaseTransition: ``phase`` is behind the current phase.
            InvalidArgument: ``phase`` or ``peer_count`` is not valid.
        """
        self.refuse_if_forked()
        target = self._phase(phase)
        self._check_peers(peer_count)
        if target is OperationPhase.FAILED:
            self._registry.finish(operation_id, target, peer_count=peer_count, reason="failed")
        else:
            self._registry.set_phase(operation_id, target, peer_count)

    def complete_p2p_operation(self, operation_id: str, peer_count: int) -> None:
        """Mark an operation completed and claim ``done`` at once.

        Raises:
            OperationNotFound: no active operation has this id (maybe already finished).
            InvalidArgument: ``peer_count`` is not an integer >= 0.
            ForkedIntegration: inherited across ``os.fork()`` (it is the parent's).
        """
        self.refuse_if_forked()
        self._check_peers(peer_count)
        self._registry.finish(operation_id, OperationPhase.COMPLETED, peer_count=peer_count)

    def fail_p2p_operation(self, operation_id: str, reason: str) -> None:
        """Mark an operation failed and claim ``failed`` at once.

        Raises:
            OperationNotFound: no active operation has this id (maybe already finished).
            ForkedIntegration: inherited across ``os.fork()`` (it is the parent's).
        """
        self.refuse_if_forked()
        self._registry.finish(operation_id, OperationPhase.FAILED, reason=str(reason))

    def execute_with_beat_budget(self, beats: float, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run ``fn(*args, **kwargs)`` within a budget of ``beats`` beats (the seed's call).

        If the integration is not running, ``fn`` runs plainly (the seed's fallback).

        Raises:
            BeatBudgetExceeded: the budget ran out (see :func:`beat_budget`).
            ForkedIntegration: inherited across ``os.fork()`` (it is the parent's).
        """
        return execute_with_beat_budget(self, beats, fn, *args, **kwargs)

    @staticmethod
    def _phase(phase: OperationPhase | str) -> OperationPhase:
        try:
            return OperationPhase.coerce(phase)
        except ValueError as exc:
            raise InvalidArgument("phase", phase, str(exc)) from None

    @staticmethod
    def _check_peers(peer_count: int) -> None:
        if not isinstance(peer_count, int) or isinstance(peer_count, bool) or peer_count < 0:
            raise InvalidArgument("peer_count", peer_count, "must be an integer >= 0")

    def _require_running(self) -> None:
        self.refuse_if_forked()
        if self._state is not IntegrationState.RUNNING:
            raise IntegrationNotStarted(f"state is {self._state.value}")

    # -- callbacks -----------------------------------------------------------

    def on_beat(self, callback: BeatCallback) -> Callable[[], None]:
        """Call ``callback(frame)`` on every beat (on the callback thread).

        Returns:
            A function that unregisters it.
        """
        return self._callbacks.add("beat", self._callable(callback))

    def on_downbeat(self, callback: BeatCallback) -> Callable[[], None]:
        """Call ``callback(frame)`` on every downbeat (first beat of a bar).

        Returns:
            A function that unregisters it.
        """
        return self._callbacks.add("downbeat", self._callable(callback))

    def on_claim(self, callback: ClaimCallback) -> Callable[[], None]:
        """Call ``callback(claim)`` with every claim this integration emits, in order.

        Returns:
            A function that unregisters it.
        """
        remove = self._callbacks.add("claim", self._callable(callback))
        self.audience_changed()

        def unregister() -> None:
            remove()
            self.audience_changed()

        return unregister

    @staticmethod
    def _callable(callback: Callable[..., Any]) -> Callable[..., Any]:
        if not callable(callback):
            raise InvalidArgument("callback", callback, "must be callable")
        return callback

    # -- health --------------------------------------------------------------

    def get_health(self) -> dict[str, Any]:
        """The agent's health: every key of PROTOCOL.md, and a few more counters.

        Returns:
            ``enabled``, ``started``, ``connected``, ``current_beat``, ``current_tempo``,
            ``measured_bpm``, ``tempo_drift``, ``reconnect_count``, ``active_operations``,
            ``local_degradation``, ``errors``, ``node_id``; then ``cluster_id``,
            ``agent_id``, ``beat_position``, ``beats_received``, ``missed_beats``,
            ``stale_frames``, ``duplicate_frames``, ``rejected_frames``,
            ``foreign_frames``, ``pulse_resets``, ``claims_emitted``,
            ``claims_published``, ``claims_dropped``, ``claims_coalesced``,
            ``claims_queued``, ``callback_errors``, ``callbacks_dropped``,
            ``blocked_callback``, ``beat_handling_seconds``.

        Raises:
            ForkedIntegration: inherited across ``os.fork()`` (it is the parent's).
        """
        self.refuse_if_forked()
        snap = self._clock.snapshot()
        started = self.running
        transport = self._transport
        connected = self._connected()
        with self._errors_lock:
            errors = list(self._errors)
        tstats = transport.stats() if transport is not None else {}
        blocked = self._blocked_callback()
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
            "errors": errors,
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
            "claims_queued": tstats.get("claims_queued", 0),
            "blocked_callback": blocked,
            "beat_handling_seconds": self._last_handling,
        }
        with self._errors_lock:
            health.update(self._counts)
        health["claims_emitted"] += self._registry.unheard
        return health

    def _connected(self) -> bool:
        transport = self._transport
        return bool(self.running and transport is not None and transport.connected)

    def _degraded(self, since_frame: float, missed_in_bar: bool) -> bool:
        spb = self._clock.beat_duration
        return since_frame > 2 * spb or missed_in_bar or self._last_handling > 0.5 * spb

    def _blocked_callback(self) -> str | None:
        running = self._cb_running
        if running is None:
            return None
        name, since = running
        if self._time.monotonic() - since > self._clock.beat_duration:
            return name
        return None

    def record_error(self, message: str) -> None:
        """Add ``message`` to health ``errors`` (the last 10 are kept) and log it."""
        with self._errors_lock:
            self._errors.append(message)
            self._last_error_beat = self._clock.current_beat
        self._ratelog.warn(message.split(":", 1)[0], f"BACKBEAT error: {message}")

    def count(self, key: str, n: int = 1) -> None:
        """Add ``n`` to the health counter ``key`` (created at 0 on first use)."""
        with self._errors_lock:
            self._counts[key] = self._counts.get(key, 0) + n

    # -- claims --------------------------------------------------------------

    def _encode(self, claim: Claim) -> bytes:
        return self._encoder(resolve(claim))

    def _emit_operation(self, op: P2POperation) -> None:
        """Queue the claim for ``op`` (called by the registry under its lock).

        What is queued is a snapshot (:class:`LazyClaim`): the claim is built by
        whoever sends or delivers it (the transport's thread, the callback thread).
        """
        self._publish(self._claims.lazy(op, self._clock.current_beat))

    def _emit_operations(self, ops: list[P2POperation]) -> None:
        """Queue the claims of ``ops`` at once (one chunk of a beat's sweep, under the registry lock).

        Built here, on the beat thread (not left to the transport as an application
        thread's claims are): the transport then only encodes and sends them, and a
        beat of 100,000 claims goes out about twice as fast.
        """
        transport = self._transport
        self._counts["claims_emitted"] += len(ops)  # always under the registry lock
        beat = self._clock.current_beat
        make = self._claims.for_operation
        claims: list[Claim] = [make(op, beat) for op in ops]
        if transport is not None:
            transport.publish_many(self._status_subject, claims)
        if self._callbacks.claim:
            for claim in claims:
                self._queue_callback("claim", claim)

    def audience_changed(self) -> None:
        """Transport (and ``on_claim``) entry point: who receives claims may have changed.

        While no one would receive an operation's claim (no ``on_claim`` callback,
        and a transport that knows no one subscribes: the in-process bus with no
        subscriber) the registry only counts claims instead of building them.
        """
        # Under a lock, so that of two changes on two threads the later one decides,
        # from the state both left (a stale answer could leave the registry quiet).
        with self._audience_lock:
            transport = self._transport
            quiet = (
                transport is not None
                and not self._callbacks.claim
                and not transport.delivers(self._status_subject)
            )
            self._registry.set_quiet(quiet)

    def _publish(self, claim: Claim) -> None:
        transport = self._transport
        if transport is not None:
            transport.publish(self._status_subject, claim)
        self._counts["claims_emitted"] += 1  # always under the registry lock
        if self._callbacks.claim:
            self._queue_callback("claim", claim)

    def emit_operation_note(self, operation_id: str, notes: str) -> StatusClaim | None:
        """Claim an active operation at once with a custom ``notes`` line (budget warnings).

        Returns:
            The claim, or None if the operation is no longer active.
        """
        sent: list[StatusClaim] = []

        def emit(op: P2POperation) -> None:
            claim = self._claims.for_operation(op, self._clock.current_beat, notes=notes)
            self._publish(claim)
            sent.append(claim)

        self._registry.emit_now(operation_id, emit, notes=notes)
        return sent[0] if sent else None

    def _emit_health(self) -> None:
        last_err = self._last_error_beat
        every = self._config.health_every_beats
        recent = last_err is not None and self._clock.current_beat - last_err < every
        with self._registry.lock:
            self._publish(
                self._claims.for_health(
                    current_beat=self._clock.current_beat,
                    connected=self._connected(),
                    operations=self._registry.active_count,
                    tempo_bpm=self._clock.tempo_bpm,
                    recent_errors=recent,
                )
            )

    # -- frames (transport thread) ------------------------------------------------

    def frame_received(self, data: bytes, arrival: float) -> None:
        """Transport entry point: a payload arrived on the beat subject. Never raises."""
        try:
            self._frame_received(data, arrival)
        except Exception as exc:  # a bug here must never stop the transport
            self.record_error(f"beat handling failed: {type(exc).__name__}: {exc}")

    def _frame_received(self, data: bytes, arrival: float) -> None:
        if self._state is not IntegrationState.RUNNING:
            return
        try:
            frame = parse_beat_frame(data)
        except ProtocolError as exc:
            self.count("rejected_frames")
            self.record_error(f"rejected beat frame: {exc.reason}")
            return
        if frame.cluster_id != self._config.cluster_id:
            self.count("foreign_frames")
            return
        if not self._accept_frame(frame):
            return
        result = self._clock.observe(frame, arrival)
        if not result.observation.accepted:
            return
        if result.observation in (Observation.FIRST, Observation.RESET):
            self._registry.rebase(self._clock.beat_and_epoch[1], result.shift)
        if result.observation is Observation.GAP:
            self._ratelog.warn(
                "gap", f"BACKBEAT missed {result.missed} beat(s) before beat={frame.beat_index}"
            )
        elif result.observation is Observation.RESET:
            self.record_error(
                f"pulse reset: resynchronised to beat {frame.beat_index} after a bar of stale frames"
            )
        WATCHDOG.notify_only()  # tempo changes re-time the budgets' deadlines
        self._beat_queue.put(frame)

    def _accept_frame(self, frame: BeatFrame) -> bool:
        """With trusted pulse keys, only frames signed by one of them get through."""
        if self._verifier is None:
            return True
        verdict = self._verifier.verify(frame)
        if verdict == "ok":
            return True
        self.count("unsigned_frames" if verdict == "unsigned" else "forged_frames")
        self.record_error(f"dropped beat frame: {verdict.replace('_', ' ')} (beat {frame.beat_index})")
        return False

    def transport_event(self, event: TransportEvent, detail: str) -> None:
        """Transport entry point: the connection changed state."""
        if event is TransportEvent.ERROR:
            self.record_error(f"nats error: {detail}")
        elif event is TransportEvent.DISCONNECTED:
            self.record_error(f"disconnected from NATS: {detail}")
        elif event is TransportEvent.CLOSED and self._state is IntegrationState.RUNNING:
            self.record_error(f"nats connection closed: {detail}")  # unexpected: not our stop()
        elif event is TransportEvent.RECONNECTED:
            self._log.info(f"BACKBEAT reconnected to NATS: {detail}")
        elif event is TransportEvent.CONNECTED:
            self._log.debug(f"BACKBEAT connected: {detail}")
        elif event is TransportEvent.WARNING:
            self._log.warn(f"BACKBEAT {detail}")

    # -- the beat thread -----------------------------------------------------

    def _beat_loop(self) -> None:
        while True:
            item = self._beat_queue.get()
            frames: list[BeatFrame] = []
            while item is not _STOP:
                assert isinstance(item, BeatFrame)
                frames.append(item)
                try:  # a backlog (slow handling): claim once, for the newest beat
                    item = self._beat_queue.get_nowait()
                except queue.Empty:
                    break
            if frames:
                self._handle_frames(frames)
            if item is _STOP:
                return

    def _handle_frames(self, frames: list[BeatFrame]) -> None:
        t0 = self._time.monotonic()
        try:
            self._handle_beat(frames)
        except Exception as exc:
            self.record_error(f"beat handling failed: {type(exc).__name__}: {exc}")
        self._last_handling = elapsed = self._time.monotonic() - t0
        for listener in self._handled_listeners:
            try:
                listener(frames[-1], elapsed)
            except Exception as exc:
                self.record_error(f"beat listener failed: {type(exc).__name__}: {exc}")

    def _handle_beat(self, frames: list[BeatFrame]) -> None:
        for f in frames:
            self._log.info(
                f"🥁 BACKBEAT beat received - beat={f.beat_index} phase={f.phase}"
                f" tempo={f.tempo_bpm:g} window={f.window_id}"
            )
        if len(frames) > 1:
            self._ratelog.warn(
                "backlog", f"BACKBEAT beat handling fell behind: {len(frames)} beats handled as one"
            )
        beat = self._clock.current_beat
        if beat != self._claimed_beat:  # each beat's claims go out once
            self._claimed_beat = beat
            self._registry.emit_active(emit_chunk=self._emit_operations)
        announce_running(self)  # budget calls still running are claimed from now on
        downbeats = [f for f in frames if f.downbeat]
        if downbeats:
            last = downbeats[-1]
            self._log.info(
                f"🎼 BACKBEAT downbeat - new bar started - beat={last.beat_index} window={last.window_id}"
            )
            self._registry.cleanup_finished()
            self._log.info(f"🧹 BACKBEAT operations cleanup check - active: {self._registry.active_count}")
        if any(f.beat_index % self._config.health_every_beats == 0 for f in frames):
            self._emit_health()
        self._check_blocked()
        for f in frames:
            if self._callbacks.beat:
                self._queue_callback("beat", f)
            if f.downbeat and self._callbacks.downbeat:
                self._queue_callback("downbeat", f)

    def _check_blocked(self) -> None:
        blocked = self._blocked_callback()
        if blocked is None:
            self._cb_blocked_reported = False
        elif not self._cb_blocked_reported:
            self._cb_blocked_reported = True
            self.record_error(f"callback blocked: {blocked} has run for more than a beat")

    # -- the callback thread ---------------------------------------------------

    def _queue_callback(self, kind: str, payload: Any) -> None:
        with self._cb_cond:
            if len(self._cb_items) >= CALLBACK_QUEUE_LIMIT:
                self._cb_items.popleft()
                self._counts["callbacks_dropped"] += 1
            self._cb_items.append((kind, payload))
            self._cb_cond.notify()

    def _callback_loop(self) -> None:
        items = self._cb_items
        while True:
            with self._cb_cond:
                while not items:
                    self._cb_cond.wait()
                kind, payload = items.popleft()
            if kind == "stop":
                return
            callbacks: tuple[Callable[[Any], Any], ...] = getattr(self._callbacks, kind)
            if kind == "claim":
                try:
                    payload = resolve(payload)
                except Exception as exc:  # a bug: never let it stop the callback thread
                    self.record_error(f"claim {payload.task_id} not built: {type(exc).__name__}: {exc}")
                    continue
            for cb in callbacks:
                self._cb_running = (_callback_name(cb), self._time.monotonic())
                try:
                    cb(payload)
                except Exception as exc:
                    self.count("callback_errors")
                    self.record_error(
                        f"on_{kind} callback {_callback_name(cb)} raised {type(exc).__name__}: {exc}"
                    )
                finally:
                    self._cb_running = None

    # -- hooks for the budget engine (internal) --------------------------------

    def _add_handled_listener(self, listener: Callable[[BeatFrame, float], None]) -> Callable[[], None]:
        """Call ``listener(frame, seconds)`` on the beat thread after each beat is handled (internal)."""
        self._handled_listeners = (*self._handled_listeners, listener)

        def remove() -> None:
            self._handled_listeners = tuple(x for x in self._handled_listeners if x is not listener)

        return remove

    # -- metrics (optional ``prometheus`` extra) --------------------------------

    def serve_metrics(self, port: int, *, addr: str = "0.0.0.0", registry: Any = None) -> Any:
        """Serve this integration's Prometheus metrics on ``port`` (see :mod:`backbeat_sync.metrics`).

        Args:
            port: TCP port (0 picks a free one).
            addr: address to bind.
            registry: a ``prometheus_client`` registry to add the metrics to and serve
                (default: the global ``REGISTRY``).

        Returns:
            A :class:`~backbeat_sync.metrics.MetricsServer`; ``close()`` it to stop serving.

        Raises:
            ImportError: prometheus-client is not installed (``pip install 'backbeat_sync[prometheus]'``).
        """
        from .metrics import serve_metrics

        server = serve_metrics(self, port, addr=addr, registry=registry)
        self._metrics_servers.append(server)
        return server


def _instrument_otel(integration: Integration) -> Any:
    """``BackbeatConfig(otel=True)``: spans with the global tracer provider (the ``otel`` extra)."""
    try:
        from .otel import instrument
    except ImportError as exc:
        raise ImportError(
            "BackbeatConfig(otel=True) needs the otel extra: pip install 'backbeat_sync[otel]'"
        ) from exc
    return instrument(integration)
