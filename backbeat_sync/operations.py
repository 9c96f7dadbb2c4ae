"""Operations and their phases, and the thread-safe registry that holds them.

The registry owns one lock. Every change to an operation and the claim that
reports it happen under that lock (the claim is only *queued* there, never
sent), so the claims of one operation leave in the order the changes were
made, whichever threads made them. The one exception makes no claim: while
nobody would hear one, a plain block enters and leaves by the lock-free quiet
path (:mod:`backbeat_sync.quiet`).
"""

from __future__ import annotations

import operator
import threading
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Final, Protocol

import attrs

from .errors import DuplicateOperation, IntegrationNotStarted, InvalidPhaseTransition, OperationNotFound
from .phases import OperationPhase, OperationType
from .quiet import RegistryQuiet
from .workflow import NORMAL_RANK, Flow, RegistryFlows

__all__ = [
    "MAX_COUNTED_TYPES",
    "OTHER_TYPE",
    "OperationCounts",
    "OperationListener",
    "OperationPhase",
    "OperationRegistry",
    "OperationType",
    "P2POperation",
]

#: Distinct operation types a registry counts under their own name; later new types are
#: counted as :data:`OTHER_TYPE`, so metric label values stay bounded (types, never ids).
MAX_COUNTED_TYPES: Final = 32
OTHER_TYPE: Final = "other"


@attrs.define(slots=True, eq=False)
class P2POperation:
    """One tracked operation (the seed's ``P2POperation``).

    Attributes:
        id: unique operation id (the claim's ``task_id``).
        type: ``election``, ``dht_store``, ``pubsub_sync``, ``peer_discovery`` or a user type.
        start_beat: beat index when it started.
        estimated_beats: the beat budget it was started with.
        phase: current phase.
        peer_count: peers involved, as last reported.
        start_time: wall-clock start (epoch seconds).
        data: whatever the caller attached.
        reason: why it failed (FAILED only).
        announced: whether a claim has gone out for it yet (quiet budget calls start unannounced).
        flow: its place in a workflow (parent, correlation, dependencies, progress,
            priority), or None for a root with none of these (see ``backbeat_sync.workflow``).
    """

    id: str
    type: str
    start_beat: int
    estimated_beats: int
    phase: OperationPhase = OperationPhase.STARTED
    peer_count: int = 0
    start_time: float = 0.0
    data: Any = None
    reason: str | None = None
    announced: bool = True
    #: The clock epoch ``start_beat`` was read in (see ``BeatClock.beat_and_epoch``).
    epoch: int = 0
    #: Where an automatic budget came from (``"profile"``, ``"history"``); None for a number given.
    budget_source: str | None = None
    flow: Flow | None = None

    @property
    def priority(self) -> str:
        """``critical``, ``high``, ``normal`` (the default) or ``low``."""
        return "normal" if self.flow is None else self.flow.priority

    @property
    def active(self) -> bool:
        """True until the operation completes or fails."""
        return not self.phase.is_final

    def beats_passed(self, current_beat: int) -> int:
        """Beats since the start, ``current_beat - start_beat`` (never negative)."""
        return max(0, current_beat - self.start_beat)


Emit = Callable[[P2POperation], None]

# ``phase._value_``, a plain attribute: an Enum's own hash is Python code, a str's is not.
_TYPE_AND_PHASE: Final = operator.attrgetter("type", "phase._value_")
_TYPE: Final = operator.attrgetter("type")
_COMPLETED: Final = OperationPhase.COMPLETED.value
_REUSED_MAX: Final = 64
#: The seed's types: always counted under their own name.
OPERATION_TYPES: Final = frozenset(t.value for t in OperationType)


@attrs.frozen
class OperationCounts:
    """Operations a registry has seen, by type (read by :mod:`backbeat_sync.metrics`).

    Attributes:
        started: operation type -> operations registered.
        finished: ``(operation type, outcome)`` -> operations finished; outcome is
            ``completed`` or ``failed``.
        exhausted: ``(operation type, mode, outcome)`` -> budgets that ran out, as in
            the metric ``backbeat_budget_exhaustions_total``.
    """

    started: dict[str, int]
    finished: dict[tuple[str, str], int]
    exhausted: dict[tuple[str, str, str], int]


class OperationListener(Protocol):
    """Hears every claimed operation's lifecycle (``OperationRegistry.add_listener``).

    Each method runs on the thread that made the change (an application thread,
    the beat thread, the budget watchdog), after the registry lock is released:
    it must be quick and must not raise (what it raises is dropped). Changes
    made on two threads at once may be heard in either order; ``finished`` is
    heard once per operation, ``added`` only for one still active.
    """

    def added(self, op: P2POperation) -> None:
        """``op`` was registered (``start_p2p_operation``, ``track_operation``, a budget call claimed)."""
        ...

    def changed(self, op: P2POperation) -> None:
        """``op`` moved to a new phase (or its peer count changed)."""
        ...

    def noted(self, op: P2POperation, notes: str) -> None:
        """``op`` was claimed with a custom notes line (a budget warning, a budget running out)."""
        ...

    def finished(self, op: P2POperation) -> None:
        """``op`` completed or failed (``op.phase``, ``op.reason``)."""
        ...


def _tell(listeners: tuple[OperationListener, ...], event: str, op: P2POperation, *more: Any) -> None:
    for listener in listeners:
        try:
            getattr(listener, event)(op, *more)
        except Exception:  # a listener must not break the change that it hears about
            pass


def _held(lock: threading.Lock) -> Any:
    """A context manager that is ``lock`` held: ``with _held(lock):`` runs what ``with lock:`` runs.

    Its ``__enter__`` and ``__exit__`` are the lock's own ``acquire`` and ``__exit__``, bound
    once, in a class of their own: ``with`` looks both up on the type and calls them as they
    are (a builtin method is no descriptor), whereas ``with lock:`` binds the lock type's two
    methods anew every time (two objects made and freed: ~50 ns of the ~170 ns it costs here).
    The same C calls in the same order, so the same points where a signal handler or an
    asynchronous exception may run: none between acquiring and being inside the block.
    """
    return type("_Held", (), {"__slots__": (), "__enter__": lock.acquire, "__exit__": lock.__exit__})()


class OperationRegistry(RegistryQuiet, RegistryFlows):
    """Thread-safe store of operations; every change is reported through ``emit`` under the lock.

    Args:
        emit: called with the operation after each change that must be claimed,
            while the registry lock is held. It must only queue, never block.
    """

    def __init__(self, emit: Emit) -> None:
        self._lock = threading.Lock()
        #: ``with self._held:`` is ``with self._lock:`` (see :func:`_held`), for start and finish.
        self._held = _held(self._lock)
        self._claiming: Emit | None = emit
        self._emit: Emit | None = emit
        #: Claims not made because nobody would receive them, but for plain blocks' (see :attr:`unheard`).
        self._unheard = 0
        self._active: dict[str, P2POperation] = {}
        self._finished: dict[str, P2POperation] = {}
        #: Copy-on-write; empty (a false tuple, one check) unless someone listens.
        self._listeners: tuple[OperationListener, ...] = ()
        self._shifts: list[int] = []  # _shifts[e]: index shift from clock epoch e to e + 1
        #: How many clock epochs it has seen (see :meth:`rebase`): ``len(_shifts)``, kept as an
        #: int for the start's test (no len() call; read by the quiet path too).
        self.epochs = 0
        self._closed = False  # set by fail_all(): no new operation
        # Whether operations are counted by type (see operation_counts() and counting).
        self._counting = False
        # Operations by type (see operation_counts()), kept off the hot paths: a finished
        # operation is tallied when the downbeat clean-up drops it (or a new one takes its
        # id); the ones still active or waiting for clean-up are counted when read.
        self._labels: set[str] = set()  # user types counted under their own name (capped)
        self._tally: dict[tuple[str, str], int] = {}  # (label, outcome) of dropped finished ops
        self._exhausted: dict[tuple[str, str, str], int] = {}
        # (type, phase value) of finished operations whose id a new one took: the hot path
        # of a reused id (track_operation("k", ...) in a loop) only bumps this; folded into
        # _tally when read or when it holds too many distinct types.
        self._reused: dict[tuple[str, str], int] = {}
        #: Active operations of a priority other than normal: id -> rank (the sweep's order).
        self._ranked: dict[str, int] = {}
        #: Any operation with a flow was ever added: only then does finish() look at the three
        #: workflow maps (one test on the hot path instead of three).
        self._flows = False
        #: Active operation id -> ids of active operations waiting for it (depends_on, wait_for).
        self._dependents: dict[str, dict[str, None]] = {}
        #: Active operation id -> events to set when it finishes (``op.wait_for``).
        self._waiters: dict[str, list[threading.Event]] = {}
        self._init_quiet()  # the quiet path's fields (RegistryQuiet), once the fields it reads are set

    def _fold_reused(self) -> None:
        """Move the reused-id counts into the tally, by label (lock held)."""
        tally = self._tally
        for (op_type, phase), n in self._reused.items():
            key = (self._label(op_type), "completed" if phase == _COMPLETED else "failed")
            tally[key] = tally.get(key, 0) + n
        self._reused.clear()

    def _label(self, operation_type: str) -> str:
        """``operation_type`` as a metric label: itself, or OTHER_TYPE once the cap is full (lock held)."""
        if operation_type in OPERATION_TYPES or operation_type in self._labels:
            return operation_type
        if len(self._labels) < MAX_COUNTED_TYPES:
            self._labels.add(operation_type)
            return operation_type
        return OTHER_TYPE

    def _tally_finished(self, ops: Iterable[P2POperation]) -> None:
        """Count finished operations about to be dropped (lock held; C-speed over many)."""
        tally = self._tally
        for (op_type, phase), n in Counter(map(_TYPE_AND_PHASE, ops)).items():
            key = (self._label(op_type), "completed" if phase == _COMPLETED else "failed")
            tally[key] = tally.get(key, 0) + n

    def count_exhaustion(self, operation_type: str, mode: str, outcome: str) -> None:
        """Count a budget that ran out, by type (the budget engine calls it; any thread)."""
        with self._lock:
            key = (self._label(operation_type), mode, outcome)
            self._exhausted[key] = self._exhausted.get(key, 0) + 1

    def operation_counts(self) -> OperationCounts:
        """Counts of operations started and finished, and of budgets exhausted, by type.

        Counting starts with the first call (or when :attr:`counting` is set): started
        = finished + active, so nothing is counted on the hot paths; the registry lock
        is held while the active and finished operations are read (O(their number)).
        Budget exhaustions are counted from the start.
        """
        with self._lock:
            self.counting = True
            self._fold_reused()
            finished = dict(self._tally)
            # Copies (one C call each): a plain block may enter or leave meanwhile (quiet path).
            for op in list(self._finished.values()):
                key = (
                    self._label(op.type),
                    "completed" if op.phase is OperationPhase.COMPLETED else "failed",
                )
                finished[key] = finished.get(key, 0) + 1
            started: dict[str, int] = {}
            for (label, _), n in finished.items():
                started[label] = started.get(label, 0) + n
            for op in list(self._active.values()):
                label = self._label(op.type)
                started[label] = started.get(label, 0) + 1
            return OperationCounts(started, finished, dict(self._exhausted))

    def set_quiet(self, quiet: bool) -> None:
        """While quiet, changes are only counted in :attr:`unheard`, not passed to ``emit``.

        The integration turns this on while no one would receive a claim (no
        ``on_claim`` callback, no subscriber on the in-process bus), so no claim
        is built for nobody. Any thread; takes effect from the next change.
        """
        self._emit = None if quiet else self._claiming
        self._requiet()

    def inherited_by_fork(self) -> None:
        """Fork child: these operations are the parent's. The lock is made anew (a parent
        thread may have held it at the fork, and would never release it here), the registry
        is closed, and nothing is claimed or told to listeners any more: a block the parent
        entered and the child leaves completes in the child's copy only, silently (the
        parent completes and claims its own)."""
        self._lock = threading.Lock()
        self._held = _held(self._lock)  # the new lock's (start and finish enter it)
        self._closed = True
        self._claiming = self._emit = None
        self._listeners = ()
        self._init_quiet()

    def _claim(self, op: P2POperation) -> None:
        emit = self._emit
        if emit is None:
            self._unheard += 1
        else:
            emit(op)

    def add_listener(self, listener: OperationListener) -> Callable[[], None]:
        """Tell ``listener`` about every operation from now on (see :class:`OperationListener`).

        Returns:
            A function that removes it.
        """
        with self._lock:
            self._listeners = (*self._listeners, listener)
        self._requiet()

        def remove() -> None:
            with self._lock:
                self._listeners = tuple(x for x in self._listeners if x is not listener)
            self._requiet()

        return remove

    @property
    def lock(self) -> threading.Lock:
        """The registry lock (held while claims are queued)."""
        return self._lock

    @property
    def active_count(self) -> int:
        """Number of operations not yet completed or failed."""
        return len(self._active)

    @property
    def finished_count(self) -> int:
        """Finished operations waiting for the next downbeat clean-up."""
        return len(self._finished)

    def get(self, operation_id: str) -> P2POperation:
        """Return a copy of the operation (active, or finished and not yet cleaned up).

        Raises:
            OperationNotFound: no such operation.
        """
        with self._lock:
            op = self._active.get(operation_id) or self._finished.get(operation_id)
            if op is None:
                raise OperationNotFound(operation_id)
            return attrs.evolve(op)

    def active_ids(self) -> list[str]:
        """Ids of the active operations (a copy)."""
        with self._lock:
            return list(self._active)

    def add(self, op: P2POperation) -> None:
        """Register a new operation; emits its start claim if ``op.announced``.

        Raises:
            DuplicateOperation: an active operation already has this id.
            IntegrationNotStarted: the registry is closed (its integration is stopping).
        """
        with self._lock:
            if self._closed:
                raise IntegrationNotStarted(f"stopping: operation {op.id} not registered")
            # setdefault, not a test then a store: a block may enter by the quiet path (no lock)
            if self._active.setdefault(op.id, op) is not op:
                raise DuplicateOperation(op.id)
            self._catch_up(op)
            old = self._finished.pop(op.id, None)
            if old is not None and self.counting:  # a new one takes a finished one's id: count it
                key = (old.type, old.phase._value_)
                reused = self._reused
                reused[key] = reused.get(key, 0) + 1
                if len(reused) > _REUSED_MAX:
                    self._fold_reused()
            if op.flow is not None:
                self._flow_added(op)
            if op.announced:
                self._claim(op)
            if op.flow is not None and op.flow.note is not None:
                op.flow = attrs.evolve(op.flow, note=None)  # said once
        if self._listeners:
            _tell(self._listeners, "added", op)

    def start(self, op: P2POperation, then: OperationPhase | None = None) -> None:
        """Register ``op`` and claim it; then, if ``then`` is given, move it there and claim that too.

        One lock for both (``track_operation`` enters STARTED, then EXECUTING), so the
        two claims are adjacent and in order.

        Raises:
            DuplicateOperation: an active operation already has this id.
            IntegrationNotStarted: the registry is closed (its integration is stopping).
            InvalidPhaseTransition: ``then`` is final, or behind ``op.phase``.
        """
        if then is not None and (then._final or then._rank < op.phase._rank):  # the properties, inlined
            raise InvalidPhaseTransition(op.id, op.phase.value, then.value)
        op_id = op.id
        flow = op.flow
        with self._held:
            if self._closed:
                raise IntegrationNotStarted(f"stopping: operation {op_id} not registered")
            active = self._active
            if active.setdefault(op_id, op) is not op:  # as in add()
                raise DuplicateOperation(op_id)
            if op.epoch < self.epochs:
                self._catch_up(op)
            old = self._finished.pop(op_id, None)
            if old is not None and self.counting:  # a new one takes a finished one's id: count it
                key = (old.type, old.phase._value_)
                reused = self._reused
                reused[key] = reused.get(key, 0) + 1
                if len(reused) > _REUSED_MAX:
                    self._fold_reused()
            op.announced = True
            if flow is not None:
                self._flow_added(op)
            emit = self._emit
            if emit is None:  # quiet: counted, not built
                if then is None:
                    self._unheard += 1
                else:
                    op.phase = then
                    self._unheard += 2
            else:
                emit(op)
                if then is not None:
                    op.phase = then
                    emit(op)
            if flow is not None:
                flow = op.flow  # _flow_added may have replaced it
                if flow is not None and flow.note is not None:
                    op.flow = attrs.evolve(flow, note=None)  # said once
        if self._listeners:
            _tell(self._listeners, "added", op)

    def set_phase(
        self, operation_id: str, phase: OperationPhase, peer_count: int | None = None
    ) -> P2POperation:
        """Move an active operation to ``phase`` (forward only) and claim the change.

        Setting the current phase again only updates the peer count. COMPLETED and
        FAILED finish the operation, as :meth:`finish` does.

        Raises:
            OperationNotFound: no active operation has this id.
            InvalidPhaseTransition: ``phase`` is behind the current phase.
        """
        if phase.is_final:
            return self.finish(operation_id, phase, peer_count=peer_count)
        with self._lock:
            op = self._active.get(operation_id)
            if op is None:
                raise OperationNotFound(operation_id)
            if phase.rank < op.phase.rank:
                raise InvalidPhaseTransition(operation_id, op.phase.value, phase.value)
            op.phase = phase
            if peer_count is not None:
                op.peer_count = peer_count
            op.announced = True
            self._claim(op)
        if self._listeners:
            _tell(self._listeners, "changed", op)
        return op

    def finish(
        self,
        operation_id: str,
        phase: OperationPhase,
        peer_count: int | None = None,
        *,
        reason: str | None = None,
        quiet: bool = False,
    ) -> P2POperation:
        """Complete or fail an active operation and claim it at once.

        Args:
            operation_id: the operation.
            phase: COMPLETED or FAILED.
            peer_count: final peer count, if known.
            reason: why it failed.
            quiet: with an operation never announced, complete it without a claim
                (a budget call that started and ended between two beats).

        Raises:
            OperationNotFound: no active operation has this id (it may have finished already).
        """
        with self._held:
            # A subscript and a ``del``, not ``pop()``: after a call CPython may run a signal
            # handler, and one that raises (``stop(); sys.exit(0)`` on SIGTERM) would leave the
            # operation in neither map, never claimed. No handler runs between these steps
            # and the claim being queued (or, if queuing fails, the operation put back).
            # The ``del`` may miss too: a block leaving by the quiet path takes its own without the lock.
            active = self._active
            try:
                op = active[operation_id]
                del active[operation_id]
            except KeyError:
                raise OperationNotFound(operation_id) from None
            op.phase = phase
            if peer_count is not None:
                op.peer_count = peer_count
            op.reason = reason
            self._finished[operation_id] = op
            heard = not quiet or op.announced
            if heard:
                op.announced = True
                emit = self._emit
                if emit is None:  # quiet: counted, not built
                    self._unheard += 1
                else:
                    try:
                        emit(op)
                    except BaseException:
                        # Queuing the claim failed (a RecursionError at the bottom of a deep
                        # stack): the operation stays active (C-level steps only), so a later
                        # finish() (or stop()) claims it again; its final claim is never lost.
                        active[operation_id] = op
                        raise
            if self._flows:
                self._ranked.pop(operation_id, None)
                if self._dependents or self._waiters:
                    self._flow_finished(op)
        if heard and self._listeners:
            _tell(self._listeners, "finished", op)
        return op

    # -- workflows (docs/workflows.md): every method below runs under the lock ------------

    def _flow_added(self, op: P2POperation) -> None:
        """A new operation with a flow: rank it; find which of its dependencies still run."""
        flow = op.flow
        assert flow is not None
        self._saw_flows()
        if flow.rank != NORMAL_RANK:
            self._ranked[op.id] = flow.rank
        if not flow.depends_on:
            return
        pending: list[str] = []
        failed = list(flow.failed)
        for dep in dict.fromkeys(flow.depends_on):
            if dep == op.id:
                continue
            if dep in self._active:
                pending.append(dep)
                self._dependents.setdefault(dep, {})[op.id] = None
            else:
                done = self._finished.get(dep)
                if done is not None and done.phase is OperationPhase.FAILED and dep not in failed:
                    failed.append(dep)
        new_failed = [d for d in failed if d not in flow.failed]
        note = f"dependency failed: {', '.join(new_failed)}" if new_failed else flow.note
        op.flow = attrs.evolve(flow, pending=tuple(pending), failed=tuple(failed), note=note)

    def _flow_finished(self, op: P2POperation) -> None:
        """``op`` finished: wake its waiters; its dependents stop waiting for it (and claim so)."""
        waiters = self._waiters.pop(op.id, None)
        if waiters:
            for event in waiters:
                event.set()
        flow = op.flow
        if flow is not None and flow.pending:  # it finished while still waiting itself
            for dep in flow.pending:
                dependents = self._dependents.get(dep)
                if dependents is not None:
                    dependents.pop(op.id, None)
                    if not dependents:
                        del self._dependents[dep]
        dependents = self._dependents.pop(op.id, None)
        if not dependents:
            return
        failed = op.phase is OperationPhase.FAILED
        for dependent_id in dependents:
            d = self._active.get(dependent_id)
            if d is None or d.flow is None:
                continue
            f = d.flow
            d.flow = attrs.evolve(
                f,
                pending=tuple(x for x in f.pending if x != op.id),
                failed=(*f.failed, op.id) if failed and op.id not in f.failed else f.failed,
                note=f"dependency failed: {op.id}" if failed else None,
            )
            if d.announced:
                self._claim(d)
            if failed:
                d.flow = attrs.evolve(d.flow, note=None)  # said once

    def _catch_up(self, op: P2POperation) -> None:
        while op.epoch < len(self._shifts):
            op.start_beat += self._shifts[op.epoch]
            op.epoch += 1

    def rebase(self, epoch: int, shift: int) -> None:
        """The clock moved to ``epoch`` with its index sequence shifted by ``shift`` (lock-on, reset).

        Active operations started in earlier epochs move their ``start_beat`` by the
        shift, so beats counted before the move still count and nothing jumps.
        """
        with self._lock:
            while len(self._shifts) < epoch:
                self._shifts.append(0)
            self.epochs = len(self._shifts)
            self._shifts[epoch - 1] += shift
            for op in list(self._active.values()):  # a copy: see operation_counts
                self._catch_up(op)

    def emit_now(self, operation_id: str, emit: Emit, *, notes: str | None = None) -> bool:
        """Call ``emit(op)`` for an active operation under the lock (marks it announced).

        While quiet (:meth:`set_quiet`) ``emit`` is not called: the claim is only counted.

        Args:
            operation_id: the operation.
            emit: queues its claim.
            notes: the custom notes line that claim carries, for listeners (``noted``).

        Returns:
            False if no active operation has this id.
        """
        with self._lock:
            op = self._active.get(operation_id)
            if op is None:
                return False
            op.announced = True
            if self._emit is None:
                self._unheard += 1
            else:
                emit(op)
        if notes is not None and self._listeners:
            _tell(self._listeners, "noted", op, notes)
        return True

    def emit_active(
        self,
        chunk: int = 1024,
        *,
        emit_chunk: Callable[[list[P2POperation]], None] | None = None,
    ) -> int:
        """Claim every active operation (the per-beat claims), ``chunk`` at a time.

        By priority: critical, then high, normal and low, each in registration order.

        The lock is taken once per chunk, so application threads are not held
        up for the whole sweep; an operation that finished meanwhile is skipped.

        Args:
            chunk: operations per lock acquisition.
            emit_chunk: if given, called once per chunk with its operations, in
                order and under the lock, instead of ``emit`` once per operation
                (the integration queues a whole chunk of claims at once).
                While quiet (:meth:`set_quiet`) they are only counted.

        Returns:
            How many claims were due (queued, or counted as unheard).
        """
        with self._lock:
            ranked = self._ranked
            if ranked:  # critical and high first, low last (each in registration order)
                buckets: tuple[list[str], ...] = ([], [], [], [])
                for op_id in list(self._active):  # a copy: see operation_counts
                    buckets[ranked.get(op_id, NORMAL_RANK)].append(op_id)
                ids = [i for bucket in buckets for i in bucket]
            else:
                ids = list(self._active)
        emitted = 0
        active = self._active
        for start in range(0, len(ids), chunk):
            with self._lock:
                emit = self._emit
                ops: list[P2POperation] = []
                for op_id in ids[start : start + chunk]:
                    op = active.get(op_id)
                    if op is None:
                        continue
                    op.announced = True
                    if emit is None:
                        self._unheard += 1
                    elif emit_chunk is None:
                        emit(op)
                    else:
                        ops.append(op)
                    emitted += 1
                if ops and emit_chunk is not None:
                    emit_chunk(ops)
        return emitted

    def cleanup_finished(self) -> int:
        """Drop finished operations (done on each downbeat). Returns how many were dropped."""
        with self._lock:
            n = len(self._finished)
            if self._counting:
                self._tally_finished(list(self._finished.values()))
            self._finished.clear()
            return n

    def fail_all(self, reason: str) -> list[str]:
        """Close the registry, then fail every active operation with ``reason`` (``stop()``).

        Once closed, :meth:`add` and :meth:`start` raise :class:`IntegrationNotStarted`:
        an operation registered by another thread while ``stop()`` works would
        otherwise miss both this sweep and the flush that follows it.

        Returns:
            The ids of the operations failed.
        """
        with self._lock:
            self._closed = True
        self._requiet()
        failed = []
        for op_id in self.active_ids():
            try:
                self.finish(op_id, OperationPhase.FAILED, reason=reason)
            except OperationNotFound:
                continue
            failed.append(op_id)
        return failed

    def __iter__(self) -> Iterator[P2POperation]:
        """Iterate over copies of the active operations."""
        with self._lock:
            ops = [attrs.evolve(op) for op in list(self._active.values())]
        return iter(ops)
