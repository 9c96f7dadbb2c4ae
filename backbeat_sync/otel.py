"""OpenTelemetry spans for tracked operations (the ``otel`` extra).

``instrument(integration)`` makes one span per operation the integration
claims, from each of the three faces: ``track_operation`` blocks, the seed's
``start_p2p_operation`` ... ``complete_p2p_operation`` / ``fail_p2p_operation``,
and ``@beat_budget`` calls that ran long enough to be claimed (a call that
ends before the next beat makes no claim and, by default, no span: the hot
path stays as cheap as without tracing). ``spans="all"`` gives every decorated
call a span.

The spans are built from the operation registry's lifecycle events
(:class:`~backbeat_sync.operations.OperationListener`): added, phase changed,
noted (budget warnings), finished. Status claims stay the live view: a span
is exported only when it ends (opentelemetry-python#2752).
"""

from __future__ import annotations

import re
import sys
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Literal

import attrs
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import Span, Status, StatusCode, TracerProvider
from opentelemetry.util.types import AttributeValue

from ._runtime import RUNTIME
from .errors import BeatBudgetExceeded, CallHookTaken
from .operations import OperationPhase, P2POperation

if TYPE_CHECKING:
    from .budget import BudgetSettings
    from .integration import Integration

__all__ = ["Instrumentation", "instrument"]

SCOPE = "backbeat_sync"

#: Threads of the library that change operations on the owners' behalf (a budget call claimed
#: at a beat, a budget warning): their context is not the owner's, so such a span waits for
#: a thread that is (its operation's finish) to find its parent.
LIBRARY_THREADS = frozenset({"backbeat-beat", "backbeat-watchdog"})

_WARNING = re.compile(r"beat budget warning: (\d+)%")


@attrs.define
class _Record:
    """What is known of one operation until its span ends."""

    span: Span | None
    start_ns: int
    events: list[tuple[str, dict[str, Any], int]] = attrs.field(factory=list)
    exceeded: str | None = None


@attrs.define
class _Call:
    """A decorated call's span (``spans="all"``) on its thread's stack."""

    span: Span
    settings: BudgetSettings
    adopted: bool = False

    def owns(self, op: P2POperation) -> bool:
        """Whether ``op`` is this call's operation (ids of decorated calls are ``{name}-{n}``)."""
        s = self.settings
        return not self.adopted and op.type == s.operation_type and op.id.rpartition("-")[0] == s.name


class Instrumentation:
    """The handle :func:`instrument` returns: ``uninstrument()`` stops making spans. Idempotent."""

    def __init__(
        self, integration: Integration, tracer: trace.Tracer, spans: Literal["claimed", "all"]
    ) -> None:
        self._integration = integration
        self._tracer = tracer
        self._spans = spans
        self._lock = threading.Lock()
        self._records: dict[str, _Record] = {}
        self._local = threading.local()
        cfg = integration.config
        self._attributes: dict[str, AttributeValue] = {
            "backbeat.cluster_id": cfg.cluster_id,
            "backbeat.agent_id": cfg.agent_id,
        }
        self._remove: Callable[[], None] | None = integration.registry.add_listener(self)
        if spans == "all":
            _install_hook(self)

    # -- the registry's listener ----------------------------------------------------------

    def added(self, op: P2POperation) -> None:
        """An operation was registered: start its span here if this thread is its owner's."""
        if op.phase.is_final:
            return
        start_ns = int(op.start_time * 1e9) if op.start_time else time.time_ns()
        span = None
        if threading.current_thread().name not in LIBRARY_THREADS and self._adoptable(op) is None:
            span = self._start(op, start_ns, otel_context.get_current())
        rec = _Record(span, start_ns)
        rec.events.append(self._phase_event(op))
        with self._lock:
            self._records[op.id] = rec

    def changed(self, op: P2POperation) -> None:
        """A phase change: one span event."""
        with self._lock:
            rec = self._records.get(op.id)
            if rec is not None:
                rec.events.append(self._phase_event(op))

    def noted(self, op: P2POperation, notes: str) -> None:
        """A budget warning or a budget running out: one span event."""
        now = time.time_ns()
        with self._lock:
            rec = self._records.get(op.id)
            if rec is None:
                return
            warning = _WARNING.search(notes)
            if warning is not None:
                attributes = {"backbeat.fraction": int(warning.group(1)) / 100, "backbeat.notes": notes}
                rec.events.append(("backbeat.budget_warning", attributes, now))
            elif "beat budget exceeded" in notes:
                rec.exceeded = "interrupted" if notes.endswith("; interrupting") else "late"
                rec.events.append(("backbeat.budget_exceeded", {"backbeat.notes": notes}, now))

    def finished(self, op: P2POperation) -> None:
        """The operation completed or failed: its span gets the outcome and ends."""
        with self._lock:
            rec = self._records.pop(op.id, None)
        if rec is None:  # finished before its ``added`` was heard: a span from the operation alone
            rec = _Record(None, int(op.start_time * 1e9) if op.start_time else time.time_ns())
        owner = threading.current_thread().name not in LIBRARY_THREADS
        span = rec.span
        call = self._adoptable(op) if owner and span is None else None
        if call is not None:
            call.adopted = True
            span = call.span
            span.set_attribute("backbeat.operation_id", op.id)
        elif span is None:
            span = self._start(op, rec.start_ns, otel_context.get_current() if owner else None)
        for name, attributes, at in rec.events:
            span.add_event(name, attributes, timestamp=at)
        span.add_event(*self._phase_event(op)[:2])
        reason = op.reason or ""
        outcome = "done" if op.phase is OperationPhase.COMPLETED else "failed"
        exceeded = rec.exceeded
        if reason.startswith("beat budget exceeded"):
            exceeded = "late" if "(late by" in reason else (exceeded or "interrupted")
        if exceeded is not None:
            outcome = "exceeded"
            span.set_attribute("backbeat.exceeded", exceeded)
            if not any(name == "backbeat.budget_exceeded" for name, _, _ in rec.events):
                # The watchdog notes an interrupt after delivering it, so the block can
                # finish first; the finish is authoritative, and the event is its own.
                span.add_event("backbeat.budget_exceeded", {"backbeat.notes": reason})
        span.set_attribute("backbeat.outcome", outcome)
        span.set_attribute("backbeat.beats_used", op.beats_passed(self._integration.clock.current_beat))
        flow = op.flow  # the workflow the claims carry (docs/workflows.md)
        span.set_attribute("backbeat.correlation_id", (flow.correlation_id if flow else None) or op.id)
        if flow is not None and flow.parent_id is not None:
            span.set_attribute("backbeat.parent_id", flow.parent_id)
        if op.phase is OperationPhase.FAILED:
            exc = sys.exc_info()[1]
            if exc is not None and (isinstance(exc, BeatBudgetExceeded) or type(exc).__name__ in reason):
                span.record_exception(exc)
            span.set_status(Status(StatusCode.ERROR, reason or None))
        if call is None:
            span.end()

    # -- spans ----------------------------------------------------------------------------

    def _start(self, op: P2POperation, start_ns: int, parent: Any) -> Span:
        attributes: dict[str, AttributeValue] = {
            **self._attributes,
            "backbeat.operation_id": op.id,
            "backbeat.budget_beats": op.estimated_beats,
            "backbeat.start_beat": op.start_beat,
        }
        return self._tracer.start_span(op.type, context=parent, attributes=attributes, start_time=start_ns)

    @staticmethod
    def _phase_event(op: P2POperation) -> tuple[str, dict[str, Any], int]:
        return (
            "backbeat.phase",
            {"backbeat.phase": op.phase.value, "backbeat.peer_count": op.peer_count},
            time.time_ns(),
        )

    def _adoptable(self, op: P2POperation) -> _Call | None:
        """The decorated call on this thread whose span ``op`` belongs to (``spans="all"``)."""
        stack: list[_Call] = getattr(self._local, "calls", [])
        if stack and stack[-1].owns(op):
            return stack[-1]
        return None

    # -- spans="all": every decorated call ------------------------------------------------

    def wants(self, integration: Integration) -> bool:
        """Budget hook: take the calls of this integration, except the inner run of one taken."""
        if getattr(self._local, "inner", False):
            self._local.inner = False
            return False
        return integration is self._integration

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
        """Budget hook: run one decorated call inside a span of its own."""
        clock = integration.clock
        start_pos = clock.budget_position()
        attributes: dict[str, AttributeValue] = {
            **self._attributes,
            "backbeat.budget_beats": settings.beats,
            "backbeat.start_beat": clock.current_beat,
        }
        span = self._tracer.start_span(settings.operation_type, attributes=attributes)
        entry = _Call(span, settings)
        stack: list[_Call] = self._local.__dict__.setdefault("calls", [])
        stack.append(entry)
        outcome, exceeded = "done", None
        try:
            with trace.use_span(
                span, end_on_exit=False, record_exception=False, set_status_on_exception=False
            ):
                self._local.inner = True
                try:
                    return run(wrapped, instance, args, kwargs)
                finally:
                    self._local.inner = False
        except BeatBudgetExceeded as exc:
            interrupted = settings.on_exhaust == "interrupt" and not exc.late
            outcome, exceeded = "exceeded", "interrupted" if interrupted else "late"
            if not entry.adopted:
                span.record_exception(exc)
                span.set_status(Status(StatusCode.ERROR, str(exc)))
            raise
        except BaseException as exc:
            outcome = "failed"
            if not entry.adopted:
                span.record_exception(exc)
                span.set_status(Status(StatusCode.ERROR, f"{type(exc).__name__}: {exc}"))
            raise
        finally:
            stack.pop()
            if not entry.adopted:  # no claim was made: the call's own figures
                span.set_attribute("backbeat.outcome", outcome)
                if exceeded is not None:
                    span.set_attribute("backbeat.exceeded", exceeded)
                span.set_attribute("backbeat.beats_used", round(clock.budget_position() - start_pos, 3))
            span.end()

    # -- lifecycle ------------------------------------------------------------------------

    def uninstrument(self) -> None:
        """Stop making spans; the spans of operations still running end now. Idempotent."""
        remove, self._remove = self._remove, None
        if remove is not None:
            remove()
            if RUNTIME.call_hook is self:
                RUNTIME.call_hook = None
            with self._lock:
                open_records, self._records = list(self._records.values()), {}
            for rec in open_records:
                if rec.span is not None:
                    rec.span.set_attribute("backbeat.outcome", "unknown")
                    rec.span.end()


def _install_hook(hook: Instrumentation) -> None:
    if RUNTIME.call_hook is not None and RUNTIME.call_hook is not hook:
        raise CallHookTaken('spans="all" is already on for another integration; uninstrument it first')
    RUNTIME.call_hook = hook


def instrument(
    integration: Integration,
    tracer_provider: TracerProvider | None = None,
    *,
    spans: Literal["claimed", "all"] = "claimed",
) -> Instrumentation:
    """Make an OpenTelemetry span for each operation ``integration`` tracks.

    One span per operation, named after its type (``election``, ``dht_store``, ...),
    with the attributes ``backbeat.operation_id``, ``backbeat.budget_beats``,
    ``backbeat.beats_used``, ``backbeat.outcome`` (``done``, ``failed``,
    ``exceeded``), ``backbeat.exceeded`` (``interrupted``, ``late``; absent when the
    budget held), ``backbeat.start_beat``, ``backbeat.cluster_id``,
    ``backbeat.agent_id``; a ``backbeat.phase`` event per phase,
    ``backbeat.budget_warning`` and ``backbeat.budget_exceeded`` events; status
    ERROR (the exception recorded) on failure. Its parent is the span current
    where the operation started.

    Args:
        integration: whose operations to trace.
        tracer_provider: where spans go (default: the global provider).
        spans: ``"claimed"``: operations that made a status claim (every
            ``track_operation`` block and explicit operation, and decorated calls
            still running at a beat); ``"all"``: every decorated call too (one
            integration at a time).

    Returns:
        A handle; ``uninstrument()`` stops it.

    Raises:
        ValueError: ``spans`` is neither ``"claimed"`` nor ``"all"``.
        RuntimeError: ``spans="all"`` is already on for another integration.
    """
    if spans not in ("claimed", "all"):
        raise ValueError(f'spans must be "claimed" or "all", not {spans!r}')
    from . import __version__

    tracer = trace.get_tracer(SCOPE, __version__, tracer_provider=tracer_provider)
    return Instrumentation(integration, tracer, spans)
