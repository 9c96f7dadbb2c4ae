"""Tests for backbeat_sync.pulse.Pulse: frames on NATS as PROTOCOL.md says, tempo, restarts.

The frames are read by a raw nats-py subscriber (``tests/natsserver.py``), not our parser.
"""

from __future__ import annotations

import calendar
import itertools
import re
import threading
import time
from typing import Any

import attrs
import pytest

import backbeat_sync as bb
from backbeat_sync import BackbeatConfig, BackbeatConnectionError, BeatFrame, ConfigError, ManualTime
from backbeat_sync.pulse import BeatSchedule, Pulse, PulseThread, wall_clock_start_index
from backbeat_sync.transport.local import LocalBus

from .natsserver import AsyncRunner, NatsServer, Witness, free_port
from .support import unique_bus, wait_until

CLUSTER = "pt"
#: Only a bug makes a test wait this long; "promptly" is asserted as well under half of it.
NEVER = 60.0
RFC3339_Z = re.compile(r"\A(\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2})(\.\d{1,9})?Z\Z")


def config(url: str, **changes: Any) -> BackbeatConfig:
    """A pulse config for tests."""
    fields: dict[str, Any] = {
        "cluster_id": CLUSTER,
        "agent_id": "pulse-test",
        "nats_url": url,
        "reconnect_wait": 0.05,
        "reconnect_jitter": 0.01,
        "connect_timeout": 2.0,
    }
    fields.update(changes)
    return BackbeatConfig(**fields)


def epoch(stamp: str) -> float:
    """Seconds since the epoch of an RFC 3339 ``...Z`` timestamp."""
    m = RFC3339_Z.match(stamp)
    assert m is not None, stamp
    frac = float(m.group(2) or 0.0)
    return calendar.timegm(time.strptime(m.group(1), "%Y-%m-%dT%H:%M:%S")) + frac


def increasing(indices: list[int]) -> bool:
    """Whether beat indices only go up (a loaded machine may skip a beat, never repeat one)."""
    return all(a < b for a, b in itertools.pairwise(indices))


def library_threads() -> set[threading.Thread]:
    """Threads that belong to backbeat_sync (or asyncio executors it could leave)."""
    return {t for t in threading.enumerate() if t.name.startswith(("backbeat", "asyncio"))}


@pytest.mark.nats
def test_frames_follow_the_protocol(nats_server: NatsServer, nats_runner: AsyncRunner) -> None:
    """Each frame carries every field; window_id, downbeat, sent_at and deadline_at follow the rules."""
    witness = Witness(nats_runner, nats_server.url, f"backbeat.beat.{CLUSTER}")
    with Pulse(config(nats_server.url), tempo_bpm=1200, bar_length=3, start_index=30) as pulse:
        witness.wait_for(lambda ds: len(ds) >= 7, what="7 frames")
        assert pulse.connected is True
    frames = witness.dicts()[:7]
    witness.close()
    indices = [f["beat_index"] for f in frames]
    assert indices[0] >= 30  # the first beat, or a later one if connecting took over a beat
    assert increasing(indices)
    for f in frames:
        i = f["beat_index"]
        assert f["type"] == "backbeat.beatframe.v1"
        assert f["cluster_id"] == CLUSTER
        assert f["downbeat"] is (i % 3 == 0)
        assert f["phase"] == ("downbeat" if i % 3 == 0 else "upbeat")
        assert f["tempo_bpm"] == 1200
        assert f["window_id"] == f"w-{i // 3}"
        assert f["bar_length"] == 3
        assert epoch(f["deadline_at"]) - epoch(f["sent_at"]) == pytest.approx(0.05, abs=0.0011)


@pytest.mark.nats
def test_beats_are_drift_free(nats_server: NatsServer, nats_runner: AsyncRunner) -> None:
    """Beat k is sent k beat durations after beat 0, not k sleeps later (no accumulated drift).

    Each frame is late by its own scheduling noise, which a busy machine makes large; what
    must not happen is lateness that grows with k. The earliest frame of the last ten is
    compared with the earliest of the first ten: a pulse that sleeps a beat after each send
    drifts by its send time every beat. The exact maths (a late wake-up delays only its own
    beat) is tested without a clock in test_pulse_thread_late_wakeups_do_not_accumulate.
    """
    spb = 0.02
    witness = Witness(nats_runner, nats_server.url, f"backbeat.beat.{CLUSTER}")
    with Pulse(config(nats_server.url), tempo_bpm=3000, start_index=0):
        witness.wait_for(lambda ds: len(ds) >= 41, what="41 frames")
    frames = witness.dicts()[:41]
    witness.close()
    assert increasing([f["beat_index"] for f in frames])
    # sent_at - k * spb: the schedule's origin plus this frame's lateness (never negative)
    origin = [epoch(f["sent_at"]) - f["beat_index"] * spb for f in frames]
    first, last = min(origin[:10]), min(origin[-10:])
    assert last - first > -0.002  # never earlier than the schedule (1 ms stamps)
    assert last - first < 2 * spb  # no accumulated drift over 40 beats


@pytest.mark.nats
def test_set_tempo_takes_effect_from_the_next_beat(nats_server: NatsServer, nats_runner: AsyncRunner) -> None:
    """At 60 BPM a change to 6000 BPM makes the next beat come about 10 ms after the last, not 1 s."""
    old_bpm = 60 / NEVER  # the next beat at the old tempo would come a minute after the first
    witness = Witness(nats_runner, nats_server.url, f"backbeat.beat.{CLUSTER}")
    with Pulse(config(nats_server.url), tempo_bpm=old_bpm, start_index=0) as pulse:
        witness.wait_for(lambda ds: len(ds) >= 1, what="first frame")
        t0 = time.monotonic()
        pulse.set_tempo(600)
        witness.wait_for(lambda ds: len(ds) >= 4, timeout=NEVER, what="frames at the new tempo")
        assert time.monotonic() - t0 < NEVER / 2
        assert pulse.tempo_bpm == 600.0
    frames = witness.dicts()[:4]
    witness.close()
    assert [f["tempo_bpm"] for f in frames] == [old_bpm, 600, 600, 600]
    assert frames[0]["beat_index"] == 0
    assert increasing([f["beat_index"] for f in frames])
    # the pulse planned the next beat one new beat after the last (sent_at carries lateness, not the plan)
    assert pulse.schedule.due(1) - pulse.schedule.due(0) == pytest.approx(0.1)


def test_default_start_index_comes_from_the_wall_clock() -> None:
    """Without start_index the first beat is the beat count since the epoch; a restart never goes back."""
    clock = ManualTime(wall=1_790_000_000.0)
    first = Pulse(config("nats://127.0.0.1:1"), tempo_bpm=600, time_source=clock)
    assert first.next_index == wall_clock_start_index(600, 1_790_000_000.0)
    assert first.next_index == 17_900_000_000
    clock.advance(1.0)
    restarted = Pulse(config("nats://127.0.0.1:1"), tempo_bpm=600, time_source=clock)
    assert restarted.next_index == first.next_index + 10


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"tempo_bpm": 0}, "tempo_bpm"),
        ({"tempo_bpm": 6001}, "tempo_bpm"),
        ({"bar_length": 0}, "bar_length"),
        ({"start_index": -1}, "start_index"),
        ({"sign": "not callable"}, "sign"),
    ],
)
def test_bad_arguments_name_the_field(kwargs: dict[str, Any], field: str) -> None:
    """Each out-of-range argument is a ConfigError that names it."""
    with pytest.raises(ConfigError) as info:
        Pulse(config("nats://127.0.0.1:1"), **kwargs)
    assert info.value.field == field


def test_repr_masks_the_password() -> None:
    """repr(pulse) shows the servers with the password masked."""
    pulse = Pulse(config("nats://u:hunter2@127.0.0.1:1"), start_index=0)
    assert "hunter2" not in repr(pulse)
    assert "u:***@127.0.0.1:1" in repr(pulse)


@pytest.mark.nats
def test_sign_hook_is_applied_to_every_frame(nats_server: NatsServer, nats_runner: AsyncRunner) -> None:
    """A sign hook's output (sig, key_id) is what goes on the wire."""
    witness = Witness(nats_runner, nats_server.url, f"backbeat.beat.{CLUSTER}")

    def sign(frame: BeatFrame) -> BeatFrame:
        return attrs.evolve(frame, sig=f"sig-{frame.beat_index}", key_id="k1")

    with Pulse(config(nats_server.url), tempo_bpm=3000, start_index=5, sign=sign):
        witness.wait_for(lambda ds: len(ds) >= 3, what="3 frames")
    frames = witness.dicts()[:3]
    witness.close()
    assert [(f["sig"], f["key_id"]) for f in frames] == [(f"sig-{f['beat_index']}", "k1") for f in frames]
    assert frames[0]["beat_index"] >= 5
    assert increasing([f["beat_index"] for f in frames])


@pytest.mark.nats
def test_a_server_that_is_not_there_raises_and_leaves_no_thread() -> None:
    """start() fails with BackbeatConnectionError naming the server; nothing keeps running."""
    before = library_threads()
    url = f"nats://127.0.0.1:{free_port()}"
    pulse = Pulse(config(url, connect_timeout=0.3), start_index=0)
    with pytest.raises(BackbeatConnectionError, match=re.escape(url)):
        pulse.start()
    assert pulse.running is False
    assert before == library_threads()


@pytest.mark.nats
def test_stop_is_idempotent_and_leaves_no_thread(nats_server: NatsServer) -> None:
    """stop() twice is fine; afterwards no pulse thread is left; start() again is refused."""
    before = library_threads()
    pulse = Pulse(config(nats_server.url), tempo_bpm=600, start_index=0)
    pulse.start()
    assert any(t.name == "backbeat-pulse" for t in threading.enumerate())
    wait_until(lambda: pulse.frames_sent > 0, what="a frame")
    pulse.stop()
    pulse.stop()
    assert before == library_threads()
    with pytest.raises(RuntimeError):
        pulse.start()


@pytest.mark.nats
def test_outage_skips_beats_and_never_sends_them_late(
    nats_server: NatsServer, nats_runner: AsyncRunner
) -> None:
    """Server restarted: the pulse reconnects, skips the beats due meanwhile, and resumes on the clock."""
    with Pulse(config(nats_server.url), tempo_bpm=1200, start_index=0) as pulse:
        wait_until(lambda: pulse.frames_sent >= 3, what="frames before the outage")
        nats_server.stop()
        wait_until(lambda: not pulse.connected, what="outage noticed")
        down_at = pulse.next_index
        time.sleep(0.3)  # the outage itself: about 6 beats at 1200 BPM
        nats_server.start()
        witness = Witness(nats_runner, nats_server.url, f"backbeat.beat.{CLUSTER}")
        wait_until(lambda: pulse.reconnect_count == 1, what="reconnect")
        witness.wait_for(lambda ds: len(ds) >= 2, what="frames after the restart")
        assert pulse.frames_skipped >= 4
    frames = witness.dicts()
    witness.close()
    indices = [f["beat_index"] for f in frames]
    assert indices[0] >= down_at + 4  # no backlog of stale beats
    assert increasing(indices)


def test_local_pulse_drives_the_in_process_bus() -> None:
    """With local:// the pulse publishes frames on the named in-process bus."""
    bus = unique_bus()
    got: list[bytes] = []
    unsubscribe = LocalBus.named(bus).subscribe(f"backbeat.beat.{CLUSTER}", lambda s, d: got.append(d))
    with Pulse(config(f"local://{bus}"), tempo_bpm=3000, start_index=8) as pulse:
        wait_until(lambda: len(got) >= 2, what="local frames")
        assert pulse.connected is True
    unsubscribe()
    indices = [BeatFrame.parse(d).beat_index for d in got]
    assert indices[0] >= 8
    assert increasing(indices)


class LateWakeups:
    """Stands in for a PulseThread's stop event: each wait moves a ManualTime on, waking late.

    ``lateness`` gives how late each wake-up is (seconds); the thread is "stopped" once
    ``frames`` frames were sent. No real time passes, so the figures are exact.
    """

    def __init__(self, clock: ManualTime, lateness: list[float], sent: list[BeatFrame], frames: int) -> None:
        self.clock = clock
        self.lateness = iter(lateness)
        self.sent = sent
        self.frames = frames

    def is_set(self) -> bool:
        return len(self.sent) >= self.frames

    def wait(self, timeout: float) -> bool:
        self.clock.advance(timeout + next(self.lateness))
        return False


def test_pulse_thread_late_wakeups_do_not_accumulate() -> None:
    """Each beat is late only by its own wake-up: beat k is still planned at t0 + k beats (drift-free).

    The pulse thread runs on a manual clock; every wake-up is late by up to 0.8 beat and
    each send takes 5 ms. A pulse that slept a beat after each send would be seconds late
    by beat 200; this one sends beat k at exactly its due time plus that wake-up's lateness.
    """
    spb = 0.1
    clock = ManualTime()
    wall0 = clock.time()
    lateness = [((7 * k) % 9) * 0.01 for k in range(300)]  # 0 to 80 ms, in a fixed pattern
    sent: list[BeatFrame] = []

    def send(frame: BeatFrame) -> None:
        sent.append(frame)
        clock.advance(0.005)  # the send itself takes time too

    schedule = BeatSchedule(
        cluster_id=CLUSTER, tempo_bpm=600, bar_length=4, start_index=0, start_time=clock.monotonic()
    )
    thread = PulseThread(schedule, send, time_source=clock)
    thread._stop = LateWakeups(clock, lateness, sent, frames=200)  # type: ignore[assignment]
    thread._run()  # in this thread, on the manual clock
    assert [f.beat_index for f in sent] == list(range(200))
    late = [epoch(f.sent_at or "") - wall0 - f.beat_index * spb for f in sent]
    # beat 0 is due at once (no wait); beat k >= 1 woke from the k-th wait
    assert late[1:] == pytest.approx(lateness[: len(late) - 1], abs=0.0011)
    assert max(late) < 0.08 + 0.0011


def test_a_second_start_is_the_librarys_error_naming_the_state() -> None:
    """Pulse.start() on a pulse that is not new raises PulseAlreadyStarted (a RuntimeError,
    a BackbeatError) whose message says what to do."""
    from backbeat_sync.errors import PulseAlreadyStarted

    pulse = Pulse(BackbeatConfig(cluster_id="pa", nats_url=f"local://{unique_bus()}"), tempo_bpm=600)
    pulse.start()
    try:
        with pytest.raises(PulseAlreadyStarted) as info:
            pulse.start()
    finally:
        pulse.stop()
    assert isinstance(info.value, RuntimeError)
    assert isinstance(info.value, bb.BackbeatError)
    assert "make a new one" in str(info.value)


# -- max_beats: the pulse itself stops after N frames ------------------------------------


class NeverStopped:
    """A PulseThread stop event nobody sets: each wait moves a ManualTime on by the wait."""

    def __init__(self, clock: ManualTime, sent: list[BeatFrame], bound: int) -> None:
        self.clock = clock
        self.sent = sent
        self.bound = bound

    def is_set(self) -> bool:
        if len(self.sent) > self.bound:  # only a thread that ignores max_frames gets here
            raise AssertionError(f"{len(self.sent)} frames sent and still going")
        return False

    def wait(self, timeout: float) -> bool:
        self.clock.advance(timeout)
        return False


def test_pulse_thread_stops_by_itself_after_max_frames() -> None:
    """A PulseThread with max_frames=5 returns after its fifth frame (nobody calls stop), and
    sets ``finished``: the limit is the thread's own, not a caller polling a counter."""
    clock = ManualTime()
    sent: list[BeatFrame] = []
    schedule = BeatSchedule(
        cluster_id=CLUSTER, tempo_bpm=600, bar_length=4, start_index=40, start_time=clock.monotonic()
    )
    thread = PulseThread(schedule, sent.append, time_source=clock, max_frames=5)
    thread._stop = NeverStopped(clock, sent, bound=50)  # type: ignore[assignment]
    assert not thread.finished.is_set()
    thread._run()  # in this thread, on the manual clock: returns only by the limit
    assert [f.beat_index for f in sent] == [40, 41, 42, 43, 44]
    assert thread.finished.is_set()
    assert thread.frames_sent == 5


@pytest.mark.parametrize("bad", [0, -1, 2.5, True, "3"])
def test_max_beats_must_be_a_positive_integer(bad: Any) -> None:
    """max_beats=0, negative, a float, a bool or a string is the library's ConfigError naming it."""
    with pytest.raises(ConfigError, match="max_beats"):
        Pulse(config(f"local://{unique_bus()}"), max_beats=bad)


def test_local_pulse_publishes_exactly_max_beats_frames() -> None:
    """On local://, a pulse with max_beats=4 sends four frames and no more, however late stop() comes."""
    bus = unique_bus()
    got: list[bytes] = []
    unsubscribe = LocalBus.named(bus).subscribe(f"backbeat.beat.{CLUSTER}", lambda s, d: got.append(d))
    pulse = Pulse(config(f"local://{bus}"), tempo_bpm=6000, start_index=0, max_beats=4)
    assert pulse.max_beats == 4
    assert not pulse.wait(0)
    assert not pulse.finished
    pulse.start()
    try:
        assert pulse.wait(NEVER), "the pulse did not finish"
        assert pulse.finished
        thread = pulse._thread
        assert thread is not None
        thread._thread.join(NEVER)  # the beat thread has ended by itself: no frame can follow
        assert not thread._thread.is_alive()
    finally:
        pulse.stop()
    unsubscribe()
    assert [BeatFrame.parse(d).beat_index for d in got] == [0, 1, 2, 3]
    assert pulse.frames_sent == 4


def test_nats_pulse_publishes_exactly_max_beats_frames(
    nats_server: NatsServer, nats_runner: AsyncRunner
) -> None:
    """On NATS, max_beats=5 at 1200 BPM: five frames, even when stop() comes ten beats later
    (a loaded machine's caller); a sentinel sent after stop() shows the witness has seen all."""
    subject = f"backbeat.beat.{CLUSTER}"
    witness = Witness(nats_runner, nats_server.url, subject)
    pulse = Pulse(config(nats_server.url), tempo_bpm=1200, start_index=70, max_beats=5)
    pulse.start()
    try:
        assert pulse.wait(NEVER), "the pulse did not finish"
        time.sleep(0.5)  # ten beats at 1200 BPM: a pulse that beat on would send them now
        assert pulse.frames_sent == 5
    finally:
        pulse.stop()
    witness._runner.run(witness._nc.publish(subject, b'{"sentinel": true}'))
    witness.wait_for(lambda ds: any(d.get("sentinel") for d in ds), what="the sentinel")
    indices = [d["beat_index"] for d in witness.dicts() if "beat_index" in d]
    witness.close()
    assert indices == [70, 71, 72, 73, 74]
