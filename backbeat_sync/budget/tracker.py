"""The tracker: one budgeted call or ``with`` block, its budget, its operation, its claims.

The owner thread's side lives here (enter, leave, take over, wait, settle); the
watchdog thread's side (warnings, exhaustion, follow-up) in :mod:`.events`; the
arming protocol both faces share in :mod:`.arming`.
"""

from __future__ import annotations

import contextvars
import math
import threading
import time
from types import TracebackType
from typing import TYPE_CHECKING, Any, Final, cast

from .._runtime import WATCHDOG
from .._time import SYSTEM_TIME
from .._watchdog import ARMED, OWNER, SYNC, Fired, ThreadSlot, all_slots, current_slot, thread_state
from ..errors import (
    BeatBudgetExceeded,
    BudgetLeftUnexited,
    DuplicateOperation,
    IntegrationNotStarted,
    InvalidArgument,
    OperationNotFound,
)
from ..operations import OperationPhase, P2POperation
from ..workflow import CURRENT
from . import events
from .arming import (
    absorb_pending,
    await_decision,
    ops_lock,
    raise_sync,
    unshield,
)
from .flow import FlowMixin
from .outcome import LATE_SECONDS, OutcomeMixin

if TYPE_CHECKING:
    from ..clock import BeatClock
    from .host import BudgetHost
    from .settings import BudgetSettings

#: The stdlib logger its lines go to (``log_to_stdlib``): the package's, as before the split.
LOG_NAME: Final = "backbeat_sync.budget"
__all__ = [
    "LATE_SECONDS",
    "WAIT_POLL_SECONDS",
    "WAIT_RETIME_SECONDS",
    "Block",
    "Tracker",
    "announce_running",
    "drop_stale",
    "materialize",
    "nearest_deadline",
]


#: Near the deadline, ``op.wait`` polls its event at most this far apart.
WAIT_POLL_SECONDS: Final = 0.001
#: ``op.sleep``/``op.wait`` re-time themselves at least this often (tempo changes).
WAIT_RETIME_SECONDS: Final = 0.05

_STARTED: Final = OperationPhase.STARTED
_COMPLETED: Final = OperationPhase.COMPLETED
_monotonic: Final = time.monotonic
_sleep: Final = time.sleep
#: The context variable of the open operation (``backbeat_sync.workflow``): a block sets it.
_cv_set: Final = CURRENT.set
_cv_reset: Final = CURRENT.reset
_MISSING: Final = contextvars.Token.MISSING
_new: Final = object.__new__


class Tracker(FlowMixin, OutcomeMixin):
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
    # for a decorated call (only when something needs it: see ``materialize``)
    # pays for a few stores, not twenty. ``Block`` (track_operation) makes slots
    # of the few more it always sets.
    __slots__ = (
        "__dict__",
        "_token",
        "announced",
        "data",
        "done",
        "finished",
        "integration",
        "op_id",
        "peers",
        "seq",
        "settings",
        "shield_in",
        "slot",
        "st_in",
        "t_in",
    )

    settings: BudgetSettings
    integration: BudgetHost | None  #: the host it counts on (None: runs plainly, the fallback)
    slot: ThreadSlot
    seq: int
    st_in: tuple[float, float, float, float]  #: the clock's state when the budget started
    t_in: float  #: the clock's monotonic time when the budget started
    op_id: str  #: the operation id of an explicit operation (``track_operation``)
    data: Any  #: attached to an explicit operation

    announced: bool  #: its operation is in the registry (claimed)
    done: bool  #: the owner has left (slow path; the fast path just leaves ``slot.live``)
    finished: bool  #: its operation is completed or failed
    peers: int  #: the peer count claimed
    shield_in: int  #: ``slot.shield`` when the block was entered (``track_operation``)

    event_pos: float | None = None  #: position of the next event (set when the watchdog takes it)
    outcome: BaseException | None = None  #: the exception the owner left with
    exhausted: bool = False  #: ran out without being interrupted (raise_after, warn, suspect)
    fired: Fired = ARMED  #: who won the budget and how (see ``Fired``)
    delivered: bool = False  #: its exception has been raised in the owner thread
    promoted: bool = False  #: the watchdog has it in its heap
    next_i: int = 0  #: index of the next warning (len(warn_at): exhaustion; more: follow-up)
    exc: BaseException | None = None  #: the exception raised for it
    exc_class: Any = None  #: the class set asynchronously (made when it fires)
    fired_at: float = 0.0  #: when it fired, on the clock's time source
    followup_noted: bool = False
    spent_counted: bool = False  #: its exhaustion has been counted (health, metrics)
    _token: contextvars.Token[Tracker | None] | None  #: restores CURRENT on exit (blocks)
    #: a block's operation if it entered by the registry's quiet path, else None (a ``Block`` slot)
    _op: P2POperation | None
    # The other workflow fields are FlowMixin's (docs/workflows.md).

    def __init__(
        self,
        settings: BudgetSettings,
        integration: BudgetHost | None,
        seq: int,
        op_id: str = "",
        data: Any = None,
        peers: int = 0,
        start: tuple[tuple[float, float, float, float], float] | None = None,
    ) -> None:
        """The constructor (:func:`materialize` calls it; ``track_operation`` makes its ``Block``
        with the same stores, inlined: keep them together).

        Args:
            settings: the checked settings.
            integration: the host (None: the block runs plainly).
            seq: its key in the thread's ``live`` dict (:data:`.arming.next_seq`).
            op_id: the operation id of an explicit operation.
            data: attached to an explicit operation.
            peers: the initial peer count.
            start: ``(clock anchor, start time)`` of a budget already armed (a decorated
                call); a block's is set when it is entered.
        """
        self.settings = settings
        self.integration = integration
        self.seq = seq
        self.op_id = op_id
        self.data = data
        self.peers = peers
        if start is not None:
            self.st_in, self.t_in = start
        self.announced = self.done = self.finished = False
        self._token = None

    @property
    def start_pos(self) -> float:
        """The budget position at which the budget started (BeatClock.budget_position then)."""
        idx, t0, spb, off = self.st_in
        return idx + off + (self.t_in - t0) / spb

    @property
    def clock(self) -> BeatClock:
        """The beat clock the budget counts on (its integration's)."""
        return self.integration.clock  # type: ignore[union-attr]  # (no typing.cast call: see flow)

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
            with ops_lock:
                self._announce()
                if not self.finished:
                    try:
                        integration.registry.set_phase(self.operation_id, target, peers)
                    except OperationNotFound:  # stop() failed it meanwhile
                        self.finished = True
        finally:
            unshield(slot)

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
            absorb_pending(slot)
            err = self.take_over(check=True)
        finally:
            unshield(slot)
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
            slot = thread_state.slot
        except AttributeError:
            slot = current_slot()
        self.slot = slot
        # The end of the entry and its exit restore the shield from this value (nested exits
        # cut short leak none; one store instead of a read-modify-write).
        self.shield_in = shield = slot.shield
        slot.shield = shield + 1
        registering = False
        try:
            if slot.pending is not None:
                absorb_pending(slot)
            if slot.sync is None:
                s = self.settings
                # The block is the context's operation from here on; the token's old value is
                # the operation the context had (one set instead of a get and a set).
                token = self._token = _cv_set(self)
                hint = token.old_value
                if (hint is _MISSING or hint is None) and not slot.live and s.plain and self._opts is None:
                    flow = None  # a root with nothing more to say (the common case)
                else:
                    flow = self._enter_flow(slot, None if hint is _MISSING else hint)
                    s = self.settings
                clock = integration.clock
                source = clock.time_source
                start_beat, epoch = clock.beat_and_epoch
                # P2POperation(...), its thirteen fields stored in place: a class call with the
                # attrs __init__ costs ~100 ns more (test_block_operation_has_every_field).
                op = _new(P2POperation)
                op.id = self.op_id
                op.type = s.operation_type
                op.start_beat = start_beat
                op.estimated_beats = s.estimated
                op.phase = _STARTED
                op.peer_count = self.peers
                # time.time looked up on each call (freezegun)
                op.start_time = time.time() if source is SYSTEM_TIME else source.time()
                op.data = self.data
                op.reason = None
                op.announced = True
                op.epoch = epoch
                op.budget_source = s.claim_source
                op.flow = flow
                registering = True
                registry = integration.registry
                then = s.entered_phase  # EXECUTING, or None (manual_phases)
                if flow is None and then is not None and registry.enter_quiet(op, then):
                    self._op = op  # entered by the registry's quiet path: it leaves by it too
                else:
                    self._op = None
                    registry.start(op, then)
                self.announced = True
                # Armed as a @beat_budget call is (the one arming protocol, see .arming): its
                # start is read (the clock's anchor, then the time), set before it enters
                # ``live`` (the watchdog may read it from then on), then arming.arm, inlined
                # (a call costs ~50 ns; the shield is up already, so its wake-up needs none).
                anchor = self.st_in = clock.anchor
                if source is SYSTEM_TIME:
                    now = self.t_in = _monotonic()
                else:
                    self.t_in = source.monotonic()
                    now = _monotonic()
                slot.live[self.seq] = [self]
                if now + s.first_beats * anchor[2] < WATCHDOG.next_wake:
                    WATCHDOG.notify()
        except IntegrationNotStarted:  # stopping since the block was made: run it plainly
            self._undo_context()
            self.integration = None
            unshield(slot)
            return self
        except BaseException as exc:
            self._undo_context()
            if registering and self.seq not in slot.live and type(exc) is not DuplicateOperation:
                # Registered but never armed (no __exit__ follows): into ``live``, for drop_stale.
                self.done = self.announced = True
                slot.live[self.seq] = [self]
            unshield(slot)
            raise
        slot.shield = shield  # arming.unshield, inlined (see above)
        if shield == 0 and slot.sync is not None:
            if self.announced:  # an outer budget ran out while we registered: undo, then raise it
                undo, self._token = self._token, None
                if undo is not None:
                    _cv_reset(undo)
                self.done = True
                slot.live.pop(self.seq, None)
                with ops_lock:
                    self._finish(OperationPhase.FAILED, "interrupted by an outer beat budget")
            raise_sync(slot)
        return self

    def _undo_context(self) -> None:
        """Not entered after all: the context's operation is the old one again."""
        undo = self._token
        if undo is not None:
            self._token = None
            _cv_reset(undo)

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
        shield = self.shield_in
        slot.shield = shield + 1  # not += 1: see __enter__
        # Under the shield: an interrupt landing here would skip the rest of the exit.
        token = self._token
        if token is not None:
            try:
                _cv_reset(token)
            except (ValueError, RuntimeError):  # exited in another context, or twice: leave it
                pass
        won = False
        if exc is None and slot.pending is None:
            try:  # removing it first wins the race with the watchdog (a del: no call, unlike pop)
                del slot.live[self.seq]
            except KeyError:  # the watchdog won
                pass
            else:
                won = True
        if won and not slot.live and slot.barrier is None and not self.exhausted and self.announced:
            # The common case, in short: we won (the watchdog can no longer fire it), it
            # was not spent, nothing is nested in this thread and nothing is unwinding.
            self.done = True
            clock = integration.clock
            source = clock.time_source
            self.settings.log.append(  # history: the beat thread works out the beats used
                (self, clock.anchor, _monotonic() if source is SYSTEM_TIME else source.monotonic())
            )
            try:
                registry = integration.registry
                op = self._op
                if op is None or not registry.leave_quiet(op, self.peers):
                    try:
                        # reason and quiet given: a keyword-only default is a dict lookup per call (~35 ns)
                        registry.finish(self.op_id, _COMPLETED, self.peers, reason=None, quiet=False)
                    except OperationNotFound:  # stop() failed it meanwhile
                        pass
                self.finished = True
            except BaseException:  # no room left on the stack: the next exit in this thread fails it
                slot.live[self.seq] = [self]
                raise
            finally:  # arming.unshield, inlined (the common exit; restored as in __enter__)
                slot.shield = shield
                if shield == 0 and slot.sync is not None:
                    raise_sync(slot)
            return
        try:
            err = self.leave(slot, exc, None, won=won)
        except BaseException:
            # Our exit code failed (no room on the stack): back into ``live``, for drop_stale.
            if self.announced and not self.finished and self.seq not in slot.live:
                self.done = True
                slot.live[self.seq] = [self]
            raise
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
            absorb_pending(slot)
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
                    err = self.take_over(check=False)
                    break
                until = self.clock.seconds_until(self.deadline)
                if until <= 0:
                    err = self.take_over(check=False, force=True)
                    break
                if len(slot.live) > 1:  # an enclosing budget may run out first
                    until = min(until, nearest_deadline(slot))
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
            unshield(slot)
        if err is not None:
            raise err
        return result

    def take_over(self, *, check: bool, force: bool = False) -> BaseException | None:
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
                self.fired_at = self.clock.time_source.monotonic()
                return self._sync_exc(None)
            await_decision(self)  # the watchdog won: wait for its decision
            absorb_pending(slot)
        if self.fired in (SYNC, OWNER) and not self.delivered:
            if slot.sync is self:
                slot.sync = None
            return self._sync_exc(None)
        return None

    def leave(
        self, slot: ThreadSlot, exc: BaseException | None, result: Any, *, won: bool = False
    ) -> BaseException | None:
        """Leave the budget (shield already raised). Returns the exception to raise, if any.

        ``won``: the caller already removed the tracker from ``slot.live`` itself.
        """
        try:
            absorb_pending(slot)
            self.outcome = exc
            if not won:
                won = slot.live.pop(self.seq, None) is not None
            if not won:
                await_decision(self)  # the watchdog won and is deciding how to deliver
                absorb_pending(slot)
            self.done = True
            if slot.live:
                drop_stale(slot, self.seq)
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
        except BaseException:
            # Our exit code failed (no room left on the stack): as in __exit__ (drop_stale).
            if self.announced and not self.finished:
                self.done = True
                slot.live[self.seq] = [self]
            raise
        finally:
            unshield(slot)

    def _settle(self, exc: BaseException | None) -> None:
        """Final bookkeeping of the owner: complete, or fail with the reason."""
        s = self.settings
        spent_ours = exc is not None and exc is self.exc
        if exc is None and self.fired is ARMED and not (self.exhausted and s.on_exhaust != "warn"):
            if self.exhausted:  # on_exhaust="warn": it ran on past its budget and returned
                self._remember("exceeded", "late", None)
            else:
                self._remember("done", None, None)
            if self.announced:
                with ops_lock:
                    self._finish(OperationPhase.COMPLETED, None)
            return
        if spent_ours or (self.fired is not ARMED and exc is None):
            reason = self._spent_reason(self.exc)
            self._count_spent(self.exc)
            spent = self.exc
            if isinstance(spent, BeatBudgetExceeded):
                on_time = s.on_exhaust == "interrupt" and not spent.late
                self._remember("exceeded", "interrupted" if on_time else "late", spent.beats_used)
            else:
                self._remember("exceeded", "late", None)
        elif exc is not None:
            reason = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
            self._remember("failed", None, None)
        else:
            reason = self._spent_reason(None)
            self._remember("exceeded", "late", None)
        with ops_lock:
            self._announce()
            self._finish(OperationPhase.FAILED, reason)

    # -- operations and claims (any thread, under ops_lock) ------------------------

    def _announce(self) -> None:
        """Register the operation if it is not yet (light calls), claiming it."""
        if self.announced or self.finished:
            return
        integration = cast("BudgetHost", self.integration)
        if not integration.running:  # stopped meanwhile: nothing can be claimed any more
            self.finished = True
            return
        s = self.settings
        data = self.data if s.explicit else s.data
        clock = integration.clock
        current, epoch = clock.beat_and_epoch
        beats_ago = max(0, math.floor(clock.budget_position() - self.start_pos))
        op = P2POperation(
            id=self.operation_id,
            type=s.operation_type,
            start_beat=max(0, current - beats_ago),
            epoch=epoch,
            estimated_beats=s.estimated,
            phase=OperationPhase.EXECUTING,
            peer_count=self.peers,
            start_time=clock.time_source.time(),
            data=data,
            budget_source=s.claim_source,
            flow=self._make_flow(),
        )
        if self.t_in:  # when the call started, not when it was first claimed (spans start there)
            op.start_time -= max(0.0, clock.time_source.monotonic() - self.t_in)
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
        try:
            self.integration.registry.finish(  # type: ignore[union-attr]  # (no typing.cast call)
                self.operation_id,
                phase,
                self.peers,
                reason=reason,
                quiet=False,  # (see __exit__)
            )
        except OperationNotFound:  # stop() failed it already
            pass
        # Only now: if the call failed (no room on the stack), drop_stale fails it later.
        self.finished = True

    def _record(self, message: str) -> None:
        integration = self.integration
        if integration is not None:
            integration.record_error(message)

    def _note(self, notes: str) -> None:
        with ops_lock:
            self._announce()
            if not self.finished:
                cast("BudgetHost", self.integration).emit_operation_note(self.operation_id, notes)

    # -- watchdog thread (see .events) ------------------------------------------------

    def on_event(self, pos_now: float, now: float) -> float | None:
        """Watchdog: handle the event due now; return the next event position, or None."""
        return events.on_event(self, pos_now, now)


class Block(Tracker):
    """A ``track_operation`` tracker: the fields every block sets are slots (no ``__dict__`` made).

    Three more than a tracker's: its ``__enter__`` reads ``_opts`` and sets ``_op``, and its
    ``__exit__`` reads ``exhausted`` and ``_op``, on every block. Read through the instance, a
    class default costs ~15 ns more than a slot (CPython 3.11 does not specialise that load),
    so ``track_operation`` stores the first two.
    """

    __slots__ = ("_op", "_opts", "exhausted")


_make_lock: Final = threading.Lock()


def materialize(slot: ThreadSlot, seq: int, entry: list[Any]) -> Tracker:
    """The tracker of the ``live`` entry ``entry`` (key ``seq``), made on first need (any thread).

    A ``@beat_budget`` call arms a plain entry ``[None, settings, host, clock anchor,
    start time]``; the watchdog, the beat hook or the owner's slow path makes its
    tracker when one of them needs it. Made once, under a lock.
    """
    t = entry[0]
    if t is not None:
        return cast(Tracker, t)
    with _make_lock:
        t = entry[0]
        if t is None:
            t = entry[0] = Tracker(entry[1], entry[2], seq, start=(entry[3], entry[4]))
            t.slot = slot
            hint = entry[5]
            if hint is not None:
                t._hint = hint
    return cast(Tracker, t)


def announce_running(integration: object) -> None:
    """Called on ``integration``'s beat thread at each beat: budget calls still running
    are claimed from now on."""
    with ops_lock:
        for slot in all_slots():
            for seq, e in list(slot.live.items()):
                t = e[0]
                if t is None:
                    if e[2] is not integration:
                        continue
                    t = materialize(slot, seq, e)
                if t.integration is integration and not t.announced and t.fired is ARMED:
                    t._announce()


def nearest_deadline(slot: ThreadSlot) -> float:
    """Seconds until the earliest interrupting budget of this thread runs out."""
    nearest = float("inf")
    for seq, e in list(slot.live.items()):
        t = materialize(slot, seq, e)
        if t.settings.on_exhaust == "interrupt":
            nearest = min(nearest, t.clock.seconds_until(t.deadline))
    return nearest


def drop_stale(slot: ThreadSlot, seq: int) -> None:
    """Budgets entered after ``seq`` still armed, or marked done but still in ``live`` (their
    exit code failed half-way: a RecursionError), were left without their exit code."""
    for key, e in list(slot.live.items()):
        t = e[0]
        if (key > seq or (t is not None and t.done and key != seq)) and slot.live.pop(key, None) is not None:
            try:
                t = materialize(slot, key, e)
                t.done = True
                t.fired = OWNER
                t.delivered = True
                t._settle(BudgetLeftUnexited(t.operation_id))
            except BaseException:  # no room on the stack: put it back for an exit further out
                t = e[0]
                if t is not None and t.announced and not t.finished:
                    t.done = True
                    slot.live[key] = [t]
                raise
