"""Tests for backbeat_sync.metrics: the scrape-time collector, the histogram, the HTTP endpoint."""

from __future__ import annotations

import json
import sys
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest
from prometheus_client import REGISTRY, CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from backbeat_sync import BackbeatConfig, Integration, InvalidArgument, ManualTime
from backbeat_sync.metrics import COUNTERS, DRIFT_STATES, GAUGES, MetricsServer, instrument, serve_metrics

from .support import HandledBeats, ManualPulse, manual_integration, unique_bus, wait_until

LABELS = {"cluster_id": "test", "agent_id": "agent-1"}


@pytest.fixture
def registry() -> CollectorRegistry:
    """A fresh registry per test."""
    return CollectorRegistry()


@pytest.fixture
def manual_time_integration() -> Iterator[tuple[Integration, ManualPulse, ManualTime]]:
    """A started integration whose clock only moves when the test advances it."""
    bus = unique_bus()
    cfg = BackbeatConfig(
        cluster_id="test", agent_id="agent-1", nats_url=f"local://{bus}?pulse=manual", tempo_bpm=60
    )
    clock = ManualTime()
    integration = Integration(cfg, node_id="node-1", time_source=clock)
    pulse = ManualPulse(bus, "test", tempo_bpm=60, handled=HandledBeats(integration))
    with integration:
        yield integration, pulse, clock


def scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """GET a metrics endpoint and return {(sample name, sorted labels): value}."""
    with urllib.request.urlopen(url, timeout=5) as response:
        text = response.read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_counters_and_gauges_read_health_at_scrape_time(registry: CollectorRegistry) -> None:
    """Every counter and gauge equals the health value it is named after, at the moment of the scrape."""
    with manual_integration() as (integration, pulse, _log):
        instrument(integration, registry=registry)
        for index in range(8, 11):
            pulse.beat(index)
        integration.start_p2p_operation("dht-store-k", "dht_store", 3)
        health = integration.get_health()
        for key, (name, _doc) in COUNTERS.items():
            assert float(health.get(key, 0)) == registry.get_sample_value(name + "_total", LABELS), key
        for key, (name, _doc) in GAUGES.items():
            assert float(health[key]) == registry.get_sample_value(name, LABELS), key
        assert registry.get_sample_value("backbeat_beats_received_total", LABELS) == 3.0
        assert registry.get_sample_value("backbeat_active_operations", LABELS) == 1.0
        assert registry.get_sample_value("backbeat_current_beat", LABELS) == 10.0
        assert registry.get_sample_value("backbeat_agent_info", {**LABELS, "node_id": "node-1"}) == 1.0
        integration.complete_p2p_operation("dht-store-k", 3)
        assert registry.get_sample_value("backbeat_active_operations", LABELS) == 0.0


def test_missed_beats_are_counted(registry: CollectorRegistry) -> None:
    """A jump in the beat index shows up in backbeat_missed_beats_total."""
    with manual_integration() as (integration, pulse, _log):
        instrument(integration, registry=registry)
        pulse.beat(4)
        pulse.beat(8)
        assert registry.get_sample_value("backbeat_missed_beats_total", LABELS) == 3.0


def test_tempo_drift_is_one_hot_with_a_ratio(
    registry: CollectorRegistry, manual_time_integration: tuple[Integration, ManualPulse, ManualTime]
) -> None:
    """Beats 1.5 s apart at an announced 60 BPM measure 40 BPM: drift 'critical', ratio 1/3."""
    integration, pulse, clock = manual_time_integration
    instrument(integration, registry=registry)
    assert registry.get_sample_value("backbeat_tempo_drift", {**LABELS, "drift": "unknown"}) == 1.0
    assert None is registry.get_sample_value("backbeat_tempo_drift_ratio", LABELS)
    for index in range(4):
        pulse.beat(index)
        clock.advance(1.5)
    drift = {
        s: registry.get_sample_value("backbeat_tempo_drift", {**LABELS, "drift": s}) for s in DRIFT_STATES
    }
    assert drift == {"unknown": 0.0, "acceptable": 0.0, "warning": 0.0, "critical": 1.0}
    assert registry.get_sample_value("backbeat_measured_tempo_bpm", LABELS) == 40.0
    assert pytest.approx(1 / 3) == registry.get_sample_value("backbeat_tempo_drift_ratio", LABELS)
    assert registry.get_sample_value("backbeat_beat_duration_seconds", LABELS) == 1.0


def test_histogram_counts_every_handled_beat(registry: CollectorRegistry) -> None:
    """backbeat_beat_handling_seconds gets one observation per handled beat, in seconds."""
    with manual_integration() as (integration, pulse, _log):
        instrument(integration, registry=registry)
        for index in range(5):
            pulse.beat(index)
        count = registry.get_sample_value("backbeat_beat_handling_seconds_count", LABELS)
        total = registry.get_sample_value("backbeat_beat_handling_seconds_sum", LABELS)
    assert count == 5.0
    assert total is not None
    assert 0.0 <= total < 5.0


def test_budget_warnings_and_exhaustions_by_mode_and_outcome(registry: CollectorRegistry) -> None:
    """The budget engine's health counts become warnings and exhaustions{mode, outcome} counters."""
    with manual_integration() as (integration, _pulse, _log):
        instrument(integration, registry=registry)

        def exhaustions(mode: str, outcome: str) -> float | None:
            return registry.get_sample_value(
                "backbeat_budget_exhaustions_total", {**LABELS, "mode": mode, "outcome": outcome}
            )

        assert exhaustions("interrupt", "late") == 0.0
        assert registry.get_sample_value("backbeat_budget_warnings_total", LABELS) == 0.0
        integration.count("budget_warnings", 3)
        integration.count("budget_exhausted_interrupt_interrupted", 2)
        integration.count("budget_exhausted_interrupt_late")
        integration.count("budget_exhausted_raise_after")
        integration.count("budget_exhausted_warn", 4)
        integration.count("budget_something_new")
        assert registry.get_sample_value("backbeat_budget_warnings_total", LABELS) == 3.0
        assert exhaustions("interrupt", "interrupted") == 2.0
        assert exhaustions("interrupt", "late") == 1.0
        assert exhaustions("raise_after", "ran_on") == 1.0
        assert exhaustions("warn", "ran_on") == 4.0
        assert registry.get_sample_value("backbeat_budget_something_new_total", LABELS) == 1.0
        assert registry.get_sample_value("backbeat_budget_exhausted_warn_total", LABELS) is None


def test_a_real_budget_exhaustion_is_counted(registry: CollectorRegistry) -> None:
    """An interrupted @beat_budget call moves backbeat_budget_exhaustions_total{interrupt, its outcome}."""
    import time

    from backbeat_sync import BeatBudgetExceeded, beat_budget

    cfg = BackbeatConfig(
        cluster_id="test", agent_id="budget", nats_url=f"local://{unique_bus()}", tempo_bpm=3000
    )
    labels = {"cluster_id": "test", "agent_id": "budget", "mode": "interrupt", "outcome": "interrupted"}

    @beat_budget(1)
    def spin() -> None:
        while True:
            time.sleep(0.001)

    with Integration(cfg, node_id="n") as integration:
        instrument(integration, registry=registry)
        with pytest.raises(BeatBudgetExceeded) as info:
            spin()
        # landed within 50 ms or not ("late") is up to how busy the machine is
        labels["outcome"] = "late" if info.value.late else "interrupted"
        wait_until(
            lambda: registry.get_sample_value("backbeat_budget_exhaustions_total", labels) == 1.0,
            what="the exhaustion counted",
        )


def test_two_agents_share_a_registry_and_a_clash_is_refused(registry: CollectorRegistry) -> None:
    """Integrations with different ids are labelled apart; the same ids twice are refused by name."""
    other_cfg = BackbeatConfig(cluster_id="test", agent_id="agent-2", nats_url=f"local://{unique_bus()}")
    other = Integration(other_cfg, node_id="node-2")
    instrument(other, registry=registry)
    with manual_integration() as (first, _p1, _l1), manual_integration() as (second, _p2, _l2):
        remove = instrument(first, registry=registry)
        with pytest.raises(InvalidArgument, match="agent_id='agent-1' already exports metrics"):
            instrument(second, registry=registry)
        assert registry.get_sample_value("backbeat_started", LABELS) == 1.0
        assert registry.get_sample_value("backbeat_started", {**LABELS, "agent_id": "agent-2"}) == 0.0
        remove()
        instrument(second, registry=registry)
        assert registry.get_sample_value("backbeat_started", LABELS) == 1.0


def test_instrument_twice_is_harmless_and_remove_drops_the_series(registry: CollectorRegistry) -> None:
    """Instrumenting the same integration again is a no-op; removing it drops every series."""
    with manual_integration() as (integration, pulse, _log):
        remove = instrument(integration, registry=registry)
        instrument(integration, registry=registry)
        pulse.beat(1)
        assert registry.get_sample_value("backbeat_beat_handling_seconds_count", LABELS) == 1.0
        remove()
        remove()
        pulse.beat(2)
        text = generate_latest(registry).decode()
    assert 'agent_id="agent-1"' not in text


def test_stopped_integration_reads_as_not_started(registry: CollectorRegistry) -> None:
    """After stop(), backbeat_started and backbeat_connected are 0."""
    with manual_integration() as (integration, _pulse, _log):
        instrument(integration, registry=registry)
        assert registry.get_sample_value("backbeat_connected", LABELS) == 1.0
    assert registry.get_sample_value("backbeat_started", LABELS) == 0.0
    assert registry.get_sample_value("backbeat_connected", LABELS) == 0.0


def test_a_stopped_integration_is_replaced_by_a_new_one_with_its_ids(registry: CollectorRegistry) -> None:
    """A restarted agent (new Integration, same ids) can be instrumented again: the stopped one gives way."""
    cfg = BackbeatConfig(cluster_id="test", agent_id="again", nats_url=f"local://{unique_bus()}?pulse=manual")
    labels = {"cluster_id": "test", "agent_id": "again"}
    with Integration(cfg, node_id="old") as old:
        instrument(old, registry=registry)
    with Integration(cfg, node_id="new") as new:
        instrument(new, registry=registry)
        assert registry.get_sample_value("backbeat_started", labels) == 1.0
        assert registry.get_sample_value("backbeat_agent_info", {**labels, "node_id": "new"}) == 1.0
        assert registry.get_sample_value("backbeat_agent_info", {**labels, "node_id": "old"}) is None


def test_default_registry_is_prometheus_global(registry: CollectorRegistry) -> None:
    """Without registry=, the metrics go on prometheus_client.REGISTRY."""
    cfg = BackbeatConfig(cluster_id="test", agent_id="global-reg", nats_url=f"local://{unique_bus()}")
    integration = Integration(cfg, node_id="n")
    remove = instrument(integration)
    try:
        labels = {"cluster_id": "test", "agent_id": "global-reg"}
        assert REGISTRY.get_sample_value("backbeat_active_operations", labels) == 0.0
    finally:
        remove()
    assert None is REGISTRY.get_sample_value("backbeat_active_operations", labels)


def test_serve_metrics_endpoint_moves_during_a_run(registry: CollectorRegistry) -> None:
    """Scraping integration.serve_metrics() twice during a run shows beats and claims going up."""
    cfg = BackbeatConfig(
        cluster_id="test", agent_id="served", nats_url=f"local://{unique_bus()}", tempo_bpm=3000
    )
    labels = (("agent_id", "served"), ("cluster_id", "test"))
    threads_before = set(threading.enumerate())
    with Integration(cfg, node_id="n") as integration:
        server = integration.serve_metrics(0, addr="127.0.0.1", registry=registry)
        with server:
            integration.start_p2p_operation("peer-discovery-1", "peer_discovery", 5)
            wait_until(lambda: integration.get_health()["beats_received"] >= 2, what="2 beats")
            first = scrape(server.url)
            seen = first[("backbeat_beats_received_total", labels)]
            wait_until(lambda: integration.get_health()["beats_received"] >= seen + 3, what="3 more beats")
            second = scrape(server.url)
        with pytest.raises(urllib.error.URLError):
            urllib.request.urlopen(server.url, timeout=2)
    assert (
        second[("backbeat_beats_received_total", labels)]
        >= first[("backbeat_beats_received_total", labels)] + 3
    )
    assert (
        second[("backbeat_claims_emitted_total", labels)] > first[("backbeat_claims_emitted_total", labels)]
    )
    assert (
        second[("backbeat_beat_handling_seconds_count", labels)]
        > first[("backbeat_beat_handling_seconds_count", labels)]
    )
    assert second[("backbeat_active_operations", labels)] == 1.0
    assert set() == set(threading.enumerate()) - threads_before


@pytest.mark.parametrize("port", [-1, 65536, "9464", True, 1.5])
def test_serve_metrics_rejects_a_bad_port(port: object, registry: CollectorRegistry) -> None:
    """A port that is not an integer in 0..65535 is refused, naming the argument."""
    cfg = BackbeatConfig(cluster_id="test", agent_id="port", nats_url=f"local://{unique_bus()}")
    with pytest.raises(InvalidArgument, match="port="):
        serve_metrics(Integration(cfg, node_id="n"), port, registry=registry)  # type: ignore[arg-type]


def test_port_in_use_raises_and_leaves_nothing_exported(registry: CollectorRegistry) -> None:
    """When the port cannot be bound, OSError propagates and the integration is not left exported."""
    cfg = BackbeatConfig(cluster_id="test", agent_id="busy", nats_url=f"local://{unique_bus()}")
    integration = Integration(cfg, node_id="n")
    with serve_metrics(integration, 0, addr="127.0.0.1", registry=registry) as server:
        other = CollectorRegistry()
        with pytest.raises(OSError):
            serve_metrics(integration, server.port, addr="127.0.0.1", registry=other)
        assert None is other.get_sample_value("backbeat_started", {"cluster_id": "test", "agent_id": "busy"})


def test_missing_prometheus_client_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without prometheus-client, the error names the extra to install."""
    registry = CollectorRegistry()
    monkeypatch.setitem(sys.modules, "prometheus_client", None)
    cfg = BackbeatConfig(cluster_id="test", agent_id="noprom", nats_url=f"local://{unique_bus()}")
    with pytest.raises(ImportError, match=r"backbeat_sync\[prometheus\]"):
        instrument(Integration(cfg, node_id="n"), registry=registry)


def test_stop_closes_metrics_servers_it_started() -> None:
    """serve_metrics() servers are closed by stop(): no library thread outlives the integration."""
    import threading

    from prometheus_client import CollectorRegistry

    from backbeat_sync import BackbeatConfig, Integration

    before = set(threading.enumerate())
    cfg = BackbeatConfig(cluster_id="m", agent_id="stopper", nats_url="local://metrics-stop?pulse=manual")
    with Integration(cfg, node_id="n") as integration:
        integration.serve_metrics(0, addr="127.0.0.1", registry=CollectorRegistry())
        assert len(set(threading.enumerate()) - before) >= 3
    assert set(threading.enumerate()) - before == set()


def test_the_metrics_server_thread_is_named_like_the_librarys() -> None:
    """The HTTP server thread serve_metrics() starts is "backbeat-metrics" (docs/architecture.md)."""
    cfg = BackbeatConfig(cluster_id="m", agent_id="named", nats_url="local://metrics-named?pulse=manual")
    with Integration(cfg, node_id="n") as integration:
        server = integration.serve_metrics(0, addr="127.0.0.1", registry=CollectorRegistry())
        assert server._thread.name == "backbeat-metrics"
        assert "backbeat-metrics" in {t.name for t in threading.enumerate()}


def get(url: str) -> tuple[int, str, bytes]:
    """GET ``url`` -> (status, content type, body), for any status."""
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, response.headers["Content-Type"], response.read()
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, exc.headers["Content-Type"], exc.read()


def probe(server: MetricsServer, path: str) -> tuple[int, dict[str, Any]]:
    """GET a probe path of the server -> (status, JSON body)."""
    status, ctype, body = get(f"http://127.0.0.1:{server.port}{path}")
    assert ctype == "application/json"
    return status, json.loads(body)


def test_probes_follow_the_beat(
    manual_time_integration: tuple[Integration, ManualPulse, ManualTime], registry: CollectorRegistry
) -> None:
    """/healthz is 200 while running; /readyz is 503 until a beat, 200 within max_age, 503 after it."""
    integration, pulse, clock = manual_time_integration
    with integration.serve_metrics(0, addr="127.0.0.1", registry=registry, max_age_beats=2) as server:
        assert probe(server, "/healthz") == (200, {"ok": True, "reason": None, "detail": "running"})
        status, body = probe(server, "/readyz")
        assert (status, body["ok"], body["reason"]) == (503, False, "no_beat")
        assert "no beat frame yet on backbeat.beat.test" in body["detail"]
        pulse.beat(7)
        clock.advance(1.5)  # 1.5 beats at 60 BPM
        status, body = probe(server, "/readyz")
        assert (status, body["ok"], body["reason"], body["max_age_beats"]) == (200, True, None, 2)
        clock.advance(1.0)  # 2.5 beats: older than max_age
        status, body = probe(server, "/readyz")
        assert (status, body["reason"]) == (503, "no_beat")
        assert "last beat 2.5 s ago, more than 2 beats (2 s at 60 BPM)" in body["detail"]
        assert probe(server, "/healthz")[0] == 200  # alive, only not ready


def test_metrics_only_on_metrics_and_404_elsewhere(registry: CollectorRegistry) -> None:
    """/metrics serves the Prometheus text; / and any other path are 404 with a JSON body."""
    cfg = BackbeatConfig(cluster_id="test", agent_id="paths", nats_url=f"local://{unique_bus()}?pulse=manual")
    with (
        Integration(cfg, node_id="n") as integration,
        integration.serve_metrics(0, addr="127.0.0.1", registry=registry) as server,
    ):
        status, ctype, body = get(server.url)
        assert status == 200
        assert ctype.startswith("text/plain")
        assert b"backbeat_started" in body
        for path in ("/", "/health", "/metrics/extra", "/favicon.ico"):
            status, body_json = probe(server, path)
            assert status == 404, path
            assert body_json["reason"] == "not_found"
            assert body_json["paths"] == ["/metrics", "/healthz", "/readyz"]


def test_probes_of_an_integration_that_does_not_run(registry: CollectorRegistry) -> None:
    """Not started, or stopped: /healthz and /readyz are 503 not_running."""
    cfg = BackbeatConfig(cluster_id="test", agent_id="idle", nats_url=f"local://{unique_bus()}?pulse=manual")
    integration = Integration(cfg, node_id="n")
    with serve_metrics(integration, 0, addr="127.0.0.1", registry=registry) as server:
        for path in ("/healthz", "/readyz"):
            status, body = probe(server, path)
            assert (status, body["reason"]) == (503, "not_running"), path
            assert body["detail"] == "the integration is new"
        with integration:
            assert probe(server, "/healthz")[0] == 200
        assert probe(server, "/healthz")[1]["reason"] == "not_running"


def test_probes_when_not_connected(registry: CollectorRegistry) -> None:
    """Started but without a connection (server gone, connecting in the background): /readyz unreachable."""
    from .natsserver import free_port

    cfg = BackbeatConfig(
        cluster_id="test",
        agent_id="nolink",
        nats_url=f"nats://127.0.0.1:{free_port()}",
        connect_in_background=True,
    )
    with (
        Integration(cfg, node_id="n") as integration,
        integration.serve_metrics(0, addr="127.0.0.1", registry=registry) as server,
    ):
        assert probe(server, "/healthz")[0] == 200
        status, body = probe(server, "/readyz")
        assert (status, body["reason"]) == (503, "unreachable")


@pytest.mark.parametrize("age", [0, -1, "2", True])
def test_serve_metrics_rejects_a_bad_max_age(age: object, registry: CollectorRegistry) -> None:
    """max_age_beats must be a number > 0."""
    cfg = BackbeatConfig(cluster_id="test", agent_id="age", nats_url=f"local://{unique_bus()}")
    with pytest.raises(InvalidArgument, match="max_age_beats="):
        serve_metrics(Integration(cfg, node_id="n"), 0, registry=registry, max_age_beats=age)  # type: ignore[arg-type]


def test_operations_started_and_finished_by_type_and_outcome(registry: CollectorRegistry) -> None:
    """backbeat_operations_started/finished_total count by operation_type (and outcome), never by id."""
    with manual_integration() as (integration, _pulse, _log):
        instrument(integration, registry=registry)
        for n in range(3):
            integration.start_p2p_operation(f"election-{n}", "election", 5)
        integration.start_p2p_operation("dht-1", "dht_store", 3)
        integration.complete_p2p_operation("election-0", 3)
        integration.fail_p2p_operation("election-1", "no quorum")
        integration.complete_p2p_operation("dht-1", 5)

        def value(name: str, **labels: str) -> float | None:
            return registry.get_sample_value(name, {**LABELS, **labels})

        assert value("backbeat_operations_started_total", operation_type="election") == 3.0
        assert value("backbeat_operations_started_total", operation_type="dht_store") == 1.0
        finished = "backbeat_operations_finished_total"
        assert value(finished, operation_type="election", outcome="completed") == 1.0
        assert value(finished, operation_type="election", outcome="failed") == 1.0
        assert value(finished, operation_type="dht_store", outcome="completed") == 1.0
        assert value(finished, operation_type="dht_store", outcome="failed") is None
        text = generate_latest(registry).decode()
        assert "election-0" not in text  # ids are never label values


def test_user_operation_types_are_bounded(registry: CollectorRegistry) -> None:
    """Past MAX_COUNTED_TYPES user types, new ones are counted as 'other': the series stay bounded."""
    from backbeat_sync.operations import MAX_COUNTED_TYPES

    with manual_integration() as (integration, _pulse, _log):
        instrument(integration, registry=registry)
        for n in range(MAX_COUNTED_TYPES + 5):
            integration.start_p2p_operation(f"op-{n}", f"type-{n}", 5)
        integration.start_p2p_operation("e", "election", 5)
        families = {f.name: f for f in text_string_to_metric_families(generate_latest(registry).decode())}
        types = {s.labels["operation_type"] for s in families["backbeat_operations_started"].samples}
        assert len(types) == MAX_COUNTED_TYPES + 2  # the user types that fit, 'other', election
        other = registry.get_sample_value(
            "backbeat_operations_started_total", {**LABELS, "operation_type": "other"}
        )
        assert other == 5.0


def test_a_budget_exhaustion_is_counted_by_operation_type(registry: CollectorRegistry) -> None:
    """An interrupted @beat_budget(operation_type=...) call: backbeat_operation_budget_exhaustions_total."""
    import time

    from backbeat_sync import BeatBudgetExceeded, beat_budget

    cfg = BackbeatConfig(
        cluster_id="test", agent_id="bytype", nats_url=f"local://{unique_bus()}", tempo_bpm=3000
    )

    @beat_budget(1, operation_type="pubsub_sync")
    def spin() -> None:
        while True:
            time.sleep(0.001)

    with Integration(cfg, node_id="n") as integration:
        instrument(integration, registry=registry)
        with pytest.raises(BeatBudgetExceeded) as info:
            spin()
        labels = {
            "cluster_id": "test",
            "agent_id": "bytype",
            "operation_type": "pubsub_sync",
            "mode": "interrupt",
            "outcome": "late" if info.value.late else "interrupted",
        }
        wait_until(
            lambda: registry.get_sample_value("backbeat_operation_budget_exhaustions_total", labels) == 1.0,
            what="the exhaustion counted by type",
        )
        started = {"cluster_id": "test", "agent_id": "bytype", "operation_type": "pubsub_sync"}
        assert registry.get_sample_value("backbeat_operations_started_total", started) == 1.0


@pytest.mark.parametrize("mode", ["warn", "raise_after"])
def test_a_budget_that_runs_on_is_counted_by_operation_type(mode: str, registry: CollectorRegistry) -> None:
    """on_exhaust warn / raise_after: the overrun is counted as {operation_type, mode, ran_on}."""
    import time

    from backbeat_sync import BeatBudgetExceeded, beat_budget

    cfg = BackbeatConfig(
        cluster_id="test", agent_id=f"ro-{mode}", nats_url=f"local://{unique_bus()}", tempo_bpm=3000
    )

    @beat_budget(1, operation_type="dht_store", on_exhaust=mode)  # type: ignore[arg-type]
    def slow() -> None:
        time.sleep(0.2)  # 10 beats at 3000 BPM

    labels = {"cluster_id": "test", "agent_id": f"ro-{mode}", "operation_type": "dht_store"}
    with Integration(cfg, node_id="n") as integration:
        instrument(integration, registry=registry)
        if mode == "raise_after":
            with pytest.raises(BeatBudgetExceeded):
                slow()
        else:
            slow()
        wait_until(
            lambda: (
                registry.get_sample_value(
                    "backbeat_operation_budget_exhaustions_total",
                    {**labels, "mode": mode, "outcome": "ran_on"},
                )
                == 1.0
            ),
            what="the overrun counted by type",
        )


def test_operation_counts_survive_clean_up_and_reused_ids(registry: CollectorRegistry) -> None:
    """Finished operations cleaned out on a downbeat, and ids used again, still count once each."""
    from backbeat_sync import track_operation

    with manual_integration() as (integration, pulse, _log):
        instrument(integration, registry=registry)
        pulse.beat(1)
        for _ in range(5):  # the same id five times: each new one replaces the finished one
            with track_operation("k", "dht_store", beats=100, integration=integration):
                pass
        integration.start_p2p_operation("e-1", "election", 5)
        integration.fail_p2p_operation("e-1", "gone")
        assert integration.registry.finished_count == 2
        pulse.beat(4)  # a downbeat: the finished operations are cleaned out
        assert integration.registry.finished_count == 0
        integration.start_p2p_operation("e-2", "election", 5)  # still active

        def value(name: str, **labels: str) -> float | None:
            return registry.get_sample_value(name, {**LABELS, **labels})

        assert value("backbeat_operations_started_total", operation_type="dht_store") == 5.0
        assert (
            value("backbeat_operations_finished_total", operation_type="dht_store", outcome="completed")
            == 5.0
        )
        assert value("backbeat_operations_started_total", operation_type="election") == 2.0
        assert value("backbeat_operations_finished_total", operation_type="election", outcome="failed") == 1.0


def test_operations_are_not_counted_until_an_exporter_asks() -> None:
    """Without instrument(), the registry counts nothing by type (its hot paths stay as they were)."""
    with manual_integration() as (integration, _pulse, _log):
        assert integration.registry.counting is False
        instrument(integration, registry=CollectorRegistry())
        assert integration.registry.counting is True


def test_healthz_fails_when_a_thread_of_the_integration_ended(
    registry: CollectorRegistry, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Running, but a thread of it gone (``alive`` false): /healthz and /readyz are 503 loop_stopped."""
    cfg = BackbeatConfig(cluster_id="test", agent_id="dead", nats_url=f"local://{unique_bus()}?pulse=manual")
    with (
        Integration(cfg, node_id="n") as integration,
        integration.serve_metrics(0, addr="127.0.0.1", registry=registry) as server,
    ):
        assert integration.alive is True
        monkeypatch.setattr(Integration, "alive", property(lambda self: False))
        for path in ("/healthz", "/readyz"):
            status, body = probe(server, path)
            assert (status, body["reason"]) == (503, "loop_stopped"), path
    monkeypatch.undo()
    assert integration.alive is False  # stopped
