"""``Integration``'s side of workflows (``docs/workflows.md``): a seed-API operation's
place in a workflow, and progress reports on any active operation."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Final

from ..budget import current_operation
from ..errors import OperationNotFound
from ..workflow import Flow, check_details, check_done, check_id, check_ids, check_priority
from .base import IntegrationCore

if TYPE_CHECKING:
    from ..protocol import StatusClaim

#: The stdlib logger its lines go to (``log_to_stdlib``): the package's, as before the split.
LOG_NAME: Final = "backbeat_sync.integration"
__all__ = ["WorkflowMixin"]


class WorkflowMixin(IntegrationCore):
    """``start_p2p_operation``'s workflow keywords and ``report_progress``."""

    if TYPE_CHECKING:

        def emit_operation_note(self, operation_id: str, notes: str) -> StatusClaim | None: ...

    def _p2p_flow(
        self,
        operation_id: str,
        priority: Any,
        depends_on: Any,
        correlation_id: Any,
        parent_id: Any,
    ) -> Flow | None:
        """The flow of a ``start_p2p_operation`` (None: a root with nothing more to say)."""
        if (
            priority == "normal"
            and depends_on is None
            and correlation_id is None
            and parent_id is None
            and current_operation() is None
        ):
            return None  # the common case, in short
        check_priority(priority)
        deps = () if depends_on is None else check_ids("depends_on", depends_on)
        correlation = check_id("correlation_id", correlation_id)
        parent = check_id("parent_id", parent_id)
        if parent is None:
            enclosing = current_operation()
            if enclosing is not None and enclosing.integration is not None:
                parent = enclosing.operation_id
                if correlation is None:
                    correlation = enclosing.correlation_id
        if correlation is None:
            correlation = parent
        if parent is None and correlation is None and not deps and priority == "normal":
            return None
        return Flow(
            correlation_id=correlation or operation_id,
            parent_id=parent,
            priority=priority,
            depends_on=deps,
        )

    def report_progress(
        self, operation_id: str, done: float, details: Mapping[str, Any] | None = None
    ) -> None:
        """Say how much of an operation's work is done (its claims carry ``work_done``, ``details``).

        The finish is projected from the beats passed since it started (``eta_beats``
        on its claims); a projection past ``estimated_beats`` while there is still time
        claims a budget warning at once (once per operation). Inside a
        ``track_operation`` block, ``op.report`` does the same and also calls ``on_warning``.

        Args:
            operation_id: an active operation.
            done: the share of its work done, 0.0 to 1.0.
            details: a small JSON object (at most 1024 bytes encoded).

        Raises:
            OperationNotFound: no active operation has this id.
            InvalidArgument: ``done`` or ``details`` cannot be used.
        """
        work_done = check_done(done)
        info = check_details(details)
        op = self._registry.get(operation_id)
        if not op.active:
            raise OperationNotFound(operation_id)
        used = max(0.0, self._clock.position() - op.start_beat)
        result = self._registry.report(operation_id, work_done, info, used, float(op.estimated_beats))
        if result is None:
            raise OperationNotFound(operation_id)
        projected = result[1]
        if projected is not None:
            self.emit_operation_note(
                operation_id,
                f"beat budget warning: projected {projected:.1f} beats, budget {op.estimated_beats},"
                f" {max(0.0, op.estimated_beats - used):.2f} beats left (type: {op.type})",
            )
            self.count("budget_warnings")
            self._log.warn(
                f"BACKBEAT budget warning: {operation_id} projected {projected:.1f}"
                f" of {op.estimated_beats} beats"
            )
