"""The seed document's four P2P flows, with the explicit Integration API.

Runs on the in-process pulse (no server) unless CHORUS_BACKBEAT_NATS_URL is
set, in which case it joins that NATS server (start a pulse there with
``backbeat-sync pulse --nats URL``). It prints every status claim the agent
emits and exits by itself in a few seconds.

    python examples/p2p_operations.py
"""

from __future__ import annotations

import threading

from backbeat_sync import BackbeatConfig, Integration, OperationPhase, StatusClaim

TEMPO_BPM = 240  # a quarter of a second per beat, so the flows finish in seconds


def show(claim: StatusClaim) -> None:
    """Print one claim as a line: beat, task, state, beats left, progress, notes."""
    print(
        f"beat={claim.beat_index:<12} {claim.task_id:<24} {claim.state:<9}"
        f" left={claim.beats_left} progress={claim.progress:.2f}  {claim.notes}"
    )


def main() -> None:
    """Run election, DHT store, PubSub sync and peer discovery flows, one beat apart."""
    config = BackbeatConfig.from_env(
        defaults={
            "nats_url": "local://",
            "cluster_id": "chorus-dev",
            "agent_id": "chorus-dev-alice",
            "tempo_bpm": TEMPO_BPM,
        }
    )
    with Integration(config, node_id="12D3KooWAbc") as integration:
        integration.on_claim(show)
        beat = threading.Event()
        integration.on_beat(lambda frame: beat.set())

        def next_beat() -> None:
            beat.clear()
            if not beat.wait(timeout=10 * integration.clock.beat_duration):
                raise SystemExit("no beat arrived: is a pulse running on this NATS server?")

        next_beat()

        # Leader election: 5 beats, through every phase.
        integration.start_p2p_operation("election-leader-2025", "election", 5, {"candidates": 3, "quorum": 2})
        # DHT store, PubSub sync and peer discovery, as the seed tracks them.
        integration.start_p2p_operation("dht-store-user42", "dht_store", 3, {"key": "user42"})
        integration.start_p2p_operation("pubsub-sync-m1", "pubsub_sync", 2, {"topic": "chorus/tasks"})
        integration.start_p2p_operation("peer-discovery-s1", "peer_discovery", 5, {"target_peers": 10})

        integration.update_p2p_operation_phase("election-leader-2025", OperationPhase.CONNECTING, 3)
        integration.update_p2p_operation_phase("dht-store-user42", OperationPhase.EXECUTING, 5)
        next_beat()
        integration.update_p2p_operation_phase("election-leader-2025", OperationPhase.NEGOTIATING, 3)
        integration.complete_p2p_operation("pubsub-sync-m1", 4)
        next_beat()
        integration.update_p2p_operation_phase("election-leader-2025", OperationPhase.EXECUTING, 3)
        integration.complete_p2p_operation("dht-store-user42", 5)
        next_beat()
        integration.complete_p2p_operation("election-leader-2025", 3)
        integration.fail_p2p_operation("peer-discovery-s1", "quorum not reached within timeout")

        health = integration.get_health()
        print(
            f"\nhealth: connected={health['connected']} beat={health['current_beat']}"
            f" tempo={health['current_tempo']:g} measured={health['measured_bpm']:.1f}"
            f" drift={health['tempo_drift']} active={health['active_operations']}"
        )


if __name__ == "__main__":
    main()
