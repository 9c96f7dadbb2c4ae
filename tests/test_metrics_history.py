"""Prometheus figures of the budget history: beats used per run, and the suggested budgets."""

from __future__ import annotations

import pytest

pytest.importorskip("prometheus_client")

from prometheus_client import CollectorRegistry

import backbeat_sync as bb
from backbeat_sync._time import ManualTime
from backbeat_sync.metrics import instrument
from tests.support import unique_bus


def test_beats_used_histogram_and_suggested_gauge() -> None:
    """Runs are observed by type and outcome, in beats; each type's suggestion is a gauge."""
    registry = CollectorRegistry()
    t = ManualTime()
    cfg = bb.BackbeatConfig(
        cluster_id="m", agent_id="a", nats_url=f"local://{unique_bus()}?pulse=manual", tempo_bpm=60
    )
    with bb.Integration(cfg, node_id="n", time_source=t) as integration:
        remove = instrument(integration, registry=registry)

        @bb.beat_budget(4, operation_type="dht_store", warn_at=None)
        def store() -> None:
            t.advance(1.5)

        for _ in range(20):
            store()
        with pytest.raises(ValueError), bb.track_operation("x-1", "mine", beats=2):
            t.advance(0.5)
            raise ValueError("no")
        integration.history.flush()
        labels = {"cluster_id": "m", "agent_id": "a", "operation_type": "dht_store", "outcome": "done"}
        get = registry.get_sample_value
        assert get("backbeat_operation_beats_used_count", labels) == 20
        assert get("backbeat_operation_beats_used_sum", labels) == pytest.approx(30.0)
        assert get("backbeat_operation_beats_used_bucket", {**labels, "le": "1.5"}) == 20
        assert get("backbeat_operation_beats_used_bucket", {**labels, "le": "1.0"}) == 0
        failed = {**labels, "operation_type": "mine", "outcome": "failed"}
        assert get("backbeat_operation_beats_used_count", failed) == 1
        suggested = {"cluster_id": "m", "agent_id": "a", "operation_type": "dht_store"}
        assert get("backbeat_budget_suggested_beats", suggested) == 2.0  # 1.5 * 1.25 -> 2 (the min)
        # "mine" has no profile and one run: no suggestion, no series
        assert get("backbeat_budget_suggested_beats", {**suggested, "operation_type": "mine"}) is None
        assert get("backbeat_budgets_below_history", {"cluster_id": "m", "agent_id": "a"}) == 0
        remove()
        assert get("backbeat_operation_beats_used_count", labels) is None
