"""Operations in workflows, the budget engine's side: a tracker's parent, correlation,
dependencies, progress reports and priority (``docs/workflows.md``).

:class:`FlowMixin` holds the tracker's workflow methods (``op.bind``, ``op.wait_for``,
``op.report``, ``op.correlation_id`` ...); the functions find a budget's parent (its
thread's innermost budget, or the context's operation), cut a child's budget to a
parent in another thread, and answer ``backbeat_sync.current_operation()``. The
tracker is reached through ``live`` entries and their settings (``materialize``), so
this module does not import :mod:`.tracker`.
"""

from __future__ import annotations

import contextvars
import functools
import threading
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any, Final, ParamSpec, TypeVar, cast

import attrs

from .._runtime import WATCHDOG
from .._watchdog import ThreadSlot, thread_state
from ..errors import InvalidArgument
from ..workflow import CURRENT, Flow, check_beats, check_details, check_done, check_ids, project
from .arming import ops_lock, unshield

if TYPE_CHECKING:
    from ..clock import BeatClock
    from .host import BudgetHost
    from .settings import BudgetSettings
    from .tracker import Tracker

#: The stdlib logger its lines go to (``log_to_stdlib``): the package's, as before the split.
LOG_NAME: Final = "backbeat_sync.budget"
__all__ = [
    "MIN_CUT_BEATS",
    "FlowMixin",
    "arm_child",
    "binds",
    "current_operation",
    "cut_settings",
    "find_parent",
    "innermost",
    "stale",
    "tracker_of",
]

P = ParamSpec("P")
R = TypeVar("R")
_cv_get: Final = CURRENT.get
_cv_set: Final = CURRENT.set
#: A child budget cut to less than this (its parent is spent) runs out at once.
MIN_CUT_BEATS: Final = 1e-6
_UNRESOLVED: Final = object()
#: Parents followed at most when working out a correlation id (a chain bound by a bug stops here).
_MAX_CHAIN: Final = 1_000_000


def tracker_of(slot: ThreadSlot, seq: int, entry: list[Any]) -> Tracker:
    """The tracker of a ``live`` entry: a block's is its first item; a decorated call's is made
    by its settings (``BudgetSettings.materialize``) if nobody made it yet."""
    # No typing.cast on these paths: it is a Python-level call (~40 ns) that only returns its argument.
    t = entry[0]
    if t is not None:
        return t  # type: ignore[no-any-return]
    return entry[1].materialize(slot, seq, entry)  # type: ignore[no-any-return]


class FlowMixin:
    """The workflow side of :class:`~.tracker.Tracker` (its fields are declared there)."""

    if not TYPE_CHECKING:  # a slotted base (Tracker has the slots); mypy checks the fields below
        __slots__ = ()

    # Set only on the paths that use them (in the tracker's ``__dict__``); class defaults here.
    _hint: Tracker | None = None  #: the context's operation when it started (CURRENT)
    _parent: Any = _UNRESOLVED  #: the enclosing operation's tracker, found on first need
    #: parent_id, correlation_id, depends_on as given to ``track_operation``
    _opts: tuple[str | None, str | None, tuple[str, ...]] | None = None
    _report: tuple[float, Mapping[str, Any] | None, float | None] | None = None  #: done, details, projected
    cut: bool = False  #: its budget was cut to what its parent (in another thread) had left
    _corr: str | None = None  #: its correlation id, once worked out

    if TYPE_CHECKING:  # what the methods below use of the tracker
        settings: BudgetSettings
        integration: BudgetHost | None
        slot: ThreadSlot
        seq: int
        announced: bool
        done: bool
        finished: bool

        @property
        def operation_id(self) -> str: ...
        @property
        def clock(self) -> BeatClock: ...
        @property
        def beats_used(self) -> float: ...
        def _wait(self, event: threading.Event | None, timeout: float | None) -> bool: ...
        def _note(self, notes: str) -> None: ...

    # -- workflows (docs/workflows.md) ---------------------------------------------

    @property
    def parent(self) -> Tracker | None:
        """The enclosing operation in this process (this thread's, or the context's), or None."""
        parent = self._parent
        if parent is _UNRESOLVED:
            parent = self._parent = find_parent(self)  # type: ignore[arg-type]
        return parent  # type: ignore[no-any-return]  # (no typing.cast call: see tracker_of)

    @property
    def parent_type(self) -> str | None:
        """The local parent's operation type (for history: what this kind of work ran inside), or None."""
        parent = self.parent
        return None if parent is None else parent.settings.operation_type

    @property
    def parent_id(self) -> str | None:
        """The enclosing operation's id (``parent_id=`` given, or the local parent's), or None for a root."""
        opts = self._opts
        if opts is not None and opts[0] is not None:
            return opts[0]
        parent = self.parent
        return None if parent is None else parent.operation_id

    @property
    def correlation_id(self) -> str:
        """The workflow's id: its root operation's (send it along to continue the workflow elsewhere).

        ``correlation_id=`` if given; else the parent's; else ``parent_id=`` (a remote
        parent taken as the root); else this operation's own id.
        """
        cached = self._corr
        if cached is not None:
            return cached
        # Up the chain of parents without recursion (100,000 nested blocks are a benchmark),
        # remembering the answer on each tracker passed.
        chain: list[Tracker] = []
        t: Tracker = self  # type: ignore[assignment]  # (no typing.cast call: see tracker_of)
        while True:
            opts = t._opts
            if opts is not None and (opts[1] is not None or opts[0] is not None):
                found = opts[1] if opts[1] is not None else cast(str, opts[0])
                break
            if t._corr is not None:
                found = t._corr
                break
            chain.append(t)
            parent = t.parent
            if parent is None or len(chain) > _MAX_CHAIN:
                found = t.operation_id
                break
            t = parent
        for x in chain:
            x._corr = found
        return found

    @property
    def priority(self) -> str:
        """``critical``, ``high``, ``normal`` or ``low``."""
        return self.settings.priority

    @property
    def depends_on(self) -> tuple[str, ...]:
        """The ids given as ``depends_on`` (empty if none)."""
        opts = self._opts
        return () if opts is None else opts[2]

    @property
    def dependencies_failed(self) -> tuple[str, ...]:
        """Ids of dependencies (``depends_on``, ``wait_for``) that failed in this integration so far."""
        integration = self.integration
        if integration is None or not self.announced:
            return ()
        flow = integration.registry.flow_of(self.operation_id)
        return () if flow is None else flow.failed

    @property
    def work_done(self) -> float | None:
        """The last share of work reported with :meth:`report` (None: never reported)."""
        report = self._report
        return None if report is None else report[0]

    def bind(self, fn: Callable[P, R]) -> Callable[P, R]:
        """A callable that runs ``fn`` in this operation's context, in whatever thread calls it.

        Budgets opened inside it (``track_operation``, ``@beat_budget`` calls) are this
        operation's children: they carry its id as ``parent_id`` and its correlation id,
        and, run in another thread while this one is open, their budget is cut to what
        this one has left (unless this one only warns). Each call runs in a fresh copy of
        the context captured here (``contextvars``), so the callable may run in many
        threads at once: ``pool.submit(op.bind(work), item)``.

        Args:
            fn: what to run.

        Returns:
            ``fn`` bound to this operation's context (same signature).

        Raises:
            InvalidArgument: ``fn`` is not callable.
        """
        if not callable(fn):
            raise InvalidArgument("fn", fn, "must be callable")
        ctx = contextvars.copy_context()
        if self.integration is not None and getattr(self, "slot", None) is not None:
            ctx.run(_cv_set, cast("Tracker", self))

        @functools.wraps(fn)
        def bound(*args: P.args, **kwargs: P.kwargs) -> R:
            return ctx.copy().run(fn, *args, **kwargs)

        return bound

    def wait_for(self, ids: Iterable[str], beats: float | None = None) -> bool:
        """Wait, cooperatively, until the operations ``ids`` (in this integration) have finished.

        While it waits the operation claims ``waiting`` (``waiting for {ids}``). It is
        woken by their final claims; ids this integration does not know (another
        agent's, or already finished) never block. One that fails is added to
        :attr:`dependencies_failed`.

        Args:
            ids: the operation ids.
            beats: wait at most this many beats (None: as long as the budget lasts).

        Returns:
            True when none of them is active any more; False if ``beats`` passed first
            (or, with ``on_exhaust="raise_after"`` or ``"warn"``, the budget ran out).

        Raises:
            BeatBudgetExceeded: the budget ran out first (``on_exhaust="interrupt"``).
            InvalidArgument: ``ids`` is not a list of ids, or ``beats`` not a number > 0.
        """
        wanted = check_ids("ids", ids)
        if beats is not None:
            beats = check_beats(beats)
        integration = self.integration
        if integration is None or not wanted:
            return True
        registry = integration.registry
        me = self.operation_id if self.announced and not self.finished else None
        event = threading.Event()
        pending = registry.wait_on(me, wanted, event)
        if not pending:
            return True
        clock = self.clock
        end = None if beats is None else clock.budget_position() + beats
        try:
            while True:
                timeout = None if end is None else clock.seconds_until(end)
                if timeout is not None and timeout <= 0:
                    return False
                if not self._wait(event, timeout):
                    return False  # the beats passed, or a budget that does not interrupt ran out
                event.clear()
                pending = registry.still_active(pending)
                if not pending:
                    return True
        finally:
            registry.unwait(me, wanted, event)

    def report(self, done: float, details: Mapping[str, Any] | None = None) -> None:
        """Say how much of the work is done: the operation's claims carry ``work_done`` and ``details``.

        With the beats used so far the library projects the finish (``eta_beats`` on the
        claims). If the projection passes the budget while the budget is not yet spent,
        a warning is claimed at once (``beat budget warning: projected 6.5 beats, budget
        4 ...``), counted in ``budget_warnings`` and ``on_warning(op, projected / budget)``
        is called (a fraction above 1). That happens once per operation. Reports go out
        with the next claim (every beat), not at once.

        Args:
            done: the share of the work done, 0.0 to 1.0 (not the budget's ``progress``).
            details: a small JSON object (at most ``DETAILS_MAX_BYTES`` = 1024 bytes encoded).

        Raises:
            InvalidArgument: ``done`` is out of range, or ``details`` is not a small JSON object.
        """
        work_done = check_done(done)
        info = check_details(details)
        integration = self.integration
        if integration is None:
            self._report = (work_done, info, None)
            return
        used = self.beats_used
        budget = self.settings.beats
        self._report = (work_done, info, project(work_done, used))
        if not self.announced:
            return  # a quiet call: its claims carry the report if it is still running at a beat
        with ops_lock:
            if self.finished:
                return
            result = integration.registry.report(self.operation_id, work_done, info, used, budget)
        if result is not None and result[1] is not None:
            self._projected_overrun(result[1], used)

    def _projected_overrun(self, projected: float, used: float) -> None:
        """Claim the projected-overrun warning, count it, call ``on_warning``."""
        integration = cast("BudgetHost", self.integration)
        s = self.settings
        self._note(
            f"beat budget warning: projected {projected:.1f} beats, budget {s.beats:g},"
            f" {max(0.0, s.beats - used):.2f} beats left (type: {s.operation_type})"
        )
        integration.count("budget_warnings")
        integration.log.warn(
            f"BACKBEAT budget warning: {self.operation_id} projected {projected:.1f} of {s.beats:g} beats"
        )
        cb = s.on_warning
        if cb is not None:
            fraction = projected / s.beats
            me = cast("Tracker", self)
            WATCHDOG.run_callback(lambda: cb(me, fraction))

    def _make_flow(self) -> Flow | None:
        """This operation's flow for its registry entry (None: a root with nothing to say)."""
        opts = self._opts
        parent = self.parent
        s = self.settings
        report = self._report
        if parent is None and opts is None and s.priority == "normal" and report is None:
            return None
        flow = Flow(
            correlation_id=self.correlation_id,
            parent_id=self.parent_id,
            priority=s.priority,
            depends_on=() if opts is None else opts[2],
        )
        if report is not None:
            flow = attrs.evolve(flow, work_done=report[0], details=report[1], projected=report[2])
        return flow

    def _cut_to_parent(self, parent: Tracker) -> None:
        """In another thread than its open parent: no deadline later than the parent's."""
        settings = cut_settings(self.settings, parent, cast("BudgetHost", self.integration))
        if settings is not self.settings:
            self.settings = settings
            self.cut = True

    def _enter_flow(self, slot: ThreadSlot, hint: Tracker | None) -> Flow | None:
        """``__enter__`` of a block in a workflow: find the parent, cut the budget to it, make the flow."""
        if hint is not None:
            self._hint = hint
        parent = self._parent = find_parent(self, slot)  # type: ignore[arg-type]  # (no cast call)
        if parent is not None and parent.slot is not slot and binds(parent):
            self._cut_to_parent(parent)
        return self._make_flow()


def find_parent(t: Tracker, slot: ThreadSlot | None = None) -> Tracker | None:
    """The operation ``t`` started inside: its thread's innermost budget entered before it, or the
    context's operation (``CURRENT`` when it started), whichever started last.

    ``slot``: given by the owner thread as ``t`` enters (nothing of ``t`` is in it yet, and
    only the owner adds to it, so its newest entry is the innermost); else read from ``t``.
    """
    hint = t._hint
    local: Tracker | None = None
    if slot is not None:
        live = slot.live
        if live:
            k = next(reversed(live))
            local = tracker_of(slot, k, live[k])
    else:
        slot = getattr(t, "slot", None)
        if slot is not None:
            live = slot.live
            seq = t.seq
            below = [k for k in list(live) if k < seq]
            if below:
                k = max(below)
                entry = live.get(k)
                if entry is not None:
                    local = tracker_of(slot, k, entry)
    if hint is not None and slot is not None and stale(hint, slot):
        hint = None
    if hint is not None and hint is not t and (local is None or hint.seq > local.seq):
        return hint
    return local


def stale(hint: Tracker, slot: ThreadSlot) -> bool:
    """A context's operation of this very thread that is no longer open here: left behind by a block
    whose exit never ran (an exception landed on its first instruction). Open ones are in ``live``."""
    return getattr(hint, "slot", None) is slot and hint.seq not in slot.live


def binds(parent: Tracker) -> bool:
    """Whether ``parent``'s deadline binds a child in another thread: it is open, and interrupts
    or raises when it runs out (a ``warn`` budget stops nothing, so it cuts nothing)."""
    integration = parent.integration
    return (
        integration is not None
        and integration.running  # not a stopped one (nor one left behind by a fork)
        and not parent.done
        and parent.settings.on_exhaust != "warn"
    )


def cut_settings(settings: BudgetSettings, parent: Tracker, integration: BudgetHost) -> BudgetSettings:
    """``settings`` with the budget cut to what ``parent`` has left, if that is less (else the same)."""
    seconds = parent.clock.seconds_until(parent.deadline)
    beats = seconds / integration.clock.beat_duration
    if beats >= settings.beats:
        return settings
    return attrs.evolve(settings, beats=max(beats, MIN_CUT_BEATS))


def arm_child(slot: ThreadSlot, entry: list[Any], parent: Tracker, now: float) -> None:
    """A ``@beat_budget`` call that just armed in another thread than its context's operation:
    cut its budget to the parent's remainder, and wake the watchdog if it is now the earliest."""
    slot.shield += 1
    try:
        settings = entry[1]
        if binds(parent):
            entry[1] = settings = cut_settings(settings, parent, entry[2])
        if now + settings.first_beats * entry[3][2] < WATCHDOG.next_wake:
            WATCHDOG.notify()
    finally:
        unshield(slot)


def innermost() -> Tracker | None:
    """The operation open in this context (``backbeat_sync.current_operation``)."""
    hint = _cv_get()
    slot = thread_state.__dict__.get("slot")  # not getattr: a miss would raise (a microsecond) inside it
    if slot is not None:
        if hint is not None and stale(hint, slot):
            hint = None
        live = slot.live
        if live:
            keys = list(live)
            if keys:
                k = keys[-1]  # entered last (sequence numbers grow; only this thread adds)
                entry = live.get(k)
                if entry is not None and (hint is None or k > hint.seq):
                    return tracker_of(slot, k, entry)
    return hint


def current_operation() -> Tracker | None:
    """The operation open in this context: the innermost budget of this thread, or the bound one.

    Inside ``with track_operation(...)`` that is the block's tracker; inside a
    ``@beat_budget`` call, the call's; in a function run by ``op.bind(fn)`` (or
    by ``contextvars.copy_context().run`` inside a block), ``op`` until a budget
    of this thread opens inside it. None outside any, and with no integration
    running (budgets then run plainly and track nothing).

    Returns:
        The tracker (``op.operation_id``, ``op.correlation_id``, ``op.bind``...), or None.
    """
    return innermost()
