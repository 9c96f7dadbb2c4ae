"""The registry's quiet path: a plain operation entered and left with no lock.

While nobody would hear a claim (the registry is quiet: no ``on_claim`` callback, no
subscriber on the in-process bus), nobody listens, nothing is counted by type, no
workflow was ever seen and the registry is open, ``track_operation``'s common case
(a block with no flow) registers its operation with one ``setdefault`` and leaves
with a subscript and a ``del``: :meth:`OperationRegistry.start` and ``finish`` take
the lock and test a dozen fields: about 400 ns of a block's 3.2 us before this path.

Why that is safe:

- Each step is one dict operation, atomic under the GIL; every other change takes
  the registry lock, and every loop over the operations under it walks a copy.
- Ids stay unique: the locked paths register with ``setdefault`` too.
- The path closes (:meth:`RegistryQuiet._requiet`) when any of its conditions ends;
  an operation that entered on the old value checks again once inserted, and goes
  the full way if it closed. So a claim someone could hear is never skipped: a
  final claim while loud goes through ``finish`` and its lock.
- The claims not made are counted exactly with no lock: one counter call on entry
  (two claims, started and executing) and one on leaving (done).
"""

from __future__ import annotations

import itertools
import threading
from typing import TYPE_CHECKING, Any

from .errors import DuplicateOperation
from .phases import OperationPhase

if TYPE_CHECKING:
    from .operations import P2POperation

__all__ = ["RegistryQuiet"]

_STARTED = OperationPhase.STARTED
_COMPLETED = OperationPhase.COMPLETED


class RegistryQuiet:
    """The quiet path of ``OperationRegistry`` (it inherits it; the fields used are its own)."""

    if TYPE_CHECKING:  # the registry's fields this uses
        _lock: threading.Lock
        _active: dict[str, P2POperation]
        _finished: dict[str, P2POperation]
        _emit: Any
        _listeners: tuple[Any, ...]
        _flows: bool
        _closed: bool
        _counting: bool
        _unheard: int
        epochs: int

        def _catch_up(self, op: P2POperation) -> None: ...

    def _init_quiet(self) -> None:
        """Make the path's fields (the registry's ``__init__``, and a fork child's copy), then open
        or close it."""
        #: ``_active`` while the path is open, else None (set by _requiet alone).
        self._quiet_active: dict[str, P2POperation] | None = None
        # One counter for entries (two claims each) and one for leavings (one claim each):
        # a call takes a value (a C call, no lock needed); see unheard.
        self._quiet_started = itertools.count().__next__
        self._quiet_done = itertools.count().__next__
        self._quiet_reads = 0  # values the reads of unheard took from each counter
        self._quiet_lock = threading.Lock()  # serialises _requiet (a leaf lock)
        # Serialises the reads of unheard: a leaf lock of its own, not the registry lock, so
        # reading health never waits for the registry (a signal handler reading health while
        # its thread is inside the registry would wait for itself).
        self._reads_lock = threading.Lock()
        self._requiet()

    @property
    def counting(self) -> bool:
        """Whether operations are counted by type (see ``operation_counts``).

        Off until an exporter asks (``metrics.instrument`` turns it on): counting a
        reused id costs its start ~0.2 us; the quiet path is open only while it is off.
        """
        return self._counting

    @counting.setter
    def counting(self, on: bool) -> None:
        self._counting = on
        self._requiet()

    @property
    def unheard(self) -> int:
        """Claims not made because nobody would receive them (see ``set_quiet``)."""
        with self._reads_lock:
            # A counter's next value is the calls made so far plus the reads before this one
            # (each read takes a value too): exact, with no lock on the path.
            reads = self._quiet_reads
            self._quiet_reads = reads + 1
            entered = self._quiet_started() - reads
            left = self._quiet_done() - reads
            return self._unheard + 2 * entered + left

    def _requiet(self) -> None:
        """Open or close the path from what it depends on; called after each change of one of them.

        Under a lock of its own, so the last of two racing calls sees both changes.
        """
        with self._quiet_lock:
            open_ = (
                self._emit is None
                and not self._listeners
                and not self._counting
                and not self._flows
                and not self._closed
            )
            self._quiet_active = self._active if open_ else None

    def _saw_flows(self) -> None:
        """A workflow was seen (lock held): ``_flows`` from now on, and the path closed for good."""
        if not self._flows:
            self._flows = True
            self._requiet()

    def enter_quiet(self, op: P2POperation, then: OperationPhase) -> bool:
        """Register ``op`` (no flow) and move it to ``then`` by the quiet path, if it is open.

        Leave by :meth:`leave_quiet`.

        Returns:
            False if the path is closed: nothing was done, call ``start``.

        Raises:
            DuplicateOperation: an active operation already has this id.
        """
        active = self._quiet_active
        if active is None:
            return False
        op_id = op.id
        op.phase = then
        if active.setdefault(op_id, op) is not op:
            op.phase = _STARTED
            raise DuplicateOperation(op_id)
        if self._quiet_active is active:
            self._quiet_started()
            if op.epoch < self.epochs:  # the clock was reset since its start was read
                with self._lock:
                    self._catch_up(op)  # idempotent (rebase may have caught it up too)
            return True
        # Closed meanwhile: take it out again and go the full way, unless another thread
        # has finished it already (stop() failed it): then it did enter.
        try:
            got = active[op_id]
            del active[op_id]
        except KeyError:
            got = None
        if got is op:
            op.phase = _STARTED
            return False
        if got is not None:  # ours was finished and its id taken again: put that one back
            active.setdefault(op_id, got)
        self._quiet_started()
        return True

    def leave_quiet(self, op: P2POperation, peer_count: int) -> bool:
        """Complete ``op``, entered by :meth:`enter_quiet`, by the quiet path if it is still open.

        Returns:
            False if the path is closed: nothing was done, call ``finish``. True also when
            another thread finished ``op`` first (``stop()`` failed it).
        """
        active = self._quiet_active
        if active is None:
            return False
        op_id = op.id
        try:  # a subscript and a ``del``, as in finish(): no signal handler runs between them
            got = active[op_id]
            del active[op_id]
        except KeyError:  # finished by another thread
            return True
        if got is not op:  # ours was finished and its id taken again: put that one back
            active.setdefault(op_id, got)
            return True
        op.phase = _COMPLETED
        op.peer_count = peer_count
        self._finished[op_id] = op
        self._quiet_done()
        return True
