"""Operations in workflows: parents and correlation, dependencies, work progress, priorities.

What an operation says about the workflow it belongs to lives in one immutable
:class:`Flow` on its :class:`~backbeat_sync.P2POperation` (``op.flow``; None for
a plain root operation). A change (a dependency finishing, a progress report)
replaces the whole object under the registry lock, so a claim snapshot holds
a consistent one.

The open operation of a context is :data:`CURRENT`, a :class:`contextvars.ContextVar`
that ``track_operation`` sets for its block and ``op.bind(fn)`` sets around ``fn``
(see :func:`current_operation`); ``@beat_budget`` calls are found through their
thread's open budgets instead (setting a context variable per call would cost
the decorator a tenth of its overhead). See ``docs/workflows.md``.
"""

from __future__ import annotations

import contextvars
import json
import math
import threading
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any, Final

import attrs

from .errors import InvalidArgument
from .protocol import PRIORITY_NAMES, check_wire_id

if TYPE_CHECKING:
    from .budget import Tracker

__all__ = [
    "CURRENT",
    "DETAILS_MAX_BYTES",
    "PRIORITIES",
    "PRIORITY_RANK",
    "Flow",
    "RegistryFlows",
    "check_beats",
    "check_details",
    "check_done",
    "check_ids",
    "check_priority",
    "projected_overrun",
]

#: Claim priorities, most urgent first.
PRIORITIES: Final = PRIORITY_NAMES
#: Sort key of each priority (the per-beat sweep sends lower ranks first).
PRIORITY_RANK: Final = {p: i for i, p in enumerate(PRIORITIES)}
NORMAL_RANK: Final = PRIORITY_RANK["normal"]
#: Largest ``details`` object a progress report may carry, encoded as compact JSON.
DETAILS_MAX_BYTES: Final = 1024
#: Most ids one operation may depend on (with ids of up to 256 bytes, the claim still fits 64 KiB).
MAX_DEPENDENCIES: Final = 64

#: The operation open in this context (a Tracker), or None.
CURRENT: contextvars.ContextVar[Tracker | None] = contextvars.ContextVar(
    "backbeat_sync.current_operation", default=None
)


@attrs.define(slots=True)
class Flow:
    """Where one operation sits in its workflow (never changed in place: replaced whole, with
    ``attrs.evolve``, under the registry lock; not frozen only because a frozen class costs a
    nested block a microsecond to make).

    Attributes:
        correlation_id: the root operation's id; None for a root (its own id).
        parent_id: the enclosing operation's id; None for a root.
        priority: ``critical``, ``high``, ``normal`` or ``low``.
        depends_on: the ids it depends on, as given.
        pending: those of them (and of ``op.wait_for``) still active in this integration.
        failed: dependencies (and waited-for operations) that failed, in the order they did.
        note: appended to the next claim's notes once (a dependency failed).
        work_done: the code's own progress report, 0.0-1.0 (None: never reported).
        details: what came with the last report.
        projected: beats the whole operation is projected to take (from ``work_done``).
        overrun_warned: the projected-overrun warning has been claimed.
    """

    correlation_id: str | None = None
    parent_id: str | None = None
    priority: str = "normal"
    depends_on: tuple[str, ...] = ()
    pending: tuple[str, ...] = ()
    failed: tuple[str, ...] = ()
    note: str | None = None
    work_done: float | None = None
    details: Mapping[str, Any] | None = None
    projected: float | None = None
    overrun_warned: bool = False

    @property
    def rank(self) -> int:
        """The priority's sort key (0 for critical)."""
        return PRIORITY_RANK[self.priority]


def check_priority(priority: Any) -> str:
    """``priority`` if it is one of :data:`PRIORITIES`.

    Raises:
        InvalidArgument: it is not.
    """
    if priority not in PRIORITY_RANK or not isinstance(priority, str):
        raise InvalidArgument("priority", priority, f"must be one of {', '.join(PRIORITIES)}")
    return priority


def check_ids(name: str, ids: Any) -> tuple[str, ...]:
    """The operation ids of ``ids`` (an iterable of at most :data:`MAX_DEPENDENCIES` non-empty
    strings of at most 256 UTF-8 bytes each, not a string itself).

    Raises:
        InvalidArgument: ``ids`` is a string, not iterable, too long, or holds something else.
    """
    if isinstance(ids, (str, bytes)) or not isinstance(ids, Iterable):
        raise InvalidArgument(name, ids, "must be a list of operation ids (non-empty strings)")
    out = tuple(ids)
    if len(out) > MAX_DEPENDENCIES:
        raise InvalidArgument(name, f"{len(out)} ids", f"must hold at most {MAX_DEPENDENCIES} ids")
    for i in out:
        if not isinstance(i, str) or not i:
            raise InvalidArgument(name, ids, "must be a list of operation ids (non-empty strings)")
        check_wire_id(name, i)
    return out


def check_id(name: str, value: Any) -> str | None:
    """``value`` if it is None or a non-empty string.

    Raises:
        InvalidArgument: it is something else.
    """
    if value is not None:
        if not isinstance(value, str) or not value:
            raise InvalidArgument(name, value, "must be a non-empty string (an operation id)")
        check_wire_id(name, value)
        return value
    return None


def check_beats(beats: Any) -> float:
    """``beats`` as a float if it is a finite number > 0 (a budget, or ``op.wait_for(ids, beats=...)``).

    Raises:
        InvalidArgument: it is not.
    """
    if (
        isinstance(beats, bool)
        or not isinstance(beats, (int, float))
        or not math.isfinite(beats)
        or beats <= 0
    ):
        raise InvalidArgument("beats", beats, "must be a finite number of beats > 0")
    return float(beats)


def check_done(done: Any) -> float:
    """``done`` as a float if it is a number 0.0 <= x <= 1.0.

    Raises:
        InvalidArgument: it is not.
    """
    if isinstance(done, bool) or not isinstance(done, (int, float)) or not 0.0 <= done <= 1.0:
        raise InvalidArgument("done", done, "must be a number 0.0 <= done <= 1.0 (the share of work done)")
    return float(done)


def check_details(details: Any) -> Mapping[str, Any] | None:
    """A JSON-ready copy of ``details`` (None, or a small JSON object).

    Raises:
        InvalidArgument: not a dict with string keys, not JSON-serialisable, or
            larger than :data:`DETAILS_MAX_BYTES` encoded.
    """
    if details is None:
        return None
    if not isinstance(details, Mapping) or not all(isinstance(k, str) for k in details):
        raise InvalidArgument("details", details, "must be a dict with string keys (a JSON object)")
    try:
        encoded = json.dumps(dict(details), separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise InvalidArgument("details", details, f"must be JSON-serialisable ({exc})") from None
    if len(encoded.encode("utf-8")) > DETAILS_MAX_BYTES:
        raise InvalidArgument(
            "details", details, f"is {len(encoded)} bytes as JSON; at most {DETAILS_MAX_BYTES} are claimed"
        )
    loaded: dict[str, Any] = json.loads(encoded)  # a private, plain copy the caller cannot change
    return loaded


def projected_overrun(work_done: float, beats_used: float, budget: float) -> float | None:
    """The projected total beats if it passes ``budget`` while there is still time to act, else None.

    The projection is linear: ``beats_used / work_done``. It counts as an
    overrun only while the work is not finished (``work_done < 1``) and the
    budget is not yet spent (``beats_used < budget``).
    """
    if work_done <= 0.0 or work_done >= 1.0 or beats_used >= budget:
        return None
    projected = beats_used / work_done
    return projected if projected > budget else None


def project(work_done: float, beats_used: float) -> float | None:
    """Projected total beats from a report (None before any work is done)."""
    if work_done <= 0.0:
        return None
    total = beats_used / work_done
    return total if math.isfinite(total) else None


class RegistryFlows:
    """The registry's workflow calls (``OperationRegistry`` inherits them; its fields are its own).

    Waiting (``op.wait_for``), the flows of operations, and progress reports, each under
    the registry lock. Dependencies taken in at start and released at finish are the
    registry's own (``_flow_added``, ``_flow_finished``).
    """

    if TYPE_CHECKING:  # the registry's fields these use
        _lock: threading.Lock
        _active: dict[str, Any]
        _finished: dict[str, Any]
        _dependents: dict[str, dict[str, None]]
        _waiters: dict[str, list[threading.Event]]
        _flows: bool

        def _claim(self, op: Any) -> None: ...

        def _saw_flows(self) -> None: ...

    def wait_on(
        self, operation_id: str | None, ids: Iterable[str], event: threading.Event
    ) -> tuple[str, ...]:
        """Set ``event`` when any of ``ids`` still active here finishes; the waiter claims ``waiting``.

        Args:
            operation_id: the operation that waits (None: not one of this registry's).
            ids: what it waits for; ids not active here (finished, another agent's) never block.
            event: set (under the lock) when one of them finishes.

        Returns:
            The ids of ``ids`` still active (the empty tuple: nothing to wait for).
        """
        with self._lock:
            pending = tuple(i for i in dict.fromkeys(ids) if i in self._active and i != operation_id)
            if pending:
                self._saw_flows()
            for i in pending:
                self._waiters.setdefault(i, []).append(event)
            op = self._active.get(operation_id) if operation_id is not None else None
            if op is not None and pending:
                f = op.flow or Flow()
                new = tuple(i for i in pending if i not in f.pending)
                if new:
                    for i in new:
                        self._dependents.setdefault(i, {})[op.id] = None
                    op.flow = attrs.evolve(f, pending=f.pending + new)
                    if op.announced:
                        self._claim(op)
            return pending

    def unwait(self, operation_id: str | None, ids: Iterable[str], event: threading.Event) -> None:
        """Undo :meth:`wait_on`: forget ``event``; the waiter waits only for its ``depends_on`` again."""
        with self._lock:
            for i in ids:
                events = self._waiters.get(i)
                if events is not None and event in events:
                    events.remove(event)
                    if not events:
                        del self._waiters[i]
            op = self._active.get(operation_id) if operation_id is not None else None
            if op is None or op.flow is None or not op.flow.pending:
                return
            f = op.flow
            keep = tuple(i for i in f.pending if i in f.depends_on)
            for i in f.pending:
                if i not in keep:
                    dependents = self._dependents.get(i)
                    if dependents is not None:
                        dependents.pop(op.id, None)
                        if not dependents:
                            del self._dependents[i]
            op.flow = attrs.evolve(f, pending=keep)

    def still_active(self, ids: Iterable[str]) -> tuple[str, ...]:
        """The ids of ``ids`` whose operations are active here now."""
        with self._lock:
            return tuple(i for i in ids if i in self._active)

    def flow_of(self, operation_id: str) -> Flow | None:
        """The flow of an operation (active, or finished and not yet cleaned up); None if it has none."""
        with self._lock:
            op = self._active.get(operation_id) or self._finished.get(operation_id)
            return None if op is None else op.flow

    def report(
        self,
        operation_id: str,
        work_done: float,
        details: Mapping[str, Any] | None,
        beats_used: float,
        budget: float,
    ) -> tuple[float | None, float | None] | None:
        """Record a progress report on an active operation (its next claims carry it).

        Args:
            operation_id: the operation.
            work_done: the share of its work done, 0.0-1.0.
            details: a small JSON object (already checked), or None.
            beats_used: beats it has used so far.
            budget: its budget, in beats.

        Returns:
            None if no active operation has this id; else ``(projected, overrun)``:
            the projected total beats (None before any work is done), and the same
            figure again the first time it passes ``budget`` while there is still
            time to act (the caller claims the warning), else None.
        """
        with self._lock:
            op = self._active.get(operation_id)
            if op is None:
                return None
            f = op.flow or Flow()
            projected = project(work_done, beats_used)
            over = projected_overrun(work_done, beats_used, budget)
            if over is not None and f.overrun_warned:
                over = None
            op.flow = attrs.evolve(
                f,
                work_done=work_done,
                details=details,
                projected=projected,
                overrun_warned=f.overrun_warned or over is not None,
            )
            return projected, over
