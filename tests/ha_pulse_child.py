"""One HA pulse replica in its own process, for failover tests (killed with SIGKILL by the test).

Usage: ``python tests/ha_pulse_child.py URL[,URL...] CLUSTER TEMPO [LEASE_TTL]``. Prints
``started`` once the pulse runs (leading or standing by), then runs until SIGTERM (a clean
stop that releases the lease) or SIGKILL.
"""

from __future__ import annotations

import signal
import sys
import threading

from backbeat_sync import BackbeatConfig, Pulse


def main() -> None:
    """Run one replica until told to stop."""
    url, cluster, tempo = sys.argv[1], sys.argv[2], float(sys.argv[3])
    ttl = float(sys.argv[4]) if len(sys.argv) > 4 else None
    cfg = BackbeatConfig(
        cluster_id=cluster,
        agent_id="ha-child",
        nats_url=url,
        reconnect_wait=0.05,
        reconnect_jitter=0.01,
        connect_timeout=5.0,
    )
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    pulse = Pulse(cfg, tempo_bpm=tempo, ha=True, lease_ttl=ttl)
    pulse.start()
    print("started", flush=True)
    done.wait()
    pulse.stop()


if __name__ == "__main__":
    main()
