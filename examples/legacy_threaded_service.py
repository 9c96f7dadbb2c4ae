"""User story 3: a legacy threaded service: 16 workers, a beat budget per task, graceful stop.

Run it as it is: ``python examples/legacy_threaded_service.py`` (in-process pulse,
or the NATS server in ``CHORUS_BACKBEAT_NATS_URL``). At 600 BPM a beat is 0.1 s.
Sixteen worker threads take tasks from a queue; each task runs under a budget of
three beats with ``Integration.execute_with_beat_budget`` (the seed's call). One
task in twenty is a runaway loop that the budget stops. The service stops
gracefully on SIGINT or SIGTERM (workers finish their current task, the
integration flushes its claims), or by itself once the queue is empty (about 5 s).
"""

from __future__ import annotations

import os
import queue
import random
import signal
import sys
import threading
import time
from collections import Counter
from types import FrameType

from backbeat_sync import BackbeatConfig, BeatBudgetExceeded, Integration, StatusClaim

WORKERS = 16
TASKS = 320
BUDGET_BEATS = 3


def say(line: str) -> None:
    """Print a whole line in one write (several threads print at once)."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def wait_for_first_beat(integration: Integration, timeout: float = 2.0) -> None:
    """Give the pulse a moment to send its first frame, so claims carry real beat numbers."""
    deadline = time.monotonic() + timeout
    while not integration.clock.has_beat and time.monotonic() < deadline:
        time.sleep(0.01)


def handle(task_id: int, rng: random.Random) -> str:
    """The legacy task: usually quick, sometimes a runaway loop."""
    if task_id % 20 == 7:
        while True:  # a bug: never ends on its own
            pass
    time.sleep(rng.uniform(0.01, 0.12))
    return f"task-{task_id} ok"


class Service:
    """A worker pool that budgets every task and stops gracefully."""

    def __init__(self, integration: Integration) -> None:
        self.integration = integration
        self.tasks: queue.Queue[int] = queue.Queue()
        self.stopping = threading.Event()
        self.outcomes: Counter[str] = Counter()
        self.lock = threading.Lock()

    def worker(self, n: int) -> None:
        rng = random.Random(n)
        while not self.stopping.is_set():
            try:
                task_id = self.tasks.get(timeout=0.1)
            except queue.Empty:
                return
            try:
                self.integration.execute_with_beat_budget(BUDGET_BEATS, handle, task_id, rng)
                outcome = "done"
            except BeatBudgetExceeded as exc:
                outcome = "stopped by budget"
                say(f"  worker-{n:02d}: task-{task_id} {exc}")
            with self.lock:
                self.outcomes[outcome] += 1

    def stop(self, signum: int, frame: FrameType | None) -> None:
        say(f"  received {signal.Signals(signum).name}: finishing current tasks")
        self.stopping.set()


def main() -> None:
    """Start the integration and the pool; stop on a signal or when the work is done."""
    cfg = BackbeatConfig(
        cluster_id="chorus-dev",
        agent_id="legacy-service",
        nats_url=os.environ.get("CHORUS_BACKBEAT_NATS_URL", "local://"),
        tempo_bpm=600,
    )
    failed: list[StatusClaim] = []
    with Integration(cfg, node_id="12D3KooWLegacy") as integration:
        integration.on_claim(lambda c: failed.append(c) if c.state == "failed" else None)
        wait_for_first_beat(integration)
        service = Service(integration)
        signal.signal(signal.SIGINT, service.stop)
        signal.signal(signal.SIGTERM, service.stop)
        for task_id in range(TASKS):
            service.tasks.put(task_id)
        threads = [
            threading.Thread(target=service.worker, args=(n,), name=f"worker-{n}") for n in range(WORKERS)
        ]
        t0 = time.monotonic()
        for th in threads:
            th.start()
        for th in threads:
            while th.is_alive():
                th.join(0.1)  # short joins keep the main thread responsive to signals
        time.sleep(0.3)
        total = sum(service.outcomes.values())
        say(f"{total} tasks in {time.monotonic() - t0:.1f} s: {dict(service.outcomes)}")
        say("failure claims:")
        for c in failed:
            say(f"  claim beat={c.beat_index} {c.task_id:<24} {c.notes}")
        health = integration.get_health()
        say(f"health: active_operations={health['active_operations']}, claims={health['claims_emitted']}")


if __name__ == "__main__":
    main()
