"""``backbeat-sync status``'s fast path: the pulse answers on the last-beat subject.

At the seed's 2 BPM a subscribe-only probe could wait 30 s for the next beat; a pulse
of this library answers a request with its latest frame at once. A pulse without the
responder (a raw nats-py publisher) still works: the probe falls back to waiting.
"""

from __future__ import annotations

import json
import time
from typing import Any

import pytest

from backbeat_sync import BackbeatConfig, Integration
from backbeat_sync.cli import main
from backbeat_sync.pulse import Pulse

from .natsserver import AsyncRunner, NatsServer, RawPulse, Witness
from .support import PATIENCE, unique_bus, wait_until


def status(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, dict[str, Any], str]:
    """main(["status", "--json", *argv]) -> (exit code, the verdict, stderr)."""
    code = main(["status", "--json", *argv])
    captured = capsys.readouterr()
    assert captured.out.count("\n") == 1, captured.out
    return code, json.loads(captured.out), captured.err


@pytest.mark.nats
def test_at_2_bpm_the_pulse_answers_before_the_next_beat(
    nats_server: NatsServer, nats_runner: AsyncRunner, capsys: pytest.CaptureFixture[str]
) -> None:
    """A Pulse at 2 BPM has sent its first beat; status is ok from the pulse's answer (via
    "request") with that beat, and returns before the second beat (30 s later) was sent."""
    witness = Witness(nats_runner, nats_server.url, "backbeat.beat.slow")
    cfg = BackbeatConfig(cluster_id="slow", nats_url=nats_server.url)
    with Pulse(cfg, tempo_bpm=2, start_index=500) as pulse:
        witness.wait_for(lambda ds: len(ds) >= 1, what="the first beat")
        code, report, err = status(["--nats", nats_server.url, "--cluster", "slow"], capsys)
        assert pulse.frames_sent == 1  # still no second beat: the probe did not wait for it
    witness.close()
    assert code == 0, err
    assert (report["ok"], report["reason"], report["via"]) == (True, None, "request")
    assert report["beat"]["beat_index"] == 500
    assert report["beat"]["tempo_bpm"] == 2
    assert report["waited_seconds"] < 10  # the subscription alone needed up to 30 s


@pytest.mark.nats
def test_a_stale_answer_is_degraded(nats_server: NatsServer, capsys: pytest.CaptureFixture[str]) -> None:
    """A pulse that sent its last frame (max_beats=1) 1.5 s ago at 600 BPM (15 beats) answers with
    it: degraded (older than --max-age 2 beats), exit 1; the age is the frame's."""
    cfg = BackbeatConfig(cluster_id="stale", nats_url=nats_server.url)
    with Pulse(cfg, tempo_bpm=600, start_index=40, max_beats=1) as pulse:
        assert pulse.wait(PATIENCE)
        time.sleep(1.5)  # the test's point: the last frame grows old (beyond the 1 s clock tolerance)
        code, report, err = status(["--nats", nats_server.url, "--cluster", "stale"], capsys)
    assert code == 1
    assert (report["ok"], report["reason"], report["via"]) == (False, "degraded", "request")
    assert report["beat"]["beat_index"] == 40
    assert report["beat_age_beats"] > 10
    assert "beat 40 arrived" in err


@pytest.mark.nats
def test_a_pulse_without_the_responder_still_works(
    nats_server: NatsServer, nats_runner: AsyncRunner, capsys: pytest.CaptureFixture[str]
) -> None:
    """A raw nats-py pulse (no last-beat responder): the request goes unanswered and the probe
    waits for a beat on the subject, as before: ok via "subscription"."""
    raw = RawPulse(nats_runner, nats_server.url, "rawp", tempo_bpm=120.0)
    raw.start()
    try:
        code, report, err = status(["--nats", nats_server.url, "--cluster", "rawp"], capsys)
    finally:
        raw.stop()
    assert code == 0, err
    assert (report["ok"], report["reason"], report["via"]) == (True, None, "subscription")
    assert report["beat"]["beat_index"] in raw.sent


@pytest.mark.nats
def test_nothing_answers_and_nothing_beats_is_no_beat(
    nats_server: NatsServer, capsys: pytest.CaptureFixture[str]
) -> None:
    """No pulse at all (the request finds no responders): no_beat, exit 1, "via" null."""
    code, report, _ = status(["--nats", nats_server.url, "--cluster", "none", "--timeout", "1"], capsys)
    assert code == 1
    assert (report["ok"], report["reason"], report["via"], report["beat"]) == (
        False,
        "no_beat",
        None,
        None,
    )


@pytest.mark.nats
def test_the_ha_leader_answers(nats_jetstream: NatsServer, capsys: pytest.CaptureFixture[str]) -> None:
    """An HA pulse at 2 BPM, leading after its first beat: status is ok from its answer."""
    cfg = BackbeatConfig(cluster_id="hal", nats_url=nats_jetstream.url)
    with Pulse(cfg, tempo_bpm=2, start_index=0, ha=True) as pulse:
        wait_until(lambda: pulse.frames_sent >= 1, what="the leader's first beat")
        code, report, err = status(["--nats", nats_jetstream.url, "--cluster", "hal"], capsys)
        assert pulse.frames_sent == 1
    assert code == 0, err
    assert (report["ok"], report["via"]) == (True, "request")


def test_local_pulse_answers_at_once(capsys: pytest.CaptureFixture[str]) -> None:
    """local://NAME?pulse=manual with a library Pulse at 2 BPM that has sent its first beat:
    the probe starts no pulse of its own and gets the answer at once."""
    bus = unique_bus()
    cfg = BackbeatConfig(cluster_id="lp", nats_url=f"local://{bus}?pulse=manual")
    with Pulse(cfg, tempo_bpm=2, start_index=9) as pulse:
        wait_until(lambda: pulse.frames_sent >= 1, what="the first beat")
        code, report, err = status(["--nats", f"local://{bus}?pulse=manual", "--cluster", "lp"], capsys)
        assert pulse.frames_sent == 1
    assert code == 0, err
    assert (report["ok"], report["via"]) == (True, "request")
    assert report["beat"]["beat_index"] == 9


def test_the_shared_in_process_pulse_answers(capsys: pytest.CaptureFixture[str]) -> None:
    """An agent on local:// runs the bus's pulse at 2 BPM (its first beat gone): status joins it
    and is answered at once, not 30 s later by the second beat."""
    bus = unique_bus()
    cfg = BackbeatConfig(cluster_id="sh", agent_id="a", nats_url=f"local://{bus}", tempo_bpm=2)
    with Integration(cfg, node_id="n") as agent:
        wait_until(lambda: agent.get_health()["beats_received"] >= 1, what="the agent's first beat")
        code, report, err = status(["--nats", f"local://{bus}", "--cluster", "sh"], capsys)
        assert agent.get_health()["beats_received"] == 1
    assert code == 0, err
    assert (report["ok"], report["via"]) == (True, "request")


@pytest.mark.nats
def test_the_answer_is_signed_as_frames_are(
    nats_server: NatsServer, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A signing pulse at 2 BPM answers with its signed frame: a probe that trusts the key is ok
    from the answer; one that trusts another key rejects it (and the beat subject brings nothing
    better in 1 s): degraded, with the frame counted as rejected."""
    pytest.importorskip("cryptography")
    from backbeat_sync.signing import SigningKey, generate_private_key

    key = SigningKey.load(generate_private_key())
    other = SigningKey.load(generate_private_key())
    cfg = BackbeatConfig(cluster_id="signed", nats_url=nats_server.url)
    argv = ["--nats", nats_server.url, "--cluster", "signed", "--timeout", "1"]
    with Pulse(cfg, tempo_bpm=2, start_index=3, sign=key.sign_frame) as pulse:
        wait_until(lambda: pulse.frames_sent >= 1, what="the first beat")
        monkeypatch.setenv("CHORUS_BACKBEAT_TRUSTED_PULSE_KEYS", key.public_text())
        code, report, err = status(argv, capsys)
        monkeypatch.setenv("CHORUS_BACKBEAT_TRUSTED_PULSE_KEYS", other.public_text())
        code2, report2, _ = status(argv, capsys)
        assert pulse.frames_sent == 1
    assert code == 0, err
    assert (report["ok"], report["via"], report["beat"]["beat_index"]) == (True, "request", 3)
    assert code2 == 1
    assert (report2["ok"], report2["reason"], report2["rejected_frames"]) == (False, "degraded", 1)
