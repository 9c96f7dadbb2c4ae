"""User callbacks: registering them, and the callback thread (``backbeat-callbacks``) that runs them.

A slow or raising callback stalls nothing else: the beat thread only queues
(bounded; the oldest are dropped and counted past ``CALLBACK_QUEUE_LIMIT``).
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from typing import Any, Final

from .._reentry import lock_free
from ..claims import resolve
from ..errors import InvalidArgument
from ..protocol import BeatFrame
from .base import CALLBACK_JOIN_TIMEOUT, CALLBACK_QUEUE_LIMIT, BeatCallback, ClaimCallback, IntegrationCore

#: The stdlib logger its lines go to (``log_to_stdlib``): the package's, as before the split.
LOG_NAME: Final = "backbeat_sync.integration"
__all__ = ["CallbackMixin", "Callbacks", "callback_name"]


class Callbacks:
    """Copy-on-write lists of user callbacks."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.beat: tuple[BeatCallback, ...] = ()
        self.downbeat: tuple[BeatCallback, ...] = ()
        self.claim: tuple[ClaimCallback, ...] = ()

    def add(self, kind: str, cb: Callable[[Any], Any]) -> Callable[[], None]:
        with self._lock:
            setattr(self, kind, (*getattr(self, kind), cb))

        def remove() -> None:
            with self._lock:
                current = getattr(self, kind)
                if cb in current:
                    i = current.index(cb)
                    setattr(self, kind, current[:i] + current[i + 1 :])

        return remove


def callback_name(cb: Callable[..., Any]) -> str:
    return getattr(cb, "__qualname__", None) or repr(cb)


class CallbackMixin(IntegrationCore):
    """``Integration``'s callbacks: ``on_beat``, ``on_downbeat``, ``on_claim`` and their thread."""

    def on_beat(self, callback: BeatCallback) -> Callable[[], None]:
        """Call ``callback(frame)`` on every beat (on the callback thread).

        Returns:
            A function that unregisters it.
        """
        self.refuse_if_forked()
        return self._callbacks.add("beat", self._callable(callback))

    def on_downbeat(self, callback: BeatCallback) -> Callable[[], None]:
        """Call ``callback(frame)`` on every downbeat (first beat of a bar).

        Returns:
            A function that unregisters it.
        """
        self.refuse_if_forked()
        return self._callbacks.add("downbeat", self._callable(callback))

    def on_claim(self, callback: ClaimCallback) -> Callable[[], None]:
        """Call ``callback(claim)`` with every claim this integration emits, in order.

        Returns:
            A function that unregisters it.
        """
        self.refuse_if_forked()
        remove = self._callbacks.add("claim", self._callable(callback))
        self.audience_changed()

        def unregister() -> None:
            remove()
            self.audience_changed()

        return unregister

    @staticmethod
    def _callable(callback: Callable[..., Any]) -> Callable[..., Any]:
        if not callable(callback):
            raise InvalidArgument("callback", callback, "must be callable")
        return callback

    def _queue_callback(self, kind: str, payload: Any) -> None:
        # A SimpleQueue, not a deque under a Condition: application threads queue claims
        # here, and a signal handler that raises (``stop(); sys.exit(0)``) may interrupt
        # them anywhere; Condition.__enter__ is Python code, so it could leave its lock
        # held for good. SimpleQueue.put is one C call (reentrant).
        items = self._cb_items
        if items.qsize() >= CALLBACK_QUEUE_LIMIT:  # full: the oldest item goes
            try:
                dropped = items.get_nowait()
            except queue.Empty:
                pass
            else:
                if dropped[0] == "stop":  # never drop the stop (after 100,000 more items)
                    items.put(dropped)
                else:
                    self._health.add("callbacks_dropped")
        items.put((kind, payload))

    @lock_free  # never on the main thread; calls user callbacks with no lock held
    def _callback_loop(self) -> None:
        get = self._cb_items.get
        while True:
            kind, payload = get()
            if kind == "stop":
                return
            callbacks: tuple[Callable[[Any], Any], ...] = getattr(self._callbacks, kind)
            if kind == "claim":
                try:
                    payload = resolve(payload)
                except Exception as exc:  # a bug: never let it stop the callback thread
                    self.record_error(f"claim {payload.task_id} not built: {type(exc).__name__}: {exc}")
                    continue
            for cb in callbacks:
                self._cb_running = (callback_name(cb), self._time.monotonic())
                try:
                    cb(payload)
                except Exception as exc:
                    self.count("callback_errors")
                    self.record_error(
                        f"on_{kind} callback {callback_name(cb)} raised {type(exc).__name__}: {exc}"
                    )
                finally:
                    self._cb_running = None

    def on_beat_handled(self, listener: Callable[[BeatFrame, float], None]) -> Callable[[], None]:
        """Call ``listener(frame, seconds)`` on the beat thread after each beat is handled.

        For instrumentation (``backbeat_sync.metrics`` feeds its histogram with it): the
        listener runs on the beat thread, so it must be quick and must not block.

        Returns:
            A function that unregisters it.
        """
        self._handled_listeners = (*self._handled_listeners, listener)

        def remove() -> None:
            self._handled_listeners = tuple(x for x in self._handled_listeners if x is not listener)

        return remove

    def _join_callbacks(self, thread: threading.Thread) -> None:
        """Wait while the callback thread works through what is queued (every claim reaches
        ``on_claim``); give up only on one callback running longer than CALLBACK_JOIN_TIMEOUT."""
        while thread.is_alive():
            thread.join(0.05)
            running = self._cb_running
            if running is not None and self._time.monotonic() - running[1] > CALLBACK_JOIN_TIMEOUT:
                self._log.warn(f"BACKBEAT stop: thread {thread.name} still busy in a user callback")
                return

    def _check_blocked(self) -> None:
        blocked = self._blocked_callback()
        if blocked is None:
            self._cb_blocked_reported = False
        elif not self._cb_blocked_reported:
            self._cb_blocked_reported = True
            self.record_error(f"callback blocked: {blocked} has run for more than a beat")

    def _blocked_callback(self) -> str | None:
        running = self._cb_running
        if running is None:
            return None
        name, since = running
        if self._time.monotonic() - since > self._clock.beat_duration:
            return name
        return None
