"""The arming protocol, shared by both faces (``@beat_budget`` and ``track_operation``).

A budget's life in its owner thread, in the words ``docs/budgets.md`` uses:

- its start is read: the clock's ``anchor``, then the time on the clock's source
  (and the system's ``now`` for the watchdog, one read when they are the same);
  both are stored (in the tracker, or in the plain entry) before it is armed;
- :func:`arm` enters it in the thread's ``live`` dict and wakes the watchdog only
  if its first event is earlier than the watchdog's planned wake-up;
- leaving is ``Tracker.leave`` (whoever removes the entry from ``live`` first owns
  the outcome); ``Tracker.take_over`` is the owner finding its budget spent;
- the *shield* (``slot.shield``) is up while the owner runs its own bookkeeping:
  the watchdog then hands its exception over (``slot.sync``) instead of setting it
  asynchronously, and :func:`unshield` raises it when the shield comes down.

Reading the start is three lines that both faces inline (a function returning
a tuple costs ~60 ns there); the decorator's runner (``faces._runner``) inlines
:func:`arm` too (see the comment there); ``Tracker.__enter__`` calls it.
"""

from __future__ import annotations

import itertools
import time
from typing import TYPE_CHECKING, Any, Final

from .._runtime import RUNTIME, WATCHDOG
from .._watchdog import ARMED, SYNC, ThreadSlot, clear_async_exc

if TYPE_CHECKING:
    from .tracker import Tracker

#: The stdlib logger its lines go to (``log_to_stdlib``): the package's, as before the split.
LOG_NAME: Final = "backbeat_sync.budget"
__all__ = [
    "absorb_pending",
    "arm",
    "await_decision",
    "next_seq",
    "ops_lock",
    "raise_sync",
    "unshield",
]

#: Budget sequence numbers: the key of a budget in its thread's ``live`` dict (entry order).
next_seq: Final = itertools.count(1).__next__  # one call less than next(...) on the hot paths
#: Serialises announcing and finishing budget operations (watchdog, beat thread, owners).
#: The runtime owns it (process-wide state), and re-initialises it in a fork child.
ops_lock: Final = RUNTIME.ops_lock
_sleep: Final = time.sleep


def arm(slot: ThreadSlot, seq: int, entry: list[Any], now: float, first_in: float) -> None:
    """Arm a budget: ``slot.live[seq] = entry``; wake the watchdog if its first event (``first_in``
    seconds from ``now``) is earlier than the planned wake-up. The watchdog takes it into its
    heap when it next wakes.

    The wake-up is shielded: its ``except OSError`` would swallow a ``BeatBudgetExceeded``
    (a TimeoutError) of an enclosing budget landing inside it.
    """
    slot.live[seq] = entry
    if now + first_in < WATCHDOG.next_wake:
        slot.shield += 1
        WATCHDOG.notify()
        unshield(slot)


def await_decision(t: Tracker) -> None:
    """The watchdog has won ``t`` (gone from ``live``, still ARMED): wait the few bytecodes
    until it has chosen how to deliver (``Fired.ASYNC`` or ``SYNC``)."""
    while t.fired is ARMED:
        _sleep(0)


def absorb_pending(slot: ThreadSlot) -> None:
    """With the shield up: an exception set before it went up is cleared and made synchronous."""
    p = slot.pending
    if p is not None and not p.delivered:
        clear_async_exc(slot.tid)
        slot.pending = None
        p.fired = SYNC
        if slot.sync is None:
            slot.sync = p


def unshield(slot: ThreadSlot) -> None:
    """Lower the shield; at zero, raise an exception the watchdog handed over meanwhile."""
    slot.shield -= 1
    if slot.shield == 0 and slot.sync is not None:
        raise_sync(slot)


def raise_sync(slot: ThreadSlot) -> None:
    """Raise, in the owner thread, a budget exception the watchdog handed over."""
    t = slot.sync
    slot.sync = None
    if t is None or t.delivered:
        return
    raise t._sync_exc(None)
