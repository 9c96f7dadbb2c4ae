"""The history file: its SQLite schema (``PRAGMA user_version``), migrations and rows."""

from __future__ import annotations

import math
from typing import Any, Final

from .records import Sample
from .rules import EXCEEDED_KINDS, OUTCOMES, SOURCES

__all__ = ["COLUMNS", "MIGRATIONS", "SCHEMA", "row_sample"]

SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS samples (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    operation_type TEXT NOT NULL,
    name TEXT NOT NULL,
    budget REAL NOT NULL,
    beats_used REAL NOT NULL,
    outcome TEXT NOT NULL,
    exceeded_kind TEXT,
    end_beat REAL NOT NULL,
    tempo_bpm REAL NOT NULL,
    budget_source TEXT NOT NULL,
    recorded_at REAL NOT NULL,
    writer TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS samples_by_key ON samples (operation_type, name, id);
"""
COLUMNS: Final = (
    "id, operation_type, name, budget, beats_used, outcome, exceeded_kind,"
    " end_beat, tempo_bpm, budget_source, recorded_at"
)
#: Migrations: ``MIGRATIONS[v]`` takes a file from version ``v`` to ``v + 1`` (in one transaction).
MIGRATIONS: Final[dict[int, str]] = {0: SCHEMA}


def row_sample(row: tuple[Any, ...]) -> Sample:
    """A row as a Sample; ValueError/TypeError for a row this library could not have written."""
    _, typ, name, budget, used, outcome, kind, end, tempo, source, at = row
    if not isinstance(typ, str) or not typ or not isinstance(name, str) or not name:
        raise ValueError("operation_type and name must be non-empty text")
    nums = (budget, used, end, tempo, at)
    if not all(isinstance(x, (int, float)) and math.isfinite(x) for x in nums):
        raise ValueError("budget, beats_used, end_beat, tempo_bpm, recorded_at must be finite numbers")
    if budget <= 0 or used < 0:
        raise ValueError("budget must be > 0 and beats_used >= 0")
    if outcome not in OUTCOMES:
        raise ValueError(f"unknown outcome {outcome!r}")
    if kind not in ((None, *EXCEEDED_KINDS) if outcome == "exceeded" else (None,)):
        raise ValueError(f"exceeded_kind {kind!r} does not fit outcome {outcome!r}")
    if source not in SOURCES:
        raise ValueError(f"unknown budget_source {source!r}")
    return Sample(typ, name, float(budget), float(used), outcome, kind, float(end), float(tempo), source, at)
