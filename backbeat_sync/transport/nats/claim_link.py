"""The claim link: the transport's connection (beat subscription, claim batches, confirmation of finals).

Delivery of final claims: core NATS is fire-and-forget, so bytes written just
before a server dies are lost. A final claim (``done``/``failed``) therefore
stays *in flight* after it is published until a flush round-trip (PING/PONG)
on the same connection confirms that the server has read it. When the
connection drops, every unconfirmed final claim goes back to the front of the
outbox and is sent again after the reconnect. A repeated final claim is
harmless (consumers key claims by task); a missing one is not.

With ``config.claims_stream`` set, final claims go by JetStream publish instead
and are confirmed by the stream's PubAck (see :mod:`.claims_stream`).
"""

from __future__ import annotations

import asyncio
import threading
from collections import deque
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, Final

import nats.errors as nats_errors
from nats.aio.client import Client
from nats.aio.msg import Msg

from ..._time import TimeSource
from ...claims import Claim, EncodedClaim, claim_msg_id, resolve
from ...config import BackbeatConfig
from ...protocol import MAX_MESSAGE_BYTES, TRUNCATED, shorten_notes
from ..base import ClaimEncoder, TransportEvent, TransportSink
from .claims_stream import StreamFinals
from .link import NatsLink
from .options import describe_error, flush
from .outbox import Entry, Outbox, Run
from .spool import Spool, Spooled

__all__ = ["BATCH_SIZE", "CONFIRM_SETTLE", "ClaimLink"]

#: Claims taken from the outbox per batch before the loop lets frames through.
BATCH_SIZE: Final = 512
#: Beat-subject messages nats-py may hold for our callback before it reports a slow consumer.
PENDING_MSGS_LIMIT: Final = 65_536
#: Bytes nats-py may hold for our callback (a flood of 64 KiB frames cannot eat the heap).
PENDING_BYTES_LIMIT: Final = 64 * 1024 * 1024
#: A final claim counts as confirmed by a PONG only if the connection was still up this long
#: after it went out. A PONG proves the server read the message, not that what the server
#: feeds from it (a JetStream stream, a route) has it: a server shutting down answers PINGs
#: for a moment after it stopped storing. A claim whose connection dies within this window
#: is sent again after the reconnect.
CONFIRM_SETTLE: Final = 0.1


class ClaimLink(NatsLink):
    """The transport's link: beat subscription, claim batches, confirmation of finals."""

    def __init__(
        self,
        config: BackbeatConfig,
        encoder: ClaimEncoder,
        time_source: TimeSource,
        sink: TransportSink,
        spool: Spool | None = None,
    ) -> None:
        super().__init__(config, sink.transport_event, client_name=config.agent_id, time_source=time_source)
        self._spool = spool
        #: Entries read from spool files, until each is confirmed; then the files go.
        self._from_spool: set[Entry] = set()
        self._spool_files: list[Path] = []
        self.spooled = 0
        self.unspooled = 0
        self._encoder = encoder
        self._sink = sink
        self.outbox = Outbox(config.outbox_limit)
        self.inflight: deque[Entry] = deque()
        self._wake: asyncio.Event | None = None
        self._confirm: asyncio.Event | None = None
        self._flush_task: asyncio.Task[None] | None = None
        self.published = 0
        #: Claims given up on; any thread adds (count_lost), under _lost_lock.
        self.lost = 0
        self._lost_lock = threading.Lock()
        self.resent = 0
        self.confirmed = 0
        self.truncated = 0
        self.frames = 0
        self._seq = 0
        self.slow_consumer_drops = 0
        self.publish_errors = 0
        self.stream: StreamFinals | None = None
        if config.claims_stream is not None:
            self.stream = StreamFinals(
                config.claims_stream, config.agent_id, config.flush_timeout, self._report, self._return
            )

    def _return(self, entries: list[Entry]) -> None:
        """Entries the claims stream did not confirm go back to the front of the outbox (loop thread)."""
        self.outbox.put_back(entries)
        if self._wake is not None:
            self._wake.set()

    def _stream_confirmed(self, entries: list[Entry]) -> None:
        self.published += len(entries)
        self.confirmed += len(entries)
        if self._from_spool:
            for entry in entries:
                self._spool_settled(entry)

    def adopt_spooled(self, claims: list[Spooled], files: list[Path]) -> None:
        """Queue final claims read from ``files`` first; remove the files once all are confirmed.

        Each keeps the ``Nats-Msg-Id`` it was first sent with (a claims stream then stores
        it once, whether or not its first copy got there). Call before :meth:`start`.
        """
        entries = []
        for subject, claim, msg_id in claims:
            if not claim.is_final:
                continue
            entry = Entry(subject, claim, True)
            entries.append(entry)
            if msg_id is not None and self.stream is not None:
                self.stream.known_ids[entry] = msg_id
        self.outbox.put_back(entries)
        self.unspooled += len(entries)
        self._from_spool.update(entries)
        self._spool_files = list(files)
        if not entries:
            self._drop_spool_files()

    def _spool_settled(self, entry: Entry) -> None:
        """``entry`` is confirmed (or can never be sent): with none from the spool left, remove the files."""
        self._from_spool.discard(entry)
        if self.stream is not None:
            self.stream.known_ids.pop(entry, None)
        if not self._from_spool:
            self._drop_spool_files()

    def _msg_id(self, entry: Entry) -> str:
        """The ``Nats-Msg-Id`` ``entry``'s claim is (or would be) sent with, kept in the spool."""
        if self.stream is not None:
            return self.stream.msg_id(entry)
        claim = entry.claim
        assert not isinstance(claim, EncodedClaim)  # a final claim (a sweep's never is)
        return claim_msg_id(self._config.agent_id, claim)

    def _drop_spool_files(self) -> None:
        files, self._spool_files = self._spool_files, []
        for problem in Spool.remove(files):
            self._report(TransportEvent.ERROR, problem)

    def count_lost(self, n: int) -> None:
        """Count ``n`` claims given up on (application threads and the loop both do)."""
        with self._lost_lock:
            self.lost += n

    def wake(self) -> None:
        """Wake the drainer (from any thread)."""
        wake = self._wake
        if wake is not None:
            self.call_soon(wake.set)

    def _background(self) -> list[Coroutine[Any, Any, None]]:
        self._wake = asyncio.Event()
        self._confirm = asyncio.Event()
        if len(self.outbox):
            self._wake.set()
        tasks = [self._drainer(), self._confirmer()]
        if self.stream is not None:
            tasks.append(self.stream.run(self._stream_confirmed))
        return tasks

    async def _on_connect(self, nc: Client) -> None:
        await nc.subscribe(
            self._config.beat_subject_for(),
            cb=self._on_frame,
            pending_msgs_limit=PENDING_MSGS_LIMIT,
            pending_bytes_limit=PENDING_BYTES_LIMIT,
        )
        try:
            await flush(nc, self._config.flush_timeout)  # the server has our SUB
        except Exception:
            pass
        self.outbox.bounded = False
        if self._wake is not None:
            self._wake.set()

    async def _on_frame(self, msg: Msg) -> None:
        self.frames += 1
        self._sink.frame_received(msg.data, self._time.monotonic())

    def _on_slow_consumer(self) -> None:
        self.slow_consumer_drops += 1
        if self.slow_consumer_drops == 1 or self.slow_consumer_drops % 10_000 == 0:
            self._report(
                TransportEvent.ERROR,
                f"beat subscription fell behind: {self.slow_consumer_drops} message(s) dropped",
            )

    def _on_disconnect(self) -> None:
        self.outbox.bounded = True
        if self._flush_task is not None and not self._flush_task.done():
            self._flush_task.cancel()
        if self.inflight:
            self.resent += len(self.inflight)
            self.outbox.put_back(list(self.inflight))
            self.inflight.clear()
        if self.stream is not None:
            self.stream.disconnected()

    def _on_reconnect(self) -> None:
        self.outbox.bounded = False
        if self._wake is not None:
            self._wake.set()

    async def _drainer(self) -> None:
        assert self._wake is not None
        while True:
            await self._wake.wait()
            self._wake.clear()
            self.outbox.rearm()
            await self._send_queued()

    async def _send_queued(self) -> None:
        """Publish queued claims in batches while connected."""
        nc = self._nc
        assert self._confirm is not None
        stream = self.stream
        while nc is not None and self._connected and nc.is_connected:
            batch = self.outbox.take(BATCH_SIZE)
            if not batch:
                return
            finals = False
            # The server's INFO sets max_payload (nats-py reads it on every connect);
            # receivers reject a message over 64 KiB unread (PROTOCOL.md).
            limit = min(nc.max_payload, MAX_MESSAGE_BYTES)
            for i, entry in enumerate(batch):
                if type(entry) is Run:
                    rest = await self._send_run(nc, entry, limit)
                    if rest is not None:  # not connected after all: keep the rest for the reconnect
                        self.publish_errors += 1
                        self.outbox.put_back([rest, *batch[i + 1 :]])
                        if finals:
                            self._confirm.set()
                        return
                    continue
                assert type(entry) is Entry
                try:
                    claim = entry.claim
                    data = claim.data if isinstance(claim, EncodedClaim) else self._encoder(claim)
                    if len(data) > limit:
                        data = self._fit(claim, data, limit)
                except Exception as exc:
                    self.count_lost(1)
                    self._report(TransportEvent.ERROR, f"cannot encode claim {entry.claim.task_id}: {exc}")
                    if self._from_spool:
                        self._spool_settled(entry)
                    continue
                headers = None
                if entry.final and stream is not None:
                    if stream.active():
                        try:
                            await stream.send(nc, entry, data)
                        except (nats_errors.MaxPayloadError, nats_errors.BadSubjectError) as exc:
                            self.lost += 1
                            self._report(
                                TransportEvent.ERROR,
                                f"claim {entry.claim.task_id} refused: {describe_error(exc)}",
                            )
                            if self._from_spool:
                                self._spool_settled(entry)
                            continue
                        except Exception:
                            self.publish_errors += 1
                            self.outbox.put_back(batch[i:])
                            if finals:
                                self._confirm.set()
                            return
                        continue
                    headers = stream.headers(entry)  # a capturing stream still de-duplicates
                try:
                    await nc.publish(entry.subject, data, headers=headers)
                except (nats_errors.MaxPayloadError, nats_errors.BadSubjectError) as exc:
                    self.count_lost(1)
                    self._report(
                        TransportEvent.ERROR,
                        f"claim {entry.claim.task_id} refused: {describe_error(exc)}",
                    )
                    continue
                except Exception:
                    # Not connected after all: keep the rest for the reconnect.
                    self.publish_errors += 1
                    self.outbox.put_back(batch[i:])
                    if finals:
                        self._confirm.set()
                    return
                if entry.final:
                    self._seq += 1
                    entry.seq = self._seq
                    entry.sent = asyncio.get_running_loop().time()
                    self.inflight.append(entry)
                    finals = True
                else:
                    self.published += 1
            if finals:
                self._confirm.set()
            await asyncio.sleep(0)  # let beat frames through between batches

    async def _send_run(self, nc: Client, run: Run, limit: int) -> Run | None:
        """Publish a run of a sweep's claims in a tight loop.

        The per-beat hot path: the claims' bytes made at once (one %-format each), then one
        ``nc.publish`` a claim and nothing else, the batch (at most BATCH_SIZE claims) between
        two yields of the loop, as :meth:`_send_queued`. A claim over ``limit`` is cut to
        fit, one refused by the server's rules counted lost and reported, as there.

        Returns:
            None when all went out (or were refused); else a run of the claims not sent
            (the connection went away).
        """
        ids, payloads = run.task_ids, run.payloads()
        if max(map(len, payloads), default=0) > limit:
            ids, payloads = self._fit_run(ids, payloads, limit)
        subject, pub = run.subject, nc.publish
        n, j, lost = len(payloads), 0, 0
        try:
            while j < n:
                try:
                    while j < n:
                        await pub(subject, payloads[j])
                        j += 1
                except (nats_errors.MaxPayloadError, nats_errors.BadSubjectError) as exc:
                    self.count_lost(1)
                    self._report(TransportEvent.ERROR, f"claim {ids[j]} refused: {describe_error(exc)}")
                    lost += 1
                    j += 1
        except Exception:
            self.published += j - lost
            return Run.made(subject, ids[j:], payloads[j:])
        self.published += n - lost
        return None

    def _fit_run(self, ids: list[str], payloads: list[bytes], limit: int) -> tuple[list[str], list[bytes]]:
        """The claims of a run with each over ``limit`` bytes cut to fit (:meth:`_fit`), or left
        out, counted lost and reported if it cannot be."""
        kept: list[str] = []
        fitted: list[bytes] = []
        for task_id, data in zip(ids, payloads, strict=True):
            if len(data) > limit:
                try:
                    data = self._fit(EncodedClaim(task_id, data), data, limit)
                except Exception as exc:
                    self.count_lost(1)
                    self._report(TransportEvent.ERROR, f"cannot encode claim {task_id}: {exc}")
                    continue
            kept.append(task_id)
            fitted.append(data)
        return kept, fitted

    def _fit(self, claim: Claim | EncodedClaim, data: bytes, limit: int) -> bytes:
        """The encoding of ``claim`` with its notes truncated (marked) so it is at most ``limit`` bytes.

        Raises:
            ValueError: even empty notes would not make it fit (ids and type are at
                most 256 bytes each, so only a server with a tiny max_payload gets here).
        """
        shorter = shorten_notes(resolve(claim), len(data) - limit)
        fitted = self._encoder(shorter) if shorter is not None else data
        if len(fitted) > limit:
            raise ValueError(f"{len(data)} bytes do not fit the server's limit of {limit} even without notes")
        self.truncated += 1
        if self.truncated == 1 or self.truncated % 1000 == 0:
            self._report(
                TransportEvent.ERROR,
                f"claim {claim.task_id} of {len(data)} bytes truncated to fit the server's limit of"
                f" {limit} bytes ({self.truncated} so far; notes end in {TRUNCATED.strip()!r})",
            )
        return fitted

    async def _confirmer(self) -> None:
        """Confirm in-flight final claims with one flush round-trip at a time."""
        assert self._confirm is not None
        loop = asyncio.get_running_loop()
        while True:
            await self._confirm.wait()
            self._confirm.clear()
            while self.inflight and self._connected:
                wait = self.inflight[0].sent + CONFIRM_SETTLE - loop.time()
                if wait > 0:
                    await asyncio.sleep(wait)
                    continue  # the connection may have dropped meanwhile
                if not await self._confirm_once(self._config.flush_timeout, settle=CONFIRM_SETTLE):
                    await asyncio.sleep(CONFIRM_SETTLE)  # a failed flush: try again shortly

    async def _confirm_once(self, timeout: float, *, settle: float = 0.0) -> bool:
        """One PING/PONG; on the PONG, confirm the final claims sent ``settle`` s or more before the PING.

        Returns:
            True if the round-trip succeeded on the same connection.
        """
        nc = self._nc
        if not self.inflight or nc is None or not self._connected:
            return not self.inflight
        loop = asyncio.get_running_loop()
        generation, upto, cutoff = self._generation, self._seq, loop.time() - settle
        task = asyncio.ensure_future(flush(nc, max(timeout, 0.01)))
        self._flush_task = task
        await asyncio.wait({task})
        if self._flush_task is task:
            self._flush_task = None
        if task.cancelled() or task.exception() is not None or generation != self._generation:
            return False
        inflight = self.inflight
        while inflight and inflight[0].seq <= upto and inflight[0].sent <= cutoff:
            entry = inflight.popleft()
            self.published += 1
            self.confirmed += 1
            if self._from_spool:
                self._spool_settled(entry)
        return True

    async def _on_stop(self, deadline: float) -> None:
        loop = asyncio.get_running_loop()
        stream = self.stream

        def acking() -> int:
            return len(stream.pending) if stream is not None else 0

        while len(self.outbox) or self.inflight or acking():
            if not await self._wait_connected(deadline):
                break
            await self._send_queued()
            if self._flush_task is not None:
                await asyncio.wait({self._flush_task}, timeout=max(0.0, deadline - loop.time()))
            await self._confirm_once(max(0.01, deadline - loop.time()))
            if loop.time() >= deadline:
                break
            if len(self.outbox) and not self._connected:
                continue
            if len(self.outbox) or self.inflight or acking():
                await asyncio.sleep(0.01)
        left = len(self.outbox) + len(self.inflight) + acking()
        if left:
            finals = self.outbox.finals() + len(self.inflight) + acking()
            kept, where = self._spool_at_stop()
            self.count_lost(left - kept)
            self._report(
                TransportEvent.ERROR,
                f"stop: {left} claim(s) ({finals} final) not confirmed by NATS within the flush timeout"
                + where,
            )

    def _spool_at_stop(self) -> tuple[int, str]:
        """Write the unconfirmed final claims to a new spool file (with a spool configured).

        Returns:
            How many were written, and the end of the stop line that says where (or why not).
        """
        if self._spool is None:
            return 0, ""
        pending = [e for e, _, _ in self.stream.pending] if self.stream is not None else []
        entries = list(self.inflight) + pending + self.outbox.final_entries()
        if not entries:
            return 0, ""
        try:
            path = self._spool.write([(e.subject, resolve(e.claim), self._msg_id(e)) for e in entries])
        except Exception as exc:  # a full disk must not break stop()
            return 0, f"; not spooled: {exc}"
        self.spooled += len(entries)
        # What the old files held and is not confirmed is in the new file.
        self._from_spool.clear()
        self._drop_spool_files()
        return len(entries), (
            f"; {len(entries)} final claim(s) spooled to {path} for the next integration"
            f" of agent {self._config.agent_id}"
        )
