"""Tests for backbeat_sync.operations: phase rules and the registry."""

from __future__ import annotations

import threading

import pytest

from backbeat_sync import (
    DuplicateOperation,
    InvalidPhaseTransition,
    OperationNotFound,
    OperationPhase,
    OperationType,
    P2POperation,
)
from backbeat_sync.operations import OperationRegistry

P = OperationPhase


def op(op_id: str = "x", announced: bool = True) -> P2POperation:
    return P2POperation(id=op_id, type="election", start_beat=0, estimated_beats=3, announced=announced)


@pytest.fixture
def emitted() -> list[tuple[str, str]]:
    return []


@pytest.fixture
def registry(emitted: list[tuple[str, str]]) -> OperationRegistry:
    return OperationRegistry(lambda o: emitted.append((o.id, o.phase.value)))


def test_phase_order_and_names() -> None:
    """Six phases in the seed's order; completed and failed are final."""
    assert [p.value for p in P] == [
        "started",
        "connecting",
        "negotiating",
        "executing",
        "completed",
        "failed",
    ]
    assert [p.rank for p in P] == list(range(6))
    assert [p.is_final for p in P] == [False] * 4 + [True] * 2
    assert P.coerce("NEGOTIATING") is P.NEGOTIATING
    with pytest.raises(ValueError, match="started, connecting"):
        P.coerce("sleeping")


def test_operation_types_are_strings() -> None:
    """The four seed types are str constants; user types are plain strings."""
    assert [str(t) for t in OperationType] == ["election", "dht_store", "pubsub_sync", "peer_discovery"]
    assert OperationType.DHT_STORE == "dht_store"


@pytest.mark.parametrize(
    "path",
    [
        [P.CONNECTING, P.NEGOTIATING, P.EXECUTING, P.COMPLETED],
        [P.EXECUTING, P.COMPLETED],  # phases may be skipped
        [P.CONNECTING, P.FAILED],
        [P.FAILED],
        [P.NEGOTIATING, P.NEGOTIATING, P.EXECUTING],  # same phase again: peers only
    ],
)
def test_forward_moves_are_allowed(registry: OperationRegistry, path: list[OperationPhase]) -> None:
    """Any forward path is accepted and each step is claimed."""
    registry.add(op())
    for phase in path:
        registry.set_phase("x", phase, 2)
    assert registry.get("x").phase is path[-1]


@pytest.mark.parametrize(
    ("first", "then"),
    [(P.NEGOTIATING, P.CONNECTING), (P.EXECUTING, P.STARTED), (P.CONNECTING, P.STARTED)],
)
def test_backward_moves_raise(
    registry: OperationRegistry, first: OperationPhase, then: OperationPhase
) -> None:
    """A backward move raises InvalidPhaseTransition naming both phases."""
    registry.add(op())
    registry.set_phase("x", first, 1)
    with pytest.raises(InvalidPhaseTransition) as info:
        registry.set_phase("x", then, 1)
    assert (info.value.current, info.value.requested) == (first.value, then.value)


def test_no_move_after_final(registry: OperationRegistry) -> None:
    """A finished operation cannot move again: it is no longer active."""
    registry.add(op())
    registry.set_phase("x", P.COMPLETED, 1)
    with pytest.raises(OperationNotFound):
        registry.set_phase("x", P.FAILED, 1)


def test_claims_follow_changes(registry: OperationRegistry, emitted: list[tuple[str, str]]) -> None:
    """Start, each change and the end are emitted, in order."""
    registry.add(op())
    registry.set_phase("x", P.EXECUTING, 1)
    registry.finish("x", P.COMPLETED, peer_count=1)
    assert emitted == [("x", "started"), ("x", "executing"), ("x", "completed")]


def test_duplicate_active_id_refused_but_reuse_after_finish(registry: OperationRegistry) -> None:
    """An active id cannot be registered twice; once finished it may be reused."""
    registry.add(op())
    with pytest.raises(DuplicateOperation):
        registry.add(op())
    registry.finish("x", P.FAILED, reason="r")
    registry.add(op())
    assert registry.active_count == 1
    assert registry.finished_count == 0


def test_quiet_operations(registry: OperationRegistry, emitted: list[tuple[str, str]]) -> None:
    """An unannounced operation costs no claim unless a beat announced it."""
    registry.add(op("q", announced=False))
    registry.finish("q", P.COMPLETED, quiet=True)
    assert emitted == []
    registry.add(op("r", announced=False))
    assert registry.emit_active() == 1  # a beat: now announced
    registry.finish("r", P.COMPLETED, quiet=True)
    assert emitted == [("r", "started"), ("r", "completed")]
    registry.add(op("f", announced=False))
    registry.finish("f", P.FAILED, reason="boom")  # failures always claimed
    assert emitted[-1] == ("f", "failed")


def test_emit_active_skips_finished_and_chunks(
    registry: OperationRegistry, emitted: list[tuple[str, str]]
) -> None:
    """The per-beat sweep claims every active operation, chunk by chunk."""
    for n in range(10):
        registry.add(op(f"o{n}"))
    registry.finish("o3", P.COMPLETED)
    emitted.clear()
    assert registry.emit_active(chunk=3) == 9
    assert len(emitted) == 9
    assert registry.cleanup_finished() == 1
    assert sorted(registry.fail_all("stop")) == sorted(f"o{n}" for n in range(10) if n != 3)
    assert registry.active_count == 0


def test_emit_active_hands_whole_chunks_to_emit_chunk(
    registry: OperationRegistry, emitted: list[tuple[str, str]]
) -> None:
    """With ``emit_chunk`` the sweep passes each chunk's operations at once, in order, under the lock."""
    for n in range(7):
        registry.add(op(f"o{n}"))
    registry.finish("o1", P.COMPLETED)
    emitted.clear()
    chunks: list[tuple[list[str], bool]] = []

    def emit_chunk(ops: list[P2POperation]) -> None:
        chunks.append(([o.id for o in ops], registry.lock.locked()))

    assert registry.emit_active(chunk=3, emit_chunk=emit_chunk) == 6
    assert chunks == [(["o0", "o2", "o3"], True), (["o4", "o5", "o6"], True)]
    assert emitted == []  # the per-operation emit is not called as well


def test_rebase_moves_operations_of_earlier_epochs(registry: OperationRegistry) -> None:
    """A lock-on or pulse reset shifts start beats of older epochs, also for operations added late."""
    registry.add(P2POperation(id="a", type="t", start_beat=0, estimated_beats=3, epoch=0))
    registry.rebase(1, 5000)
    assert registry.get("a").start_beat == 5000
    registry.add(P2POperation(id="late", type="t", start_beat=0, estimated_beats=3, epoch=0))
    assert registry.get("late").start_beat == 5000
    registry.add(P2POperation(id="b", type="t", start_beat=5002, estimated_beats=3, epoch=1))
    registry.rebase(2, -4990)  # the pulse restarted from a lower index
    assert [registry.get(x).start_beat for x in ("a", "late", "b")] == [10, 10, 12]


def test_start_claims_the_start_then_the_next_phase_under_one_lock(
    registry: OperationRegistry, emitted: list[tuple[str, str]]
) -> None:
    """start(op, EXECUTING) registers the operation and emits STARTED, then EXECUTING, in order."""
    registry.start(op("s"), P.EXECUTING)
    registry.start(op("m"))
    assert emitted == [("s", "started"), ("s", "executing"), ("m", "started")]
    assert registry.get("s").phase is P.EXECUTING
    assert registry.active_count == 2


def test_start_refuses_a_duplicate_and_a_final_or_backward_phase(
    registry: OperationRegistry, emitted: list[tuple[str, str]]
) -> None:
    """A duplicate id, a final phase or a phase behind the operation's are refused; nothing is claimed."""
    registry.start(op("d"))
    with pytest.raises(DuplicateOperation):
        registry.start(op("d"), P.EXECUTING)
    with pytest.raises(InvalidPhaseTransition):
        registry.start(op("f"), P.COMPLETED)
    later = op("b")
    later.phase = P.NEGOTIATING
    with pytest.raises(InvalidPhaseTransition):
        registry.start(later, P.CONNECTING)
    assert emitted == [("d", "started")]
    assert registry.active_count == 1


def test_a_quiet_registry_counts_claims_instead_of_emitting_them(
    registry: OperationRegistry, emitted: list[tuple[str, str]]
) -> None:
    """set_quiet(True): every change, and each per-beat claim, is counted in unheard, not emitted."""
    registry.set_quiet(True)
    registry.start(op("q"), P.EXECUTING)
    registry.add(op("r"))
    registry.set_phase("r", P.CONNECTING)
    assert registry.emit_active() == 2
    registry.finish("q", P.COMPLETED)
    assert emitted == []
    assert registry.unheard == 7
    registry.set_quiet(False)
    registry.finish("r", P.FAILED, reason="x")
    assert emitted == [("r", "failed")]
    assert registry.unheard == 7


def test_start_and_finish_hold_the_registry_lock() -> None:
    """start() and finish() (which take the lock through a cheaper context manager) wait for a
    holder of ``registry.lock``, hold it while they work and always release it."""
    seen: list[bool] = []
    registry = OperationRegistry(lambda o: seen.append(registry.lock.locked()))
    done = threading.Event()

    def work() -> None:
        registry.start(op("h"), P.EXECUTING)
        registry.finish("h", P.COMPLETED)
        done.set()

    with registry.lock:
        worker = threading.Thread(target=work)
        worker.start()
        assert not done.wait(0.2)  # blocked on the lock held here
        assert registry.active_count == 0
    assert done.wait(30)
    worker.join()
    assert seen == [True, True, True]  # started, executing, completed: each claimed under the lock
    assert not registry.lock.locked()
    with pytest.raises(OperationNotFound):  # raised inside the block: the lock is released
        registry.finish("h", P.COMPLETED)
    with pytest.raises(DuplicateOperation):
        registry.start(op("d"))
        registry.start(op("d"))
    assert not registry.lock.locked()
