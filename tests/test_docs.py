"""Tests for the documentation: the mkdocs build, the runnable snippets, and coverage of names.

Every fenced block tagged ``python`` in the README and the newcomer's pages
(:data:`RUN_PAGES`) is run; blocks tagged ``py``, ``bash`` or ``text`` are shown
only. The pages other engineers own (NATS, budgets, architecture, protocol)
keep their own snippet rules. The API page must have a
section per public name, the configuration page every field and variable, and
the CLI page every flag.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import attrs
import pytest

import backbeat_sync
from backbeat_sync import BackbeatConfig
from backbeat_sync.cli import build_parser

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
RUN_PAGES = (
    "README.md",
    "docs/index.md",
    "docs/concepts.md",
    "docs/quickstart.md",
    "docs/api.md",
    "docs/cli.md",
    "docs/configuration.md",
    "docs/metrics.md",
    "docs/observability.md",
    "docs/troubleshooting.md",
)
FENCE = re.compile(r"^```python\n(.*?)^```", re.S | re.M)


def snippets() -> list[tuple[str, int, str]]:
    """(file, index, code) of every ``python`` block in :data:`RUN_PAGES`."""
    found = []
    for path in (ROOT / page for page in RUN_PAGES):
        if path.exists():
            for i, match in enumerate(FENCE.finditer(path.read_text(encoding="utf-8"))):
                found.append((path.relative_to(ROOT).as_posix(), i, match.group(1)))
    return found


SNIPPETS = snippets()


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Snippets run on their defaults, not on the caller's CHORUS_BACKBEAT_* variables."""
    for name in list(os.environ):
        if name.startswith("CHORUS_BACKBEAT_"):
            monkeypatch.delenv(name)


@pytest.mark.timeout(60)
@pytest.mark.parametrize(("path", "index", "code"), SNIPPETS, ids=[f"{p}#{i}" for p, i, _ in SNIPPETS])
def test_snippet_runs(path: str, index: int, code: str, capsys: pytest.CaptureFixture[str]) -> None:
    """The snippet runs as it is, in a fresh namespace, without raising."""
    exec(compile(code, f"{path}[python block {index}]", "exec"), {"__name__": "__docs__"})


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_mkdocs_build_is_strict_clean(tmp_path: Path) -> None:
    """`mkdocs build --strict` succeeds: no broken link, anchor or nav entry, no page left out."""
    if importlib.util.find_spec("mkdocs") is None:
        pytest.skip("mkdocs is not installed (the docs extra)")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "mkdocs",
            "build",
            "--strict",  # no -q: it hides the warnings that --strict turns into a failure
            "-f",
            str(ROOT / "mkdocs.yml"),
            "-d",
            str(tmp_path / "site"),
        ],
        capture_output=True,
        text=True,
        timeout=110,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (tmp_path / "site" / "index.html").exists()


def _headings(path: Path) -> str:
    return "\n".join(line for line in path.read_text(encoding="utf-8").splitlines() if line.startswith("#"))


def test_api_page_has_a_section_per_public_name() -> None:
    """Every name in backbeat_sync.__all__ appears in a heading of docs/api.md."""
    headings = _headings(DOCS / "api.md").replace("\\_", "_")
    missing = [name for name in backbeat_sync.__all__ if not re.search(rf"\b{re.escape(name)}\b", headings)]
    assert missing == []


def test_configuration_page_lists_every_field_and_variable() -> None:
    """docs/configuration.md names every BackbeatConfig field and every CHORUS_BACKBEAT_* variable."""
    from backbeat_sync import config as config_module

    text = (DOCS / "configuration.md").read_text(encoding="utf-8")
    fields = [f.name for f in attrs.fields(BackbeatConfig)]
    variables = [config_module.ENV_PREFIX + var for _, var, _ in config_module._ENV_FIELDS]
    assert [f for f in fields if f"`{f}`" not in text] == []
    assert [v for v in variables if f"`{v}`" not in text] == []


def test_cli_page_lists_every_command_and_flag() -> None:
    """docs/cli.md names every command and every flag of every command."""
    text = (DOCS / "cli.md").read_text(encoding="utf-8")
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    missing = []
    for name, command in sub.choices.items():
        if f"backbeat-sync {name}" not in text:
            missing.append(name)
        for action in command._actions:
            missing += [f"{name} {o}" for o in action.option_strings if o.startswith("--") and o not in text]
    assert missing == []


def test_every_docs_page_is_in_the_nav() -> None:
    """mkdocs.yml's nav lists every page in docs/ (the strict build checks the other way round)."""
    nav = (ROOT / "mkdocs.yml").read_text(encoding="utf-8")
    pages = sorted(p.name for p in DOCS.glob("*.md"))
    assert [p for p in pages if p not in nav] == []
