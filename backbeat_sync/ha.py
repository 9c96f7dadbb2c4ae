"""A highly available pulse: leadership is a lease in a JetStream key-value bucket.

Run :class:`~backbeat_sync.Pulse` with ``ha=True`` on several machines; exactly
one replica, the *leader*, publishes frames. The bucket (``backbeat-pulse`` by
default, created by the first replica if missing) holds, per cluster:

- ``lease.{cluster}``: who leads, the highest beat index the leader has *won*,
  the beat grid (an anchor index, its wall time, the tempo and bar length) and
  the lease TTL in seconds (:class:`LeaseState`, JSON);
- ``tempo.{cluster}``: the tempo (and bar length) the cluster should run at,
  written by :func:`write_tempo` and ``Pulse.set_tempo``.

The leader renews the lease once per beat by a compare-and-set on the key's
revision, and the renewal *is* the claim of that beat's index: it writes
``index = k`` before it publishes beat ``k``, and publishes only if the write
won. A standby polls the key; when the revision has not changed for the TTL
stored in it, counted on the standby's own monotonic clock from the moment it
first saw that revision, or when the value says the lease was released, it
takes the lease by a compare-and-set on the revision it saw. It then continues
the old grid: its first index is greater than the highest index ever won, on
the beat times the anchor gives (skipped beats are a gap, never a reset).

Fencing: a leader publishes beat ``k`` only before ``sent + ttl * (1 -
FENCE_MARGIN)``, where ``sent`` is when it sent the write that won ``k``. A
standby cannot take over before ``ttl`` after it saw that write, which is later
still; so the old leader has stopped before a new one can start, and no clocks
of different machines need to agree for it.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import socket
import threading
from collections.abc import Callable, Coroutine
from typing import Any, Final

import attrs
import nats.js.errors as js_errors
from nats.aio.client import Client
from nats.js.kv import KeyValue

from ._time import SYSTEM_TIME, TimeSource
from .config import BackbeatConfig
from .errors import BackbeatConnectionError, ConfigError, JetStreamUnavailable, ProtocolError
from .lease import (
    DEFAULT_BUCKET,
    LEASE_BEATS,
    MIN_LEASE_TTL,
    Grid,
    LeaseState,
    TempoSetting,
    check_bucket_name,
    lease_key,
    lease_ttl_for,
    tempo_key,
    valid_bar,
    valid_tempo,
)
from .protocol import MAX_TEMPO_BPM, BeatFrame
from .schedule import BeatSchedule
from .streams import auto_replicas, jetstream_cause
from .transport.base import TransportEvent
from .transport.nats import connect_options, describe_error
from .transport.nats.pulse_link import FrameSender, serve_last_beat

__all__ = [
    "DEFAULT_BUCKET",
    "FENCE_MARGIN",
    "LEASE_BEATS",
    "MIN_LEASE_TTL",
    "Grid",
    "HaPulseLink",
    "LeaseState",
    "TempoSetting",
    "check_bucket_name",
    "lease_key",
    "lease_ttl_for",
    "read_lease",
    "tempo_key",
    "write_tempo",
]

#: Share of the TTL a leader gives up at the end of its lease (the fence).
FENCE_MARGIN: Final = 0.25
#: A beat whose frame would leave later than this share of a beat after its time is skipped
#: (as the plain pulse does: a frame a whole beat late is worse than none).
LATE_SHARE: Final = 1.0

#: Receives connection events and HA errors (as :class:`NatsLink` takes it).
EventReporter = Callable[[TransportEvent, str], None]


async def open_bucket(
    nc: Client,
    bucket: str,
    *,
    create: bool,
    replicas: int | None,
    timeout: float,
    description: str = "backbeat_sync HA pulse: lease, beat grid and tempo per cluster",
) -> KeyValue:
    """The HA pulse bucket on ``nc``, created (file storage, one value per key) if missing and ``create``.

    Args:
        nc: a connected nats-py client.
        bucket: the bucket name.
        create: create it if it does not exist.
        replicas: its replicas when created (None: 3 on a cluster of 3 or more, else 1).
        timeout: per JetStream request.
        description: the bucket's description when created.

    Raises:
        JetStreamUnavailable: no JetStream, JetStream refused, or no such bucket (``create=False``).
    """
    js = nc.jetstream(timeout=timeout)
    needed = f"JetStream key-value bucket {bucket!r}"
    servers = str(getattr(nc, "connected_url", None) or "the server")
    if servers != "the server":
        servers = _mask(servers)
    try:
        return await js.key_value(bucket)
    except js_errors.BucketNotFoundError:
        if not create:
            raise JetStreamUnavailable(
                servers, needed, "no such bucket (the first `backbeat-sync pulse --ha` creates it)"
            ) from None
    except Exception as exc:
        cause = jetstream_cause(exc)
        if cause is None:
            raise
        raise JetStreamUnavailable(servers, needed, cause) from None
    try:
        return await js.create_key_value(
            bucket=bucket,
            history=1,
            storage="file",
            replicas=replicas if replicas is not None else auto_replicas(nc),
            description=description,
        )
    except Exception as exc:
        cause = jetstream_cause(exc)
        if cause is None:
            raise
        raise JetStreamUnavailable(servers, needed, cause) from None


def _mask(url: Any) -> str:
    from urllib.parse import urlsplit

    try:
        split = urlsplit(str(url))
    except ValueError:
        return "the server"
    host = split.hostname or ""
    port = f":{split.port}" if split.port else ""
    return f"{split.scheme}://{host}{port}"


class HaPulseLink(FrameSender):
    """The NATS side of a :class:`~backbeat_sync.Pulse` with ``ha=True``: campaign, lead, fence.

    Args:
        config: servers, subjects, auth and TLS settings.
        schedule: the pulse's schedule: its tempo, bar length and next index seed a
            bucket that holds no grid yet.
        report: receives connection events and HA errors.
        sign: optional hook that returns a signed copy of each frame.
        time_source: real time.
        bucket: the key-value bucket.
        lease_ttl: a fixed lease TTL in seconds (None: :func:`lease_ttl_for` the tempo).
        replicas: replicas of the bucket if this replica creates it (None: automatic).
        on_schedule: called with the schedule frames are built from, each time it changes.
        max_frames: stop beating after this replica published this many frames (None: no
            limit); ``finished`` is set then, and the lease is held until :meth:`stop` hands it over.
    """

    def __init__(
        self,
        config: BackbeatConfig,
        schedule: BeatSchedule,
        report: EventReporter,
        *,
        sign: Callable[[BeatFrame], BeatFrame] | None = None,
        time_source: TimeSource = SYSTEM_TIME,
        bucket: str = DEFAULT_BUCKET,
        lease_ttl: float | None = None,
        replicas: int | None = None,
        on_schedule: Callable[[BeatSchedule], None] | None = None,
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
        self._bucket_name = check_bucket_name(bucket)
        self._lease_ttl = lease_ttl
        self._replicas = replicas
        self._on_schedule = on_schedule
        self._lease_key = lease_key(config.cluster_id)
        self._tempo_key = tempo_key(config.cluster_id)
        self.holder_id = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"
        self._kv: KeyValue | None = None
        self._kv_lock: asyncio.Lock | None = None  # made on the loop (in _background)
        self._rev = 0  # revision of the lease value we wrote last, while leading
        self._lease: LeaseState | None = None
        self._desired: TempoSetting | None = None
        self._leading = False
        self._stopping = False
        self._lead_task: asyncio.Task[None] | None = None
        self._error_streak = ""
        self.next_index = schedule.next_index
        self.frames_sent = 0
        self.frames_skipped = 0
        self.frames_fenced = 0
        self.send_errors = 0
        self.terms = 0  # times this replica won the lease
        self.lost_leases = 0
        self.max_frames = max_frames
        #: Set once ``max_frames`` frames were published (never without ``max_frames``).
        self.finished = threading.Event()
        #: The latest frame this replica published, served on the last-beat subject while leading.
        self.last_frame: bytes | None = None

    # -- state ----------------------------------------------------------------------

    @property
    def leading(self) -> bool:
        """Whether this replica holds the lease now."""
        return self._leading

    def _stop_requested(self) -> bool:
        return self._stopping

    def tempo_changed(self) -> None:
        """Nothing to re-plan: an HA pulse takes its tempo from the bucket."""

    def _report_error(self, key: str, text: str) -> None:
        # One line per kind of trouble until it clears: a standby polls often.
        if self._error_streak != key:
            self._error_streak = key
            self._report(TransportEvent.ERROR, text)

    # -- connection -----------------------------------------------------------------

    def _timeout(self) -> float:
        return max(0.5, min(self._config.connect_timeout, 5.0))

    def _request_timeout(self) -> float:
        # A lease request that is not answered within half a TTL is asked again: when the
        # bucket's stream loses its leader, JetStream drops requests until it has elected
        # another, and waiting 5 s for each would add that to the failover.
        ttl = (
            self._lease.ttl
            if self._lease is not None
            else lease_ttl_for(self.schedule.tempo_bpm, self._lease_ttl)
        )
        return max(0.25, min(ttl / 2, self._timeout()))

    async def _ensure_kv(self) -> KeyValue:
        assert self._kv_lock is not None
        async with self._kv_lock:  # _on_connect and the campaign may both open it: once
            if self._kv is None:
                assert self._nc is not None
                self._kv = await open_bucket(
                    self._nc,
                    self._bucket_name,
                    create=True,
                    replicas=self._replicas,
                    timeout=self._timeout(),
                )
            return self._kv

    async def _on_connect(self, nc: Client) -> None:
        # Only the leader answers: a standby's last frame (from an old term) is not the cluster's.
        await serve_last_beat(
            nc, self._config.last_beat_subject_for(), lambda: self.last_frame if self._leading else None
        )
        if self._config.connect_in_background:
            return  # the campaign opens the bucket and reports what is missing
        try:
            await self._ensure_kv()
        except JetStreamUnavailable as exc:
            await self._close_client(nc)
            raise JetStreamUnavailable(self.masked_servers, exc.needed, exc.cause) from None
        except Exception as exc:
            await self._close_client(nc)
            raise BackbeatConnectionError(
                self.masked_servers, f"cannot open bucket {self._bucket_name!r}: {describe_error(exc)}"
            ) from None

    def _background(self) -> list[Coroutine[Any, Any, None]]:
        self._kv_lock = asyncio.Lock()
        return [self._run(), self._watch_tempo()]

    # -- the loop ---------------------------------------------------------------------

    async def _run(self) -> None:
        while not self._stopping and not self.finished.is_set():
            evt = self._connected_evt
            assert evt is not None
            await evt.wait()
            try:
                kv = await self._ensure_kv()
                if not self._leading:
                    await self._campaign(kv)
                if self._leading:
                    task = asyncio.ensure_future(self._lead(kv))
                    self._lead_task = task
                    try:
                        await task
                    finally:
                        self._lead_task = None
            except asyncio.CancelledError:
                raise
            except JetStreamUnavailable as exc:
                self._kv = None
                self._report_error("js", f"HA pulse: {exc}")
                await asyncio.sleep(self._poll_interval())
            except Exception as exc:
                if isinstance(exc, js_errors.BucketNotFoundError) or "stream not found" in str(exc):
                    self._kv = None
                self._report_error(
                    "kv:" + type(exc).__name__, f"HA pulse: bucket access failed: {describe_error(exc)}"
                )
                await asyncio.sleep(self._poll_interval())

    def _poll_interval(self) -> float:
        ttl = (
            self._lease.ttl
            if self._lease is not None
            else lease_ttl_for(self.schedule.tempo_bpm, self._lease_ttl)
        )
        spb = 60.0 / self.schedule.tempo_bpm
        return max(0.01, min(spb / 2, ttl / 4, 1.0))

    def _fresh_grid(self) -> LeaseState:
        sched = self.schedule
        k = sched.next_index
        grid = Grid(k, self._time.time(), sched.tempo_bpm, sched.bar_length)
        return LeaseState("", k - 1, grid, lease_ttl_for(grid.tempo_bpm, self._lease_ttl))

    async def _campaign(self, kv: KeyValue) -> None:
        """Poll the lease until this replica wins it (``self._leading``) or stops."""
        seen_rev, seen_at = -1, 0.0
        clock = self._time
        while not self._stopping and self._connected:
            try:
                entry = await asyncio.wait_for(kv.get(self._lease_key), self._request_timeout())
            except js_errors.KeyNotFoundError:
                entry = None
            if entry is None:
                fresh = self._fresh_grid()
                mine = attrs.evolve(fresh, holder=self.holder_id)
                try:
                    rev = await asyncio.wait_for(
                        kv.create(self._lease_key, mine.encode()), self._request_timeout()
                    )
                except js_errors.KeyWrongLastSequenceError:
                    continue  # another replica created it first
                self._won(rev, mine)
                return
            rev = int(entry.revision or 0)
            try:
                state = LeaseState.decode(entry.value or b"")
            except ProtocolError as exc:
                self._report_error("junk", f"HA pulse: lease value replaced: {exc}")
                state = attrs.evolve(
                    self._fresh_grid(), ttl=lease_ttl_for(self.schedule.tempo_bpm, self._lease_ttl)
                )
            self._error_streak = ""
            if state.holder == self.holder_id:
                self._won(rev, state, adopted=True)  # our own write, whose answer we did not see
                return
            now = clock.monotonic()
            if rev != seen_rev:
                seen_rev, seen_at = rev, now
            if not state.holder or now - seen_at >= state.ttl:
                mine = attrs.evolve(
                    state, holder=self.holder_id, ttl=lease_ttl_for(state.grid.tempo_bpm, self._lease_ttl)
                )
                try:
                    new_rev = await asyncio.wait_for(
                        kv.update(self._lease_key, mine.encode(), last=rev), self._request_timeout()
                    )
                except js_errors.KeyWrongLastSequenceError:
                    continue
                self._won(new_rev, mine)
                return
            self._lease = state
            await asyncio.sleep(self._poll_interval())

    def _won(self, rev: int, state: LeaseState, *, adopted: bool = False) -> None:
        self._rev, self._lease, self._leading = rev, state, True
        if not adopted:
            self.terms += 1
            self._report(
                TransportEvent.CONNECTED,
                f"HA pulse: leading cluster {self._config.cluster_id} after beat {state.index}"
                f" (holder {self.holder_id})",
            )

    def _lost(self, why: str) -> None:
        if self._leading:
            self._leading = False
            self.lost_leases += 1
            self._report(TransportEvent.DISCONNECTED, f"HA pulse: stopped leading: {why}")

    def _use_grid(self, grid: Grid, k: int) -> None:
        clock = self._time
        offset = clock.monotonic() - clock.time()
        sched = BeatSchedule(
            cluster_id=self._config.cluster_id,
            tempo_bpm=grid.tempo_bpm,
            bar_length=grid.bar_length,
            start_index=max(0, k),
            start_time=grid.due(max(0, k)) + offset,
        )
        self.schedule = sched
        if self._on_schedule is not None:
            try:
                self._on_schedule(sched)
            except Exception:
                pass

    async def _sleep_until_wall(self, wall: float) -> None:
        delay = wall - self._time.time()
        if delay > 0:
            await asyncio.sleep(delay)

    async def _lead(self, kv: KeyValue) -> None:
        """Win and publish one beat after another until the lease is lost."""
        state = self._lease
        assert state is not None
        clock = self._time
        grid = state.grid
        k = state.index + 1
        self._use_grid(grid, k)
        while self._leading and not self._stopping:
            desired = self._desired
            k = max(k, grid.first_at(clock.time() - 0.1 * grid.spb), 0)
            new_bar = desired.bar_length if desired is not None else None
            if new_bar is not None and new_bar != grid.bar_length and k % new_bar == 0:
                grid = Grid(grid.index, grid.time, grid.tempo_bpm, new_bar)
                self._use_grid(grid, k)
            if desired is not None and desired.tempo_bpm != grid.tempo_bpm and k % grid.bar_length == 0:
                grid = grid.retempo(k, desired.tempo_bpm)
                self._use_grid(grid, k)
            due = grid.due(k)
            ttl = lease_ttl_for(grid.tempo_bpm, self._lease_ttl)
            # Win beat k a little ahead of its time, so the frame leaves on time.
            await self._sleep_until_wall(due - min(0.25 * grid.spb, 0.2))
            if self._stop_requested():
                return
            claim = LeaseState(self.holder_id, k, grid, ttl)
            sent = clock.monotonic()
            try:
                rev = await asyncio.wait_for(
                    kv.update(self._lease_key, claim.encode(), last=self._rev), ttl / 2
                )
            except js_errors.KeyWrongLastSequenceError:
                self._lost("another replica took the lease")
                return
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                # Outcome unknown: campaign again (it adopts the lease if the write did land).
                self._lost(f"lease renewal failed: {describe_error(exc) or type(exc).__name__}")
                return
            self._rev, self._lease = rev, claim
            self.next_index = k + 1
            fence = sent + ttl * (1 - FENCE_MARGIN)
            await self._sleep_until_wall(due)
            late = clock.time() - due
            if clock.monotonic() >= fence:
                self.frames_fenced += 1
            elif late > LATE_SHARE * grid.spb:
                self.frames_skipped += 1
            else:
                await self._send(k)
                if self.max_frames is not None and self.frames_sent >= self.max_frames:
                    self.finished.set()  # _run campaigns no more; stop() hands the lease over
                    return
            k += 1

    async def _watch_tempo(self) -> None:
        """Keep ``self._desired`` up to date from ``tempo.{cluster}`` (polled about once a beat)."""
        while True:
            kv = self._kv
            if kv is not None and self._connected:
                try:
                    entry = await asyncio.wait_for(kv.get(self._tempo_key), self._request_timeout())
                    self._desired = TempoSetting.decode(entry.value or b"")
                except js_errors.KeyNotFoundError:
                    self._desired = None
                except ProtocolError as exc:
                    self._report_error("tempo", f"HA pulse: ignoring the tempo setting: {exc}")
                except asyncio.CancelledError:
                    raise
                except Exception:
                    pass  # the lease loop reports bucket trouble
            await asyncio.sleep(max(0.02, min(60.0 / self.schedule.tempo_bpm, 2.0)))

    # -- tempo and stop -----------------------------------------------------------------

    async def put_tempo(self, setting: TempoSetting) -> int:
        """Write ``setting`` to ``tempo.{cluster}`` (on the loop); returns the revision."""
        kv = await self._ensure_kv()
        rev: int = await kv.put(self._tempo_key, setting.encode())
        self._desired = setting
        return rev

    async def _on_stop(self, deadline: float) -> None:
        self._stopping = True
        loop = asyncio.get_running_loop()
        # End the campaign and the lead first, so nothing wins the lease after it is released.
        tasks = [t for t in (*self._tasks, self._lead_task) if t is not None and not t.done()]
        for t in tasks:
            t.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=max(0.0, deadline - loop.time()))
        kv, state = self._kv, self._lease
        if self._leading and kv is not None and state is not None and self._connected:
            # Hand over at once: a standby may take a released lease without waiting for the TTL.
            released = attrs.evolve(state, holder="")
            try:
                await asyncio.wait_for(
                    kv.update(self._lease_key, released.encode(), last=self._rev),
                    max(0.05, deadline - loop.time()),
                )
            except Exception:
                pass
        self._leading = False
        nc = self._nc
        if nc is not None and self._connected:
            try:
                await asyncio.wait_for(nc.flush(), max(0.05, deadline - loop.time()))
            except Exception:
                pass


async def _with_bucket(
    config: BackbeatConfig, bucket: str, fn: Callable[[KeyValue], Coroutine[Any, Any, Any]]
) -> Any:
    import nats

    options = connect_options(config, name=f"backbeat-tool-{config.cluster_id}")
    options["allow_reconnect"] = False
    options["max_reconnect_attempts"] = 0
    masked = config.masked_url
    try:
        nc = await asyncio.wait_for(nats.connect(**options), config.connect_timeout)
    except Exception as exc:
        raise BackbeatConnectionError(masked, describe_error(exc)) from None
    try:
        try:
            kv = await open_bucket(nc, bucket, create=False, replicas=None, timeout=config.connect_timeout)
        except JetStreamUnavailable as exc:
            raise JetStreamUnavailable(masked, exc.needed, exc.cause) from None
        return await fn(kv)
    finally:
        try:
            await nc.close()
        except Exception:
            pass


def write_tempo(
    config: BackbeatConfig,
    tempo_bpm: float,
    *,
    bar_length: int | None = None,
    bucket: str = DEFAULT_BUCKET,
) -> int:
    """Set the tempo (and maybe the bar length) of ``config.cluster_id`` in the HA pulse bucket.

    The leader, or whoever leads next, applies the tempo at the next downbeat, and a new
    bar length at the first beat that is a downbeat in it.

    Args:
        config: servers, auth, TLS and the cluster id.
        tempo_bpm: beats per minute, 0 < x <= 6000.
        bar_length: beats per bar (None: keep the current one).
        bucket: the HA pulse bucket.

    Returns:
        The revision of the tempo key.

    Raises:
        ConfigError: tempo or bar length out of range, or a bad bucket name.
        BackbeatConnectionError: no connection.
        JetStreamUnavailable: no JetStream, or no such bucket (no HA pulse ever ran).
    """
    if not valid_tempo(tempo_bpm):
        raise ConfigError("tempo_bpm", tempo_bpm, f"must be 0 < x <= {MAX_TEMPO_BPM:g}")
    if bar_length is not None and not valid_bar(bar_length):
        raise ConfigError("bar_length", bar_length, "must be an integer >= 1")
    setting = TempoSetting(float(tempo_bpm), bar_length)
    key = tempo_key(config.cluster_id)

    async def put(kv: KeyValue) -> int:
        rev: int = await kv.put(key, setting.encode())
        return rev

    result: int = asyncio.run(_with_bucket(config, check_bucket_name(bucket), put))
    return result


def read_lease(config: BackbeatConfig, *, bucket: str = DEFAULT_BUCKET) -> LeaseState | None:
    """The lease of ``config.cluster_id`` as the bucket holds it now (None: no HA pulse has led yet).

    Raises:
        BackbeatConnectionError: no connection.
        JetStreamUnavailable: no JetStream, or no such bucket.
        ProtocolError: the key holds something this library did not write.
    """
    key = lease_key(config.cluster_id)

    async def get(kv: KeyValue) -> LeaseState | None:
        try:
            entry = await kv.get(key)
        except js_errors.KeyNotFoundError:
            return None
        return LeaseState.decode(entry.value or b"")

    result: LeaseState | None = asyncio.run(_with_bucket(config, check_bucket_name(bucket), get))
    return result
