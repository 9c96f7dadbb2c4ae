"""Tests for backbeat_sync._runtime: the one owner of process-wide state."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

import backbeat_sync as bb
from backbeat_sync._runtime import RUNTIME

from .support import unique_bus

ROOT = Path(__file__).resolve().parent.parent
NEVER = 60.0


class ListLogger:
    """A user logger that keeps its lines."""

    def __init__(self) -> None:
        self.lines: list[tuple[str, str]] = []

    def info(self, msg: str) -> None:
        self.lines.append(("info", msg))

    def warn(self, msg: str) -> None:
        self.lines.append(("warn", msg))

    def error(self, msg: str) -> None:
        self.lines.append(("error", msg))


def integration(agent: str, logger: Any = None) -> bb.Integration:
    cfg = bb.BackbeatConfig(
        cluster_id="rt", agent_id=agent, nats_url=f"local://{unique_bus()}?pulse=manual", tempo_bpm=600
    )
    return bb.Integration(cfg, node_id=agent, logger=logger)


@bb.beat_budget(1, warn_at=None)
def spin() -> None:
    """Loops until its budget interrupts it."""
    while True:
        pass


def test_default_passes_to_the_oldest_running_integration_when_it_stops() -> None:
    """Two integrations, the first (the default) stops: the second becomes the default, the
    handover is logged once on its logger, and budgets without integration= stay budgeted."""
    first_log, second_log, third_log = ListLogger(), ListLogger(), ListLogger()
    first = integration("first", first_log)
    second = integration("second", second_log)
    third = integration("third", third_log)
    first.start()
    second.start()
    third.start()
    try:
        assert bb.get_default_integration() is first
        first.stop()
        assert bb.get_default_integration() is second
        handovers = [m for level, m in second_log.lines if "default" in m]
        assert len(handovers) == 1
        assert "first" in handovers[0]
        assert "second" in handovers[0]
        assert "oldest still running" in handovers[0]
        with pytest.raises(bb.BeatBudgetExceeded) as info:
            spin()
        assert info.value.operation_id.startswith("spin-")
        assert second.get_health()["claims_emitted"] >= 1  # the budget was claimed on second's bus
        second.stop()
        assert bb.get_default_integration() is third
        assert [m for level, m in third_log.lines if "default" in m] != []
        with pytest.raises(bb.BeatBudgetExceeded):
            spin()
    finally:
        for i in (first, second, third):
            i.stop()
    assert bb.get_default_integration() is None
    assert [m for level, m in first_log.lines if "default is now" in m] == []


def test_an_explicit_default_does_not_move() -> None:
    """A default set with set_default_integration stays even when it stops."""
    a, b = integration("explicit-a"), integration("explicit-b")
    with a, b, bb.set_default_integration(a):
        a.stop()
        assert bb.get_default_integration() is a
    assert bb.get_default_integration() is None


def test_the_runtime_keeps_every_running_integration_oldest_first() -> None:
    """RUNTIME.running lists running integrations in start order; stop() removes them."""
    a, b = integration("order-a"), integration("order-b")
    with a, b:
        assert [i for i in RUNTIME.running if i in (a, b)] == [a, b]
    assert a not in RUNTIME.running
    assert b not in RUNTIME.running


def test_nothing_registers_at_import_time() -> None:
    """Importing backbeat_sync installs no exit or fork hook; the first start() installs one of each."""
    script = textwrap.dedent(
        """
        import atexit, os
        calls = []
        ours = lambda fn: getattr(fn, "__module__", "").startswith("backbeat_sync")
        real_atexit, real_fork = atexit.register, getattr(os, "register_at_fork", None)

        def fake_atexit(fn, *a, **k):
            if ours(fn):
                calls.append("atexit")
            return real_atexit(fn, *a, **k)

        def fake_fork(**k):
            calls.extend("fork" for fn in k.values() if ours(fn))
            return real_fork(**k)

        atexit.register = fake_atexit
        if real_fork is not None:
            os.register_at_fork = fake_fork
        import backbeat_sync as bb
        from backbeat_sync import budget, integration, metrics  # noqa: F401
        print("import:", sorted(calls))
        cfg = bb.BackbeatConfig(nats_url="local://import-hooks?pulse=manual", tempo_bpm=600)
        for _ in range(2):
            with bb.Integration(cfg, node_id="n"):
                pass
        print("started:", sorted(calls))
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, cwd=str(ROOT)
    )
    assert proc.returncode == 0, proc.stderr
    expected = ["atexit", "fork"] if hasattr(__import__("os"), "register_at_fork") else ["atexit"]
    assert "import: []" in proc.stdout
    assert f"started: {expected}" in proc.stdout
