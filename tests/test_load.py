"""The seed's load test and a thread-safety stress test, on the in-process pulse."""

from __future__ import annotations

import collections
import threading
from collections import defaultdict

from backbeat_sync import BackbeatConfig, Integration, OperationPhase, StatusClaim
from backbeat_sync.protocol import HEALTH_TASK_ID

from .support import ClaimLog, unique_bus, wait_until

PHASE_ORDER = {p.value: p.rank for p in OperationPhase}


def by_task(claims: list[StatusClaim]) -> dict[str, list[StatusClaim]]:
    out: dict[str, list[StatusClaim]] = defaultdict(list)
    for c in claims:
        out[c.task_id].append(c)
    return out


def assert_in_order(task: str, claims: list[StatusClaim]) -> None:
    """One operation's claims: start first, phases never go back, beats never go back, one final, last."""
    assert claims[0].phase == "started", task
    finals = [c for c in claims if c.state in ("done", "failed")]
    assert len(finals) == 1, (task, [(c.state, c.phase) for c in claims])
    assert claims[-1] is finals[0], task
    ranks = [PHASE_ORDER[c.phase or "started"] for c in claims]
    assert ranks == sorted(ranks), (task, [c.phase for c in claims])
    beats = [c.beat_index for c in claims]
    assert beats == sorted(beats), (task, beats)


def is_final_of_an_operation(claim: StatusClaim) -> bool:
    """A done or failed claim that is not a health claim."""
    return claim.state in ("done", "failed") and claim.task_id != HEALTH_TASK_ID


def test_seed_load_test_1000_operations() -> None:
    """1,000 operations started, carried over several beats, completed: all claims in order, none left."""
    bus = unique_bus()
    cfg = BackbeatConfig(cluster_id="load", agent_id="a", nats_url=f"local://{bus}", tempo_bpm=3000)
    log = ClaimLog()
    with Integration(cfg, node_id="n") as integration:
        integration.on_claim(log)
        wait_until(lambda: integration.clock.has_beat, what="first beat")
        for n in range(1000):
            integration.start_p2p_operation(f"test-op-{n}", "dht_store", 5)
        # Carried over beats: the start claim and at least two beats' claims for every operation
        # (the last one started has the fewest). A beat thread that falls behind on a busy
        # machine claims once for several beats, so this waits on claims, not on beat numbers.
        log.wait_for(lambda cs: sum(c.task_id == "test-op-999" and c.state == "executing" for c in cs) >= 3)
        assert integration.get_health()["active_operations"] == 1000
        for n in range(1000):
            integration.complete_p2p_operation(f"test-op-{n}", 5)
        assert integration.get_health()["active_operations"] == 0
        log.wait_for(lambda cs: sum(is_final_of_an_operation(c) for c in cs) == 1000, timeout=60)
    tasks = by_task(log.snapshot())
    for n in range(1000):
        claims = tasks[f"test-op-{n}"]
        assert_in_order(f"test-op-{n}", claims)
        assert sum(c.state == "executing" for c in claims) >= 3
        assert claims[-1].state == "done"
    assert integration.registry.active_count == 0


def test_32_threads_500_operations_each() -> None:
    """32 threads start, move and complete 500 operations each at once: no error, lost or reordered claim."""
    bus = unique_bus()
    cfg = BackbeatConfig(cluster_id="stress", agent_id="a", nats_url=f"local://{bus}", tempo_bpm=6000)
    log = ClaimLog()
    threads_n, ops_n = 32, 500
    barrier = threading.Barrier(threads_n)
    errors: list[BaseException] = []

    with Integration(cfg, node_id="n") as integration:
        integration.on_claim(log)
        wait_until(lambda: integration.clock.has_beat, what="first beat")

        def worker(t: int) -> None:
            try:
                barrier.wait()
                for n in range(ops_n):
                    op = f"t{t}-op{n}"
                    integration.start_p2p_operation(op, "election", 3)
                    integration.update_p2p_operation_phase(op, OperationPhase.CONNECTING, 1)
                    integration.update_p2p_operation_phase(op, OperationPhase.NEGOTIATING, 2)
                    integration.update_p2p_operation_phase(op, OperationPhase.EXECUTING, 3)
                    if n % 10 == 0:
                        integration.fail_p2p_operation(op, "chaos")
                    else:
                        integration.complete_p2p_operation(op, 3)
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=worker, args=(t,)) for t in range(threads_n)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        assert errors == []
        assert integration.get_health()["active_operations"] == 0
        total = threads_n * ops_n
        try:  # (health claims are "failed" too while errors are recent, e.g. a callback ran long)
            log.wait_for(lambda cs: sum(is_final_of_an_operation(c) for c in cs) >= total, timeout=60)
        except AssertionError:
            pass  # the assertion below says which finals are missing or doubled
        health = integration.get_health()
    finals = collections.Counter(c.task_id for c in log.snapshot() if is_final_of_an_operation(c))
    expected = {f"t{t}-op{n}" for t in range(threads_n) for n in range(ops_n)}
    counts = {k: health[k] for k in ("claims_emitted", "callbacks_dropped", "callback_errors")}
    assert (sorted(expected - set(finals))[:5], {k: n for k, n in finals.items() if n != 1}) == ([], {}), (
        len(finals),
        counts,
    )
    tasks = by_task(log.snapshot())
    for t in range(threads_n):
        for n in range(ops_n):
            op = f"t{t}-op{n}"
            claims = tasks[op]
            assert_in_order(op, claims)
            distinct = [
                p for k, p in enumerate(c.phase for c in claims) if k == 0 or claims[k - 1].phase != p
            ]
            final = "failed" if n % 10 == 0 else "completed"
            assert distinct == ["started", "connecting", "negotiating", "executing", final], (op, distinct)
    assert integration.registry.active_count == 0
