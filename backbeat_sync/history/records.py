"""What a finished run becomes: :class:`Sample`, the figures of a type, and the run logs
the budget engine appends to (one bounded deque per budget, drained by any history)."""

from __future__ import annotations

import bisect
import threading
import weakref
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NamedTuple

import attrs

from .rules import RUN_LOG_LIMIT

if TYPE_CHECKING:
    from .core import BudgetHistory

__all__ = ["Figures", "OperationStats", "RunLog", "Sample", "drain_logs", "new_run_log"]


class Sample(NamedTuple):
    """One finished budgeted run (a named tuple: the recording thread makes many).

    Attributes:
        operation_type: the claims' ``operation_type``.
        name: the function's qualified name (decorated calls) or the operation id.
        budget: the budget it ran with, in beats.
        beats_used: beats from its start to its end.
        outcome: ``"done"``, ``"failed"`` or ``"exceeded"``.
        exceeded_kind: for ``exceeded``: ``"interrupted"`` (stopped in Python) or ``"late"``
            (it ended after its budget: a blocking C call, ``raise_after``, ``warn``); else None.
        end_beat: the budget position (beats) when it ended.
        tempo_bpm: the tempo when it ended.
        budget_source: ``"fixed"`` (a number), ``"profile"`` or ``"history"`` (``"auto"``).
        recorded_at: when it ended (epoch seconds).
    """

    operation_type: str
    name: str
    budget: float
    beats_used: float
    outcome: str
    exceeded_kind: str | None = None
    end_beat: float = 0.0
    tempo_bpm: float = 0.0
    budget_source: str = "fixed"
    recorded_at: float = 0.0


@attrs.frozen
class OperationStats:
    """What the history says about one operation type (or one name of it).

    Attributes:
        operation_type: the type.
        name: the name the figures are restricted to, or None for every name of the type.
        count: runs recorded (done + failed + exceeded).
        done: runs that finished within their budget.
        failed: runs that raised (anything but their budget running out).
        exceeded: runs whose budget ran out.
        interrupted: exceeded runs stopped in Python.
        late: exceeded runs that ended after their budget (blocked in C, or not interrupting).
        p50: median beats used over done and exceeded runs (nearest rank; 0.0 without any).
        p95: 95th percentile of the same (nearest rank).
        max: the most beats used by a done or exceeded run.
        on_time_rate: done / (done + exceeded); 0.0 without any.
    """

    operation_type: str
    name: str | None
    count: int
    done: int
    failed: int
    exceeded: int
    interrupted: int
    late: int
    p50: float
    p95: float
    max: float
    on_time_rate: float

    @property
    def timed(self) -> int:
        """Runs that say how long the work takes: done + exceeded (``"auto"`` counts these)."""
        return self.done + self.exceeded


class Figures:
    """A type's figures, kept up to date as samples come and go (so ``stats``/``suggest`` are O(1)).

    ``timed`` is the sorted beats used of the done and exceeded runs kept.
    """

    __slots__ = ("done", "exceeded", "failed", "late", "timed")

    def __init__(self) -> None:
        self.done = self.failed = self.exceeded = self.late = 0
        self.timed: list[float] = []

    def add(self, s: Sample) -> None:
        outcome = s.outcome
        if outcome == "failed":
            self.failed += 1
            return
        if outcome == "done":
            self.done += 1
        else:
            self.exceeded += 1
            if s.exceeded_kind == "late":
                self.late += 1
        bisect.insort(self.timed, s.beats_used)

    def remove(self, s: Sample) -> None:
        outcome = s.outcome
        if outcome == "failed":
            self.failed -= 1
            return
        if outcome == "done":
            self.done -= 1
        else:
            self.exceeded -= 1
            if s.exceeded_kind == "late":
                self.late -= 1
        timed = self.timed
        i = bisect.bisect_left(timed, s.beats_used)
        if i < len(timed) and timed[i] == s.beats_used:
            del timed[i]


class RunLog(deque):  # type: ignore[type-arg]
    """The finished runs of one budget (one ``BudgetSettings``), appended by the callers' threads.

    A bounded deque: a caller's ``append`` is one C call, and when a function
    finishes more than :data:`RUN_LOG_LIMIT` runs between two drains, the oldest
    are dropped in C (the history keeps only the newest per (type, name) anyway).
    Every history's drain empties every log, routing each run to the history of the
    integration it ran under. The registry holds each log strongly, so runs still
    waiting survive their budget (a function, or an ``execute_with_beat_budget``
    call, that is gone); a drain forgets a log once it is empty and its budget gone.
    """

    __slots__ = ("owner",)
    owner: Callable[[], Any]  #: a weak reference to the budget's settings

    # Held in sets: by identity (a deque compares and hashes by content, or not at all).
    __hash__ = object.__hash__  # type: ignore[assignment]
    __eq__ = object.__eq__


#: Every run log, by the operation type of its budget (so ``suggest(type)`` drains only that type's).
_logs: dict[str, set[RunLog]] = {}
_logs_lock = threading.Lock()


def new_run_log(operation_type: str, owner: Any) -> RunLog:
    """A fresh run log for the budget ``owner`` (its settings) of ``operation_type``."""
    log = RunLog(maxlen=RUN_LOG_LIMIT)
    log.owner = weakref.ref(owner)
    with _logs_lock:
        _logs.setdefault(operation_type, set()).add(log)
    return log


def drain_logs(operation_type: str | None = None) -> None:
    """Move the runs waiting in the run logs (of one type, or all) to their integrations' histories."""
    with _logs_lock:
        groups = list(_logs.values()) if operation_type is None else [_logs.get(operation_type, set())]
        logs = []
        for group in groups:
            for log in list(group):
                if log:
                    logs.append(log)
                elif log.owner() is None:  # empty, and its budget is gone: forget it
                    group.discard(log)
    if not logs:
        return
    routed: dict[int, tuple[BudgetHistory, list[Any]]] = {}
    for log in logs:
        pop = log.popleft
        while True:
            try:
                item = pop()
            except IndexError:
                break
            try:
                head = item[0]
                integration = head[2] if type(head) is list else head.integration
                history = integration.history
            except Exception:  # not a run the engine appended (a bug): dropped, never raised here
                continue
            slot = routed.get(id(history))
            if slot is None:
                slot = routed[id(history)] = (history, [])
            slot[1].append(item)
    for history, items in routed.values():
        history._pending.extend(items)
        history._drain_own()
