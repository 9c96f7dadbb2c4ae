"""Sample agents for ``backbeat-sync dashboard --demo``: operations that finish, fail and overrun."""

from __future__ import annotations

import random
import threading
import time

from ..budget import track_operation
from ..config import BackbeatConfig
from ..errors import BeatBudgetExceeded
from ..integration import Integration
from ..operations import OperationPhase

__all__ = ["DemoAgents"]

#: (operation type, budget in beats) the demo draws from.
KINDS = (("election", 6), ("dht_store", 3), ("pubsub_sync", 4), ("peer_discovery", 8))


class DemoAgents:
    """``agents`` integrations on ``config``'s bus, each running operations one after another.

    Each operation draws a type and a share of its budget to work: most finish in
    time (``done``), some fail, some overrun and are interrupted (``exceeded``).
    Both faces are used: ``track_operation`` and the seed's explicit
    ``start_p2p_operation`` ... ``complete_p2p_operation``.

    Args:
        config: the cluster and bus (``local://NAME`` runs the in-process pulse).
        agents: how many agents.
        seed: seeds the draws (the same seed, the same sequence of choices).
    """

    def __init__(self, config: BackbeatConfig, *, agents: int = 3, seed: int = 1) -> None:
        self.config = config
        self.integrations = [
            Integration(config.evolve(agent_id=f"demo-{n + 1}"), node_id=f"12D3KooWDemo{n + 1}")
            for n in range(agents)
        ]
        self._seed = seed
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def start(self) -> DemoAgents:
        """Start every agent and its worker thread. Returns self."""
        for n, integration in enumerate(self.integrations):
            integration.start()
            t = threading.Thread(
                target=self._work,
                args=(integration, random.Random(self._seed * 1000 + n)),
                name=f"backbeat-demo-{n + 1}",
                daemon=True,
            )
            self._threads.append(t)
            t.start()
        return self

    def stop(self) -> None:
        """Stop the workers and the agents (operations still running are failed). Idempotent."""
        self._stop.set()
        for t in self._threads:
            t.join(10.0)
        self._threads.clear()
        for integration in self.integrations:
            integration.stop()

    def __enter__(self) -> DemoAgents:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _work(self, integration: Integration, rng: random.Random) -> None:
        spb = 60.0 / self.config.tempo_bpm
        count = 0
        while not self._stop.is_set():
            count += 1
            kind, beats = rng.choice(KINDS)
            share = rng.choice((0.3, 0.5, 0.7, 0.8, 0.9, 1.6))  # 1.6: runs out of budget
            fail = rng.random() < 0.1
            op_id = f"{kind}-{integration.config.agent_id}-{count}"
            try:
                if count % 3 == 0:
                    self._explicit(integration, op_id, kind, beats, share * beats * spb, fail)
                else:
                    with track_operation(op_id, kind, beats=beats, peers=3, integration=integration) as op:
                        op.set_phase(OperationPhase.EXECUTING, peers=rng.randint(2, 7))
                        if self._pause(share * beats * spb):
                            return
                        if fail:
                            raise ConnectionError("peer went away")
            except (BeatBudgetExceeded, ConnectionError):
                pass
            if self._stop.wait(rng.uniform(0.0, 1.0) * spb):
                return

    def _pause(self, seconds: float) -> bool:
        """Sleep ``seconds`` in short steps (a budget interrupt lands between two); True if stopping."""
        end = time.monotonic() + seconds
        while (left := end - time.monotonic()) > 0:
            if self._stop.is_set():
                return True
            time.sleep(min(left, 0.05))
        return self._stop.is_set()

    def _explicit(
        self, integration: Integration, op_id: str, kind: str, beats: int, seconds: float, fail: bool
    ) -> None:
        integration.start_p2p_operation(op_id, kind, beats)
        integration.update_p2p_operation_phase(op_id, OperationPhase.CONNECTING, 1)
        if self._stop.wait(seconds / 2):
            return
        integration.update_p2p_operation_phase(op_id, OperationPhase.NEGOTIATING, 3)
        if self._stop.wait(seconds / 2):
            return
        if fail:
            integration.fail_p2p_operation(op_id, "quorum lost")
        else:
            integration.complete_p2p_operation(op_id, 3)
