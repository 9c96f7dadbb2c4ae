"""Beat budgets for sync code: ``track_operation``, ``@beat_budget``, ``execute_with_beat_budget``.

One engine, two faces: every budgeted call or ``with`` block runs inside a
:class:`Tracker` armed by one protocol (:mod:`.arming`). ``track_operation`` is the
seed's explicit operation (claimed at start, on each phase change and at the end);
a ``@beat_budget`` call is the same tracker made lighter: a plain entry in its
thread's ``live`` dict, with no tracker object, registry entry or message unless
something needs one (it is still running at a beat or when the watchdog wakes,
gets a warning, runs out or fails).

The budget counts in beats on :meth:`BeatClock.budget_position`, so it stretches
with the tempo and keeps counting when the pulse is silent. The engine talks to
its integration through :class:`BudgetHost` only. The process-wide watchdog
(:mod:`backbeat_sync._watchdog`, owned by :mod:`backbeat_sync._runtime`) fires
warnings and exhaustion; see ``docs/budgets.md`` for how an exception is
delivered only where it belongs.

Modules: :mod:`.settings` (checked once), :mod:`.arming` (the shared protocol and the
shield), :mod:`.tracker` (the owner's side), :mod:`.events` (the watchdog's side),
:mod:`.faces` (the decorator, the block, ``precise_mode``), :mod:`.host` (the protocol).
"""

from __future__ import annotations

from typing import Any, Final

from .._runtime import RUNTIME
from .faces import PreciseMode, beat_budget, execute_with_beat_budget, precise_mode, track_operation
from .flow import current_operation
from .host import BudgetHost
from .settings import DEFAULT_WARN_AT, ON_EXHAUST, BudgetSettings, OnExhaust
from .tracker import Tracker, announce_running

#: The stdlib logger its lines go to (``log_to_stdlib``): the package's, as before the split.
LOG_NAME: Final = "backbeat_sync.budget"
__all__ = [
    "DEFAULT_WARN_AT",
    "ON_EXHAUST",
    "BudgetHost",
    "BudgetSettings",
    "OnExhaust",
    "PreciseMode",
    "Tracker",
    "announce_running",
    "beat_budget",
    "current_operation",
    "execute_with_beat_budget",
    "precise_mode",
    "track_operation",
]


def __getattr__(name: str) -> Any:
    """The budget gate's state, owned by ``_runtime`` (read here by older tests and tools)."""
    if name == "_fallback_logged":
        return RUNTIME.fallback_logged
    if name == "_BUDGETS_ON":
        return RUNTIME.budgets_on
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
