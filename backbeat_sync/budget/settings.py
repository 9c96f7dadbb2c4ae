"""Budget settings: checked once (at decoration, or once per distinct ``track_operation``)."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Final, Literal

import attrs

from .._runtime import RUNTIME
from .._watchdog import ThreadSlot
from ..errors import InvalidArgument
from ..history import RunLog, new_run_log
from ..operations import OperationPhase
from ..protocol import check_wire_id
from ..workflow import check_beats, check_priority
from .tracker import materialize

if TYPE_CHECKING:
    from .host import BudgetHost
    from .tracker import Tracker

#: The stdlib logger its lines go to (``log_to_stdlib``): the package's, as before the split.
LOG_NAME: Final = "backbeat_sync.budget"
__all__ = [
    "BLOCK_CACHE_MAX",
    "CACHED_NUMBERS",
    "DEFAULT_WARN_AT",
    "ON_EXHAUST",
    "BudgetSettings",
    "OnExhaust",
    "block_settings",
]

OnExhaust = Literal["interrupt", "raise_after", "warn"]
ON_EXHAUST: Final = ("interrupt", "raise_after", "warn")
DEFAULT_WARN_AT: Final = (0.5, 0.75, 0.9)


def _check_warn_at(warn_at: Any) -> tuple[float, ...]:
    if warn_at is None:
        return ()
    try:
        values = tuple(warn_at)
    except TypeError:
        raise InvalidArgument("warn_at", warn_at, "must be an iterable of fractions 0 < f < 1") from None
    for f in values:
        if isinstance(f, bool) or not isinstance(f, (int, float)) or not 0.0 < f < 1.0:
            raise InvalidArgument("warn_at", warn_at, "must be an iterable of fractions 0 < f < 1")
    return tuple(sorted({float(f) for f in values}))


@attrs.frozen
class BudgetSettings:
    """The settings of a budget, checked once (at decoration, or when a block is made).

    Attributes:
        beats: the budget in beats (> 0).
        operation_type: the claims' ``operation_type``.
        on_exhaust: ``"interrupt"``, ``"raise_after"`` or ``"warn"``.
        warn_at: fractions of the budget at which a warning is claimed (sorted).
        on_warning: called as ``on_warning(tracker, fraction)`` on the budget callback thread.
        name: operation id (``track_operation``) or id prefix (``@beat_budget``).
        strict: raise :class:`IntegrationNotStarted` instead of running plainly.
        integration: the integration to use; None for the process default.
        explicit: True for ``track_operation`` (claimed from the start).
        manual_phases: do not move to EXECUTING on entry.
        peers: initial peer count.
        data: attached to the operation.
        budget_source: ``"fixed"`` (a number given), ``"profile"`` or ``"history"`` (``"auto"``).
        priority: ``critical``, ``high``, ``normal`` or ``low`` (claims and the outbox).
    """

    beats: float = attrs.field(converter=check_beats)
    operation_type: str = "budget"
    on_exhaust: str = "interrupt"
    warn_at: tuple[float, ...] = attrs.field(default=DEFAULT_WARN_AT, converter=_check_warn_at)
    on_warning: Callable[[Tracker, float], Any] | None = None
    name: str | None = None
    strict: bool = False
    integration: BudgetHost | None = None
    explicit: bool = False
    manual_phases: bool = False
    peers: int = 0
    data: Any = None
    budget_source: str = "fixed"
    priority: str = attrs.field(default="normal", converter=check_priority)
    estimated: int = attrs.field(init=False)
    plain: bool = attrs.field(init=False)  #: priority normal (a block need not make a flow for it)
    #: The claims' ``budget_source``: None for a fixed budget (nothing added on the wire).
    claim_source: str | None = attrs.field(init=False)
    #: Where callers append this budget's finished runs for the history (a bounded deque).
    log: RunLog = attrs.field(init=False, eq=False, repr=False)
    first_fraction: float = attrs.field(init=False)
    first_beats: float = attrs.field(init=False)  #: beats from the start to the first event
    #: The phase a block moves to as it is entered: EXECUTING, or None with ``manual_phases``.
    entered_phase: OperationPhase | None = attrs.field(init=False, eq=False, repr=False)

    @plain.default
    def _plain(self) -> bool:
        return self.priority == "normal"

    @estimated.default
    def _estimated(self) -> int:
        return max(1, math.ceil(self.beats - 1e-9))

    @log.default
    def _log(self) -> RunLog:
        typ = self.operation_type  # checked after the defaults: a bad one is refused there
        return new_run_log(typ if isinstance(typ, str) else "", self)

    @claim_source.default
    def _claim_source(self) -> str | None:
        return None if self.budget_source == "fixed" else self.budget_source

    @first_fraction.default
    def _first(self) -> float:
        return self.warn_at[0] if self.warn_at else 1.0

    @first_beats.default
    def _first_beats(self) -> float:
        return self.beats * self.first_fraction

    @entered_phase.default
    def _entered_phase(self) -> OperationPhase | None:
        return None if self.manual_phases else OperationPhase.EXECUTING

    def materialize(self, slot: ThreadSlot, seq: int, entry: list[Any]) -> Tracker:
        """The tracker of a ``@beat_budget`` call's plain ``live`` entry (the watchdog's
        :class:`~backbeat_sync._watchdog.EntrySettings`; see :func:`.tracker.materialize`)."""
        return materialize(slot, seq, entry)

    def __attrs_post_init__(self) -> None:
        if self.on_exhaust not in ON_EXHAUST:
            raise InvalidArgument("on_exhaust", self.on_exhaust, f"must be one of {', '.join(ON_EXHAUST)}")
        check_wire_id("operation_type", self.operation_type)
        if self.name is not None and (not isinstance(self.name, str) or not self.name):
            raise InvalidArgument("name", self.name, "must be a non-empty string")
        if self.on_warning is not None and not callable(self.on_warning):
            raise InvalidArgument("on_warning", self.on_warning, "must be callable")
        if isinstance(self.peers, bool) or not isinstance(self.peers, int) or self.peers < 0:
            raise InvalidArgument("peers", self.peers, "must be an integer >= 0")
        if self.integration is not None and type(self.integration) not in HOST_TYPES:
            check_host(self.integration)


#: What a budget reads of its integration (``BudgetHost``): a value lacking any is not one.
_HOST_ATTRIBUTES: Final = (
    "budget_clock",
    "clock",
    "registry",
    "log",
    "count",
    "record_error",
    "emit_operation_note",
    "refuse_if_forked",
)
#: Types seen to be hosts (checked once per type, then one set lookup).
HOST_TYPES: Final[set[type]] = set()


def check_host(integration: Any) -> None:
    """Raise InvalidArgument unless ``integration`` is an ``Integration`` (a ``BudgetHost``).

    Checked where it is given (at decoration, when a block is made), not when the
    call runs: ``integration="nope"`` would otherwise fail there with an AttributeError.
    """
    kind = type(integration)
    if not all(hasattr(kind, a) or hasattr(integration, a) for a in _HOST_ATTRIBUTES):
        raise InvalidArgument(
            "integration", integration, "must be an Integration (or None for the process default)"
        )
    HOST_TYPES.add(kind)


#: ``track_operation`` settings by their arguments (``RUNTIME.block_settings``): a block's
#: settings are checked once per distinct set of arguments, not on every block. Bounded
#: (cleared when full).
BLOCK_CACHE_MAX: Final = 256
#: Only exact ints and floats are cached: True == 1 must not find the settings of 1.
CACHED_NUMBERS: Final = (int, float)


def block_settings(
    key: tuple[Any, ...] | None,
    beats: Any,
    operation_type: Any,
    on_exhaust: Any,
    warn_at: Any,
    on_warning: Any,
    strict: bool,
    manual_phases: bool,
    budget_source: str = "fixed",
    priority: Any = "normal",
) -> BudgetSettings:
    """The checked settings of a ``track_operation`` block (its id, peers and data aside).

    ``key``: where to cache them (see ``track_operation``), or None not to.
    """
    settings = BudgetSettings(
        beats,
        operation_type=str(operation_type) if operation_type else operation_type,
        on_exhaust=on_exhaust,
        warn_at=warn_at,
        on_warning=on_warning,
        strict=strict,
        explicit=True,
        manual_phases=manual_phases,
        budget_source=budget_source,
        priority=priority,
    )
    if key is not None:
        cache = RUNTIME.block_settings
        if len(cache) >= BLOCK_CACHE_MAX:
            cache.clear()
        cache[key] = settings
    return settings
