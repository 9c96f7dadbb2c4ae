"""The outbox: a thread-safe, bounded queue of claims between application threads and the loop."""

from __future__ import annotations

import threading
from collections import deque

from ...claims import Claim
from ...errors import ConfigError

__all__ = ["Entry", "Outbox"]


class Entry:
    __slots__ = ("claim", "final", "sent", "seq", "subject")

    def __init__(self, subject: str, claim: Claim, final: bool) -> None:
        self.subject = subject
        self.claim = claim
        self.final = final
        self.seq = 0  # publish sequence number, set when it goes on the wire
        self.sent = 0.0  # loop time it went on the wire


class Outbox:
    """Thread-safe, bounded queue of claims waiting for the loop.

    Below ``limit`` every claim is kept in order. At or past it, an
    intermediate claim replaces the queued intermediate claim of the same
    subject and task (latest wins, :attr:`coalesced`); with none to replace it
    is dropped (:attr:`dropped`). A final claim is always kept. The bound
    holds while :attr:`bounded` is true; the link clears it while connected,
    when the loop is draining the outbox anyway (one beat of 100,000 active
    operations queues 100,000 claims at once, and none of them may be lost).

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

    def __len__(self) -> int:
        return len(self._items)

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
            elif self.bounded and len(self._items) >= self._limit:
                slot = self._latest.get(key)
                if slot is not None:
                    slot.claim = claim
                    self.coalesced += 1
                else:
                    self.dropped += 1
            else:
                entry = Entry(subject, claim, False)
                self._items.append(entry)
                self._latest[key] = entry
            wake = not self._wake_pending
            self._wake_pending = True
            return wake

    def put_many(self, subject: str, claims: list[Claim]) -> bool:
        """Queue ``claims`` for ``subject`` in order, under one lock (one beat's claims).

        Returns:
            True if the caller must wake the loop (as :meth:`put`).
        """
        with self._lock:
            items, latest = self._items, self._latest
            for claim in claims:
                key = (subject, claim.task_id)
                if claim.is_final:
                    latest.pop(key, None)
                    items.append(Entry(subject, claim, True))
                elif self.bounded and len(items) >= self._limit:
                    slot = latest.get(key)
                    if slot is not None:
                        slot.claim = claim
                        self.coalesced += 1
                    else:
                        self.dropped += 1
                else:
                    entry = Entry(subject, claim, False)
                    items.append(entry)
                    latest[key] = entry
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
            return sum(1 for e in self._items if e.final)
