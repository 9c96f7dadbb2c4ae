"""Smoke test of ``benchmarks/run.py``: it runs and prints one JSON object of the documented shape.

It never asserts a speed (the machine is shared and noisy; the figures are a
benchmark, not a timed test): only that the command works and what it prints.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
RUN = ROOT / "benchmarks" / "run.py"
ROW_KEYS = {"figure", "value", "baseline", "ratio", "target", "met", "unit", "detail"}


def run_bench(*args: str) -> subprocess.CompletedProcess[str]:
    """Run ``benchmarks/run.py`` with ``args`` and return the finished process."""
    return subprocess.run(
        [sys.executable, str(RUN), *args], capture_output=True, text=True, timeout=60, cwd=str(ROOT)
    )


def test_quick_fallback_prints_one_json_object_of_figures() -> None:
    """`--quick --only fallback` prints one JSON object: machine info and one complete figure row."""
    proc = run_bench("--quick", "--only", "fallback")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert {"machine", "quick", "seconds", "figures", "all_met"} == set(out)
    assert True is out["quick"]
    assert {"python", "cpus", "switch_interval_ms"} <= set(out["machine"])
    assert [f["figure"] for f in out["figures"]] == ["fallback_overhead_vs_wrapt"]
    figure = out["figures"][0]
    assert set(figure) == ROW_KEYS
    assert isinstance(figure["met"], bool)
    assert figure["value"] > 0
    assert figure["baseline"] > 0
    assert pytest.approx(figure["value"] / figure["baseline"], rel=1e-2) == figure["ratio"]
    assert out["all_met"] == figure["met"]


def test_unknown_group_is_refused_by_name() -> None:
    """`--only` with a group that does not exist fails with a message naming the choices."""
    proc = run_bench("--only", "no-such-group")
    assert proc.returncode == 2
    assert "no-such-group" in proc.stderr
    assert "decorator" in proc.stderr


@pytest.mark.nats
@pytest.mark.slow
def test_jetstream_groups_run_only_when_asked() -> None:
    """`--quick --only failover --only claims_stream` prints their two figures; the default has neither."""
    proc = subprocess.run(
        [sys.executable, str(RUN), "--quick", "--only", "failover", "--only", "claims_stream"],
        capture_output=True,
        text=True,
        timeout=180,
        cwd=str(ROOT),
    )
    assert proc.returncode == 0, proc.stderr
    figures = {f["figure"]: f for f in json.loads(proc.stdout)["figures"]}
    assert set(figures) == {"ha_failover_beats", "final_claims_stream_vs_flush"}, figures
    failover = figures["ha_failover_beats"]
    assert failover["detail"]["kills"] == 3
    assert failover["detail"]["strictly_increasing"] is True
    assert all(b > 0 for b in failover["detail"]["beats"])
    assert figures["final_claims_stream_vs_flush"]["value"] > 0
    sys.path.insert(0, str(ROOT))
    from benchmarks.run import GROUPS

    assert "failover" not in GROUPS
    assert "claims_stream" not in GROUPS
