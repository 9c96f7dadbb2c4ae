"""Workflows on a real nats-server: two agents correlated, and priorities through an outage.

The other side is raw nats-py (``tests/natsserver.py``): a plain subscriber, or a
file-stored JetStream stream that records every claim the server received, in order.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

import backbeat_sync as bb
from backbeat_sync import BackbeatConfig, Integration, track_operation

from .natsserver import AsyncRunner, NatsServer, RawPulse, Witness
from .support import PATIENCE, HandledBeats, wait_until

CLUSTER = "flows"
NODE = "12D3KooWFlows"
NEVER = 60.0
BIG = 100_000
RANK = {"critical": 0, "high": 1, "normal": 2, "low": 3}


def config(url: str, agent: str, **changes: Any) -> BackbeatConfig:
    """An agent config that reconnects fast."""
    fields: dict[str, Any] = {
        "cluster_id": CLUSTER,
        "agent_id": agent,
        "nats_url": url,
        "tempo_bpm": 1200.0,
        "reconnect_wait": 0.05,
        "reconnect_jitter": 0.01,
        "connect_timeout": 5.0,
        "flush_timeout": 5.0,
    }
    fields.update(changes)
    return BackbeatConfig(**fields)


AGENT_B = """
import sys
import backbeat_sync as bb

url, correlation, parent = sys.argv[1:4]
cfg = bb.BackbeatConfig(cluster_id="{cluster}", agent_id="agent-b", nats_url=url, flush_timeout=5.0)
with bb.Integration(cfg, node_id="12D3KooWAgentB") as agent:
    with bb.track_operation("b-step", "workflow", beats=1000, integration=agent,
                            correlation_id=correlation, parent_id=parent, depends_on=[parent]) as op:
        assert (op.correlation_id, op.parent_id) == (correlation, parent)
        agent.start_p2p_operation("b-sub", "dht_store", 3, priority="critical")
        agent.complete_p2p_operation("b-sub", 2)
print("agent-b done")
"""


@pytest.mark.nats
def test_two_agents_claim_one_workflow(nats_server: NatsServer, nats_runner: AsyncRunner) -> None:
    """An outside subscriber sees one workflow across threads and agents: parent_id and correlation_id.

    Agent A (this process) opens a root, runs a child in a thread pool through
    ``op.bind`` and a decorated call inside the child, still running at a beat. Agent B
    (another process) continues the workflow with the ids A sends it.
    """
    witness = Witness(nats_runner, nats_server.url, "backbeat.status.>")
    pulse = RawPulse(nats_runner, nats_server.url, CLUSTER)
    agent = Integration(config(nats_server.url, "agent-a"), node_id=NODE)
    agent.start()
    running, release = threading.Event(), threading.Event()

    @bb.beat_budget(BIG, name="stage", integration=agent)
    def stage() -> str:
        running.set()
        assert release.wait(NEVER)
        op = bb.current_operation()
        assert op is not None
        return op.operation_id

    def child() -> tuple[str, str, str]:
        with track_operation("a-child", "workflow", beats=BIG, integration=agent) as op:
            return stage(), op.correlation_id, op.operation_id

    try:
        with track_operation("wf-root", "workflow", beats=BIG, integration=agent) as root:
            with ThreadPoolExecutor(1) as pool:
                future = pool.submit(root.bind(child))
                assert running.wait(NEVER)
                pulse.beat()  # the decorated call is running: it is claimed from this beat on
                witness.wait_for(
                    lambda ds: any(d["task_id"].startswith("stage-") for d in ds), what="the call's claim"
                )
                release.set()
                stage_id, correlation, parent = future.result(NEVER)
            script = textwrap.dedent(AGENT_B.format(cluster=CLUSTER))
            proc = subprocess.run(
                [sys.executable, "-c", script, nats_server.url, correlation, parent],
                capture_output=True,
                text=True,
                timeout=60,
            )
            assert proc.returncode == 0, proc.stderr
        witness.wait_for(
            lambda ds: {"wf-root", "b-step", "b-sub"} <= {d["task_id"] for d in ds if d["state"] == "done"},
            what="every final claim",
        )
    finally:
        release.set()
        agent.stop()
        pulse.stop()
    claims = [d for d in witness.dicts() if d["task_id"] != "chorus-p2p-health"]
    fields = {(d["agent_id"], d["task_id"], d.get("parent_id"), d["correlation_id"]) for d in claims}
    assert fields == {
        ("agent-a", "wf-root", None, "wf-root"),
        ("agent-a", "a-child", "wf-root", "wf-root"),
        ("agent-a", stage_id, "a-child", "wf-root"),
        ("agent-b", "b-step", "a-child", "wf-root"),
        ("agent-b", "b-sub", "b-step", "wf-root"),
    }
    b_step = [d for d in claims if d["task_id"] == "b-step"]
    assert {tuple(d["depends_on"]) for d in b_step} == {("a-child",)}  # as given; another agent's id
    assert {d["state"] for d in b_step} == {"executing", "done"}  # never blocks
    assert {d.get("priority") for d in claims if d["task_id"] == "b-sub"} == {"critical"}


def frame(index: int) -> bytes:
    """A beat frame at 60 BPM (handed to the agent directly: during the outage no frame can come
    through the server, so the test is the agent's pulse)."""
    return bb.BeatFrame(
        cluster_id=CLUSTER,
        beat_index=index,
        downbeat=index % 4 == 0,
        phase="downbeat" if index % 4 == 0 else "upbeat",
        tempo_bpm=60.0,
        window_id=f"w-{index // 4}",
    ).encode()


@pytest.mark.nats
def test_priorities_through_an_outage(nats_jetstream: NatsServer) -> None:
    """5,000 operations of mixed priorities over six beats with the server down, then a restart.

    Every final claim arrives; in each beat's claims, as the server stored them, critical come
    before high, high before normal, normal before low; while disconnected the outbox stays
    at its bound (coalescing, low priority first) instead of growing with every beat.
    """
    server = nats_jetstream
    server.capture()
    n, limit, priorities = 5_000, 12_000, ("low", "normal", "high", "critical")
    agent = Integration(config(server.url, "agent-prio", tempo_bpm=60.0, outbox_limit=limit), node_id=NODE)
    handled = HandledBeats(agent)

    def beat(index: int) -> dict[str, Any]:
        agent.frame_received(frame(index), time.monotonic())
        handled.wait(index)
        return agent.get_health()

    agent.start()
    try:
        beat(1)
        server.stop()
        wait_until(
            lambda: any("disconnected from NATS" in e for e in agent.get_health()["errors"]),
            what="the agent to see the outage",
        )
        for i in range(n):
            agent.start_p2p_operation(f"op-{i}", "bulk", 100, priority=priorities[i % 4])
        healths = [beat(b) for b in range(2, 8)]
        queued = [h["claims_queued"] for h in healths]
        # Beat 2, below the bound: only low operations are coalesced (they are behind).
        assert healths[0]["claims_coalesced_by_priority"] == {
            "critical": 0,
            "high": 0,
            "normal": 0,
            "low": n // 4,
        }
        assert queued[0] == n + 3 * n // 4
        # Then the bound holds: more beats, no more memory; low still coalesced every beat.
        assert max(queued) == limit
        assert queued[-1] == queued[2] == limit
        assert healths[-1]["claims_coalesced_by_priority"]["low"] == 6 * n // 4
        for i in range(n):
            agent.complete_p2p_operation(f"op-{i}", 1)
        assert agent.get_health()["claims_queued"] >= n  # finals are never dropped
        server.start()
        wait_until(lambda: agent.get_health()["claims_queued"] == 0, timeout=PATIENCE * 2, what="the outbox")
    finally:
        agent.stop()
    stored = [json.loads(m) for m in server.stored()]
    done = {d["task_id"] for d in stored if d["state"] == "done"}
    assert done >= {f"op-{i}" for i in range(n)}
    for b in range(2, 8):
        ranks = [
            RANK[d.get("priority", "normal")]
            for d in stored
            if d["beat_index"] == b and d["state"] == "executing" and d["task_id"].startswith("op-")
        ]
        assert ranks == sorted(ranks), f"beat {b}: claims out of priority order"
    last = [d for d in stored if d["beat_index"] == 7 and d["state"] == "executing"]
    assert {d.get("priority", "normal") for d in last} == set(priorities)
