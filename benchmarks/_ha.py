"""The JetStream figures of ``benchmarks/run.py`` (``--only failover``, ``--only claims_stream``).

Not in the default run (they start a JetStream server and, for the failover,
pulse replicas in their own processes): ask for them by name.

- ``failover``: three HA pulse replicas (``tests/ha_pulse_child.py``) at 600 BPM on one
  ``nats-server -js``; the leader is SIGKILLed 5 times (3 in ``--quick``). A raw nats-py
  subscriber records each frame's arrival; the failover time is from the kill to the first
  frame of the new leader, in beats. Median against the bound the tests hold it to
  (3 beats plus the lease TTL).
- ``claims_stream``: final claims from 4 threads through the transport until every one is
  confirmed, with ``claims_stream`` (JetStream publish, PubAck) against the flush-confirmed
  core-NATS path, on the same server with the same stream capturing the subject.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
CHILD = ROOT / "tests" / "ha_pulse_child.py"
Row = dict[str, Any]


def _js_server(tmp: str) -> Any:
    from tests.natsserver import NatsServer, find_binary

    binary = find_binary()
    if binary is None:
        raise RuntimeError("no nats-server binary (next to sys.executable or on PATH)")
    return NatsServer(binary, Path(tmp), jetstream=True).start()


def bench_failover(quick: bool, row: Any) -> list[Row]:
    """Failover time in beats after a SIGKILL of the leader: median of 5 (3 with ``quick``)."""
    import nats

    from backbeat_sync import BackbeatConfig
    from backbeat_sync.ha import lease_ttl_for, read_lease

    tempo, kills = 600.0, (3 if quick else 5)
    spb = 60.0 / tempo
    ttl = lease_ttl_for(tempo)
    bound = 3 + ttl / spb
    with tempfile.TemporaryDirectory(prefix="bb-bench-ha-") as tmp:
        server = _js_server(tmp)
        loop = asyncio.new_event_loop()
        thread = threading.Thread(target=loop.run_forever, name="bench-ha", daemon=True)
        thread.start()
        got: list[tuple[float, int]] = []
        cond = threading.Condition()

        async def cb(msg: Any) -> None:
            with cond:
                got.append((time.monotonic(), int(json.loads(msg.data)["beat_index"])))
                cond.notify_all()

        async def setup() -> Any:
            nc = await nats.connect(server.url)
            await nc.subscribe("backbeat.beat.bench-ha", cb=cb)
            await nc.flush()
            return nc

        nc = asyncio.run_coroutine_threadsafe(setup(), loop).result(30)
        cfg = BackbeatConfig(cluster_id="bench-ha", nats_url=server.url)
        procs: dict[int, subprocess.Popen[str]] = {}

        def spawn() -> None:
            p = subprocess.Popen(
                [sys.executable, str(CHILD), server.url, "bench-ha", str(tempo)],
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
                text=True,
                cwd=str(ROOT),
            )
            assert p.stdout is not None
            if p.stdout.readline().strip() != "started":
                p.kill()
                raise RuntimeError("pulse replica did not start")
            procs[p.pid] = p

        def wait(pred: Any, timeout: float = 60.0) -> None:
            deadline = time.monotonic() + timeout
            with cond:
                while not pred():
                    if time.monotonic() > deadline:
                        raise RuntimeError("timed out")
                    cond.wait(0.05)

        def leader() -> int | None:
            lease = read_lease(cfg)
            pid = int(lease.holder.split(":")[1]) if lease is not None and lease.holder else None
            return pid if pid in procs else None

        beats: list[float] = []
        gaps: list[int] = []
        try:
            for _ in range(3):
                spawn()
            for _ in range(kills):
                deadline = time.monotonic() + 60
                while leader() is None:
                    if time.monotonic() > deadline:
                        raise RuntimeError("no leader")
                    time.sleep(0.02)
                mark = time.monotonic()
                wait(lambda: sum(1 for a, _ in got if a > mark) >= 5)  # noqa: B023
                pid = leader()
                assert pid is not None
                p = procs.pop(pid)
                p.send_signal(signal.SIGKILL)
                p.wait()
                killed = time.monotonic()
                with cond:
                    last = max(i for _, i in got)
                wait(lambda: any(a > killed and i > last + 1 for a, i in got))  # noqa: B023
                with cond:
                    arrival, first = next((a, i) for a, i in got if a > killed and i > last + 1)
                beats.append((arrival - killed) / spb)
                gaps.append(first - last - 1)
                spawn()
        finally:
            for p in procs.values():
                p.send_signal(signal.SIGTERM)
            for p in procs.values():
                try:
                    p.wait(10)
                except subprocess.TimeoutExpired:
                    p.kill()
            asyncio.run_coroutine_threadsafe(nc.close(), loop).result(10)
            loop.call_soon_threadsafe(loop.stop)
            thread.join(10)
            server.kill()
        idx = [i for _, i in got]
        ordered = all(a < b for a, b in itertools.pairwise(idx))
    value = statistics.median(beats)
    return [
        row(
            "ha_failover_beats",
            value,
            bound,
            max_ratio=1.0,
            met=value <= bound and ordered,
            target=f"median <= 3 beats + lease TTL ({bound:g} beats at {tempo:g} BPM), one sequence",
            unit="beats",
            detail={
                "beats": [round(b, 2) for b in beats],
                "missed_beats": gaps,
                "seconds": [round(b * spb, 3) for b in beats],
                "lease_ttl_s": ttl,
                "tempo_bpm": tempo,
                "kills": kills,
                "strictly_increasing": ordered,
            },
        )
    ]


def bench_claims_stream(quick: bool, row: Any) -> list[Row]:
    """Final claims/s until all are confirmed: claims stream (PubAck) vs flush-confirmed core NATS."""
    from backbeat_sync import BackbeatConfig, Integration, StatusClaim
    from backbeat_sync.streams import claims_stream_name, create_claims_stream

    total, repeats = (4_000, 1) if quick else (20_000, 3)
    per_thread = total // 4
    cluster = "bench-xo"
    rates: dict[str, list[float]] = {"stream": [], "flush": []}
    with tempfile.TemporaryDirectory(prefix="bb-bench-xo-") as tmp:
        server = _js_server(tmp)
        try:
            base = BackbeatConfig(
                cluster_id=cluster,
                agent_id="bench-xo-agent",
                nats_url=server.url,
                outbox_limit=10_000_000,
                flush_timeout=30.0,
            )
            create_claims_stream(base)
            run_no = 0

            def once(path: str) -> float:
                nonlocal run_no
                run_no += 1
                cfg = base.evolve(claims_stream=claims_stream_name(cluster) if path == "stream" else None)
                integration = Integration(cfg, node_id="12D3KooWBench")
                integration.start()
                transport = integration.transport
                assert transport is not None
                subject = cfg.status_subject_for()
                prepared = [
                    [
                        StatusClaim(
                            cluster_id=cluster,
                            agent_id="bench-xo-agent",
                            node_id="12D3KooWBench",
                            task_id=f"xo-{run_no}-{k}-{i}",
                            beat_index=1,
                            state="done",
                            beats_left=0,
                            progress=1.0,
                            notes="P2P dht_store: completed (peers: 3, node: 12D3KooWBench)",
                            sent_at="2026-11-28T01:00:00.000Z",
                            operation_type="dht_store",
                            phase="completed",
                            peer_count=3,
                        )
                        for i in range(per_thread)
                    ]
                    for k in range(4)
                ]
                barrier = threading.Barrier(5)

                def worker(items: list[StatusClaim]) -> None:
                    barrier.wait()
                    for c in items:
                        transport.publish(subject, c)

                threads = [threading.Thread(target=worker, args=(p,)) for p in prepared]
                for t in threads:
                    t.start()
                barrier.wait()
                t0 = time.monotonic()
                for t in threads:
                    t.join()
                while transport.stats()["claims_queued"]:
                    if time.monotonic() - t0 > 120:
                        raise RuntimeError("finals not confirmed in 120 s")
                    time.sleep(0.002)
                took = time.monotonic() - t0
                published = transport.stats()["claims_published"]
                integration.stop()
                if published < total:
                    raise RuntimeError(f"{published} of {total} finals confirmed")
                return total / took

            for _ in range(repeats):
                rates["flush"].append(once("flush"))
                rates["stream"].append(once("stream"))
        finally:
            server.kill()
    stream, flush = statistics.median(rates["stream"]), statistics.median(rates["flush"])
    return [
        row(
            "final_claims_stream_vs_flush",
            stream,
            flush,
            max_ratio=float("inf"),
            met=stream / flush >= 0.2,
            target="ratio >= 0.2",
            unit="final claims/s",
            detail={
                "stream": [round(r) for r in rates["stream"]],
                "flush": [round(r) for r in rates["flush"]],
                "n": total,
            },
        )
    ]
