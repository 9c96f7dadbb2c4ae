"""Tests for backbeat_sync.dashboard: the state it keeps, its server, and ``backbeat-sync dashboard``.

The page itself is tested in a real browser in ``test_dashboard_browser.py``.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from backbeat_sync import BackbeatConfig, BeatFrame, Integration, StatusClaim, log_to_stdlib
from backbeat_sync.cli import main
from backbeat_sync.dashboard import Dashboard, DashboardState, parse_listen, read_auth
from backbeat_sync.errors import ConfigError
from backbeat_sync.pulse import Pulse
from backbeat_sync.transport.local import LocalBus

from .natsserver import NatsServer, free_port
from .support import PATIENCE, HandledBeats, ManualPulse, unique_bus, wait_until

SENT_AT = "2026-12-01T08:00:00.000Z"
STATIC = Path(__file__).resolve().parent.parent / "backbeat_sync" / "dashboard" / "static"


def frame(index: int, cluster: str = "test", tempo: float = 60.0) -> BeatFrame:
    return BeatFrame(
        cluster_id=cluster,
        beat_index=index,
        downbeat=index % 4 == 0,
        phase="downbeat" if index % 4 == 0 else "upbeat",
        tempo_bpm=tempo,
        window_id=f"w-{index // 4}",
        bar_length=4,
    )


def claim(
    task: str, beat: int, *, agent: str = "agent-1", cluster: str = "test", **fields: Any
) -> StatusClaim:
    values: dict[str, Any] = {
        "state": "executing",
        "beats_left": 4,
        "progress": 0.0,
        "notes": f"P2P election: executing (peers: 3, node: n-{agent})",
        "operation_type": "election",
        "phase": "executing",
        "peer_count": 3,
    }
    values.update(fields)
    return StatusClaim(
        cluster_id=cluster,
        agent_id=agent,
        node_id=f"n-{agent}",
        task_id=task,
        beat_index=beat,
        sent_at=SENT_AT,
        **values,
    )


def health(
    beat: int, *, agent: str = "agent-1", state: str = "waiting", connected: bool = True
) -> StatusClaim:
    notes = f"CHORUS P2P healthy: connected={str(connected).lower()}, operations=0, tempo=60 BPM, node=n"
    return claim("chorus-p2p-health", beat, agent=agent, state=state, notes=notes, beats_left=0, progress=1.0)


@pytest.fixture
def agent_on_bus() -> Iterator[tuple[Integration, ManualPulse, DashboardState]]:
    """A started integration on a manual bus, its pulse, and a DashboardState subscribed to the bus."""
    bus = unique_bus()
    cfg = BackbeatConfig(cluster_id="test", agent_id="agent-1", nats_url=f"local://{bus}?pulse=manual")
    integration = Integration(cfg, node_id="node-1")
    pulse = ManualPulse(bus, "test", handled=HandledBeats(integration))
    state = DashboardState("test")
    unsubscribe = LocalBus.named(bus).subscribe("backbeat.>", lambda _s, data: state.feed(data))
    with integration:
        yield integration, pulse, state
    unsubscribe()


# -- the state ------------------------------------------------------------------------------


def test_state_follows_an_agents_operations_to_their_outcome(
    agent_on_bus: tuple[Integration, ManualPulse, DashboardState],
) -> None:
    """Budget and beats used come from the claims' own maths; done and failed land in 'finished'."""
    integration, pulse, state = agent_on_bus
    pulse.beat(10)
    integration.start_p2p_operation("op-done", "election", 4)
    integration.start_p2p_operation("op-fail", "dht_store", 2)
    pulse.beat(11)
    pulse.beat(12)
    snap = state.snapshot()
    assert snap["cluster"]["beat_index"] == 12
    ops = {o["task_id"]: o for o in snap["operations"]["rows"]}
    assert (ops["op-done"]["budget"], ops["op-done"]["beats_used"], ops["op-done"]["progress"]) == (
        4.0,
        2.0,
        0.5,
    )
    assert ops["op-done"]["warned"] is False
    assert ops["op-fail"]["warned"] is True  # 2 of 2 beats used: past the 0.75 warning fraction
    integration.complete_p2p_operation("op-done", 3)
    integration.fail_p2p_operation("op-fail", "quorum lost")
    wait_until(lambda: state.snapshot()["finished"]["total"] == 2, what="two finished operations")
    snap = state.snapshot()
    assert snap["operations"]["total"] == 0
    finished = {f["task_id"]: f for f in snap["finished"]["rows"]}
    assert finished["op-done"]["outcome"] == "done"
    assert finished["op-fail"]["outcome"] == "failed"
    assert "quorum lost" in finished["op-fail"]["notes"]
    types = {t["operation_type"]: t for t in snap["types"]}
    assert (types["election"]["done"], types["election"]["mean_used"], types["election"]["mean_budget"]) == (
        1,
        2.0,
        4.0,
    )
    assert types["dht_store"]["failed"] == 1
    agent = snap["agents"]["rows"][0]
    assert (agent["agent_id"], agent["node_id"], agent["active"]) == ("agent-1", "node-1", 0)


def test_budget_warning_and_exceeded_claims_set_the_outcome() -> None:
    """A claimed budget warning marks the op warned; a claimed exhaustion makes the outcome 'exceeded'."""
    state = DashboardState("test", warn_at=0.99)
    state.frame(frame(100))
    state.claim(claim("op-1", 100, beats_left=10))
    assert state.snapshot()["operations"]["rows"][0]["warned"] is False
    state.claim(
        claim("op-1", 101, beats_left=9, progress=0.1, notes="beat budget warning: 50% of 10 beats used")
    )
    assert state.snapshot()["operations"]["rows"][0]["warned"] is True
    state.claim(
        claim("op-1", 111, beats_left=0, progress=1.0, notes="beat budget exceeded: used 10.20 of 10 beats")
    )
    state.claim(
        claim("op-1", 111, state="failed", beats_left=0, progress=0.0, notes="P2P operation failed: x")
    )
    (row,) = state.snapshot()["finished"]["rows"]
    assert (row["outcome"], row["budget"], row["beats_used"]) == ("exceeded", 10.0, 11.0)


def test_budget_is_estimated_when_the_dashboard_joins_late() -> None:
    """First seen mid-way (progress 0.25, 6 beats left): the budget is 8 and the op started 2 beats ago."""
    state = DashboardState("test")
    state.frame(frame(50))
    state.claim(claim("late", 50, beats_left=6, progress=0.25))
    (row,) = state.snapshot()["operations"]["rows"]
    assert (row["budget"], row["beats_used"]) == (8.0, 2.0)


def test_operation_without_claims_is_lost_and_agent_silence_is_degraded() -> None:
    """No claim for more than 8 beats: the op finishes as 'lost'; no claim for 24: the agent is degraded."""
    state = DashboardState("test")
    state.frame(frame(100))
    state.claim(health(100))
    state.claim(claim("op-1", 100))
    snap = state.snapshot()
    assert (snap["agents"]["connected"], snap["agents"]["degraded"]) == (1, 0)
    for index in range(101, 130):
        state.frame(frame(index))
    snap = state.snapshot()
    assert snap["operations"]["total"] == 0
    assert snap["finished"]["rows"][0]["outcome"] == "lost"
    assert snap["agents"]["rows"][0]["degraded"] is True
    assert snap["agents"]["rows"][0]["silent"] is True


def test_failed_or_disconnected_health_is_degraded() -> None:
    """Health in state failed, or with connected=false, makes an agent degraded; degraded rows first."""
    state = DashboardState("test")
    state.frame(frame(8))
    state.claim(health(8, agent="a-ok"))
    state.claim(health(8, agent="b-errors", state="failed"))
    state.claim(health(8, agent="c-offline", connected=False))
    rows = state.snapshot()["agents"]["rows"]
    assert [(r["agent_id"], r["degraded"]) for r in rows] == [
        ("b-errors", True),
        ("c-offline", True),
        ("a-ok", False),
    ]
    assert [r["connected"] for r in rows] == [True, False, True]


def test_thousand_agents_ten_operations_each_is_a_small_snapshot() -> None:
    """10,000 active operations: totals count them all, rows stop at the limit, filter narrows."""
    state = DashboardState("test")
    state.frame(frame(1000))
    for a in range(1000):
        agent = f"agent-{a:04d}"
        state.claim(health(1000, agent=agent))
        for o in range(10):
            state.feed(
                claim(f"op-{a}-{o}", 1000 - o, agent=agent, beats_left=20 - o, progress=o / 20).encode()
            )
    snap = state.snapshot(limit=100)
    assert (snap["agents"]["total"], snap["operations"]["total"]) == (1000, 10_000)
    assert (len(snap["agents"]["rows"]), len(snap["operations"]["rows"])) == (100, 100)
    assert snap["operations"]["rows"][0]["progress"] >= snap["operations"]["rows"][-1]["progress"]
    assert len(json.dumps(snap)) < 200_000
    narrowed = state.snapshot(limit=100, filter_text="AGENT-0042")
    assert (narrowed["agents"]["matching"], narrowed["operations"]["matching"]) == (1, 10)
    assert {o["agent_id"] for o in narrowed["operations"]["rows"]} == {"agent-0042"}


def test_other_clusters_and_junk_are_not_shown() -> None:
    """Frames and claims of another cluster are ignored; malformed messages are counted, not raised."""
    state = DashboardState("test")
    state.frame(frame(5, cluster="other"))
    state.claim(claim("op-x", 5, cluster="other"))
    state.feed(b"{not json")
    state.feed(b'{"type": "backbeat.statusclaim.v1"}')
    snap = state.snapshot()
    assert snap["cluster"]["beat_index"] is None
    assert (snap["operations"]["total"], snap["agents"]["total"], snap["invalid_messages"]) == (0, 0, 2)
    with pytest.raises(ValueError, match="warn_at"):
        DashboardState("test", warn_at=0)


# -- the server -----------------------------------------------------------------------------


def test_listen_and_auth_parsing(tmp_path: Path) -> None:
    """HOST:PORT and USER:PASSWORD-FILE are parsed, and bad ones are ConfigErrors naming the flag."""
    assert parse_listen("127.0.0.1:8080") == ("127.0.0.1", 8080)
    assert parse_listen("[::1]:0") == ("::1", 0)
    for bad in ("8080", "host:", ":80", "h:99999", "h:x"):
        with pytest.raises(ConfigError, match="listen"):
            parse_listen(bad)
    pw = tmp_path / "pw"
    pw.write_text("s3cret\nignored\n", encoding="utf-8")
    assert read_auth(f"admin:{pw}") == ("admin", "s3cret")
    (tmp_path / "empty").write_text("\n", encoding="utf-8")
    for bad in ("admin", ":x", f"admin:{tmp_path / 'missing'}", f"admin:{tmp_path / 'empty'}"):
        with pytest.raises(ConfigError, match="auth"):
            read_auth(bad)


def test_default_listen_is_loopback() -> None:
    """Without listen=, the dashboard binds 127.0.0.1:8080 (the CLI's default too)."""
    d = Dashboard(BackbeatConfig(nats_url="local://dash-default"))
    assert (d.host, d.port) == ("127.0.0.1", 8080)


@pytest.fixture
def served() -> Iterator[tuple[Dashboard, LocalBus]]:
    """A dashboard on a free loopback port for a local bus, and the bus."""
    bus = unique_bus()
    cfg = BackbeatConfig(cluster_id="test", agent_id="dash", nats_url=f"local://{bus}")
    with Dashboard(cfg, listen="127.0.0.1:0") as d:
        yield d, LocalBus.named(bus)


def test_snapshot_and_event_stream_carry_the_cluster(served: tuple[Dashboard, LocalBus]) -> None:
    """/api/snapshot and the /events stream show what the bus carried, as JSON."""
    d, bus = served
    bus.publish("backbeat.beat.test", frame(42).encode())
    bus.publish("backbeat.status.test.agent-1", claim("op-1", 42).encode())
    snap = httpx.get(d.url + "api/snapshot", timeout=PATIENCE).json()
    assert snap["cluster"]["beat_index"] == 42
    assert snap["operations"]["rows"][0]["task_id"] == "op-1"
    assert snap["source_connected"] is True
    with httpx.stream("GET", d.url + "events?limit=5", timeout=PATIENCE) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        data = next(line for line in response.iter_lines() if line.startswith("data: "))
    assert json.loads(data[len("data: ") :])["cluster"]["beat_index"] == 42


def test_page_is_served_from_the_package_with_a_strict_policy(served: tuple[Dashboard, LocalBus]) -> None:
    """The page and its script come from the package; no external address; script only from self."""
    d, _ = served
    page = httpx.get(d.url, timeout=PATIENCE)
    assert page.status_code == 200
    assert "script-src 'self'" in page.headers["content-security-policy"]
    assert page.headers["x-content-type-options"] == "nosniff"
    script = httpx.get(d.url + "static/app.js", timeout=PATIENCE)
    assert script.status_code == 200
    assert "EventSource" in script.text
    for path in STATIC.iterdir():
        text = path.read_text(encoding="utf-8")
        assert "http://" not in text.replace("http://www.w3.org/2000/svg", ""), path.name
        assert "https://" not in text, path.name
    assert "innerHTML" not in script.text  # every value goes in as text


def test_basic_auth_guards_every_route(tmp_path: Path) -> None:
    """With auth, every route answers 401 without the right user and password, 200 with them."""
    cfg = BackbeatConfig(cluster_id="test", agent_id="dash", nats_url=f"local://{unique_bus()}")
    with Dashboard(cfg, listen="127.0.0.1:0", auth=("admin", "s3cret")) as d:
        for path in ("", "api/snapshot", "static/app.js", "events"):
            assert httpx.get(d.url + path, timeout=PATIENCE).status_code == 401
            assert httpx.get(d.url + path, auth=("admin", "wrong"), timeout=PATIENCE).status_code == 401
        denied = httpx.get(d.url, headers={"authorization": "Basic !!!"}, timeout=PATIENCE)
        assert denied.status_code == 401
        assert "Basic" in denied.headers["www-authenticate"]
        assert (
            httpx.get(d.url + "api/snapshot", auth=("admin", "s3cret"), timeout=PATIENCE).status_code == 200
        )


def test_every_interface_only_when_asked_and_logged(caplog: pytest.LogCaptureFixture) -> None:
    """listen=0.0.0.0:PORT binds every interface and logs a warning saying so."""
    caplog.set_level(logging.DEBUG)
    cfg = BackbeatConfig(cluster_id="test", agent_id="dash", nats_url=f"local://{unique_bus()}")
    with log_to_stdlib(), Dashboard(cfg, listen="0.0.0.0:0") as d:
        assert httpx.get(f"http://127.0.0.1:{d.port}/api/snapshot", timeout=PATIENCE).status_code == 200
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("every interface (0.0.0.0:" in w for w in warnings)


def test_port_in_use_is_an_oserror() -> None:
    """A second dashboard on the same port fails in start(), in the caller's thread."""
    cfg = BackbeatConfig(cluster_id="test", agent_id="dash", nats_url=f"local://{unique_bus()}")
    with Dashboard(cfg, listen="127.0.0.1:0") as d, pytest.raises(OSError):
        Dashboard(cfg, listen=f"127.0.0.1:{d.port}").start()


# -- the command ----------------------------------------------------------------------------


def test_cli_refuses_local_without_demo_and_demo_on_nats(capsys: pytest.CaptureFixture[str]) -> None:
    """local:// needs --demo (nothing else would be on the bus); --demo needs local://."""
    assert main(["dashboard", "--nats", "local://x"]) == 2
    assert "add --demo" in capsys.readouterr().err
    assert main(["dashboard", "--nats", "nats://127.0.0.1:1", "--demo"]) == 2
    assert "use it with --nats local://" in capsys.readouterr().err
    assert main(["dashboard", "--nats", "local://x", "--demo", "--listen", "nowhere"]) == 2
    assert "listen" in capsys.readouterr().err


def _poll(url: str, predicate: Any, what: str, auth: Any = None) -> dict[str, Any]:
    deadline = time.monotonic() + PATIENCE
    while True:
        try:
            snap: dict[str, Any] = httpx.get(url + "api/snapshot", auth=auth, timeout=5).json()
            if predicate(snap):
                return snap
        except (httpx.HTTPError, ValueError):
            pass
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def _stop(proc: subprocess.Popen[str]) -> tuple[str, str]:
    proc.send_signal(signal.SIGINT)
    try:
        out, err = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        raise AssertionError(f"dashboard did not stop on SIGINT: {err}") from None
    return out, err


def test_cli_demo_serves_live_agents_until_interrupted(tmp_path: Path) -> None:
    """`dashboard --nats local:// --demo` runs sample agents; beats advance; Ctrl-C stops it cleanly."""
    port = free_port()
    pw = tmp_path / "pw"
    pw.write_text("pw1\n", encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if not k.startswith("CHORUS_BACKBEAT_")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "backbeat_sync", "dashboard", "--nats", "local://", "--demo", "--tempo", "600",
         "--listen", f"127.0.0.1:{port}", "--auth", f"admin:{pw}"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )  # fmt: skip
    try:
        url = f"http://127.0.0.1:{port}/"
        auth = ("admin", "pw1")
        first = _poll(url, lambda s: s["agents"]["total"] == 3, "three demo agents", auth)
        _poll(
            url, lambda s: s["cluster"]["beat_index"] > first["cluster"]["beat_index"], "a later beat", auth
        )
        _poll(url, lambda s: s["finished"]["total"] > 0, "a finished operation", auth)
        assert httpx.get(url, timeout=5).status_code == 401
    finally:
        out, err = _stop(proc)
    assert proc.returncode == 0, err
    assert f"backbeat-sync dashboard: {url}" in out
    assert "stopped" in out


def test_cli_dashboard_on_nats_sees_a_real_agent(nats_server: NatsServer) -> None:
    """`dashboard --nats URL --cluster C`: an agent and a pulse on the server show up on the page's API."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("CHORUS_BACKBEAT_")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "backbeat_sync", "dashboard", "--nats", nats_server.url,
         "--cluster", "dash-nats", "--listen", f"127.0.0.1:{port}"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )  # fmt: skip
    cfg = BackbeatConfig(cluster_id="dash-nats", agent_id="worker-7", nats_url=nats_server.url, tempo_bpm=600)
    try:
        url = f"http://127.0.0.1:{port}/"
        _poll(url, lambda s: True, "the dashboard to answer")
        with Pulse(cfg), Integration(cfg, node_id="n7") as agent:
            agent.start_p2p_operation("sync-1", "pubsub_sync", 50)
            snap = _poll(
                url,
                lambda s: (
                    any(o["task_id"] == "sync-1" for o in s["operations"]["rows"])
                    and (s["cluster"]["beat_index"] or 0) > 0
                ),
                "the agent's operation",
            )
            assert snap["agents"]["rows"][0]["agent_id"] == "worker-7"
    finally:
        _out, err = _stop(proc)
    assert proc.returncode == 0, err


def test_claims_before_any_beat_do_not_count_from_beat_zero() -> None:
    """An agent's claims before its first beat say beat 0: beats used count from its first real beat."""
    state = DashboardState("test")
    state.claim(claim("early", 0, beats_left=6))  # neither the agent nor the dashboard has a beat yet
    state.frame(frame(7_000_000))
    assert state.snapshot()["operations"]["rows"][0]["beats_used"] == 0.0
    state.claim(claim("early", 7_000_001, beats_left=5, progress=1 / 6))
    state.frame(frame(7_000_002))
    state.claim(claim("early", 7_000_002, state="done", beats_left=0, progress=1.0))
    (row,) = state.snapshot()["finished"]["rows"]
    assert (row["outcome"], row["budget"], row["beats_used"]) == ("done", 6.0, 2.0)


def test_made_up_ids_cannot_grow_the_state_without_end(monkeypatch: pytest.MonkeyPatch) -> None:
    """Past MAX_AGENTS new agents are counted as dropped; agents silent for long are forgotten."""
    from backbeat_sync.dashboard import _state

    monkeypatch.setattr(_state, "MAX_AGENTS", 50)
    monkeypatch.setattr(_state, "MAX_OPERATIONS", 60)
    state = DashboardState("test")
    state.frame(frame(1000))
    for n in range(100):
        state.claim(claim(f"op-{n}", 1000, agent=f"flood-{n}"))
        state.claim(claim(f"op-b-{n}", 1000, agent="flood-0"))
    snap = state.snapshot()
    assert snap["agents"]["total"] == 50
    assert snap["operations"]["total"] == 60
    assert snap["dropped_claims"] == 50 + 90
    for index in range(1001, 1300):
        state.frame(frame(index))
    assert state.snapshot()["agents"]["total"] == 0  # all silent for more than 240 beats, none active
