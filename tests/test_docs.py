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
from typing import Any

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
    "docs/budgets.md",
    "docs/learning.md",
    "docs/workflows.md",
)
#: Pages whose snippets need a NATS server: they run with CHORUS_BACKBEAT_NATS_URL set to
#: one started by the test fixture (the pages say so).
SERVER_PAGES = ("docs/nats.md",)
FENCE = re.compile(r"^```python\n(.*?)^```", re.S | re.M)


def snippets(pages: tuple[str, ...] = RUN_PAGES) -> list[tuple[str, int, str]]:
    """(file, index, code) of every ``python`` block in ``pages``."""
    found = []
    for path in (ROOT / page for page in pages):
        if path.exists():
            for i, match in enumerate(FENCE.finditer(path.read_text(encoding="utf-8"))):
                found.append((path.relative_to(ROOT).as_posix(), i, match.group(1)))
    return found


SNIPPETS = snippets()
SERVER_SNIPPETS = snippets(SERVER_PAGES)


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Snippets run on their defaults, not on the caller's CHORUS_BACKBEAT_* variables."""
    for name in list(os.environ):
        if name.startswith("CHORUS_BACKBEAT_"):
            monkeypatch.delenv(name)


@pytest.mark.timeout(60)
@pytest.mark.parametrize(("path", "index", "code"), SNIPPETS, ids=[f"{p}#{i}" for p, i, _ in SNIPPETS])
def test_snippet_runs(
    path: str, index: int, code: str, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """The snippet runs as it is, in a fresh namespace, without raising.

    A snippet that sets up logging for the whole process, as an application does
    (``logger.remove()``), runs as a process of its own, so the suite keeps its sinks.
    """
    if "logger.remove()" in code:
        script = tmp_path / "snippet.py"
        script.write_text(code, encoding="utf-8")
        proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=50)
        assert proc.returncode == 0, proc.stderr
        return
    exec(compile(code, f"{path}[python block {index}]", "exec"), {"__name__": "__docs__"})


@pytest.mark.nats
@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    ("path", "index", "code"), SERVER_SNIPPETS, ids=[f"{p}#{i}" for p, i, _ in SERVER_SNIPPETS]
)
def test_server_snippet_runs(
    path: str, index: int, code: str, nats_server: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A snippet that needs a server runs as it is, against the fixture's (CHORUS_BACKBEAT_NATS_URL)."""
    monkeypatch.setenv("CHORUS_BACKBEAT_NATS_URL", nats_server.url)
    exec(compile(code, f"{path}[python block {index}]", "exec"), {"__name__": "__docs__"})


def test_every_python_snippet_in_docs_runs_somewhere() -> None:
    """No page's python block is left out: each page is in RUN_PAGES or SERVER_PAGES."""
    pages = {p.relative_to(ROOT).as_posix() for p in DOCS.glob("*.md") if "```python" in p.read_text("utf-8")}
    assert pages - set(RUN_PAGES) - set(SERVER_PAGES) == set()


def test_the_logging_snippet_prints_each_line_once_at_its_level(tmp_path: Path) -> None:
    """troubleshooting.md's logging setup, run as an application would: no line twice, no DEBUG line."""
    (code,) = [c for p, _, c in SNIPPETS if p == "docs/troubleshooting.md" and "logger.add(" in c]
    script = tmp_path / "app.py"
    script.write_text(code, encoding="utf-8")
    proc = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=60, cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert any("CHORUS BACKBEAT integration started" in line for line in lines), proc.stderr
    assert len(lines) == len(set(lines)), proc.stderr
    assert not [line for line in lines if "| DEBUG" in line], proc.stderr


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
