"""Tests for the JSON Schemas of the wire messages (backbeat_sync/schemas, docs/schemas).

The schemas are held to the strict parser: every message the library emits
validates, every message the parser accepts validates, and each rejection rule
of the parser is either enforced by the schema too or listed in
docs/protocol.md as one a JSON Schema cannot express (and the schema is checked
to let it through, so that list stays true).
"""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from backbeat_sync import (
    BackbeatConfig,
    BeatBudgetExceeded,
    BeatFrame,
    Integration,
    OperationPhase,
    ProtocolError,
    Pulse,
    StatusClaim,
    parse_beat_frame,
    parse_message,
    parse_status_claim,
    track_operation,
)
from backbeat_sync.schemas import SCHEMA_FILES, load_schema
from backbeat_sync.transport.local import LocalBus

from .natsserver import AsyncRunner, NatsServer, Witness
from .support import ManualPulse, unique_bus, wait_until

ROOT = Path(__file__).resolve().parent.parent
MAX = 2**63 - 1
SENT_AT = "2026-11-28T01:00:00.123Z"


def validator(kind: str) -> jsonschema.protocols.Validator:
    """A draft 2020-12 validator of the packaged schema (formats are annotations, as by default)."""
    schema = load_schema(kind)  # type: ignore[arg-type]
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    return cls(schema)  # type: ignore[no-any-return]


FRAME = validator("beat_frame")
CLAIM = validator("status_claim")


def schema_for(data: bytes) -> jsonschema.protocols.Validator:
    """The schema of a wire message by its ``type``."""
    kind = json.loads(data).get("type")
    return FRAME if kind == "backbeat.beatframe.v1" else CLAIM


def assert_valid(data: bytes) -> None:
    """``data`` validates against its schema (with the errors in the failure message)."""
    errors = [e.message for e in schema_for(data).iter_errors(json.loads(data))]
    assert errors == [], data


# -- the files ---------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", sorted(SCHEMA_FILES))
def test_schema_is_shipped_in_the_package_and_copied_in_the_docs(kind: str) -> None:
    """The docs/ copy is the packaged file, byte for byte; both are valid draft 2020-12 schemas."""
    name = SCHEMA_FILES[kind]
    packaged = (ROOT / "backbeat_sync" / "schemas" / name).read_text(encoding="utf-8")
    assert (ROOT / "docs" / "schemas" / name).read_text(encoding="utf-8") == packaged
    schema = json.loads(packaged)
    assert schema == load_schema(kind)  # type: ignore[arg-type]
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    jsonschema.Draft202012Validator.check_schema(schema)


def test_schemas_are_open_to_unknown_fields() -> None:
    """PROTOCOL.md: receivers ignore fields they do not know, so the schemas allow them too."""
    frame = BeatFrame(
        cluster_id="c", beat_index=1, downbeat=False, phase="upbeat", tempo_bpm=60, window_id="w-0"
    )
    obj = {**frame.to_dict(), "x_future": {"nested": [1, 2]}, "priority": "high"}
    assert parse_beat_frame(json.dumps(obj)) == frame
    assert FRAME.is_valid(obj)
    for kind in ("beat_frame", "status_claim"):
        assert load_schema(kind)["additionalProperties"] is True  # type: ignore[arg-type]


# -- what the library emits --------------------------------------------------------------------


def test_every_frame_and_claim_the_library_emits_validates() -> None:
    """Frames of our Pulse (signed and not) and every kind of claim of an Integration, as sent."""
    from backbeat_sync.signing import SigningKey, generate_private_key

    bus_name = unique_bus()
    bus = LocalBus.named(bus_name)
    wire: list[bytes] = []
    lock = threading.Lock()

    def record(_subject: str, data: bytes) -> None:
        with lock:
            wire.append(data)

    bus.subscribe("backbeat.>", record)
    key = generate_private_key()
    signer = SigningKey.load(key, "k1")
    for cluster, sign in (("plain", None), ("signed", signer.sign_frame)):
        cfg = BackbeatConfig(cluster_id=cluster, agent_id="pulse", nats_url=f"local://{bus_name}")
        with Pulse(cfg, tempo_bpm=6000, bar_length=3, sign=sign) as pulse:
            wait_until(lambda pulse=pulse: pulse.frames_sent >= 4, what="4 frames")  # type: ignore[misc]

    manual = ManualPulse(bus_name, "agents", tempo_bpm=600)
    cfg = BackbeatConfig(
        cluster_id="agents",
        agent_id="a1",
        nats_url=f"local://{bus_name}?pulse=manual",
        signing_key=key,
        signing_key_id="k1",
    )
    with Integration(cfg, node_id="12D3KooWAbc") as integration:
        manual.beat(1, wait=False)
        integration.start_p2p_operation("election-1", "election", 5, data={"quorum": 2})
        integration.update_p2p_operation_phase("election-1", OperationPhase.NEGOTIATING, 3)
        integration.complete_p2p_operation("election-1", 3)
        integration.start_p2p_operation("dht-1", "dht_store", 3)
        integration.fail_p2p_operation("dht-1", 'a "quoted" reason, ünïcode')
        with track_operation("t-1", "custom_type", beats=100, integration=integration) as op:
            op.set_phase(OperationPhase.EXECUTING, peers=5)
        for index in range(2, 12):  # a health claim every 8 beats, and a claim per beat of each active op
            manual.beat(index, wait=False)
            wait_until(lambda index=index: integration.get_health()["current_beat"] >= index)  # type: ignore[misc]
        with (
            pytest.raises(BeatBudgetExceeded),
            track_operation("t-2", "pubsub_sync", beats=0.5, integration=integration) as spent,
        ):
            spent.sleep(60)  # interrupted after half a beat (50 ms at 600 BPM)
        wait_until(lambda: any(b"chorus-p2p-health" in m for m in wire), what="a health claim")

    with lock:
        messages = list(wire)
    kinds = {json.loads(m)["type"] for m in messages}
    assert kinds == {"backbeat.beatframe.v1", "backbeat.statusclaim.v1"}
    claims = [json.loads(m) for m in messages if b"statusclaim" in m]
    assert {c["state"] for c in claims} >= {"executing", "done", "failed"}
    assert any(c["task_id"] == "chorus-p2p-health" for c in claims)
    assert all("sig" in c for c in claims)  # signed, key_id and sig included
    assert any("sig" in json.loads(m) for m in messages if b"beatframe" in m)
    for data in messages:
        assert_valid(data)
        parse_message(data)  # and the parser agrees


@pytest.mark.nats
def test_what_goes_on_nats_validates(nats_server: NatsServer, nats_runner: AsyncRunner) -> None:
    """The bytes a real server carries (the NATS transport's encoder, the pulse link's) validate."""
    witness = Witness(nats_runner, nats_server.url, "backbeat.>")
    try:
        cfg = BackbeatConfig(cluster_id="wire", agent_id="a1", nats_url=nats_server.url)
        with Pulse(cfg, tempo_bpm=1200), Integration(cfg, node_id="n1") as integration:
            wait_until(lambda: integration.get_health()["beats_received"] >= 1, what="a beat")
            integration.start_p2p_operation("e-1", "election", 5)
            integration.complete_p2p_operation("e-1", 2)
            witness.wait_for(lambda ms: any(m.get("state") == "done" for m in ms), what="the final claim")
        messages = list(witness.messages)
    finally:
        witness.close()
    assert len(messages) >= 3
    for data in messages:
        assert_valid(data)


# -- what the parser accepts -------------------------------------------------------------------

tokens = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=20)
timestamps = st.datetimes(min_value=datetime(1000, 1, 1)).map(
    lambda d: d.strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"
)


@settings(max_examples=200, deadline=None)
@given(
    cluster=tokens,
    index=st.integers(0, MAX),
    downbeat=st.booleans(),
    tempo=st.one_of(st.integers(1, 6000), st.floats(1e-6, 6000, allow_nan=False)),
    bar=st.integers(1, MAX),
    sent=st.one_of(st.none(), timestamps),
)
def test_frames_the_parser_accepts_validate(
    cluster: str, index: int, downbeat: bool, tempo: float, bar: int, sent: str | None
) -> None:
    """Any frame built in range encodes to JSON that both the parser and the schema accept."""
    frame = BeatFrame(
        cluster_id=cluster,
        beat_index=index,
        downbeat=downbeat,
        phase="p",
        tempo_bpm=tempo,
        window_id="w",
        bar_length=bar,
        sent_at=sent,
    )
    data = frame.encode()
    assert parse_beat_frame(data) == frame
    assert_valid(data)


@settings(max_examples=200, deadline=None)
@given(
    task=tokens,
    index=st.integers(-MAX, MAX),
    state=st.sampled_from(["waiting", "executing", "done", "failed"]),
    left=st.integers(0, MAX),
    progress=st.floats(0.0, 1.0),
    phase=st.one_of(
        st.none(),
        st.sampled_from(["started", "connecting", "negotiating", "executing", "completed", "failed"]),
    ),
    peers=st.one_of(st.none(), st.integers(0, MAX)),
    sent=timestamps,
)
def test_claims_the_parser_accepts_validate(
    task: str,
    index: int,
    state: str,
    left: int,
    progress: float,
    phase: str | None,
    peers: int | None,
    sent: str,
) -> None:
    """Any claim built in range encodes to JSON that both the parser and the schema accept."""
    claim = StatusClaim(
        cluster_id="c",
        agent_id="a",
        node_id="n",
        task_id=task,
        beat_index=index,
        state=state,
        beats_left=left,
        progress=progress,
        notes="x",
        sent_at=sent,
        operation_type="election",
        phase=phase,
        peer_count=peers,
    )
    data = claim.encode()
    assert parse_status_claim(data) == claim
    assert_valid(data)


# -- the parser's rejection rules --------------------------------------------------------------

FRAME_OK: dict[str, Any] = BeatFrame(
    cluster_id="c",
    beat_index=8,
    downbeat=True,
    phase="downbeat",
    tempo_bpm=60,
    window_id="w-2",
    sent_at=SENT_AT,
    deadline_at=SENT_AT,
).to_dict()
CLAIM_OK: dict[str, Any] = StatusClaim(
    cluster_id="c",
    agent_id="a",
    node_id="n",
    task_id="t",
    beat_index=3,
    state="executing",
    beats_left=2,
    progress=0.5,
    notes="P2P election: executing (peers: 3, node: n)",
    sent_at=SENT_AT,
    operation_type="election",
    phase="executing",
    peer_count=3,
).to_dict()


def without(obj: dict[str, Any], key: str) -> dict[str, Any]:
    """``obj`` without ``key``."""
    return {k: v for k, v in obj.items() if k != key}


def changed(obj: dict[str, Any], **fields: Any) -> dict[str, Any]:
    """``obj`` with ``fields`` set."""
    return {**obj, **fields}


# (rule, base kind, the offending JSON text, what the parser's message says)
# Each raise site of backbeat_sync/protocol.py has a case; a JSON Schema enforces all of these.
EXPRESSIBLE: list[tuple[str, str, Any, str]] = [
    ("not an object", "frame", [FRAME_OK], "not a JSON object but list"),
    # over 1 KiB the parser screens before decoding (protocol._screen): same rules, cheaper
    ("not an object, screened", "frame", [FRAME_OK] * 10, "not a JSON object (it starts with '['"),
    ("unknown type, screened", "frame", changed(FRAME_OK, type="other", pad="y" * 2000), "unknown type (no"),
    ("unknown type", "frame", changed(FRAME_OK, type="backbeat.beatframe.v2"), "unknown type"),
    ("type not a string", "frame", changed(FRAME_OK, type=1), "'type' must be a string"),
    *[
        (f"frame missing {key}", "frame", without(FRAME_OK, key), f"missing required field '{key}'")
        for key in ("type", "cluster_id", "beat_index", "downbeat", "phase", "tempo_bpm", "window_id")
    ],
    *[
        (f"claim missing {key}", "claim", without(CLAIM_OK, key), f"missing required field '{key}'")
        for key in (
            "type",
            "cluster_id",
            "agent_id",
            "node_id",
            "task_id",
            "beat_index",
            "state",
            "beats_left",
            "progress",
            "notes",
            "sent_at",
        )
    ],
    (
        "string field not a string",
        "frame",
        changed(FRAME_OK, cluster_id=5),
        "'cluster_id' must be a string, not int",
    ),
    (
        "window_id not a string",
        "frame",
        changed(FRAME_OK, window_id=None),
        "'window_id' must be a string, not NoneType",
    ),
    ("sig not a string", "frame", changed(FRAME_OK, sig=1), "'sig' must be a string"),
    ("key_id not a string", "claim", changed(CLAIM_OK, key_id=[]), "'key_id' must be a string"),
    (
        "operation_type not a string",
        "claim",
        changed(CLAIM_OK, operation_type=3),
        "'operation_type' must be a string",
    ),
    (
        "integer field a string",
        "frame",
        changed(FRAME_OK, beat_index="8"),
        "'beat_index' must be an integer, not str",
    ),
    (
        "integer field a boolean",
        "claim",
        changed(CLAIM_OK, beats_left=True),
        "'beats_left' must be an integer, not bool",
    ),
    (
        "integer field a fraction",
        "frame",
        changed(FRAME_OK, bar_length=4.5),
        "'bar_length' must be an integer, not float",
    ),
    ("beat_index below 0", "frame", changed(FRAME_OK, beat_index=-1), "'beat_index'=-1 is below 0"),
    ("bar_length below 1", "frame", changed(FRAME_OK, bar_length=0), "'bar_length'=0 is below 1"),
    ("beats_left below 0", "claim", changed(CLAIM_OK, beats_left=-1), "is below 0"),
    ("peer_count below 0", "claim", changed(CLAIM_OK, peer_count=-2), "is below 0"),
    ("integer over 64 bits", "frame", changed(FRAME_OK, beat_index=2**63), "does not fit in 64 bits"),
    (
        "claim beat_index over 64 bits",
        "claim",
        changed(CLAIM_OK, beat_index=-(2**63)),
        "does not fit in 64 bits",
    ),
    (
        "downbeat not a boolean",
        "frame",
        changed(FRAME_OK, downbeat=1),
        "'downbeat' must be a boolean, not int",
    ),
    (
        "number field a string",
        "frame",
        changed(FRAME_OK, tempo_bpm="60"),
        "'tempo_bpm' must be a number, not str",
    ),
    (
        "number field a boolean",
        "claim",
        changed(CLAIM_OK, progress=False),
        "'progress' must be a number, not bool",
    ),
    (
        "number out of float range",
        "frame",
        changed(FRAME_OK, tempo_bpm=10**400),
        "'tempo_bpm' is out of range",
    ),
    (
        "number not finite (1e400)",
        "frame",
        json.dumps(FRAME_OK).replace('"tempo_bpm": 60', '"tempo_bpm": 1e400'),
        "'tempo_bpm' must be finite",
    ),
    ("tempo zero", "frame", changed(FRAME_OK, tempo_bpm=0), "is outside 0 < x <= 6000"),
    ("tempo above 6000", "frame", changed(FRAME_OK, tempo_bpm=6000.5), "is outside 0 < x <= 6000"),
    ("progress above 1", "claim", changed(CLAIM_OK, progress=1.01), "is outside 0.0 <= x <= 1.0"),
    ("progress below 0", "claim", changed(CLAIM_OK, progress=-0.01), "is outside 0.0 <= x <= 1.0"),
    ("unknown state", "claim", changed(CLAIM_OK, state="running"), "'state'='running' is not one of"),
    ("unknown phase", "claim", changed(CLAIM_OK, phase="dancing"), "'phase'='dancing' is not one of"),
    (
        "unknown budget_source",
        "claim",
        changed(CLAIM_OK, budget_source="guess"),
        "field 'budget_source'='guess' is not one of",
    ),
    (
        "unknown priority",
        "claim",
        changed(CLAIM_OK, priority="urgent"),
        "field 'priority'='urgent' is not one of",
    ),
    ("work_done above 1", "claim", changed(CLAIM_OK, work_done=1.5), "field 'work_done'=1.5 is outside"),
    ("eta_beats below 0", "claim", changed(CLAIM_OK, eta_beats=-1), "field 'eta_beats'=-1 is below 0"),
    (
        "details not an object",
        "claim",
        changed(CLAIM_OK, details=[1]),
        "field 'details' must be an object, not list",
    ),
    (
        "depends_on not strings",
        "claim",
        changed(CLAIM_OK, depends_on=[1]),
        "field 'depends_on' must be an array of strings",
    ),
    (
        "timestamp without Z",
        "claim",
        changed(CLAIM_OK, sent_at="2026-11-28T01:00:00+00:00"),
        "is not an RFC 3339 UTC timestamp ending in Z",
    ),
    (
        "timestamp with a space",
        "frame",
        changed(FRAME_OK, sent_at="2026-11-28 01:00:00Z"),
        "is not an RFC 3339 UTC timestamp ending in Z",
    ),
    (
        "month 13",
        "frame",
        changed(FRAME_OK, deadline_at="2026-13-01T00:00:00Z"),
        "is not a real date and time",
    ),
    ("hour 24", "claim", changed(CLAIM_OK, sent_at="2026-11-28T24:00:00Z"), "is not a real date and time"),
]

# The rules no JSON Schema can express (docs/protocol.md lists them): raw text in, parser's message.
NOT_EXPRESSIBLE: list[tuple[str, str, str, str]] = [
    (
        "larger than 64 KiB",
        "frame",
        json.dumps(changed(FRAME_OK, window_id="w" * 70_000)),
        "bytes exceeds 65536",
    ),
    ("not UTF-8", "frame", "\udcff", "not JSON"),
    ("not JSON", "frame", '{"type": ', "not JSON"),
    ("NaN", "claim", json.dumps(CLAIM_OK).replace('"progress": 0.5', '"progress": NaN'), "not JSON"),
    (
        "Infinity",
        "frame",
        json.dumps(FRAME_OK).replace('"tempo_bpm": 60', '"tempo_bpm": Infinity'),
        "not JSON",
    ),
    (
        "an integer written 8.0",
        "frame",
        json.dumps(FRAME_OK).replace('"beat_index": 8', '"beat_index": 8.0'),
        "must be an integer",
    ),
    (
        "an integer written 8e0",
        "claim",
        json.dumps(CLAIM_OK).replace('"beats_left": 2', '"beats_left": 2e0'),
        "must be an integer",
    ),
    (
        "a day the month lacks",
        "frame",
        json.dumps(changed(FRAME_OK, sent_at="2026-02-30T00:00:00Z")),
        "not a real date",
    ),
]


def parse(kind: str, text: str) -> Callable[[], Any]:
    """The parser call for ``kind``."""
    fn = parse_beat_frame if kind == "frame" else parse_status_claim
    return lambda: fn(text.encode("utf-8", "surrogatepass"))


@pytest.mark.parametrize(("rule", "kind", "obj", "message"), EXPRESSIBLE, ids=[c[0] for c in EXPRESSIBLE])
def test_each_rejection_rule_is_enforced_by_the_schema(rule: str, kind: str, obj: Any, message: str) -> None:
    """The parser rejects the message naming the rule, and the schema rejects it too."""
    text = obj if isinstance(obj, str) else json.dumps(obj)
    with pytest.raises(ProtocolError) as info:
        parse(kind, text)()
    assert message in str(info.value)
    assert not (FRAME if kind == "frame" else CLAIM).is_valid(json.loads(text))


@pytest.mark.parametrize(
    ("rule", "kind", "text", "message"), NOT_EXPRESSIBLE, ids=[c[0] for c in NOT_EXPRESSIBLE]
)
def test_the_rules_a_schema_cannot_express_are_the_documented_ones(
    rule: str, kind: str, text: str, message: str
) -> None:
    """The parser rejects it; a schema validator either cannot read it or lets it through (as documented)."""
    with pytest.raises(ProtocolError) as info:
        parse(kind, text)()
    assert message in str(info.value)
    try:
        decoded = json.loads(text)  # Python's json reads NaN/Infinity; a strict JSON reader would not
    except ValueError:
        return  # not JSON at all: nothing for a schema to validate
    if rule in ("NaN", "Infinity"):
        return  # not JSON by RFC 8259: outside what a schema validates
    assert (FRAME if kind == "frame" else CLAIM).is_valid(decoded), rule


def test_the_rules_a_schema_cannot_express_are_listed_in_the_docs() -> None:
    """docs/protocol.md names each rule of NOT_EXPRESSIBLE (in bold) after 'cannot express'."""
    doc = (ROOT / "docs" / "protocol.md").read_text(encoding="utf-8")
    listed = doc[doc.index("cannot express") :]
    assert [rule for rule, *_ in NOT_EXPRESSIBLE if f"**{rule}**" not in listed] == []


def test_an_unknown_type_is_neither_message() -> None:
    """parse_message rejects a type it does not know; neither schema accepts it (their type is a const)."""
    obj = changed(FRAME_OK, type="backbeat.tempo.v1")
    with pytest.raises(ProtocolError, match=re.escape("unknown type 'backbeat.tempo.v1'")):
        parse_message(json.dumps(obj))
    assert not FRAME.is_valid(obj)
    assert not CLAIM.is_valid(obj)


def test_every_raise_site_of_the_parser_has_a_case() -> None:
    """The literal text of each ``raise ProtocolError(...)`` in protocol.py appears in a case above."""
    source = (ROOT / "backbeat_sync" / "protocol.py").read_text(encoding="utf-8")
    templates = re.findall(r'raise ProtocolError\([^,]+, f?"([^"]+)"', source)
    assert len(templates) >= 20
    messages = [c[3] for c in EXPRESSIBLE] + [c[3] for c in NOT_EXPRESSIBLE]
    uncovered = []
    for template in templates:
        literal = max((part.strip(" '=(),") for part in re.split(r"\{[^}]*\}", template)), key=len)
        if not any(literal in message for message in messages):
            uncovered.append(template)
    assert uncovered == []
