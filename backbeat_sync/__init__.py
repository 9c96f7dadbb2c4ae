"""backbeat_sync: synchronous, threaded Python agents in a BACKBEAT cluster.

Follow the cluster's beat, track operations through their phases with status
claims, and give plain sync code beat budgets. See the README and ``docs/``.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

from loguru import logger as _logger

from ._logging import StdlibLogging, log_to_stdlib
from ._runtime import get_default_integration, set_default_integration
from ._time import ManualTime, SystemTime, TimeSource
from .budget import PreciseMode, Tracker, beat_budget, current_operation, precise_mode, track_operation
from .clock import BeatClock
from .config import BackbeatConfig
from .errors import (
    BackbeatConnectionError,
    BackbeatDisabled,
    BackbeatError,
    BeatBudgetExceeded,
    BudgetOnEventLoop,
    ConfigError,
    DuplicateOperation,
    ForkedIntegration,
    IntegrationAlreadyStarted,
    IntegrationNotStarted,
    InvalidArgument,
    InvalidPhaseTransition,
    JetStreamUnavailable,
    OperationNotFound,
    ProtocolError,
)
from .history import BudgetHistory, OperationStats
from .integration import Integration, IntegrationState
from .operations import OperationPhase, OperationType, P2POperation
from .protocol import BeatFrame, StatusClaim, parse_beat_frame, parse_message, parse_status_claim
from .pulse import Pulse

try:
    __version__ = version("backbeat_sync")
except PackageNotFoundError:  # pragma: no cover - running from a source tree
    __version__ = "0.0.0"

# A library must not print unless asked: ``logger.enable("backbeat_sync")`` turns our lines on.
_logger.disable("backbeat_sync")

__all__ = [
    "BackbeatConfig",
    "BackbeatConnectionError",
    "BackbeatDisabled",
    "BackbeatError",
    "BeatBudgetExceeded",
    "BeatClock",
    "BeatFrame",
    "BudgetHistory",
    "BudgetOnEventLoop",
    "ConfigError",
    "DuplicateOperation",
    "ForkedIntegration",
    "Integration",
    "IntegrationAlreadyStarted",
    "IntegrationNotStarted",
    "IntegrationState",
    "InvalidArgument",
    "InvalidPhaseTransition",
    "JetStreamUnavailable",
    "ManualTime",
    "OperationNotFound",
    "OperationPhase",
    "OperationStats",
    "OperationType",
    "P2POperation",
    "PreciseMode",
    "ProtocolError",
    "Pulse",
    "StatusClaim",
    "StdlibLogging",
    "SystemTime",
    "TimeSource",
    "Tracker",
    "__version__",
    "beat_budget",
    "current_operation",
    "get_default_integration",
    "log_to_stdlib",
    "parse_beat_frame",
    "parse_message",
    "parse_status_claim",
    "precise_mode",
    "set_default_integration",
    "track_operation",
]
