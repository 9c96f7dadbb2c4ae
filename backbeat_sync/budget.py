"""Beat budgets for sync code: ``track_operation``, ``@beat_budget``, ``execute_with_beat_budget``.

One engine, two faces: every budgeted call or ``with`` block runs inside a fresh
:class:`Tracker`. ``track_operation`` is the seed's explicit operation (claimed at
start, on each phase change and at the end); a ``@beat_budget`` call is the same
tracker made lighter: it costs no registry entry and no message unless it is
still running at a beat, gets a warning, runs out or fails.

The budget counts in beats on :meth:`BeatClock.budget_position`, so it stretches
with the tempo and keeps counting when the pulse is silent. The process-wide
watchdog (:mod:`backbeat_sync._watchdog`) fires warnings and exhaustion; see
``docs/budgets.md`` for how an exception is delivered only where it belongs.
"""

from __future__ import annotations

import inspect
import itertools
import math
import threading
import time
from collections.abc import Callable, Iterable
from types import TracebackType
from typing import TYPE_CHECKING, Any, Final, Literal, ParamSpec, Protocol, TypeVar, cast

import attrs
import wrapt

from ._logging import library_logger as logger
from ._runtime import RUNTIME, WATCHDOG
from ._time import SYSTEM_TIME
from ._watchdog import (
    ARMED,
    OWNER,
    RETRY_SECONDS,
    SYNC,
    Fired,
    ThreadSlot,
    _local,
    all_slots,
    clear_async_exc,
    current_slot,
)
from .errors import BeatBudgetExceeded, IntegrationNotStarted, InvalidArgument, OperationNotFound
from .operations import OperationPhase, P2POperation
from .protocol import check_wire_id

if TYPE_CHECKING:
    from .clock import BeatClock
    from .integration import Integration

__all__ = [
    "BudgetSettings",
    "Tracker",
    "beat_budget",
    "execute_with_beat_budget",
    "precise_mode",
    "track_operation",
]

P = ParamSpec("P")
R = TypeVar("R")
T = TypeVar("T")

OnExhaust = Literal["interrupt", "raise_after", "warn"]
ON_EXHAUST: Final = ("interrupt", "raise_after", "warn")
DEFAULT_WARN_AT: Final = (0.5, 0.75, 0.9)
#: An exception raised more than this long after the budget ran out is ``late``
#: (the code was blocked in C and could not be interrupted on time).
LATE_SECONDS: Final = 0.05
#: After an interrupt, the watchdog checks back this long later (the owner should
#: have claimed the failure; if the thread is blocked, the watchdog says so).
FOLLOWUP_SECONDS: Final = 0.05
#: Near the deadline, ``op.wait`` polls its event at most this far apart.
WAIT_POLL_SECONDS: Final = 0.001
#: ``op.sleep``/``op.wait`` re-time themselves at least this often (tempo changes).
WAIT_RETIME_SECONDS: Final = 0.05

_STARTED: Final = OperationPhase.STARTED
#: A clock state whose position is 0.0 at time 0.0 (a tracker that never started).
_ORIGIN: Final = (0.0, 0.0, 1.0, 0.0)
_EXECUTING: Final = OperationPhase.EXECUTING
_COMPLETED: Final = OperationPhase.COMPLETED
_seq = itertools.count(1)
_next_seq = _seq.__next__  # one call less than next(_seq) on the hot paths
_monotonic = time.monotonic
_sleep = time.sleep
#: Serialises announcing and finishing budget operations (watchdog, beat thread, owners).
_ops_lock = threading.RLock()


# -- settings ------------------------------------------------------------------------


def _check_beats(beats: Any) -> float:
    if (
        isinstance(beats, bool)
        or not isinstance(beats, (int, float))
        or not math.isfinite(beats)
        or beats <= 0
    ):
        raise InvalidArgument("beats", beats, "must be a finite number of beats > 0")
    return float(beats)


def _check_warn_at(warn_at: Any) -> tuple[float, ...]:
    if warn_at is None:
        return ()
    try:
        values = tuple(warn_at)
    except TypeError:
        raise InvalidArgument("warn_at", warn_at, "must be an iterable of fractions 0 < f < 1") from None
    for f in values:
        if isinstance(f, bool) or not isinstance(f, (int, float)) or not 0.0 < f < 1.0:
            raise InvalidArgument("warn_at", warn_at, "must be an iterable of fractions 0 < f < 1")
    return tuple(sorted({float(f) for f in values}))


@attrs.frozen
class BudgetSettings:
    """The settings of a budget, checked once (at decoration, or when a block is made).

    Attributes:
        beats: the budget in beats (> 0).
        operation_type: the claims' ``operation_type``.
        on_exhaust: ``"interrupt"``, ``"raise_after"`` or ``"warn"``.
        warn_at: fractions of the budget at which a warning is claimed (sorted).
        on_warning: called as ``on_warning(tracker, fraction)`` on the budget callback thread.
        name: operation id (``track_operation``) or id prefix (``@beat_budget``).
        strict: raise :class:`IntegrationNotStarted` instead of running plainly.
        integration: the integration to use; None for the process default.
        explicit: True for ``track_operation`` (claimed from the start).
        manual_phases: do not move to EXECUTING on entry.
        peers: initial peer count.
        data: attached to the operation.
    """

    beats: float = attrs.field(converter=_check_beats)
    operation_type: str = "budget"
    on_exhaust: str = "interrupt"
    warn_at: tuple[float, ...] = attrs.field(default=DEFAULT_WARN_AT, converter=_check_warn_at)
    on_warning: Callable[[Tracker, float], Any] | None = None
    name: str | None = None
    strict: bool = False
    integration: Integration | None = None
    explicit: bool = False
    manual_phases: bool = False
    peers: int = 0
    data: Any = None
    estimated: int = attrs.field(init=False)
    first_fraction: float = attrs.field(init=False)
    first_beats: float = attrs.field(init=False)  #: beats from the start to the first event

    @estimated.default
    def _estimated(self) -> int:
        return max(1, math.ceil(self.beats - 1e-9))

    @first_fraction.default
    def _first(self) -> float:
        return self.warn_at[0] if self.warn_at else 1.0

    @first_beats.default
    def _first_beats(self) -> float:
        return self.beats * self.first_fraction

    def materialize(self, slot: ThreadSlot, seq: int, entry: list[Any]) -> Tracker:
        """The tracker of a ``@beat_budget`` call's plain ``live`` entry (see :func:`_materialize`)."""
        return _materialize(slot, seq, entry)

    def __attrs_post_init__(self) -> None:
        if self.on_exhaust not in ON_EXHAUST:
            raise InvalidArgument("on_exhaust", self.on_exhaust, f"must be one of {', '.join(ON_EXHAUST)}")
        check_wire_id("operation_type", self.operation_type)
        if self.name is not None and (not isinstance(self.name, str) or not self.name):
            raise InvalidArgument("name", self.name, "must be a non-empty string")
        if self.on_warning is not None and not callable(self.on_warning):
            raise InvalidArgument("on_warning", self.on_warning, "must be callable")
        if isinstance(self.peers, bool) or not isinstance(self.peers, int) or self.peers < 0:
            raise InvalidArgument("peers", self.peers, "must be an integer >= 0")


# -- the beat thread's hook ----------------------------------------------------------

_new = object.__new__


def announce_running(integration: Integration) -> None:
    """Called on ``integration``'s beat thread at each beat: budget calls still running
    are claimed from now on."""
    with _ops_lock:
        for slot in all_slots():
            for seq, e in list(slot.live.items()):
                t = e[0]
                if t is None:
                    if e[2] is not integration:
                        continue
                    t = _materialize(slot, seq, e)
                if t.integration is integration and not t.announced and t.fired is ARMED:
                    t._announce()


_make_lock = threading.Lock()


def _materialize(slot: ThreadSlot, seq: int, entry: list[Any]) -> Tracker:
    """The tracker of the ``live`` entry ``entry`` (key ``seq``), made on first need (any thread).

    A ``@beat_budget`` call arms a plain entry ``[None, settings, integration, clock
    state, start time]``; the watchdog, the beat hook or the owner's slow path makes
    its tracker when one of them needs it. Made once, under a lock.
    """
    t = entry[0]
    if t is not None:
        return cast(Tracker, t)
    with _make_lock:
        t = entry[0]
        if t is None:
            t = _new(Tracker)
            t.settings = entry[1]
            t.integration = entry[2]
            t.st_in = entry[3]
            t.t_in = entry[4]
            t.seq = seq
            t.slot = slot
            entry[0] = t
    return cast(Tracker, t)


def _log_fallback(what: str) -> None:
    RUNTIME.log_fallback(what)


# -- the tracker ----------------------------------------------------------------------


class Tracker:
    """One budgeted call or block: its budget, its operation, its claims.

    Made by :func:`track_operation` (explicit operation, a context manager) or
    per call by :func:`beat_budget` / :func:`execute_with_beat_budget`.

    Example:
        >>> import backbeat_sync as bb
        >>> cfg = bb.BackbeatConfig(cluster_id="dev", agent_id="doc", nats_url="local://tracker-doc",
        ...                         tempo_bpm=600)
        >>> with bb.Integration(cfg, node_id="n1") as integration:
        ...     @bb.beat_budget(8, integration=integration)
        ...     def store(key: str) -> str:
        ...         return key.upper()
        ...     with bb.track_operation("dht-store-k", "dht_store", beats=8, peers=3,
        ...                             integration=integration) as op:
        ...         op.set_phase(bb.OperationPhase.EXECUTING, peers=5)
        ...         op.check()
        ...         store("k")
        'K'
    """

    # Fields set for every tracker are slots. The rest live in a lazily made
    # ``__dict__`` and default to the class attributes below, so a tracker made
    # for a decorated call (only when something needs it: see ``_materialize``)
    # pays for seven stores, not twenty. ``_Block`` (track_operation) makes slots
    # of the few more it always sets.
    __slots__ = ("__dict__", "data", "integration", "op_id", "seq", "settings", "slot", "st_in", "t_in")

    settings: BudgetSettings
    integration: Integration | None
    slot: ThreadSlot
    seq: int
    st_in: tuple[float, float, float, float]  #: the clock's state when the budget started
    t_in: float  #: the clock's monotonic time when the budget started
    op_id: str  #: the operation id of an explicit operation (``track_operation``)
    data: Any  #: attached to an explicit operation

    event_pos: float | None = None  #: position of the next event (set when the watchdog takes it)
    announced: bool = False  #: its operation is in the registry (claimed)
    done: bool = False  #: the owner has left (slow path; the fast path just leaves ``slot.live``)
    finished: bool = False  #: its operation is completed or failed
    outcome: BaseException | None = None  #: the exception the owner left with
    exhausted: bool = False  #: ran out without being interrupted (raise_after, warn, suspect)
    fired: Fired = ARMED  #: who won the budget and how (see ``Fired``)
    delivered: bool = False  #: its exception has been raised in the owner thread
    promoted: bool = False  #: the watchdog has it in its heap
    next_i: int = 0  #: index of the next warning (len(warn_at): exhaustion; more: follow-up)
    exc: BaseException | None = None  #: the exception raised for it
    exc_class: Any = None  #: the class set asynchronously (made when it fires)
    fired_at: float = 0.0  #: monotonic time it fired
    followup_noted: bool = False
    spent_counted: bool = False  #: its exhaustion has been counted (health, metrics)
    peers: int = 0

    def __init__(self, settings: BudgetSettings, integration: Integration | None) -> None:
        self.settings = settings
        self.integration = integration
        self.seq = _next_seq()
        self.peers = settings.peers
        self.st_in = _ORIGIN
        self.t_in = 0.0
        self.op_id = settings.name or ""
        self.data = settings.data

    @property
    def start_pos(self) -> float:
        """The budget position at which the budget started (BeatClock.budget_position then)."""
        idx, t0, spb, off = self.st_in
        return idx + off + (self.t_in - t0) / spb

    @property
    def clock(self) -> BeatClock:
        """The beat clock the budget counts on (its integration's)."""
        return cast("Integration", self.integration)._clock

    def first_event(self) -> float:
        """Position of the first event: the first warning, or the deadline."""
        return self.start_pos + self.settings.first_beats

    @property
    def deadline(self) -> float:
        """The budget position at which the budget runs out."""
        return self.start_pos + self.settings.beats

    # -- public face -------------------------------------------------------------

    @property
    def operation_id(self) -> str:
        """The operation id (the claims' ``task_id``)."""
        s = self.settings
        if s.explicit:
            return self.op_id
        return f"{s.name}-{self.seq}"

    @property
    def budget_beats(self) -> float:
        """The budget, in beats."""
        return self.settings.beats

    @property
    def beats_used(self) -> float:
        """Beats elapsed since the budget started (0.0 when running without an integration)."""
        if self.integration is None:
            return 0.0
        return max(0.0, self.clock.budget_position() - self.start_pos)

    @property
    def beats_left(self) -> float:
        """Beats left before the budget runs out (never negative)."""
        return max(0.0, self.settings.beats - self.beats_used)

    @property
    def progress(self) -> float:
        """Fraction of the budget used, 0.0 to 1.0."""
        return min(1.0, self.beats_used / self.settings.beats)

    @property
    def spent(self) -> bool:
        """Whether the budget has run out."""
        return self.integration is not None and self.beats_used >= self.settings.beats

    def set_phase(self, phase: OperationPhase | str, peers: int | None = None) -> None:
        """Move the operation to a later phase and claim it (forward only).

        Args:
            phase: STARTED, CONNECTING, NEGOTIATING or EXECUTING (or its name); leaving
                the block completes or fails the operation.
            peers: the peer count now (unchanged if None).

        Raises:
            InvalidArgument: not an active phase, or ``peers`` is not an integer >= 0.
            InvalidPhaseTransition: ``phase`` is behind the current phase.
        """
        try:
            target = OperationPhase.coerce(phase)
        except ValueError as exc:
            raise InvalidArgument("phase", phase, str(exc)) from None
        if target.is_final:
            raise InvalidArgument("phase", phase, "leave the block to complete or fail the operation")
        if peers is not None and (isinstance(peers, bool) or not isinstance(peers, int) or peers < 0):
            raise InvalidArgument("peers", peers, "must be an integer >= 0")
        if peers is not None:
            self.peers = peers
        integration = self.integration
        if integration is None:
            return
        slot = self.slot
        slot.shield += 1
        try:
            with _ops_lock:
                self._announce()
                if not self.finished:
                    try:
                        integration.registry.set_phase(self.operation_id, target, peers)
                    except OperationNotFound:  # stop() failed it meanwhile
                        self.finished = True
        finally:
            _unshield(slot)

    def check(self) -> None:
        """Raise :class:`BeatBudgetExceeded` if the budget has run out (any ``on_exhaust``).

        Raises:
            BeatBudgetExceeded: the budget is spent.
        """
        if self.integration is None or self.done:
            return
        slot = self.slot
        slot.shield += 1
        err: BaseException | None = None
        try:
            _absorb_pending(slot)
            err = self._take_over(check=True)
        finally:
            _unshield(slot)
        if err is not None:
            raise err

    def sleep(self, seconds: float) -> None:
        """Sleep ``seconds``, or until the budget runs out, whichever is first.

        Raises:
            BeatBudgetExceeded: the budget ran out (``on_exhaust="interrupt"``); with
                ``"raise_after"`` or ``"warn"`` it returns early instead.
        """
        self._wait(None, seconds)

    def wait(self, event: threading.Event, timeout: float | None = None) -> bool:
        """Wait for ``event`` like ``event.wait(timeout)``, returning early when the budget runs out.

        Returns:
            True if the event is set.

        Raises:
            BeatBudgetExceeded: the budget ran out (``on_exhaust="interrupt"``).
        """
        return self._wait(event, timeout)

    def __enter__(self) -> Tracker:
        integration = self.integration
        if integration is None:
            return self
        try:
            slot = _local.slot
        except AttributeError:
            slot = current_slot()
        self.slot = slot
        slot.shield += 1
        try:
            if slot.pending is not None:
                _absorb_pending(slot)
            if slot.sync is None:
                s = self.settings
                clock = integration._clock
                start_beat, epoch = clock._beat
                # id, type, start_beat, estimated_beats, phase, peer_count, start_time, data,
                # reason, announced, epoch (positional: keywords cost a third more here)
                op = P2POperation(
                    self.op_id,
                    s.operation_type,
                    start_beat,
                    s.estimated,
                    _STARTED,
                    self.peers,
                    integration._time.time(),
                    self.data,
                    None,
                    True,
                    epoch,
                )
                integration._registry.start(op, None if s.manual_phases else _EXECUTING)
                self.announced = True
                # Armed as a @beat_budget call is: the watchdog takes it into its heap
                # when it next wakes, and is woken now only if this budget is its earliest.
                state = self.st_in = clock._state
                if clock._time is SYSTEM_TIME:
                    now = self.t_in = _monotonic()
                else:
                    self.t_in = clock._time.monotonic()
                    now = _monotonic()
                spb = state[2]
                slot.live[self.seq] = [self]
                if now + s.first_beats * spb < WATCHDOG.next_wake:
                    WATCHDOG.notify()
        except BaseException:
            _unshield(slot)
            raise
        slot.shield -= 1
        if slot.shield == 0 and slot.sync is not None:
            if self.announced:  # an outer budget ran out while we registered: undo, then raise it
                self.done = True
                slot.live.pop(self.seq, None)
                with _ops_lock:
                    self._finish(OperationPhase.FAILED, "interrupted by an outer beat budget")
            _raise_sync(slot)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        integration = self.integration
        if integration is None:
            return
        slot = self.slot
        slot.shield += 1
        won = exc is None and slot.pending is None and slot.live.pop(self.seq, None) is not None
        if won and not slot.live and slot.barrier is None and not self.exhausted and self.announced:
            # The common case, in short: we won (the watchdog can no longer fire it), it
            # was not spent, nothing is nested in this thread and nothing is unwinding.
            self.done = True
            self.finished = True
            try:
                integration._registry.finish(self.op_id, _COMPLETED, self.peers)
            except OperationNotFound:  # stop() failed it meanwhile
                pass
            finally:
                _unshield(slot)
            return
        err = self._leave(slot, exc, None, won=won)
        if err is not None:
            raise err

    def __repr__(self) -> str:
        return (
            f"<Tracker {self.settings.name if not self.settings.explicit else self.op_id}"
            f" budget={self.settings.beats:g} beats"
            f" on_exhaust={self.settings.on_exhaust}>"
        )

    # -- engine (owner thread) ---------------------------------------------------

    def _wait(self, event: threading.Event | None, timeout: float | None) -> bool:
        integration = self.integration
        if integration is None:
            if event is None:
                _sleep(timeout or 0.0)
                return False
            return event.wait(timeout)
        slot = self.slot
        end = None if timeout is None else _monotonic() + max(0.0, timeout)
        slot.shield += 1
        err: BaseException | None = None
        result = False
        try:
            _absorb_pending(slot)
            slot.kick.clear()
            while True:
                if event is not None and event.is_set():
                    result = True
                    break
                if slot.sync is not None:
                    break
                if self.exhausted and self.settings.on_exhaust != "interrupt":
                    break
                if self.fired is not ARMED:
                    err = self._take_over(check=False)
                    break
                until = self.clock.seconds_until(self.deadline)
                if until <= 0:
                    err = self._take_over(check=False, force=True)
                    break
                if len(slot.live) > 1:  # an enclosing budget may run out first
                    until = min(until, _nearest_deadline(slot))
                step = min(max(until, WAIT_POLL_SECONDS), WAIT_RETIME_SECONDS)
                if end is not None:
                    remaining = end - _monotonic()
                    if remaining <= 0:
                        break
                    step = min(step, remaining)
                if event is None:
                    slot.kick.wait(step)  # the watchdog sets kick when it hands a budget over
                else:
                    event.wait(min(step, max(WAIT_POLL_SECONDS, until - WAIT_POLL_SECONDS)))
        finally:
            _unshield(slot)
        if err is not None:
            raise err
        return result

    def _take_over(self, *, check: bool, force: bool = False) -> BaseException | None:
        """With the shield up: the exception to raise now if the budget is spent, else None.

        ``check``: called by ``check()`` (raises in every mode); else by a wait, which
        only raises with ``on_exhaust="interrupt"``. ``force``: the budget is known spent.
        """
        slot = self.slot
        if self.fired is ARMED:
            if not (force or self.spent):
                return None
            if not check and self.settings.on_exhaust != "interrupt":
                self.exhausted = True
                return None
            if slot.live.pop(self.seq, None) is not None:
                self.fired = OWNER
                self.fired_at = _monotonic()
                return self._sync_exc(None)
            _await_decision(self)  # the watchdog won: wait for its decision
            _absorb_pending(slot)
        if self.fired in (SYNC, OWNER) and not self.delivered:
            if slot.sync is self:
                slot.sync = None
            return self._sync_exc(None)
        return None

    def _leave(
        self, slot: ThreadSlot, exc: BaseException | None, result: Any, *, won: bool = False
    ) -> BaseException | None:
        """Leave the budget (shield already raised). Returns the exception to raise, if any.

        ``won``: the caller already removed the tracker from ``slot.live`` itself.
        """
        try:
            _absorb_pending(slot)
            self.outcome = exc
            if not won:
                won = slot.live.pop(self.seq, None) is not None
            if not won:
                _await_decision(self)  # the watchdog won and is deciding how to deliver
                _absorb_pending(slot)
            self.done = True
            if slot.live:
                _drop_stale(slot, self.seq)
            barrier = slot.barrier
            if barrier is not None and barrier[0] >= self.seq:
                slot.barrier = None
            err: BaseException | None = None
            fired = self.fired
            if fired is ARMED:
                if self.exhausted and exc is None and self.settings.on_exhaust != "warn":
                    err = self._sync_exc(result)
            elif not self.delivered:  # SYNC (handed over, or cleared before it landed)
                if slot.sync is self:
                    slot.sync = None
                err = self._sync_exc(result)
            self._settle(err or exc)
            return err
        finally:
            _unshield(slot)

    def _settle(self, exc: BaseException | None) -> None:
        """Final bookkeeping of the owner: complete, or fail with the reason."""
        s = self.settings
        spent_ours = exc is not None and exc is self.exc
        if exc is None and self.fired is ARMED and not (self.exhausted and s.on_exhaust != "warn"):
            if self.announced:
                with _ops_lock:
                    self._finish(OperationPhase.COMPLETED, None)
            return
        if spent_ours or (self.fired is not ARMED and exc is None):
            reason = self._spent_reason(self.exc)
            self._count_spent(self.exc)
        elif exc is not None:
            reason = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        else:
            reason = self._spent_reason(None)
        with _ops_lock:
            self._announce()
            self._finish(OperationPhase.FAILED, reason)

    def _spent_reason(self, exc: BaseException | None) -> str:
        if isinstance(exc, BeatBudgetExceeded):
            used, late, over = exc.beats_used, exc.late, exc.beats_over
        else:
            used, late, over = self.settings.beats, False, 0.0
        reason = f"beat budget exceeded: used {used:.2f} of {self.settings.beats:g} beats"
        if late:
            reason += f" (late by {over:.2f} beats)"
        return reason

    def _count_spent(self, exc: BaseException | None) -> None:
        """Count the exhaustion once: the owner leaving and the watchdog's follow-up may both get here."""
        with _ops_lock:
            if self.spent_counted:
                return
            self.spent_counted = True
        integration = cast("Integration", self.integration)
        mode = self.settings.on_exhaust
        if mode == "interrupt":
            late = isinstance(exc, BeatBudgetExceeded) and exc.late
            integration.count(
                "budget_exhausted_interrupt_late" if late else "budget_exhausted_interrupt_interrupted"
            )
        elif mode == "raise_after":
            integration.count("budget_exhausted_raise_after")

    def _sync_exc(self, result: Any) -> BeatBudgetExceeded:
        """The exception, raised by the owner itself (it could not be, or was not, set asynchronously)."""
        exc = BeatBudgetExceeded(**self._exc_fields(), result=result)
        self.delivered = True
        self.exc = exc
        return exc

    def _exc_fields(self) -> dict[str, Any]:
        pos = self.clock.budget_position()
        fired_at = self.fired_at
        late = fired_at > 0 and _monotonic() - fired_at > LATE_SECONDS
        # The position may step back a little when a late frame snaps it to its index;
        # a budget that fired was spent, so it reports at least the whole budget.
        return {
            "operation_id": self.operation_id,
            "budget_beats": self.settings.beats,
            "beats_used": max(self.settings.beats, pos - self.start_pos),
            "beats_over": max(0.0, pos - self.deadline),
            "late": late,
        }

    # -- operations and claims (any thread, under _ops_lock) ------------------------

    def _announce(self) -> None:
        """Register the operation if it is not yet (light calls), claiming it."""
        if self.announced or self.finished:
            return
        integration = cast("Integration", self.integration)
        if not integration.running:  # stopped meanwhile: nothing can be claimed any more
            self.finished = True
            return
        s = self.settings
        data = self.data if s.explicit else s.data
        op = integration._new_operation(self.operation_id, s.operation_type, s.estimated, data)
        op.phase = OperationPhase.EXECUTING
        op.peer_count = self.peers
        clock = self.clock
        beats_ago = max(0, math.floor(clock.budget_position() - self.start_pos))
        op.start_beat = max(0, clock.current_beat - beats_ago)
        if self.t_in:  # when the call started, not when it was first claimed (spans start there)
            op.start_time -= max(0.0, clock._time.monotonic() - self.t_in)
        try:
            integration.registry.add(op)
        except Exception as exc:  # a duplicate user-chosen name: record, never raise here
            integration.record_error(f"budget operation not claimed: {exc}")
            self.finished = True
            return
        self.announced = True
        if self.fired is ARMED and self.outcome is None and (self.done or self.seq not in self.slot.live):
            self._finish(OperationPhase.COMPLETED, None)  # the owner left meanwhile (fast path)

    def _finish(self, phase: OperationPhase, reason: str | None) -> None:
        if self.finished or not self.announced:
            self.finished = True
            return
        self.finished = True
        try:
            cast("Integration", self.integration).registry.finish(
                self.operation_id, phase, peer_count=self.peers, reason=reason
            )
        except OperationNotFound:  # stop() failed it already
            pass

    def _record(self, message: str) -> None:
        integration = self.integration
        if integration is not None:
            integration.record_error(message)

    def _note(self, notes: str) -> None:
        with _ops_lock:
            self._announce()
            if not self.finished:
                cast("Integration", self.integration).emit_operation_note(self.operation_id, notes)

    # -- watchdog thread ------------------------------------------------------------

    def on_event(self, pos_now: float, now: float) -> float | None:
        """Watchdog: handle the event due now; return the next event position, or None."""
        s = self.settings
        n = len(s.warn_at)
        i = self.next_i
        if i > n:
            return self._followup(pos_now)
        if self.done or self.fired is not ARMED or self.seq not in self.slot.live:
            return None
        if i < n:
            self.next_i = i + 1
            try:
                self._warn(s.warn_at[i], pos_now)
            except Exception as exc:  # a claim that cannot go out must not cost the exhaustion
                self._record(f"budget warning of {self.operation_id} not claimed: {exc!r}")
            return self.start_pos + s.beats * s.warn_at[i + 1] if i + 1 < n else self.deadline
        return self._exhaust(pos_now, now)

    def _warn(self, fraction: float, pos_now: float) -> None:
        integration = cast("Integration", self.integration)
        s = self.settings
        left = max(0.0, self.deadline - pos_now)
        self._note(
            f"beat budget warning: {fraction:.0%} of {s.beats:g} beats used,"
            f" {left:.2f} beats left (type: {s.operation_type})"
        )
        integration.count("budget_warnings")
        integration.log.warn(
            f"BACKBEAT budget warning: {self.operation_id} used {fraction:.0%} of {s.beats:g} beats"
        )
        cb = s.on_warning
        if cb is not None:
            WATCHDOG.run_callback(lambda: cb(self, fraction))

    def _exhaust(self, pos_now: float, now: float) -> float | None:
        integration = cast("Integration", self.integration)
        s = self.settings
        used = f"used {pos_now - self.start_pos:.2f} of {s.beats:g} beats"
        if s.on_exhaust == "interrupt":
            self.fired_at = now
            if self.exc_class is None:
                self.exc_class = _exc_class_for(self)
            how = WATCHDOG.deliver(self)
            if how == "lost":
                return None
            if how == "retry":
                return pos_now + _beats(self.clock, RETRY_SECONDS)
            if how == "suspect":  # an outer budget's exception is unwinding: raise at exit instead
                self.exhausted = True
                self._note(f"beat budget exceeded: {used}; raised when the block exits")
                return None
            self.next_i = len(s.warn_at) + 1
            if how == "async":
                _sleep(0)  # hand the GIL over now, so the exception lands before we claim
            try:
                self._note(f"beat budget exceeded: {used}; interrupting")
                integration.log.warn(f"BACKBEAT budget exceeded: {self.operation_id} {used}; interrupting")
            except Exception as exc:
                self._record(f"budget exhaustion of {self.operation_id} not claimed: {exc!r}")
            return pos_now + _beats(self.clock, FOLLOWUP_SECONDS)
        self.exhausted = True
        if s.on_exhaust == "warn":
            integration.count("budget_exhausted_warn")
            self._note(f"beat budget exceeded: {used} (warn only)")
        else:
            self._note(f"beat budget exceeded: {used}; raised when the call returns")
        integration.log.warn(f"BACKBEAT budget exceeded: {self.operation_id} {used} ({s.on_exhaust})")
        return None

    def _followup(self, pos_now: float) -> float | None:
        """Watchdog, after an interrupt: make sure the failure is claimed."""
        if self.finished:
            return None
        if self.delivered:
            if self.done:
                return None  # the owner is finishing it
            # The exception landed but the owner's exit code did not run (it landed on
            # the first instruction of ``__exit__``) or is still inside the block.
            exc = self.exc
            self._count_spent(exc)
            with _ops_lock:
                self._announce()
                self._finish(OperationPhase.FAILED, self._spent_reason(exc))
            return None
        if not self.followup_noted:
            self.followup_noted = True
            used = pos_now - self.start_pos
            self._note(
                f"beat budget exceeded: used {used:.2f} of {self.settings.beats:g} beats;"
                " blocked, raised when the blocking call returns"
            )
        return pos_now + 1.0


class _Block(Tracker):
    """A ``track_operation`` tracker: the fields every block sets are slots (no ``__dict__`` made)."""

    __slots__ = ("announced", "done", "finished", "peers")


def _beats(clock: BeatClock, seconds: float) -> float:
    return seconds / clock.beat_duration


# -- the exception delivered asynchronously ---------------------------------------


def _exc_class_for(t: Tracker) -> type[BeatBudgetExceeded]:
    """A subclass of BeatBudgetExceeded whose no-argument ``__init__`` fills in ``t``'s figures.

    ``PyThreadState_SetAsyncExc`` raises a class; CPython instantiates it in the
    target thread when it lands, so ``__init__`` also records the delivery.
    """

    def __init__(self: BeatBudgetExceeded, *args: Any, **kwargs: Any) -> None:
        if args or kwargs:  # pickling, copying: behave like the base class
            BeatBudgetExceeded.__init__(self, *args, **kwargs)
            return
        t.delivered = True
        BeatBudgetExceeded.__init__(self, **t._exc_fields())
        t.exc = self
        slot = t.slot
        if slot.pending is t:
            slot.pending = None

    def __reduce__(self: BeatBudgetExceeded) -> Any:
        return (
            _rebuild,
            (self.operation_id, self.budget_beats, self.beats_used, self.beats_over, self.late, self.result),
        )

    return type(
        "BeatBudgetExceeded",
        (BeatBudgetExceeded,),
        {
            "__init__": __init__,
            "__reduce__": __reduce__,
            "__module__": BeatBudgetExceeded.__module__,
            "__qualname__": BeatBudgetExceeded.__qualname__,
        },
    )


def _rebuild(
    operation_id: str, budget: float, used: float, over: float, late: bool, result: Any
) -> BeatBudgetExceeded:
    return BeatBudgetExceeded(operation_id, budget, used, beats_over=over, late=late, result=result)


# -- shield helpers (owner thread) ------------------------------------------------


def _await_decision(t: Tracker) -> None:
    """The watchdog has won ``t`` (gone from ``live``, still ARMED): wait the few bytecodes
    until it has chosen how to deliver (``Fired.ASYNC`` or ``SYNC``)."""
    while t.fired is ARMED:
        _sleep(0)


def _absorb_pending(slot: ThreadSlot) -> None:
    """With the shield up: an exception set before it went up is cleared and made synchronous."""
    p = slot.pending
    if p is not None and not p.delivered:
        clear_async_exc(slot.tid)
        slot.pending = None
        p.fired = SYNC
        if slot.sync is None:
            slot.sync = p


def _unshield(slot: ThreadSlot) -> None:
    slot.shield -= 1
    if slot.shield == 0 and slot.sync is not None:
        _raise_sync(slot)


def _raise_sync(slot: ThreadSlot) -> None:
    """Raise, in the owner thread, a budget exception the watchdog handed over."""
    t = slot.sync
    slot.sync = None
    if t is None or t.delivered:
        return
    raise t._sync_exc(None)


def _nearest_deadline(slot: ThreadSlot) -> float:
    """Seconds until the earliest interrupting budget of this thread runs out."""
    nearest = float("inf")
    for seq, e in list(slot.live.items()):
        t = _materialize(slot, seq, e)
        if t.settings.on_exhaust == "interrupt":
            nearest = min(nearest, t.clock.seconds_until(t.deadline))
    return nearest


def _drop_stale(slot: ThreadSlot, seq: int) -> None:
    """Budgets entered after ``seq`` that are still armed were left without their exit code."""
    for key, e in list(slot.live.items()):
        if key > seq and slot.live.pop(key, None) is not None:
            t = _materialize(slot, key, e)
            t.done = True
            t.fired = OWNER
            t.delivered = True
            t._settle(RuntimeError("left without its exit (an exception landed on its first instruction)"))


class PreciseMode:
    """Returned by :func:`precise_mode`; as a context manager it restores the previous setting."""

    def __init__(self, previous: float | None) -> None:
        self._previous = previous

    def __enter__(self) -> PreciseMode:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        WATCHDOG.precise_interval = self._previous
        WATCHDOG.notify_only()


def precise_mode(enabled: bool = True, *, switch_interval: float = 0.0005) -> PreciseMode:
    """Opt in to more punctual interrupts, at a small cost in throughput.

    A busy thread gives up the GIL one switch interval (``sys.getswitchinterval()``,
    5 ms by default) after the watchdog asks for it, so an interrupt lands about
    that late. In precise mode the watchdog lowers the switch interval to
    ``switch_interval`` while a budget event is less than 15 ms away, and restores
    the previous value after. The switch interval is process-wide: other code
    sees it too while it is lowered.

    Args:
        enabled: turn precise mode on (default) or off.
        switch_interval: the interval used near an event, in seconds (> 0).

    Returns:
        A handle: ``with precise_mode(): ...`` turns it on for the block only.

    Raises:
        InvalidArgument: ``switch_interval`` is not a number > 0.
    """
    if (
        isinstance(switch_interval, bool)
        or not isinstance(switch_interval, (int, float))
        or switch_interval <= 0
    ):
        raise InvalidArgument("switch_interval", switch_interval, "must be a number of seconds > 0")
    handle = PreciseMode(WATCHDOG.precise_interval)
    WATCHDOG.precise_interval = float(switch_interval) if enabled else None
    WATCHDOG.notify_only()
    return handle


# -- the two faces ----------------------------------------------------------------------


class CallHook(Protocol):
    """Sees every decorated call of an integration (``backbeat_sync.otel`` with ``spans="all"``)."""

    def wants(self, integration: Integration) -> bool:
        """Whether to take this call (False for the inner run of a call it took)."""
        ...

    def call(
        self,
        run: Callable[[Callable[..., Any], Any, Any, Any], Any],
        settings: BudgetSettings,
        integration: Integration,
        wrapped: Callable[..., Any],
        instance: Any,
        args: Any,
        kwargs: Any,
    ) -> Any:
        """Run the call, as ``run(wrapped, instance, args, kwargs)``, with whatever it adds around it."""
        ...


#: Set by ``backbeat_sync.otel.instrument(spans="all")``; None (one check per call) otherwise.
_call_hook: CallHook | None = None


def _runner(settings: BudgetSettings) -> Callable[[Callable[..., Any], Any, Any, Any], Any]:
    """The engine behind ``@beat_budget`` and ``execute_with_beat_budget``: one light tracker per call.

    Returns ``run(wrapped, instance, args, kwargs)`` (wrapt's wrapper signature).
    The integration is resolved at each call. This path is kept short on purpose
    (issue 7: a few hundred nanoseconds), so it inlines the arming that ``Tracker.__enter__`` does.
    """
    fixed = settings.integration
    strict = settings.strict
    name = settings.name
    first = settings.first_beats
    runtime = RUNTIME

    def run(wrapped: Callable[..., Any], instance: Any, args: Any, kwargs: Any) -> Any:
        integration = fixed if fixed is not None else runtime.default
        # One load says both "running" and "where the beat is" (None unless running).
        clock = None if integration is None else integration.budget_clock
        if clock is None:
            if integration is not None:
                integration.refuse_if_forked()
            if strict:
                raise IntegrationNotStarted(f"@beat_budget(strict=True) on {name}")
            if not runtime.fallback_logged:
                _log_fallback(f"{name}()")
            return wrapped(*args, **kwargs)
        if _call_hook is not None and _call_hook.wants(integration):  # backbeat_sync.otel, spans="all"
            return _call_hook.call(run, settings, integration, wrapped, instance, args, kwargs)
        try:
            slot = _local.slot
        except AttributeError:
            slot = current_slot()
        # The call is armed as a plain entry (see ThreadSlot.live): its tracker is made
        # only if something needs it; its start position is kept as the clock state and
        # the time it was read at (Tracker.start_pos works it out).
        state = clock._state
        if clock._time is SYSTEM_TIME:
            now = t_in = _monotonic()
        else:
            t_in = clock._time.monotonic()
            now = _monotonic()
        seq = _next_seq()
        e: list[Any] = [None, settings, integration, state, t_in]
        live = slot.live
        live[seq] = e
        if now + first * state[2] < WATCHDOG.next_wake:
            # Armed already: shield the wake-up, whose ``except OSError`` would swallow
            # a BeatBudgetExceeded (a TimeoutError) landing inside it.
            slot.shield += 1
            WATCHDOG.notify()
            _unshield(slot)
        try:
            result = wrapped(*args, **kwargs)
        except BaseException as exc:
            slot.shield += 1
            err = _materialize(slot, seq, e)._leave(slot, exc, None)
            if err is not None:
                raise err  # noqa: B904 - chained implicitly to exc, as if raised inside the call
            raise
        # Leaving. ``del`` (unlike a ``pop`` call) is followed by no eval-breaker check,
        # nor is anything up to the shield below, so no asynchronous exception can land
        # between winning the entry and raising the shield: the common case (the thread's
        # only budget, never looked at) returns with no shield at all.
        try:
            del live[seq]
        except KeyError:  # the watchdog won it: it is deciding, or has decided, how to deliver
            slot.shield += 1
            err = _materialize(slot, seq, e)._leave(slot, None, result)
        else:
            if e[0] is None and not live:
                return result
            slot.shield += 1
            err = _materialize(slot, seq, e)._leave(slot, None, result, won=True)
        if err is not None:
            raise err
        return result

    return run


def execute_with_beat_budget(
    integration: Integration | None, beats: float, fn: Callable[..., T], *args: Any, **kwargs: Any
) -> T:
    """Run ``fn(*args, **kwargs)`` within a budget of ``beats`` beats (the seed's call).

    Args:
        integration: the integration (None: the process default).
        beats: the budget, in beats (> 0).
        fn: what to run.
        *args: positional arguments for ``fn``.
        **kwargs: keyword arguments for ``fn``.

    Returns:
        What ``fn`` returns.

    Raises:
        BeatBudgetExceeded: the budget ran out while ``fn`` ran.
        InvalidArgument: ``beats`` is not a number > 0, or ``fn`` is not callable.
    """
    if not callable(fn):
        raise InvalidArgument("fn", fn, "must be callable")
    name = getattr(fn, "__qualname__", None) or type(fn).__name__
    settings = BudgetSettings(beats, name=name, integration=integration)
    return cast(T, _runner(settings)(fn, None, args, kwargs))


def track_operation(
    operation_id: str,
    operation_type: str,
    *,
    beats: float,
    peers: int = 0,
    integration: Integration | None = None,
    on_exhaust: OnExhaust = "interrupt",
    warn_at: Iterable[float] | None = DEFAULT_WARN_AT,
    data: Any = None,
    manual_phases: bool = False,
    on_warning: Callable[[Tracker, float], Any] | None = None,
    strict: bool = False,
) -> Tracker:
    """Track a block as the seed's explicit operation, with a beat budget.

    Entering registers the operation (STARTED, claimed) and moves it to EXECUTING
    (claimed) unless ``manual_phases``; leaving normally completes it (``done``
    claimed); leaving by an exception fails it with the exception as reason, and
    the exception propagates. With no started integration the block runs plainly
    (logged once) and the handle's methods do nothing.

    Args:
        operation_id: unique id (the claims' ``task_id``).
        operation_type: ``election``, ``dht_store``, ``pubsub_sync``, ``peer_discovery`` or a user type.
        beats: the budget, in beats (> 0).
        peers: initial peer count.
        integration: the integration (None: the process default).
        on_exhaust: ``"interrupt"`` (raise :class:`BeatBudgetExceeded` inside the block),
            ``"raise_after"`` (raise it when the block ends) or ``"warn"`` (claim and log).
        warn_at: fractions of the budget at which a warning is claimed and ``on_warning`` runs.
        data: kept with the operation.
        manual_phases: stay in STARTED; move phases with ``op.set_phase``.
        on_warning: ``on_warning(op, fraction)``, on the budget callback thread.
        strict: raise :class:`IntegrationNotStarted` instead of running plainly.

    Returns:
        The tracker, a context manager (``with track_operation(...) as op:``).

    Raises:
        InvalidArgument: an argument is out of range.
        IntegrationNotStarted: ``strict`` and no started integration.
    """
    if type(operation_id) is not str or not operation_id or len(operation_id) > 64:  # 64 chars fit 256 bytes
        check_wire_id("operation_id", operation_id)
        operation_id = str(operation_id)
    if type(peers) is not int or peers < 0:
        if isinstance(peers, bool) or not isinstance(peers, int) or peers < 0:
            raise InvalidArgument("peers", peers, "must be an integer >= 0")
        peers = int(peers)
    settings = None
    key: tuple[Any, ...] | None = None
    if on_warning is None and type(beats) in _CACHED_NUMBERS:
        key = (beats, operation_type, on_exhaust, warn_at, strict, manual_phases)
        try:
            settings = RUNTIME.block_settings.get(key)
        except TypeError:  # an unhashable warn_at (a list): checked every time
            key = None
    if settings is None:
        settings = _block_settings(
            key, beats, operation_type, on_exhaust, warn_at, on_warning, strict, manual_phases
        )
    resolved = integration if integration is not None else RUNTIME.default
    if resolved is None or resolved.budget_clock is None:
        if resolved is not None:
            resolved.refuse_if_forked()
        resolved = None
        if strict:
            raise IntegrationNotStarted("track_operation(strict=True) needs a started integration")
        _log_fallback(f"operation {operation_id}")
    t = _new(_Block)
    t.settings = settings
    t.integration = resolved
    t.seq = _next_seq()
    t.op_id = operation_id
    t.data = data
    t.peers = peers
    t.announced = t.done = t.finished = False
    return t


#: ``track_operation`` settings by their arguments (``RUNTIME.block_settings``): a block's
#: settings are checked once per distinct set of arguments, not on every block. Bounded
#: (cleared when full).
_BLOCK_CACHE_MAX: Final = 256
#: Only exact ints and floats are cached: True == 1 must not find the settings of 1.
_CACHED_NUMBERS: Final = (int, float)


def _block_settings(
    key: tuple[Any, ...] | None,
    beats: Any,
    operation_type: Any,
    on_exhaust: Any,
    warn_at: Any,
    on_warning: Any,
    strict: bool,
    manual_phases: bool,
) -> BudgetSettings:
    """The checked settings of a ``track_operation`` block (its id, peers and data aside).

    ``key``: where to cache them (see ``track_operation``), or None not to.
    """
    settings = BudgetSettings(
        beats,
        operation_type=str(operation_type) if operation_type else operation_type,
        on_exhaust=on_exhaust,
        warn_at=warn_at,
        on_warning=on_warning,
        strict=strict,
        explicit=True,
        manual_phases=manual_phases,
    )
    if key is not None:
        cache = RUNTIME.block_settings
        if len(cache) >= _BLOCK_CACHE_MAX:
            cache.clear()
        cache[key] = settings
    return settings


def beat_budget(
    beats: float,
    *,
    integration: Integration | None = None,
    operation_type: str = "budget",
    on_exhaust: OnExhaust = "interrupt",
    warn_at: Iterable[float] | None = DEFAULT_WARN_AT,
    name: str | None = None,
    on_warning: Callable[[Tracker, float], Any] | None = None,
    strict: bool = False,
) -> Callable[[Callable[P, R]], Callable[P, R]]:
    """Give every call of the decorated function a budget of ``beats`` beats.

    Works on functions, methods, classmethods and staticmethods (via wrapt); the
    signature survives. Each call runs in a fresh tracker: it is claimed only if
    it is still running at a beat, gets a warning, runs out or fails. The
    integration is resolved at call time; with none started the call runs
    plainly (logged once), or raises with ``strict=True``.

    Args:
        beats: the budget, in beats (> 0).
        integration: the integration (None: the process default).
        operation_type: the claims' ``operation_type``.
        on_exhaust: ``"interrupt"``, ``"raise_after"`` or ``"warn"`` (see :func:`track_operation`).
        warn_at: fractions of the budget at which a warning is claimed.
        name: operation id prefix (default: the function's qualified name); ids are ``{name}-{n}``.
        on_warning: ``on_warning(tracker, fraction)``, on the budget callback thread.
        strict: raise :class:`IntegrationNotStarted` when no integration is started.

    Returns:
        The decorator.

    Raises:
        TypeError: (at decoration) the target is an ``async def`` or generator function.
        InvalidArgument: an argument is out of range.

    Example:
        >>> from backbeat_sync import beat_budget
        >>> @beat_budget(3)
        ... def store(key: str, value: bytes) -> int:
        ...     return len(value)
        >>> store("k", b"abc")   # no integration started: runs plainly
        3
    """
    base = BudgetSettings(
        beats,
        operation_type=operation_type,
        on_exhaust=on_exhaust,
        warn_at=warn_at,
        on_warning=on_warning,
        name=name,
        strict=strict,
        integration=integration,
    )

    def decorate(func: Callable[P, R]) -> Callable[P, R]:
        target = getattr(func, "__func__", func)
        if inspect.iscoroutinefunction(target) or inspect.isasyncgenfunction(target):
            raise TypeError(
                f"@beat_budget cannot budget async function {getattr(target, '__qualname__', target)!r}:"
                " the budget would end when the coroutine is created, not when it finishes"
            )
        if inspect.isgeneratorfunction(target):
            raise TypeError(
                f"@beat_budget cannot budget generator function {getattr(target, '__qualname__', target)!r}:"
                " its body runs after the call returns, outside the budget"
            )
        if not callable(target):
            raise TypeError(f"@beat_budget needs a function, not {type(func).__name__}")
        settings = base if base.name else attrs.evolve(base, name=getattr(target, "__qualname__", "call"))
        # strict must always check (and raise); wrapt tests a list's truth in C (its stubs
        # only name bool-like objects, hence Any)
        gate: Any = None if settings.strict else RUNTIME.budgets_on
        return cast("Callable[P, R]", wrapt.decorator(enabled=gate)(_runner(settings))(func))

    return decorate


def __getattr__(name: str) -> Any:
    """The budget gate's state, kept in ``_runtime`` (read here by older tests and tools)."""
    if name == "_fallback_logged":
        return RUNTIME.fallback_logged
    if name == "_BUDGETS_ON":
        return RUNTIME.budgets_on
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
