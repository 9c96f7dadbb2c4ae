"""Tests for the JetStream commands of backbeat_sync.cli: ``pulse --ha``, ``tempo``, ``streams``.

Through ``main(argv)`` (and a subprocess for SIGTERM), against a real ``nats-server -js``.
"""

from __future__ import annotations

import itertools
import os
import signal
import subprocess
import sys

import pytest

from backbeat_sync import BackbeatConfig, Pulse
from backbeat_sync.cli import main
from backbeat_sync.ha import read_lease

from .natsserver import AsyncRunner, NatsServer, Witness
from .support import PATIENCE, wait_until


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


@pytest.mark.nats
def test_pulse_ha_without_jetstream_is_one_clear_line(
    nats_server: NatsServer, capsys: pytest.CaptureFixture[str]
) -> None:
    """pulse --ha on a server without JetStream: exit 2, one line naming JetStream and the bucket."""
    code, _, err = run(["pulse", "--ha", "--nats", nats_server.url, "--cluster", "c", "--plain"], capsys)
    assert code == 2
    assert "JetStream key-value bucket 'backbeat-pulse' is not available" in err
    assert "-js" in err
    assert "Traceback" not in err


@pytest.mark.nats
def test_pulse_ha_leads_and_releases_on_sigterm(nats_jetstream: NatsServer, nats_runner: AsyncRunner) -> None:
    """Two ``pulse --ha`` processes: one leads; SIGTERM to it releases the lease and the other goes on."""
    witness = Witness(nats_runner, nats_jetstream.url, "backbeat.beat.c")
    cfg = BackbeatConfig(cluster_id="c", nats_url=nats_jetstream.url)
    argv = [sys.executable, "-m", "backbeat_sync", "pulse", "--ha", "--nats", nats_jetstream.url]
    argv += ["--cluster", "c", "--tempo", "600", "--plain"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("CHORUS_BACKBEAT_")}
    first = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        witness.wait_for(lambda ds: len(ds) >= 3, what="frames from the first replica")
        second = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        try:
            lease = read_lease(cfg)
            assert lease is not None
            assert lease.holder.split(":")[1] == str(first.pid)
            first.send_signal(signal.SIGTERM)
            out, err = first.communicate(timeout=PATIENCE)
            assert first.returncode == 0, err
            assert "HA: bucket backbeat-pulse; one replica leads" in out
            assert "HA: leading from beat" in out
            wait_until(
                lambda: (
                    (lease := read_lease(cfg)) is not None
                    and lease.holder.split(":")[1:2] == [str(second.pid)]
                ),
                what="the second replica leading",
            )
            count = len(witness.dicts())
            witness.wait_for(lambda ds: len(ds) >= count + 3, what="frames from the second replica")
        finally:
            second.send_signal(signal.SIGTERM)
            out2, _ = second.communicate(timeout=PATIENCE)
        assert "HA: leading from beat" in out2
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
        witness.close()
    idx = [d["beat_index"] for d in witness.dicts()]
    assert all(a < b for a, b in itertools.pairwise(idx)), idx


@pytest.mark.nats
def test_tempo_command(
    nats_jetstream: NatsServer, nats_runner: AsyncRunner, capsys: pytest.CaptureFixture[str]
) -> None:
    """tempo: refused before any HA pulse made the bucket; then the leader switches to it."""
    base = ["--nats", nats_jetstream.url, "--cluster", "c", "--plain"]
    code, _, err = run(["tempo", *base, "300"], capsys)
    assert code == 2
    assert "no such bucket" in err
    witness = Witness(nats_runner, nats_jetstream.url, "backbeat.beat.c")
    cfg = BackbeatConfig(cluster_id="c", nats_url=nats_jetstream.url)
    with Pulse(cfg, tempo_bpm=600, ha=True):
        witness.wait_for(lambda ds: len(ds) >= 2, what="frames")
        code, out, err = run(["tempo", *base, "300", "--bar", "2"], capsys)
        assert code == 0, err
        assert "cluster c set to 300 BPM, 2 beats per bar" in out
        assert "applies it at the next downbeat" in out
        witness.wait_for(
            lambda ds: sum(1 for d in ds if (d["tempo_bpm"], d["bar_length"]) == (300, 2)) >= 3,
            what="frames at 300 BPM in bars of 2",
        )
    witness.close()
    code, _, _ = run(["tempo", *base, "0"], capsys)
    assert code == 2


@pytest.mark.nats
def test_streams_create(nats_jetstream: NatsServer, capsys: pytest.CaptureFixture[str]) -> None:
    """streams create: makes BACKBEAT_CLAIMS_{cluster}; a second run finds it; --name chooses."""
    base = ["streams", "create", "--nats", nats_jetstream.url, "--cluster", "c", "--plain"]
    code, out, err = run(base, capsys)
    assert code == 0, err
    assert "BACKBEAT_CLAIMS_c created: subjects backbeat.status.c.>, file storage" in out
    assert "duplicate window 300 s" in out
    assert "CHORUS_BACKBEAT_CLAIMS_STREAM=BACKBEAT_CLAIMS_c" in out
    code, out, _ = run(base, capsys)
    assert code == 0
    assert "found" in out
    other = ["streams", "create", "--nats", nats_jetstream.url, "--cluster", "c2", "--plain"]
    code, out, err = run([*other, "--name", "MINE", "--duplicate-window", "60"], capsys)
    assert code == 0, err
    assert "MINE created" in out
    assert "duplicate window 60 s" in out
    code, _, err = run(["streams", "--nats", nats_jetstream.url], capsys)
    assert code == 2  # no action
    code, _, err = run([*base, "--name", "OVERLAP"], capsys)
    assert code == 2  # a second stream on the same subjects: JetStream refuses, one line
    assert "subjects overlap" in err


@pytest.mark.nats
def test_streams_create_without_jetstream(
    nats_server: NatsServer, capsys: pytest.CaptureFixture[str]
) -> None:
    """streams create on a server without JetStream: exit 2, the line names JetStream."""
    code, _, err = run(["streams", "create", "--nats", nats_server.url, "--cluster", "c"], capsys)
    assert code == 2
    assert "JetStream stream 'BACKBEAT_CLAIMS_c' is not available" in err


@pytest.mark.nats
def test_monitor_replay_shows_what_finished_while_away(
    nats_jetstream: NatsServer, capsys: pytest.CaptureFixture[str]
) -> None:
    """monitor --replay N fills the view from the claims stream: tasks that finished before the
    monitor started are in its snapshot (and are not without --replay)."""
    import json

    from backbeat_sync import Integration
    from backbeat_sync.streams import create_claims_stream

    cfg = BackbeatConfig(
        cluster_id="c", agent_id="away", nats_url=nats_jetstream.url, claims_stream="BACKBEAT_CLAIMS_c"
    )
    create_claims_stream(cfg)
    with Pulse(cfg, tempo_bpm=600):
        with Integration(cfg, node_id="n-away") as agent:
            wait_until(lambda: agent.get_health()["beats_received"] > 0, what="a beat")
            for k in range(5):
                agent.start_p2p_operation(f"gone-{k}", "election", 3)
                agent.complete_p2p_operation(f"gone-{k}", 2)
            wait_until(lambda: agent.get_health()["claims_queued"] == 0, what="finals acknowledged")
        base = ["monitor", "--nats", nats_jetstream.url, "--cluster", "c", "--once", "--json", "--plain"]
        code, out, err = run([*base, "--replay", "50"], capsys)
        assert code == 0, err
        replayed = {t["task_id"]: t["state"] for t in json.loads(out)["tasks"]}
        code, out, err = run(base, capsys)
        assert code == 0, err
        live = {t["task_id"] for t in json.loads(out)["tasks"]}
    assert {f"gone-{k}": "done" for k in range(5)}.items() <= replayed.items()
    assert not {t for t in live if t.startswith("gone-")}
    code, _, err = run([*base, "--replay", "2", "--stream", "NOPE"], capsys)
    assert code == 2
    assert "no such stream" in err
