"""Exactly-once final claims: BackbeatConfig(claims_stream=...) against a real ``nats-server -js``.

The outside witness is the stream itself, read back with raw nats-py
(``NatsServer.stored``), or a plain subscriber where there is no stream.
"""

from __future__ import annotations

import json
import signal
import threading
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from backbeat_sync import BackbeatConfig, Integration
from backbeat_sync.pulse import Pulse
from backbeat_sync.streams import claims_stream_name, create_claims_stream
from backbeat_sync.transport.nats.claims_stream import StreamFinals

from .natsserver import HEALTH_TASK_ID, AsyncRunner, NatsServer, Witness, check_claim
from .support import wait_until

CLUSTER = "xo"
AGENT = "xo-agent"
NODE = "12D3KooWExactlyOnce"
TEMPO = 600.0
STREAM = claims_stream_name(CLUSTER)
FINAL = ("done", "failed")


def config(url: str, **changes: Any) -> BackbeatConfig:
    """An agent config that reconnects fast."""
    fields: dict[str, Any] = {
        "cluster_id": CLUSTER,
        "agent_id": AGENT,
        "nats_url": url,
        "tempo_bpm": TEMPO,
        "reconnect_wait": 0.05,
        "reconnect_jitter": 0.01,
        "connect_timeout": 2.0,
        "flush_timeout": 3.0,
    }
    fields.update(changes)
    return BackbeatConfig(**fields)


def stream_of(integration: Integration) -> StreamFinals:
    """The integration's claims-stream publisher (white box: counters only)."""
    link = integration._transport._link  # type: ignore[union-attr]
    assert link.stream is not None
    return link.stream


def frozen(server: NatsServer) -> bool:
    """Whether the server's process is stopped (SIGSTOP has taken effect: state T in /proc)."""
    assert server.proc is not None
    try:
        stat = Path(f"/proc/{server.proc.pid}/stat").read_text()
    except OSError:
        return True  # no /proc here: nothing better to wait for
    return stat.rsplit(")", 1)[1].split()[0] == "T"


def finals_per_task(claims: list[dict[str, Any]]) -> Counter[str]:
    """How many final claims each operation has (health claims are not operations)."""
    return Counter(d["task_id"] for d in claims if d["state"] in FINAL and d["task_id"] != HEALTH_TASK_ID)


@pytest.fixture
def pulse(nats_jetstream: NatsServer) -> Iterator[Pulse]:
    """Our pulse at 600 BPM on the JetStream server."""
    p = Pulse(config(nats_jetstream.url, agent_id="xo-pulse"), tempo_bpm=TEMPO)
    p.start()
    yield p
    p.stop()


class Tickets:
    """Operation numbers handed out up to a limit the test raises, so work spans every restart."""

    def __init__(self, total: int) -> None:
        self.total = total
        self._cond = threading.Condition()
        self._allowed = 0
        self._next = 0
        self.finished: dict[str, str] = {}

    def allow(self, n: int) -> None:
        """Let ``n`` more operations run."""
        with self._cond:
            self._allowed = min(self.total, self._allowed + n)
            self._cond.notify_all()

    def take(self) -> int | None:
        """The next operation number (waits for the test to allow it); None when all are done."""
        with self._cond:
            while self._next >= self._allowed:
                if self._next >= self.total:
                    return None
                self._cond.wait(0.05)
            self._next += 1
            return self._next - 1

    def done(self, oid: str, state: str) -> None:
        """Record that ``oid`` finished in ``state``."""
        with self._cond:
            self.finished[oid] = state

    def count(self) -> int:
        """Operations finished so far."""
        with self._cond:
            return len(self.finished)


def run_operation(integration: Integration, tickets: Tickets, n: int) -> None:
    """One operation: start, a phase, done (or failed for every fifth)."""
    oid = f"op-{n}"
    integration.start_p2p_operation(oid, "dht_store", 3)
    integration.update_p2p_operation_phase(oid, "connecting", n % 5)
    if n % 5 == 0:
        integration.fail_p2p_operation(oid, "quorum lost")
        tickets.done(oid, "failed")
    else:
        integration.complete_p2p_operation(oid, 3)
        tickets.done(oid, "done")


@pytest.mark.nats
@pytest.mark.timeout(240)
def test_one_final_per_operation_across_five_quick_restarts(nats_jetstream: NatsServer, pulse: Pulse) -> None:
    """1,000 operations across 5 restarts (crash, clean stop, ...) of a file-stored JetStream
    server: the claims stream holds exactly one final claim per operation, none missing."""
    server = nats_jetstream
    cfg = config(server.url, claims_stream=STREAM)
    create_claims_stream(cfg)
    integration = Integration(cfg, node_id=NODE)
    tickets = Tickets(1000)

    def worker() -> None:
        while (n := tickets.take()) is not None:
            run_operation(integration, tickets, n)

    with integration:
        wait_until(lambda: integration.get_health()["beats_received"] > 0, what="first beat")
        workers = [threading.Thread(target=worker, name=f"xo-{k}") for k in range(8)]
        for t in workers:
            t.start()
        tickets.allow(150)
        for restart in range(1, 6):
            wait_until(lambda: tickets.count() >= 150 * restart, what="finishing")  # noqa: B023
            tickets.allow(150)  # these run while the server is down and while it comes back
            (server.kill if restart % 2 else server.stop)()
            server.start()
            wait_until(
                lambda: integration.get_health()["reconnect_count"] == restart,  # noqa: B023
                what="reconnect",
            )
        tickets.allow(1000)
        for t in workers:
            t.join(60)
        wait_until(lambda: integration.get_health()["claims_queued"] == 0, what="every final acknowledged")
        health = integration.get_health()
        finals = stream_of(integration)
        acked = finals.acked
    stored = [json.loads(m) for m in server.stored(STREAM)]
    per_task = finals_per_task(stored)
    assert len(tickets.finished) == 1000
    missing = [oid for oid in tickets.finished if per_task[oid] == 0]
    twice = {oid: n for oid, n in per_task.items() if n > 1}
    assert missing == []
    assert twice == {}
    states = {
        d["task_id"]: d["state"] for d in stored if d["state"] in FINAL and d["task_id"] != HEALTH_TASK_ID
    }
    assert states == tickets.finished
    assert health["reconnect_count"] == 5
    assert health["claims_dropped"] == 0
    # They went by JetStream publish (a resend's PubAck counts again). Right after a restart
    # JetStream may not answer yet: finals then go by core NATS for a while, with the same
    # Nats-Msg-Id, which the stream still de-duplicates.
    assert acked > 0
    for d in stored:
        check_claim(d, cluster=CLUSTER, agent=AGENT, node=NODE)
    print(
        f"\nexactly-once: {len(per_task)} finals, {len(stored)} claims stored,"
        f" {finals.resent} resent, {finals.duplicates} dropped as duplicates"
    )


@pytest.mark.nats
def test_a_resend_is_dropped_by_the_duplicate_window(nats_jetstream: NatsServer, pulse: Pulse) -> None:
    """Final claims sent again after their PubAck (as the outbox does after an outage) are stored once."""
    cfg = config(nats_jetstream.url, claims_stream=STREAM)
    create_claims_stream(cfg)
    with Integration(cfg, node_id=NODE) as integration:
        finals = stream_of(integration)
        link = integration._transport._link  # type: ignore[union-attr]
        sent: list[Any] = []
        send = finals.send

        async def recording(nc: Any, entry: Any, data: bytes) -> None:
            sent.append(entry)
            await send(nc, entry, data)

        finals.send = recording  # type: ignore[method-assign]
        wait_until(lambda: integration.get_health()["beats_received"] > 0, what="first beat")
        for k in range(20):
            integration.start_p2p_operation(f"r-{k}", "election", 3)
            integration.complete_p2p_operation(f"r-{k}", 2)
        wait_until(lambda: integration.get_health()["claims_queued"] == 0, what="20 PubAcks")
        assert (finals.acked, finals.duplicates) == (20, 0)  # the start claims went by core NATS
        again = list(sent)
        link.call_soon(lambda: link._return(again))  # back to the outbox, to be sent again
        wait_until(lambda: finals.acked >= 40, what="20 more PubAcks")
        assert finals.duplicates == 20
    stored = [json.loads(m) for m in nats_jetstream.stored(STREAM)]
    assert len(again) == 20
    assert finals_per_task(stored) == Counter({f"r-{k}": 1 for k in range(20)})


@pytest.mark.nats
def test_a_missing_stream_is_reported_once_and_finals_still_arrive_once(
    nats_jetstream: NatsServer, pulse: Pulse
) -> None:
    """claims_stream names a stream that does not exist (another stream captures the subjects):
    one error naming it; finals go by flush-confirmed core NATS with their Nats-Msg-Id, so the
    capturing stream still holds each one once."""
    nats_jetstream.capture(f"backbeat.status.{CLUSTER}.>", stream="OTHER")
    cfg = config(nats_jetstream.url, claims_stream="NOPE")
    with Integration(cfg, node_id=NODE) as integration:
        wait_until(lambda: integration.get_health()["beats_received"] > 0, what="first beat")
        for k in range(50):
            integration.start_p2p_operation(f"m-{k}", "election", 3)
            integration.complete_p2p_operation(f"m-{k}", 2)
        wait_until(lambda: integration.get_health()["claims_queued"] == 0, what="all confirmed")
        errors = [e for e in integration.get_health()["errors"] if "claims stream" in e]
        assert stream_of(integration).fallbacks >= 1
        assert stream_of(integration).acked == 0
    assert len(errors) == 1, errors
    assert "'NOPE' not found" in errors[0]
    assert "streams create" in errors[0]
    stored = [json.loads(m) for m in nats_jetstream.stored("OTHER")]
    assert finals_per_task(stored) == Counter({f"m-{k}": 1 for k in range(50)})


@pytest.mark.nats
def test_claims_stream_on_a_server_without_jetstream_loses_nothing(
    nats_server: NatsServer, nats_runner: AsyncRunner
) -> None:
    """No JetStream at all: nothing acknowledges; after flush_timeout the finals go by core NATS,
    reported once, and every one reaches a plain subscriber."""
    witness = Witness(nats_runner, nats_server.url, f"backbeat.status.{CLUSTER}.>")
    cfg = config(nats_server.url, claims_stream=STREAM, flush_timeout=0.5)
    with (
        Pulse(config(nats_server.url, agent_id="xo-pulse"), tempo_bpm=TEMPO),
        Integration(cfg, node_id=NODE) as integration,
    ):
        wait_until(lambda: integration.get_health()["beats_received"] > 0, what="first beat")
        for k in range(20):
            integration.start_p2p_operation(f"p-{k}", "election", 3)
            integration.complete_p2p_operation(f"p-{k}", 2)
        witness.wait_for(lambda ds: len(finals_per_task(ds)) == 20, what="20 finals")
        wait_until(lambda: integration.get_health()["claims_queued"] == 0, what="all confirmed")
        errors = [e for e in integration.get_health()["errors"] if "claims stream" in e]
    witness.close()
    assert len(errors) == 1, errors
    assert "no acknowledgement" in errors[0]


def finals_to_a_frozen_server(
    server: NatsServer, tmp_path: Any, prefix: str
) -> tuple[BackbeatConfig, Integration]:
    """An agent with a claims stream and a spool, its server frozen (SIGSTOP, taken effect):
    operations ``{prefix}-0`` .. ``-9`` completed, their finals sent and unanswered (on a slow
    machine some may have timed out and gone the core path: unconfirmed all the same)."""
    cfg = config(server.url, claims_stream=STREAM, spool_path=str(tmp_path / "spool"), flush_timeout=2.0)
    create_claims_stream(cfg)
    integration = Integration(cfg, node_id=NODE)
    integration.start()
    assert server.proc is not None
    server.proc.send_signal(signal.SIGSTOP)
    try:
        wait_until(lambda: frozen(server), what="the server stopped")  # before a final can reach it
        for k in range(10):
            integration.start_p2p_operation(f"{prefix}-{k}", "election", 3)
            integration.complete_p2p_operation(f"{prefix}-{k}", 2)
        wait_until(lambda: integration.get_health()["claims_queued"] == 10, what="finals sent, unanswered")
    except BaseException:
        server.proc.send_signal(signal.SIGCONT)
        integration.stop()
        raise
    return cfg, integration


@pytest.mark.nats
def test_finals_waiting_for_a_puback_at_stop_are_spooled_and_land_once(
    nats_jetstream: NatsServer, tmp_path: Any
) -> None:
    """The server freezes (SIGSTOP) with finals waiting for their PubAck: stop() spools them; the
    frozen server dies; the next run sends them from the spool, and the stream holds each once."""
    server = nats_jetstream
    cfg, integration = finals_to_a_frozen_server(server, tmp_path, "s")
    try:
        integration.stop()
        spooled = integration.transport.stats()["claims_spooled"]  # type: ignore[union-attr]
    finally:
        integration.stop()
        server.kill()  # never thawed: what it had read and not stored is gone
    assert spooled == 10
    server.start()
    with Integration(cfg.evolve(flush_timeout=3.0), node_id=NODE) as again:
        wait_until(lambda: again.get_health()["claims_queued"] == 0, what="the spool sent and acknowledged")
        assert stream_of(again).acked >= 10
    stored = [json.loads(m) for m in server.stored(STREAM)]
    assert finals_per_task(stored) == Counter({f"s-{k}": 1 for k in range(10)})


@pytest.mark.nats
def test_a_spooled_final_whose_first_copy_was_stored_is_not_stored_twice(
    nats_jetstream: NatsServer, tmp_path: Any
) -> None:
    """Finals sent to a frozen server are spooled at stop(); the server then thaws and stores
    the first copies after all. The next run resends them from the spool with the ids they were
    first sent with, so the stream drops them as duplicates: it holds each once (before, the
    resend's id was worked out from the claim read back, and the stream stored a second copy)."""
    server = nats_jetstream
    cfg, integration = finals_to_a_frozen_server(server, tmp_path, "t")
    try:
        integration.stop()
        spooled = integration.transport.stats()["claims_spooled"]  # type: ignore[union-attr]
    finally:
        server.proc.send_signal(signal.SIGCONT)  # it reads what was sent and stores it after all
        integration.stop()
    assert spooled == 10

    def stored() -> Counter[str]:
        return finals_per_task([json.loads(m) for m in server.stored(STREAM)])

    wait_until(lambda: stored() == Counter({f"t-{k}": 1 for k in range(10)}), what="the first copies stored")
    with Integration(cfg.evolve(flush_timeout=3.0), node_id=NODE) as again:
        wait_until(lambda: again.get_health()["claims_queued"] == 0, what="the spool sent and acknowledged")
        assert stream_of(again).duplicates + stream_of(again).acked >= 10
    assert stored() == Counter({f"t-{k}": 1 for k in range(10)})
