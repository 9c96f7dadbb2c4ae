"""The outbox: a thread-safe, bounded queue of claims between application threads and the loop."""

from __future__ import annotations

import threading
from collections import deque
from typing import Final

from ...claims import Claim
from ...errors import ConfigError

__all__ = ["Entry", "Outbox"]


#: Claim priorities (``StatusClaim.priority``; None is normal).
PRIORITIES: Final = ("critical", "high", "normal", "low")
#: Coalesced entries left in the queue (skipped when taken) before it is compacted.
COMPACT_AT: Final = 1024


class Entry:
    __slots__ = ("claim", "dead", "final", "sent", "seq", "subject")

    def __init__(self, subject: str, claim: Claim, final: bool) -> None:
        self.subject = subject
        self.claim = claim
        self.final = final
        self.dead = False  # replaced by a newer claim queued behind it (skipped when taken)
        self.seq = 0  # publish sequence number, set when it goes on the wire
        self.sent = 0.0  # loop time it went on the wire


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
        self._items: deque[Entry] = deque()
        self._latest: dict[tuple[str, str], Entry] = {}
        self._wake_pending = False
        #: Apply ``limit`` (True while disconnected; the link clears it while connected).
        self.bounded = True
        self.dropped = 0
        self.coalesced = 0
        #: Claims coalesced, by the priority of the claim that replaced the older one.
        self.coalesced_by_priority: dict[str, int] = dict.fromkeys(PRIORITIES, 0)
        self._dead = 0  # replaced entries still in _items

    def __len__(self) -> int:
        return len(self._items) - self._dead

    def _add(self, subject: str, claim: Claim, key: tuple[str, str]) -> None:
        """Queue an intermediate claim (lock held): the outbox's rules for one claim."""
        items, latest = self._items, self._latest
        priority = claim.priority
        older = latest.get(key)
        full = self.bounded and len(items) - self._dead >= self._limit
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

    def _compact(self) -> None:
        """Drop replaced entries from the queue (lock held), so a long outage keeps it small."""
        self._items = deque(e for e in self._items if not e.dead)
        self._dead = 0

    def put(self, subject: str, claim: Claim) -> bool:
        """Queue ``claim`` for ``subject``.

        Returns:
            True if the caller must wake the loop (the first claim since the last batch was taken).
        """
        key = (subject, claim.task_id)
        final = claim.is_final
        with self._lock:
            if final:
                self._latest.pop(key, None)
                self._items.append(Entry(subject, claim, True))
            else:
                self._add(subject, claim, key)
            wake = not self._wake_pending
            self._wake_pending = True
            return wake

    def put_many(self, subject: str, claims: list[Claim]) -> bool:
        """Queue ``claims`` for ``subject`` in order, under one lock (one beat's claims).

        Returns:
            True if the caller must wake the loop (as :meth:`put`).
        """
        with self._lock:
            latest = self._latest
            for claim in claims:
                key = (subject, claim.task_id)
                if claim.is_final:
                    latest.pop(key, None)
                    self._items.append(Entry(subject, claim, True))
                else:
                    self._add(subject, claim, key)
            wake = not self._wake_pending
            self._wake_pending = True
            return wake

    def rearm(self) -> None:
        """The loop is about to take a batch: the next ``put`` must wake it again."""
        with self._lock:
            self._wake_pending = False

    def take(self, n: int) -> list[Entry]:
        """Remove and return up to ``n`` claims, oldest first."""
        out: list[Entry] = []
        with self._lock:
            items, latest = self._items, self._latest
            while items and len(out) < n:
                entry = items.popleft()
                if entry.dead:
                    self._dead -= 1
                    continue
                key = (entry.subject, entry.claim.task_id)
                if latest.get(key) is entry:
                    del latest[key]
                out.append(entry)
        return out

    def put_back(self, entries: list[Entry]) -> None:
        """Return ``entries`` to the front, in their order (to be sent first)."""
        if not entries:
            return
        with self._lock:
            self._items.extendleft(reversed(entries))

    def final_entries(self) -> list[Entry]:
        """The final claims queued, oldest first (they stay queued)."""
        with self._lock:
            return [e for e in self._items if e.final]

    def finals(self) -> int:
        """How many final claims are queued."""
        with self._lock:
            return sum(1 for e in self._items if e.final and not e.dead)
