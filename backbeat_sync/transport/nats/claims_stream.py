"""Final claims by JetStream publish: confirmed by the stream's PubAck, de-duplicated by message id.

With ``BackbeatConfig(claims_stream=NAME)`` the claim link hands each final claim
(done, failed) to :class:`StreamFinals`: it is published with ``publish_async``
(expected stream ``NAME``, header ``Nats-Msg-Id`` from
:func:`~backbeat_sync.streams.claim_msg_id`) and stays *pending* until the
stream acknowledges it. An acknowledgement takes it out of the outbox for good;
a disconnect, an error or no answer within ``flush_timeout`` puts it back at the
front of the outbox, and the resend carries the same id, so the stream's
duplicate window drops it if the first copy was stored after all.

If the stream is missing (no stream captures the subject, another one does, or
nothing acknowledges within ``flush_timeout``), that is reported once, and for
:data:`RETRY_AFTER` seconds final claims take the flush-confirmed core-NATS
path; they carry the ``Nats-Msg-Id`` header there too, so a stream that captures
the subject meanwhile still de-duplicates them.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from typing import Any, Final

import nats.errors as nats_errors
import nats.js.errors as js_errors
from nats.aio.client import Client

from ...claims import EncodedClaim, claim_msg_id
from ..base import TransportEvent
from .options import describe_error
from .outbox import Entry

__all__ = ["MSG_ID", "RETRY_AFTER", "StreamFinals"]

#: The header JetStream de-duplicates on.
MSG_ID: Final = "Nats-Msg-Id"
#: Seconds final claims go by core NATS after the stream was found missing, before trying again.
RETRY_AFTER: Final = 30.0
#: JetStream error codes that mean "not this stream": 10060 expected stream does not match.
_WRONG_STREAM: Final = frozenset({10060})


class StreamFinals:
    """The pending final claims of one claim link, published to a JetStream stream.

    Args:
        stream: the stream name (expected by every publish).
        agent_id: this agent (part of each message id).
        timeout: seconds to wait for a PubAck before sending the claim again.
        report: the link's event reporter.
        put_back: returns entries to the front of the outbox and wakes the drainer.
    """

    def __init__(
        self,
        stream: str,
        agent_id: str,
        timeout: float,
        report: Callable[[TransportEvent, str], None],
        put_back: Callable[[list[Entry]], None],
    ) -> None:
        self.stream = stream
        self._agent = agent_id
        self._timeout = timeout
        self._report = report
        self._put_back = put_back
        self.pending: deque[tuple[Entry, asyncio.Future[Any], float]] = deque()
        self._js: Any = None
        self._js_for: Client | None = None
        self._fallback_until = float("-inf")
        self._missing_reported = False
        self._event: asyncio.Event | None = None
        self.acked = 0
        self.duplicates = 0
        self.fallbacks = 0
        self.resent = 0
        #: Ids kept with spooled claims: their claim read back from a spool file no longer
        #: has the operation's start time, which the id of the first send digested.
        self.known_ids: dict[Entry, str] = {}

    def msg_id(self, entry: Entry) -> str:
        """The ``Nats-Msg-Id`` of ``entry``'s claim (a digest of the claim: the same on every
        resend; for a claim from the spool, the id it was first sent with)."""
        if self.known_ids:
            known = self.known_ids.get(entry)
            if known is not None:
                return known
        claim = entry.claim
        assert not isinstance(claim, EncodedClaim)  # a final claim (a sweep's never is)
        return claim_msg_id(self._agent, claim)

    def headers(self, entry: Entry) -> dict[str, str]:
        """Headers for a final claim sent by core NATS (the fallback path)."""
        return {MSG_ID: self.msg_id(entry)}

    def active(self) -> bool:
        """Whether final claims go by JetStream publish now (not in a fallback period)."""
        return asyncio.get_running_loop().time() >= self._fallback_until

    async def send(self, nc: Client, entry: Entry, data: bytes) -> None:
        """Publish ``entry``'s claim to the stream; it is pending until its PubAck.

        Raises:
            Exception: whatever nats-py raises when it cannot even send (the caller keeps the entry).
        """
        if self._js is None or self._js_for is not nc:
            self._js, self._js_for = nc.jetstream(timeout=self._timeout), nc
        fut = await self._js.publish_async(
            entry.subject,
            data,
            stream=self.stream,
            headers={MSG_ID: self.msg_id(entry)},
            wait_stall=None,  # no timer per publish: past the pending limit it waits for PubAcks
        )
        self.pending.append((entry, fut, asyncio.get_running_loop().time()))
        if self._event is not None:
            self._event.set()

    def disconnected(self) -> int:
        """The connection dropped: every pending claim goes back to the outbox. Returns how many."""
        entries = [e for e, fut, _ in self.pending]
        for _, fut, _ in self.pending:
            fut.cancel()
        self.pending.clear()
        if entries:
            self.resent += len(entries)
            self._put_back(entries)
        return len(entries)

    def _confirmed(self, entry: Entry, ack: Any) -> None:
        self.acked += 1
        if getattr(ack, "duplicate", False):
            self.duplicates += 1

    def _missing(self, exc: BaseException) -> bool:
        if isinstance(exc, (js_errors.NoStreamResponseError, nats_errors.NoRespondersError)):
            return True
        return isinstance(exc, js_errors.APIError) and exc.err_code in _WRONG_STREAM

    def _fall_back(self, why: str) -> None:
        self.fallbacks += 1
        self._fallback_until = asyncio.get_running_loop().time() + RETRY_AFTER
        if not self._missing_reported:
            self._missing_reported = True
            self._report(
                TransportEvent.ERROR,
                f"claims stream {self.stream!r} not found ({why}):"
                " final claims go by core NATS, confirmed by a flush"
                " (create it with `backbeat-sync streams create`)",
            )

    async def settle(self, upto: float | None = None) -> list[Entry]:
        """Take answered claims off the front of :attr:`pending`, in order.

        Waits for the oldest pending claim's answer until ``upto`` (loop time; None: its own
        deadline, ``timeout`` after it was sent). A claim the stream acknowledged is done; one
        it refused for a missing stream, or that got no answer in time, goes back to the outbox.

        Returns:
            The entries confirmed.
        """
        loop = asyncio.get_running_loop()
        confirmed: list[Entry] = []
        while self.pending:
            entry, fut, sent = self.pending[0]
            deadline = sent + self._timeout if upto is None else min(upto, sent + self._timeout)
            if not fut.done():
                await asyncio.wait({fut}, timeout=max(0.0, deadline - loop.time()))
            if not self.pending or self.pending[0][1] is not fut:
                continue  # disconnected meanwhile: the entries went back already
            if not fut.done():
                if loop.time() < sent + self._timeout:
                    return confirmed  # not answered yet, and not late
                # No answer: a slow server, or no stream at all (then a plain subscriber of the
                # subject, if any, got the message and nobody acknowledges it).
                fut.cancel()
                self.pending.popleft()
                self.resent += 1
                self._fall_back(f"no acknowledgement within {self._timeout:g} s")
                self._put_back([entry])
                continue
            self.pending.popleft()
            exc = None if fut.cancelled() else fut.exception()
            if fut.cancelled() or exc is not None:
                if exc is not None and self._missing(exc):
                    self._fall_back(describe_error(exc) or type(exc).__name__)
                else:
                    self.resent += 1
                self._put_back([entry])
                continue
            self._confirmed(entry, fut.result())
            confirmed.append(entry)
        return confirmed

    async def run(self, on_confirmed: Callable[[list[Entry]], None]) -> None:
        """The acker task: settle pending claims as answers arrive (cancelled at stop)."""
        self._event = asyncio.Event()
        while True:
            await self._event.wait()
            self._event.clear()
            while self.pending:
                done = await self.settle()
                if done:
                    on_confirmed(done)
                elif self.pending:
                    await asyncio.sleep(0.005)
