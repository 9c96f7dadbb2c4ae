"""The budget engine's view of an integration: :class:`BudgetHost`.

The engine depends down, never up: it never imports :mod:`backbeat_sync.integration`
(types aside) and reads no private field of it. ``Integration`` implements this
protocol; a test or another front end could too.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Final, Protocol

if TYPE_CHECKING:
    from .._logging import LoggerAdapter
    from ..clock import BeatClock
    from ..history import BudgetHistory
    from ..operations import OperationRegistry
    from ..protocol import StatusClaim

#: The stdlib logger its lines go to (``log_to_stdlib``): the package's, as before the split.
LOG_NAME: Final = "backbeat_sync.budget"
__all__ = ["BudgetHost"]


class BudgetHost(Protocol):
    """Where the beat is, how to claim, how to count: what a budget needs of its integration."""

    #: Where the beat is: the clock budgets count on while the host runs, else None. A plain
    #: attribute, read once per decorated call (it says "running" and "which clock" at once).
    budget_clock: BeatClock | None

    @property
    def clock(self) -> BeatClock:
        """The host's beat clock (running or not)."""
        ...

    @property
    def registry(self) -> OperationRegistry:
        """How to claim: the registry whose changes are claimed, in order."""
        ...

    @property
    def running(self) -> bool:
        """True while the host runs (claims can go out)."""
        ...

    @property
    def log(self) -> LoggerAdapter:
        """Where budget warnings and exhaustions are logged."""
        ...

    @property
    def history(self) -> BudgetHistory:
        """Where finished runs are recorded, and what ``"auto"`` budgets are learned from."""
        ...

    def count(self, key: str, n: int = 1) -> None:
        """How to count: add ``n`` to the health counter ``key``."""
        ...

    def record_error(self, message: str) -> None:
        """Add ``message`` to the health ``errors`` and log it."""
        ...

    def emit_operation_note(self, operation_id: str, notes: str) -> StatusClaim | None:
        """Claim an active operation at once with a ``notes`` line (warnings, exhaustion)."""
        ...

    def refuse_if_forked(self) -> None:
        """Raise ``ForkedIntegration`` if the host was inherited across ``os.fork()``."""
        ...
