"""Tests for the package as the index and a user's type checker see it.

The sdist and the wheel are built from the source tree (``python -m build
--no-isolation``: the wheel is built from the unpacked sdist, as on an index);
a user's script is type-checked with mypy against the public API; and the
editable install the README recommends for type checkers is shown to be one
mypy can follow.
"""

from __future__ import annotations

import configparser
import email
import os
import re
import shutil
import subprocess
import sys
import tarfile
import textwrap
import typing
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
#: The extras that are not runtime features of the library.
NOT_RUNTIME = {"all", "bench", "docs", "dev"}


@pytest.fixture(scope="module")
def dists(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(sdist, wheel) built from the source tree."""
    out = tmp_path_factory.mktemp("dist")
    proc = subprocess.run(
        [sys.executable, "-m", "build", "--no-isolation", "--outdir", str(out), str(ROOT)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (sdist,) = out.glob("*.tar.gz")
    (wheel,) = out.glob("*.whl")
    return sdist, wheel


def metadata(wheel: Path) -> email.message.Message:
    """The wheel's METADATA, parsed."""
    with zipfile.ZipFile(wheel) as z:
        name = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        return email.message_from_bytes(z.read(name))


def extras() -> dict[str, set[str]]:
    """setup.cfg's extras: name -> requirement lines."""
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg", encoding="utf-8")
    return {
        name: {line.strip() for line in value.splitlines() if line.strip()}
        for name, value in cfg["options.extras_require"].items()
    }


@pytest.mark.slow
def test_wheel_metadata_reads_right_on_an_index(dists: tuple[Path, Path]) -> None:
    """License-Expression, License-File (PEP 639), project URLs, the extras, a README with absolute links."""
    _, wheel = dists
    meta = metadata(wheel)
    assert meta["License-Expression"] == "MIT"
    assert meta.get_all("License-File") == ["LICENSE"]
    assert meta["License"] is None  # the legacy field is gone
    urls = dict(u.split(", ", 1) for u in meta.get_all("Project-URL") or [])
    assert {"Documentation", "Source", "Issues"} <= set(urls)
    assert all(u.startswith("https://") for u in urls.values())
    provided = set(meta.get_all("Provides-Extra") or [])
    assert {"all", "cli", "prometheus", "signing", "fast", "nkeys"} <= provided
    description = meta.get_payload()
    assert isinstance(description, str)
    relative = re.findall(r"\]\((?!https?://|#)([^)]+)\)", description)
    assert relative == []  # relative links break on the package index


def test_readme_links_are_absolute() -> None:
    """The README is the package's page on the index, where a relative link leads nowhere."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    assert re.findall(r"\]\((?!https?://|#)([^)]+)\)", text) == []


def test_the_dev_extra_keeps_the_benchmark_baselines_importable() -> None:
    """stopit (a baseline of benchmarks/run.py) imports pkg_resources: the dev extra's setuptools has it."""
    import warnings

    import func_timeout  # noqa: F401

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "pkg_resources is deprecated as an API"
        import stopit  # type: ignore[import-untyped]  # noqa: F401


def test_the_all_extra_is_every_runtime_extra() -> None:
    """``all`` holds exactly the requirements of every runtime extra (so a new extra must join it)."""
    declared = extras()
    runtime = set().union(*(reqs for name, reqs in declared.items() if name not in NOT_RUNTIME))
    assert declared["all"] == runtime
    assert runtime <= declared["dev"]  # and dev has them all, as STYLE asks


@pytest.mark.slow
def test_wheel_ships_the_types_the_schemas_and_the_license(dists: tuple[Path, Path]) -> None:
    """py.typed, both JSON Schemas, the LICENSE; no tests or docs inside the wheel."""
    _, wheel = dists
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
    assert "backbeat_sync/py.typed" in names
    assert {
        "backbeat_sync/schemas/beat_frame.schema.json",
        "backbeat_sync/schemas/status_claim.schema.json",
    } <= names
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)
    assert "backbeat_sync/cli/__init__.py" in names
    assert not any(n.startswith(("tests/", "docs/")) for n in names)


@pytest.mark.slow
def test_sdist_carries_docs_examples_tests_and_license(dists: tuple[Path, Path]) -> None:
    """Every docs page and schema, every example, the tests, the LICENSE: a packager can build and test."""
    sdist, _ = dists
    with tarfile.open(sdist) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    expected = {"LICENSE", "README.md", "mkdocs.yml", "setup.cfg", "pyproject.toml"}
    for folder in ("docs", "examples", "tests"):
        expected |= {
            p.relative_to(ROOT).as_posix()
            for p in (ROOT / folder).rglob("*")
            if p.is_file() and "__pycache__" not in p.parts
        }
    assert expected - names == set()
    assert not any("__pycache__" in n or n.endswith(".pyc") for n in names)


# -- typing ----------------------------------------------------------------------------------

USER_SCRIPT = """\
from backbeat_sync import BackbeatConfig, Integration, beat_budget, track_operation
from backbeat_sync.metrics import MetricsServer


@beat_budget(3, operation_type="dht_store")
def store(key: str, value: bytes) -> int:
    return len(value)


config = BackbeatConfig(cluster_id="dev", agent_id="alice", nats_url="local://")
with Integration(config, node_id="12D3KooWAbc") as integration:
    size: int = store("k", b"v")
    integration.start_p2p_operation("election-1", "election", 5)
    with track_operation("dht-1", "dht_store", beats=3, integration=integration) as op:
        op.check()
    server: MetricsServer = integration.serve_metrics(0)
    port: int = server.port
"""

#: (a line that must not type-check, the words mypy's error has)
MISTAKES = [
    ('store("k", "not bytes")', 'incompatible type "str"; expected "bytes"'),
    ('store("k")', 'Missing positional argument "value"'),
    ('integration.start_p2p_operation("e", "election", "five")', 'Argument 3 to "start_p2p_operation"'),
    (
        "integration.serve_metrics(0).no_such_attribute",
        '"MetricsServer" has no attribute "no_such_attribute"',
    ),
    ('BackbeatConfig(cluster_id=1, nats_url="local://")', "incompatible type"),
]


def _typed_health() -> bool:
    """Whether Integration.get_health() returns a TypedDict (issue 14, the core engineer's part)."""
    from backbeat_sync import Integration

    return typing.is_typeddict(typing.get_type_hints(Integration.get_health).get("return"))


def _paramspec_budget() -> bool:
    """Whether execute_with_beat_budget is typed with ParamSpec (issue 14, the core engineer's part)."""
    from backbeat_sync import Integration

    fn = typing.get_type_hints(Integration.execute_with_beat_budget).get("fn")
    return "ParamSpec" in repr(typing.get_args(fn)[:1]) or "~P" in repr(fn)


if _typed_health():
    MISTAKES.append(('integration.get_health()["conected"]', "TypedDict"))
if _paramspec_budget():
    MISTAKES.append(('integration.execute_with_beat_budget(3, store, "k", "not bytes")', "incompatible type"))


def mypy(script: Path, *args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """Run mypy (strict) on ``script``."""
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "mypy",
            "--strict",
            "--no-incremental",
            "--show-error-codes",
            *args,
            str(script),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=cwd,
        env={k: v for k, v in os.environ.items() if k != "MYPYPATH"},
    )


@pytest.mark.slow
def test_a_user_script_type_checks_against_the_public_api(tmp_path: Path) -> None:
    """A user's script passes mypy --strict; each mistake in MISTAKES is an error on its own line.

    mypy runs in the project (its config: strict, stubs of the optional
    dependencies ignored), with the script outside it, as a user's would be.
    """
    script = tmp_path / "user_script.py"
    mistakes = "\n".join(f"    {line}  # mistake {i}" for i, (line, _) in enumerate(MISTAKES))
    script.write_text(
        USER_SCRIPT
        + "\n\ndef mistakes() -> None:\n"
        + textwrap.indent("integration = Integration(config, node_id='n')\n", "    ")
        + mistakes
        + "\n",
        encoding="utf-8",
    )
    good = tmp_path / "good.py"
    good.write_text(USER_SCRIPT, encoding="utf-8")
    proc = mypy(good, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    proc = mypy(script, cwd=ROOT)
    lines = script.read_text(encoding="utf-8").splitlines()
    for i, (_code, words) in enumerate(MISTAKES):
        lineno = next(n for n, text in enumerate(lines, 1) if text.endswith(f"# mistake {i}"))
        errors = [e for e in proc.stdout.splitlines() if f":{lineno}: error:" in e]
        assert errors, f"no error for mistake {i} ({_code}):\n{proc.stdout}"
        assert any(words in e for e in errors), errors
    assert proc.stdout.count(": error:") == len(MISTAKES), proc.stdout


@pytest.mark.slow
def test_the_editable_install_for_type_checkers_is_visible_to_mypy(tmp_path: Path) -> None:
    """README: ``editable_mode=strict`` gives a plain .pth that mypy follows; the default mode does not.

    Both editable wheels are built from a copy of the project (strict mode writes a
    link tree under its ``build/``), the .pth of each is put in an empty venv, and
    mypy type-checks a user's script against that venv's site-packages.
    """
    import setuptools.build_meta  # noqa: F401 - the backend the editable wheels come from

    project = tmp_path / "project"
    project.mkdir()
    for name in ("setup.cfg", "pyproject.toml", "README.md", "LICENSE", "MANIFEST.in"):
        shutil.copy(ROOT / name, project / name)
    shutil.copytree(
        ROOT / "backbeat_sync", project / "backbeat_sync", ignore=shutil.ignore_patterns("__pycache__")
    )
    script = tmp_path / "user.py"
    script.write_text(
        "from backbeat_sync import BackbeatConfig, Integration\n"
        "i = Integration(BackbeatConfig(nats_url='local://'), node_id='n')\n"
        "reveal_type(i.serve_metrics(0))\n",
        encoding="utf-8",
    )
    results = {}
    for mode in ("strict", "lenient"):
        wheels = tmp_path / f"wheels-{mode}"
        build = subprocess.run(
            [
                sys.executable,
                "-c",
                "import sys, setuptools.build_meta as b;"
                f" print(b.build_editable({str(wheels)!r}, config_settings={{'editable_mode': {mode!r}}}))",
            ],
            capture_output=True,
            text=True,
            timeout=300,
            cwd=project,
        )
        assert build.returncode == 0, build.stderr[-3000:]
        wheels.mkdir(exist_ok=True)
        (wheel,) = wheels.glob("*.whl")
        venv = tmp_path / f"venv-{mode}"
        subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
        site = next(venv.glob("lib/python*/site-packages"))
        with zipfile.ZipFile(wheel) as z:
            pth = next(n for n in z.namelist() if n.endswith(".pth"))
            z.extractall(site)
        results[mode] = (
            (site / pth).read_text(encoding="utf-8"),
            mypy(script, "--python-executable", str(venv / "bin" / "python"), cwd=tmp_path),
        )
    strict_pth, strict = results["strict"]
    assert not strict_pth.startswith("import")  # a plain path: what mypy reads
    assert "backbeat_sync.metrics.MetricsServer" in strict.stdout, strict.stdout
    assert "Cannot find implementation" not in strict.stdout
    lenient_pth, lenient = results["lenient"]
    assert lenient_pth.startswith("import")  # an import hook: what mypy cannot follow
    assert "Cannot find implementation or library stub" in lenient.stdout
