"""User story 1: give existing sync functions beat budgets with one line each.

Run it as it is: ``python examples/decorate_functions.py``. It uses the
in-process pulse (``local://``) unless ``CHORUS_BACKBEAT_NATS_URL`` names a NATS
server (then a pulse must run there, e.g. ``backbeat-sync pulse``). At 240 BPM a
beat is 0.25 s. Quick calls cost no claim; a call still running at a beat is
claimed from then on; the overrunning lookup is stopped by its budget and its
failure is claimed at once. It prints every claim and exits in a few seconds.
"""

from __future__ import annotations

import os
import sys
import time

from backbeat_sync import BackbeatConfig, BeatBudgetExceeded, Integration, StatusClaim, beat_budget


@beat_budget(2, operation_type="dht_store")
def store(key: str, value: bytes) -> int:
    """An existing function: store a value (here, pretend to: bigger values take longer)."""
    time.sleep(0.02 * len(value))
    return len(value)


class Resolver:
    """Methods, classmethods and staticmethods take a budget the same way."""

    @beat_budget(3, operation_type="peer_discovery", name="resolver.lookup")
    def lookup(self, peer: str, slow: bool = False) -> str:
        """Resolve a peer; a slow lookup spins in Python until its budget stops it."""
        deadline = time.monotonic() + (10.0 if slow else 0.4)
        while time.monotonic() < deadline:
            pass
        return f"{peer}@10.0.0.7"

    @beat_budget(1)
    @staticmethod
    def normalise(peer: str) -> str:
        """A quick helper: never claimed (it ends between two beats)."""
        return peer.strip().lower()


def say(line: str) -> None:
    """Print a whole line in one write (several threads print at once)."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def wait_for_first_beat(integration: Integration, timeout: float = 2.0) -> None:
    """Give the pulse a moment to send its first frame, so claims carry real beat numbers."""
    deadline = time.monotonic() + timeout
    while not integration.clock.has_beat and time.monotonic() < deadline:
        time.sleep(0.01)


def show(claim: StatusClaim) -> None:
    """Print one claim (health claims are skipped to keep the output short)."""
    if claim.task_id != "chorus-p2p-health":
        say(f"  claim beat={claim.beat_index} {claim.task_id:<22} {claim.state:<9} {claim.notes}")


def main() -> None:
    """Run the story and print the claims."""
    cfg = BackbeatConfig(
        cluster_id="chorus-dev",
        agent_id="decorate-demo",
        nats_url=os.environ.get("CHORUS_BACKBEAT_NATS_URL", "local://"),
        tempo_bpm=240,
    )
    with Integration(cfg, node_id="12D3KooWDecorate") as integration:
        integration.on_claim(show)
        wait_for_first_beat(integration)
        resolver = Resolver()
        say("1000 quick calls (no claims expected):")
        for i in range(1000):
            resolver.normalise(f" Peer-{i} ")
        say("three stores; the last runs across a beat (claimed while running):")
        for i in range(3):
            say(f"  store -> {store(f'k{i}', b'value' * (i + 1))} bytes")
        say("a lookup that fits its budget, then one that overruns:")
        say(f"  lookup -> {resolver.lookup('peer-a')}")
        t0 = time.monotonic()
        try:
            resolver.lookup("peer-b", slow=True)
        except BeatBudgetExceeded as exc:
            say(f"  stopped after {time.monotonic() - t0:.2f} s: {exc}")
        time.sleep(0.3)  # let the last claims reach the callback thread
        say(f"health: {integration.get_health()['active_operations']} active operations")


if __name__ == "__main__":
    main()
