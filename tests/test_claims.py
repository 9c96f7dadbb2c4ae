"""Tests for backbeat_sync.claims: the computed fields and notes lines of PROTOCOL.md."""

from __future__ import annotations

import pytest

from backbeat_sync import ManualTime, OperationPhase, P2POperation, StatusClaim
from backbeat_sync.claims import ClaimFactory, health_notes, resolve


@pytest.mark.parametrize(
    ("start", "estimate", "current", "expected"),
    [
        (10, 4, 10, (4, 0.0)),
        (10, 4, 11, (3, 0.25)),
        (10, 4, 14, (0, 1.0)),
        (10, 4, 20, (0, 1.0)),
        (10, 5, 12, (3, 0.4)),
        (10, 1, 9, (1, 0.0)),  # clock behind the start (never negative)
    ],
)
def test_progress_fields(start: int, estimate: int, current: int, expected: tuple[int, float]) -> None:
    """beats_left = max(0, e - p); progress = min(1.0, p / e); p = c - s."""
    op = P2POperation(
        id="op", type="t", start_beat=start, estimated_beats=estimate, phase=OperationPhase.EXECUTING
    )
    claim = ClaimFactory("c", "a", "n", ManualTime()).for_operation(op, current)
    assert (claim.beats_left, claim.progress) == expected


def test_notes_formats() -> None:
    """The seed's own notes lines."""
    f = ClaimFactory("c", "a", "12D3KooWAbc", ManualTime())
    started = P2POperation(id="e", type="election", start_beat=0, estimated_beats=5)
    assert f.for_operation(started, 0).notes == "P2P election: started (peers: 0, node: 12D3KooWAbc)"
    failed = P2POperation(
        id="e",
        type="election",
        start_beat=0,
        estimated_beats=5,
        phase=OperationPhase.FAILED,
        reason="quorum not reached within timeout",
    )
    assert f.for_operation(failed, 0).notes == (
        "P2P operation failed: quorum not reached within timeout (type: election)"
    )
    assert (
        health_notes(True, 2, 2.0, "n")
        == "CHORUS P2P healthy: connected=true, operations=2, tempo=2 BPM, node=n"
    )
    assert health_notes(False, 0, 2.5, "n") == (
        "CHORUS P2P healthy: connected=false, operations=0, tempo=2.5 BPM, node=n"
    )


def make(phase: OperationPhase, reason: str | None = None) -> P2POperation:
    return P2POperation(
        id="op", type="dht_store", start_beat=100, estimated_beats=4, phase=phase, peer_count=3, reason=reason
    )


def test_claim_for_each_phase() -> None:
    """Active, completed and failed operations claim the fields PROTOCOL.md gives them."""
    t = ManualTime(wall=1_790_000_000.25)
    f = ClaimFactory("c", "a", "n", t)
    active = f.for_operation(make(OperationPhase.NEGOTIATING), 101)
    assert (active.state, active.beats_left, active.progress, active.phase) == (
        "executing",
        3,
        0.25,
        "negotiating",
    )
    assert active.notes == "P2P dht_store: negotiating (peers: 3, node: n)"
    assert active.sent_at == "2026-09-21T14:13:20.250Z"
    done = f.for_operation(make(OperationPhase.COMPLETED), 101)
    assert (done.state, done.beats_left, done.progress) == ("done", 0, 1.0)
    assert done.notes == "P2P dht_store: completed (peers: 3, node: n)"
    failed = f.for_operation(make(OperationPhase.FAILED, "boom"), 101)
    assert (failed.state, failed.beats_left, failed.progress) == ("failed", 0, 0.0)
    assert failed.notes == "P2P operation failed: boom (type: dht_store)"


def test_claim_fields_match_a_claim_built_by_name() -> None:
    """The hot path builds claims positionally: every field lands where the keyword-built claim has it."""
    f = ClaimFactory("c", "a", "n", ManualTime(wall=1_790_000_000.25))
    built = f.for_operation(make(OperationPhase.EXECUTING), 102)
    expected = StatusClaim(
        cluster_id="c",
        agent_id="a",
        node_id="n",
        task_id="op",
        beat_index=102,
        state="executing",
        beats_left=2,
        progress=0.5,
        notes="P2P dht_store: executing (peers: 3, node: n)",
        sent_at="2026-09-21T14:13:20.250Z",
        operation_type="dht_store",
        phase="executing",
        peer_count=3,
        correlation_id="op",  # a root correlates its own workflow
    )
    assert built == expected
    assert built.to_dict() == expected.to_dict()


def test_health_claim_states() -> None:
    """Health: waiting with no operations, executing with some, failed with recent errors."""
    f = ClaimFactory("c", "a", "n", ManualTime())
    kw = {"current_beat": 8, "connected": True, "tempo_bpm": 2.0}
    assert f.for_health(operations=0, recent_errors=False, **kw).state == "waiting"  # type: ignore[arg-type]
    assert f.for_health(operations=2, recent_errors=False, **kw).state == "executing"  # type: ignore[arg-type]
    health = f.for_health(operations=2, recent_errors=True, **kw)  # type: ignore[arg-type]
    assert (health.state, health.task_id, health.beats_left, health.progress) == (
        "failed",
        "chorus-p2p-health",
        0,
        1.0,
    )


def test_a_lazy_claim_is_the_claim_of_its_snapshot() -> None:
    """lazy(op, beat) builds what for_operation(op, beat) built then, whatever the operation does after."""
    clock = ManualTime()
    f = ClaimFactory("c", "a", "n", clock)
    op = P2POperation(id="l", type="dht_store", start_beat=3, estimated_beats=4, peer_count=2)
    expected = f.for_operation(op, 5)
    lazy = f.lazy(op, 5)
    assert (lazy.task_id, lazy.is_final) == ("l", False)
    op.phase, op.peer_count, op.reason = OperationPhase.FAILED, 9, "later"
    final = f.lazy(op, 6)
    clock.advance(2.0)
    built = lazy.build()
    assert lazy.build() is built  # built once
    assert built.to_dict() | {"sent_at": None} == expected.to_dict() | {"sent_at": None}
    assert final.is_final
    assert final.build().notes == "P2P operation failed: later (type: dht_store)"
    assert resolve(expected) is expected
    assert resolve(lazy) is built


@pytest.mark.parametrize("phase", list(OperationPhase))
@pytest.mark.parametrize("beat", [3, 10, 40])
def test_a_sweep_claim_encodes_to_the_claims_bytes(phase: OperationPhase, beat: int) -> None:
    """LazyClaim.wire() (a beat sweep's claim, no StatusClaim made) is StatusClaim.encode() of the
    same claim, byte for byte, in every phase."""
    factory = ClaimFactory("c", "a", "n", ManualTime())
    op = P2POperation(
        id="op",
        type="dht_store",
        start_beat=5,
        estimated_beats=4,
        phase=phase,
        peer_count=3,
        reason="quorum lost" if phase is OperationPhase.FAILED else None,
    )
    direct = factory.lazy(op, beat, True)
    assert direct.wire() == factory.for_operation(op, beat).encode()
    direct.build()
    assert direct.wire() == factory.for_operation(op, beat).encode()  # built: the same bytes
