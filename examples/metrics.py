"""Prometheus metrics for an agent: serve them, do some budgeted work, scrape them twice.

Runs on the in-process pulse (no server) unless CHORUS_BACKBEAT_NATS_URL is
set, in which case it joins that NATS server (start a pulse there with
``backbeat-sync pulse --nats URL``). Needs the ``prometheus`` extra. It serves
the metrics on a free port (pass a port number as the first argument to
choose one, e.g. 9464), prints what Prometheus would see before and after the
work, and exits by itself in a few seconds.

    python examples/metrics.py
    python examples/metrics.py 9464
"""

from __future__ import annotations

import sys
import threading
import time
import urllib.request

from prometheus_client.parser import text_string_to_metric_families

from backbeat_sync import BackbeatConfig, BeatBudgetExceeded, Integration, beat_budget, track_operation

TEMPO_BPM = 240  # a quarter of a second per beat
#: (sample name, labels besides cluster_id/agent_id) of the series to show.
SHOWN: tuple[tuple[str, dict[str, str]], ...] = (
    ("backbeat_beats_received_total", {}),
    ("backbeat_claims_emitted_total", {}),
    ("backbeat_active_operations", {}),
    ("backbeat_measured_tempo_bpm", {}),
    ("backbeat_tempo_drift", {"drift": "acceptable"}),
    ("backbeat_budget_warnings_total", {}),
    ("backbeat_budget_exhaustions_total", {"mode": "interrupt", "outcome": "interrupted"}),
    ("backbeat_beat_handling_seconds_count", {}),
)


def label(name: str, extra: dict[str, str]) -> str:
    """How a series is shown: its name, and its extra labels if any."""
    inner = ",".join(f'{k}="{v}"' for k, v in extra.items())
    return f"{name}{{{inner}}}" if inner else name


def scrape(url: str) -> dict[str, float]:
    """GET the endpoint and parse it as Prometheus does; {label(series): value} for SHOWN."""
    with urllib.request.urlopen(url, timeout=5) as response:
        text = response.read().decode()
    values = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            for name, extra in SHOWN:
                if sample.name == name and all(sample.labels.get(k) == v for k, v in extra.items()):
                    values[label(name, extra)] = sample.value
    return values


@beat_budget(2, operation_type="pubsub_sync")
def sync_topic(topic: str) -> int:
    """Half a beat of plain work: well within its budget."""
    time.sleep(0.125)
    return len(topic)


@beat_budget(1, operation_type="peer_discovery")
def discover_forever() -> None:
    """Never finishes by itself: its budget of one beat stops it."""
    while True:
        time.sleep(0.01)


def main() -> None:
    """Serve, work for a few beats, and show the counters moving."""
    port = int(sys.argv[1]) if len(sys.argv) > 1 else 0  # 0: any free port
    config = BackbeatConfig.from_env(
        defaults={"nats_url": "local://", "cluster_id": "chorus-dev", "tempo_bpm": TEMPO_BPM},
        agent_id="metrics-example",
    )
    with Integration(config, node_id="12D3KooWMetrics") as integration:
        beat = threading.Event()
        integration.on_beat(lambda frame: beat.set())
        if not beat.wait(timeout=10 * integration.clock.beat_duration + 5):
            raise SystemExit("no beat arrived: is a pulse running on this NATS server?")
        with integration.serve_metrics(port, addr="127.0.0.1") as server:
            print(f"serving {server.url}")
            before = scrape(server.url)

            with track_operation("dht-store-k", "dht_store", beats=3, peers=3) as op:
                op.sleep(0.5)  # two beats of a three-beat budget: warnings at 50 % and 75 %
            for n in range(3):
                sync_topic(f"chorus/tasks/{n}")
            try:
                discover_forever()
            except BeatBudgetExceeded as exc:
                print(f"stopped by its budget: {exc}")

            after = scrape(server.url)
        names = [label(name, extra) for name, extra in SHOWN]
        width = max(len(n) for n in names)
        print(f"{'series':<{width}}  {'before':>8}  {'after':>8}")
        for n in names:
            print(f"{n:<{width}}  {before.get(n, float('nan')):>8g}  {after.get(n, float('nan')):>8g}")
        emitted = "backbeat_claims_emitted_total"
        print("claims emitted moved:", after[emitted] > before[emitted])


if __name__ == "__main__":
    main()
