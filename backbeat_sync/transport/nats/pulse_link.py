"""The pulse link: the NATS side of a :class:`~backbeat_sync.Pulse` (beat frames sent on time)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Coroutine
from typing import Any

from nats.aio.client import Client
from nats.aio.msg import Msg

from ..._time import SYSTEM_TIME, TimeSource
from ...config import BackbeatConfig
from ...schedule import BeatSchedule
from ..base import TransportEvent
from .link import EventReporter, NatsLink
from .options import describe_error, flush

__all__ = ["FrameSender", "PulseLink", "serve_last_beat"]


async def serve_last_beat(nc: Client, subject: str, last: Callable[[], bytes | None]) -> None:
    """Answer requests on ``subject`` with ``last()``, the latest frame as published.

    No answer while ``last()`` is None (no frame yet, or an HA standby): the
    requester times out and falls back to waiting for a beat. The subscription is
    the client's, so it comes back with every reconnect.
    """

    async def answer(msg: Msg) -> None:
        data = last()
        if data is not None and msg.reply:
            try:
                await msg.respond(data)
            except Exception:  # the connection went away: the requester falls back
                pass

    await nc.subscribe(subject, cb=answer)


class FrameSender(NatsLink):
    """A link that publishes the frames of a beat schedule: the plain pulse's and the HA leader's.

    Subclasses set the fields below in their ``__init__``.
    """

    schedule: BeatSchedule
    _sign: Callable[[Any], Any] | None
    _subject: str
    frames_sent: int
    frames_skipped: int
    send_errors: int
    #: The latest frame as published (signed if frames are), served on the last-beat subject.
    last_frame: bytes | None

    async def _send(self, index: int) -> None:
        """Publish beat ``index`` now (skipped, and counted, while not connected)."""
        nc = self._nc
        if nc is None or not self._connected or not nc.is_connected:
            self.frames_skipped += 1
            return
        try:
            frame = self.schedule.frame(index, self._time.time())
            if self._sign is not None:
                frame = self._sign(frame)
            data = frame.encode()
            await nc.publish(self._subject, data)
            self.last_frame = data
        except Exception as exc:
            self.send_errors += 1
            if self.send_errors == 1 or self.send_errors % 100 == 0:
                self._report(
                    TransportEvent.ERROR,
                    f"beat {index} not sent ({self.send_errors} so far): {describe_error(exc)}",
                )
            return
        self.frames_sent += 1


class PulseLink(FrameSender):
    """The NATS side of a :class:`~backbeat_sync.Pulse`: sends each beat of a schedule on time.

    Frames are only sent while connected: a frame that would reach agents late
    (buffered through an outage) is worse than none, so missed beats are
    skipped (counted) and the schedule carries on by the clock.

    Args:
        config: servers, subjects, auth and TLS settings.
        schedule: the beat schedule to keep.
        report: receives connection events.
        sign: optional hook that returns a signed copy of each frame.
        time_source: real time; beats are due on its monotonic clock.
        max_frames: stop beating after this many frames were published (None: no limit);
            ``finished`` is set then (the connection stays open until :meth:`stop`).
    """

    def __init__(
        self,
        config: BackbeatConfig,
        schedule: Any,
        report: EventReporter,
        *,
        sign: Callable[[Any], Any] | None = None,
        time_source: TimeSource = SYSTEM_TIME,
        max_frames: int | None = None,
    ) -> None:
        super().__init__(
            config,
            report,
            client_name=f"backbeat-pulse-{config.cluster_id}",
            thread_name="backbeat-pulse",
            time_source=time_source,
        )
        self.schedule = schedule
        self._sign = sign
        self._subject = config.beat_subject_for()
        self._changed: asyncio.Event | None = None
        self.frames_sent = 0
        self.frames_skipped = 0
        self.send_errors = 0
        self.max_frames = max_frames
        #: Set once ``max_frames`` frames were published (never without ``max_frames``).
        self.finished = threading.Event()
        #: The latest frame as published (signed if frames are), served on the last-beat subject.
        self.last_frame: bytes | None = None

    def tempo_changed(self) -> None:
        """Re-plan the next beat now (call after ``schedule.set_tempo``; any thread)."""
        changed = self._changed
        if changed is not None:
            self.call_soon(changed.set)

    async def _on_connect(self, nc: Client) -> None:
        await serve_last_beat(nc, self._config.last_beat_subject_for(), lambda: self.last_frame)

    def _background(self) -> list[Coroutine[Any, Any, None]]:
        self._changed = asyncio.Event()
        return [self._beats()]

    async def _beats(self) -> None:
        sched = self.schedule
        changed = self._changed
        assert changed is not None
        clock = self._time
        while True:
            if not self._connected:
                # Beats that fall in an outage (or before the first connection) are skipped.
                before = sched.next_index
                evt = self._connected_evt
                assert evt is not None
                await evt.wait()
                sched.skip_to(clock.monotonic() - 60.0 / sched.tempo_bpm)
                self.frames_skipped += sched.next_index - before
            now = clock.monotonic()
            sched.skip_to(now - 60.0 / sched.tempo_bpm)
            index = sched.next_index
            delay = sched.due(index) - now
            if delay > 0:
                changed.clear()
                try:
                    await asyncio.wait_for(changed.wait(), delay)
                    continue  # the tempo changed: plan again
                except asyncio.TimeoutError:
                    pass
            if sched.next_index != index:
                continue
            sched.advance()
            await self._send(index)
            if self.max_frames is not None and self.frames_sent >= self.max_frames:
                self.finished.set()
                return  # no frame after the last one, however late the caller stops us

    async def _on_stop(self, deadline: float) -> None:
        nc = self._nc
        if nc is not None and self._connected:
            remaining = deadline - asyncio.get_running_loop().time()
            try:
                await flush(nc, max(0.01, remaining))
            except Exception:
                pass
