"""Tests for backbeat_sync.integration on the in-process transport."""

from __future__ import annotations

import threading
from typing import Any

import pytest
from loguru import logger

from backbeat_sync import (
    BackbeatConfig,
    BackbeatDisabled,
    BeatFrame,
    ConfigError,
    DuplicateOperation,
    Integration,
    IntegrationAlreadyStarted,
    IntegrationNotStarted,
    InvalidArgument,
    InvalidPhaseTransition,
    OperationNotFound,
    OperationPhase,
    StatusClaim,
    get_default_integration,
)
from backbeat_sync.protocol import parse_status_claim
from backbeat_sync.transport.local import LocalBus

from .support import PATIENCE, ClaimLog, manual_integration, unique_bus, wait_until

HEALTH_KEYS = {
    "enabled",
    "started",
    "connected",
    "current_beat",
    "current_tempo",
    "measured_bpm",
    "tempo_drift",
    "reconnect_count",
    "active_operations",
    "local_degradation",
    "errors",
    "node_id",
}


def states(claims: list[StatusClaim]) -> list[tuple[int, str, str | None, int, float]]:
    return [(c.beat_index, c.state, c.phase, c.beats_left, c.progress) for c in claims]


def test_seed_election_flow_claims_exactly() -> None:
    """The seed's election flow gives exactly the claims PROTOCOL.md prescribes, in order."""
    with manual_integration() as (i, pulse, log):
        pulse.beat(100)
        wait_until(lambda: i.clock.current_beat == 100)
        i.start_p2p_operation("election-leader-2025", "election", 5, {"candidates": 3, "quorum": 2})
        i.update_p2p_operation_phase("election-leader-2025", OperationPhase.CONNECTING, 3)
        pulse.beat(101)
        log.wait_for(lambda cs: any(c.beat_index == 101 and c.task_id.startswith("election") for c in cs))
        i.update_p2p_operation_phase("election-leader-2025", OperationPhase.NEGOTIATING, 3)
        pulse.beat(102)
        log.wait_for(lambda cs: any(c.beat_index == 102 and c.task_id.startswith("election") for c in cs))
        i.update_p2p_operation_phase("election-leader-2025", OperationPhase.EXECUTING, 3)
        i.complete_p2p_operation("election-leader-2025", 3)
        log.wait_for(lambda cs: any(c.state == "done" for c in cs))
        claims = log.for_task("election-leader-2025")
    assert states(claims) == [
        (100, "executing", "started", 5, 0.0),
        (100, "executing", "connecting", 5, 0.0),
        (101, "executing", "connecting", 4, 0.2),
        (101, "executing", "negotiating", 4, 0.2),
        (102, "executing", "negotiating", 3, 0.4),
        (102, "executing", "executing", 3, 0.4),
        (102, "done", "completed", 0, 1.0),
    ]
    assert claims[0].notes == "P2P election: started (peers: 0, node: node-1)"
    assert claims[1].notes == "P2P election: connecting (peers: 3, node: node-1)"
    assert claims[-1].notes == "P2P election: completed (peers: 3, node: node-1)"
    for c in claims:
        assert (c.cluster_id, c.agent_id, c.node_id, c.operation_type) == (
            "test",
            "agent-1",
            "node-1",
            "election",
        )
        assert parse_status_claim(c.encode()) == c


def test_seed_dht_pubsub_discovery_flows() -> None:
    """DHT store, PubSub sync and peer discovery flows; a failure claims the seed's failed line."""
    with manual_integration() as (i, pulse, log):
        pulse.beat(8)
        wait_until(lambda: i.clock.current_beat == 8)
        i.start_p2p_operation("dht-store-k1", "dht_store", 3, {"key": "k1"})
        i.start_p2p_operation("pubsub-sync-m1", "pubsub_sync", 2, {"topic": "t"})
        i.start_p2p_operation("peer-discovery-s1", "peer_discovery", 5, {"target_peers": 10})
        i.update_p2p_operation_phase("dht-store-k1", OperationPhase.EXECUTING, 5)
        pulse.beat(9)
        log.wait_for(lambda cs: sum(c.beat_index == 9 for c in cs) >= 3)
        i.complete_p2p_operation("dht-store-k1", 5)
        i.complete_p2p_operation("pubsub-sync-m1", 4)
        i.fail_p2p_operation("peer-discovery-s1", "quorum not reached within timeout")
        log.wait_for(lambda cs: sum(c.state in ("done", "failed") for c in cs) >= 3)
        assert i.get_health()["active_operations"] == 0
    dht = log.for_task("dht-store-k1")
    assert states(dht) == [
        (8, "executing", "started", 3, 0.0),
        (8, "executing", "executing", 3, 0.0),
        (9, "executing", "executing", 2, pytest.approx(1 / 3)),
        (9, "done", "completed", 0, 1.0),
    ]
    assert dht[-1].notes == "P2P dht_store: completed (peers: 5, node: node-1)"
    failed = log.for_task("peer-discovery-s1")[-1]
    assert (failed.state, failed.beats_left, failed.progress) == ("failed", 0, 0.0)
    assert failed.notes == "P2P operation failed: quorum not reached within timeout (type: peer_discovery)"
    assert failed.phase == "failed"


def test_progress_caps_and_beats_left_floor() -> None:
    """Past its estimate an operation claims beats_left 0 and progress 1.0, still executing."""
    with manual_integration() as (i, pulse, log):
        pulse.beat(1)
        wait_until(lambda: i.clock.current_beat == 1)
        i.start_p2p_operation("slow", "election", 2)
        for b in (2, 3, 4, 5):
            pulse.beat(b)
        log.wait_for(lambda cs: any(c.beat_index == 5 and c.task_id == "slow" for c in cs))
    beat5 = next(c for c in log.for_task("slow") if c.beat_index == 5)
    assert (beat5.state, beat5.beats_left, beat5.progress) == ("executing", 0, 1.0)


def test_health_claim_every_8_beats() -> None:
    """A health claim goes out on beats whose index is a multiple of health_every_beats."""
    with manual_integration() as (i, pulse, log):
        for b in range(1, 18):
            pulse.beat(b)
        log.wait_for(lambda cs: sum(c.task_id == "chorus-p2p-health" for c in cs) >= 2)
        i.start_p2p_operation("op", "election", 30)
        for b in range(18, 25):  # in order: a jump of 7 in no time would be a pulse reset forward
            pulse.beat(b)
        log.wait_for(lambda cs: sum(c.task_id == "chorus-p2p-health" for c in cs) >= 3)
    health = log.for_task("chorus-p2p-health")
    assert [c.beat_index for c in health] == [8, 16, 24]
    assert [c.state for c in health] == ["waiting", "waiting", "executing"]
    assert health[0].notes == "CHORUS P2P healthy: connected=true, operations=0, tempo=60 BPM, node=node-1"
    assert (health[0].beats_left, health[0].progress) == (0, 1.0)
    assert "operations=1" in health[2].notes


def test_health_state_executing_with_operations() -> None:
    """Health claims say executing while operations are active and no error is recent."""
    with manual_integration(health_every_beats=2) as (i, pulse, log):
        pulse.beat(1)
        wait_until(lambda: i.clock.current_beat == 1)
        i.start_p2p_operation("op", "election", 30)
        pulse.beat(2)
        log.wait_for(lambda cs: any(c.task_id == "chorus-p2p-health" for c in cs))
    assert log.for_task("chorus-p2p-health")[0].state == "executing"


def test_downbeat_cleans_finished_operations() -> None:
    """Finished operations stop counting at once and leave the registry on the next downbeat."""
    with manual_integration() as (i, pulse, _log):
        pulse.beat(1)
        wait_until(lambda: i.clock.current_beat == 1)
        i.start_p2p_operation("a", "election", 2)
        i.complete_p2p_operation("a", 1)
        assert i.get_health()["active_operations"] == 0
        assert i.registry.finished_count == 1
        assert i.registry.get("a").phase is OperationPhase.COMPLETED
        pulse.beat(2)
        pulse.beat(4)
        wait_until(lambda: i.registry.finished_count == 0, what="downbeat clean-up")
        with pytest.raises(OperationNotFound):
            i.registry.get("a")


def test_health_has_every_protocol_key_at_every_moment() -> None:
    """get_health() has the PROTOCOL.md keys before start, while running and after stop."""
    bus = unique_bus()
    cfg = BackbeatConfig(cluster_id="test", agent_id="a", nats_url=f"local://{bus}?pulse=manual")
    i = Integration(cfg, node_id="n")
    before = i.get_health()
    assert set(before) >= HEALTH_KEYS
    assert (before["started"], before["connected"], before["local_degradation"]) == (False, False, False)
    assert before["tempo_drift"] == "unknown"
    assert before["measured_bpm"] == 0.0
    with i:
        during = i.get_health()
        assert (during["started"], during["connected"], during["enabled"]) == (True, True, True)
        assert during["node_id"] == "n"
        assert during["errors"] == []
    after = i.get_health()
    assert set(after) >= HEALTH_KEYS
    assert (after["started"], after["connected"]) == (False, False)


def test_local_degradation_on_silence_and_recovery() -> None:
    """No frame for more than two beats degrades; beats coming back clears it.

    On a manual clock: with real time, a busy machine could stretch the silence after
    the last beat (or the handling of a beat) past the limit before health is read.
    """
    from backbeat_sync import ManualTime

    from .support import HandledBeats, ManualPulse

    t = ManualTime()
    bus = unique_bus()
    url = f"local://{bus}?pulse=manual"
    cfg = BackbeatConfig(cluster_id="test", agent_id="a", nats_url=url, tempo_bpm=600)
    i = Integration(cfg, node_id="n", time_source=t)
    pulse = ManualPulse(bus, "test", tempo_bpm=600, handled=HandledBeats(i))  # 0.1 s beats
    with i:
        pulse.beat(1)
        t.advance(0.19)  # almost two beats of silence: not yet
        assert not i.get_health()["local_degradation"]
        t.advance(0.02)  # more than two
        assert i.get_health()["local_degradation"]
        pulse.beat(2)
        t.advance(0.1)
        pulse.beat(3)
        assert not i.get_health()["local_degradation"]


def test_missed_beats_degrade_current_bar() -> None:
    """A gap in the current bar shows in local_degradation and missed_beats."""
    with manual_integration() as (i, pulse, _log):
        pulse.beat(4)
        pulse.beat(6)
        wait_until(lambda: i.clock.current_beat == 6)
        health = i.get_health()
        assert health["missed_beats"] == 1
        assert health["local_degradation"] is True


def test_bad_frames_are_counted_never_raised() -> None:
    """Malformed, wrong-typed and other-cluster frames are counted and logged; the beat goes on."""
    with manual_integration() as (i, pulse, _log):
        pulse.raw(b"garbage")
        pulse.raw(b'{"type":"backbeat.beatframe.v1"}')
        pulse.beat(3, cluster_id="other-cluster", wait=False)
        pulse.beat(5)
        wait_until(lambda: i.clock.current_beat == 5)
        health = i.get_health()
    assert health["rejected_frames"] == 2
    assert health["foreign_frames"] == 1
    # one entry for both (rejections aggregate), naming the last reason and the one before
    [entry] = [e for e in health["errors"] if e.startswith("rejected beat frame: ")]
    assert "missing required field" in entry
    assert "2 malformed frames since" in entry
    assert "also: not JSON" in entry


def test_errors_keep_the_last_ten() -> None:
    """errors holds at most the 10 newest messages, newest last."""
    with manual_integration() as (i, _pulse, _log):
        for n in range(15):
            i.record_error(f"problem {n}")
        errors = i.get_health()["errors"]
    assert errors == [f"problem {n}" for n in range(5, 15)]


def test_callbacks_beat_downbeat_claim_and_unregister() -> None:
    """on_beat/on_downbeat get each frame; the returned function unregisters; registered before start."""
    bus = unique_bus()
    cfg = BackbeatConfig(cluster_id="test", agent_id="a", nats_url=f"local://{bus}?pulse=manual")
    i = Integration(cfg, node_id="n")
    beats: list[int] = []
    downbeats: list[int] = []
    done = threading.Event()
    i.on_beat(lambda f: beats.append(f.beat_index))
    i.on_downbeat(lambda f: (downbeats.append(f.beat_index), done.set() if f.beat_index == 8 else None))
    remove = i.on_beat(lambda f: beats.append(-f.beat_index))
    from .support import ManualPulse

    pulse = ManualPulse(bus, "test")
    with i:
        pulse.beat(3)
        pulse.beat(4)
        wait_until(lambda: -4 in beats)
        remove()
        pulse.beat(5)
        pulse.beat(8)
        assert done.wait(PATIENCE)
    assert beats == [3, -3, 4, -4, 5, 8]
    assert downbeats == [4, 8]


def test_raising_callback_is_logged_and_counted() -> None:
    """A callback that raises on every beat is counted in errors; beats and claims go on."""
    with manual_integration() as (i, pulse, log):

        def bad(frame: BeatFrame) -> None:
            raise RuntimeError("boom")

        i.on_beat(bad)
        i.start_p2p_operation("op", "election", 10)
        for b in range(1, 6):
            pulse.beat(b)
        log.wait_for(lambda cs: any(c.beat_index == 5 and c.task_id == "op" for c in cs))
        wait_until(lambda: i.get_health()["callback_errors"] == 5)
        assert any("on_beat callback" in e and "RuntimeError: boom" in e for e in i.get_health()["errors"])


def test_blocked_callback_reported_and_beats_go_on() -> None:
    """A callback blocked for several beats shows in health; claims for beats keep flowing."""
    release = threading.Event()
    entered = threading.Event()
    with manual_integration(tempo_bpm=600) as (i, pulse, _log):
        claims = ClaimLog()

        def block(frame: BeatFrame) -> None:
            entered.set()
            release.wait(PATIENCE)

        i.on_beat(block)
        i.start_p2p_operation("op", "election", 50)
        i.on_claim(claims)
        pulse.beat(1)
        assert entered.wait(PATIENCE)
        wait_until(lambda: i.get_health()["blocked_callback"] is not None, what="blocked report")
        pulse.beat(2)
        pulse.beat(3)
        wait_until(lambda: i.clock.current_beat == 3)
        assert "block" in i.get_health()["blocked_callback"]
        # beats 2 and 3 were handled while it was blocked: each checks, the first records it
        assert any("callback blocked" in e for e in i.get_health()["errors"])
        release.set()
        wait_until(lambda: i.get_health()["blocked_callback"] is None)


def test_api_errors() -> None:
    """The seed's errors as exceptions: not started, not found, duplicate, bad arguments, backwards."""
    bus = unique_bus()
    cfg = BackbeatConfig(cluster_id="test", agent_id="a", nats_url=f"local://{bus}?pulse=manual")
    i = Integration(cfg, node_id="n")
    with pytest.raises(IntegrationNotStarted, match="not started"):
        i.start_p2p_operation("x", "election", 3)
    with i:
        with pytest.raises(IntegrationAlreadyStarted):
            i.start()
        i.start_p2p_operation("x", "election", 3)
        with pytest.raises(DuplicateOperation, match="x"):
            i.start_p2p_operation("x", "election", 3)
        with pytest.raises(OperationNotFound, match="operation nope not found"):
            i.update_p2p_operation_phase("nope", OperationPhase.EXECUTING, 1)
        with pytest.raises(OperationNotFound):
            i.complete_p2p_operation("nope", 1)
        with pytest.raises(OperationNotFound):
            i.fail_p2p_operation("nope", "r")
        for bad in (0, -1, 1.5, True, "3"):
            with pytest.raises(InvalidArgument, match="estimated_beats"):
                i.start_p2p_operation("y", "election", bad)  # type: ignore[arg-type]
        with pytest.raises(InvalidArgument, match="operation_id"):
            i.start_p2p_operation("", "election", 3)
        with pytest.raises(InvalidArgument, match="peer_count"):
            i.update_p2p_operation_phase("x", OperationPhase.EXECUTING, -1)
        with pytest.raises(InvalidArgument, match="phase"):
            i.update_p2p_operation_phase("x", "dancing", 1)
        i.update_p2p_operation_phase("x", OperationPhase.NEGOTIATING, 2)
        with pytest.raises(InvalidPhaseTransition, match=r"negotiating.*connecting"):
            i.update_p2p_operation_phase("x", OperationPhase.CONNECTING, 2)
        i.update_p2p_operation_phase("x", "negotiating", 4)  # same phase: peers only
        assert i.registry.get("x").peer_count == 4
        i.complete_p2p_operation("x", 4)
        with pytest.raises(OperationNotFound):
            i.complete_p2p_operation("x", 4)
    i.stop()  # idempotent
    with pytest.raises(IntegrationAlreadyStarted):
        i.start()


def test_disabled_and_bad_construction() -> None:
    """enabled=False raises BackbeatDisabled; an empty node id is a ConfigError."""
    with pytest.raises(BackbeatDisabled, match="disabled"):
        Integration(BackbeatConfig(enabled=False), node_id="n")
    with pytest.raises(ConfigError, match="node_id"):
        Integration(BackbeatConfig(nats_url="local://"), node_id="")
    with pytest.raises(TypeError, match="BackbeatConfig"):
        Integration({"nats_url": "local://"}, node_id="n")  # type: ignore[arg-type]


def test_stop_fails_active_operations() -> None:
    """stop() gives every active operation a final failed claim ('integration stopped')."""
    with manual_integration() as (i, pulse, log):
        pulse.beat(1)
        wait_until(lambda: i.clock.current_beat == 1)
        i.start_p2p_operation("left-open", "dht_store", 3)
    final = log.for_task("left-open")[-1]
    assert final.state == "failed"
    assert final.notes == "P2P operation failed: integration stopped (type: dht_store)"


def test_stop_joins_every_thread() -> None:
    """After stop() no thread the integration started is alive."""
    before = set(threading.enumerate())
    bus = unique_bus()
    with Integration(
        BackbeatConfig(cluster_id="t", agent_id="a", nats_url=f"local://{bus}", tempo_bpm=3000), node_id="n"
    ) as i:
        wait_until(lambda: i.clock.current_beat > 0)
        assert len(set(threading.enumerate()) - before) >= 3
    assert set(threading.enumerate()) - before == set()


def test_default_integration_is_first_started() -> None:
    """The first started integration becomes the process default until it stops."""
    with manual_integration() as (i, _pulse, _log):
        assert get_default_integration() is i
    assert get_default_integration() is None


def test_seed_log_lines(capsys: pytest.CaptureFixture[str]) -> None:
    """The seed's log lines: started, beat, downbeat, cleanup, stopped."""
    lines: list[str] = []
    logger.enable("backbeat_sync")
    sink = logger.add(lambda m: lines.append(str(m).rstrip()), level="INFO", format="{message}")
    try:
        with manual_integration() as (i, pulse, _log):
            pulse.beat(12344, phase="downbeat")
            pulse.beat(12345, phase="upbeat")
            wait_until(lambda: i.clock.current_beat == 12345)
            wait_until(lambda: any("beat=12345" in x for x in lines))
    finally:
        logger.remove(sink)
        logger.disable("backbeat_sync")
    text = "\n".join(lines)
    assert "🎵 CHORUS BACKBEAT integration started - cluster=test agent=agent-1" in text
    assert "🥁 BACKBEAT beat received - beat=12345 phase=upbeat tempo=60 window=w-3086" in text
    assert "🎼 BACKBEAT downbeat - new bar started - beat=12344 window=w-3086" in text
    assert "🧹 BACKBEAT operations cleanup check - active: 0" in text
    assert "🎵 CHORUS BACKBEAT integration stopped" in text


def test_user_logger_gets_preformatted_lines() -> None:
    """A user logger with info/warn/error receives the seed's lines."""

    class Recorder:
        def __init__(self) -> None:
            self.lines: list[tuple[str, str]] = []

        def info(self, msg: str, *args: Any) -> None:
            self.lines.append(("info", msg))

        def warn(self, msg: str, *args: Any) -> None:
            self.lines.append(("warn", msg))

        def error(self, msg: str, *args: Any) -> None:
            self.lines.append(("error", msg))

    rec = Recorder()
    bus = unique_bus()
    cfg = BackbeatConfig(cluster_id="t", agent_id="a", nats_url=f"local://{bus}?pulse=manual")
    with Integration(cfg, node_id="n", logger=rec):
        pass
    assert ("info", "🎵 CHORUS BACKBEAT integration started - cluster=t agent=a") in rec.lines
    assert ("info", "🎵 CHORUS BACKBEAT integration stopped") in rec.lines


def test_local_bus_subscribers_get_encoded_claims() -> None:
    """Claims published on the local bus are canonical JSON on the status subject."""
    with manual_integration() as (i, _pulse, _log):
        bus = i.transport.bus  # type: ignore[union-attr]
        assert isinstance(bus, LocalBus)
        got: list[tuple[str, bytes]] = []
        unsub = bus.subscribe("backbeat.status.>", lambda s, d: got.append((s, d)))
        i.start_p2p_operation("op", "pubsub_sync", 2)
        unsub()
    subject, data = got[0]
    assert subject == "backbeat.status.test.agent-1"
    assert parse_status_claim(data).task_id == "op"


def test_claims_nobody_receives_are_counted_not_built(monkeypatch: pytest.MonkeyPatch) -> None:
    """No on_claim and no bus subscriber: claims are counted as emitted, never built nor published."""
    bus = unique_bus()
    cfg = BackbeatConfig(cluster_id="test", agent_id="agent-1", nats_url=f"local://{bus}?pulse=manual")
    with Integration(cfg, node_id="node-1") as i:
        built: list[str] = []
        make = i._claims.make

        def counting(task_id: str, *args: Any) -> StatusClaim:
            built.append(task_id)
            return make(task_id, *args)

        monkeypatch.setattr(i._claims, "make", counting)
        i.start_p2p_operation("unheard", "dht_store", 3)
        i.complete_p2p_operation("unheard", 1)
        assert built == []
        assert (i.get_health()["claims_emitted"], i.get_health()["claims_published"]) == (2, 0)
        got: list[bytes] = []
        unsub = LocalBus.named(bus).subscribe("backbeat.status.>", lambda s, d: got.append(d))
        i.start_p2p_operation("heard", "dht_store", 3)
        unsub()
        i.complete_p2p_operation("heard", 1)
        assert built == ["heard"]
        assert [parse_status_claim(d).task_id for d in got] == ["heard"]
        log = ClaimLog()
        unregister = i.on_claim(log)
        i.start_p2p_operation("called-back", "dht_store", 3)
        log.wait_for(lambda cs: any(c.task_id == "called-back" for c in cs))
        unregister()
        i.complete_p2p_operation("called-back", 1)
        assert built == ["heard", "called-back"]
        assert (i.get_health()["claims_emitted"], i.get_health()["claims_published"]) == (6, 1)


def test_shared_local_pulse_runs_at_config_tempo() -> None:
    """local:// runs a drift-free pulse at tempo_bpm; two agents on one bus follow the same beats."""
    bus = unique_bus()
    cfg = BackbeatConfig(cluster_id="shared", agent_id="a", nats_url=f"local://{bus}", tempo_bpm=1200)
    a = Integration(cfg, node_id="n1")
    b = Integration(cfg.evolve(agent_id="b"), node_id="n2")
    seen: dict[str, list[int]] = {"a": [], "b": []}
    a.on_beat(lambda f: seen["a"].append(f.beat_index))
    b.on_beat(lambda f: seen["b"].append(f.beat_index))
    with a, b:
        wait_until(lambda: a.get_health()["beats_received"] >= 10, what="10 beats")
        wait_until(lambda: len(seen["b"]) >= 2 and seen["b"][-1] >= a.clock.current_beat, what="b caught up")
        health = a.get_health()
    # Both followed the same frames: where both were listening, the same beat indices.
    first, last = max(seen["a"][0], seen["b"][0]), min(seen["a"][-1], seen["b"][-1])
    common_a = [k for k in seen["a"] if first <= k <= last]
    assert common_a == [k for k in seen["b"] if first <= k <= last]
    assert len(common_a) >= 2
    assert health["current_tempo"] == 1200
    # measured_bpm follows arrival times, which a busy machine jitters; its maths is in test_clock
    assert health["measured_bpm"] > 0


def test_pulse_reset_is_followed_after_a_bar() -> None:
    """A pulse that restarts from a lower index is followed after a bar of stale frames, and recorded."""
    from backbeat_sync import ManualTime

    from .support import HandledBeats, ManualPulse

    t = ManualTime()
    bus = unique_bus()
    cfg = BackbeatConfig(cluster_id="test", agent_id="a", nats_url=f"local://{bus}?pulse=manual")
    i = Integration(cfg, node_id="n", time_source=t)
    pulse = ManualPulse(bus, "test", handled=HandledBeats(i))
    with i:
        pulse.beat(5000)
        for n in range(3):
            t.advance(1.0)
            pulse.beat(10 + n, wait=False)
        assert i.clock.current_beat == 5000
        t.advance(1.0)
        pulse.beat(13)
        health = i.get_health()
    assert health["current_beat"] == 13
    assert health["pulse_resets"] == 1
    assert health["stale_frames"] == 4
    assert any(e.startswith("pulse reset: resynchronised to beat 13") for e in health["errors"])


def test_operation_started_before_the_first_beat_counts_from_lock_on() -> None:
    """An operation started before any frame counts its beats from the pulse's first beat, not from 0."""
    with manual_integration() as (i, pulse, log):
        i.start_p2p_operation("early", "dht_store", 3)
        pulse.beat(7_000_000)
        pulse.beat(7_000_001)
        log.wait_for(lambda cs: any(c.beat_index == 7_000_001 and c.task_id == "early" for c in cs))
    assert states(log.for_task("early")) == [
        (0, "executing", "started", 3, 0.0),
        (7_000_000, "executing", "started", 3, 0.0),
        (7_000_001, "executing", "started", 2, pytest.approx(1 / 3)),
        (7_000_001, "failed", "failed", 0, 0.0),
    ]


def test_stop_delivers_a_long_claim_backlog_to_on_claim() -> None:
    """stop() waits while callbacks make progress: a slow-ish on_claim still sees every claim."""
    import time as _time

    seen: list[str] = []

    def slow(claim: StatusClaim) -> None:
        _time.sleep(0.002)  # a callback that takes its time; 1,600 of them take over 3 s
        seen.append(claim.task_id)

    with manual_integration() as (i, _pulse, _log):
        i.on_claim(slow)
        for n in range(800):
            i.start_p2p_operation(f"op-{n}", "election", 3)
            i.complete_p2p_operation(f"op-{n}", 1)
    assert len(seen) == 1600  # more than CALLBACK_JOIN_TIMEOUT (2 s) of callbacks, none cut off


def test_concurrent_subscription_changes_leave_the_registry_quiet_only_without_listeners() -> None:
    """Threads subscribing and unsubscribing at once: afterwards the registry is quiet exactly when
    nobody listens (a stale decision from a slower thread must not win)."""
    bus = unique_bus()
    cfg = BackbeatConfig(cluster_id="test", agent_id="agent-1", nats_url=f"local://{bus}?pulse=manual")
    threads_n, rounds = 8, 200
    barrier = threading.Barrier(threads_n)
    with Integration(cfg, node_id="node-1") as i:
        local = LocalBus.named(bus)

        def churn() -> None:
            barrier.wait()
            for _ in range(rounds):
                local.subscribe("backbeat.status.>", lambda s, d: None)()

        got: list[bytes] = []
        keep = local.subscribe("backbeat.status.>", lambda s, d: got.append(d))
        threads = [threading.Thread(target=churn) for _ in range(threads_n)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        i.start_p2p_operation("heard-after-churn", "dht_store", 3)
        assert [parse_status_claim(d).task_id for d in got] == ["heard-after-churn"]
        keep()
        before = i.get_health()["claims_published"]
        i.complete_p2p_operation("heard-after-churn", 1)
        assert i.registry.unheard == 1
        assert i.get_health()["claims_published"] == before


def test_a_quiet_registry_builds_no_budget_note(monkeypatch: pytest.MonkeyPatch) -> None:
    """Nobody listens: a budget note (emit_operation_note) is counted as emitted, never built."""
    cfg = BackbeatConfig(
        cluster_id="test", agent_id="agent-1", nats_url=f"local://{unique_bus()}?pulse=manual"
    )
    with Integration(cfg, node_id="node-1") as i:
        built: list[str] = []
        make = i._claims.make

        def counting(task_id: str, *args: Any, **kwargs: Any) -> StatusClaim:
            built.append(task_id)
            return make(task_id, *args, **kwargs)

        monkeypatch.setattr(i._claims, "make", counting)
        i.start_p2p_operation("noted", "dht_store", 3)
        before = i.get_health()["claims_emitted"]
        assert i.emit_operation_note("noted", "beat budget warning: 50%") is None
        assert built == []
        assert i.get_health()["claims_emitted"] == before + 1
