"""Stopping: ``stop()`` from any thread, from a signal handler, during ``start()``.

A Python signal handler runs on the main thread between two bytecodes of whatever
it was doing, possibly inside a library call that holds a library lock; ``stop()``
then only asks for the stop (see :mod:`backbeat_sync._reentry`) and a helper thread
does it once that call has returned.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Final, cast

from .._reentry import inside_library, lock_free
from .._runtime import RUNTIME
from .._watchdog import thread_state
from ..budget.arming import unshield
from ..errors import InvalidArgument
from .base import STOP, STOP_REQUEST, STOP_WAIT_MARGIN, STOPPED_REASON, IntegrationCore, IntegrationState

if TYPE_CHECKING:
    from .facade import Integration

#: The stdlib logger its lines go to (``log_to_stdlib``): the package's, as before the split.
LOG_NAME: Final = "backbeat_sync.integration"
__all__ = ["StopMixin"]


class StopMixin(IntegrationCore):
    """``Integration.stop()`` and ``stop_on_signals()``."""

    _stop_requested: bool
    _stopped_event: threading.Event
    _threads: list[threading.Thread]
    _metrics_servers: list[Any]
    _otel: Any

    if TYPE_CHECKING:  # defined by Integration

        def _stop_threads(self) -> None: ...

    @lock_free
    def stop(self) -> None:
        """Fail what is still active, publish what is queued, close, join every thread. Idempotent.

        Each operation still active gets a final ``failed`` claim with reason
        ``integration stopped`` before the connection closes. ``stop()`` never
        raises, and may be called from any thread and from a signal handler
        (``signal.signal(signal.SIGTERM, lambda *a: integration.stop())``):

        - called while this thread is inside a library call (a signal handler that
          interrupted ``complete_p2p_operation``, a ``track_operation`` exit, ...),
          which may hold a library lock, it only asks for the stop and returns at
          once; a helper thread (``backbeat-stop``, not a daemon, so the interpreter
          waits for it at exit) stops the integration as soon as the interrupted
          call has returned;
        - called while another thread is stopping it, it waits until that stop is done;
        - called during ``start()``, the integration stops as soon as it has started.

        A budget of the calling thread that runs out while ``stop()`` works is raised
        when ``stop()`` returns (the budget's block owns that exception, not ``stop()``).
        """
        if inside_library():
            self._request_stop()
            return
        self._stop_now()

    def stop_on_signals(self, *signals: int) -> Callable[[], None]:
        """Call :meth:`stop` when one of ``signals`` arrives (default: ``SIGTERM``).

        The handler calls ``stop()`` and then the handler that was installed before
        (if it was a Python function), so a framework's own handler still runs. The
        process does not exit because of it: the application decides (``running``
        turns false). Call it from the main thread (Python installs handlers there only).

        Args:
            *signals: signal numbers (``signal.SIGTERM``, ``signal.SIGINT``, ...).

        Returns:
            A function that puts the previous handlers back.

        Raises:
            InvalidArgument: not called from the main thread, or a signal cannot be handled.
        """
        import signal as _signal

        if threading.current_thread() is not threading.main_thread():
            raise InvalidArgument("thread", threading.current_thread().name, "must be the main thread")
        chosen = signals or (_signal.SIGTERM,)
        previous: dict[int, Any] = {}

        def handler(signum: int, frame: Any) -> None:
            self.stop()
            before = previous.get(signum)
            if callable(before):
                before(signum, frame)

        try:
            for sig in chosen:
                previous[sig] = _signal.signal(sig, handler)
        except (ValueError, OSError, TypeError) as exc:
            for sig, before in previous.items():
                _signal.signal(sig, before)
            raise InvalidArgument("signals", chosen, f"cannot be handled: {exc}") from exc

        def restore() -> None:
            for sig, before in previous.items():
                _signal.signal(sig, before)

        return restore

    def _request_stop(self) -> None:
        """Ask the beat thread to start a stop (lock-free: called where a library lock may be held).

        ``SimpleQueue.put`` is reentrant, safe even in a signal handler that interrupted
        a ``get`` or ``put`` on the same queue.
        """
        state = self._state
        if state is IntegrationState.STARTING or state is IntegrationState.RUNNING:
            self._stop_requested = True
            self._beat_queue.put(STOP_REQUEST)

    def _spawn_stopper(self) -> None:
        """Beat thread: a stop was requested where it could not run; run it on a helper thread."""
        if self._state is not IntegrationState.RUNNING:
            return  # not yet started (start() stops at its end), or already stopping
        try:
            threading.Thread(target=self._stop_now, name="backbeat-stop", daemon=False).start()
        except RuntimeError as exc:  # the interpreter is shutting down: its exit hook stops us
            self._log.warn(f"BACKBEAT stop requested, left to the exit hook: {exc}")

    def _stop_now(self) -> None:
        with self._state_lock:
            state = self._state
            if state is IntegrationState.STARTING:
                self._stop_requested = True
                return
            if state is IntegrationState.RUNNING:
                self._state = IntegrationState.STOPPING
                self.budget_clock = None
        if state is not IntegrationState.RUNNING:
            if state is IntegrationState.STOPPING and threading.current_thread() not in self._threads:
                self._stopped_event.wait(self._config.flush_timeout + STOP_WAIT_MARGIN)
            return
        # Shielded: a budget of this thread that runs out meanwhile is handed over, not
        # raised asynchronously in the middle of the stop; it is raised when we return.
        slot = getattr(thread_state, "slot", None)
        if slot is not None:
            slot.shield += 1
        try:
            self._shutdown()
        finally:
            self._stopped_event.set()
            if slot is not None:
                unshield(slot)

    def _shutdown(self) -> None:
        """The work of stop() (this thread set STOPPING). Never raises: each step is guarded."""
        try:
            self._beat_queue.put(STOP)
            for t in self._threads[:1]:
                if t is not threading.current_thread():
                    t.join()
            failed = self._registry.fail_all(STOPPED_REASON)
            if failed:
                self._log.warn(f"BACKBEAT stop: {len(failed)} active operation(s) failed ({STOPPED_REASON})")
            if self.history.cluster is not None:  # this run's last runs reach the bucket
                self.history.sync_cluster(self._config.flush_timeout)
            if self._transport is not None:
                self._transport.stop(self._config.flush_timeout)
        except Exception as exc:
            self._stop_failed("flushing", exc)
        try:
            self._stop_threads()
            self.history.close()
            for server in self._metrics_servers:
                server.close()
            self._metrics_servers.clear()
        except Exception as exc:
            self._stop_failed("joining threads", exc)
        with self._state_lock:
            self._state = IntegrationState.STOPPED
        try:
            RUNTIME.stopped(cast("Integration", self))
            if self._otel is not None:
                self._otel.uninstrument()
                self._otel = None
            self._log.info("🎵 CHORUS BACKBEAT integration stopped")
        except Exception as exc:
            self._stop_failed("stop hooks", exc)

    def _stop_failed(self, step: str, exc: Exception) -> None:
        try:
            self.record_error(f"stop failed while {step}: {type(exc).__name__}: {exc}")
        except Exception:  # the logger itself failed: stop() still returns
            pass
