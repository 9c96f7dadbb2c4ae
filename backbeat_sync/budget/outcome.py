"""How a budgeted run ended, as the tracker says it: the reason, the counters, the
exception's figures and the history sample (the outcome side of
:class:`~.tracker.Tracker`, whose fields are declared there)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Final, cast

from ..errors import BeatBudgetExceeded
from ..history import Sample, name_of
from .arming import ops_lock

if TYPE_CHECKING:
    from ..clock import BeatClock
    from .host import BudgetHost
    from .settings import BudgetSettings

__all__ = ["LATE_SECONDS", "OutcomeMixin"]

#: An exception raised more than this long after the budget ran out is ``late``
#: (the code was blocked in C and could not be interrupted on time).
LATE_SECONDS: Final = 0.05


class OutcomeMixin:
    """The outcome side of :class:`~.tracker.Tracker` (its fields are declared there)."""

    if not TYPE_CHECKING:  # a slotted base (Tracker has the slots); mypy checks the fields below
        __slots__ = ()

    if TYPE_CHECKING:  # what the methods below use of the tracker
        settings: BudgetSettings
        integration: BudgetHost | None
        st_in: tuple[float, float, float, float]
        t_in: float
        op_id: str
        spent_counted: bool
        delivered: bool
        exc: BaseException | None
        fired_at: float

        @property
        def operation_id(self) -> str: ...
        @property
        def clock(self) -> BeatClock: ...
        @property
        def start_pos(self) -> float: ...
        @property
        def deadline(self) -> float: ...

    def _remember(self, outcome: str, kind: str | None, used: float | None) -> None:
        """Record the finished run in the integration's budget history (a deque append)."""
        integration = self.integration
        if integration is None:
            return
        if not hasattr(self, "st_in"):  # its __enter__ failed before the start was read: no run
            return
        clock = integration.clock
        s = self.settings
        # clock.budget_position(), self.start_pos and clock.beat_duration, inlined (three
        # Python-level calls, ~150 ns, on every exit by the engine's full path); one anchor.
        idx, t0, spb, off = clock.anchor
        source = clock.time_source
        pos = idx + off + (source.monotonic() - t0) / spb
        if used is None:
            i0, s0, p0, o0 = self.st_in
            used = max(0.0, pos - (i0 + o0 + (self.t_in - s0) / p0))
        name = name_of(self.op_id) if s.explicit else s.name
        integration.history.push(
            Sample(
                s.operation_type,
                name or s.operation_type,
                s.beats,
                used,
                outcome,
                kind,
                pos,
                60.0 / spb,
                s.budget_source,
                source.time(),
            )
        )

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
        with ops_lock:
            if self.spent_counted:
                return
            self.spent_counted = True
        integration = cast("BudgetHost", self.integration)
        mode = self.settings.on_exhaust
        if mode == "interrupt":
            late = isinstance(exc, BeatBudgetExceeded) and exc.late
            integration.count(
                "budget_exhausted_interrupt_late" if late else "budget_exhausted_interrupt_interrupted"
            )
            integration.registry.count_exhaustion(
                self.settings.operation_type, mode, "late" if late else "interrupted"
            )
        elif mode == "raise_after":
            integration.count("budget_exhausted_raise_after")
            integration.registry.count_exhaustion(self.settings.operation_type, mode, "ran_on")

    def _sync_exc(self, result: Any) -> BeatBudgetExceeded:
        """The exception, raised by the owner itself (it could not be, or was not, set asynchronously)."""
        exc = BeatBudgetExceeded(**self._exc_fields(), result=result)
        self.delivered = True
        self.exc = exc
        return exc

    def _exc_fields(self) -> dict[str, Any]:
        pos = self.clock.budget_position()
        fired_at = self.fired_at
        # ``fired_at`` is on the clock's time source (the watchdog fires a heap's events at
        # its clock's "now"), so lateness is measured on it too.
        late = fired_at > 0 and self.clock.time_source.monotonic() - fired_at > LATE_SECONDS
        # The position may step back a little when a late frame snaps it to its index;
        # a budget that fired was spent, so it reports at least the whole budget.
        return {
            "operation_id": self.operation_id,
            "budget_beats": self.settings.beats,
            "beats_used": max(self.settings.beats, pos - self.start_pos),
            "beats_over": max(0.0, pos - self.deadline),
            "late": late,
        }
