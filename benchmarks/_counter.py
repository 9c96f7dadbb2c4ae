"""The outside witness of the benchmarks: a raw nats-py subscriber in its own process.

Usage: ``python benchmarks/_counter.py URL SUBJECT EXPECTED [CONTAINS] [TIMEOUT]``

It subscribes to ``SUBJECT`` (wildcards allowed), flushes, prints ``ready`` on a line,
then counts messages (only those whose payload contains ``CONTAINS``, when given) until
``EXPECTED`` have arrived or ``TIMEOUT`` seconds (default 60) have passed, and prints one
JSON line: ``{"count": n, "first": t, "last": t}`` with ``time.monotonic()`` readings
(system-wide on Linux, so the parent can compare them with its own).
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from typing import Any

import nats


async def count(url: str, subject: str, expected: int, contains: bytes, timeout: float) -> dict[str, Any]:
    """Count messages on ``subject`` until ``expected`` arrived; return count and first/last times."""
    state: dict[str, Any] = {"count": 0, "first": None, "last": None}
    done = asyncio.Event()
    mono = time.monotonic

    async def cb(msg: Any) -> None:
        if contains and contains not in msg.data:
            return
        now = mono()
        if state["first"] is None:
            state["first"] = now
        state["last"] = now
        state["count"] += 1
        if state["count"] >= expected:
            done.set()

    nc = await nats.connect(url, pending_size=64 * 1024 * 1024)
    await nc.subscribe(subject, cb=cb, pending_msgs_limit=10_000_000, pending_bytes_limit=2**31)
    await nc.flush()
    print("ready", flush=True)
    try:
        await asyncio.wait_for(done.wait(), timeout)
    except asyncio.TimeoutError:
        pass
    await nc.close()
    return state


def main(argv: list[str]) -> int:
    """Run the counter with the command-line arguments (see the module docstring)."""
    url, subject, expected = argv[0], argv[1], int(argv[2])
    contains = argv[3].encode() if len(argv) > 3 else b""
    timeout = float(argv[4]) if len(argv) > 4 else 60.0
    print(json.dumps(asyncio.run(count(url, subject, expected, contains, timeout))), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
