"""Helpers shared by the in-process tests: a hand-driven pulse and a claim recorder."""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from backbeat_sync import BackbeatConfig, BeatFrame, Integration, StatusClaim
from backbeat_sync.transport.local import LocalBus

_names = itertools.count()

#: Default bound of every wait on a condition. Waits cost only the time the condition takes
#: to hold; the bound is reached only when a test is failing, so it is generous enough for
#: a slow, busy machine (CI: 2 shared cores) where a thread may be descheduled for seconds.
PATIENCE = 30.0


def unique_bus() -> str:
    """A bus name no other test uses."""
    return f"test-{next(_names)}"


def wait_until(predicate: Callable[[], bool], timeout: float = PATIENCE, what: str = "condition") -> None:
    """Poll ``predicate`` until true; fail the test after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.002)


class HandledBeats:
    """Tracks the newest beat an integration's beat thread has finished handling."""

    def __init__(self, integration: Integration) -> None:
        self._cond = threading.Condition()
        self.latest = -1
        integration.on_beat_handled(self._handled)

    def _handled(self, frame: BeatFrame, seconds: float) -> None:
        with self._cond:
            self.latest = max(self.latest, frame.beat_index)
            self._cond.notify_all()

    def wait(self, index: int, timeout: float = PATIENCE) -> None:
        """Wait until beat ``index`` (or a later one) has been handled."""
        with self._cond:
            if not self._cond.wait_for(lambda: self.latest >= index, timeout):
                raise AssertionError(f"beat {index} not handled in {timeout}s (latest {self.latest})")


class ManualPulse:
    """Publishes beat frames on a local bus when told to (``local://NAME?pulse=manual``).

    With ``handled`` set, :meth:`beat` returns once the integration has handled the beat.
    """

    def __init__(
        self,
        bus: str,
        cluster_id: str,
        tempo_bpm: float = 60.0,
        bar_length: int = 4,
        handled: HandledBeats | None = None,
    ) -> None:
        self.handled = handled
        self.bus = LocalBus.named(bus)
        self.cluster_id = cluster_id
        self.tempo_bpm = tempo_bpm
        self.bar_length = bar_length
        self.subject = f"backbeat.beat.{cluster_id}"

    def frame(self, index: int, **changes: object) -> BeatFrame:
        fields: dict[str, object] = {
            "cluster_id": self.cluster_id,
            "beat_index": index,
            "downbeat": index % self.bar_length == 0,
            "phase": "downbeat" if index % self.bar_length == 0 else "upbeat",
            "tempo_bpm": self.tempo_bpm,
            "window_id": f"w-{index // self.bar_length}",
            "bar_length": self.bar_length,
        }
        fields.update(changes)
        return BeatFrame(**fields)  # type: ignore[arg-type]

    def beat(self, index: int, *, wait: bool = True, **changes: object) -> BeatFrame:
        """Publish the frame for ``index`` (and wait until it is handled, if tracking)."""
        f = self.frame(index, **changes)
        self.bus.publish(self.subject, f.encode())
        if wait and self.handled is not None:
            self.handled.wait(index)
        return f

    def raw(self, data: bytes) -> None:
        """Publish raw bytes on the beat subject."""
        self.bus.publish(self.subject, data)


class ClaimLog:
    """Records claims from ``on_claim`` and lets a test wait for them."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self.claims: list[StatusClaim] = []

    def __call__(self, claim: StatusClaim) -> None:
        with self._cond:
            self.claims.append(claim)
            self._cond.notify_all()

    def wait_for(self, predicate: Callable[[list[StatusClaim]], bool], timeout: float = PATIENCE) -> None:
        """Wait until ``predicate(claims)`` holds.

        The predicate reads the whole list, so it is not run on every claim that arrives
        (tens of thousands of claims would make that quadratic, and on a busy machine the
        waiter would hold the lock the claims need): between two runs the waiter lets
        claims in for at least 2 ms, or ten times as long as the last run took.
        """
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                started = time.monotonic()
                if predicate(self.claims):
                    return
                now = time.monotonic()
                if now > deadline:
                    tail = [(c.task_id, c.state, c.phase) for c in self.claims[-5:]]
                    raise AssertionError(
                        f"claims did not arrive in {timeout}s ({len(self.claims)} claims); last: {tail}"
                    )
                pause_until = min(deadline, now + max(0.002, 10 * (now - started)))
                self._cond.wait(max(0.0, deadline - now))  # woken by the next claim
                while (left := pause_until - time.monotonic()) > 0:
                    self._cond.wait(left)  # let more claims in before reading them all again

    def for_task(self, task_id: str) -> list[StatusClaim]:
        with self._cond:
            return [c for c in self.claims if c.task_id == task_id]

    def snapshot(self) -> list[StatusClaim]:
        with self._cond:
            return list(self.claims)


@contextmanager
def manual_integration(
    *, tempo_bpm: float = 60.0, bar_length: int = 4, **config: object
) -> Iterator[tuple[Integration, ManualPulse, ClaimLog]]:
    """A started integration on a private manual bus, its pulse, and its claim log."""
    bus = unique_bus()
    cfg = BackbeatConfig(
        cluster_id="test",
        agent_id="agent-1",
        nats_url=f"local://{bus}?pulse=manual",
        tempo_bpm=tempo_bpm,
        bar_length=bar_length,
        **config,  # type: ignore[arg-type]
    )
    integration = Integration(cfg, node_id="node-1")
    log = ClaimLog()
    integration.on_claim(log)
    pulse = ManualPulse(
        bus, "test", tempo_bpm=tempo_bpm, bar_length=bar_length, handled=HandledBeats(integration)
    )
    with integration:
        yield integration, pulse, log


def outbox_claim(task: str, state: str = "executing", beat: int = 1) -> StatusClaim:
    """A claim for ``task`` in ``state`` at ``beat`` (only what an outbox looks at matters)."""
    final = state in ("done", "failed")
    return StatusClaim(
        cluster_id="outbox",
        agent_id="a",
        node_id="12D3KooWOutbox",
        task_id=task,
        beat_index=beat,
        state=state,
        beats_left=0 if final else 1,
        progress=1.0 if state == "done" else 0.0,
        notes="n",
        sent_at="2026-12-01T00:00:00.000Z",
    )
