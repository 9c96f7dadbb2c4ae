"""The seed's four operation flows against a real nats-server, seen by an outside subscriber.

Each flow uses the seed's explicit API (``start_p2p_operation``,
``update_p2p_operation_phase``, ``complete_p2p_operation``, ``fail_p2p_operation``),
driven once by our :class:`~backbeat_sync.Pulse` and once by a hand-written pulse in
raw nats-py; a raw subscriber on ``backbeat.status.>`` checks every claim against
PROTOCOL.md. A last test runs the flows across a server restart and counts the
claims in a file-stored JetStream stream.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import attrs
import pytest

from backbeat_sync import BackbeatConfig, Integration, OperationPhase, StatusClaim
from backbeat_sync.pulse import Pulse

from .natsserver import HEALTH_TASK_ID, AsyncRunner, NatsServer, RawPulse, Witness, check_claim
from .support import ClaimLog, HandledBeats, wait_until

CLUSTER = "chorus-dev"
AGENT = "chorus-dev-alice"
NODE = "12D3KooWAbc"
TEMPO = 600.0


@attrs.frozen
class Flow:
    """One seed operation: its id, type, estimate, data and the steps after it starts."""

    id: str
    type: str
    beats: int
    data: dict[str, Any]
    steps: tuple[tuple[str, Any, Any], ...]
    phases: tuple[str, ...]  # the phases an outside subscriber must see, in order
    final: str


FLOWS = (
    Flow(
        "election-leader-2025",
        "election",
        5,
        {"candidates": 3, "quorum": 2},
        (("phase", OperationPhase.CONNECTING, 3), ("phase", OperationPhase.NEGOTIATING, 3),
         ("phase", OperationPhase.EXECUTING, 3), ("complete", 3, None)),
        ("started", "connecting", "negotiating", "executing", "completed"),
        "done",
    ),
    Flow(
        "dht-store-key42",
        "dht_store",
        3,
        {"key": "key42"},
        (("phase", OperationPhase.EXECUTING, 5), ("complete", 5, None)),
        ("started", "executing", "completed"),
        "done",
    ),
    Flow(
        "pubsub-sync-msg7",
        "pubsub_sync",
        2,
        {"topic": "chorus/tasks"},
        (("complete", 4, None),),
        ("started", "completed"),
        "done",
    ),
    Flow(
        "peer-discovery-s1",
        "peer_discovery",
        5,
        {"target_peers": 10},
        (("phase", OperationPhase.CONNECTING, 2), ("fail", "target peers not reached", None)),
        ("started", "connecting", "failed"),
        "failed",
    ),
)  # fmt: skip


def agent_config(url: str, **changes: Any) -> BackbeatConfig:
    """The agent's config (the seed's development example, on the test server)."""
    fields: dict[str, Any] = {
        "cluster_id": CLUSTER,
        "agent_id": AGENT,
        "nats_url": url,
        "tempo_bpm": TEMPO,
        "reconnect_wait": 0.05,
        "reconnect_jitter": 0.01,
        "flush_timeout": 2.0,
    }
    fields.update(changes)
    return BackbeatConfig(**fields)


def run_flows(integration: Integration, between: Callable[[int], None]) -> None:
    """Start the four flows, then apply one step of each per round; ``between(k)`` runs before round k."""
    for flow in FLOWS:
        integration.start_p2p_operation(flow.id, flow.type, flow.beats, data=flow.data)
    for k in range(max(len(f.steps) for f in FLOWS)):
        between(k)
        for flow in FLOWS:
            if k >= len(flow.steps):
                continue
            kind, a, b = flow.steps[k]
            if kind == "phase":
                integration.update_p2p_operation_phase(flow.id, a, b)
            elif kind == "complete":
                integration.complete_p2p_operation(flow.id, a)
            else:
                integration.fail_p2p_operation(flow.id, a)


def dedupe(seq: list[str]) -> list[str]:
    """``seq`` without consecutive repeats."""
    out: list[str] = []
    for x in seq:
        if not out or out[-1] != x:
            out.append(x)
    return out


def check_flows(claims: list[dict[str, Any]], *, every_beat: bool) -> None:
    """Every claim follows PROTOCOL.md; each flow shows its phases, maths, final claim (and every beat)."""
    mine = [d for d in claims if d["agent_id"] == AGENT]
    for d in mine:
        check_claim(d, cluster=CLUSTER, agent=AGENT, node=NODE)
    for flow in FLOWS:
        ops = [d for d in mine if d["task_id"] == flow.id]
        assert dedupe([d["phase"] for d in ops]) == list(flow.phases), flow.id
        start, final = ops[0], ops[-1]
        assert (start["state"], start["beats_left"], start["progress"]) == ("executing", flow.beats, 0.0)
        assert start["notes"] == f"P2P {flow.type}: started (peers: 0, node: {NODE})"
        assert final["state"] == flow.final
        assert all(d["state"] == flow.final for d in ops if d["state"] != "executing")  # resent: harmless
        s = start["beat_index"]
        for d in (d for d in ops if d["state"] == "executing"):
            passed = d["beat_index"] - s
            assert (d["beats_left"], d["progress"]) == (
                max(0, flow.beats - passed),
                min(1.0, passed / flow.beats),
            )
        beats = sorted({d["beat_index"] for d in ops})
        assert s <= beats[0], flow.id
        assert beats[-1] == final["beat_index"], flow.id
        if every_beat:  # claimed on the beats it was active: each round waited for a new beat
            # (Not necessarily every index: a pulse on a busy machine may skip a beat, and a beat
            # thread that falls behind claims once for the newest of several beats.)
            rounds = len(flow.steps)  # a new beat was handled before each of them
            assert len(beats) >= min(2, rounds), (flow.id, beats)
    health = [d for d in mine if d["task_id"] == HEALTH_TASK_ID]
    assert all(d["beat_index"] % 8 == 0 for d in health)


@contextmanager
def our_pulse(server: NatsServer, runner: AsyncRunner) -> Iterator[None]:
    """Our Pulse at the test tempo."""
    with Pulse(agent_config(server.url), tempo_bpm=TEMPO):
        yield


@contextmanager
def raw_pulse(server: NatsServer, runner: AsyncRunner) -> Iterator[None]:
    """A hand-written pulse in raw nats-py at the test tempo."""
    pulse = RawPulse(runner, server.url, CLUSTER, tempo_bpm=TEMPO, first_index=4000, reconnect_time_wait=0.05)
    pulse.start()
    try:
        yield
    finally:
        pulse.stop()


@pytest.mark.nats
@pytest.mark.parametrize("pulse", [our_pulse, raw_pulse], ids=["our-pulse", "hand-written-pulse"])
def test_seed_flows_reach_an_outside_subscriber(
    pulse: Callable[[NatsServer, AsyncRunner], Any], nats_server: NatsServer, nats_runner: AsyncRunner
) -> None:
    """election, dht_store, pubsub_sync and peer_discovery: every prescribed claim, right fields and maths."""
    witness = Witness(nats_runner, nats_server.url, "backbeat.status.>")
    integration = Integration(agent_config(nats_server.url), node_id=NODE)
    handled = HandledBeats(integration)
    with pulse(nats_server, nats_runner), integration:
        wait_until(lambda: handled.latest >= 0, what="first beat")
        handled.wait(handled.latest + 1)

        def one_beat(k: int) -> None:
            handled.wait(handled.latest + 1)

        run_flows(integration, one_beat)
        handled.wait(handled.latest + 1)
        emitted = integration.get_health()["claims_emitted"]
        wait_until(lambda: integration.get_health()["claims_queued"] == 0, what="claims out")
        witness.wait_for(lambda ds: len(ds) >= emitted, what=f"{emitted} claims at the subscriber")
        assert integration.get_health()["active_operations"] == 0
    claims = witness.dicts()
    witness.close()
    check_flows(claims, every_beat=True)


@pytest.mark.nats
def test_seed_flows_across_a_server_restart_reach_jetstream(
    nats_jetstream: NatsServer, nats_runner: AsyncRunner
) -> None:
    """The flows run through a server restart: every claim emitted is stored once the server is back."""
    server = nats_jetstream
    server.capture()
    integration = Integration(agent_config(server.url), node_id=NODE)
    log = ClaimLog()
    integration.on_claim(log)
    handled = HandledBeats(integration)
    with raw_pulse(server, nats_runner), integration:
        wait_until(lambda: handled.latest >= 0, what="first beat")
        handled.wait(handled.latest + 1)

        def around_restart(k: int) -> None:
            if k == 0:
                handled.wait(handled.latest + 1)
            elif k == 1:  # a quiet point: everything emitted so far is stored, then the server goes
                emitted = len(log.snapshot())
                wait_until(lambda: len(server.stored()) >= emitted, what="claims stored before the stop")
                server.stop()
                wait_until(lambda: not integration.get_health()["connected"], what="outage noticed")
            elif k == 3:  # steps 1 and 2 happened during the outage
                server.start()
                wait_until(lambda: integration.get_health()["reconnect_count"] == 1, what="back")
                beat = handled.latest
                handled.wait(beat + 1)

        run_flows(integration, around_restart)
        handled.wait(handled.latest + 1)
        emitted_claims = log.snapshot()
        wait_until(lambda: integration.get_health()["claims_queued"] == 0, what="claims out")
        wait_until(lambda: len(server.stored()) >= len(emitted_claims), what="all claims stored")
    stored = [json.loads(m) for m in server.stored()]
    check_flows(stored, every_beat=False)

    def key(c: StatusClaim | dict[str, Any]) -> tuple[Any, ...]:
        d = c.to_dict() if isinstance(c, StatusClaim) else c
        return (d["task_id"], d["state"], d.get("phase"), d["beat_index"], d["sent_at"])

    assert {key(c) for c in emitted_claims} - {key(d) for d in stored} == set()
    assert integration.get_health()["reconnect_count"] == 1
