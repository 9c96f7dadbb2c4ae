"""The three budget user stories in ``examples/`` run as they are and stop their overrunning task."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def run_example(name: str, env_extra: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``examples/<name>`` on the embedded pulse and return the finished process."""
    env = {k: v for k, v in os.environ.items() if k != "CHORUS_BACKBEAT_NATS_URL"}
    env.update(env_extra or {})
    return subprocess.run(
        [sys.executable, str(EXAMPLES / name)],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        check=False,
    )


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("decorate_functions.py", "stopped after"),
        ("script_context_manager.py", "stopped after"),
        ("legacy_threaded_service.py", "stopped by budget"),
    ],
)
def test_example_runs_stops_the_overrun_and_prints_claims(name: str, expected: str) -> None:
    """Each example exits 0 by itself, shows a task stopped by its budget and its failure claim."""
    proc = run_example(name)
    assert (proc.returncode, proc.stderr) == (0, "")
    assert expected in proc.stdout
    assert "failed" in proc.stdout or "failure claims" in proc.stdout
    assert "beat budget exceeded" in proc.stdout


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
def test_legacy_service_stops_gracefully_on_sigterm() -> None:
    """SIGTERM makes the worker pool finish its current tasks and exit 0 with its summary."""
    env = {k: v for k, v in os.environ.items() if k != "CHORUS_BACKBEAT_NATS_URL"}
    proc = subprocess.Popen(
        [sys.executable, str(EXAMPLES / "legacy_threaded_service.py")],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    assert proc.stdout is not None
    first = proc.stdout.readline()  # the first line means the pool is running (its handler is set)
    assert first
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert (proc.returncode, err) == (0, "")
    assert "received SIGTERM" in out
    assert "tasks in" in out
