"""Every exception backbeat_sync raises.

Each one subclasses :class:`BackbeatError` and the builtin exception it means,
so callers can catch either (``except TimeoutError`` catches a spent budget).
Messages are built in ``__init__`` from typed attributes.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "BackbeatConnectionError",
    "BackbeatDisabled",
    "BackbeatError",
    "BeatBudgetExceeded",
    "BudgetLeftUnexited",
    "CallHookTaken",
    "ConfigError",
    "DuplicateOperation",
    "ForkedIntegration",
    "IntegrationAlreadyStarted",
    "IntegrationNotStarted",
    "InvalidArgument",
    "InvalidPhaseTransition",
    "JetStreamUnavailable",
    "OperationNotFound",
    "ProtocolError",
    "PulseAlreadyStarted",
    "TransportStateError",
]


class BackbeatError(Exception):
    """Base class of every error raised by backbeat_sync."""


class ConfigError(BackbeatError, ValueError):
    """A configuration value cannot be used.

    Attributes:
        field: the config field or environment variable that was wrong.
        value: the offending value (masked when it is a secret).
        reason: why it was refused.
    """

    def __init__(self, field: str, value: Any, reason: str) -> None:
        self.field = field
        self.value = value
        self.reason = reason
        super().__init__(f"{field}={value!r}: {reason}")


class ProtocolError(BackbeatError, ValueError):
    """A message received from the network breaks the wire contract.

    Attributes:
        kind: what was being parsed (``"beat frame"``, ``"status claim"``).
        reason: which rule the message broke.
    """

    def __init__(self, kind: str, reason: str) -> None:
        self.kind = kind
        self.reason = reason
        super().__init__(f"invalid {kind}: {reason}")


class InvalidArgument(BackbeatError, ValueError):
    """An API argument has a value the library cannot use.

    Attributes:
        name: the argument.
        value: what was passed.
        reason: what it must be.
    """

    def __init__(self, name: str, value: Any, reason: str) -> None:
        self.name = name
        self.value = value
        self.reason = reason
        super().__init__(f"{name}={value!r}: {reason}")


class BackbeatDisabled(BackbeatError, RuntimeError):
    """The integration was created with ``enabled=False``."""

    def __init__(self) -> None:
        super().__init__("BACKBEAT integration is disabled (CHORUS_BACKBEAT_ENABLED=false or enabled=False)")


class IntegrationNotStarted(BackbeatError, RuntimeError):
    """An operation was attempted on an integration that is not running."""

    def __init__(self, detail: str = "") -> None:
        msg = "BACKBEAT integration not started"
        super().__init__(f"{msg}: {detail}" if detail else msg)


class ForkedIntegration(IntegrationNotStarted):
    """An integration inherited across ``os.fork()`` was used in the child.

    Its connection, threads and operations stay with the parent process, so the
    child refuses every call on it (a claim made there would be lost); the child
    starts an :class:`~backbeat_sync.Integration` of its own instead.

    Attributes:
        integration: ``repr`` of the inherited integration.
        parent_pid: the process that started it.
        child_pid: the fork child that tried to use it.
    """

    def __init__(self, integration: str, parent_pid: int, child_pid: int) -> None:
        self.integration = integration
        self.parent_pid = parent_pid
        self.child_pid = child_pid
        RuntimeError.__init__(
            self,
            f"BACKBEAT integration {integration} belongs to process {parent_pid}, not to this fork child"
            f" (pid {child_pid}): its connection and threads did not survive os.fork(); start a new"
            " Integration in the child",
        )


class IntegrationAlreadyStarted(BackbeatError, RuntimeError):
    """``start()`` was called twice on the same integration (an integration starts once).

    Attributes:
        state: the integration's state when ``start()`` was called (``"running"``, ``"stopped"``, ...).
    """

    def __init__(self, state: str = "running") -> None:
        self.state = state
        if state in ("stopping", "stopped"):
            msg = f"BACKBEAT integration {state}; create a new Integration (start() may be called once)"
        else:
            msg = "BACKBEAT integration already started (start() may be called once)"
        super().__init__(msg)


class BudgetOnEventLoop(BackbeatError, RuntimeError):
    """``track_operation`` was entered on the thread of a running asyncio event loop.

    The block's budget interrupts its thread with an exception; across an ``await``
    that thread runs other tasks, which the exception would hit (and the loop with
    them). Run the blocking work in a thread instead: ``await asyncio.to_thread(fn)``
    with the budget inside ``fn``.

    Attributes:
        operation_id: the block's operation id.
    """

    def __init__(self, operation_id: str) -> None:
        self.operation_id = operation_id
        super().__init__(
            f"track_operation({operation_id!r}) cannot run on an asyncio event loop's thread: its budget"
            " would interrupt whichever task runs; run the work in a thread with"
            " `await asyncio.to_thread(fn)` and budget it there"
        )


class OperationNotFound(BackbeatError, LookupError):
    """No active operation has this id.

    Attributes:
        operation_id: the id that was looked up.
    """

    def __init__(self, operation_id: str) -> None:
        self.operation_id = operation_id
        super().__init__(f"operation {operation_id} not found")

    def __str__(self) -> str:  # LookupError would quote the message otherwise
        return str(self.args[0])


class DuplicateOperation(BackbeatError, ValueError):
    """An operation with this id is already active.

    Attributes:
        operation_id: the id that is already in use.
    """

    def __init__(self, operation_id: str) -> None:
        self.operation_id = operation_id
        super().__init__(f"operation {operation_id} is already active")


class InvalidPhaseTransition(BackbeatError, ValueError):
    """A phase change would move an operation backwards (or out of a final phase).

    Attributes:
        operation_id: the operation.
        current: its current phase name.
        requested: the phase asked for.
    """

    def __init__(self, operation_id: str, current: str, requested: str) -> None:
        self.operation_id = operation_id
        self.current = current
        self.requested = requested
        super().__init__(
            f"operation {operation_id}: cannot move from phase {current!r} to {requested!r}"
            " (phases only move forward)"
        )


class BackbeatConnectionError(BackbeatError, ConnectionError):
    """The NATS connection could not be made (or was refused).

    Attributes:
        servers: the server URLs tried, with any password masked.
        cause: a short description of the underlying failure.
    """

    def __init__(self, servers: str, cause: str) -> None:
        self.servers = servers
        self.cause = cause
        super().__init__(f"Failed to start BACKBEAT client: cannot connect to {servers}: {cause}")


class JetStreamUnavailable(BackbeatConnectionError):
    """The NATS server answers, but what a JetStream feature needs is not there.

    Raised by the highly available pulse and the stream tools when the server has no
    JetStream (``nats-server`` started without ``-js``), or JetStream refuses the bucket
    or stream they need. A :class:`BackbeatConnectionError`, so code that catches
    connection failures catches this too.

    Attributes:
        servers: the server URLs, with any password masked.
        needed: what was needed (``"JetStream key-value bucket 'backbeat-pulse'"``).
        cause: why it is not there.
    """

    def __init__(self, servers: str, needed: str, cause: str) -> None:
        self.needed = needed
        BackbeatError.__init__(self)
        self.servers = servers
        self.cause = cause
        ConnectionError.__init__(self, f"{needed} is not available on {servers}: {cause}")


class BeatBudgetExceeded(BackbeatError, TimeoutError):
    """A beat budget ran out.

    Attributes:
        operation_id: the operation whose budget was spent.
        budget_beats: the budget, in beats.
        beats_used: beats elapsed when the exception was raised.
        beats_over: how far past the budget it was raised (0.0 when on time).
        late: True when the code was blocked (in C, or finished) and the exception
            could only be raised after the fact rather than interrupting it.
        result: with ``on_exhaust="raise_after"``, the value the code returned.
    """

    def __init__(
        self,
        operation_id: str = "",
        budget_beats: float = 0.0,
        beats_used: float = 0.0,
        *,
        beats_over: float = 0.0,
        late: bool = False,
        result: Any = None,
    ) -> None:
        self.operation_id = operation_id
        self.budget_beats = budget_beats
        self.beats_used = beats_used
        self.beats_over = beats_over
        self.late = late
        self.result = result
        how = f" (late by {beats_over:.2f} beats)" if late else ""
        super().__init__(
            f"operation {operation_id}: beat budget exceeded: used {beats_used:.2f}"
            f" of {budget_beats:g} beats{how}"
        )


class PulseAlreadyStarted(BackbeatError, RuntimeError):
    """``Pulse.start()`` was called on a pulse that is not new (a pulse starts once)."""

    def __init__(self, state: str) -> None:
        self.state = state
        super().__init__(f"Pulse already {state}; make a new one to start again")


class TransportStateError(BackbeatError, RuntimeError):
    """A transport (or its link) was used out of its lifecycle: started twice, or its loop is gone.

    The integration never does this; it guards the transport API for other callers.
    """

    def __init__(self, what: str) -> None:
        self.what = what
        super().__init__(what)


class CallHookTaken(BackbeatError, RuntimeError):
    """Another integration already sees every decorated call (``otel.instrument(spans="all")``).

    One such hook exists per process (``_runtime.RUNTIME.call_hook``).
    """

    def __init__(self, detail: str) -> None:
        super().__init__(detail)


class BudgetLeftUnexited(BackbeatError, RuntimeError):
    """A budget whose block was left without its exit code running (never raised to you).

    An asynchronous exception that lands on the first instruction of a nested block's
    ``__exit__`` unwinds past it; the enclosing budget's exit finds the nested one still
    armed and fails its operation with this as the reason.
    """

    def __init__(self, operation_id: str) -> None:
        self.operation_id = operation_id
        super().__init__(
            f"{operation_id} left without its exit (an exception landed on its first instruction)"
        )
