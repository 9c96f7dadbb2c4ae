"""Tests for backbeat_sync.cli: every command through main(argv) and as a subprocess."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

from backbeat_sync import BackbeatConfig, BeatFrame, Integration, OperationPhase, StatusClaim
from backbeat_sync.cli import ClusterView, main, render_view
from backbeat_sync.pulse import Pulse

from .natsserver import TOKEN, AsyncRunner, NatsServer, Witness, free_port
from .support import PATIENCE, ManualPulse, unique_bus, wait_until

COMMANDS = ("demo", "pulse", "monitor", "status", "tempo", "streams")
SENT_AT = "2026-11-28T01:00:00.000Z"


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No CHORUS_BACKBEAT_* variable from the caller's shell leaks into a test."""
    for name in list(os.environ):
        if name.startswith("CHORUS_BACKBEAT_"):
            monkeypatch.delenv(name)


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """main(argv) -> (exit code, stdout, stderr)."""
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def cli_env(**extra: str) -> dict[str, str]:
    """The environment for a subprocess: ours without CHORUS_BACKBEAT_*, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CHORUS_BACKBEAT_")}
    env.update(extra)
    return env


def cli(*args: str) -> list[str]:
    """The argv of ``python -m backbeat_sync ARGS`` (the console script's twin)."""
    return [sys.executable, "-m", "backbeat_sync", *args]


def frame(index: int, *, cluster: str = "c", tempo: float = 600, bar: int = 4) -> BeatFrame:
    """A beat frame as our pulse makes it."""
    return BeatFrame(
        cluster_id=cluster,
        beat_index=index,
        downbeat=index % bar == 0,
        phase="downbeat" if index % bar == 0 else "upbeat",
        tempo_bpm=tempo,
        window_id=f"w-{index // bar}",
        bar_length=bar,
    )


def claim(
    task: str, beat: int, state: str = "executing", phase: str | None = "started", **kw: Any
) -> StatusClaim:
    """A status claim from agent ``a1`` of cluster ``c``."""
    fields: dict[str, Any] = {
        "cluster_id": "c",
        "agent_id": "a1",
        "node_id": "n1",
        "task_id": task,
        "beat_index": beat,
        "state": state,
        "beats_left": 3,
        "progress": 0.25,
        "notes": f"P2P election: {phase} (peers: 0, node: n1)",
        "sent_at": SENT_AT,
        "operation_type": "election",
        "phase": phase,
        "peer_count": 0,
    }
    fields.update(kw)
    return StatusClaim(**fields)


def assert_one_line_error(err: str, *needles: str) -> None:
    """stderr is one line, no traceback, and names what was wrong."""
    assert err.endswith("\n")
    assert err.count("\n") == 1, err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in err


# -- help, version and usage errors ---------------------------------------------------------


def test_top_level_help_lists_every_command(capsys: pytest.CaptureFixture[str]) -> None:
    """--help exits 0 and names the four commands and the first step."""
    code, out, _ = run(["--help"], capsys)
    assert code == 0
    for command in COMMANDS:
        assert command in out
    assert "backbeat-sync demo" in out


@pytest.mark.parametrize("command", COMMANDS)
def test_each_command_has_help_with_examples(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    """Every command's --help exits 0 and shows examples and the shared flags."""
    code, out, _ = run([command, "--help"], capsys)
    assert code == 0
    assert "examples:" in out
    assert f"backbeat-sync {command}" in out
    for flag in ("--nats", "--cluster", "--verbose", "--plain", "--connect-timeout"):
        assert flag in out


def test_the_parser_has_exactly_the_registered_commands() -> None:
    """build_parser() takes its commands from the one registry, in its order, each with its flags."""
    from backbeat_sync.cli import build_parser
    from backbeat_sync.cli._registry import COMMANDS as REGISTERED

    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    choices = list(sub.choices or ())
    assert choices == [c.name for c in REGISTERED]
    assert set(COMMANDS) <= set(choices)


def test_cli_modules_are_each_readable_in_one_sitting() -> None:
    """The cli package is split by concern: no module of it is 800 lines or more."""
    import backbeat_sync.cli

    package = Path(backbeat_sync.cli.__file__).parent
    sizes = {p.name: len(p.read_text(encoding="utf-8").splitlines()) for p in package.glob("*.py")}
    assert len(sizes) >= 5
    assert {name: n for name, n in sizes.items() if n >= 800} == {}


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    """--version prints the package version."""
    import backbeat_sync

    code, out, _ = run(["--version"], capsys)
    assert code == 0
    assert out.strip() == f"backbeat-sync {backbeat_sync.__version__}"


@pytest.mark.parametrize(
    ("argv", "needles"),
    [
        ([], ("COMMAND",)),
        (["dance"], ("invalid choice", "dance")),
        (["demo", "--bars", "0"], ("--bars", "'0'")),
        (["demo", "--bars", "many"], ("--bars", "integer")),
        (["demo", "--tempo", "0"], ("--tempo", "6000")),
        (["demo", "--tempo", "nan"], ("--tempo",)),
        (["pulse", "--tempo", "7000"], ("--tempo", "7000")),
        (["pulse", "--bar", "-1"], ("--bar",)),
        (["demo", "--metrics-port", "70000"], ("--metrics-port", "65535")),
        (["status", "--timeout", "-1"], ("--timeout",)),
        (["status", "--frobnicate"], ("unrecognized arguments", "--frobnicate")),
        (["status", "--nats", "foo://x"], ("nats_url", "unknown scheme 'foo'")),
        (["status", "--nats", "nats://u:hunter2@h:99999"], ("nats_url", "Port out of range")),
        (["status", "--cluster", "a.b"], ("cluster_id", "single NATS subject token")),
        (["status", "--connect-timeout", "0", "--nats", "nats://127.0.0.1:1"], ("connect_timeout",)),
        (["pulse", "--nats", "local://"], ("--nats nats://",)),
        (["monitor", "--nats", "local://"], ("--nats nats://",)),
        (["monitor", "--state", "zombie", "--nats", "nats://127.0.0.1:1"], ("--state", "'zombie'", "stale")),
        (["monitor", "--stale-beats", "0"], ("--stale-beats",)),
        (["status", "--max-age", "0"], ("--max-age",)),
    ],
)
def test_user_errors_are_one_line_and_exit_2(
    argv: list[str], needles: tuple[str, ...], capsys: pytest.CaptureFixture[str]
) -> None:
    """A bad command, flag or value: exit 2, one line on stderr naming it, nothing on stdout."""
    code, out, err = run(argv, capsys)
    assert code == 2
    assert out == ""
    assert_one_line_error(err, *needles)
    assert "hunter2" not in err


def test_demo_metrics_port_without_prometheus_names_the_extra(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """demo --metrics-port without prometheus-client: exit 2, one line naming the extra, no traceback."""
    monkeypatch.setitem(sys.modules, "prometheus_client", None)
    code, out, err = run(["demo", "--metrics-port", "0", "--bars", "1", "--tempo", "6000"], capsys)
    assert code == 2
    assert out == ""
    assert_one_line_error(
        err, "--metrics-port needs prometheus_client", "pip install 'backbeat_sync[prometheus]'"
    )


def test_signing_without_cryptography_names_the_extra(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """pulse with CHORUS_BACKBEAT_SIGNING_KEY but no cryptography: exit 2, one line naming the extra."""
    from backbeat_sync.signing import SigningKey, generate_private_key

    private = generate_private_key()
    SigningKey.load(private)  # cryptography is here; now hide it
    monkeypatch.setenv("CHORUS_BACKBEAT_SIGNING_KEY", private)
    for name in [m for m in sys.modules if m == "cryptography" or m.startswith("cryptography.")]:
        monkeypatch.setitem(sys.modules, name, None)
    code, _, err = run(["pulse", "--nats", "nats://127.0.0.1:1"], capsys)
    assert code == 2
    assert_one_line_error(err, "pip install 'backbeat_sync[signing]'")


def test_a_library_import_error_is_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """An ImportError raised by the library inside a command (an extra it needs) is one line, exit 2."""
    from backbeat_sync.cli import _registry

    def needs_extra(args: Any, out: Any) -> int:
        raise ImportError("this needs the frobnicate extra: pip install 'backbeat_sync[frob]'")

    import attrs

    patched = tuple(attrs.evolve(c, run=needs_extra) if c.name == "status" else c for c in _registry.COMMANDS)
    monkeypatch.setattr("backbeat_sync.cli.COMMANDS", patched)
    code, _, err = run(["status"], capsys)
    assert code == 2
    assert_one_line_error(err, "backbeat-sync status: error: this needs the frobnicate extra")


def test_a_bad_environment_variable_is_named(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A CHORUS_BACKBEAT_* value that cannot be used: exit 2, the variable named."""
    monkeypatch.setenv("CHORUS_BACKBEAT_TEMPO_BPM", "fast")
    code, _, err = run(["status"], capsys)
    assert code == 2
    assert_one_line_error(err, "CHORUS_BACKBEAT_TEMPO_BPM", "fast")


def status_json(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, dict[str, Any], str]:
    """main(["status", "--json", *argv]) -> (exit code, the verdict, stderr)."""
    code, out, err = run(["status", "--json", *argv], capsys)
    assert out.count("\n") == 1, out  # one JSON object, one line
    return code, json.loads(out), err


def test_status_disabled_prints_the_hap_line_and_exits_1(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """CHORUS_BACKBEAT_ENABLED=false: the seed's '❌ Disabled' line, exit 1; JSON reason 'disabled'."""
    monkeypatch.setenv("CHORUS_BACKBEAT_ENABLED", "false")
    code, out, _ = run(["status"], capsys)
    assert code == 1
    assert out.splitlines()[0] == "BACKBEAT: ❌ Disabled"
    code, report, _ = status_json([], capsys)
    assert (code, report["ok"], report["reason"], report["status"]) == (1, False, "disabled", "disabled")


def test_status_on_the_in_process_pulse_is_ok_at_once(capsys: pytest.CaptureFixture[str]) -> None:
    """status on local:// joins the in-process pulse, whose first beat is immediate: ok, exit 0.

    At the default 2 BPM: the probe must not wait for a second beat (30 s later).
    """
    code, out, err = run(["status", "--nats", f"local://{unique_bus()}", "--cluster", "st"], capsys)
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0] == "BACKBEAT: ✅ Connected"
    assert "  ok: true" in lines
    assert "  cluster_id: st" in lines
    assert "  current_tempo: 2" in lines
    code, report, _ = status_json(["--nats", f"local://{unique_bus()}"], capsys)
    assert code == 0
    assert (report["ok"], report["reason"], report["status"]) == (True, None, "connected")
    assert report["beat"]["tempo_bpm"] == 2
    assert report["waited_seconds"] < 25  # the next beat at 2 BPM would be 30 s away


def manual_bus_status(
    argv: list[str], publish: Callable[[ManualPulse], None], monkeypatch: pytest.MonkeyPatch
) -> tuple[int, dict[str, Any], str, bool]:
    """``status --json`` on a hand-driven bus at 1 BPM (a 2-minute wait); ``publish`` once it listens.

    Returns (exit code, verdict, stderr, whether it was still waiting when ``publish`` was called).
    """
    monkeypatch.setenv("CHORUS_BACKBEAT_TEMPO_BPM", "1")
    pulse = ManualPulse(unique_bus(), "mb", tempo_bpm=600)
    result: dict[str, Any] = {}
    stdout, stderr = io.StringIO(), io.StringIO()

    def probe() -> None:
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            result["code"] = main(
                [
                    "status",
                    "--json",
                    "--nats",
                    f"local://{pulse.bus.name}?pulse=manual",
                    "--cluster",
                    "mb",
                    *argv,
                ]
            )

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    wait_until(lambda: pulse.bus.has_subscribers(pulse.subject), what="the probe's subscription")
    waiting = thread.is_alive()
    publish(pulse)
    thread.join(PATIENCE)
    assert not thread.is_alive(), "status did not return after the beat"
    return result["code"], json.loads(stdout.getvalue()), stderr.getvalue(), waiting


def test_status_waits_at_least_a_second_at_a_fast_tempo(monkeypatch: pytest.MonkeyPatch) -> None:
    """At 6000 BPM two beats are 20 ms: the default wait is still 1 s, so a beat 0.3 s late counts."""
    monkeypatch.setenv("CHORUS_BACKBEAT_TEMPO_BPM", "6000")
    pulse = ManualPulse(unique_bus(), "fast", tempo_bpm=6000)
    result: dict[str, Any] = {}
    stdout = io.StringIO()

    def probe() -> None:
        with contextlib.redirect_stdout(stdout):
            url = f"local://{pulse.bus.name}?pulse=manual"
            result["code"] = main(["status", "--json", "--nats", url, "--cluster", "fast"])

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    wait_until(lambda: pulse.bus.has_subscribers(pulse.subject), what="the probe's subscription")
    time.sleep(0.3)  # the test's point: a delay longer than two beats, shorter than the floor
    pulse.beat(1)
    thread.join(PATIENCE)
    assert not thread.is_alive()
    report = json.loads(stdout.getvalue())
    assert (result["code"], report["ok"]) == (0, True), report


def test_status_returns_as_soon_as_one_beat_arrives(monkeypatch: pytest.MonkeyPatch) -> None:
    """The probe waits (up to 2 beats at 1 BPM: 120 s) and returns at the first beat: ok, exit 0."""

    def beat(pulse: ManualPulse) -> None:
        sent = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"
        pulse.bus.publish(pulse.subject, pulse.frame(7, sent_at=sent).encode())

    code, report, err, waiting = manual_bus_status([], beat, monkeypatch)
    assert waiting
    assert code == 0, err
    assert report["ok"] is True
    assert report["beat"]["beat_index"] == 7
    assert report["max_age_beats"] == 2.0
    assert report["beat_age_seconds"] < PATIENCE


def test_status_a_beat_older_than_max_age_is_degraded(monkeypatch: pytest.MonkeyPatch) -> None:
    """A frame sent 60 s before it arrived, at 600 BPM (600 beats), with --max-age 3: degraded, exit 1."""

    def old_beat(pulse: ManualPulse) -> None:
        sent = time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime(time.time() - 60))
        pulse.bus.publish(pulse.subject, pulse.frame(9, sent_at=sent).encode())

    code, report, err, _ = manual_bus_status(["--max-age", "3"], old_beat, monkeypatch)
    assert code == 1
    assert (report["ok"], report["reason"]) == (False, "degraded")
    assert report["beat_age_beats"] > 500
    assert_one_line_error(err, "beat 9 arrived", "more than 3 beats at 600 BPM")


def test_status_only_rejected_frames_is_degraded(monkeypatch: pytest.MonkeyPatch) -> None:
    """Frames arrive but break the protocol: not 'no_beat' but 'degraded', with the count and the cause."""

    def junk(pulse: ManualPulse) -> None:
        pulse.bus.publish(pulse.subject, b'{"type": "backbeat.beatframe.v1"}')

    code, report, err, _ = manual_bus_status(["--timeout", "0.5"], junk, monkeypatch)
    assert code == 1
    assert (report["reason"], report["rejected_frames"]) == ("degraded", 1)
    assert_one_line_error(err, "1 frame(s) on backbeat.beat.mb rejected", "missing required field")


def test_status_no_beat_in_time(monkeypatch: pytest.MonkeyPatch) -> None:
    """Nothing on the subject within --timeout: reason no_beat, exit 1, one line on stderr."""
    code, report, err, _ = manual_bus_status(["--timeout", "0.2"], lambda p: None, monkeypatch)
    assert code == 1
    assert (report["ok"], report["reason"], report["beat"]) == (False, "no_beat", None)
    assert_one_line_error(err, "no beat on backbeat.beat.mb within 0.2 s")


def test_status_frames_of_another_cluster_do_not_count(monkeypatch: pytest.MonkeyPatch) -> None:
    """A frame for another cluster on the subject is ignored (no_beat), not a verdict on ours."""

    def foreign(pulse: ManualPulse) -> None:
        other = ManualPulse(pulse.bus.name, "other", tempo_bpm=600)
        pulse.bus.publish(pulse.subject, other.frame(3).encode())

    code, report, _, _ = manual_bus_status(["--timeout", "0.3"], foreign, monkeypatch)
    assert (code, report["reason"], report["rejected_frames"]) == (1, "no_beat", 0)


def test_verbose_logs_to_stderr_and_logging_is_restored_after_main(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """-v shows the library's info lines on stderr; afterwards backbeat_sync is silent again."""
    from loguru import logger

    monkeypatch.setenv("CHORUS_BACKBEAT_TEMPO_BPM", "3000")

    code, _, err = run(["status", "-v", "--nats", f"local://{unique_bus()}"], capsys)
    assert code == 0
    assert "status: listening on backbeat.beat.chorus-production" in err
    seen: list[str] = []
    sink = logger.add(seen.append, level="DEBUG")
    try:
        with Integration(BackbeatConfig(nats_url=f"local://{unique_bus()}"), node_id="n"):
            pass
    finally:
        logger.remove(sink)
    assert seen == []


# -- the cluster view -------------------------------------------------------------------------


def test_cluster_view_snapshot_has_the_beat_and_the_tasks() -> None:
    """Frames give the beat, bar and tempo; claims give one row per agent and task."""
    view = ClusterView()
    view.frame(frame(40), arrival=100.0)
    view.frame(frame(41), arrival=100.1)
    view.claim(claim("election-1", 41, phase="negotiating", peer_count=3))
    view.claim(claim("chorus-p2p-health", 41, state="waiting", phase=None, notes="CHORUS P2P healthy: ..."))
    snap = view.snapshot()
    assert snap["clusters"] == [
        {
            "cluster_id": "c",
            "current_beat": 41,
            "bar": 10,
            "beat_in_bar": 2,
            "bar_length": 4,
            "tempo_bpm": 600,
            "measured_bpm": 600.0,
            "tempo_drift": "acceptable",
            "window_id": "w-10",
            "seconds_since_beat": snap["clusters"][0]["seconds_since_beat"],
        }
    ]
    assert [
        (t["agent_id"], t["task_id"], t["state"], t["phase"], t["peer_count"]) for t in snap["tasks"]
    ] == [("a1", "election-1", "executing", "negotiating", 3)]
    assert [(a["agent_id"], a["health"]) for a in snap["agents"]] == [("a1", "waiting")]
    assert json.loads(json.dumps(snap)) == snap


def test_finished_tasks_fade_after_a_bar() -> None:
    """A done task stays visible for one bar after it finished, then leaves the snapshot."""
    view = ClusterView()
    view.frame(frame(8))
    view.claim(claim("t", 8, state="done", phase="completed", beats_left=0, progress=1.0))
    for index in range(9, 13):
        view.frame(frame(index))
        assert [t["task_id"] for t in view.snapshot()["tasks"]] == ["t"]
    view.frame(frame(13))
    assert view.snapshot()["tasks"] == []


def test_cluster_filter_and_invalid_messages() -> None:
    """Messages of other clusters are ignored; bytes that break the contract are counted."""
    view = ClusterView("c")
    view.feed(frame(1, cluster="other").encode())
    view.feed(claim("x", 1, cluster_id="other").encode())
    view.feed(b"not json")
    view.feed(b'{"type": "backbeat.beatframe.v1"}')
    view.feed(frame(1).encode())
    snap = view.snapshot()
    assert [c["cluster_id"] for c in snap["clusters"]] == ["c"]
    assert snap["tasks"] == []
    assert snap["invalid_messages"] == 2
    assert snap["messages"] == 1


def test_plain_lines_report_changes_not_repeats() -> None:
    """A line per downbeat and per task change; the per-beat repeat of a claim prints nothing."""
    view = ClusterView()
    assert view.frame(frame(4))[0].startswith("c: bar 1 beat 4 tempo 600 BPM")
    assert view.frame(frame(5)) == []
    first = view.claim(claim("e", 5))
    assert first == ["  beat 5 a1/e executing:started 25% 3 beats left peers 0"]
    assert view.claim(claim("e", 6, beats_left=2, progress=0.5)) == []
    warned = view.claim(claim("e", 6, notes="beat budget warning: 75% used, 1 beats left"))
    assert warned[0].endswith("- beat budget warning: 75% used, 1 beats left")
    failed = view.claim(
        claim("e", 7, state="failed", phase="failed", notes="P2P operation failed: x (type: election)")
    )
    assert failed == ["  beat 7 a1/e failed:failed - P2P operation failed: x (type: election)"]


def test_rich_view_renders_beat_tasks_and_progress() -> None:
    """The rich panel shows the cluster's beat and drift and each task with its progress bar."""
    view = ClusterView()
    view.frame(frame(41), arrival=1.0)
    view.claim(claim("dht-store-k", 41, phase="executing"))
    console = Console(file=io.StringIO(), force_terminal=True, width=140, color_system=None)
    console.print(render_view(view.snapshot(), title="T", footer="the footer"))
    text = console.file.getvalue()  # type: ignore[attr-defined]
    for needle in ("beat 41", "bar 10", "tempo 600 BPM", "dht-store-k", "executing", "the footer", "██░"):
        assert needle in text


class FakeClock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_tasks_and_agents_sort_naturally() -> None:
    """Numbers inside ids sort by value: peer-discovery-8 before -12, worker-2 before worker-10."""
    view = ClusterView()
    view.frame(frame(1))
    for agent, task in [
        ("worker-10", "t"),
        ("worker-2", "peer-discovery-12"),
        ("worker-2", "peer-discovery-8"),
    ]:
        view.claim(claim(task, 1, agent_id=agent))
    snap = view.snapshot()
    assert [(t["agent_id"], t["task_id"]) for t in snap["tasks"]] == [
        ("worker-2", "peer-discovery-8"),
        ("worker-2", "peer-discovery-12"),
        ("worker-10", "t"),
    ]
    assert [a["agent_id"] for a in snap["agents"]] == ["worker-2", "worker-10"]


def test_a_silent_agent_goes_stale_then_is_dropped() -> None:
    """No claim for --stale-beats beats: stale (its tasks too); at twice that: dropped with its tasks."""
    clock = FakeClock()
    view = ClusterView(stale_beats=16, clock=clock)
    view.frame(frame(1, tempo=60))
    view.claim(claim("election-1", 1))
    view.claim(claim("e2", 1, agent_id="a2"))
    clock.now += 15.5  # 15.5 beats at 60 BPM
    view.claim(claim("e2", 16, agent_id="a2"))  # a2 keeps talking
    assert view.sweep() == []
    clock.now += 0.5
    events = view.sweep()
    assert [(e["change"], e["agent_id"]) for e in events] == [("stale", "a1")]
    assert view.sweep() == []  # said once
    snap = view.snapshot()
    assert [(a["agent_id"], a["stale"]) for a in snap["agents"]] == [("a1", True), ("a2", False)]
    assert [(t["task_id"], t["state"], t["stale"]) for t in snap["tasks"]] == [
        ("election-1", "executing", True),
        ("e2", "executing", False),
    ]
    assert snap["task_counts"] == {"executing": 1, "stale": 1}
    clock.now += 16.0
    lines = view.frame(frame(2, tempo=60))  # a frame sweeps too; a2 has been silent 16.5 beats: stale
    assert lines == ["c/a1: dropped, no claim for 32 beats", "c/a2: stale, no claim for 16.5 beats"]
    snap = view.snapshot()
    assert [a["agent_id"] for a in snap["agents"]] == ["a2"]
    assert [t["task_id"] for t in snap["tasks"]] == ["e2"]
    assert view.claim(claim("e2", 40, agent_id="a2")) == ["c/a2: back after 16.5 silent beats"]


def test_silence_is_counted_at_the_default_tempo_before_any_frame() -> None:
    """Without a beat frame (claims only), beats of silence use default_tempo."""
    clock = FakeClock()
    view = ClusterView(stale_beats=4, default_tempo=2.0, clock=clock)
    view.claim(claim("x", 1))
    clock.now += 119.0  # 3.97 beats at 2 BPM
    assert view.sweep() == []
    clock.now += 1.0
    assert [e["change"] for e in view.sweep()] == ["stale"]


def test_view_filters_agents_types_states_and_done() -> None:
    """--agent globs, --type, --state (stale included) and --hide-done; the rest is counted as hidden."""
    from backbeat_sync.cli._view import ViewFilter

    clock = FakeClock()
    view = ClusterView(stale_beats=4, clock=clock)
    view.frame(frame(1, tempo=60))
    view.claim(claim("old", 1, agent_id="ghost-1"))
    clock.now += 5
    view.sweep()
    view.claim(claim("e1", 5, agent_id="worker-1"))
    view.claim(
        claim("d1", 5, agent_id="worker-1", operation_type="dht_store", state="done", phase="completed")
    )
    view.claim(claim("f1", 5, agent_id="worker-2", state="failed", phase="failed"))

    def shown(**kw: Any) -> list[str]:
        snap = view.snapshot(ViewFilter(**kw))
        assert snap["hidden_tasks"] == 4 - len(snap["tasks"])
        return [t["task_id"] for t in snap["tasks"]]

    assert shown() == ["old", "d1", "e1", "f1"]
    assert shown(agents=("worker-*",)) == ["d1", "e1", "f1"]
    assert shown(types=("dht_store",)) == ["d1"]
    assert shown(states=("stale", "failed")) == ["old", "f1"]
    assert shown(states=("executing",)) == ["e1"]  # a stale agent's executing task is 'stale'
    assert shown(hide_done=True) == ["old", "e1", "f1"]
    agents = view.snapshot(ViewFilter(agents=("worker-2",)))["agents"]
    assert [a["agent_id"] for a in agents] == ["worker-2"]


def test_events_are_json_with_a_kind_and_a_change() -> None:
    """feed_events: a beat event per accepted frame, task events with their change, agent health events."""
    view = ClusterView()
    events = view.feed_events(frame(5).encode())
    assert [(e["event"], e["current_beat"], e["downbeat"]) for e in events] == [("beat", 5, False)]
    assert view.feed_events(frame(5).encode()) == []  # stale frame: nothing happened
    (task,) = view.feed_events(claim("e", 5).encode())
    assert (task["event"], task["change"], task["task_id"], task["stale"]) == ("task", "new", "e", False)
    (task,) = view.feed_events(claim("e", 6, phase="negotiating").encode())
    assert task["change"] == "phase"
    health = claim("chorus-p2p-health", 6, state="waiting", phase=None, notes="CHORUS P2P healthy: ...")
    (agent,) = view.feed_events(health.encode())
    assert (agent["event"], agent["change"], agent["health"]) == ("agent", "health", "waiting")
    assert view.feed_events(b"junk") == []
    for event in [*events, task, agent]:
        assert json.loads(json.dumps(event)) == event


def test_a_cropped_view_says_how_many_more_and_keeps_the_agents() -> None:
    """60 tasks in a 24-line terminal: rows that fit, '… N more', a summary line, the agents table."""
    view = ClusterView()
    view.frame(frame(41), arrival=1.0)
    for n in range(60):
        view.claim(
            claim(f"task-{n}", 41, agent_id=f"worker-{n % 3}", state="done" if n % 10 == 0 else "executing")
        )
    for n in range(3):
        view.claim(claim("chorus-p2p-health", 41, agent_id=f"worker-{n}", state="executing", phase=None))
    console = Console(file=io.StringIO(), force_terminal=True, width=140, height=24, color_system=None)
    console.print(render_view(view.snapshot(), title="T", footer="the footer", height=24))
    text = console.file.getvalue()  # type: ignore[attr-defined]
    lines = text.splitlines()
    assert len(lines) <= 24, text
    more = [line for line in lines if "more" in line and "…" in line]
    assert len(more) == 1, text
    shown = sum(1 for line in lines if " task-" in line)
    assert f"… {60 - shown} more" in more[0]
    assert "60 tasks: 54 executing, 6 done" in text
    assert "--hide-done" in text
    for n in range(3):
        assert f"worker-{n}  " in text  # the agents table is still there
    assert "the footer" in text


# -- the demo ---------------------------------------------------------------------------------


def demo_available() -> bool:
    """Whether the budget engine (beat_budget, track_operation) has landed."""
    import backbeat_sync

    return hasattr(backbeat_sync, "beat_budget") and hasattr(backbeat_sync, "track_operation")


needs_budget = pytest.mark.skipif(not demo_available(), reason="backbeat_sync.beat_budget not there yet")


@needs_budget
def test_demo_runs_the_four_flows_and_stops_the_overrun(capsys: pytest.CaptureFixture[str]) -> None:
    """One bar of the demo: election, DHT store and PubSub done; peer discovery stopped; exit 0."""
    code, out, err = run(["demo", "--bars", "1", "--tempo", "600"], capsys)
    assert code == 0, err
    rows = {line.split()[0]: line.split() for line in out.splitlines() if line.split()[:1]}
    # flow  API...  budget  runs  done  stopped  failed  mean
    assert rows["election"][-5:-1] == ["1", "1", "0", "0"]
    assert rows["dht_store"][-5:-1] == ["1", "1", "0", "0"]
    assert rows["pubsub_sync"][-5:-1] == ["1", "1", "0", "0"]
    assert rows["peer_discovery"][-5:-1] == ["1", "0", "1", "0"]
    assert "stopped by their budget" in out
    assert "a1/" not in out
    assert "demo-agent/election-1 executing:connecting" in out
    assert "Traceback" not in err


@needs_budget
def test_demo_as_a_subprocess_ends_by_itself(tmp_path: Path) -> None:
    """`python -m backbeat_sync demo --bars 2` exits 0 by itself, quickly, with the summary."""
    started = time.monotonic()
    proc = subprocess.run(
        cli("demo", "--bars", "2", "--tempo", "1200"),
        capture_output=True,
        text=True,
        timeout=60,
        env=cli_env(),
        cwd=tmp_path,
    )
    took = time.monotonic() - started
    assert proc.returncode == 0, proc.stderr
    assert "Operations" in proc.stdout
    assert "Traceback" not in proc.stderr
    assert took < 30  # 2 bars at 1200 BPM: well under the 60 s the subprocess is allowed


@needs_budget
def test_demo_metrics_port_serves_counters_that_move(tmp_path: Path) -> None:
    """demo --metrics-port: scraping during the run shows beats and claims going up.

    The demo is given far more bars than the test needs (so a slow machine cannot end it
    before the second scrape) and is stopped with SIGTERM afterwards: exit 130, interrupted.
    """
    from prometheus_client.parser import text_string_to_metric_families

    port = free_port()
    url = f"http://127.0.0.1:{port}/metrics"

    def scrape() -> dict[str, float]:
        import urllib.request

        with urllib.request.urlopen(url, timeout=2) as response:
            text = response.read().decode()
        return {
            s.name: s.value
            for f in text_string_to_metric_families(text)
            for s in f.samples
            if s.labels.get("agent_id") == "demo-agent"
        }

    def scrape_or_empty() -> dict[str, float]:
        try:
            return scrape()
        except OSError:
            return {}

    proc = subprocess.Popen(
        cli("demo", "--bars", "100", "--tempo", "600", "--metrics-port", str(port)),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=cli_env(),
        cwd=tmp_path,
    )
    try:
        wait_until(lambda: scrape_or_empty().get("backbeat_beats_received_total", 0) >= 1)
        first = scrape()
        wait_until(
            lambda: (
                scrape_or_empty().get("backbeat_beats_received_total", 0)
                >= first["backbeat_beats_received_total"] + 3
            ),
        )
        second = scrape()
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 130, err  # interrupted, as documented
    assert "Traceback" not in err
    assert f"metrics: http://127.0.0.1:{port}/metrics" in out
    assert second["backbeat_claims_emitted_total"] > first["backbeat_claims_emitted_total"]
    assert second["backbeat_beat_handling_seconds_count"] > first["backbeat_beat_handling_seconds_count"]


def test_console_script_and_module_entry_points(tmp_path: Path) -> None:
    """`backbeat-sync --help` and `python -m backbeat_sync --help` both work as installed."""
    script = Path(sys.executable).with_name("backbeat-sync")
    assert script.exists()
    for argv in ([str(script), "--help"], cli("--help")):
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=30, env=cli_env(), cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr
        assert "backbeat-sync demo" in proc.stdout


def test_subprocess_user_error_is_one_line(tmp_path: Path) -> None:
    """As a process too, a bad flag gives exit 2 and one line on stderr, no traceback."""
    proc = subprocess.run(
        cli("demo", "--tempo", "fast"),
        capture_output=True,
        text=True,
        timeout=30,
        env=cli_env(),
        cwd=tmp_path,
    )
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert_one_line_error(proc.stderr, "--tempo", "fast")


# -- against a real nats-server ---------------------------------------------------------------


@pytest.fixture
def running_pulse(nats_server: NatsServer) -> Iterator[Pulse]:
    """Our Pulse at 1200 BPM for cluster 'c' on the test server."""
    cfg = BackbeatConfig(cluster_id="c", agent_id="pulse", nats_url=nats_server.url)
    with Pulse(cfg, tempo_bpm=1200, bar_length=4) as pulse:
        yield pulse


@pytest.mark.nats
def test_status_against_a_server_with_a_pulse_publishes_no_claim(
    nats_server: NatsServer,
    running_pulse: Pulse,
    nats_runner: AsyncRunner,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A pulse beats: ok, exit 0, the pulse's tempo; the probe published one message only, the
    empty request on the last-beat subject (no claim: nothing on backbeat.status.>)."""
    claims = Witness(nats_runner, nats_server.url, "backbeat.status.>")
    asks = Witness(nats_runner, nats_server.url, "backbeat.pulse.c.last")
    code, report, err = status_json(["--nats", nats_server.url, "--cluster", "c"], capsys)
    assert code == 0, err
    assert (report["ok"], report["reason"], report["status"]) == (True, None, "connected")
    assert report["beat"]["tempo_bpm"] == 1200
    closed = nats_server.monitor("connz?state=closed")["connections"]
    probes = [c for c in closed if c.get("name") == "backbeat-sync-status"]
    assert len(probes) == 1, closed
    assert probes[0]["in_msgs"] == 1  # messages the client published: the one request
    assert probes[0]["out_msgs"] >= 1  # the answer (and any beat it received)
    wait_until(lambda: len(asks.messages) >= 1, what="the request at the witness")
    assert asks.messages == [b""]
    assert claims.messages == []
    claims.close()
    asks.close()


@pytest.mark.nats
def test_status_connected_but_no_beat_exits_1(
    nats_server: NatsServer, capsys: pytest.CaptureFixture[str]
) -> None:
    """A server without a pulse for the cluster: '✅ Connected', exit 1, a line saying no beat came."""
    code, out, err = run(
        ["status", "--nats", nats_server.url, "--cluster", "quiet", "--timeout", "0.3"], capsys
    )
    assert code == 1
    assert out.splitlines()[:4] == [
        "BACKBEAT: ✅ Connected",
        "  ok: false",
        "  reason: no_beat",
        "  detail: no beat on backbeat.beat.quiet within 0.3 s",
    ]
    assert_one_line_error(err, "no beat on backbeat.beat.quiet")


@pytest.mark.nats
def test_status_unreachable_server_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    """Nobody at that port: '⚠️ Disconnected', exit 2, one line naming the server."""
    url = f"nats://127.0.0.1:{free_port()}"
    code, out, err = run(["status", "--nats", url, "--connect-timeout", "0.5"], capsys)
    assert code == 2
    assert out.splitlines()[:3] == ["BACKBEAT: ⚠️ Disconnected", "  ok: false", "  reason: unreachable"]
    assert_one_line_error(err, url, "cannot connect")
    code, report, err = status_json(["--nats", url, "--connect-timeout", "0.5"], capsys)
    assert (code, report["ok"], report["reason"]) == (2, False, "unreachable")
    assert_one_line_error(err, url, "cannot connect")


@pytest.mark.nats
@pytest.mark.parametrize("command", ["status", "monitor", "pulse"])
def test_wrong_credentials_exit_2(
    command: str, nats_server_token: NatsServer, capsys: pytest.CaptureFixture[str]
) -> None:
    """A server that wants a token, given a wrong one: exit 2, 'authorization violation', no secret."""
    url = f"nats://wrong-token@127.0.0.1:{nats_server_token.port}"
    code, _, err = run([command, "--nats", url, "--connect-timeout", "2"], capsys)
    assert code == 2
    assert_one_line_error(err, "authorization violation")
    assert "wrong-token" not in err
    assert TOKEN not in err


@pytest.mark.nats
def test_pulse_runs_for_n_beats(
    nats_server: NatsServer,
    nats_runner: AsyncRunner,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """pulse --beats 6 publishes exactly six frames, prints a line per downbeat, exits 0.

    The CLI's stop() is made late by ten beats (a loaded machine): the pulse itself stops
    after its sixth frame, so no seventh goes out. A raw witness counts the frames up to a
    sentinel sent after the command returned.
    """
    real_stop = Pulse.stop

    def late_stop(self: Pulse) -> None:
        time.sleep(0.5)  # ten beats at 1200 BPM
        real_stop(self)

    monkeypatch.setattr(Pulse, "stop", late_stop)
    witness = Witness(nats_runner, nats_server.url, "backbeat.beat.pc")
    cfg = BackbeatConfig(cluster_id="pc", agent_id="listener", nats_url=nats_server.url)
    with Integration(cfg, node_id="n") as agent:
        code, out, err = run(
            [
                "pulse",
                "--nats",
                nats_server.url,
                "--cluster",
                "pc",
                "--tempo",
                "1200",
                "--bar",
                "3",
                "--beats",
                "6",
                "--start-index",
                "3000",
            ],
            capsys,
        )
        wait_until(lambda: agent.get_health()["beats_received"] >= 6, what="6 beats at the agent")
        health = agent.get_health()
    assert code == 0, err
    witness._runner.run(witness._nc.publish("backbeat.beat.pc", b'{"sentinel": true}'))
    witness.wait_for(lambda ds: any(d.get("sentinel") for d in ds), what="the sentinel")
    indices = [d["beat_index"] for d in witness.dicts() if "beat_index" in d]
    witness.close()
    assert indices == list(range(3000, 3006))
    assert "another pulse" not in err
    assert health["current_beat"] == 3005
    assert "first beat 3000" in out
    assert out.splitlines()[0] == (
        f"backbeat-sync pulse: cluster pc, subject backbeat.beat.pc, server {nats_server.url}"
    )
    assert "stopped after 6 beat(s)" in out
    assert health["current_tempo"] == 1200
    assert sum(1 for line in out.splitlines() if line.startswith("beat ")) >= 1


@pytest.mark.nats
def test_pulse_refuses_a_cluster_that_already_has_a_pulse(
    nats_server: NatsServer, running_pulse: Pulse, capsys: pytest.CaptureFixture[str]
) -> None:
    """A pulse beats for 'c': a second one refuses (exit 2, one line); --force starts, with a warning."""
    argv = ["pulse", "--nats", nats_server.url, "--cluster", "c", "--tempo", "1200", "--beats", "2"]
    code, out, err = run(argv, capsys)
    assert code == 2
    assert "first beat" not in out  # it never started
    assert_one_line_error(err, "another pulse already beats on backbeat.beat.c", "at 1200 BPM", "--force")
    code, out, err = run([*argv, "--force"], capsys)
    assert code == 0, err
    assert "warning: another pulse already beats on backbeat.beat.c" in err
    assert "stopped after 2 beat(s)" in out
    assert "frame(s) from another pulse" in out


@pytest.mark.nats
def test_pulse_warns_when_another_pulse_appears(nats_server: NatsServer) -> None:
    """A second pulse that starts later (after the check) is reported on stderr while ours runs."""
    proc = subprocess.Popen(
        cli("pulse", "--nats", nats_server.url, "--cluster", "late", "--tempo", "600"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=cli_env(),
    )
    try:
        assert proc.stdout is not None
        assert proc.stderr is not None
        for line in proc.stdout:
            if "first beat" in line:
                break
        cfg = BackbeatConfig(cluster_id="late", agent_id="other", nats_url=nats_server.url)
        with Pulse(cfg, tempo_bpm=300, bar_length=4):
            line = proc.stderr.readline()  # blocks until the warning; the test's timeout bounds it
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert "warning: another pulse is beating on backbeat.beat.late too" in line
    assert "at 300 BPM" in line
    assert proc.returncode == 0
    assert "frame(s) from another pulse" in out


def test_pulse_names_the_default_cluster(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Without --cluster or CHORUS_BACKBEAT_CLUSTER_ID: it says it beats for the default chorus-production."""
    url = f"nats://127.0.0.1:{free_port()}"
    code, out, _ = run(["pulse", "--nats", url, "--connect-timeout", "0.2"], capsys)
    assert code == 2  # nobody there; the first line was said before connecting
    assert out.splitlines()[0].startswith("backbeat-sync pulse: cluster chorus-production (the default:")


@pytest.mark.nats
def test_pulse_signs_frames_with_the_signing_key(
    nats_server: NatsServer, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """With CHORUS_BACKBEAT_SIGNING_KEY set, an agent that trusts only that key accepts every frame."""
    from backbeat_sync.signing import SigningKey, generate_private_key

    private = generate_private_key()
    public = SigningKey.load(private).public_text()
    monkeypatch.setenv("CHORUS_BACKBEAT_SIGNING_KEY", private)
    cfg = BackbeatConfig(
        cluster_id="sc", agent_id="strict", nats_url=nats_server.url, trusted_pulse_keys=(public,)
    )
    with Integration(cfg, node_id="n") as agent:
        code, _, err = run(
            ["pulse", "--nats", nats_server.url, "--cluster", "sc", "--tempo", "1200", "--beats", "4"], capsys
        )
        wait_until(lambda: agent.get_health()["beats_received"] >= 4, what="4 signed beats accepted")
        health = agent.get_health()
    assert code == 0, err
    assert health["rejected_frames"] == 0


def default_sigint() -> None:
    """In a child before exec: SIGINT back to its default, so Python makes it KeyboardInterrupt.

    A suite started in the background by a script (``cmd &`` without job control) runs
    with SIGINT ignored, every child inherits that, and Python leaves an ignored SIGINT
    ignored: Ctrl-C (the signal this test sends) would then never reach the CLI.
    """
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def stop_or_dump(proc: subprocess.Popen[str], timeout: float) -> tuple[str, str]:
    """``proc.communicate(timeout)``; if it does not end, fail with its threads' stacks and output.

    The process must run with ``-X faulthandler``: SIGABRT makes it print every thread's stack.
    """
    try:
        return proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGABRT)
        out, err = proc.communicate()
        pytest.fail(f"still running {timeout:g} s after the signal\n--- stderr:\n{err}\n--- stdout:\n{out}")


@pytest.mark.nats
def test_pulse_and_monitor_once_json_list_the_agents_tasks(nats_server: NatsServer) -> None:
    """`backbeat-sync pulse` and `monitor --once --json` as subprocesses see an agent's tasks."""
    env = cli_env(CHORUS_BACKBEAT_NATS_URL=nats_server.url, CHORUS_BACKBEAT_CLUSTER_ID="mc")
    pulse = subprocess.Popen(  # -X faulthandler: SIGABRT dumps its threads if it does not stop
        [sys.executable, "-X", "faulthandler", *cli("pulse", "--tempo", "600")[1:]],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        preexec_fn=default_sigint,
    )
    try:
        cfg = BackbeatConfig(cluster_id="mc", agent_id="worker-1", nats_url=nats_server.url)
        with Integration(cfg, node_id="12D3KooWAbc") as agent:
            wait_until(lambda: agent.get_health()["beats_received"] >= 1, what="a beat")
            agent.start_p2p_operation("election-1", "election", 5)
            agent.update_p2p_operation_phase("election-1", OperationPhase.NEGOTIATING, 3)
            agent.start_p2p_operation("dht-store-k", "dht_store", 3)
            proc = subprocess.run(
                cli("monitor", "--once", "--json", "--cluster", "mc", "--timeout", "10"),
                capture_output=True,
                text=True,
                timeout=30,
                env=env,
            )
            agent.complete_p2p_operation("dht-store-k", 3)
        pulse.send_signal(signal.SIGINT)
        pulse_out, pulse_err = stop_or_dump(pulse, 60)
    finally:
        if pulse.poll() is None:
            pulse.kill()
            pulse.communicate()
    assert proc.returncode == 0, proc.stderr
    snap = json.loads(proc.stdout)
    tasks = {(t["agent_id"], t["task_id"]): t for t in snap["tasks"]}
    assert set(tasks) == {("worker-1", "election-1"), ("worker-1", "dht-store-k")}
    assert tasks[("worker-1", "election-1")]["phase"] == "negotiating"
    assert tasks[("worker-1", "election-1")]["state"] == "executing"
    assert tasks[("worker-1", "election-1")]["node_id"] == "12D3KooWAbc"
    assert [c["cluster_id"] for c in snap["clusters"]] == ["mc"]
    assert snap["clusters"][0]["tempo_bpm"] == 600
    assert pulse.returncode == 0, pulse_err
    assert "stopped after" in pulse_out
    assert "Traceback" not in pulse_err


@pytest.mark.nats
def test_monitor_live_plain_lines_and_sigterm(nats_server: NatsServer, running_pulse: Pulse) -> None:
    """monitor without --once prints plain lines when piped and stops cleanly on SIGTERM."""
    proc = subprocess.Popen(
        cli("monitor", "--nats", nats_server.url),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=cli_env(),
    )
    lines: list[str] = []
    got = threading.Event()

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("c: bar "):
                got.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        assert got.wait(PATIENCE), lines
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
    finally:
        if proc.poll() is None:
            proc.kill()
    reader.join(PATIENCE)
    assert proc.returncode == 0
    assert "tempo 1200 BPM" in "".join(lines)


@pytest.mark.nats
def test_monitor_json_streams_one_event_per_line(nats_server: NatsServer, running_pulse: Pulse) -> None:
    """monitor --json (no --once): NDJSON, beat events and the agent's task events, filtered by --type."""
    proc = subprocess.Popen(
        cli("monitor", "--json", "--nats", nats_server.url, "--cluster", "c", "--type", "election"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=cli_env(),
    )
    events: list[dict[str, Any]] = []
    raw: list[str] = []
    got = threading.Event()

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            raw.append(line)
            event = json.loads(line)
            events.append(event)
            if event["event"] == "task" and event["phase"] == "negotiating":
                got.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    cfg = BackbeatConfig(cluster_id="c", agent_id="worker-1", nats_url=nats_server.url)
    try:
        with Integration(cfg, node_id="12D3KooWAbc") as agent:
            wait_until(lambda: any(e["event"] == "beat" for e in events), what="a beat event")
            agent.start_p2p_operation("dht-1", "dht_store", 5)
            agent.start_p2p_operation("election-1", "election", 5)
            agent.update_p2p_operation_phase("election-1", OperationPhase.NEGOTIATING, 3)
            assert got.wait(PATIENCE), raw
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
    finally:
        if proc.poll() is None:
            proc.kill()
    reader.join(PATIENCE)
    assert proc.returncode == 0
    tasks = [e for e in events if e["event"] == "task"]
    assert {e["task_id"] for e in tasks} == {"election-1"}  # --type election
    assert [e["change"] for e in tasks][:2] == ["new", "phase"]
    beats = [e for e in events if e["event"] == "beat"]
    assert all(b["cluster_id"] == "c" and b["tempo_bpm"] == 1200 for b in beats)
    assert all(line.endswith("\n") and line.count("{") >= 1 for line in raw)


@pytest.mark.nats
def test_monitor_once_waits_for_the_agents_health(nats_server: NatsServer, running_pulse: Pulse) -> None:
    """--once includes each agent's health claim (every 8 beats), not health: null after one beat."""
    cfg = BackbeatConfig(cluster_id="c", agent_id="idle-1", nats_url=nats_server.url)
    with Integration(cfg, node_id="n-idle") as agent:
        wait_until(lambda: agent.get_health()["beats_received"] >= 1, what="a beat")
        agent.start_p2p_operation("e-1", "election", 50)  # a claim every beat: known at once
        proc = subprocess.run(
            cli(
                "monitor", "--once", "--json", "--nats", nats_server.url, "--cluster", "c", "--timeout", "20"
            ),
            capture_output=True,
            text=True,
            timeout=60,
            env=cli_env(),
        )
    assert proc.returncode == 0, proc.stderr
    snap = json.loads(proc.stdout)
    agents = {a["agent_id"]: a for a in snap["agents"]}
    assert agents["idle-1"]["health"] == "executing"
    assert snap["health_pending"] == []
    assert proc.stderr == ""


@pytest.mark.nats
def test_monitor_once_says_which_agents_health_it_did_not_see(
    nats_server: NatsServer, running_pulse: Pulse, nats_runner: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    """An agent that never sends a health claim: --once names it (health_pending, and a line on stderr)."""
    import nats as nats_py

    ghost = claim("g-1", 1, cluster_id="c", agent_id="ghost").encode()
    done = threading.Event()

    async def chatter() -> None:
        nc = await nats_py.connect(nats_server.url)
        try:
            while not done.is_set():
                await nc.publish("backbeat.status.c.ghost", ghost)
                await asyncio.sleep(0.02)
        finally:
            await nc.close()

    future = nats_runner.spawn(chatter())
    try:
        code, out, err = run(
            ["monitor", "--once", "--json", "--nats", nats_server.url, "--cluster", "c", "--timeout", "1"],
            capsys,
        )
    finally:
        done.set()
        future.result(PATIENCE)
    assert code == 0, err
    snap = json.loads(out)
    assert snap["health_pending"] == ["ghost"]
    assert_one_line_error(err, "no health claim yet from 1 agent(s) (ghost)", "every 8 beats", "--timeout")


@needs_budget
@pytest.mark.nats
def test_demo_on_a_real_server(nats_server: NatsServer, capsys: pytest.CaptureFixture[str]) -> None:
    """demo --nats URL runs its own pulse there and ends with the summary, exit 0."""
    code, out, err = run(["demo", "--nats", nats_server.url, "--bars", "1", "--tempo", "600"], capsys)
    assert code == 0, err
    assert nats_server.url in out
    assert "peer_discovery" in out
