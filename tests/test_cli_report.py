"""``backbeat-sync report``: the table, JSON and the plot of a history file, through ``main(argv)``."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from backbeat_sync import BudgetHistory
from backbeat_sync.cli import main


@pytest.fixture
def history_file(tmp_path: Path) -> str:
    """A file with three types: one learned, one running out, one too young to learn."""
    path = str(tmp_path / "budgets.sqlite")
    h = BudgetHistory(path)
    h.open()
    for _ in range(20):
        h.record("dht_store", "store", budget=4, beats_used=1.0)
    for _ in range(10):
        h.record("election", "elect", budget=3, beats_used=2.0)
        h.record(
            "election", "elect", budget=3, beats_used=3.0, outcome="exceeded", exceeded_kind="interrupted"
        )
    h.record("election", "elect", budget=3, beats_used=7.5, outcome="exceeded", exceeded_kind="late")
    h.record("election", "elect", budget=3, beats_used=1.0, outcome="failed")
    for _ in range(3):
        h.record("ingest", "ingest", budget=8, beats_used=0.5)
    h.close()
    return path


def test_table(history_file: str, capsys: pytest.CaptureFixture[str]) -> None:
    """A line per type: runs, done, failed, exceeded (interrupted/late), on time, p50/p95/max, suggestion."""
    assert main(["report", "--history", history_file]) == 0
    out = capsys.readouterr().out
    lines = {line.split()[0]: line.split() for line in out.splitlines()[3:]}
    assert lines["dht_store"] == [
        "dht_store",
        "20",
        "20",
        "0",
        "0",
        "(0/0)",
        "100%",
        "1",
        "1",
        "1",
        "4",
        "2",
        "(history)",
        "2-4",
    ]
    assert lines["election"][:7] == ["election", "22", "10", "1", "11", "(10/1)", "48%"]
    # 21 timed runs: learned; p95 (nearest rank 20 of 21) is 3.0, so 3.75, the newest budget 3
    assert lines["election"][-5:] == ["7.5", "3", "3.75", "(history)", "3-10"]
    assert lines["ingest"][-2:] == ["-", "-"]  # no profile, too few runs: no suggestion


def test_json(history_file: str, capsys: pytest.CaptureFixture[str]) -> None:
    """--format json: the same figures."""
    assert main(["report", "--history", history_file, "--format", "json"]) == 0
    data = json.loads(capsys.readouterr().out)
    rows = {r["operation_type"]: r for r in data["types"]}
    assert sorted(rows) == ["dht_store", "election", "ingest"]
    e = rows["election"]
    assert (e["runs"], e["done"], e["failed"], e["exceeded"], e["interrupted"], e["late"]) == (
        22,
        10,
        1,
        11,
        10,
        1,
    )
    assert (e["p50"], e["p95"], e["max"]) == (3.0, 3.0, 7.5)
    assert e["on_time_rate"] == pytest.approx(10 / 21, abs=1e-4)
    assert (e["suggested"], e["suggested_source"], e["profile"]) == (3.75, "history", [3.0, 10.0])
    assert rows["ingest"]["suggested"] is None


@pytest.mark.parametrize("ext", ["png", "svg"])
def test_plot(history_file: str, tmp_path: Path, ext: str, capsys: pytest.CaptureFixture[str]) -> None:
    """--plot OUT.png / OUT.svg writes the picture."""
    pytest.importorskip("matplotlib")
    out = tmp_path / f"report.{ext}"
    assert main(["report", "--history", history_file, "--plot", str(out)]) == 0
    data = out.read_bytes()
    assert data.startswith(b"\x89PNG") if ext == "png" else b"<svg" in data[:2000]
    assert f"plot written to {out}" in capsys.readouterr().out
    if ext == "svg":  # its words are there: title, axis labels, the types, the legend
        text = data.decode()
        for word in ("Budget history", "beats used per run", "operation type", "dht_store", "suggested"):
            assert word in text


def test_missing_file_bad_extension_and_missing_extra(
    history_file: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """No such file, --plot with another extension, matplotlib missing: one line, exit 2."""
    assert main(["report", "--history", str(tmp_path / "nope.sqlite")]) == 2
    assert "no history file" in capsys.readouterr().err
    assert main(["report", "--history", history_file, "--plot", str(tmp_path / "x.jpg")]) == 2
    assert ".png or .svg" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert main(["report", "--history", history_file, "--plot", str(tmp_path / "x.png")]) == 2
    assert "backbeat_sync[report]" in capsys.readouterr().err


def test_not_a_history_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A file that is not SQLite: one line naming the path, exit 2."""
    junk = tmp_path / "junk.sqlite"
    junk.write_bytes(b"junk" * 500)
    assert main(["report", "--history", str(junk)]) == 2
    assert "junk.sqlite" in capsys.readouterr().err
