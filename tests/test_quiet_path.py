"""The registry's quiet path (backbeat_sync.quiet): a plain block enters and leaves with no lock
while nobody would hear its claims, and goes the full way as soon as someone could."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
from collections import defaultdict
from pathlib import Path

import pytest

from backbeat_sync import (
    BackbeatConfig,
    DuplicateOperation,
    Integration,
    OperationPhase,
    P2POperation,
    track_operation,
)
from backbeat_sync.operations import OperationRegistry
from backbeat_sync.protocol import parse_status_claim
from backbeat_sync.transport.local import LocalBus
from backbeat_sync.workflow import Flow

from .support import unique_bus

P = OperationPhase
RANK = {"started": 0, "connecting": 1, "negotiating": 2, "executing": 3, "done": 4, "failed": 4}


def quiet_integration(bus: str) -> Integration:
    cfg = BackbeatConfig(cluster_id="test", agent_id="agent-1", nats_url=f"local://{bus}?pulse=manual")
    return Integration(cfg, node_id="node-1")


def op(op_id: str) -> P2POperation:
    return P2POperation(id=op_id, type="dht_store", start_beat=0, estimated_beats=3)


def test_the_path_is_open_only_while_nothing_would_see_it() -> None:
    """Open while quiet; closed by a consumer, a listener, counting by type, a workflow or stop."""
    got: list[str] = []
    registry = OperationRegistry(lambda o: got.append(o.id))
    assert not registry.enter_quiet(op("loud"), P.EXECUTING)  # it emits: closed
    registry.set_quiet(True)
    a = op("a")
    assert registry.enter_quiet(a, P.EXECUTING)
    assert registry.get("a").phase is P.EXECUTING
    assert registry.leave_quiet(a, 2)
    done = registry.get("a")
    assert (done.phase, done.peer_count, registry.active_count) == (P.COMPLETED, 2, 0)
    remove = registry.add_listener(Listener())
    assert not registry.enter_quiet(op("b"), P.EXECUTING)
    remove()
    c = op("c")
    assert registry.enter_quiet(c, P.EXECUTING)
    registry.counting = True
    assert not registry.enter_quiet(op("d"), P.EXECUTING)
    assert not registry.leave_quiet(c, 0)  # closed since it entered: the caller finishes it
    registry.finish("c", P.COMPLETED)
    registry.counting = False
    flowing = P2POperation(id="w", type="x", start_beat=0, estimated_beats=1, flow=Flow(correlation_id="w"))
    registry.add(flowing)
    assert not registry.enter_quiet(op("e"), P.EXECUTING)  # a workflow was seen: closed for good
    registry.finish("w", P.COMPLETED)
    registry.set_quiet(True)
    assert not registry.enter_quiet(op("f"), P.EXECUTING)
    assert registry.unheard == 2 + 1 + 2 + 1 + 2  # a: three; c: two quiet, one by finish; w: two
    quiet = OperationRegistry(lambda o: None)
    quiet.set_quiet(True)
    quiet.fail_all("stopping")
    assert not quiet.enter_quiet(op("g"), P.EXECUTING)  # closed by stop
    assert got == []


class Listener:
    def added(self, op: P2POperation) -> None: ...
    def changed(self, op: P2POperation) -> None: ...
    def noted(self, op: P2POperation, notes: str) -> None: ...
    def finished(self, op: P2POperation) -> None: ...


def test_a_quiet_block_is_registered_completed_and_counted_exactly() -> None:
    """Three claims counted per block (started, executing, done), the operation visible while it
    runs and completed after; a second reading of the count gives the same figure."""
    with quiet_integration(unique_bus()) as i:
        before = i.registry.unheard
        for n in range(50):
            with track_operation(f"q-{n}", "dht_store", beats=5, peers=2, integration=i):
                seen = i.registry.get(f"q-{n}")
                assert (seen.phase, seen.peer_count) == (P.EXECUTING, 2)
        assert i.registry.unheard - before == 150
        assert i.registry.unheard - before == 150
        done = i.registry.get("q-49")
        assert (done.phase, done.peer_count) == (P.COMPLETED, 2)
        assert i.registry.active_count == 0


def test_ids_stay_unique_across_the_quiet_and_the_locked_paths() -> None:
    """A quiet block's id is taken for start_p2p_operation, and the other way round."""
    with quiet_integration(unique_bus()) as i:
        with track_operation("same", "dht_store", beats=5, integration=i), pytest.raises(DuplicateOperation):
            i.start_p2p_operation("same", "dht_store", 3)
        i.start_p2p_operation("other", "dht_store", 3)
        with pytest.raises(DuplicateOperation), track_operation("other", "dht_store", beats=5, integration=i):
            pass  # pragma: no cover - never entered
        i.complete_p2p_operation("other", 1)


def test_a_listener_arriving_inside_a_quiet_block_hears_its_final_claim() -> None:
    """Entered unheard; someone subscribes before it leaves: the done claim is published."""
    bus = unique_bus()
    with quiet_integration(bus) as i:
        got: list[bytes] = []
        with track_operation("late-ear", "dht_store", beats=5, integration=i):
            unsub = LocalBus.named(bus).subscribe("backbeat.status.>", lambda s, d: got.append(d))
        unsub()
        states = [(c.task_id, c.state) for c in map(parse_status_claim, got)]
        assert states == [("late-ear", "done")]


def test_stop_while_a_quiet_block_runs_fails_it_and_the_block_leaves_cleanly() -> None:
    """stop() fails the operation a quiet block registered; the block's exit finds it gone."""
    i = quiet_integration(unique_bus())
    i.start()
    entered, stopped = threading.Event(), threading.Event()
    errors: list[BaseException] = []

    def work() -> None:
        try:
            with track_operation("running", "dht_store", beats=50, integration=i):
                entered.set()
                stopped.wait(10)
        except BaseException as exc:  # pragma: no cover - the failure being tested for
            errors.append(exc)

    th = threading.Thread(target=work)
    th.start()
    assert entered.wait(10)
    i.stop()
    stopped.set()
    th.join(10)
    assert not th.is_alive()
    assert errors == []
    assert i.registry.active_count == 0


def test_quiet_blocks_racing_consumers_coming_and_going_lose_nothing_and_keep_order() -> None:
    """Eight threads run plain blocks while a ninth subscribes and unsubscribes on the bus (the
    path opens and closes under them): every block makes exactly its three claims, heard or
    counted; no operation is left active; and what a subscriber heard of an operation is in
    phase order, nothing after its final claim."""
    bus = unique_bus()
    threads_n, blocks = 8, 400
    barrier = threading.Barrier(threads_n + 1)
    stop_churn = threading.Event()
    heard: dict[str, list[str]] = defaultdict(list)
    lock = threading.Lock()

    heard_one, unheard_one = threading.Event(), threading.Event()

    def hear(subject: str, data: bytes) -> None:
        claim = parse_status_claim(data)
        with lock:
            heard[claim.task_id].append(claim.state)
        heard_one.set()

    with quiet_integration(bus) as i:
        local = LocalBus.named(bus)
        base = i.get_health()["claims_emitted"]

        def work(t: int) -> None:
            barrier.wait()
            for n in range(blocks):
                with track_operation(f"t{t}-{n}", "dht_store", beats=50, integration=i):
                    pass
                unheard_one.set()

        def churn() -> None:
            # Each subscription lasts until it has heard a claim, each gap until a block has
            # run since (both bounded: the workers may be done).
            barrier.wait()
            while not stop_churn.is_set():
                heard_one.clear()
                unsubscribe = local.subscribe("backbeat.status.>", hear)
                heard_one.wait(0.05)
                unsubscribe()
                unheard_one.clear()
                unheard_one.wait(0.05)

        workers = [threading.Thread(target=work, args=(t,)) for t in range(threads_n)]
        churner = threading.Thread(target=churn)
        for th in [*workers, churner]:
            th.start()
        for th in workers:
            th.join(60)
        stop_churn.set()
        churner.join(60)
        assert not any(th.is_alive() for th in [*workers, churner])
        assert i.registry.active_count == 0
        emitted = i.get_health()["claims_emitted"] - base
        assert emitted == 3 * threads_n * blocks  # heard or counted, each exactly once
        assert heard, "the churn let no claim be heard: the test proved nothing"
        for task, states in heard.items():
            ranks = [RANK[s] for s in states]
            assert ranks == sorted(ranks), (task, states)
            assert states.count("done") <= 1, (task, states)


HEALTH_IN_HANDLER = """
import signal, sys
from loguru import logger
import backbeat_sync as bb

logger.remove()
cfg = bb.BackbeatConfig(cluster_id="sig", agent_id="a", nats_url="local://health-in-handler")
integ = bb.Integration(cfg, node_id="n1")
integ.start()
reads = []

def read_health(*_):
    reads.append(integ.get_health()["claims_emitted"])
    if len(reads) < 400:
        signal.setitimer(signal.ITIMER_REAL, 0.0005)  # one-shot, re-armed: never re-entered

signal.signal(signal.SIGALRM, read_health)
signal.setitimer(signal.ITIMER_REAL, 0.0005)
n = 0
while len(reads) < 400:  # the handler often lands while this thread holds the registry lock
    n += 1
    integ.start_p2p_operation(f"op-{n}", "election", 5)
    integ.complete_p2p_operation(f"op-{n}", 1)
    with bb.track_operation(f"t-{n}", "dht_store", beats=50, integration=integ):
        pass
integ.stop()
print("read", len(reads), "ops", n, flush=True)
"""


@pytest.mark.skipif(not hasattr(signal, "setitimer"), reason="POSIX interval timers")
def test_health_read_from_a_signal_handler_never_waits_for_the_registry(tmp_path: Path) -> None:
    """A handler that reads health (unheard claims included) while its own thread is inside the
    registry: it must not wait for a lock that thread holds (a deadlock: the subprocess hangs)."""
    script = tmp_path / "child.py"
    script.write_text(HEALTH_IN_HANDLER, encoding="utf-8")
    try:
        done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=30)
    except subprocess.TimeoutExpired:
        pytest.fail("the process hung: a health read in the signal handler waited for the registry lock")
    assert done.returncode == 0, done.stderr
    assert done.stdout.split()[:2] == ["read", "400"], done.stdout
