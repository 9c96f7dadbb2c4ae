"""The :class:`Pulse`: the cluster's metronome, on NATS (or on an in-process bus).

The schedule it keeps (drift-free) is :mod:`backbeat_sync.schedule`, which the
in-process transport uses too; ``BeatSchedule``, ``PulseThread`` and
``wall_clock_start_index`` are re-exported here.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable
from types import TracebackType
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from ._logging import library_logger as logger
from ._time import SYSTEM_TIME, TimeSource
from .config import BackbeatConfig
from .errors import ConfigError, PulseAlreadyStarted
from .protocol import BeatFrame
from .schedule import BeatSchedule, PulseThread, check_max_frames, check_tempo, wall_clock_start_index
from .transport.local import LocalBus

if TYPE_CHECKING:
    from .ha import HaPulseLink
    from .transport.base import TransportEvent
    from .transport.nats import PulseLink

__all__ = ["BeatSchedule", "Pulse", "PulseThread", "wall_clock_start_index"]

#: Turns a frame into a signed copy of it (``sig`` and ``key_id`` set); see PROTOCOL.md.
FrameSigner = Callable[[BeatFrame], BeatFrame]


class Pulse:
    """The cluster's metronome: publishes a :class:`BeatFrame` on NATS at a tempo and bar length.

    Beat ``k`` is due at a computed time (drift-free, see :class:`BeatSchedule`);
    ``window_id`` is ``w-{k // bar_length}``, ``downbeat`` is ``k % bar_length == 0``,
    ``sent_at`` is the wall time of sending and ``deadline_at`` when the next beat is
    due, as PROTOCOL.md says. The pulse runs on its own event-loop thread
    (``backbeat-pulse``); frames are sent only while connected (beats that fall in
    an outage are skipped and counted, never sent late). With ``nats_url="local://..."``
    it drives the in-process bus instead.

    With ``ha=True`` (NATS with JetStream only), run the pulse on several machines:
    one replica at a time leads and publishes, by a lease in a JetStream key-value
    bucket; the beat grid and tempo live in the bucket, so a new leader continues the
    sequence where the old one stopped (see ``docs/ha.md`` and :mod:`backbeat_sync.ha`).

    Args:
        config: servers, cluster id, beat subject, auth and TLS (and default tempo/bar length).
        tempo_bpm: beats per minute (default ``config.tempo_bpm``), 0 < x <= 6000.
        bar_length: beats per bar (default ``config.bar_length``).
        start_index: index of the first beat (default: beats at this tempo since the
            Unix epoch, so a restarted pulse never goes back).
        sign: optional hook returning a signed copy of each frame (see "Signed messages").
        time_source: where time is read.
        ha: lead by a lease in a JetStream key-value bucket (several replicas, one publishes).
            ``tempo_bpm``, ``bar_length`` and ``start_index`` then only seed a bucket that
            holds no beat grid yet.
        bucket: with ``ha``: the key-value bucket (created if missing).
        lease_ttl: with ``ha``: the lease TTL in seconds (default: 3 beats, at least 1 s).
        max_beats: publish at most this many frames, then stop beating by itself
            (:attr:`finished` is set, :meth:`wait` returns; :meth:`stop` still closes the
            connection). None: beat until :meth:`stop`. With ``ha``, it counts this
            replica's frames.

    Raises:
        ConfigError: tempo, bar length or start index out of range; ``ha`` with
            ``local://``; a bad bucket name or lease TTL; ``max_beats`` not an integer >= 1.

    Example:
        >>> from backbeat_sync import BackbeatConfig
        >>> cfg = BackbeatConfig(cluster_id="dev", nats_url="nats://127.0.0.1:4222")
        >>> pulse = Pulse(cfg, tempo_bpm=120, bar_length=4, start_index=0)
        >>> pulse.next_index, pulse.tempo_bpm
        (0, 120.0)
    """

    def __init__(
        self,
        config: BackbeatConfig,
        *,
        tempo_bpm: float | None = None,
        bar_length: int | None = None,
        start_index: int | None = None,
        sign: FrameSigner | None = None,
        time_source: TimeSource = SYSTEM_TIME,
        ha: bool = False,
        bucket: str = "backbeat-pulse",
        lease_ttl: float | None = None,
        max_beats: int | None = None,
    ) -> None:
        if not isinstance(config, BackbeatConfig):
            raise TypeError(f"config must be a BackbeatConfig, not {type(config).__name__}")
        if sign is not None and not callable(sign):
            raise ConfigError("sign", sign, "must be callable or None")
        tempo = check_tempo(config.tempo_bpm if tempo_bpm is None else tempo_bpm)
        self._max_beats = check_max_frames(max_beats)
        if ha:
            from .ha import check_bucket_name

            if config.is_local:
                raise ConfigError("ha", ha, "needs NATS with JetStream, not local://")
            check_bucket_name(bucket)
            if lease_ttl is not None and (
                isinstance(lease_ttl, bool)
                or not isinstance(lease_ttl, (int, float))
                or not math.isfinite(lease_ttl)
                or lease_ttl <= 0
            ):
                raise ConfigError("lease_ttl", lease_ttl, "must be a number of seconds > 0, or None")
        self._ha = bool(ha)
        self._bucket = bucket
        self._lease_ttl = lease_ttl
        self._config = config
        self._time = time_source
        self._sign = sign
        self._start_index = start_index
        if start_index is None:
            start_index = wall_clock_start_index(tempo, time_source.time())
        self.schedule = BeatSchedule(
            cluster_id=config.cluster_id,
            tempo_bpm=tempo,
            bar_length=config.bar_length if bar_length is None else bar_length,
            start_index=wall_clock_start_index(tempo, time_source.time())
            if start_index is None
            else start_index,
            start_time=time_source.monotonic(),
        )
        self._lock = threading.Lock()
        self._state = "new"
        self._link: PulseLink | HaPulseLink | None = None
        self._thread: PulseThread | None = None
        self._local_sent = 0
        self._local_last: bytes | None = None
        self._unserve: Callable[[], None] | None = None
        self._log = logger.bind(pulse=config.cluster_id)

    def __repr__(self) -> str:
        return (
            f"<Pulse cluster={self._config.cluster_id} servers={self._config.masked_url}"
            f" tempo={self.tempo_bpm:g} bar={self.bar_length} state={self._state}>"
        )

    # -- state -------------------------------------------------------------------

    @property
    def tempo_bpm(self) -> float:
        """Beats per minute now."""
        return self.schedule.tempo_bpm

    @property
    def bar_length(self) -> int:
        """Beats per bar."""
        return self.schedule.bar_length

    @property
    def next_index(self) -> int:
        """Index of the next beat to be sent (with ``ha``: after the last one this replica won)."""
        link = self._link
        if self._ha and link is not None:
            return int(getattr(link, "next_index", self.schedule.next_index))
        return self.schedule.next_index

    @property
    def is_leader(self) -> bool:
        """Whether this pulse publishes frames now: always while running, unless ``ha``,
        where only the replica holding the lease does."""
        link = self._link
        if self._ha:
            return link is not None and getattr(link, "leading", False)
        return self.running

    @property
    def running(self) -> bool:
        """True between ``start()`` and ``stop()``."""
        return self._state == "running"

    @property
    def connected(self) -> bool:
        """Whether frames can be sent now (always True for ``local://`` while running)."""
        if self._link is not None:
            return self._link.connected
        return self._thread is not None and self.running

    @property
    def reconnect_count(self) -> int:
        """How many times the NATS connection was re-established."""
        return self._link.reconnect_count if self._link is not None else 0

    @property
    def frames_sent(self) -> int:
        """Frames published so far."""
        return self._link.frames_sent if self._link is not None else self._local_sent

    @property
    def max_beats(self) -> int | None:
        """The most frames this pulse publishes (None: no limit)."""
        return self._max_beats

    @property
    def finished(self) -> bool:
        """Whether the pulse has published ``max_beats`` frames and stopped beating."""
        done = self._done_event()
        return done is not None and done.is_set()

    def wait(self, timeout: float | None = None) -> bool:
        """Wait until the pulse has published ``max_beats`` frames (it sends no more).

        Args:
            timeout: seconds to wait at most (None: as long as it takes).

        Returns:
            True when it has finished, False on timeout (or without ``max_beats``, or
            before :meth:`start`: nothing would finish it).
        """
        done = self._done_event()
        if done is None or self._max_beats is None:
            return False
        return done.wait(timeout)

    def _done_event(self) -> threading.Event | None:
        if self._link is not None:
            return self._link.finished
        if self._thread is not None:
            return self._thread.finished
        return None

    @property
    def frames_skipped(self) -> int:
        """Beats not sent because the connection was down when they were due."""
        return self._link.frames_skipped if self._link is not None else 0

    # -- lifecycle -----------------------------------------------------------------

    def start(self) -> None:
        """Connect and start beating (the first beat goes out at once).

        Raises:
            BackbeatConnectionError: no NATS connection within ``config.connect_timeout``
                (unless ``config.connect_in_background``).
            ConfigError: a TLS or credentials setting cannot be used.
            PulseAlreadyStarted: the pulse was already started (a RuntimeError).
        """
        with self._lock:
            if self._state != "new":
                raise PulseAlreadyStarted(self._state)
            self._state = "starting"
        try:
            self.schedule.skip_to(self._time.monotonic() - 60.0 / self.tempo_bpm)
            if self._config.is_local:
                self._start_local()
            elif self._ha:
                from .ha import HaPulseLink

                def adopt(schedule: BeatSchedule) -> None:
                    self.schedule = schedule

                ha_link = HaPulseLink(
                    self._config,
                    self.schedule,
                    self._report,
                    sign=self._sign,
                    time_source=self._time,
                    bucket=self._bucket,
                    lease_ttl=self._lease_ttl,
                    on_schedule=adopt,
                    max_frames=self._max_beats,
                )
                self._link = ha_link
                ha_link.start()
            else:
                from .transport.nats import PulseLink

                link = PulseLink(
                    self._config,
                    self.schedule,
                    self._report,
                    sign=self._sign,
                    time_source=self._time,
                    max_frames=self._max_beats,
                )
                self._link = link
                link.start()
        except BaseException:
            self._link = None
            with self._lock:
                self._state = "new"
            raise
        with self._lock:
            self._state = "running"
        self._log.info(
            f"🥁 BACKBEAT pulse started - cluster={self._config.cluster_id} tempo={self.tempo_bpm:g}"
            f" bar={self.bar_length} first beat={self.next_index}"
        )

    def _start_local(self) -> None:
        url = urlsplit(self._config.nats_url.strip())
        bus = LocalBus.named(url.netloc + url.path.strip("/"))
        subject = self._config.beat_subject_for()
        sign = self._sign

        def send(frame: BeatFrame) -> None:
            if sign is not None:
                frame = sign(frame)
            data = frame.encode()
            bus.publish(subject, data)
            self._local_last = data
            self._local_sent += 1

        self._unserve = bus.serve(self._config.last_beat_subject_for(), lambda: self._local_last)

        self._thread = PulseThread(
            self.schedule, send, time_source=self._time, name="backbeat-pulse", max_frames=self._max_beats
        )
        self._thread.start()

    def stop(self) -> None:
        """Stop beating, close the connection, join the thread. Idempotent."""
        with self._lock:
            if self._state != "running":
                if self._state == "new":
                    self._state = "stopped"
                return
            self._state = "stopping"
        try:
            if self._link is not None:
                self._link.stop(min(self._config.flush_timeout, 1.0))
            if self._thread is not None:
                self._thread.stop()
            if self._unserve is not None:
                self._unserve()
        finally:
            with self._lock:
                self._state = "stopped"
        self._log.info(
            f"🥁 BACKBEAT pulse stopped - cluster={self._config.cluster_id} sent={self.frames_sent}"
        )

    def set_tempo(self, tempo_bpm: float, *, bar_length: int | None = None) -> None:
        """Change the tempo; it takes effect from the next beat (due one new beat after the last).

        With ``ha``, the tempo (and ``bar_length``, if given) is written to the bucket
        (waiting at most ``config.connect_timeout`` for the write), and the leader,
        whichever replica that is, applies it at the next downbeat (a bar length at the
        first beat that is a downbeat in it).

        Args:
            tempo_bpm: beats per minute.
            bar_length: with ``ha`` only: beats per bar from then on (None: unchanged).

        Raises:
            ConfigError: tempo or bar length out of range; ``bar_length`` without ``ha``.
            RuntimeError: ``ha`` and the pulse is not running.
            BackbeatConnectionError: ``ha`` and the bucket could not be written.
        """
        if not self._ha:
            if bar_length is not None:
                raise ConfigError(
                    "bar_length", bar_length, "can only be changed on a running pulse with ha=True"
                )
            self.schedule.set_tempo(tempo_bpm)
            if self._link is not None:
                self._link.tempo_changed()
            return
        from .ha import HaPulseLink, TempoSetting

        tempo = check_tempo(tempo_bpm)
        if bar_length is not None and (
            not isinstance(bar_length, int) or isinstance(bar_length, bool) or bar_length < 1
        ):
            raise ConfigError("bar_length", bar_length, "must be an integer >= 1")
        link = self._link
        if not isinstance(link, HaPulseLink) or not self.running:
            raise RuntimeError("Pulse.set_tempo with ha=True needs a running pulse (start() it first)")
        from concurrent.futures import TimeoutError as FutureTimeout

        from .errors import BackbeatConnectionError
        from .transport.nats import describe_error

        fut = link.submit(link.put_tempo(TempoSetting(tempo, bar_length)))
        try:
            fut.result(timeout=self._config.connect_timeout)
        except FutureTimeout:
            fut.cancel()
            raise BackbeatConnectionError(
                self._config.masked_url, f"tempo not written to bucket {self._bucket!r} in time"
            ) from None
        except BackbeatConnectionError:
            raise
        except Exception as exc:
            raise BackbeatConnectionError(
                self._config.masked_url,
                f"tempo not written to bucket {self._bucket!r}: {describe_error(exc)}",
            ) from None

    def __enter__(self) -> Pulse:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def _report(self, event: TransportEvent, detail: str) -> None:
        from .transport.base import TransportEvent

        if detail.startswith(("HA pulse: leading", "HA pulse: stopped leading")):
            self._log.info(f"BACKBEAT {detail}")  # leadership changes: news, not trouble
        elif event is TransportEvent.DISCONNECTED or event is TransportEvent.ERROR:
            self._log.warning(f"BACKBEAT pulse {event.value}: {detail}")
        elif event is TransportEvent.RECONNECTED:
            self._log.info(f"BACKBEAT pulse reconnected: {detail}")
        else:
            self._log.debug(f"BACKBEAT pulse {event.value}: {detail}")

    def stats(self) -> dict[str, Any]:
        """Counters for monitoring.

        Returns:
            ``frames_sent``, ``frames_skipped``, ``next_index``, ``reconnect_count``, ``connected``;
            with ``ha`` also ``leader`` (holds the lease now), ``terms`` (times it won the
            lease) and ``frames_fenced`` (beats won but not sent: the lease was running out).
        """
        stats: dict[str, Any] = {
            "frames_sent": self.frames_sent,
            "frames_skipped": self.frames_skipped,
            "next_index": self.next_index,
            "reconnect_count": self.reconnect_count,
            "connected": self.connected,
        }
        link = self._link
        if self._ha:
            stats["leader"] = self.is_leader
            stats["terms"] = getattr(link, "terms", 0)
            stats["frames_fenced"] = getattr(link, "frames_fenced", 0)
        return stats
