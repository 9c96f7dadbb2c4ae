"""User story 2: a script that tracks its steps as operations with ``with track_operation(...)``.

Run it as it is: ``python examples/script_context_manager.py`` (in-process pulse,
or the NATS server in ``CHORUS_BACKBEAT_NATS_URL``). At 300 BPM a beat is 0.2 s.
Each step is claimed at start, on each phase change and at the end. A step that
waits with ``op.sleep``/``op.wait`` is stopped as soon as its budget runs out;
warnings go out at half and three quarters of the budget. Exits in a few seconds.
"""

from __future__ import annotations

import os
import sys
import threading
import time

from backbeat_sync import (
    BackbeatConfig,
    BeatBudgetExceeded,
    Integration,
    OperationPhase,
    StatusClaim,
    Tracker,
    track_operation,
)


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
    """Print one claim (health claims skipped)."""
    if claim.task_id != "chorus-p2p-health":
        say(f"  claim beat={claim.beat_index} {claim.task_id:<18} {claim.state:<9} {claim.notes}")


def warned(op: Tracker, fraction: float) -> None:
    """on_warning callback: runs on the budget callback thread."""
    say(f"  on_warning: {op.operation_id} has used {fraction:.0%} of its budget")


def main() -> None:
    """Run three steps: one completes, one fails by an error, one overruns its budget."""
    cfg = BackbeatConfig(
        cluster_id="chorus-dev",
        agent_id="script-demo",
        nats_url=os.environ.get("CHORUS_BACKBEAT_NATS_URL", "local://"),
        tempo_bpm=300,
    )
    with Integration(cfg, node_id="12D3KooWScript") as integration:
        integration.on_claim(show)
        wait_for_first_beat(integration)

        say("step 1: an election that goes through its phases in time")
        with track_operation(
            "election-1", "election", beats=6, peers=3, manual_phases=True, data={"quorum": 2}
        ) as op:
            op.set_phase(OperationPhase.CONNECTING, peers=3)
            op.sleep(0.2)
            op.set_phase(OperationPhase.NEGOTIATING, peers=4)
            votes = threading.Event()
            threading.Timer(0.15, votes.set).start()
            op.wait(votes, timeout=1)
            op.set_phase(OperationPhase.EXECUTING, peers=4)
            say(f"  election done: used {op.beats_used:.2f} of 6 beats")

        say("step 2: a DHT store that fails with an error (the error propagates)")
        try:
            with track_operation("dht-store-k", "dht_store", beats=4):
                raise ConnectionResetError("peer went away")
        except ConnectionResetError as exc:
            say(f"  caught: {exc!r}")

        say("step 3: a sync that waits too long and is stopped by its budget")
        t0 = time.monotonic()
        try:
            with track_operation(
                "pubsub-sync-9", "pubsub_sync", beats=2, warn_at=(0.5, 0.75), on_warning=warned
            ) as op:
                op.wait(threading.Event())  # never set: only the budget ends this
        except BeatBudgetExceeded as exc:
            say(f"  stopped after {time.monotonic() - t0:.2f} s: {exc}")
        time.sleep(0.3)
        say(f"health: active_operations={integration.get_health()['active_operations']}")


if __name__ == "__main__":
    main()
