"""Hostile input through the integration's frame path: counted, never raised, the beat goes on."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from backbeat_sync import BackbeatConfig, Integration, ManualTime, ProtocolError
from backbeat_sync.protocol import parse_status_claim

from .support import unique_bus

VALID_CLAIM: dict[str, Any] = {
    "type": "backbeat.statusclaim.v1",
    "cluster_id": "c",
    "agent_id": "a",
    "node_id": "n",
    "task_id": "t",
    "beat_index": 1,
    "state": "done",
    "beats_left": 0,
    "progress": 1.0,
    "notes": "x",
    "sent_at": "2026-11-28T01:00:00Z",
}

scalars = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20)


Agent = tuple[Integration, ManualTime]


@pytest.fixture(scope="module")
def agent() -> Iterator[Agent]:
    """One started integration on a manual bus and its manual clock, for the whole module."""
    t = ManualTime()
    cfg = BackbeatConfig(cluster_id="c", agent_id="a", nats_url=f"local://{unique_bus()}?pulse=manual")
    with Integration(cfg, node_id="n", time_source=t) as integration:
        yield integration, t


def _frame(index: int) -> bytes:
    return json.dumps(
        {
            "type": "backbeat.beatframe.v1",
            "cluster_id": "c",
            "beat_index": index,
            "downbeat": False,
            "phase": "upbeat",
            "tempo_bpm": 60,
            "window_id": "w",
        }
    ).encode()


@settings(
    max_examples=2500,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(st.binary(max_size=200) | st.text(max_size=200).map(str.encode))
def test_any_payload_is_a_beat_or_a_counted_rejection(agent: Agent, data: bytes) -> None:
    """frame_received never raises; each payload is a beat or counted (rejected, foreign, stale)."""
    integration, t = agent
    before = integration.get_health()
    integration.frame_received(data, t.monotonic())
    after = integration.get_health()
    moved = sum(
        after[k] - before[k]
        for k in ("rejected_frames", "foreign_frames", "beats_received", "stale_frames", "duplicate_frames")
    )
    assert moved == 1


@pytest.mark.timeout(600)  # CPU-bound: a loaded 2-core machine took 100 s for the slowest of these
@settings(max_examples=2500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(st.sampled_from(sorted(VALID_CLAIM)), scalars, max_size=11))
def test_claim_fields_fuzzed(changes: dict[str, Any]) -> None:
    """A claim with any field set to any scalar parses (and round-trips) or is a ProtocolError."""
    try:
        claim = parse_status_claim(json.dumps({**VALID_CLAIM, **changes}))
    except ProtocolError:
        return
    assert parse_status_claim(claim.encode()) == claim


def test_valid_frames_still_counted_after_the_fuzz(agent: Agent) -> None:
    """After thousands of bad payloads a valid frame is still accepted."""
    integration, t = agent
    index = integration.clock.current_beat + 1
    t.advance(1.0)
    integration.frame_received(_frame(index), t.monotonic())
    assert integration.clock.current_beat == index
