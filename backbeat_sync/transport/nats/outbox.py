"""The outbox: a thread-safe, bounded queue of claims between application threads and the loop."""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Sequence
from typing import Any, Final, TypeAlias

from ...claims import Claim, EncodedClaim, EncodedRun, LazyClaim
from ...errors import ConfigError

__all__ = ["Entry", "Outbox", "Run"]


#: Claim priorities (``StatusClaim.priority``; None is normal).
PRIORITIES: Final = ("critical", "high", "normal", "low")
#: Coalesced entries left in the queue (skipped when taken) before it is compacted.
COMPACT_AT: Final = 1024


class Entry:
    __slots__ = ("claim", "dead", "final", "sent", "seq", "subject")

    def __init__(self, subject: str, claim: Claim | EncodedClaim, final: bool) -> None:
        self.subject = subject
        self.claim = claim
        self.final = final
        self.dead = False  # replaced by a newer claim queued behind it (skipped when taken)
        self.seq = 0  # publish sequence number, set when it goes on the wire
        self.sent = 0.0  # loop time it went on the wire


class Run(EncodedRun):
    """Claims of one beat's sweep (an :class:`~backbeat_sync.claims.EncodedRun`: claim ``i``
    is ``fmt % args[i]``) for ``subject``, queued as one item: one entry for up to a sweep
    chunk of claims, not one each.

    It holds only intermediate claims of ``normal`` priority (operations with no workflow),
    which the outbox coalesces only while bounded; it is queued only while unbounded, and
    split into one :class:`Entry` per claim when the outbox becomes bounded (see
    :attr:`Outbox.bounded`). So no claim in a run ever needs replacing in place.
    """

    __slots__ = ("subject",)

    #: Never a final claim, never replaced in place (see the class docstring).
    final: Final = False
    dead: Final = False

    def __init__(self, subject: str, task_ids: list[str], fmt: bytes, args: list[tuple[Any, ...]]) -> None:
        super().__init__(task_ids, fmt, args)
        self.subject = subject

    @classmethod
    def made(cls, subject: str, task_ids: list[str], payloads: list[bytes]) -> Run:
        """A run of claims whose bytes are made already (each is its own format's one field)."""
        return cls(subject, task_ids, b"%s", [(p,) for p in payloads])

    def split(self, n: int) -> Run:
        """Keep the first ``n`` claims; return a run of the rest."""
        rest = Run(self.subject, self.task_ids[n:], self.fmt, self.args[n:])
        del self.task_ids[n:], self.args[n:]
        return rest

    def entries(self) -> list[Entry]:
        """One entry per claim, in order."""
        subject = self.subject
        return [
            Entry(subject, EncodedClaim(i, d), False)
            for i, d in zip(self.task_ids, self.payloads(), strict=True)
        ]


#: What the outbox queues: one claim, or a run of a sweep's claims.
Item: TypeAlias = "Entry | Run"


class Outbox:
    """Thread-safe, bounded queue of claims waiting for the loop.

    Below ``limit`` every claim is kept in order. At or past it, an
    intermediate claim replaces the queued intermediate claim of the same
    subject and task (latest wins, :attr:`coalesced`), which leaves its place
    for the back of the queue; with none to replace it is dropped
    (:attr:`dropped`). A final claim is always kept. The bound
    holds while :attr:`bounded` is true; the link clears it while connected,
    when the loop is draining the outbox anyway (one beat of 100,000 active
    operations queues 100,000 claims at once, and none of them may be lost).

    Priorities (``claim.priority``): an intermediate claim of a *low* priority
    operation whose previous intermediate claim is still queued (the outbox is
    behind: disconnected, or the loop has not sent the last beat's claims yet)
    replaces it at once, bound or not. A replacing claim always goes to the
    back, so each beat's claims keep the sweep's order (critical and high
    first). Coalescing is counted by priority in :attr:`coalesced_by_priority`.

    A beat's sweep (:meth:`put_sweep`) comes encoded, in runs of claims of operations
    with no workflow; while unbounded each run is queued as one :class:`Run`, and the
    claims in it are never coalesced (only a low-priority claim could replace a queued
    one while unbounded, and an operation with no workflow is of normal priority for
    good). When the outbox becomes bounded its runs are split into one entry per claim,
    each the latest of its task as if queued alone, so the rules above hold for them.

    Args:
        limit: claims held before coalescing starts (>= 1).

    Example:
        >>> box = Outbox(limit=10)
        >>> box.__len__()
        0
    """

    def __init__(self, limit: int) -> None:
        if limit < 1:
            raise ConfigError("outbox_limit", limit, "must be an integer >= 1")
        self._limit = limit
        self._lock = threading.Lock()
        self._items: deque[Item] = deque()
        self._latest: dict[tuple[str, str], Entry] = {}
        self._wake_pending = False
        self._bounded = True
        self.dropped = 0
        self.coalesced = 0
        #: Claims coalesced, by the priority of the claim that replaced the older one.
        self.coalesced_by_priority: dict[str, int] = dict.fromkeys(PRIORITIES, 0)
        self._dead = 0  # replaced entries still in _items
        self._size = 0  # claims queued and not replaced (a run counts its claims)

    def __len__(self) -> int:
        return self._size

    @property
    def bounded(self) -> bool:
        """Apply ``limit`` (True while disconnected; the link clears it while connected)."""
        return self._bounded

    @bounded.setter
    def bounded(self, value: bool) -> None:
        with self._lock:
            if value and not self._bounded:
                self._split_runs()
            self._bounded = value

    def _split_runs(self) -> None:
        """Replace every queued run by one entry per claim (lock held): from now on each may be
        coalesced. A run's claim becomes the latest of its task, as it would be had it been
        queued alone, unless something of that task is queued behind it (a later claim is the
        latest; after a final claim, nothing queued before it is replaced)."""
        items = self._items
        if not any(type(item) is Run for item in items):
            return
        rebuilt: deque[Item] = deque()
        fresh: set[int] = set()
        for item in items:
            if type(item) is Run:
                entries = item.entries()
                rebuilt.extend(entries)
                fresh.update(map(id, entries))
            else:
                rebuilt.append(item)
        seen: set[tuple[str, str]] = set()
        latest = self._latest
        for item in reversed(rebuilt):
            if item.dead:
                continue
            assert type(item) is Entry  # runs are all split
            key = (item.subject, item.claim.task_id)
            if key in seen:
                continue
            seen.add(key)
            if id(item) in fresh:
                latest[key] = item
        self._items = rebuilt

    def _add(self, subject: str, claim: Claim | EncodedClaim, key: tuple[str, str]) -> None:
        """Queue an intermediate claim (lock held): the outbox's rules for one claim."""
        items, latest = self._items, self._latest
        priority = claim.priority
        older = latest.get(key)
        full = self._bounded and self._size >= self._limit
        if older is not None and (full or priority == "low"):
            # Latest wins, at the back: this beat's claims keep the sweep's priority order.
            older.dead = True
            self._dead += 1
            entry = Entry(subject, claim, False)
            items.append(entry)
            latest[key] = entry
            self.coalesced += 1
            self.coalesced_by_priority[priority or "normal"] += 1
            if self._dead >= COMPACT_AT and self._dead * 2 >= len(items):
                self._compact()
        elif full:
            self.dropped += 1
        else:
            entry = Entry(subject, claim, False)
            items.append(entry)
            latest[key] = entry
            self._size += 1

    def _put(self, subject: str, claim: Claim) -> None:
        """Queue one claim (lock held)."""
        key = (subject, claim.task_id)
        if claim.is_final:
            self._latest.pop(key, None)
            self._items.append(Entry(subject, claim, True))
            self._size += 1
        else:
            self._add(subject, claim, key)

    def _compact(self) -> None:
        """Drop replaced entries from the queue (lock held), so a long outage keeps it small."""
        self._items = deque(e for e in self._items if not e.dead)
        self._dead = 0

    def _woken(self) -> bool:
        wake = not self._wake_pending
        self._wake_pending = True
        return wake

    def put(self, subject: str, claim: Claim) -> bool:
        """Queue ``claim`` for ``subject``.

        Returns:
            True if the caller must wake the loop (the first claim since the last batch was taken).
        """
        with self._lock:
            self._put(subject, claim)
            return self._woken()

    def put_many(self, subject: str, claims: list[Claim]) -> bool:
        """Queue ``claims`` for ``subject`` in order, under one lock.

        Returns:
            True if the caller must wake the loop (as :meth:`put`).
        """
        with self._lock:
            for claim in claims:
                self._put(subject, claim)
            return self._woken()

    def put_sweep(self, subject: str, sweep: list[EncodedRun | LazyClaim]) -> bool:
        """Queue a chunk of a beat's sweep (:meth:`ClaimFactory.sweep
        <backbeat_sync.claims.ClaimFactory.sweep>`) for ``subject`` in order, under one lock:
        each encoded run as one :class:`Run` while unbounded, claim by claim while bounded.

        Returns:
            True if the caller must wake the loop (as :meth:`put`).
        """
        with self._lock:
            for part in sweep:
                if isinstance(part, EncodedRun):
                    if self._bounded:
                        for task_id, data in zip(part.task_ids, part.payloads(), strict=True):
                            self._add(subject, EncodedClaim(task_id, data), (subject, task_id))
                    else:
                        self._items.append(Run(subject, part.task_ids, part.fmt, part.args))
                        self._size += len(part.args)
                else:
                    self._put(subject, part)
            return self._woken()

    def rearm(self) -> None:
        """The loop is about to take a batch: the next ``put`` must wake it again."""
        with self._lock:
            self._wake_pending = False

    def take(self, n: int) -> list[Item]:
        """Remove and return up to ``n`` claims, oldest first (a run counts its claims; one
        longer than what is left of ``n`` is split)."""
        out: list[Item] = []
        taken = 0
        with self._lock:
            items, latest = self._items, self._latest
            while items and taken < n:
                item = items.popleft()
                if isinstance(item, Run):
                    size = len(item.args)
                    if taken + size > n:
                        size = n - taken
                        items.appendleft(item.split(size))
                    self._size -= size
                    taken += size
                    out.append(item)
                    continue
                if item.dead:
                    self._dead -= 1
                    continue
                key = (item.subject, item.claim.task_id)
                if latest.get(key) is item:
                    del latest[key]
                out.append(item)
                taken += 1
                self._size -= 1
        return out

    def put_back(self, items: Sequence[Item]) -> None:
        """Return ``items`` (taken) to the front, in their order (to be sent first)."""
        if not items:
            return
        # A run comes back as one entry per claim, none the latest of its task: as claims
        # taken one by one and put back (so a run is queued only as the sweep queued it).
        entries: list[Entry] = []
        for item in items:
            if isinstance(item, Run):
                entries.extend(item.entries())
            else:
                entries.append(item)
        with self._lock:
            self._items.extendleft(reversed(entries))
            self._size += len(entries)

    def final_entries(self) -> list[Entry]:
        """The final claims queued, oldest first (they stay queued)."""
        with self._lock:
            return [e for e in self._items if type(e) is Entry and e.final]

    def finals(self) -> int:
        """How many final claims are queued."""
        with self._lock:
            return sum(1 for e in self._items if e.final and not e.dead)
