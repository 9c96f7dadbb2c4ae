"""Tests for backbeat_sync.ha: the highly available pulse (a lease in a JetStream KV bucket).

Frames are read by a raw nats-py subscriber that records arrival times, and the bucket by
``read_lease``; failover tests run each replica in its own process and SIGKILL the leader.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import attrs
import pytest

from backbeat_sync import BackbeatConfig, ConfigError, Integration, Pulse
from backbeat_sync.errors import BackbeatConnectionError, JetStreamUnavailable, ProtocolError
from backbeat_sync.ha import (
    DEFAULT_BUCKET,
    Grid,
    LeaseState,
    TempoSetting,
    lease_key,
    lease_ttl_for,
    read_lease,
    tempo_key,
    write_tempo,
)

from .natsserver import AsyncRunner, NatsServer, quiet_error_cb
from .support import PATIENCE, wait_until

CHILD = Path(__file__).with_name("ha_pulse_child.py")
TEMPO = 600.0
SPB = 60.0 / TEMPO


def config(url: str | list[str], cluster: str = "ha", **changes: Any) -> BackbeatConfig:
    """A config for tests (fast reconnects)."""
    fields: dict[str, Any] = {
        "cluster_id": cluster,
        "agent_id": "ha-test",
        "nats_url": ",".join(url) if isinstance(url, list) else url,
        "reconnect_wait": 0.05,
        "reconnect_jitter": 0.01,
        "connect_timeout": 5.0,
    }
    fields.update(changes)
    return BackbeatConfig(**fields)


class Frames:
    """An outside subscriber in raw nats-py: every beat frame with its monotonic arrival time."""

    def __init__(self, runner: AsyncRunner, url: str | list[str], cluster: str = "ha") -> None:
        import nats

        self._runner = runner
        self._cond = threading.Condition()
        self.got: list[tuple[float, dict[str, Any]]] = []

        async def cb(msg: Any) -> None:
            with self._cond:
                self.got.append((time.monotonic(), json.loads(msg.data)))
                self._cond.notify_all()

        async def setup() -> Any:
            nc = await nats.connect(url, error_cb=quiet_error_cb, reconnect_time_wait=0.05)
            await nc.subscribe(f"backbeat.beat.{cluster}", cb=cb)
            await nc.flush()
            return nc

        self._nc = runner.run(setup())

    def indexes(self) -> list[int]:
        """Beat indexes in arrival order."""
        with self._cond:
            return [int(d["beat_index"]) for _, d in self.got]

    def frames(self) -> list[tuple[float, dict[str, Any]]]:
        """A copy of what arrived."""
        with self._cond:
            return list(self.got)

    def wait(self, predicate: Any, what: str, timeout: float = PATIENCE) -> None:
        """Wait until ``predicate(frames)`` holds."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while not predicate(self.got):
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"timed out after {timeout}s waiting for {what}")
                self._cond.wait(min(left, 0.1))

    def wait_after(self, t: float, n: int = 1) -> None:
        """Wait for ``n`` frames that arrived after monotonic time ``t``."""
        self.wait(lambda got: sum(1 for a, _ in got if a > t) >= n, f"{n} frame(s) after t={t:.2f}")

    def close(self) -> None:
        """Close the subscriber's connection."""
        self._runner.run(self._nc.close())


def bucket_replicas(url: str, runner: AsyncRunner) -> int:
    """Replicas of the HA pulse bucket's stream, read with raw nats-py."""
    import nats

    async def read() -> int:
        nc = await nats.connect(url)
        try:
            info = await nc.jetstream().stream_info(f"KV_{DEFAULT_BUCKET}")
            return int(info.config.num_replicas or 1)
        finally:
            await nc.close()

    return runner.run(read())


def bucket_leader(url: str, runner: AsyncRunner) -> str | None:
    """The server name leading the HA pulse bucket's stream (raw nats-py)."""
    import nats

    async def read() -> str | None:
        nc = await nats.connect(url)
        try:
            info = await nc.jetstream(timeout=10).stream_info(f"KV_{DEFAULT_BUCKET}")
            return info.cluster.leader if info.cluster is not None else None
        finally:
            await nc.close()

    return runner.run(read())


def strictly_increasing(indexes: list[int]) -> bool:
    """Every index greater than the one before (so none is seen twice)."""
    return all(a < b for a, b in itertools.pairwise(indexes))


def holder_pid(cfg: BackbeatConfig) -> int | None:
    """The process id of the replica holding the lease now (None: nobody, or released)."""
    lease = read_lease(cfg)
    if lease is None or not lease.holder:
        return None
    return int(lease.holder.split(":")[1])


class Replicas:
    """HA pulse replicas, each in its own process (``tests/ha_pulse_child.py``)."""

    def __init__(self, url: str, cluster: str = "ha", tempo: float = TEMPO, lease_ttl: float | None = None):
        self.url, self.cluster, self.tempo, self.lease_ttl = url, cluster, tempo, lease_ttl
        self.procs: dict[int, subprocess.Popen[str]] = {}

    def spawn(self, url: str | None = None) -> int:
        """Start one replica; returns its pid once it runs."""
        args = [sys.executable, str(CHILD), url or self.url, self.cluster, str(self.tempo)]
        if self.lease_ttl is not None:
            args.append(str(self.lease_ttl))
        proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert proc.stdout is not None
        line = proc.stdout.readline()  # the child's own connect timeout bounds this
        if line.strip() != "started":
            proc.kill()
            _, err = proc.communicate(timeout=PATIENCE)
            raise AssertionError(f"replica did not start: {line!r} {err[-2000:]}")
        self.procs[proc.pid] = proc
        return proc.pid

    def kill(self, pid: int) -> float:
        """SIGKILL replica ``pid``; returns the monotonic time it was dead."""
        proc = self.procs.pop(pid)
        proc.send_signal(signal.SIGKILL)
        proc.wait(PATIENCE)
        return time.monotonic()

    def close(self) -> None:
        """Stop every replica (SIGTERM, then SIGKILL)."""
        for proc in self.procs.values():
            proc.send_signal(signal.SIGTERM)
        for proc in self.procs.values():
            try:
                proc.wait(PATIENCE)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.procs.clear()


# -- the bucket's values and the grid (no server) ---------------------------------------


def test_lease_round_trips_through_json() -> None:
    """A lease value decodes to what was encoded."""
    lease = LeaseState("host:1:ab", 41, Grid(40, 1_700_000_000.25, 600.0, 4), 1.0)
    assert LeaseState.decode(lease.encode()) == lease


@pytest.mark.parametrize(
    "junk",
    [b"", b"[]", b'{"holder": 1}', b'{"holder":"","index":1}', b"\xff"],
)
def test_lease_junk_is_a_protocol_error(junk: bytes) -> None:
    """A lease value this library did not write is refused with ProtocolError."""
    with pytest.raises(ProtocolError, match="pulse lease"):
        LeaseState.decode(junk)


def test_lease_refuses_an_out_of_range_tempo() -> None:
    """A lease with tempo 0 is refused (the grid would divide by zero)."""
    doc = json.loads(LeaseState("h", 1, Grid(0, 0.0, 60.0, 4), 1.0).encode())
    doc["tempo_bpm"] = 0
    with pytest.raises(ProtocolError, match="tempo_bpm"):
        LeaseState.decode(json.dumps(doc).encode())


def test_tempo_setting_round_trips_and_refuses_junk() -> None:
    """A tempo setting decodes to what was encoded; a bad one is a ProtocolError."""
    for setting in (TempoSetting(120.0), TempoSetting(90.0, 3)):
        assert TempoSetting.decode(setting.encode()) == setting
    with pytest.raises(ProtocolError, match="bar_length"):
        TempoSetting.decode(b'{"tempo_bpm": 60, "bar_length": 0}')


def test_grid_first_index_and_retempo() -> None:
    """The grid gives each beat's time; a tempo change keeps beat k-1 and spaces k by the new tempo."""
    g = Grid(100, 1000.0, 60.0, 4)
    assert g.due(103) == 1003.0
    assert g.first_at(1002.0) == 102
    assert g.first_at(1002.5) == 103
    h = g.retempo(104, 120.0)
    assert h.due(103) == g.due(103)
    assert h.due(104) == 1003.5


def test_keys_and_ttl() -> None:
    """Keys are per cluster (encoded when the id has characters a key cannot hold); TTL is 3 beats, >= 1 s."""
    assert lease_key("c-1") == "lease.c-1"
    assert tempo_key("c-1") == "tempo.c-1"
    odd = lease_key("ümlaut:x")
    assert odd.startswith("lease.b64.")
    assert odd != lease_key("ümlaut:y")
    assert lease_ttl_for(60.0) == 3.0
    assert lease_ttl_for(6000.0) == 1.0
    assert lease_ttl_for(60.0, 0.4) == 0.4


def test_ha_needs_nats() -> None:
    """``ha=True`` with local:// is refused at construction, naming the field."""
    with pytest.raises(ConfigError, match="ha"):
        Pulse(BackbeatConfig(nats_url="local://x"), ha=True)


@pytest.mark.parametrize(
    ("field", "changes"), [("bucket", {"bucket": "a.b"}), ("lease_ttl", {"lease_ttl": 0})]
)
def test_ha_settings_are_checked(field: str, changes: dict[str, Any]) -> None:
    """A bad bucket name or lease TTL is refused at construction."""
    with pytest.raises(ConfigError, match=field):
        Pulse(BackbeatConfig(nats_url="nats://127.0.0.1:1"), ha=True, **changes)


def test_bar_length_change_needs_ha() -> None:
    """Without ha, set_tempo(bar_length=...) is refused (nothing would apply it)."""
    pulse = Pulse(BackbeatConfig(nats_url="nats://127.0.0.1:1"), tempo_bpm=60)
    with pytest.raises(ConfigError, match="bar_length"):
        pulse.set_tempo(60, bar_length=3)


# -- against a real server -----------------------------------------------------------------


@pytest.mark.nats
def test_server_without_jetstream_is_a_clear_error(nats_server: NatsServer) -> None:
    """``ha`` on a server without JetStream: start() names JetStream and the bucket; nothing runs."""
    pulse = Pulse(config(nats_server.url), tempo_bpm=TEMPO, ha=True)
    with pytest.raises(JetStreamUnavailable) as info:
        pulse.start()
    text = str(info.value)
    assert "JetStream" in text
    assert DEFAULT_BUCKET in text
    assert "-js" in text
    assert isinstance(info.value, BackbeatConnectionError)
    assert not pulse.running
    assert not [t for t in threading.enumerate() if t.name == "backbeat-pulse"]
    with pytest.raises(JetStreamUnavailable, match="JetStream"):
        write_tempo(config(nats_server.url), 120)


@pytest.mark.nats
def test_background_connect_opens_the_bucket_in_the_campaign(
    nats_jetstream: NatsServer, nats_server: NatsServer
) -> None:
    """With connect_in_background, start() returns at once: on JetStream the replica then leads;
    without JetStream it keeps trying (never leads, raises nothing) until stopped."""
    with Pulse(config(nats_jetstream.url, connect_in_background=True), tempo_bpm=TEMPO, ha=True) as pulse:
        wait_until(lambda: pulse.is_leader and pulse.frames_sent >= 2, what="leading")
    plain = Pulse(config(nats_server.url, connect_in_background=True), tempo_bpm=TEMPO, ha=True)
    plain.start()
    try:
        wait_until(lambda: plain.connected, what="connected")
        time.sleep(0.3)  # several campaign attempts (one every poll): none may escape
        assert not plain.is_leader
        assert plain.frames_sent == 0
    finally:
        plain.stop()
    assert not [t for t in threading.enumerate() if t.name == "backbeat-pulse"]


@pytest.mark.nats
def test_tempo_needs_the_bucket(nats_jetstream: NatsServer) -> None:
    """write_tempo before any HA pulse ran: the error says the bucket is missing and who creates it."""
    with pytest.raises(JetStreamUnavailable, match=r"no such bucket.*pulse --ha"):
        write_tempo(config(nats_jetstream.url), 120)


@pytest.mark.nats
def test_one_leader_and_a_clean_handover(nats_jetstream: NatsServer, nats_runner: AsyncRunner) -> None:
    """Two replicas: one publishes; when it stops, the other continues at the next index, no gap."""
    frames = Frames(nats_runner, nats_jetstream.url)
    cfg = config(nats_jetstream.url)
    a = Pulse(cfg, tempo_bpm=TEMPO, ha=True)
    b = Pulse(cfg, tempo_bpm=TEMPO, ha=True)
    a.start()
    try:
        frames.wait(lambda got: len(got) >= 3, "a's first frames")
        b.start()
        try:
            frames.wait(lambda got: len(got) >= 10, "more frames")
            assert (a.is_leader, b.is_leader) == (True, False)
            assert b.frames_sent == 0
            a.stop()  # releases the lease: b takes it without waiting for the TTL
            stopped = time.monotonic()
            frames.wait_after(stopped, 5)
            assert b.is_leader
            assert b.frames_sent >= 5
            assert b.stats()["terms"] == 1
        finally:
            b.stop()
    finally:
        a.stop()
        frames.close()
    idx = frames.indexes()
    assert strictly_increasing(idx), idx
    # A clean handover (release, then take) costs no beat on an idle machine; a loaded one
    # may skip a late beat, never repeat one.
    assert len(idx) == len(set(idx))


@pytest.mark.nats
def test_tempo_applies_at_the_next_downbeat(nats_jetstream: NatsServer, nats_runner: AsyncRunner) -> None:
    """write_tempo: the leader switches on a downbeat; the bucket's grid carries the new tempo."""
    frames = Frames(nats_runner, nats_jetstream.url)
    cfg = config(nats_jetstream.url)
    with Pulse(cfg, tempo_bpm=TEMPO, ha=True) as pulse:
        frames.wait(lambda got: len(got) >= 3, "first frames")
        write_tempo(cfg, 300)
        frames.wait(lambda got: sum(1 for _, d in got if d["tempo_bpm"] == 300) >= 6, "frames at 300 BPM")
        assert pulse.tempo_bpm == 300.0
        lease = read_lease(cfg)
        assert lease is not None
        assert lease.grid.tempo_bpm == 300.0
    frames.close()
    got = [d for _, d in frames.frames()]
    first = next(i for i, d in enumerate(got) if d["tempo_bpm"] == 300)
    assert got[first]["downbeat"] is True
    assert all(d["tempo_bpm"] == 300 for d in got[first:])
    assert all(d["tempo_bpm"] == 600 for d in got[:first])


@pytest.mark.nats
def test_set_tempo_and_bar_length_reach_the_leader(
    nats_jetstream: NatsServer, nats_runner: AsyncRunner
) -> None:
    """Pulse.set_tempo on a standby writes the bucket; the leader applies tempo and bar length."""
    frames = Frames(nats_runner, nats_jetstream.url)
    cfg = config(nats_jetstream.url)
    with Pulse(cfg, tempo_bpm=TEMPO, ha=True) as leader:
        frames.wait(lambda got: len(got) >= 2, "first frames")
        with Pulse(cfg, tempo_bpm=60, ha=True) as standby:
            assert not standby.is_leader
            standby.set_tempo(450, bar_length=3)
            frames.wait(
                lambda got: sum(1 for _, d in got if d.get("bar_length") == 3 and d["tempo_bpm"] == 450) >= 6,
                "frames at 450 BPM in bars of 3",
            )
            assert leader.is_leader
            assert standby.frames_sent == 0
    frames.close()
    got = [d for _, d in frames.frames()]
    first3 = next(i for i, d in enumerate(got) if d.get("bar_length") == 3)
    assert got[first3]["beat_index"] % 3 == 0
    assert got[first3]["downbeat"] is True
    for d in got[first3:]:
        assert d["downbeat"] == (d["beat_index"] % 3 == 0)
        assert d["window_id"] == f"w-{d['beat_index'] // 3}"


@pytest.mark.nats
def test_a_new_bucket_starts_from_the_pulse_settings(nats_jetstream: NatsServer) -> None:
    """The first leader writes its start index, tempo and bar length as the cluster's grid."""
    cfg = config(nats_jetstream.url)
    with Pulse(cfg, tempo_bpm=TEMPO, bar_length=5, start_index=1000, ha=True) as pulse:
        wait_until(lambda: pulse.frames_sent >= 1, what="a frame")
        running = read_lease(cfg)
    lease = read_lease(cfg)
    assert running is not None
    assert lease is not None
    assert running.holder.split(":")[1] == str(os.getpid())
    assert lease.holder == ""  # released at stop
    assert (lease.grid.index, lease.grid.tempo_bpm, lease.grid.bar_length) == (1000, TEMPO, 5)
    assert lease.index >= 1000
    assert lease.ttl == 1.0


@pytest.mark.nats
def test_failover_after_sigkill_is_prompt(nats_jetstream: NatsServer, nats_runner: AsyncRunner) -> None:
    """SIGKILL the leader: the new leader's first frame comes within 3 beats plus the lease TTL,
    on the old grid (the anchor in the bucket is unchanged), at an index past every one published."""
    frames = Frames(nats_runner, nats_jetstream.url)
    cfg = config(nats_jetstream.url)
    reps = Replicas(nats_jetstream.url)
    agent = Integration(config(nats_jetstream.url, agent_id="ha-agent", tempo_bpm=TEMPO), node_id="n-ha")
    try:
        reps.spawn()
        reps.spawn()
        agent.start()
        frames.wait(lambda got: len(got) >= 5, "frames from the first leader")
        wait_until(lambda: agent.get_health()["beats_received"] >= 3, what="the agent following the beat")
        wait_until(lambda: holder_pid(cfg) in reps.procs, what="a live leader in the bucket")
        before = read_lease(cfg)
        assert before is not None
        pid = holder_pid(cfg)
        assert pid is not None
        killed = reps.kill(pid)
        last_before = max(frames.indexes())
        frames.wait(
            lambda got: any(a > killed and d["beat_index"] > last_before + 1 for a, d in got), "new leader"
        )
        got = frames.frames()
        arrival, first = next((a, d) for a, d in got if a > killed and d["beat_index"] > last_before + 1)
        took = arrival - killed
        bound = 3 * SPB + before.ttl
        assert took <= bound, f"first frame {took:.3f} s after the kill (bound {bound:.3f} s)"
        after = read_lease(cfg)
        assert after is not None
        assert after.holder != before.holder
        assert after.grid == before.grid
        assert first["beat_index"] > before.index
        wait_until(
            lambda: agent.get_health()["current_beat"] >= first["beat_index"], what="the agent past it"
        )
        health = agent.get_health()
    finally:
        agent.stop()
        reps.close()
        frames.close()
    assert strictly_increasing(frames.indexes())
    # The agent saw missed beats, and nothing else: no pulse reset, no error about one.
    assert health["missed_beats"] >= first["beat_index"] - last_before - 1
    assert health["pulse_resets"] == 0
    assert not [e for e in health["errors"] if "reset" in e], health["errors"]


@pytest.mark.nats
def test_a_paused_leader_is_fenced(nats_jetstream: NatsServer, nats_runner: AsyncRunner) -> None:
    """SIGSTOP the leader until a standby has taken over, then SIGCONT it: the old leader never
    publishes again out of turn (one strictly increasing sequence), and the new one keeps the lease."""
    frames = Frames(nats_runner, nats_jetstream.url)
    cfg = config(nats_jetstream.url)
    reps = Replicas(nats_jetstream.url)
    try:
        reps.spawn()
        reps.spawn()
        wait_until(lambda: holder_pid(cfg) in reps.procs, what="a live leader")
        frames.wait(lambda got: len(got) >= 5, "frames from the first leader")
        old = holder_pid(cfg)
        assert old is not None
        reps.procs[old].send_signal(signal.SIGSTOP)
        try:
            wait_until(lambda: holder_pid(cfg) not in (None, old), what="a new leader")
            frames.wait_after(time.monotonic(), 5)
        finally:
            reps.procs[old].send_signal(signal.SIGCONT)
        resumed = time.monotonic()
        frames.wait_after(resumed, 10)
        new = holder_pid(cfg)
    finally:
        reps.close()
        frames.close()
    assert new not in (None, old)
    idx = frames.indexes()
    assert strictly_increasing(idx), idx


@pytest.mark.nats
def test_a_slow_renewal_is_fenced(nats_jetstream: NatsServer, nats_runner: AsyncRunner) -> None:
    """A renewal that lands but is answered too late (after half the TTL): the leader does not
    publish the beat it won, finds its own write in the key and leads on from the next beat."""
    frames = Frames(nats_runner, nats_jetstream.url)
    cfg = config(nats_jetstream.url)
    slow = threading.Event()
    with Pulse(cfg, tempo_bpm=TEMPO, ha=True, lease_ttl=2.0) as pulse:
        wait_until(lambda: pulse.is_leader and pulse.frames_sent >= 3, what="leading")
        link: Any = pulse._link
        kv = link._kv
        update = kv.update
        won: list[int] = []

        async def slow_update(key: str, value: bytes, last: int | None = None) -> int:
            rev = int(await update(key, value, last=last))
            if slow.is_set():
                slow.clear()
                won.append(json.loads(value)["index"])
                await asyncio.sleep(1.5)  # the answer comes after half the TTL: too late
            return rev

        kv.update = slow_update
        slow.set()
        sent = pulse.frames_sent
        try:
            wait_until(
                lambda: bool(won) and pulse.frames_sent >= sent + 5, what="frames after the slow renewal"
            )
        except AssertionError as exc:
            raise AssertionError(f"{exc}: won={won} stats={pulse.stats()} lost={link.lost_leases}") from None
        stats = pulse.stats()
        assert pulse.is_leader
    frames.close()
    assert stats["terms"] == 1  # it found its own write: the same term, not a new election
    idx = frames.indexes()
    assert won[0] not in idx
    assert strictly_increasing(idx)


@pytest.mark.nats
@pytest.mark.timeout(240)
def test_five_leader_kills_keep_one_sequence(nats_jetstream: NatsServer, nats_runner: AsyncRunner) -> None:
    """Over 5 SIGKILLed leaders an outside subscriber sees indexes strictly increasing, no index
    twice, and the failover gaps only across a kill. (Elsewhere a loaded machine may make a
    leader skip a beat that would leave a beat late, as the plain pulse does: a beat or two,
    never a failover's worth.)"""
    frames = Frames(nats_runner, nats_jetstream.url)
    cfg = config(nats_jetstream.url)
    reps = Replicas(nats_jetstream.url)
    kills: list[float] = []
    try:
        for _ in range(3):
            reps.spawn()
        for _ in range(5):
            wait_until(lambda: holder_pid(cfg) in reps.procs, what="a live leader in the bucket")
            mark = time.monotonic()
            frames.wait_after(mark, 3)
            pid = holder_pid(cfg)
            assert pid is not None
            kills.append(reps.kill(pid))
            reps.spawn()
        frames.wait_after(time.monotonic(), 3)
    finally:
        reps.close()
        frames.close()
    got = frames.frames()
    idx = [int(d["beat_index"]) for _, d in got]
    assert strictly_increasing(idx), idx
    gaps = [
        (got[i][0], got[i + 1][0], idx[i + 1] - idx[i] - 1)
        for i in range(len(got) - 1)
        if idx[i + 1] > idx[i] + 1
    ]
    at_kill = [g for g in gaps if any(g[0] <= k + SPB and k < g[1] for k in kills)]
    stray = [g for g in gaps if g not in at_kill]
    assert [g for g in stray if g[2] > 2] == [], f"failover-sized gaps away from a kill (kills at {kills})"
    # Each kill costs about the lease TTL (1 s = 10 beats): one such gap per kill.
    assert len([g for g in at_kill if g[2] >= 5]) == len(kills), (at_kill, kills)


@pytest.mark.nats
@pytest.mark.timeout(240)
def test_three_node_cluster_survives_the_leaders_node(
    nats_js_cluster: list[NatsServer], nats_runner: AsyncRunner
) -> None:
    """Three replicas, each on its own node of a 3-node JetStream cluster (bucket with 3 replicas):
    kill the node the leader is connected to; the pulse goes on, one sequence, and an agent
    on a surviving node sees no pulse reset."""
    servers = nats_js_cluster
    urls = [s.url for s in servers]
    cfg = config(urls)
    reps = Replicas(urls[0])
    pid_node: dict[int, int] = {}
    for i, s in enumerate(servers):
        pid_node[reps.spawn(s.url)] = i
    try:
        wait_until(lambda: holder_pid(cfg) in reps.procs, what="a leader")
        leader_node = pid_node[holder_pid(cfg) or -1]
        survivor = servers[(leader_node + 1) % 3]
        frames = Frames(nats_runner, survivor.url)
        assert bucket_replicas(survivor.url, nats_runner) == 3  # no single node holds the lease
        agent = Integration(config(survivor.url, agent_id="ha-agent"), node_id="n-ha")
        agent.start()
        try:
            frames.wait(lambda got: len(got) >= 5, "frames before the kill")
            servers[leader_node].kill()
            killed = time.monotonic()
            frames.wait_after(killed, 10)
            health = agent.get_health()
        finally:
            agent.stop()
            frames.close()
    finally:
        reps.close()
    idx = frames.indexes()
    assert strictly_increasing(idx), idx
    assert health["pulse_resets"] == 0
    assert not [e for e in health["errors"] if "reset" in e], health["errors"]


@pytest.mark.nats
@pytest.mark.timeout(240)
def test_three_node_cluster_survives_the_buckets_leader_node(
    nats_js_cluster: list[NatsServer], nats_runner: AsyncRunner
) -> None:
    """Kill the node that leads the bucket's stream (JetStream elects another among the two left):
    the renewals that fail meanwhile cost beats, never the sequence; the pulse goes on."""
    servers = nats_js_cluster
    urls = [s.url for s in servers]
    reps = Replicas(urls[0])
    for s in servers:
        reps.spawn(s.url)
    try:
        wait_until(lambda: holder_pid(config(urls)) in reps.procs, what="a leader")
        stream_leader = bucket_leader(urls[0], nats_runner)
        doomed = next(i for i, s in enumerate(servers) if s.name == stream_leader)
        survivor = servers[(doomed + 1) % 3]
        frames = Frames(nats_runner, survivor.url)
        try:
            frames.wait(lambda got: len(got) >= 5, "frames before the kill")
            servers[doomed].kill()
            killed = time.monotonic()
            frames.wait_after(killed, 10)
            after = bucket_leader(survivor.url, nats_runner)
        finally:
            frames.close()
    finally:
        reps.close()
    assert after not in (None, stream_leader)
    idx = frames.indexes()
    assert strictly_increasing(idx), idx
    got = frames.frames()
    first_after = next(a for a, _ in got if a > killed)
    print(
        f"\nbucket leader killed: first frame {first_after - killed:.2f} s later, largest gap"
        f" {max(b - a for a, b in itertools.pairwise(idx)) - 1} beats"
    )


@pytest.mark.nats
def test_released_lease_of_a_killed_bucket_state_is_continued(nats_jetstream: NatsServer) -> None:
    """A pulse started after every replica stopped continues the sequence from the bucket."""
    cfg = config(nats_jetstream.url)
    with Pulse(cfg, tempo_bpm=TEMPO, start_index=5000, ha=True) as first:
        wait_until(lambda: first.frames_sent >= 3, what="frames")
    lease = read_lease(cfg)
    assert lease is not None
    with Pulse(cfg, tempo_bpm=60, start_index=0, ha=True) as second:
        wait_until(lambda: second.frames_sent >= 1, what="a frame")
        assert second.tempo_bpm == TEMPO  # the bucket's grid wins over the replica's own settings
    after = read_lease(cfg)
    assert after is not None
    assert after.index > lease.index
    assert attrs.evolve(after.grid) == lease.grid


@pytest.mark.nats
def test_ha_leader_publishes_exactly_max_beats_frames(nats_jetstream: NatsServer) -> None:
    """An HA pulse with max_beats=3 leads, sends three frames, and beats no more while it
    still holds the lease (stop() comes five beats later); stop() then hands the lease over."""
    pulse = Pulse(config(nats_jetstream.url), tempo_bpm=TEMPO, start_index=0, ha=True, max_beats=3)
    pulse.start()
    try:
        assert pulse.wait(PATIENCE), f"no third frame: {pulse.stats()}"
        time.sleep(0.5)  # five beats at 600 BPM: a leader that beat on would send them now
        assert pulse.frames_sent == 3
    finally:
        pulse.stop()
    assert pulse.frames_sent == 3
    lease = read_lease(config(nats_jetstream.url))
    assert lease is not None
    assert lease.holder == ""
