"""Tests for backbeat_sync.transport.nats: the outbox, connect options, and a real nats-server.

The other side of every NATS test is raw nats-py written in ``tests/natsserver.py``
(a hand-written beat publisher and an outside subscriber), not our own classes.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from loguru import logger

from backbeat_sync import BackbeatConfig, BackbeatConnectionError, ConfigError, Integration
from backbeat_sync.claims import resolve
from backbeat_sync.protocol import HEALTH_TASK_ID
from backbeat_sync.transport.nats import (
    NatsTransport,
    Outbox,
    cancel_and_wait,
    connect_options,
    describe_error,
)

from .natsserver import (
    PASSWORD,
    TOKEN,
    USER,
    AsyncRunner,
    NatsServer,
    RawPulse,
    Witness,
    check_claim,
    free_port,
)
from .support import HandledBeats, wait_until
from .support import outbox_claim as claim

CLUSTER = "nt"
#: A wait only a bug would sit through; "at once" is asserted as under half of it.
NEVER = 60.0
NODE = "12D3KooWTest"


def config(url: str, **changes: Any) -> BackbeatConfig:
    """A fast-reconnecting agent config for tests."""
    fields: dict[str, Any] = {
        "cluster_id": CLUSTER,
        "agent_id": "agent-1",
        "nats_url": url,
        "tempo_bpm": 1200.0,
        "reconnect_wait": 0.05,
        "reconnect_jitter": 0.01,
        "connect_timeout": 2.0,
        "flush_timeout": 2.0,
    }
    fields.update(changes)
    return BackbeatConfig(**fields)


def library_threads() -> set[threading.Thread]:
    """Threads that belong to backbeat_sync (or asyncio executors it could leave)."""
    return {t for t in threading.enumerate() if t.name.startswith(("backbeat", "asyncio"))}


@pytest.fixture
def log_lines() -> Iterator[list[str]]:
    """Every backbeat_sync log line (level and message) emitted during the test."""
    lines: list[str] = []
    logger.enable("backbeat_sync")
    sink = logger.add(
        lambda m: lines.append(f"{m.record['level'].name} {m.record['message']}"), level="DEBUG"
    )
    try:
        yield lines
    finally:
        logger.remove(sink)
        logger.disable("backbeat_sync")


# -- the outbox (no server) ---------------------------------------------------------------


def test_outbox_keeps_order_below_the_bound() -> None:
    """Below the bound every claim is kept, oldest first."""
    box = Outbox(limit=10)
    for i in range(5):
        box.put("s", claim(f"t{i}"))
    assert [e.claim.task_id for e in box.take(100)] == ["t0", "t1", "t2", "t3", "t4"]
    assert (box.dropped, box.coalesced) == (0, 0)


def test_outbox_coalesces_intermediate_claims_of_a_task_past_the_bound() -> None:
    """Past the bound the latest intermediate claim of a task replaces the queued one, at the back
    (so a beat's claims keep the order of that beat's sweep: issue 13, priorities)."""
    box = Outbox(limit=2)
    box.put("s", claim("a", beat=1))
    box.put("s", claim("b", beat=1))
    box.put("s", claim("a", beat=2))
    box.put("s", claim("a", beat=3))
    taken = [(e.claim.task_id, resolve(e.claim).beat_index) for e in box.take(10)]
    assert taken == [("b", 1), ("a", 3)]
    assert box.coalesced == 2
    assert box.dropped == 0


def test_outbox_never_drops_a_final_claim() -> None:
    """Final claims are kept past the bound; an intermediate claim with no slot is dropped and counted."""
    box = Outbox(limit=3)
    for i in range(3):
        box.put("s", claim(f"t{i}"))
    for i in range(50):
        box.put("s", claim(f"f{i}", state="done" if i % 2 else "failed"))
    box.put("s", claim("new-task"))
    entries = box.take(1000)
    assert len(entries) == 53
    assert sum(1 for e in entries if e.final) == 50
    assert box.dropped == 1


def test_outbox_does_not_coalesce_an_intermediate_claim_into_a_slot_before_a_final() -> None:
    """After a task's final claim, a later intermediate claim (a reused id) is not merged before it."""
    box = Outbox(limit=2)
    box.put("s", claim("a"))
    box.put("s", claim("a", state="done"))
    box.put("s", claim("a", beat=9))
    states = [resolve(e.claim).state for e in box.take(10)]
    assert states == ["executing", "done"]
    assert box.dropped == 1


def test_outbox_keeps_every_claim_while_unbounded() -> None:
    """While connected (``bounded`` cleared) a whole beat of claims is kept; the bound applies again after."""
    box = Outbox(limit=3)
    box.bounded = False
    for i in range(50):
        box.put("s", claim(f"t{i}"))
    assert (len(box), box.dropped, box.coalesced) == (50, 0, 0)
    box.bounded = True
    box.put("s", claim("t0", beat=2))
    box.put("s", claim("late"))
    assert (len(box), box.dropped, box.coalesced) == (50, 1, 1)


def test_outbox_put_many_follows_the_rules_of_put() -> None:
    """``put_many`` keeps order, wakes once; past the bound it coalesces, drops, keeps finals, as ``put``."""
    box = Outbox(limit=3)
    assert box.put_many("s", [claim("a"), claim("b")]) is True
    assert box.put_many("s", [claim("c"), claim("a", beat=2), claim("d"), claim("b", state="done")]) is False
    taken = [(e.claim.task_id, resolve(e.claim).beat_index, e.final) for e in box.take(10)]
    assert taken == [("b", 1, False), ("c", 1, False), ("a", 2, False), ("b", 1, True)]
    assert (box.coalesced, box.dropped) == (1, 1)


def test_outbox_wakes_once_per_batch() -> None:
    """Only the first put after a batch was taken asks for a wake-up."""
    box = Outbox(limit=100)
    wakes = [box.put("s", claim(f"t{i}")) for i in range(5)]
    assert wakes == [True, False, False, False, False]
    box.rearm()
    assert box.put("s", claim("x")) is True


def test_outbox_put_back_goes_to_the_front_in_order() -> None:
    """Claims put back (unconfirmed finals) are sent before newer ones, in their order."""
    box = Outbox(limit=100)
    box.put("s", claim("new"))
    first = box.take(1)
    box.put("s", claim("newer"))
    box.put_back(first)
    assert [e.claim.task_id for e in box.take(10)] == ["new", "newer"]


def test_outbox_rejects_a_bound_below_one() -> None:
    """A bound below one is a ConfigError naming outbox_limit."""
    with pytest.raises(ConfigError, match="outbox_limit"):
        Outbox(limit=0)


# -- connect options (no server) ------------------------------------------------------------


def test_connect_options_carry_reconnect_and_auth_settings() -> None:
    """Name, servers, reconnect forever, wait, ping, buffer and credentials reach nats-py."""
    cfg = config(
        "nats://127.0.0.1:1,nats://127.0.0.1:2",
        token="tok",
        user="u",
        password="p",
        ping_interval=7.0,
        reconnect_buffer_size=1024,
    )
    opts = connect_options(cfg)
    expected = {
        "servers": ["nats://127.0.0.1:1", "nats://127.0.0.1:2"],
        "name": "agent-1",
        "allow_reconnect": True,
        "max_reconnect_attempts": -1,
        "reconnect_time_wait": 0.05,
        "ping_interval": 7.0,
        "pending_size": 1024,
        "token": "tok",
        "user": "u",
        "password": "p",
    }
    assert expected == {k: opts[k] for k in expected}


def test_connect_options_map_zero_attempts_to_no_reconnect() -> None:
    """max_reconnect_attempts=0 turns reconnecting off; n > 0 is passed through."""
    assert connect_options(config("nats://h:1", max_reconnect_attempts=0))["allow_reconnect"] is False
    assert connect_options(config("nats://h:1", max_reconnect_attempts=3))["max_reconnect_attempts"] == 3


def test_connect_options_name_a_missing_tls_file(tmp_path: Any) -> None:
    """A TLS CA file that does not exist is a ConfigError naming tls_ca."""
    with pytest.raises(ConfigError, match="tls_ca"):
        connect_options(config("tls://h:1", tls_ca=str(tmp_path / "missing.pem")))


def test_connect_options_need_cert_and_key_together(tmp_path: Any) -> None:
    """A client certificate without its key is a ConfigError naming the missing field."""
    with pytest.raises(ConfigError, match="tls_key"):
        connect_options(config("tls://h:1", tls_cert=str(tmp_path / "c.pem")))


def test_describe_error_names_common_causes() -> None:
    """Causes read as a user of NATS expects them."""
    assert describe_error(ConnectionRefusedError(111, "refused")) == "connection refused"
    assert describe_error(Exception("nats: 'Authorization Violation'")) == "authorization violation"
    assert describe_error(TimeoutError()) == "timed out"


# -- against a real server -------------------------------------------------------------------


def test_cancel_and_wait_cancels_again_a_task_that_swallows_cancellation() -> None:
    """nats-py can swallow a cancel (wait_for on 3.11) and retry: the task is cancelled until it ends."""
    swallowed = 0

    async def stubborn() -> None:
        nonlocal swallowed
        while swallowed < 3:
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                swallowed += 1  # what `except Exception: continue` around a swallowing wait_for amounts to
        await asyncio.sleep(3600)

    async def main() -> tuple[bool, bool]:
        task = asyncio.get_running_loop().create_task(stubborn())
        await asyncio.sleep(0)
        ended = await asyncio.wait_for(cancel_and_wait(task, grace=60.0), timeout=60.0)
        return ended, task.cancelled()

    assert asyncio.run(main()) == (True, True)
    assert swallowed == 3


def test_cancel_and_wait_gives_up_after_the_grace_on_a_task_that_never_ends() -> None:
    """A task that ignores every cancel cannot hold the caller past the grace."""
    release = asyncio.Event()

    async def deaf() -> None:
        while not release.is_set():
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                pass

    async def main() -> tuple[bool, bool]:
        task = asyncio.get_running_loop().create_task(deaf())
        await asyncio.sleep(0)
        ended = await cancel_and_wait(task, grace=0.2)
        still_running = not task.done()
        release.set()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        return ended, still_running

    assert asyncio.run(main()) == (False, True)


@pytest.mark.nats
def test_contract_claims_to_a_raw_subscriber_follow_protocol(
    nats_server: NatsServer, nats_runner: AsyncRunner
) -> None:
    """A raw pulse drives the agent; a raw subscriber checks every claim field by field and the maths."""
    witness = Witness(nats_runner, nats_server.url, "backbeat.status.>")
    pulse = RawPulse(nats_runner, nats_server.url, CLUSTER, tempo_bpm=600, first_index=96)
    integration = Integration(config(nats_server.url, health_every_beats=4), node_id=NODE)
    handled = HandledBeats(integration)
    with integration:
        pulse.beat()
        handled.wait(96)
        integration.start_p2p_operation("election-1", "election", 4)
        for _ in range(3):
            index = pulse.beat()
            witness.wait_for(
                lambda ds, i=index: any(d["beat_index"] == i and d["task_id"] == "election-1" for d in ds),
                what=f"claim at beat {index}",
            )
        integration.complete_p2p_operation("election-1", 3)
        index = pulse.beat()  # beat 100: a health claim (every 4 beats; beat 96 had one too)

        def final_and_health(ds: list[dict[str, Any]], i: int = index) -> bool:
            final = any(d["task_id"] == "election-1" and d["state"] == "done" for d in ds)
            return final and any(d["task_id"] == HEALTH_TASK_ID and d["beat_index"] == i for d in ds)

        witness.wait_for(final_and_health, what="the final claim and the health claim at beat 100")
    pulse.stop()
    claims = witness.dicts()
    witness.close()
    for d in claims:
        check_claim(d, cluster=CLUSTER, agent="agent-1", node=NODE)
    op = [d for d in claims if d["task_id"] == "election-1"]
    expected = [
        (96, "executing", 4, 0.0),
        (97, "executing", 3, 0.25),
        (98, "executing", 2, 0.5),
        (99, "executing", 1, 0.75),
        (99, "done", 0, 1.0),
    ]
    assert expected == [(d["beat_index"], d["state"], d["beats_left"], d["progress"]) for d in op]
    assert op[0]["notes"] == "P2P election: started (peers: 0, node: 12D3KooWTest)"


@pytest.mark.nats
def test_a_server_that_is_not_there_raises_naming_it() -> None:
    """start() fails with BackbeatConnectionError naming the server and the cause; no thread left.

    (It gives up after connect_timeout even when nats-py swallows the cancel: see the
    cancel_and_wait tests; how soon is a matter for benchmarks, not for a timed test.)
    """
    before = library_threads()
    url = f"nats://127.0.0.1:{free_port()}"
    integration = Integration(config(url, connect_timeout=0.5), node_id=NODE)
    with pytest.raises(BackbeatConnectionError) as info:
        integration.start()
    assert url in str(info.value)
    assert "connection refused" in info.value.cause
    assert before == library_threads()


@pytest.mark.nats
def test_wrong_token_is_an_authorization_violation_without_the_secret(
    nats_server_token: NatsServer, log_lines: list[str]
) -> None:
    """A wrong token fails at once with "authorization violation"; no secret in the error or the logs."""
    url = nats_server_token.url.replace("nats://", "nats://wrong-secret-token@")
    integration = Integration(config(url, connect_timeout=NEVER), node_id=NODE)
    t0 = time.monotonic()
    with pytest.raises(BackbeatConnectionError) as info:
        integration.start()
    assert time.monotonic() - t0 < NEVER / 2  # not a hang until the connect timeout
    assert info.value.cause == "authorization violation"
    assert f"127.0.0.1:{nats_server_token.port}" in str(info.value)
    assert "wrong-secret-token" not in str(info.value)
    assert not any("wrong-secret-token" in line for line in log_lines)


@pytest.mark.nats
def test_wrong_password_is_an_authorization_violation(nats_server_userpass: NatsServer) -> None:
    """A wrong password fails with "authorization violation", and the password shows nowhere."""
    cfg = config(nats_server_userpass.url, user=USER, password="not-the-password")
    with pytest.raises(BackbeatConnectionError) as info:
        Integration(cfg, node_id=NODE).start()
    assert info.value.cause == "authorization violation"
    assert "not-the-password" not in str(info.value)


@pytest.mark.nats
def test_right_credentials_connect_and_stay_secret(
    nats_server_token: NatsServer, nats_server_userpass: NatsServer, log_lines: list[str]
) -> None:
    """Token and user/password from config connect; health, repr and logs never show them."""
    for cfg in (
        config(nats_server_token.url, token=TOKEN),
        config(nats_server_userpass.url, user=USER, password=PASSWORD),
        BackbeatConfig.from_env(
            {
                "CHORUS_BACKBEAT_NATS_URL": nats_server_userpass.url,
                "CHORUS_BACKBEAT_NATS_USER": USER,
                "CHORUS_BACKBEAT_NATS_PASSWORD": PASSWORD,
                "CHORUS_BACKBEAT_CLUSTER_ID": CLUSTER,
            }
        ),
    ):
        with Integration(cfg, node_id=NODE) as integration:
            health = integration.get_health()
            assert health["connected"] is True
            shown = f"{health} {cfg!r} {integration.transport!r}"
        assert TOKEN not in shown
        assert PASSWORD not in shown
    assert not any(TOKEN in line or PASSWORD in line for line in log_lines)


@pytest.mark.nats
def test_connect_in_background_returns_at_once_and_connects_later(nats_binary: str, tmp_path: Any) -> None:
    """With connect_in_background, start() returns while the server is down; health says so until it is up."""
    server = NatsServer(nats_binary, tmp_path / "late")
    integration = Integration(
        config(server.url, connect_in_background=True, connect_timeout=NEVER), node_id=NODE
    )
    t0 = time.monotonic()
    integration.start()
    try:
        assert time.monotonic() - t0 < NEVER / 2  # did not wait for a connection
        assert integration.get_health()["connected"] is False
        integration.start_p2p_operation("early", "dht_store", 3)
        integration.complete_p2p_operation("early", 3)  # queued until the connection is made
        server.start()
        wait_until(lambda: integration.get_health()["connected"], what="background connect")
        wait_until(lambda: integration.get_health()["claims_queued"] == 0, what="queued claims published")
        assert "agent-1" in server.connection_names()
    finally:
        integration.stop()
        server.kill()


@pytest.mark.nats
def test_malformed_frames_do_not_hide_valid_beats(nats_server: NatsServer, nats_runner: AsyncRunner) -> None:
    """10,000 malformed frames interleaved with valid ones: every valid beat is received and counted."""
    integration = Integration(config(nats_server.url), node_id=NODE)
    bad = [
        b"not json",
        b"[1,2,3]",
        b'{"type":"backbeat.beatframe.v1"}',
        b'{"type":"nope"}',
        b"\xff\xfe\x00",
        b"{" * 5000,
        b'{"type":"backbeat.beatframe.v1","cluster_id":"nt","beat_index":-1}',
    ]
    # One frame in 100 is over 64 KiB: the whole flood (about 15 MB) fits in what nats-py
    # may hold for a subscriber that has fallen behind (64 MiB), so nothing is dropped as
    # a slow consumer even on a loaded machine, and every frame must be counted.
    oversized = b"x" * (64 * 1024 + 1)
    pulse = RawPulse(nats_runner, nats_server.url, CLUSTER, tempo_bpm=6000, first_index=10)
    good = 100

    async def flood() -> None:
        nc = pulse._nc
        for k in range(10_000):
            await nc.publish(pulse.subject, oversized if k % 100 == 50 else bad[k % len(bad)])
            if k % 100 == 99:
                index = pulse.next_index
                pulse.next_index += 1
                await nc.publish(pulse.subject, json.dumps(pulse.frame(index)).encode())
        await nc.flush()

    with integration:
        nats_runner.run(flood(), timeout=60)
        # Both counts settle a little apart (frames are parsed off the transport's thread):
        # wait for both, not for one and then read the other.
        wait_until(
            lambda: (
                (integration.get_health()["beats_received"], integration.get_health()["rejected_frames"])
                == (good, 10_000)
            ),
            timeout=60,
            what="valid beats counted and every malformed frame rejected",
        )
        health = integration.get_health()  # (how fast frames are rejected is a benchmark figure)
    pulse.stop()
    assert (good, 0, 10_000) == (health["beats_received"], health["missed_beats"], health["rejected_frames"])
    assert 10 + good - 1 == health["current_beat"]


@pytest.mark.nats
def test_stop_leaves_no_thread_behind(nats_server: NatsServer) -> None:
    """After stop() no library thread is left, and stop() is idempotent."""
    before = library_threads()
    integration = Integration(config(nats_server.url), node_id=NODE)
    integration.start()
    assert any(t.name == "backbeat-nats" for t in threading.enumerate())
    integration.stop()
    integration.stop()
    assert before == library_threads()


@pytest.mark.nats
def test_stop_with_the_server_gone_is_bounded_and_leaves_no_thread(nats_server: NatsServer) -> None:
    """With the server dead and claims queued, stop() returns within flush_timeout and no thread is left."""
    before = library_threads()
    integration = Integration(config(nats_server.url, flush_timeout=0.5), node_id=NODE)
    integration.start()
    nats_server.kill()
    wait_until(lambda: not integration.get_health()["connected"], what="disconnect noticed")
    integration.start_p2p_operation("orphan", "dht_store", 3)
    integration.complete_p2p_operation("orphan", 1)
    t0 = time.monotonic()
    integration.stop()
    # bounded: flush_timeout plus the close grace (about 2.5 s); not the 10 s join bound or a hang
    assert time.monotonic() - t0 < 10.0
    assert before == library_threads()
    health = integration.get_health()
    assert health["claims_dropped"] >= 2  # given up at stop, and counted
    assert any("not confirmed" in e for e in health["errors"])


@pytest.mark.nats
def test_outage_finals_reach_a_jetstream_stream_after_restart(
    nats_jetstream: NatsServer, nats_runner: AsyncRunner, log_lines: list[str]
) -> None:
    """Server down for several beats while operations run: reconnect, beats resume, every final arrives."""
    server = nats_jetstream
    server.capture()
    pulse = RawPulse(
        nats_runner, server.url, CLUSTER, tempo_bpm=1200, first_index=40, reconnect_time_wait=0.05
    )
    pulse.start()
    integration = Integration(config(server.url, outbox_limit=20), node_id=NODE)
    finals: list[str] = []
    with integration:
        wait_until(lambda: integration.get_health()["beats_received"] > 0, what="first beat")

        def run_ops(prefix: str, n: int) -> None:
            for k in range(n):
                oid = f"{prefix}-{k}"
                integration.start_p2p_operation(oid, "dht_store", 3)
                integration.update_p2p_operation_phase(oid, "executing", 2)
                if k % 3 == 0:
                    integration.fail_p2p_operation(oid, "replica timeout")
                else:
                    integration.complete_p2p_operation(oid, 2)
                finals.append(oid)

        run_ops("before", 50)
        wait_until(lambda: integration.get_health()["claims_queued"] == 0, what="claims confirmed")
        server.stop()
        wait_until(lambda: not integration.get_health()["connected"], what="outage noticed")
        beat_at_outage = integration.get_health()["current_beat"]
        for k in range(10):  # long-running operations whose claims wait in the outbox
            integration.start_p2p_operation(f"long-{k}", "election", 50)
        run_ops("during", 200)  # 600 claims into an outbox bounded at 20: finals all kept
        for phase in ("connecting", "negotiating"):  # past the bound: latest wins
            for k in range(10):
                integration.update_p2p_operation_phase(f"long-{k}", phase, 3)
        assert integration.get_health()["claims_coalesced"] >= 20
        server.start()
        wait_until(lambda: integration.get_health()["reconnect_count"] == 1, what="reconnect")
        wait_until(lambda: integration.get_health()["current_beat"] > beat_at_outage + 2, what="beats resume")
        run_ops("after", 50)
        for k in range(10):
            integration.complete_p2p_operation(f"long-{k}", 3)
            finals.append(f"long-{k}")
        wait_until(lambda: integration.get_health()["claims_queued"] == 0, what="outbox drained")
    pulse.stop()
    stored = [json.loads(m) for m in server.stored()]
    final_ids = {d["task_id"] for d in stored if d["state"] in ("done", "failed")}
    assert set(finals) - final_ids == set()
    warnings = [line for line in log_lines if line.startswith("WARNING") and "NATS" in line]
    assert sum("disconnected from NATS" in line for line in warnings) == 1
    assert not any("Traceback" in line for line in log_lines)
    assert sum("reconnected to" in line for line in log_lines) == 1


@pytest.mark.nats
def test_cluster_failover_when_the_agents_node_dies(
    nats_cluster: list[NatsServer], nats_runner: AsyncRunner
) -> None:
    """In a 3-node cluster the agent's node is killed: it fails over, beats go on, finals arrive."""
    urls = [s.url for s in nats_cluster]
    pulse = RawPulse(nats_runner, urls, CLUSTER, tempo_bpm=1200, first_index=500, reconnect_time_wait=0.05)
    pulse.start()
    integration = Integration(config(",".join(urls)), node_id=NODE)
    with integration:
        wait_until(lambda: integration.get_health()["beats_received"] > 1, what="beats through the cluster")
        agent_node = next(s for s in nats_cluster if "agent-1" in s.connection_names())
        other = next(s for s in nats_cluster if s is not agent_node)
        witness = Witness(nats_runner, other.url, "backbeat.status.>")
        integration.start_p2p_operation("peer-discovery-1", "peer_discovery", 5)
        agent_node.kill()
        wait_until(lambda: integration.get_health()["reconnect_count"] >= 1, what="failover")
        beat = integration.get_health()["current_beat"]
        wait_until(lambda: integration.get_health()["current_beat"] > beat + 2, what="beats after failover")
        integration.complete_p2p_operation("peer-discovery-1", 7)
        witness.wait_for(
            lambda ds: any(d["task_id"] == "peer-discovery-1" and d["state"] == "done" for d in ds),
            what="final claim via another node",
        )
        assert integration.get_health()["connected"] is True
    pulse.stop()
    witness.close()


@pytest.mark.nats
def test_publish_wakes_the_loop_once_per_batch(nats_server: NatsServer, nats_runner: AsyncRunner) -> None:
    """10,000 claims from 4 threads at once leave in far fewer wake-ups and all arrive in per-task order."""
    witness = Witness(nats_runner, nats_server.url, "backbeat.status.>")
    transport = NatsTransport(config(nats_server.url), lambda claim: resolve(claim).encode())

    class Sink:
        def frame_received(self, data: bytes, arrival: float) -> None:
            pass

        def transport_event(self, event: Any, detail: str) -> None:
            pass

        def audience_changed(self) -> None:
            pass

    transport.start(Sink())
    link = transport._link
    assert link is not None
    wakes = 0
    original = link.wake

    def counting_wake() -> None:
        nonlocal wakes
        wakes += 1
        original()

    link.wake = counting_wake  # type: ignore[method-assign]
    barrier = threading.Barrier(4)

    def produce(k: int) -> None:
        barrier.wait()
        for i in range(2500):
            transport.publish("backbeat.status.nt.agent-1", claim(f"t{k}", beat=i))

    threads = [threading.Thread(target=produce, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    witness.wait_for(lambda ds: len(ds) == 10_000, what="10,000 claims")
    transport.stop(2.0)
    witness.close()
    assert wakes < 10_000 / 4
    assert transport.stats()["claims_published"] == 10_000
    for k in range(4):
        beats = [d["beat_index"] for d in witness.dicts() if d["task_id"] == f"t{k}"]
        assert list(range(2500)) == beats


@pytest.mark.nats
def test_tls_with_the_servers_ca_connects(nats_server_tls: NatsServer, nats_runner: AsyncRunner) -> None:
    """tls:// with tls_ca trusting the server's CA connects, and claims flow over TLS."""
    url = nats_server_tls.url.replace("nats://", "tls://")
    cfg = config(url, tls_ca=str(nats_server_tls.tls_ca))
    with Integration(cfg, node_id=NODE) as integration:
        assert integration.get_health()["connected"] is True
        integration.start_p2p_operation("tls-op", "dht_store", 2)
        integration.complete_p2p_operation("tls-op", 1)
        wait_until(lambda: integration.get_health()["claims_published"] >= 2, what="claims over TLS")


@pytest.mark.nats
def test_tls_with_an_untrusted_server_fails_clearly(nats_server_tls: NatsServer) -> None:
    """Without the server's CA the connection fails with a TLS cause, not a hang."""
    url = nats_server_tls.url.replace("nats://", "tls://")
    with pytest.raises(BackbeatConnectionError) as info:
        Integration(config(url, connect_timeout=0.5), node_id=NODE).start()
    assert "TLS error" in info.value.cause


@pytest.mark.nats
def test_giving_up_reconnecting_is_reported_in_health(nats_server: NatsServer) -> None:
    """With max_reconnect_attempts=1 a dead server ends in a closed connection recorded in errors."""
    integration = Integration(config(nats_server.url, max_reconnect_attempts=1), node_id=NODE)
    with integration:
        nats_server.kill()
        wait_until(
            lambda: any("closed for good" in e for e in integration.get_health()["errors"]),
            what="closed for good",
        )
        assert integration.get_health()["connected"] is False
    assert integration.get_health()["reconnect_count"] == 0


@pytest.mark.nats
def test_finals_in_flight_when_the_server_dies_are_sent_again(
    nats_jetstream: NatsServer, nats_runner: AsyncRunner
) -> None:
    """Operations finish non-stop while the server is killed twice: unconfirmed finals resent, none lost."""
    server = nats_jetstream
    server.capture()
    pulse = RawPulse(nats_runner, server.url, CLUSTER, tempo_bpm=600, first_index=1, reconnect_time_wait=0.05)
    pulse.start()
    integration = Integration(config(server.url), node_id=NODE)
    finished: list[str] = []
    stop = threading.Event()

    def churn(worker: int) -> None:
        n = 0
        while not stop.is_set():
            oid = f"w{worker}-{n}"
            n += 1
            integration.start_p2p_operation(oid, "pubsub_sync", 2)
            if n % 4:
                integration.complete_p2p_operation(oid, 3)
            else:
                integration.fail_p2p_operation(oid, "no route")
            finished.append(oid)
            if n % 50 == 0:
                stop.wait(0.005)  # keep the rate at a few thousand operations per second

    with integration:
        wait_until(lambda: integration.get_health()["beats_received"] > 0, what="first beat")
        workers = [threading.Thread(target=churn, args=(k,)) for k in range(2)]
        for t in workers:
            t.start()
        for restart in range(1, 3):
            wait_until(
                lambda r=restart: integration.get_health()["claims_published"] > 500 * r, what="traffic"
            )
            server.kill()
            server.start()
            wait_until(lambda r=restart: integration.get_health()["reconnect_count"] == r, what="back")
        stop.set()
        for t in workers:
            t.join()
        wait_until(lambda: integration.get_health()["claims_queued"] == 0, what="all confirmed")
        resent = integration.transport.stats()["claims_resent"]  # type: ignore[union-attr]
    pulse.stop()
    stored = [json.loads(m) for m in server.stored()]
    final_ids = {d["task_id"] for d in stored if d["state"] in ("done", "failed")}
    assert set(finished) - final_ids == set()
    assert resent > 0
