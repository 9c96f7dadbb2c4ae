"""The in-process transport: a pulse thread and a message bus, no server.

``local://`` (or ``local://NAME``) selects a process-wide :class:`LocalBus`
named ``NAME`` (empty by default). The first integration on a bus and cluster
starts that cluster's pulse at its configured tempo; later ones follow it,
as agents follow a real pulse (one configured with another tempo is told so,
as a warning through its logger). ``local://NAME?pulse=manual`` starts no pulse:
the caller publishes frames with :meth:`LocalBus.publish` (tests do this).

Claims are delivered synchronously to in-process subscribers (the monitor,
tests) and encoded only when somebody subscribes to their subject.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import ClassVar
from urllib.parse import parse_qs, urlsplit

from .._logging import library_logger as logger
from .._time import SYSTEM_TIME, TimeSource
from ..claims import Claim
from ..config import BackbeatConfig
from ..protocol import BeatFrame
from ..schedule import BeatSchedule, PulseThread, wall_clock_start_index
from .base import ClaimEncoder, Transport, TransportEvent, TransportSink, subject_matches

__all__ = ["LocalBus", "LocalTransport"]

Handler = Callable[[str, bytes], None]


class _SharedPulse:
    def __init__(self, thread: PulseThread) -> None:
        self.thread = thread
        self.users = 0
        self.last_frame: bytes | None = None
        self.unserve: Callable[[], None] = lambda: None


class LocalBus:
    """A process-wide, in-memory stand-in for a NATS server.

    Get one with :meth:`named`; subscribe with NATS wildcards; publish bytes.
    """

    _buses: ClassVar[dict[str, LocalBus]] = {}
    _buses_lock: ClassVar[threading.Lock] = threading.Lock()

    def __init__(self, name: str) -> None:
        self.name = name
        self._lock = threading.Lock()
        self._subs: tuple[tuple[int, str, Handler], ...] = ()
        self._matches: dict[str, bool] = {}  # has_subscribers() per subject, for the current _subs
        self._next_id = 0
        self._pulses: dict[str, _SharedPulse] = {}
        self._watchers: tuple[Callable[[], None], ...] = ()
        self._responders: dict[str, tuple[Callable[[], bytes | None], ...]] = {}

    @classmethod
    def named(cls, name: str = "") -> LocalBus:
        """The bus called ``name`` (created on first use)."""
        with cls._buses_lock:
            bus = cls._buses.get(name)
            if bus is None:
                bus = cls._buses[name] = LocalBus(name)
            return bus

    @classmethod
    def reset_after_fork(cls) -> None:
        """Fork child: forget the parent's buses (their subscribers and pulse threads are the
        parent's); a bus named again is a new one. Called by ``backbeat_sync._runtime``."""
        cls._buses = {}
        cls._buses_lock = threading.Lock()

    def subscribe(self, pattern: str, handler: Handler) -> Callable[[], None]:
        """Call ``handler(subject, data)`` for each message matching ``pattern``.

        Returns:
            A function that unsubscribes.
        """
        with self._lock:
            sid = self._next_id
            self._next_id += 1
            self._subs = (*self._subs, (sid, pattern, handler))
            self._matches = {}
        self._changed()

        def unsubscribe() -> None:
            with self._lock:
                self._subs = tuple(s for s in self._subs if s[0] != sid)
                self._matches = {}
            self._changed()

        return unsubscribe

    def watch(self, callback: Callable[[], None]) -> Callable[[], None]:
        """Call ``callback()`` after every subscription change (outside the bus lock).

        Returns:
            A function that stops watching.
        """
        with self._lock:
            self._watchers = (*self._watchers, callback)

        def unwatch() -> None:
            with self._lock:
                self._watchers = tuple(w for w in self._watchers if w is not callback)

        return unwatch

    def _changed(self) -> None:
        for callback in self._watchers:
            try:
                callback()
            except Exception:
                logger.opt(exception=True).warning("local bus watcher raised")

    def has_subscribers(self, subject: str) -> bool:
        """Whether any subscription matches ``subject`` (cached per subject until subscriptions change)."""
        cache = self._matches  # read before _subs: a change replaces _subs, then the cache
        hit = cache.get(subject)
        if hit is None:
            hit = any(subject_matches(p, subject) for _, p, _ in self._subs)
            if len(cache) < 4096:
                cache[subject] = hit
        return hit

    def publish(self, subject: str, data: bytes) -> int:
        """Deliver ``data`` to every matching subscriber, synchronously. Returns how many got it.

        A subscriber that raises is logged and skipped; the others still get the message.
        """
        delivered = 0
        for _, pattern, handler in self._subs:
            if subject_matches(pattern, subject):
                try:
                    handler(subject, data)
                except Exception:
                    logger.opt(exception=True).warning(
                        "local bus subscriber raised on {subject}", subject=subject
                    )
                delivered += 1
        return delivered

    def serve(self, subject: str, answer: Callable[[], bytes | None]) -> Callable[[], None]:
        """Answer :meth:`request` on ``subject`` with ``answer()`` (None: no answer). Returns
        a function that stops answering."""
        with self._lock:
            self._responders[subject] = (*self._responders.get(subject, ()), answer)

        def unserve() -> None:
            with self._lock:
                left = tuple(a for a in self._responders.get(subject, ()) if a is not answer)
                if left:
                    self._responders[subject] = left
                else:
                    self._responders.pop(subject, None)

        return unserve

    def request(self, subject: str) -> bytes | None:
        """The first answer of a responder on ``subject`` (exact subject), or None."""
        for answer in self._responders.get(subject, ()):
            try:
                data = answer()
            except Exception:
                logger.opt(exception=True).warning("local bus responder raised on {subject}", subject=subject)
                continue
            if data is not None:
                return data
        return None

    def acquire_pulse(self, config: BackbeatConfig, time_source: TimeSource) -> str | None:
        """Start the pulse for ``config``'s cluster if none runs; count one more user.

        Returns:
            A warning if the pulse already runs at another tempo than ``config.tempo_bpm``
            (the caller follows the running pulse, as an agent follows a NATS pulse), else None.
        """
        warning = None
        subject = config.beat_subject_for()
        created: _SharedPulse | None = None
        with self._lock:
            shared = self._pulses.get(subject)
            if shared is None:
                now = time_source.monotonic()
                schedule = BeatSchedule(
                    cluster_id=config.cluster_id,
                    tempo_bpm=config.tempo_bpm,
                    bar_length=config.bar_length,
                    start_index=wall_clock_start_index(config.tempo_bpm, time_source.time()),
                    start_time=now,
                )

                def send(frame: BeatFrame, subject: str = subject) -> None:
                    data = frame.encode()
                    self.publish(subject, data)
                    made.last_frame = data

                thread = PulseThread(schedule, send, time_source=time_source)
                made = shared = self._pulses[subject] = _SharedPulse(thread)
                thread.start()
                created = made
            elif shared.thread.schedule.tempo_bpm != config.tempo_bpm:
                warning = (
                    f"local pulse for {subject} on bus {self.name!r} already runs at"
                    f" {shared.thread.schedule.tempo_bpm:g} BPM, not the configured"
                    f" tempo_bpm={config.tempo_bpm:g}; following the running pulse"
                )
            shared.users += 1
        if created is not None:  # it answers "the last beat?" as a NATS pulse does
            pulse = created
            pulse.unserve = self.serve(config.last_beat_subject_for(), lambda: pulse.last_frame)
        return warning

    def release_pulse(self, config: BackbeatConfig) -> None:
        """One user fewer; the last one stops the pulse."""
        subject = config.beat_subject_for()
        with self._lock:
            shared = self._pulses.get(subject)
            if shared is None:
                return
            shared.users -= 1
            if shared.users > 0:
                return
            del self._pulses[subject]
        shared.unserve()
        shared.thread.stop()

    def pulse_schedule(self, subject: str) -> BeatSchedule | None:
        """The schedule of the pulse running for ``subject``, if any (to change its tempo)."""
        shared = self._pulses.get(subject)
        return shared.thread.schedule if shared else None


class LocalTransport(Transport):
    """Frames from the in-process pulse; claims to in-process subscribers.

    Args:
        config: the integration's config (``nats_url`` is ``local://...``).
        encoder: turns a claim into wire bytes.
        time_source: for the pulse (real time in practice).
    """

    def __init__(
        self, config: BackbeatConfig, encoder: ClaimEncoder, time_source: TimeSource = SYSTEM_TIME
    ) -> None:
        url = urlsplit(config.nats_url.strip())
        self._config = config
        self._encoder = encoder
        self._time = time_source
        self.bus = LocalBus.named(url.netloc + url.path.strip("/"))
        self._manual = parse_qs(url.query).get("pulse", [""])[0] == "manual"
        self._unsubscribe: Callable[[], None] | None = None
        self._unwatch: Callable[[], None] | None = None
        self._connected = False
        #: Claims delivered to bus subscribers. Every caller holds the integration's registry
        #: lock (claims are only ever queued under it), so the counter needs no lock of its own.
        self._published = 0

    def start(self, sink: TransportSink) -> None:
        """Subscribe to the beat subject and join (or start) the cluster's pulse."""
        clock = self._time

        def on_frame(subject: str, data: bytes) -> None:
            sink.frame_received(data, clock.monotonic())

        self._unsubscribe = self.bus.subscribe(self._config.beat_subject_for(), on_frame)
        self._unwatch = self.bus.watch(sink.audience_changed)
        warning = None if self._manual else self.bus.acquire_pulse(self._config, self._time)
        self._connected = True
        sink.transport_event(TransportEvent.CONNECTED, f"local bus {self.bus.name!r}")
        if warning is not None:
            sink.transport_event(TransportEvent.WARNING, warning)

    def publish(self, subject: str, claim: Claim) -> None:
        """Deliver the claim to in-process subscribers of ``subject`` (if any)."""
        if self.bus.has_subscribers(subject):
            self._published += 1
            self.bus.publish(subject, self._encoder(claim))

    def delivers(self, subject: str) -> bool:
        """Whether anyone on the bus subscribes to ``subject`` now."""
        return self.bus.has_subscribers(subject)

    def stop(self, flush_timeout: float) -> None:
        """Leave the pulse and the bus. Idempotent."""
        if not self._connected:
            return
        self._connected = False
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None
        if self._unwatch is not None:
            self._unwatch()
            self._unwatch = None
        if not self._manual:
            self.bus.release_pulse(self._config)

    @property
    def connected(self) -> bool:
        """True between start() and stop()."""
        return self._connected

    def stats(self) -> dict[str, int]:
        """Claims delivered to bus subscribers; nothing is ever queued or dropped here."""
        return {
            "claims_published": self._published,
            "claims_dropped": 0,
            "claims_coalesced": 0,
            "claims_queued": 0,
        }
