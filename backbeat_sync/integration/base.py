"""What every part of :class:`~backbeat_sync.Integration` shares: its lifecycle states,
its constants, and :class:`IntegrationCore`, the attributes its parts read.

``Integration`` is one object made of parts that each read in one sitting
(see ``docs/architecture.md``): :mod:`.facade` (the public API, lifecycle, claims),
:mod:`.ingest` (frames, on the transport's thread), :mod:`.beat` (the beat thread),
:mod:`.callbacks` (the callback thread), :mod:`.health` (counters and ``get_health``).
Each part is a mixin of ``IntegrationCore``; ``Integration.__init__`` sets every
attribute declared here.
"""

from __future__ import annotations

import enum
import queue
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Final

if TYPE_CHECKING:
    from .._logging import LoggerAdapter, RateLimitedLog
    from .._time import TimeSource
    from ..claims import ClaimFactory
    from ..clock import BeatClock
    from ..config import BackbeatConfig
    from ..history import BudgetHistory
    from ..operations import OperationRegistry, P2POperation
    from ..protocol import BeatFrame, StatusClaim
    from ..signing import Verifier
    from ..transport import Transport
    from .callbacks import Callbacks
    from .health import HealthCounters

#: The stdlib logger its lines go to (``log_to_stdlib``): the package's, as before the split.
LOG_NAME: Final = "backbeat_sync.integration"
__all__ = [
    "CALLBACK_JOIN_TIMEOUT",
    "CALLBACK_QUEUE_LIMIT",
    "STOP",
    "STOPPED_REASON",
    "STOP_REQUEST",
    "STOP_WAIT_MARGIN",
    "BeatCallback",
    "ClaimCallback",
    "IntegrationCore",
    "IntegrationState",
]

BeatCallback = Callable[["BeatFrame"], Any]
ClaimCallback = Callable[["StatusClaim"], Any]

#: Put on the beat queue to stop the beat thread.
STOP: Final = object()
#: Put on the beat queue by a stop() that may not stop on its own thread (see Integration.stop).
STOP_REQUEST: Final = object()
#: How long a stop() waits for a stop already under way on another thread (past the flush timeout).
STOP_WAIT_MARGIN: Final = 10.0
#: User-callback items queued at most; past this the oldest are dropped (and counted).
CALLBACK_QUEUE_LIMIT: Final = 100_000
#: How long stop() waits for one user callback that is still running (a blocked one).
CALLBACK_JOIN_TIMEOUT: Final = 2.0
STOPPED_REASON: Final = "integration stopped"


class IntegrationState(enum.Enum):
    """Lifecycle of an :class:`Integration`."""

    NEW = "new"
    STARTING = "starting"
    RUNNING = "running"
    STOPPING = "stopping"
    STOPPED = "stopped"


class IntegrationCore:
    """The state the parts of ``Integration`` share (set in ``Integration.__init__``)."""

    _config: BackbeatConfig
    _node_id: str
    _time: TimeSource
    _log: LoggerAdapter
    _ratelog: RateLimitedLog
    _clock: BeatClock
    _claims: ClaimFactory
    _status_subject: str
    _registry: OperationRegistry
    _transport: Transport | None
    _state: IntegrationState
    _state_lock: threading.Lock
    _callbacks: Callbacks
    _health: HealthCounters
    _verifier: Verifier | None
    _last_handling: float
    _claimed_beat: int
    _beat_queue: queue.SimpleQueue[object]
    _handled_listeners: tuple[Callable[[BeatFrame, float], None], ...]
    _cb_items: queue.SimpleQueue[tuple[str, Any]]
    _cb_running: tuple[str, float] | None
    _cb_blocked_reported: bool
    _beat_seen: threading.Event
    #: The clock budgets count on while this integration runs; None otherwise (BudgetHost).
    budget_clock: BeatClock | None
    #: The budget history (``docs/learning.md``); flushed by the beat thread.
    history: BudgetHistory
    _history_flushed_at: float

    if TYPE_CHECKING:  # defined by the parts; declared here so each part type-checks alone

        @property
        def running(self) -> bool:
            raise NotImplementedError

        def refuse_if_forked(self) -> None: ...

        def record_error(self, message: str) -> None: ...

        def count(self, key: str, n: int = 1) -> None: ...

        def _record_rejection(self, counter: str, prefix: str, noun: str, reason: str) -> None: ...

        def _queue_callback(self, kind: str, payload: Any) -> None: ...

        def _spawn_stopper(self) -> None: ...

        def _check_blocked(self) -> None: ...

        def _blocked_callback(self) -> str | None:
            raise NotImplementedError

        def _emit_operations(self, ops: list[P2POperation]) -> None: ...

        def _emit_health(self) -> None: ...

        def audience_changed(self) -> None: ...
