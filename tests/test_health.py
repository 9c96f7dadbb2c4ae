"""Tests for backbeat_sync.integration.health: one schema, one lock, wait_for_beat."""

from __future__ import annotations

import threading
import typing

import pytest

import backbeat_sync as bb
from backbeat_sync.integration import HEALTH_FIELDS, Health
from backbeat_sync.integration.health import HealthCounters
from backbeat_sync.metrics import COUNTERS, GAUGES

from .support import ManualPulse, manual_integration, unique_bus


def test_the_typeddict_is_the_schema() -> None:
    """Health names exactly the schema's keys, required unless lazy, with the schema's types."""
    hints = typing.get_type_hints(Health)
    assert set(hints) == {f.key for f in HEALTH_FIELDS}
    assert set(Health.__required_keys__) == {f.key for f in HEALTH_FIELDS if not f.lazy}
    assert {k: hints[k] for k in hints} == {f.key: f.type for f in HEALTH_FIELDS}


def test_get_health_returns_every_schema_key_and_only_those() -> None:
    """get_health() has each non-lazy key; a lazy (budget) key appears once counted; the docstring
    lists every key."""
    with manual_integration() as (integration, _pulse, _log):
        health = integration.get_health()
        assert set(health) == {f.key for f in HEALTH_FIELDS if not f.lazy}
        integration.count("budget_warnings")
        assert integration.get_health()["budget_warnings"] == 1
    doc = bb.Integration.get_health.__doc__ or ""
    assert [f.key for f in HEALTH_FIELDS if f"``{f.key}``" not in doc] == []


def test_metrics_series_come_from_the_schema() -> None:
    """metrics.COUNTERS and GAUGES are the schema's counters and gauges, help text included."""
    counters = {f.key: (f.metric, f.help) for f in HEALTH_FIELDS if f.kind == "counter"}
    assert all(counters[k] == v for k, v in COUNTERS.items())
    assert set(counters) - set(COUNTERS) == {
        "budget_exhausted_interrupt_interrupted",
        "budget_exhausted_interrupt_late",
        "budget_exhausted_raise_after",
        "budget_exhausted_warn",
    }  # exported as backbeat_budget_exhaustions_total{mode, outcome}
    assert {f.key: (f.metric, f.help) for f in HEALTH_FIELDS if f.kind == "gauge"} == GAUGES
    assert "unsigned" not in COUNTERS["rejected_frames"][1]  # unsigned frames have their own counter
    assert {"unsigned_frames", "forged_frames"} <= set(COUNTERS)


def test_counters_lose_no_count_across_threads() -> None:
    """Eight threads counting the same key at once (one lock): no increment is lost."""
    counters = HealthCounters()
    barrier = threading.Barrier(8)
    n = 20_000

    def work() -> None:
        barrier.wait()
        for _ in range(n):
            counters.add("claims_emitted")

    threads = [threading.Thread(target=work) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert counters.counts()["claims_emitted"] == 8 * n


def test_wait_for_beat_returns_once_a_frame_is_accepted() -> None:
    """wait_for_beat() is False before any frame (with a timeout), True once one is accepted,
    and at once after that; start(wait_for_beat=...) waits the same way."""
    with manual_integration() as (integration, pulse, _log):
        assert integration.wait_for_beat(0.01) is False
        pulse.beat(5)
        assert integration.wait_for_beat(30) is True
        assert integration.wait_for_beat(0) is True
    stopped = integration
    assert stopped.wait_for_beat() is True  # one was accepted: still true

    bus = unique_bus()
    cfg = bb.BackbeatConfig(cluster_id="test", nats_url=f"local://{bus}?pulse=manual", tempo_bpm=600)
    fresh = bb.Integration(cfg, node_id="n")
    assert fresh.wait_for_beat(0) is False  # not running: nothing would come
    fresh.start(wait_for_beat=0.01)  # no pulse: returns after the timeout, not an error
    try:
        assert fresh.wait_for_beat(0) is False
        ManualPulse(bus, "test").beat(1)
        assert fresh.wait_for_beat(30) is True
    finally:
        fresh.stop()

    with bb.Integration(cfg.evolve(nats_url=f"local://{unique_bus()}", tempo_bpm=6000), node_id="n") as i:
        assert i.wait_for_beat(30)  # the in-process pulse beats at once
    live = bb.Integration(cfg.evolve(nats_url=f"local://{unique_bus()}", tempo_bpm=6000), node_id="n")
    live.start(wait_for_beat=True)
    try:
        assert live.get_health()["beats_received"] >= 1
    finally:
        live.stop()


@pytest.mark.parametrize("bad", [-1, "soon", float("nan")])
def test_wait_for_beat_refuses_a_bad_timeout(bad: object) -> None:
    """A negative or non-numeric timeout is an InvalidArgument, on wait_for_beat and start."""
    with manual_integration() as (integration, _pulse, _log), pytest.raises(bb.InvalidArgument):
        integration.wait_for_beat(bad)  # type: ignore[arg-type]
    cfg = bb.BackbeatConfig(nats_url=f"local://{unique_bus()}?pulse=manual")
    with pytest.raises(bb.InvalidArgument):
        bb.Integration(cfg, node_id="n").start(wait_for_beat=bad)  # type: ignore[arg-type]
