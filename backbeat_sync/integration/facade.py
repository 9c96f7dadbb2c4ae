"""The :class:`Integration`: an agent in a BACKBEAT cluster (the public face).

Threads (see ``docs/architecture.md``):

- application threads call the API; claims are built and *queued* under the
  registry lock, so one operation's claims leave in order; nothing waits on
  the network;
- the transport's thread (the pulse thread for ``local://``, the event-loop
  thread for NATS) parses each frame, feeds the clock and hands accepted
  beats to the beat thread (:mod:`.ingest`);
- the beat thread (``backbeat-beat``) claims every active operation, emits
  the health claim, cleans up on downbeats and times itself (:mod:`.beat`);
- the callback thread (``backbeat-callbacks``) runs user callbacks, so a slow
  or failing callback never stalls beats or NATS (:mod:`.callbacks`).

This module holds the lifecycle, the seed's operation API and the claims the
integration emits; health is :mod:`.health`.
"""

from __future__ import annotations

import math
import os
import queue
import threading
from collections.abc import Callable, Coroutine, Iterable
from concurrent.futures import Future
from types import TracebackType
from typing import TYPE_CHECKING, Any, Final, Literal, ParamSpec, TypeVar

from .._logging import LoggerAdapter, RateLimitedLog
from .._reentry import lock_free
from .._runtime import RUNTIME
from .._time import SYSTEM_TIME, TimeSource
from ..budget import execute_with_beat_budget
from ..claims import Claim, ClaimFactory, LazyClaim, resolve
from ..clock import BeatClock
from ..config import BackbeatConfig
from ..errors import (
    BackbeatDisabled,
    ConfigError,
    ForkedIntegration,
    IntegrationAlreadyStarted,
    IntegrationNotStarted,
    InvalidArgument,
)
from ..history import BudgetHistory, Sample, name_of
from ..history.cluster import ClusterHistory
from ..operations import OperationPhase, OperationRegistry, P2POperation
from ..protocol import BeatFrame, StatusClaim, check_wire_id
from ..signing import SigningKey, Verifier
from ..transport import Transport, make_transport
from .base import STOP, IntegrationState
from .beat import BeatMixin
from .callbacks import CallbackMixin, Callbacks
from .health import HealthCounters, HealthMixin
from .ingest import IngestMixin
from .stopping import StopMixin
from .workflows import WorkflowMixin

#: The stdlib logger its lines go to (``log_to_stdlib``): the package's, as before the split.
LOG_NAME: Final = "backbeat_sync.integration"

if TYPE_CHECKING:
    from ..metrics import MetricsServer

__all__ = ["Integration"]

P = ParamSpec("P")
R = TypeVar("R")


def _wait_timeout(wait_for_beat: float | bool | None) -> float | None:
    """``start(wait_for_beat=...)`` as a timeout: 0.0 (no wait), seconds, or None (no limit)."""
    if wait_for_beat is None or wait_for_beat is False:
        return 0.0
    if wait_for_beat is True:
        return None
    if not isinstance(wait_for_beat, (int, float)) or not wait_for_beat >= 0:
        raise InvalidArgument("wait_for_beat", wait_for_beat, "must be seconds >= 0, True or None")
    return float(wait_for_beat)


class Integration(StopMixin, IngestMixin, BeatMixin, CallbackMixin, HealthMixin, WorkflowMixin):
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
        self._ratelog = RateLimitedLog(self._log, time_source=self._time)
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
        self._callbacks = Callbacks()
        #: The clock budgets count on while this integration runs; None otherwise (BudgetHost).
        self.budget_clock: BeatClock | None = None
        self._pid = os.getpid()
        self._forked_in: int | None = None  # the fork child's pid, once inherited
        self._handled_listeners: tuple[Callable[[BeatFrame, float], None], ...] = ()
        self._encoder: Callable[[StatusClaim], bytes] = StatusClaim.encode
        self._signed = config.signing_key is not None
        self._verifier: Verifier | None = None
        if config.signing_key is not None:
            signer = SigningKey.load(config.signing_key, config.signing_key_id)
            self._encoder = signer.encode_claim
        if config.trusted_pulse_keys:
            self._verifier = Verifier.from_keys(config.trusted_pulse_keys, field="trusted_pulse_keys")

        self._health = HealthCounters()
        self._beat_seen = threading.Event()
        self._last_handling = 0.0
        self._claimed_beat = -1
        self._beat_queue: queue.SimpleQueue[object] = queue.SimpleQueue()
        self._cb_items: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()
        self._cb_running: tuple[str, float] | None = None
        self._cb_blocked_reported = False
        self._threads: list[threading.Thread] = []
        self._metrics_servers: list[Any] = []
        #: The budget history: what this integration's budgeted runs took (``docs/learning.md``).
        #: A plain attribute (the budget engine reads it); do not rebind it.
        self.history = BudgetHistory(
            config.history_path,
            keep=config.history_keep,
            max_names=config.history_max_names,
            profiles=config.budget_profiles,
            min_samples=config.history_min_samples,
            margin=config.history_margin,
            log=self._log,
            on_error=self.record_error,
            time_source=self._time.time,
        )
        self._history_flushed_at = 0.0
        if config.history_bucket is not None and not config.is_local:
            cluster = ClusterHistory(
                config.history_bucket,
                config.cluster_id,
                config.agent_id,
                self._submit_history,
                on_error=self.record_error,
                on_change=self.history._cluster_changed,
                time_source=self._time.time,
                timeout=config.flush_timeout,
                retire_after=config.history_retire_after,
            )
            self.history.cluster = cluster
            self.history.scope = config.history_scope
            self.history.add_listener(cluster.add)
        #: start_p2p_operation runs not yet finished: id -> (start position, budget, source, type).
        self._p2p_runs: dict[str, tuple[float, float, str, str]] = {}
        #: Set by a stop() that could not stop at once (a signal handler inside a library call).
        self._stop_requested = False
        self._stopped_event = threading.Event()

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
    def alive(self) -> bool:
        """True while running with every thread it started (beat handling, callbacks) alive.

        What a liveness probe asks (the metrics server's ``/healthz``).
        """
        threads = self._threads
        return self.running and bool(threads) and all(t.is_alive() for t in threads)

    @property
    def transport(self) -> Transport | None:
        """The transport in use (None before ``start()``)."""
        return self._transport

    @property
    def log(self) -> LoggerAdapter:
        """The logger this integration writes to."""
        return self._log

    # -- lifecycle -----------------------------------------------------------

    def start(self, wait_for_beat: float | bool | None = None) -> None:
        """Connect, follow the beat, start the beat and callback threads.

        Budgets opened before the first beat frame arrives count on the configured
        ``tempo_bpm`` from the moment ``start()`` returns (the clock extrapolates);
        when the first frame comes, the clock locks on to it and those budgets go on
        counting, continuously, at the pulse's tempo. Pass ``wait_for_beat`` to start
        counting on the pulse itself.

        Args:
            wait_for_beat: after starting, wait up to this many seconds for the first
                beat frame (``True``: wait without a limit; ``None``/``False``/``0``: do
                not wait). A timeout is not an error: see :meth:`wait_for_beat`.

        Raises:
            IntegrationAlreadyStarted: ``start()`` was already called.
            ForkedIntegration: inherited across ``os.fork()`` (it is the parent's).
            BackbeatConnectionError: the first NATS connection failed (nothing is
                left running; ``start()`` may be tried again).
            InvalidArgument: ``wait_for_beat`` is negative or not a number.
            ConfigError: ``history_path`` cannot be opened as a history file (named).
        """
        timeout = _wait_timeout(wait_for_beat)
        self.refuse_if_forked()
        with self._state_lock:
            if self._state is not IntegrationState.NEW:
                raise IntegrationAlreadyStarted(self._state.value)
            self._state = IntegrationState.STARTING
            self._stop_requested = False
            self._pid = os.getpid()
        try:
            if self._config.otel:
                self._otel = _instrument_otel(self)
            self.history.open()
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
            self.history.close()  # a start() tried again opens it again
            with self._state_lock:
                self._state = IntegrationState.NEW
            raise
        RUNTIME.started(self, self._inherited_by_fork)
        self._log.info(
            f"🎵 CHORUS BACKBEAT integration started - cluster={self._config.cluster_id}"
            f" agent={self._config.agent_id}"
        )
        if self._stop_requested:  # stop() was called while we started (a signal handler, another thread)
            self._stop_now()
            return
        if timeout != 0.0:
            self.wait_for_beat(timeout)

    def wait_for_beat(self, timeout: float | None = None) -> bool:
        """Wait until a beat frame has been accepted (at once if one already has).

        Args:
            timeout: seconds to wait at most (None: no limit).

        Returns:
            True once a beat frame has been accepted; False if ``timeout`` passed first
            or the integration is not running (nothing would arrive).

        Raises:
            ForkedIntegration: inherited across ``os.fork()`` (it is the parent's).
            InvalidArgument: ``timeout`` is negative or not a number.
        """
        self.refuse_if_forked()
        if timeout is not None and (
            isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout >= 0
        ):
            raise InvalidArgument("timeout", timeout, "must be a number of seconds >= 0, or None")
        if self._beat_seen.is_set():
            return True
        if self._state is not IntegrationState.RUNNING:
            return False
        return self._beat_seen.wait(timeout)

    def _submit_history(self, fn: Callable[[Any], Coroutine[Any, Any, Any]]) -> Future[Any] | None:
        """Run the shared history's merge on the NATS loop thread (None: no NATS transport)."""
        run = getattr(self._transport, "run_on_loop", None)
        if run is None:
            return None
        fut: Future[Any] | None = run(fn)
        return fut

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
        self.registry.inherited_by_fork()  # a block entered before the fork may end here
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
        self._beat_queue.put(STOP)
        self._cb_items.put(("stop", None))
        for t in self._threads:
            if t is threading.current_thread() or not t.is_alive():
                continue
            if t.name == "backbeat-callbacks":
                self._join_callbacks(t)
            else:
                t.join()
        self._threads = []

    def __enter__(self) -> Integration:
        self.start()
        return self

    @lock_free
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
        estimated_beats: int | Literal["auto"],
        data: Any = None,
        *,
        priority: str = "normal",
        depends_on: Iterable[str] | None = None,
        correlation_id: str | None = None,
        parent_id: str | None = None,
    ) -> None:
        """Register an operation and claim its start.

        Its run is recorded in :attr:`history` when it completes or fails
        (``exceeded`` if it completed after its estimate ran out).

        Started inside an open operation (``track_operation``, a ``@beat_budget`` call,
        ``op.bind``), it is that operation's child: its claims carry ``parent_id`` and
        the workflow's ``correlation_id`` (see ``docs/workflows.md``).

        Args:
            operation_id: unique id (the claims' ``task_id``).
            operation_type: ``election``, ``dht_store``, ``pubsub_sync``, ``peer_discovery``
                (see :class:`OperationType`) or a user type.
            estimated_beats: beats it should take (>= 1), or ``"auto"``: the budget the
                type's history suggests now (claimed rounded up to whole beats).
            data: anything to keep with it.
            priority: ``critical``, ``high``, ``normal`` or ``low``.
            depends_on: ids of operations it depends on: while any is active here, it
                claims ``waiting``.
            correlation_id: the workflow's id, to continue one started elsewhere.
            parent_id: the enclosing operation's id, when it runs elsewhere.

        Raises:
            IntegrationNotStarted: not running.
            DuplicateOperation: an active operation has this id.
            InvalidArgument: an argument is empty or out of range, or the id or type is over 256 bytes;
                ``"auto"`` for a type with no profile and too little history.
        """
        self._require_running()
        estimated: Any = estimated_beats
        budget: float | None = None
        source = "fixed"
        if isinstance(estimated_beats, str):
            if estimated_beats != "auto":
                raise InvalidArgument("estimated_beats", estimated_beats, 'must be an integer >= 1 or "auto"')
            check_wire_id("operation_type", operation_type)
            budget, source = self.history.resolve(operation_type)
            estimated = max(1, math.ceil(budget - 1e-9))
        op = self._new_operation(operation_id, operation_type, estimated, data)
        if source != "fixed":
            op.budget_source = source
        op.flow = self._p2p_flow(operation_id, priority, depends_on, correlation_id, parent_id)
        start = self._clock.budget_position()
        self._registry.add(op)
        budget = float(estimated if budget is None else budget)
        self._p2p_runs[operation_id] = (start, budget, source, op.type)

    def _p2p_finished(self, operation_id: str, outcome: str) -> None:
        """Record a finished ``start_p2p_operation`` run in the history (a deque append)."""
        run = self._p2p_runs.pop(operation_id, None)
        if run is None:
            return
        start, budget, source, typ = run
        clock = self._clock
        end = clock.budget_position()
        used = max(0.0, end - start)
        kind = None
        if outcome == "done" and used > budget:
            outcome, kind = "exceeded", "late"
        self.history.push(
            Sample(
                typ,
                name_of(operation_id),
                budget,
                used,
                outcome,
                kind,
                end,
                clock.tempo_bpm,
                source,
                self._time.time(),
            )
        )

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
            IntegrationNotStarted: ``start()`` has not been called yet.
            OperationNotFound: no active operation has this id.
            InvalidPhaseTransition: ``phase`` is behind the current phase.
            InvalidArgument: ``phase`` or ``peer_count`` is not valid.
        """
        self.refuse_if_forked()
        if self._state is IntegrationState.NEW:
            raise IntegrationNotStarted("call start() before update_p2p_operation_phase()")
        target = self._phase(phase)
        self._check_peers(peer_count)
        if target is OperationPhase.FAILED:
            self._registry.finish(operation_id, target, peer_count=peer_count, reason="failed")
            self._p2p_finished(operation_id, "failed")
        else:
            self._registry.set_phase(operation_id, target, peer_count)

    def complete_p2p_operation(self, operation_id: str, peer_count: int) -> None:
        """Mark an operation completed and claim ``done`` at once.

        Raises:
            IntegrationNotStarted: ``start()`` has not been called yet.
            OperationNotFound: no active operation has this id (maybe already finished,
                or failed by ``stop()``).
            InvalidArgument: ``peer_count`` is not an integer >= 0.
            ForkedIntegration: inherited across ``os.fork()`` (it is the parent's).
        """
        self.refuse_if_forked()
        if self._state is IntegrationState.NEW:
            raise IntegrationNotStarted("call start() before complete_p2p_operation()")
        self._check_peers(peer_count)
        self._registry.finish(operation_id, OperationPhase.COMPLETED, peer_count=peer_count)
        self._p2p_finished(operation_id, "done")

    def fail_p2p_operation(self, operation_id: str, reason: str) -> None:
        """Mark an operation failed and claim ``failed`` at once.

        Raises:
            IntegrationNotStarted: ``start()`` has not been called yet.
            OperationNotFound: no active operation has this id (maybe already finished,
                or failed by ``stop()``).
            ForkedIntegration: inherited across ``os.fork()`` (it is the parent's).
        """
        self.refuse_if_forked()
        if self._state is IntegrationState.NEW:
            raise IntegrationNotStarted("call start() before fail_p2p_operation()")
        self._registry.finish(operation_id, OperationPhase.FAILED, reason=str(reason))
        self._p2p_finished(operation_id, "failed")

    @lock_free
    def execute_with_beat_budget(
        self,
        beats: float | Literal["auto"],
        fn: Callable[..., R],
        *args: Any,
        operation_type: str | None = None,
        **kwargs: Any,
    ) -> R:
        """Run ``fn(*args, **kwargs)`` within a budget of ``beats`` beats (the seed's call).

        If the integration is not running, ``fn`` runs plainly (the seed's fallback).

        Args:
            beats: the budget in beats, or ``"auto"`` (needs ``operation_type``).
            fn: what to run.
            *args: positional arguments for ``fn``.
            operation_type: the claims' and the history's type (not passed on to ``fn``).
            **kwargs: keyword arguments for ``fn``.

        Raises:
            BeatBudgetExceeded: the budget ran out (see :func:`beat_budget`).
            ForkedIntegration: inherited across ``os.fork()`` (it is the parent's).
            InvalidArgument: see :func:`~backbeat_sync.budget.execute_with_beat_budget`.
        """
        return execute_with_beat_budget(self, beats, fn, *args, operation_type=operation_type, **kwargs)

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

    # -- claims --------------------------------------------------------------

    def _encode(self, claim: Claim) -> bytes:
        # A beat sweep's claim goes from its snapshot to bytes (no StatusClaim made), unless
        # claims are signed (the signer takes a StatusClaim) or the claim is built already.
        if type(claim) is LazyClaim and claim.direct and not self._signed:
            return claim.wire()
        return self._encoder(resolve(claim))

    def _emit_operation(self, op: P2POperation) -> None:
        """Queue the claim for ``op`` (called by the registry under its lock).

        What is queued is a snapshot (:class:`LazyClaim`): the claim is built by
        whoever sends or delivers it (the transport's thread, the callback thread).
        """
        self._publish(self._claims.lazy(op, self._clock.current_beat))

    def _emit_operations(self, ops: list[P2POperation]) -> None:
        """Queue the claims of ``ops`` at once (one chunk of a beat's sweep, under the registry lock).

        The transport takes the chunk as it is (``Transport.publish_sweep``): NATS encodes
        the claims straight to bytes there (``ClaimFactory.sweep``) and queues them as runs,
        so no StatusClaim, and no object per claim, is made, which is most of what a beat of
        100,000 claims cost beyond encoding and sending them; other transports queue a
        snapshot each. With ``on_claim`` callbacks or signed claims (both need the
        StatusClaim) the claims are built here, on the beat thread, as before.
        """
        transport = self._transport
        self._health.add("claims_emitted", len(ops))
        beat = self._clock.current_beat
        if not (self._callbacks.claim or self._signed):
            if transport is not None:  # the transport snapshots (or encodes) them now
                transport.publish_sweep(self._status_subject, self._claims, ops, beat)
            return
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
        self._health.add("claims_emitted")
        if self._callbacks.claim:
            self._queue_callback("claim", claim)

    def emit_operation_note(self, operation_id: str, notes: str) -> StatusClaim | None:
        """Claim an active operation at once with a custom ``notes`` line (budget warnings).

        Returns:
            The claim, or None if the operation is no longer active or nobody would
            receive the claim (it is then only counted, never built: see ``audience_changed``).
        """
        self.refuse_if_forked()
        sent: list[StatusClaim] = []

        def emit(op: P2POperation) -> None:
            claim = self._claims.for_operation(op, self._clock.current_beat, notes=notes)
            self._publish(claim)
            sent.append(claim)

        self._registry.emit_now(operation_id, emit, notes=notes)
        return sent[0] if sent else None

    def _emit_health(self) -> None:
        last_err = self._health.last_error_beat
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

    # -- metrics (optional ``prometheus`` extra) --------------------------------

    def serve_metrics(
        self, port: int, *, addr: str = "0.0.0.0", registry: Any = None, max_age_beats: float = 2.0
    ) -> MetricsServer:
        """Serve this integration's Prometheus metrics on ``port`` (see :mod:`backbeat_sync.metrics`).

        ``/metrics`` serves the metrics, ``/healthz`` and ``/readyz`` the probes (see
        :func:`backbeat_sync.metrics.serve_metrics`); other paths are 404.

        Args:
            port: TCP port (0 picks a free one).
            addr: address to bind.
            registry: a ``prometheus_client`` registry to add the metrics to and serve
                (default: the global ``REGISTRY``).
            max_age_beats: ``/readyz`` fails when the last beat is older than this many beats.

        Returns:
            A :class:`~backbeat_sync.metrics.MetricsServer`; ``close()`` it to stop serving.

        Raises:
            ImportError: prometheus-client is not installed (``pip install 'backbeat_sync[prometheus]'``).
        """
        from ..metrics import serve_metrics  # imported on use: prometheus-client is an extra

        self.refuse_if_forked()

        server = serve_metrics(self, port, addr=addr, registry=registry, max_age_beats=max_age_beats)
        self._metrics_servers.append(server)
        return server


def _instrument_otel(integration: Integration) -> Any:
    """``BackbeatConfig(otel=True)``: spans with the global tracer provider (the ``otel`` extra)."""
    try:
        from ..otel import instrument
    except ImportError as exc:
        raise ImportError(
            "BackbeatConfig(otel=True) needs the otel extra: pip install 'backbeat_sync[otel]'"
        ) from exc
    return instrument(integration)
