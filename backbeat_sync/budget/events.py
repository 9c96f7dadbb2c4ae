"""The watchdog thread's side of a budget: warnings, exhaustion, the follow-up.

``Tracker.on_event`` (what the watchdog calls when an event is due) hands over to
:func:`on_event`. The exception delivered asynchronously is made by
:func:`exc_class_for`.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any, Final, cast

from .._runtime import WATCHDOG
from .._watchdog import ARMED, RETRY_SECONDS
from ..errors import BeatBudgetExceeded
from ..operations import OperationPhase
from .arming import ops_lock

if TYPE_CHECKING:
    from ..clock import BeatClock
    from .host import BudgetHost
    from .tracker import Tracker

#: The stdlib logger its lines go to (``log_to_stdlib``): the package's, as before the split.
LOG_NAME: Final = "backbeat_sync.budget"
__all__ = ["FOLLOWUP_SECONDS", "exc_class_for", "on_event"]

#: After an interrupt, the watchdog checks back this long later (the owner should
#: have claimed the failure; if the thread is blocked, the watchdog says so).
FOLLOWUP_SECONDS: Final = 0.05
_sleep: Final = time.sleep


def on_event(t: Tracker, pos_now: float, now: float) -> float | None:
    """Watchdog: handle the event due now; return the next event position, or None."""
    s = t.settings
    n = len(s.warn_at)
    i = t.next_i
    if i > n:
        return _followup(t, pos_now)
    if t.done or t.fired is not ARMED or t.seq not in t.slot.live:
        return None
    if i < n:
        t.next_i = i + 1
        try:
            _warn(t, s.warn_at[i], pos_now)
        except Exception as exc:  # a claim that cannot go out must not cost the exhaustion
            t._record(f"budget warning of {t.operation_id} not claimed: {exc!r}")
        return t.start_pos + s.beats * s.warn_at[i + 1] if i + 1 < n else t.deadline
    return _exhaust(t, pos_now, now)


def _warn(t: Tracker, fraction: float, pos_now: float) -> None:
    integration = cast("BudgetHost", t.integration)
    s = t.settings
    left = max(0.0, t.deadline - pos_now)
    t._note(
        f"beat budget warning: {fraction:.0%} of {s.beats:g} beats used,"
        f" {left:.2f} beats left (type: {s.operation_type})"
    )
    integration.count("budget_warnings")
    integration.log.warn(
        f"BACKBEAT budget warning: {t.operation_id} used {fraction:.0%} of {s.beats:g} beats"
    )
    cb = s.on_warning
    if cb is not None:
        WATCHDOG.run_callback(lambda: cb(t, fraction), t)


def _exhaust(t: Tracker, pos_now: float, now: float) -> float | None:
    integration = cast("BudgetHost", t.integration)
    s = t.settings
    used = f"used {pos_now - t.start_pos:.2f} of {s.beats:g} beats"
    if s.on_exhaust == "interrupt":
        t.fired_at = now
        if t.exc_class is None:
            t.exc_class = exc_class_for(t)
        how = WATCHDOG.deliver(t)
        if how == "lost":
            return None
        if how == "retry":
            return pos_now + _beats(t.clock, RETRY_SECONDS)
        if how == "suspect":  # an outer budget's exception is unwinding: raise at exit instead
            t.exhausted = True
            t._note(f"beat budget exceeded: {used}; raised when the block exits")
            return None
        t.next_i = len(s.warn_at) + 1
        if how == "async":
            _sleep(0)  # hand the GIL over now, so the exception lands before we claim
        try:
            t._note(f"beat budget exceeded: {used}; interrupting")
            integration.log.warn(f"BACKBEAT budget exceeded: {t.operation_id} {used}; interrupting")
        except Exception as exc:
            t._record(f"budget exhaustion of {t.operation_id} not claimed: {exc!r}")
        return pos_now + _beats(t.clock, FOLLOWUP_SECONDS)
    t.exhausted = True
    if s.on_exhaust == "warn":
        integration.count("budget_exhausted_warn")
        integration.registry.count_exhaustion(s.operation_type, "warn", "ran_on")
        t._note(f"beat budget exceeded: {used} (warn only)")
    else:
        t._note(f"beat budget exceeded: {used}; raised when the call returns")
    integration.log.warn(f"BACKBEAT budget exceeded: {t.operation_id} {used} ({s.on_exhaust})")
    return None


def _followup(t: Tracker, pos_now: float) -> float | None:
    """Watchdog, after an interrupt: make sure the failure is claimed."""
    if t.finished:
        return None
    if t.delivered:
        if t.done:
            return None  # the owner is finishing it
        # The exception landed but the owner's exit code did not run (it landed on
        # the first instruction of ``__exit__``) or is still inside the block.
        exc = t.exc
        t._count_spent(exc)
        with ops_lock:
            t._announce()
            t._finish(OperationPhase.FAILED, t._spent_reason(exc))
        return None
    if not t.followup_noted:
        t.followup_noted = True
        used = pos_now - t.start_pos
        t._note(
            f"beat budget exceeded: used {used:.2f} of {t.settings.beats:g} beats;"
            " blocked, raised when the blocking call returns"
        )
    return pos_now + 1.0


def _beats(clock: BeatClock, seconds: float) -> float:
    return seconds / clock.beat_duration


# -- the exception delivered asynchronously ---------------------------------------


def exc_class_for(t: Tracker) -> type[BeatBudgetExceeded]:
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
