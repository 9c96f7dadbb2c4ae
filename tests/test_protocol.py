"""Tests for backbeat_sync.protocol: every parsing rule of PROTOCOL.md, encoding, canonical JSON."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from backbeat_sync import BeatFrame, ProtocolError, StatusClaim
from backbeat_sync.protocol import (
    MAX_MESSAGE_BYTES,
    canonical_json,
    parse_beat_frame,
    parse_message,
    parse_status_claim,
)

FRAME: dict[str, Any] = {
    "type": "backbeat.beatframe.v1",
    "cluster_id": "chorus-dev",
    "beat_index": 12344,
    "downbeat": True,
    "phase": "downbeat",
    "tempo_bpm": 2,
    "window_id": "w-3086",
    "bar_length": 4,
    "sent_at": "2026-11-28T01:00:00Z",
    "deadline_at": "2026-11-28T01:00:30Z",
}

CLAIM: dict[str, Any] = {
    "type": "backbeat.statusclaim.v1",
    "cluster_id": "chorus-dev",
    "agent_id": "alice",
    "node_id": "12D3KooWAbc",
    "task_id": "election-1",
    "beat_index": 12345,
    "state": "executing",
    "beats_left": 3,
    "progress": 0.4,
    "notes": "P2P election: started (peers: 0, node: 12D3KooWAbc)",
    "sent_at": "2026-11-28T01:00:00.123Z",
    "operation_type": "election",
    "phase": "started",
    "peer_count": 0,
}


def dumps(obj: Any) -> bytes:
    return json.dumps(obj).encode()


def with_(base: dict[str, Any], **changes: Any) -> dict[str, Any]:
    d = dict(base)
    for k, v in changes.items():
        if v is ...:
            d.pop(k, None)
        else:
            d[k] = v
    return d


def test_protocol_example_frame_parses() -> None:
    """The example frame of PROTOCOL.md parses into the expected fields."""
    frame = parse_beat_frame(dumps(FRAME))
    assert frame == BeatFrame(
        cluster_id="chorus-dev",
        beat_index=12344,
        downbeat=True,
        phase="downbeat",
        tempo_bpm=2.0,
        window_id="w-3086",
        bar_length=4,
        sent_at="2026-11-28T01:00:00Z",
        deadline_at="2026-11-28T01:00:30Z",
    )
    assert frame.beat_duration == 30.0


def test_optional_frame_fields_default() -> None:
    """bar_length defaults to 4; sent_at and deadline_at are optional."""
    frame = parse_beat_frame(dumps(with_(FRAME, bar_length=..., sent_at=..., deadline_at=...)))
    assert frame.bar_length == 4
    assert frame.sent_at is None
    assert frame.deadline_at is None


def test_unknown_fields_are_ignored() -> None:
    """Receivers ignore fields they do not know (forward compatibility)."""
    frame = parse_beat_frame(dumps(with_(FRAME, future_field={"x": 1})))
    assert frame.beat_index == 12344
    claim = parse_status_claim(dumps(with_(CLAIM, extra=[1, 2])))
    assert claim.task_id == "election-1"


def test_a_claim_only_field_on_a_frame_is_unknown_there() -> None:
    """A frame knows no ``budget_source`` (a claim field): any value is an unknown field, ignored."""
    for value in ("learned", 7, None):
        frame = parse_beat_frame(dumps(with_(FRAME, budget_source=value)))
        assert frame.beat_index == 12344


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        ({"type": ...}, "missing required field 'type'"),
        ({"type": "backbeat.beatframe.v2"}, "unknown type"),
        ({"type": 1}, "'type' must be a string"),
        ({"cluster_id": ...}, "missing required field 'cluster_id'"),
        ({"cluster_id": 7}, "'cluster_id' must be a string"),
        ({"beat_index": ...}, "missing required field 'beat_index'"),
        ({"beat_index": -1}, "'beat_index'=-1 is below 0"),
        ({"beat_index": 1.0}, "'beat_index' must be an integer"),
        ({"beat_index": "1"}, "'beat_index' must be an integer"),
        ({"beat_index": True}, "'beat_index' must be an integer"),
        ({"beat_index": 2**70}, "does not fit in 64 bits"),
        ({"downbeat": ...}, "missing required field 'downbeat'"),
        ({"downbeat": 1}, "'downbeat' must be a boolean"),
        ({"phase": ...}, "missing required field 'phase'"),
        ({"phase": None}, "'phase' must be a string"),
        ({"tempo_bpm": ...}, "missing required field 'tempo_bpm'"),
        ({"tempo_bpm": 0}, "outside 0 < x <= 6000"),
        ({"tempo_bpm": -2}, "outside 0 < x <= 6000"),
        ({"tempo_bpm": 6000.5}, "outside 0 < x <= 6000"),
        ({"tempo_bpm": "2"}, "'tempo_bpm' must be a number"),
        ({"tempo_bpm": False}, "'tempo_bpm' must be a number"),
        ({"window_id": ...}, "missing required field 'window_id'"),
        ({"window_id": 3}, "'window_id' must be a string"),
        ({"bar_length": 0}, "'bar_length'=0 is below 1"),
        ({"bar_length": "4"}, "'bar_length' must be an integer"),
        ({"sent_at": "2026-11-28 01:00:00"}, "not an RFC 3339 UTC timestamp"),
        ({"sent_at": "2026-11-28T01:00:00+01:00"}, "not an RFC 3339 UTC timestamp"),
        ({"sent_at": "2026-13-28T01:00:00Z"}, "not a real date"),
        ({"deadline_at": 5}, "'deadline_at' must be a string"),
        ({"sig": 5}, "'sig' must be a string"),
    ],
)
def test_frame_rejections(changes: dict[str, Any], reason: str) -> None:
    """Each broken rule raises ProtocolError saying which rule."""
    with pytest.raises(ProtocolError) as info:
        parse_beat_frame(dumps(with_(FRAME, **changes)))
    assert reason in str(info.value)
    assert info.value.kind == "beat frame"


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (b"not json", "not JSON"),
        (b"", "not JSON"),
        (b"[1,2]", "not a JSON object but list"),
        (b'"str"', "not a JSON object but str"),
        (b"null", "not a JSON object but NoneType"),
        (b'{"tempo_bpm": NaN}', "not JSON"),
        (b'{"tempo_bpm": Infinity}', "not JSON"),
        (b"\xff\xfe{}", "not JSON"),
        (b"[" * 100_000, "exceeds"),
        (b"[" * 50_000 + b"]" * 50_000, "exceeds"),
        (b"[" * 30_000, "not a JSON object (it starts with '['"),  # screened: never decoded
        (b" " * 2000 + b'{"type": "other"}', "unknown type (no"),  # screened: no frame type in it
    ],
)
def test_non_json_rejections(payload: bytes, reason: str) -> None:
    """Not UTF-8, not JSON, not an object, NaN, too deep, too big: a ProtocolError each time."""
    with pytest.raises(ProtocolError) as info:
        parse_beat_frame(payload)
    assert reason in str(info.value)


def test_oversized_message_rejected_unread() -> None:
    """A message over 64 KiB is rejected before it is decoded, even if it is valid JSON."""
    big = dumps(with_(FRAME, padding="x" * MAX_MESSAGE_BYTES))
    with pytest.raises(ProtocolError, match="exceeds"):
        parse_beat_frame(big)


def test_huge_numbers_rejected() -> None:
    """A float that overflows to infinity and a 5000-digit integer are rejected as ProtocolError."""
    with pytest.raises(ProtocolError):
        parse_beat_frame(dumps(FRAME).replace(b'"tempo_bpm": 2', b'"tempo_bpm": 1e999'))
    with pytest.raises(ProtocolError):
        parse_beat_frame(dumps(FRAME).replace(b'"beat_index": 12344', b'"beat_index": ' + b"9" * 5000))


def test_claim_parses_and_roundtrips() -> None:
    """A claim parses; encode() then parse gives the same claim; to_dict has every field."""
    claim = parse_status_claim(dumps(CLAIM))
    assert claim.phase == "started"
    assert claim.peer_count == 0
    assert parse_status_claim(claim.encode()) == claim
    assert claim.to_dict() == CLAIM


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        ({"type": "backbeat.beatframe.v1"}, "unknown type"),
        ({"agent_id": ...}, "missing required field 'agent_id'"),
        ({"node_id": ...}, "missing required field 'node_id'"),
        ({"task_id": ...}, "missing required field 'task_id'"),
        ({"beat_index": "3"}, "'beat_index' must be an integer"),
        ({"state": "running"}, "'state'='running' is not one of"),
        ({"state": ...}, "missing required field 'state'"),
        ({"beats_left": -1}, "'beats_left'=-1 is below 0"),
        ({"beats_left": 1.5}, "'beats_left' must be an integer"),
        ({"progress": 1.01}, "outside 0.0 <= x <= 1.0"),
        ({"progress": -0.1}, "outside 0.0 <= x <= 1.0"),
        ({"progress": "0.5"}, "'progress' must be a number"),
        ({"notes": ...}, "missing required field 'notes'"),
        ({"sent_at": ...}, "missing required field 'sent_at'"),
        ({"sent_at": "yesterday"}, "not an RFC 3339"),
        ({"phase": "sleeping"}, "'phase'='sleeping' is not one of"),
        ({"peer_count": -3}, "'peer_count'=-3 is below 0"),
        ({"operation_type": 4}, "'operation_type' must be a string"),
    ],
)
def test_claim_rejections(changes: dict[str, Any], reason: str) -> None:
    """Each broken claim rule raises ProtocolError saying which rule."""
    with pytest.raises(ProtocolError) as info:
        parse_status_claim(dumps(with_(CLAIM, **changes)))
    assert reason in str(info.value)


def test_parse_message_dispatches_on_type() -> None:
    """parse_message returns a frame or a claim by type, and rejects unknown types."""
    assert isinstance(parse_message(dumps(FRAME)), BeatFrame)
    assert isinstance(parse_message(dumps(CLAIM)), StatusClaim)
    with pytest.raises(ProtocolError, match="unknown type 'x'"):
        parse_message(b'{"type": "x"}')


def test_canonical_json_is_sorted_and_compact() -> None:
    """Canonical JSON: keys sorted, separators , and :, UTF-8, no whitespace."""
    assert canonical_json({"b": 1, "a": "é", "c": [1, 2]}) == '{"a":"é","b":1,"c":[1,2]}'.encode()
    frame = parse_beat_frame(dumps(FRAME))
    encoded = frame.encode()
    assert b" " not in encoded
    assert list(json.loads(encoded)) == sorted(json.loads(encoded))


def test_signing_bytes_exclude_sig() -> None:
    """The bytes a signature covers are the canonical JSON without sig (key_id included)."""
    frame = parse_beat_frame(dumps(with_(FRAME, sig="AAAA", key_id="pulse-1")))
    assert frame.sig == "AAAA"
    assert b'"sig"' not in frame.signing_bytes()
    assert b'"key_id":"pulse-1"' in frame.signing_bytes()
    assert b'"sig":"AAAA"' in frame.encode()


def test_claim_is_final() -> None:
    """done and failed operation claims are final; health claims never are."""
    claim = parse_status_claim(dumps(CLAIM))
    assert not claim.is_final
    assert parse_status_claim(dumps(with_(CLAIM, state="done"))).is_final
    assert parse_status_claim(dumps(with_(CLAIM, state="failed"))).is_final
    health = parse_status_claim(dumps(with_(CLAIM, task_id="chorus-p2p-health", state="failed")))
    assert not health.is_final


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=10),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)


@pytest.mark.timeout(600)  # CPU-bound: a loaded 2-core machine took 100 s for the slowest of these
@settings(max_examples=3000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=300))
def test_any_bytes_parse_or_reject(data: bytes) -> None:
    """Any bytes give a message or a ProtocolError, never another exception."""
    for parse in (parse_beat_frame, parse_status_claim, parse_message):
        try:
            parse(data)
        except ProtocolError:
            pass


@pytest.mark.timeout(600)  # CPU-bound: a loaded 2-core machine took 100 s for the slowest of these
@settings(max_examples=3000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(st.sampled_from(sorted(FRAME) + sorted(CLAIM)), json_values, max_size=14))
def test_any_object_parses_or_rejects(obj: dict[str, Any]) -> None:
    """Any JSON object, with the protocol's keys and arbitrary values, parses or is rejected cleanly."""
    for base in (FRAME, CLAIM):
        mixed = {**base, **obj}
        try:
            msg = parse_message(json.dumps(mixed))
        except ProtocolError:
            continue
        assert parse_message(msg.encode()) == msg


@pytest.mark.timeout(600)  # CPU-bound: a loaded 2-core machine took 100 s for the slowest of these
@settings(max_examples=2000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.sampled_from(sorted(FRAME)),
    json_values,
)
def test_one_field_mutated(key: str, value: Any) -> None:
    """Changing one field of a valid frame to any JSON value gives a frame or a ProtocolError."""
    try:
        frame = parse_beat_frame(json.dumps(with_(FRAME, **{key: value})))
    except ProtocolError:
        return
    assert parse_beat_frame(frame.encode()) == frame
