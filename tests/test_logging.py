"""Tests for backbeat_sync._logging: the three places lines go (nowhere, loguru, stdlib logging)."""

from __future__ import annotations

import logging
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator

import pytest
from loguru import logger as loguru_logger

from backbeat_sync import BackbeatConfig, Integration, log_to_stdlib, track_operation
from backbeat_sync._logging import LibraryLogger

from .support import PATIENCE, HandledBeats, ManualPulse, unique_bus, wait_until

SEED_LINES = (
    "🎵 CHORUS BACKBEAT integration started - cluster=test agent=agent-1",
    "🥁 BACKBEAT beat received - beat=5 phase=upbeat tempo=60 window=w-1",
    "🎼 BACKBEAT downbeat - new bar started - beat=8 window=w-2",
    "🧹 BACKBEAT operations cleanup check - active: 0",
    "🎵 CHORUS BACKBEAT integration stopped",
)


@pytest.fixture
def stdlib() -> Iterator[logging.Logger]:
    """Library lines routed to stdlib logging for one test, with the level reset after."""
    with log_to_stdlib() as handle:
        yield handle.logger
    logging.getLogger("backbeat_sync").setLevel(logging.NOTSET)


def run_agent(logger: object = None) -> None:
    """Start an integration on a manual bus, handle beats 5..8 (8 is a downbeat), stop."""
    bus = unique_bus()
    cfg = BackbeatConfig(cluster_id="test", agent_id="agent-1", nats_url=f"local://{bus}?pulse=manual")
    integration = Integration(cfg, node_id="node-1", logger=logger)
    pulse = ManualPulse(bus, "test", handled=HandledBeats(integration))
    with integration:
        for index in range(5, 9):
            pulse.beat(index)


def lines(caplog: pytest.LogCaptureFixture, name: str = "backbeat_sync") -> list[tuple[str, int, str]]:
    return [(r.name, r.levelno, r.getMessage()) for r in caplog.records if r.name.startswith(name)]


def test_seed_lines_reach_stdlib_logger_at_info(
    stdlib: logging.Logger, caplog: pytest.LogCaptureFixture
) -> None:
    """After log_to_stdlib(), the seed's started/beat/downbeat/clean-up/stopped lines are stdlib records."""
    caplog.set_level(logging.DEBUG)
    run_agent()
    got = lines(caplog)
    for seed_line in SEED_LINES:
        assert ("backbeat_sync.integration", logging.INFO, seed_line) in got
    started = next(
        r for r in caplog.records if r.getMessage().startswith("🎵 CHORUS BACKBEAT integration started")
    )
    assert started.backbeat == {"cluster": "test", "agent": "agent-1"}
    assert started.funcName == "start"  # attributed to the library's line, not to the adapter


def test_level_of_backbeat_sync_logger_controls_lines(
    stdlib: logging.Logger, caplog: pytest.LogCaptureFixture
) -> None:
    """logging.getLogger("backbeat_sync").setLevel(WARNING) drops the info lines and keeps warnings."""
    caplog.set_level(logging.DEBUG)
    logging.getLogger("backbeat_sync").setLevel(logging.WARNING)
    bus = unique_bus()
    cfg = BackbeatConfig(cluster_id="test", agent_id="agent-1", nats_url=f"local://{bus}?pulse=manual")
    with Integration(cfg, node_id="node-1") as integration:
        integration.start_p2p_operation("op-1", "election", 5)
    got = lines(caplog)
    assert not [g for g in got if g[1] < logging.WARNING]
    assert [g for g in got if g[1] == logging.WARNING and "active operation(s) failed" in g[2]]


def test_tracebacks_ride_as_exc_info(stdlib: logging.Logger, caplog: pytest.LogCaptureFixture) -> None:
    """A library warning with a traceback (an on_warning callback that raised) carries exc_info."""
    caplog.set_level(logging.DEBUG)
    bus = unique_bus()
    cfg = BackbeatConfig(cluster_id="test", agent_id="agent-1", nats_url=f"local://{bus}?pulse=manual")
    called = threading.Event()

    def on_warning(tracker: object, fraction: float) -> None:
        called.set()
        raise RuntimeError("user callback broke")

    integration = Integration(cfg, node_id="node-1")
    pulse = ManualPulse(bus, "test", handled=HandledBeats(integration))
    with integration:
        pulse.beat(1)
        with track_operation(
            "op-1",
            "election",
            beats=2,
            warn_at=(0.5,),
            on_warning=on_warning,
            on_exhaust="warn",
            integration=integration,
        ):
            pulse.beat(2)
            assert called.wait(PATIENCE)
        pulse.beat(3)

    def raised() -> list[logging.LogRecord]:
        return [r for r in caplog.records if "on_warning callback raised" in r.getMessage()]

    wait_until(lambda: bool(raised()), what="the callback's traceback")  # logged after the callback returns
    (record,) = raised()
    assert record.name.startswith("backbeat_sync.")
    assert record.levelno == logging.WARNING
    assert record.exc_info is not None
    assert isinstance(record.exc_info[1], RuntimeError)


def test_silent_by_default_and_after_close(caplog: pytest.LogCaptureFixture) -> None:
    """Without log_to_stdlib (or after closing it) no record reaches stdlib logging."""
    caplog.set_level(logging.DEBUG)
    run_agent()
    handle = log_to_stdlib()
    handle.close()
    handle.close()  # idempotent
    run_agent()
    assert lines(caplog) == []


def test_level_argument_sets_and_close_restores() -> None:
    """log_to_stdlib(level=...) sets the backbeat_sync logger's level; close() puts the old one back."""
    root = logging.getLogger("backbeat_sync")
    root.setLevel(logging.ERROR)
    try:
        with log_to_stdlib(level="debug"):
            assert root.level == logging.DEBUG
        assert root.level == logging.ERROR
    finally:
        root.setLevel(logging.NOTSET)
    with pytest.raises(TypeError, match="level must be"):
        log_to_stdlib(level=1.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        log_to_stdlib(level="loud")


def test_loguru_still_gets_lines_when_enabled() -> None:
    """The loguru choice is unchanged: logger.enable("backbeat_sync") plus a sink sees the seed lines."""
    seen: list[str] = []
    sink = loguru_logger.add(lambda m: seen.append(m.record["message"]), level="INFO")
    loguru_logger.enable("backbeat_sync")
    try:
        run_agent()
    finally:
        loguru_logger.disable("backbeat_sync")
        loguru_logger.remove(sink)
    for seed_line in SEED_LINES:
        assert seed_line in seen


def test_stdlib_logger_passed_as_logger_gets_every_level(caplog: pytest.LogCaptureFixture) -> None:
    """Integration(logger=a stdlib Logger) gets info, warning and debug lines, attributed to the library."""
    caplog.set_level(logging.DEBUG)
    run_agent(logger=logging.getLogger("myapp.backbeat"))
    got = lines(caplog, "myapp.backbeat")
    for seed_line in SEED_LINES:
        assert ("myapp.backbeat", logging.INFO, seed_line) in got
    assert [g for g in got if g[1] == logging.DEBUG and g[2].startswith("BACKBEAT connected")]
    started = next(r for r in caplog.records if r.getMessage().startswith("🎵"))
    assert started.funcName == "start"


def test_library_logger_formats_like_loguru(stdlib: logging.Logger, caplog: pytest.LogCaptureFixture) -> None:
    """The library logger's str.format arguments and bound fields reach the stdlib record."""
    caplog.set_level(logging.DEBUG)
    LibraryLogger().bind(pulse="c1").info("pulse {what} at {bpm:g}", what="runs", bpm=120.0)
    (record,) = [r for r in caplog.records if r.name == "backbeat_sync"]  # a caller outside the package
    assert record.getMessage() == "pulse runs at 120"
    assert record.backbeat == {"pulse": "c1"}


def test_stdlib_service_in_subprocess_gets_lines_once() -> None:
    """A stdlib-only service: lines on its handler, none on loguru's default stderr sink, level obeyed."""
    script = textwrap.dedent(
        """
        import logging, sys, threading
        logging.basicConfig(stream=sys.stdout, level=logging.INFO,
                            format="%(levelname)s %(name)s %(message)s")
        import backbeat_sync
        backbeat_sync.log_to_stdlib()
        cfg = backbeat_sync.BackbeatConfig(cluster_id="sub", agent_id="a-1", nats_url="local://sub",
                                           tempo_bpm=600, bar_length=2)
        i = backbeat_sync.Integration(cfg, node_id="n")
        bar = threading.Event()
        i.on_downbeat(lambda frame: bar.set())
        with i:
            assert bar.wait(30)
            logging.getLogger("backbeat_sync").setLevel(logging.WARNING)
            i.start_p2p_operation("op-1", "election", 5)
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True
    )
    assert (
        "INFO backbeat_sync.integration 🎵 CHORUS BACKBEAT integration started - cluster=sub agent=a-1"
        in out.stdout
    )
    assert "INFO backbeat_sync.integration 🎼 BACKBEAT downbeat - new bar started" in out.stdout
    assert "WARNING backbeat_sync.integration BACKBEAT stop: 1 active operation(s) failed" in out.stdout
    assert "🎵 CHORUS BACKBEAT integration stopped" not in out.stdout  # info, after setLevel(WARNING)
    assert "BACKBEAT" not in out.stderr  # loguru's default sink printed nothing
