"""The process-wide budget watchdog: one thread, a heap of deadlines, asynchronous exceptions.

How an exception reaches exactly the code that owns a budget (see ``docs/budgets.md``):

- Each thread that runs budgets has a :class:`ThreadSlot`. Its ``live`` dict holds
  the budgets armed in that thread, by sequence number, in the order they were
  entered. Whoever removes a budget from ``live`` first owns its outcome: the
  owner leaving the block (the budget was not spent), or the watchdog firing it
  (it was). ``dict.pop`` is one atomic step, so exactly one of them wins.
- The owner's own exit code runs with ``slot.shield`` raised. The watchdog never
  sets an asynchronous exception into a shielded thread: it hands the exception
  over in ``slot.sync`` and the owner raises it synchronously when it lowers the
  shield. An exception set just *before* the shield went up is cleared with
  ``PyThreadState_SetAsyncExc(tid, NULL)`` and raised synchronously instead. So
  the exception is raised once, inside the block, whichever side is first.
- At most one exception of ours is pending per thread (``slot.pending``); a second
  budget running out in the same thread waits until the first has landed.
- The watchdog sleeps until the earliest deadline (``BeatClock.seconds_until``),
  and is woken through a socket pair: by a new budget whose first event is earlier
  than the planned wake-up, and on every beat frame (tempo changes re-time it).
  The heap is keyed by beat position, so a tempo change never reorders it.
  Entries of budgets that ended are dropped lazily when they reach the top, and
  a compaction outside the lock bounds the garbage.
- Short budgets cost the watchdog nothing unless they are still running when it
  wakes: the watchdog promotes budgets it has not seen yet (newest first, in each
  slot) into its heap when it wakes. A ``@beat_budget`` call enters ``live`` as a
  plain entry (its settings, integration and start); its tracker object is made
  only when something needs one (the entry's settings make it: ``EntrySettings``), so a call that
  ends before anything looks at it allocates no tracker.

The single :class:`Watchdog` of a process is made and owned by
:mod:`backbeat_sync._runtime` (``WATCHDOG`` there), which also resets it in a fork
child. Time is read through a :class:`~backbeat_sync.TimeSource`: the watchdog's
own (sleeps, idle exit) and each budget clock's (positions, the ``now`` an event
fires at).

The delivery uses a *private* ctypes prototype of ``PyThreadState_SetAsyncExc``
(never ``ctypes.pythonapi.PyThreadState_SetAsyncExc.argtypes``, which other
libraries such as func-timeout and stopit share).
"""

from __future__ import annotations

import ctypes
import enum
import heapq
import queue
import select
import socket
import sys
import threading
import weakref
from collections.abc import Callable
from typing import Any, Final, Protocol, cast

from ._logging import library_logger as logger
from ._reentry import lock_free
from ._time import SYSTEM_TIME, TimeSource
from .clock import BeatClock

__all__ = [
    "ARMED",
    "ASYNC",
    "OWNER",
    "SYNC",
    "Fired",
    "ThreadSlot",
    "Watchdog",
    "all_slots",
    "clear_async_exc",
    "current_slot",
    "reset_slots_after_fork",
    "set_async_exc",
    "thread_state",
]

# -- the C call, through a private prototype ---------------------------------------

_SET_PROTO = ctypes.PYFUNCTYPE(ctypes.c_int, ctypes.c_ulong, ctypes.py_object)
_CLEAR_PROTO = ctypes.PYFUNCTYPE(ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p)
_set_async: Callable[[int, Any], int] = _SET_PROTO(("PyThreadState_SetAsyncExc", ctypes.pythonapi))
_clear_async: Callable[[int, Any], int] = _CLEAR_PROTO(("PyThreadState_SetAsyncExc", ctypes.pythonapi))


def set_async_exc(tid: int, exc_class: type[BaseException]) -> int:
    """Make ``exc_class`` be raised in thread ``tid`` at its next bytecode check.

    Returns:
        How many thread states were modified (1, or 0 if the thread is gone).
    """
    return _set_async(tid, exc_class)


def clear_async_exc(tid: int) -> int:
    """Cancel a pending asynchronous exception of thread ``tid`` (``SetAsyncExc(tid, NULL)``)."""
    return _clear_async(tid, None)


class Fired(enum.Enum):
    """Who won a budget, and how its exception travels (``Tracker.fired``).

    A budget starts ``ARMED``. Whoever removes it from its thread's ``live`` dict
    first wins it: the owner leaving (it stays ``ARMED``: it was not spent), the
    owner finding it spent (``OWNER``), or the watchdog, which then chooses
    ``ASYNC`` or ``SYNC``. Between the watchdog's win and that choice the budget
    is still ``ARMED`` but gone from ``live``: an owner that finds it so waits
    (``while t.fired is ARMED``) for the choice, which follows within a few
    bytecodes on the watchdog thread.
    """

    ARMED = "armed"  #: running; nobody has won it yet
    ASYNC = "async"  #: the watchdog set an asynchronous exception in the owner thread
    SYNC = "sync"  #: the owner raises the exception itself (it was shielded, or cleared it)
    OWNER = "owner"  #: the owner found the budget spent first (``check()``, a wait) and raised


ARMED: Final = Fired.ARMED
ASYNC: Final = Fired.ASYNC
SYNC: Final = Fired.SYNC
OWNER: Final = Fired.OWNER


class EntrySettings(Protocol):
    """The settings held in a plain ``live`` entry (``backbeat_sync.budget.BudgetSettings``)."""

    def materialize(self, slot: ThreadSlot, seq: int, entry: list[Any]) -> Tracker:
        """The tracker of ``entry`` (key ``seq`` in ``slot.live``), made once on first need."""
        ...


class Tracker(Protocol):
    """What the watchdog needs of a budget (``backbeat_sync.budget.Tracker``)."""

    seq: int
    slot: ThreadSlot
    event_pos: float | None
    promoted: bool
    fired: Fired
    delivered: bool

    @property
    def clock(self) -> BeatClock:
        """The clock the budget counts on."""
        ...

    def on_event(self, pos_now: float, now: float) -> float | None:
        """Handle the event due at ``event_pos``; return the next event position or None."""
        ...

    def first_event(self) -> float:
        """Position of the budget's first event (when the watchdog first takes it)."""
        ...


# -- per-thread state --------------------------------------------------------------


class ThreadSlot:
    """The budget state of one thread (only the owner thread adds to ``live``).

    Attributes:
        tid: ``threading.get_ident()`` of the thread.
        live: armed budgets by sequence number, in the order they were entered. Each
            value is an entry ``[tracker, settings, host, clock state, start time]``;
            a ``@beat_budget`` call's tracker is None until it is made
            (``settings.materialize``); a ``track_operation`` block's entry is ``[tracker]``.
        pending: the budget whose asynchronous exception is set and not yet raised.
        shield: >0 while the owner runs its own bookkeeping (no asynchronous exception then).
        sync: a fired budget whose exception the owner must raise itself.
        barrier: ``(seq, newest)``: the budget whose exception is unwinding this thread,
            and the newest budget armed then. Budgets in between may have been left
            without their exit code, so the watchdog does not interrupt them (their
            owner raises at exit instead).
        kick: set when ``sync`` is handed over (wakes ``op.sleep``).
    """

    __slots__ = (
        "__weakref__",
        "barrier",
        "kick",
        "live",
        "pending",
        "shield",
        "sync",
        "thread",
        "tid",
    )

    def __init__(self) -> None:
        self.tid = threading.get_ident()
        self.thread = weakref.ref(threading.current_thread())
        self.live: dict[int, list[Any]] = {}
        self.pending: Any = None
        self.shield = 0
        self.sync: Any = None
        self.barrier: tuple[int, int] | None = None
        self.kick = threading.Event()


#: Per-thread: ``thread_state.slot`` is the thread's :class:`ThreadSlot` once it has one
#: (read directly on the hot paths; :func:`current_slot` makes it).
thread_state = threading.local()
_slots_lock = threading.Lock()
_slots: list[ThreadSlot] = []


def current_slot() -> ThreadSlot:
    """The calling thread's slot (made on first use)."""
    try:
        return thread_state.slot  # type: ignore[no-any-return]
    except AttributeError:
        slot = thread_state.slot = ThreadSlot()
        with _slots_lock:
            _slots[:] = [s for s in _slots if s.live or s.thread() is not None]
            _slots.append(slot)
        return slot


def all_slots() -> list[ThreadSlot]:
    """A copy of every thread slot."""
    with _slots_lock:
        return list(_slots)


def reset_slots_after_fork() -> None:
    """Fork child: forget the parent's threads (only the forking thread survived, and its
    budgets belong to the parent's integrations). Called by ``_runtime``."""
    global _slots_lock
    _slots_lock = threading.Lock()
    _slots.clear()
    if hasattr(thread_state, "slot"):
        del thread_state.slot


def materialize(slot: ThreadSlot, seq: int, entry: list[Any]) -> Any:
    """The tracker of a ``live`` entry: ``entry[0]``, or made by the entry's settings."""
    t = entry[0]
    if t is None:
        t = cast(EntrySettings, entry[1]).materialize(slot, seq, entry)
    return t


# -- the watchdog thread -----------------------------------------------------------

#: How long the watchdog thread lingers with nothing to watch before it exits.
IDLE_EXIT_SECONDS: Final = 0.5
#: Delay before retrying a delivery into a thread that has one pending already.
RETRY_SECONDS: Final = 0.0005
#: Heap garbage allowed before a compaction (plus twice the live entries).
COMPACT_SLACK: Final = 4096
#: Precise mode lowers the switch interval when the next event is closer than this.
PRECISE_WINDOW: Final = 0.015


def _has_new(slot: ThreadSlot) -> bool:
    """Whether ``slot`` has a budget the watchdog has not taken into its heap (the newest is enough)."""
    live = slot.live
    if not live:
        return False
    try:
        t = live[next(reversed(live))][0]
    except (KeyError, RuntimeError, StopIteration):  # changed meanwhile: look again
        return True
    return t is None or (not t.promoted and t.fired is ARMED)


def _alive(t: Any) -> bool:
    """Whether a heap entry's budget still needs the watchdog (armed, or awaiting its follow-up)."""
    if t.fired is ARMED:
        return t.seq in t.slot.live
    return t.fired in (ASYNC, SYNC) and not getattr(t, "finished", False)


def _report_to_loguru(tracker: Any, message: str, exc: BaseException, callback: bool = False) -> None:
    log = logger.opt(exception=True)  # called while handling exc
    (log.warning if callback else log.error)(message)


class _Heap:
    __slots__ = ("clock", "entries")

    def __init__(self, clock: BeatClock) -> None:
        self.clock = clock
        self.entries: list[tuple[float, int, Any]] = []


class Watchdog:
    """One thread for the whole process that fires budget events on time.

    Args:
        keep_alive: whether an idle watchdog should linger (an integration runs);
            without, it exits as soon as it has nothing to watch.
        time_source: where the watchdog reads the time for its own waits; each budget
            clock's positions (and the ``now`` its events fire at) use that clock's source.
        hosts: the running integrations, told of a failure no single budget owns (an
            iteration of the watchdog that failed).
    """

    def __init__(
        self,
        keep_alive: Callable[[], bool] = lambda: False,
        time_source: TimeSource = SYSTEM_TIME,
        hosts: Callable[[], list[Any]] = list,
    ) -> None:
        self._keep_alive = keep_alive
        self._time = time_source
        self._hosts = hosts
        self._init_state()

    def _init_state(self) -> None:
        self._lock = threading.Lock()
        self._heaps: dict[int, _Heap] = {}
        self._thread: threading.Thread | None = None
        self._thread_lock = threading.Lock()
        self._rsock, self._wsock = socket.socketpair()
        self._rsock.setblocking(False)
        self._wsock.setblocking(False)
        #: Monotonic time of the next planned wake-up; a budget whose first event is
        #: earlier calls :meth:`notify`. 0.0 while the watchdog is processing.
        self.next_wake = float("inf")
        self._stopping = False
        self._pushed_since_compact = 0
        self.fired_count = 0
        self._callbacks: queue.SimpleQueue[tuple[Callable[[], None], Any] | None] = queue.SimpleQueue()
        #: Precise mode: the switch interval used while an event is near (None: off).
        self.precise_interval: float | None = None
        self._saved_interval: float | None = None
        self._callback_thread: threading.Thread | None = None
        self._last_thread: threading.Thread | None = None

    def reset_after_fork(self) -> None:
        """Fork child: the threads did not survive the fork and the locks may be held by
        threads that are gone; start from nothing (the thread starts again on first use).

        The precise-mode setting is kept (it is the user's choice, not thread state).
        """
        precise = self.precise_interval
        old = (self._rsock, self._wsock)
        self._init_state()
        self.precise_interval = precise
        for sock in old:
            try:
                sock.close()
            except OSError:  # pragma: no cover
                pass

    def join_idle(self, timeout: float = 1.0) -> None:
        """With nothing to watch (no live budget, no running integration), let the threads exit now.

        ``Integration.stop()`` of the last running integration calls this, so no
        library thread outlives it; a later budget starts the watchdog again.
        """
        if self._keep_alive() or any(s.live for s in all_slots()):
            return
        thread = self._last_thread
        if thread is not None and thread.is_alive() and thread is not threading.current_thread():
            self.notify_only()
            thread.join(timeout)
        cb = self._callback_thread
        if cb is not None and cb.is_alive() and cb is not threading.current_thread():
            self._callbacks.put(None)
            cb.join(timeout)

    # -- called by application threads ----------------------------------------

    def notify(self) -> None:
        """Wake the watchdog (starting its thread if needed). Lock-free on the common path."""
        if self._thread is None:
            self._ensure_thread()
        try:
            self._wsock.send(b"\0")
        except (BlockingIOError, OSError):  # a full socket already means "wake up"
            pass

    def push(self, tracker: Tracker) -> None:
        """Add ``tracker``'s next event to the heap (the tracker must have ``event_pos`` set)."""
        clock = tracker.clock
        with self._lock:
            heap = self._heaps.get(id(clock))
            if heap is None:
                heap = self._heaps[id(clock)] = _Heap(clock)
            pos = tracker.event_pos
            assert pos is not None, "push() needs the tracker's event_pos"
            heapq.heappush(heap.entries, (pos, tracker.seq, tracker))
            self._pushed_since_compact += 1
        tracker.promoted = True

    def run_callback(self, fn: Callable[[], None], owner: Any = None) -> None:
        """Run ``fn()`` on the budget callback thread (user ``on_warning`` callbacks).

        If it raises, the failure goes to :attr:`report` with ``owner`` (the tracker).
        """
        with self._thread_lock:
            # Queued under the lock the thread decides to exit under: it either sees ``fn``,
            # or has already given up its place, and a new thread is started here.
            self._callbacks.put((fn, owner))
            if self._callback_thread is None or not self._callback_thread.is_alive():
                self._callback_thread = threading.Thread(
                    target=self._callback_loop, name="backbeat-budget-callbacks", daemon=True
                )
                self._callback_thread.start()

    @lock_free  # never on the main thread; runs user on_warning callbacks with no lock held
    def _callback_loop(self) -> None:
        while True:
            try:
                fn = self._callbacks.get(timeout=IDLE_EXIT_SECONDS)
            except queue.Empty:
                fn = None
            if fn is None:  # idle, or asked to stop: stop unless callbacks were queued since
                with self._thread_lock:
                    if self._callbacks.empty():
                        if self._callback_thread is threading.current_thread():
                            self._callback_thread = None
                        return
                continue  # a stop request left over from a thread that was gone already
            call, owner = fn
            try:
                call()
            except Exception as exc:
                self._report(owner, "BACKBEAT budget on_warning callback raised", exc, callback=True)

    def _report(self, tracker: Any, message: str, exc: BaseException, *, callback: bool = False) -> None:
        """A failure on the watchdog's threads (call it while handling ``exc``).

        It goes to the logger of the tracker's integration (the user's ``logger=``), or
        of every running one when no budget owns it, with the traceback (a warning
        for a user ``on_warning`` callback, as for ``on_beat`` callbacks; an error for
        the watchdog's own), and into health ``errors`` (a callback's also counted in
        ``callback_errors``). The library logger only when no integration is there.
        """
        try:
            host = getattr(tracker, "integration", None)
            targets = [host] if host is not None else [h for h in self._hosts() if h.running]
            if not targets:
                _report_to_loguru(tracker, message, exc, callback)
            for target in targets:
                target.log.exception(message, exc, level="warn" if callback else "error")
                if callback:
                    target.count("callback_errors")
                    target.record_error(
                        f"on_warning callback of {tracker.operation_id} raised {type(exc).__name__}: {exc}"
                    )
                else:
                    target.record_error(f"{message}: {type(exc).__name__}: {exc}")
        except Exception:  # the user's logger failed too: the library's still says it
            _report_to_loguru(tracker, message, exc, callback)

    def _ensure_thread(self) -> None:
        with self._thread_lock:
            if self._thread is not None and self._thread.is_alive():
                return
            self._stopping = False
            self._thread = threading.Thread(target=self._run, name="backbeat-watchdog", daemon=True)
            self._last_thread = self._thread
            self._thread.start()

    def shutdown(self, timeout: float = 2.0) -> None:
        """Stop the watchdog thread (tests; it restarts on the next budget)."""
        with self._thread_lock:
            thread = self._thread
            self._stopping = True
        if thread is not None:
            self.notify_only()
            thread.join(timeout)
        self._callbacks.put(None)
        cb = self._callback_thread
        if cb is not None:
            cb.join(timeout)

    def notify_only(self) -> None:
        """Wake the watchdog thread without starting it."""
        try:
            self._wsock.send(b"\0")
        except (BlockingIOError, OSError):
            pass

    @property
    def running(self) -> bool:
        """Whether the watchdog thread is alive."""
        t = self._thread
        return t is not None and t.is_alive()

    def heap_size(self) -> int:
        """Entries in the heaps, garbage included (for tests and benchmarks)."""
        with self._lock:
            return sum(len(h.entries) for h in self._heaps.values())

    # -- the thread --------------------------------------------------------------

    def _drain(self) -> None:
        try:
            while self._rsock.recv(4096):
                pass
        except (BlockingIOError, OSError):
            pass

    def _run(self) -> None:
        idle_since: float | None = None
        me = threading.current_thread()
        while True:
            self.next_wake = 0.0
            self._drain()
            if self._stopping:
                break
            now = self._time.monotonic()
            try:
                self._promote_fresh()
                busy = self._fire_due()
            except Exception as exc:  # a bug here must not kill the watchdog
                self._report(None, "BACKBEAT watchdog iteration failed", exc)
                busy = True
            if not busy and not any(s.live for s in all_slots()):
                self._maybe_compact(force=True)  # nothing armed: only follow-ups can be left
            target = self._next_target()
            if not busy and target == float("inf") and not any(s.live for s in all_slots()):
                if idle_since is None:
                    idle_since = now
                if now - idle_since >= IDLE_EXIT_SECONDS or not self._keep_alive():
                    with self._thread_lock:
                        if not any(_has_new(s) for s in all_slots()):
                            self._thread = None
                            self.next_wake = float("inf")
                            return
                target = now + IDLE_EXIT_SECONDS
            else:
                idle_since = None
            self.next_wake = target
            self._precise(target)
            if any(_has_new(s) for s in all_slots()):
                continue
            timeout = max(0.0, target - self._time.monotonic())
            if self.precise_interval is not None and timeout > PRECISE_WINDOW:
                timeout -= PRECISE_WINDOW  # wake early to lower the switch interval in time
            if timeout > 0:  # capped, so an idle watchdog notices it may exit
                select.select([self._rsock], [], [], min(timeout, IDLE_EXIT_SECONDS))
        self._precise(float("inf"))
        with self._thread_lock:
            if self._thread is me:
                self._thread = None
        self.next_wake = float("inf")

    def _precise(self, target: float) -> None:
        """Precise mode: lower the switch interval while an event is near, restore it after.

        The exception can only be set once the watchdog holds the GIL, which a busy
        thread gives up one switch interval after being asked; a short interval
        around the deadline shortens that wait (and costs a little throughput).
        """
        near = self.precise_interval is not None and target - self._time.monotonic() < PRECISE_WINDOW
        if near and self._saved_interval is None:
            self._saved_interval = sys.getswitchinterval()
            sys.setswitchinterval(cast(float, self.precise_interval))
        elif not near and self._saved_interval is not None:
            sys.setswitchinterval(self._saved_interval)
            self._saved_interval = None

    def _promote_fresh(self) -> None:
        for slot in all_slots():
            live = slot.live
            if not live:
                continue
            try:
                new = []
                for seq, e in reversed(live.items()):
                    t = e[0]
                    if t is not None and t.promoted:
                        break
                    new.append((seq, e))
            except RuntimeError:  # the owner changed live meanwhile: copy instead
                new = [(seq, e) for seq, e in list(live.items()) if e[0] is None or not e[0].promoted]
            for seq, e in new:
                if seq not in live:
                    continue
                t = materialize(slot, seq, e)
                if not t.promoted and t.fired is ARMED:
                    if t.event_pos is None:
                        t.event_pos = t.first_event()
                    self.push(t)

    def _fire_due(self) -> bool:
        """Handle every due event. Returns True if anything was handled."""
        handled = False
        with self._lock:
            heaps = list(self._heaps.values())
        for heap in heaps:
            source = heap.clock.time_source  # the event fires at the clock's "now"
            while True:
                now = source.monotonic()
                pos_now = heap.clock.budget_position(now)
                with self._lock:
                    entries = heap.entries
                    if not entries or entries[0][0] > pos_now:
                        break
                    pos, _, t = heapq.heappop(entries)
                if pos != t.event_pos:  # stale: the tracker moved on
                    continue
                handled = True
                try:
                    nxt = t.on_event(pos_now, now)
                except Exception as exc:  # one budget's failure must not stop the others
                    self._report(t, "BACKBEAT watchdog: budget event failed", exc)
                    nxt = None
                if nxt is not None:
                    t.event_pos = nxt
                    with self._lock:
                        heapq.heappush(heap.entries, (nxt, t.seq, t))
        self._maybe_compact()
        return handled

    def _maybe_compact(self, *, force: bool = False) -> None:
        with self._lock:
            size = sum(len(h.entries) for h in self._heaps.values())
            if not size:
                return
            if not force:
                if size < COMPACT_SLACK or self._pushed_since_compact < COMPACT_SLACK:
                    return
                live = sum(len(s.live) for s in all_slots())
                if size <= 2 * live + COMPACT_SLACK:
                    return
            taken = [(h, h.entries) for h in self._heaps.values()]
            for h in self._heaps.values():
                h.entries = []
            self._pushed_since_compact = 0
        # Filter outside the lock: pushes meanwhile go into the fresh lists.
        for h, old in taken:
            kept = [e for e in old if e[0] == e[2].event_pos and _alive(e[2])]
            heapq.heapify(kept)
            with self._lock:
                for e in h.entries:
                    heapq.heappush(kept, e)
                h.entries = kept

    def _next_target(self) -> float:
        best = float("inf")
        now = self._time.monotonic()
        with self._lock:
            tops = [(h.clock, h.entries[0][0]) for h in self._heaps.values() if h.entries]
            for key in [k for k, h in self._heaps.items() if not h.entries]:
                del self._heaps[key]
        for clock, pos in tops:
            best = min(best, now + max(0.0, clock.seconds_until(pos)))
        return best

    # -- delivery (watchdog thread) -------------------------------------------------

    def deliver(self, t: Any) -> str:
        """Win ``t`` and raise its exception in its thread.

        Returns:
            ``"lost"`` (the owner left first), ``"retry"`` (the thread has an
            exception pending; try again shortly), ``"suspect"`` (an outer
            budget's exception is unwinding the thread; not interrupted),
            ``"async"`` or ``"sync"``.
        """
        slot: ThreadSlot = t.slot
        if slot.pending is not None or slot.sync is not None:
            return "retry"
        barrier = slot.barrier
        if barrier is not None and barrier[0] < t.seq <= barrier[1]:
            return "suspect"
        newest = max(list(slot.live), default=t.seq)
        if slot.live.pop(t.seq, None) is None:
            return "lost"
        # From the shield test to the C call there is no eval-breaker check (no
        # Python-level call, no backward jump), so the owner cannot raise its
        # shield in between: the exception is set only into unshielded code.
        if slot.shield:
            t.fired = SYNC
            slot.sync = t
            slot.kick.set()
            self.fired_count += 1
            return "sync"
        t.fired = ASYNC
        slot.pending = t
        slot.barrier = (t.seq, newest)
        _set_async(slot.tid, t.exc_class)
        self.fired_count += 1
        return "async"
