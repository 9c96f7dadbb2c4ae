"""The one owner of backbeat_sync's process-wide state.

Everything that is one-per-process lives on :data:`RUNTIME`: the default
integration, the integrations running (in the order they started), the budget
gate, the fallback note, the ``track_operation`` settings cache, the exit hook
and the fork hook; and :data:`WATCHDOG`, the budget watchdog. Nothing here (and
nothing in the package) registers itself at import time: the exit and fork
hooks are installed by the first ``Integration.start()``.

Integrations tell the runtime when they start and stop (:meth:`Runtime.started`,
:meth:`Runtime.stopped`); the runtime does the rest itself:

- the default integration: the one set with :func:`set_default_integration`, or
  the oldest integration still running. When the default stops, the default
  passes to the oldest integration still running, and the handover is logged
  (once, on the new default's logger).
- the budget gate (see ``backbeat_sync.budget``): open while an integration runs
  (or until the "no integration" fallback has been logged once), so a decorated
  call with nothing to budget costs no wrapper at all.
- the watchdog: when the last running integration stops, its idle threads are
  joined, so no budget thread outlives the last ``stop()``.
- at interpreter exit: every integration still running is stopped (flushed).
- after ``os.fork()``, in the child: every integration inherited from the parent
  is marked as the parent's (its API raises :class:`~backbeat_sync.ForkedIntegration`),
  the default is cleared, the watchdog's state is reset (its thread did not survive
  the fork; it starts again on first use), and the gate and fallback note start
  over. A child that starts its own integration gets working budgets.
"""

from __future__ import annotations

import atexit
import os
import threading
from collections.abc import Callable
from types import TracebackType
from typing import TYPE_CHECKING, Any, Final, Protocol

from ._logging import library_logger as logger
from ._reentry import lock_free
from ._watchdog import Watchdog, reset_slots_after_fork
from .transport.local import LocalBus

if TYPE_CHECKING:
    from .integration import Integration

__all__ = [
    "RUNTIME",
    "WATCHDOG",
    "DefaultIntegration",
    "Member",
    "Runtime",
    "get_default_integration",
    "set_default_integration",
]


class Member(Protocol):
    """What the runtime needs of an integration it keeps track of."""

    @property
    def running(self) -> bool:
        """True between a successful ``start()`` and ``stop()``."""
        ...

    def stop(self) -> None:
        """Stop (flush, join); idempotent."""
        ...


class Runtime:
    """Process-wide state, under one lock. The single instance is :data:`RUNTIME`."""

    def __init__(self) -> None:
        self.lock = threading.RLock()
        #: The default integration (read lock-free on the decorator's path: one attribute load).
        self.default: Integration | None = None
        #: Whether ``default`` was set with :func:`set_default_integration` (then it never moves).
        self.explicit = False
        #: Integrations running, oldest first.
        self.running: list[Integration] = []
        #: Called in the fork child, per inherited integration (``Integration`` passes its own).
        self._on_fork: dict[int, tuple[Member, Callable[[], None]]] = {}
        #: The gate of every non-strict ``@beat_budget``: its wrapper (or wrapt's ``enabled``,
        #: in C) tests its truth on each call and, when it is empty, calls the function
        #: directly. Mutated in place (the decorators hold this very list).
        self.budgets_on: list[bool] = [True]
        #: Serialises announcing and finishing budget operations (the watchdog, the beat
        #: thread, the owners; ``budget.arming.ops_lock`` is this lock). Re-initialised in
        #: place in a fork child: the modules that use it hold this very object.
        self.ops_lock = threading.RLock()
        #: The "integration not started" fallback has been logged (once per process).
        self.fallback_logged = False
        #: ``track_operation`` settings by their arguments (see ``budget.settings``).
        self.block_settings: dict[tuple[Any, ...], Any] = {}
        #: Integrations inherited across a fork are refused; while one exists the gate stays
        #: open, so a budget naming one raises instead of running unbudgeted.
        self.inherited = 0
        #: Incremented in every fork child.
        self.generation = 0
        #: Sees every decorated call (``budget.faces.CallHook``; ``backbeat_sync.otel`` with
        #: ``spans="all"``), or None: one attribute test per call.
        self.call_hook: Any = None
        self._hooks_installed = False

    # -- integrations --------------------------------------------------------

    def started(self, integration: Integration, on_fork: Callable[[], None]) -> None:
        """``integration`` has started; ``on_fork()`` is called in a fork child to mark it inherited."""
        with self.lock:
            if not self._hooks_installed:
                self._hooks_installed = True
                atexit.register(self.stop_all)
                if hasattr(os, "register_at_fork"):  # not on Windows
                    os.register_at_fork(after_in_child=self.after_fork_in_child)
            self.running.append(integration)
            self._on_fork[id(integration)] = (integration, on_fork)
            if self.default is None or (not self.explicit and not self.default.running):
                self.default = integration
            self.refresh_gate()

    def stopped(self, integration: Integration) -> None:
        """``integration`` has stopped: hand the default over, close the gate, let idle threads go."""
        with self.lock:
            if integration in self.running:
                self.running.remove(integration)
            self._on_fork.pop(id(integration), None)
            if self.default is integration and not self.explicit:
                self.default = self.running[0] if self.running else None
                if self.default is not None:  # each handover is logged, once
                    self.default.log.warn(
                        f"BACKBEAT the default integration {integration!r} stopped; the default is"
                        f" now {self.default!r}, the oldest still running"
                    )
            self.refresh_gate()
            idle = not self.running
        if idle:
            WATCHDOG.join_idle()

    def any_running(self) -> bool:
        """Whether any integration runs in this process."""
        return bool(self.running)

    # -- the default ---------------------------------------------------------

    def set_default(self, integration: Integration | None) -> DefaultIntegration:
        """See :func:`set_default_integration`."""
        with self.lock:
            handle = DefaultIntegration(self.default, self.explicit)
            self.default, self.explicit = integration, integration is not None
        return handle

    def restore_default(self, previous: Integration | None, previous_explicit: bool) -> None:
        """Put back a default saved by :meth:`set_default`."""
        with self.lock:
            if previous is not None and not previous_explicit and not previous.running:
                previous = self.running[0] if self.running else None  # it stopped meanwhile
            self.default, self.explicit = previous, previous_explicit

    # -- the budget gate -------------------------------------------------------

    def refresh_gate(self) -> None:
        """Open the gate while any integration runs (or the fallback is yet to be logged); else close it."""
        with self.lock:
            closed = self.fallback_logged and not self.running and not self.inherited
            self.budgets_on[:] = [] if closed else [True]

    def log_fallback(self, what: str, log: Any = None) -> None:
        """Log once per process that budgets run plainly (no integration started), then close the gate.

        ``log``: the logger of the integration the budget named (``integration=``), so
        the line reaches the user's ``logger=``; else the library's.
        """
        with self.lock:
            if self.fallback_logged:
                return
            self.fallback_logged = True
        msg = f"BACKBEAT integration not started: {what} runs without a beat budget (the seed's fallback)"
        if log is not None:
            log.warn(msg)
        else:
            logger.warning(msg)
        self.refresh_gate()

    # -- exit and fork ---------------------------------------------------------

    @lock_free
    def stop_all(self) -> None:
        """Stop every integration still running, so queued claims are flushed (bounded by flush_timeout)."""
        from .errors import BackbeatError

        for integration in list(self.running):
            try:
                integration.stop()
            except BackbeatError:
                pass

    def after_fork_in_child(self) -> None:
        """``os.fork()`` child: the parent's integrations and threads are not ours any more.

        Runs in the child right after the fork, with one thread. Locks held by a parent
        thread at the fork would stay held forever, so every lock is made anew.
        """
        self.lock = threading.RLock()
        self.ops_lock._at_fork_reinit()  # type: ignore[attr-defined]  # CPython's own, since 3.9
        inherited = list(self._on_fork.values())
        self._on_fork = {}
        self.running = []
        self.default = None
        self.explicit = False
        self.inherited = len(inherited)
        self.fallback_logged = False
        self.generation += 1
        self.call_hook = None  # the parent's spans="all" instrumentation, bound to its integration
        self.budgets_on[:] = [True]
        WATCHDOG.reset_after_fork()
        reset_slots_after_fork()
        LocalBus.reset_after_fork()
        for _member, on_fork in inherited:
            try:
                on_fork()
            except Exception:  # pragma: no cover - a bug must not break the child
                logger.opt(exception=True).error("backbeat: marking an inherited integration failed")


#: The process's runtime.
RUNTIME: Final = Runtime()
#: The budget watchdog of this process (one thread, started on first use); an idle one
#: lingers while an integration runs.
WATCHDOG: Final = Watchdog(keep_alive=RUNTIME.any_running, hosts=lambda: list(RUNTIME.running))


def get_default_integration() -> Integration | None:
    """The process-default integration, or None.

    It is the one set with :func:`set_default_integration`, else the oldest
    integration still running (when the default stops, the next oldest takes over).
    """
    return RUNTIME.default


class DefaultIntegration:
    """Returned by :func:`set_default_integration`; as a context manager it restores the old default."""

    def __init__(self, previous: Integration | None, previous_explicit: bool) -> None:
        self._previous = previous
        self._previous_explicit = previous_explicit

    def __enter__(self) -> DefaultIntegration:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        RUNTIME.restore_default(self._previous, self._previous_explicit)


def set_default_integration(integration: Integration | None) -> DefaultIntegration:
    """Make ``integration`` the process default (None: none until the next integration starts).

    Returns:
        A handle; ``with set_default_integration(i): ...`` restores the previous default on exit.

    Example:
        >>> from backbeat_sync import set_default_integration
        >>> with set_default_integration(None):
        ...     pass
    """
    return RUNTIME.set_default(integration)
