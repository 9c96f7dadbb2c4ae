"""Tests for backbeat_sync.streams: the claims stream, its message ids, and replay."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import nats
import pytest

from backbeat_sync import BackbeatConfig, ConfigError
from backbeat_sync._time import ManualTime
from backbeat_sync.claims import ClaimFactory
from backbeat_sync.errors import JetStreamUnavailable
from backbeat_sync.operations import OperationPhase, P2POperation
from backbeat_sync.streams import (
    DUPLICATE_WINDOW,
    claim_msg_id,
    claims_stream_name,
    claims_subjects,
    create_claims_stream,
    replay_claims,
)

from .natsserver import NatsServer


def config(url: str, **changes: Any) -> BackbeatConfig:
    """A config for tests."""
    fields: dict[str, Any] = {"cluster_id": "cs", "agent_id": "a1", "nats_url": url, "connect_timeout": 5.0}
    fields.update(changes)
    return BackbeatConfig(**fields)


def op(task: str, start_time: float, phase: OperationPhase = OperationPhase.COMPLETED) -> P2POperation:
    """An operation snapshot in ``phase``."""
    o = P2POperation(id=task, type="election", start_beat=10, estimated_beats=5, start_time=start_time)
    o.phase = phase
    return o


def test_names_and_subjects() -> None:
    """The default stream is BACKBEAT_CLAIMS_{cluster}; it captures every agent's status subject."""
    assert claims_stream_name("cs") == "BACKBEAT_CLAIMS_cs"
    assert claims_stream_name("a/b") == "BACKBEAT_CLAIMS_a_b"
    assert claims_subjects(config("nats://127.0.0.1:1")) == "backbeat.status.cs.>"
    custom = config("nats://127.0.0.1:1", status_subject="x.{agent_id}.claims")
    assert claims_subjects(custom) == "x.>"
    with pytest.raises(ConfigError, match="status_subject"):
        claims_subjects(config("nats://127.0.0.1:1", status_subject="x.{cluster_id}"))


def test_msg_id_names_the_operation_and_the_state() -> None:
    """One id per (agent, task, start, state): resends share it, a reused task id does not."""
    factory = ClaimFactory("cs", "a1", "n1", ManualTime())
    first = factory.lazy(op("t1", 1000.25), 12)
    again = factory.lazy(op("t1", 1000.25), 13)
    reused = factory.lazy(op("t1", 1000.5), 12)
    failed = factory.lazy(op("t1", 1000.25, OperationPhase.FAILED), 12)
    assert claim_msg_id("a1", first) == claim_msg_id("a1", again)
    ids = {claim_msg_id("a1", c) for c in (first, reused, failed)} | {claim_msg_id("a2", first)}
    assert len(ids) == 4


def test_stream_settings_are_checked() -> None:
    """Bad names and limits are refused before connecting."""
    cfg = config("nats://127.0.0.1:1")
    with pytest.raises(ConfigError, match="name"):
        create_claims_stream(cfg, name="a.b")
    with pytest.raises(ConfigError, match="duplicate_window"):
        create_claims_stream(cfg, duplicate_window=10.0, max_age=5.0)
    with pytest.raises(ConfigError, match="replicas"):
        create_claims_stream(cfg, replicas=0)
    with pytest.raises(ConfigError, match="bars"):
        replay_claims(cfg, 0)


@pytest.mark.nats
def test_create_is_idempotent_and_file_stored(nats_jetstream: NatsServer) -> None:
    """streams create makes a file-stored stream with a duplicate window; a second call finds it."""
    cfg = config(nats_jetstream.url)
    made = create_claims_stream(cfg)
    assert (made.name, made.subjects, made.created) == ("BACKBEAT_CLAIMS_cs", ("backbeat.status.cs.>",), True)
    assert made.duplicate_window == DUPLICATE_WINDOW
    again = create_claims_stream(cfg, max_age=3600.0)
    assert again.created is False
    assert again.max_age == 3600.0

    async def storage() -> str:
        nc = await nats.connect(nats_jetstream.url)
        try:
            info = await nc.jetstream().stream_info("BACKBEAT_CLAIMS_cs")
            return str(info.config.storage)
        finally:
            await nc.close()

    assert "file" in asyncio.run(storage())


@pytest.mark.nats
def test_create_without_jetstream_names_what_is_missing(nats_server: NatsServer) -> None:
    """On a server without JetStream the error names the stream and JetStream."""
    with pytest.raises(JetStreamUnavailable, match=r"BACKBEAT_CLAIMS_cs.*JetStream"):
        create_claims_stream(config(nats_server.url))


@pytest.mark.nats
def test_replay_returns_the_last_bars(nats_jetstream: NatsServer) -> None:
    """replay_claims(N) gives the claims of the newest claim's bar and the N-1 before, in order."""
    cfg = config(nats_jetstream.url, bar_length=4)
    create_claims_stream(cfg)

    async def fill() -> None:
        nc = await nats.connect(nats_jetstream.url)
        try:
            js = nc.jetstream()
            for beat in range(40):
                await js.publish(
                    "backbeat.status.cs.a1", json.dumps({"beat_index": beat, "task_id": f"t{beat}"}).encode()
                )
        finally:
            await nc.close()

    asyncio.run(fill())
    got = [json.loads(d)["beat_index"] for d in replay_claims(cfg, 2)]
    assert got == list(range(32, 40))
    assert [json.loads(d)["beat_index"] for d in replay_claims(cfg, 100)] == list(range(40))
    with pytest.raises(JetStreamUnavailable, match="no such stream"):
        replay_claims(cfg, 1, stream="NOPE")
