"""The wire contract: :class:`BeatFrame` and :class:`StatusClaim` (BACKBEAT v1).

Parsing is strict: anything that breaks a rule of the contract raises
:class:`~backbeat_sync.ProtocolError` naming the rule, and never any other
exception, whatever the bytes. Encoding is canonical JSON (sorted keys, no
whitespace, UTF-8), which is also what a signature covers.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from datetime import datetime
from typing import Any, ClassVar, Final, TypeVar

import attrs

from .errors import InvalidArgument, ProtocolError

__all__ = [
    "BEAT_FRAME_TYPE",
    "CLAIM_STATES",
    "HEALTH_TASK_ID",
    "MAX_ID_BYTES",
    "MAX_MESSAGE_BYTES",
    "MAX_REASON_BYTES",
    "MAX_TEMPO_BPM",
    "PHASE_NAMES",
    "PRIORITY_NAMES",
    "STATUS_CLAIM_TYPE",
    "TRUNCATED",
    "BeatFrame",
    "StatusClaim",
    "canonical_json",
    "check_wire_id",
    "fit_text",
    "parse_beat_frame",
    "parse_message",
    "parse_status_claim",
    "shorten_notes",
    "wire_json",
]

BEAT_FRAME_TYPE: Final = "backbeat.beatframe.v1"
STATUS_CLAIM_TYPE: Final = "backbeat.statusclaim.v1"
HEALTH_TASK_ID: Final = "chorus-p2p-health"
MAX_MESSAGE_BYTES: Final = 64 * 1024
#: The longest operation id or type (UTF-8 bytes) the API accepts: a claim must fit in a message.
MAX_ID_BYTES: Final = 256
#: The longest failure reason (UTF-8 bytes) a claim's notes carry; a longer one is truncated.
#: Even if every byte were a character JSON escapes six-fold, the claim stays under 64 KiB.
MAX_REASON_BYTES: Final = 8 * 1024
#: What ends a text the library shortened to make a claim fit (reason, notes).
TRUNCATED: Final = " [truncated]"
MAX_TEMPO_BPM: Final = 6000.0
DEFAULT_BAR_LENGTH: Final = 4
CLAIM_STATES: Final = frozenset({"waiting", "executing", "done", "failed"})
PHASE_NAMES: Final = ("started", "connecting", "negotiating", "executing", "completed", "failed")
_PHASE_SET: Final = frozenset(PHASE_NAMES)
PRIORITY_NAMES: Final = ("critical", "high", "normal", "low")
_PRIORITY_SET: Final = frozenset(PRIORITY_NAMES)

_TIMESTAMP = re.compile(r"\A\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d{1,9})?Z\Z")

_FRAME: Final = "beat frame"
_CLAIM: Final = "status claim"


_orjson: Any
try:  # the ``fast`` extra: about 5x faster encoding on the claim hot path
    import orjson as _orjson
except ImportError:  # pragma: no cover - exercised when the extra is absent
    _orjson = None


def wire_json(obj: Mapping[str, Any]) -> bytes:
    """Encode ``obj`` for the wire: compact, keys sorted, UTF-8 (orjson when installed).

    The bytes a signature covers are always :func:`canonical_json`; a verifier
    re-canonicalises what it receives, so the encoder used here does not matter to it.
    """
    if _orjson is not None:
        encoded: bytes = _orjson.dumps(obj, option=_orjson.OPT_SORT_KEYS)
        return encoded
    return canonical_json(obj)


def canonical_json(obj: Mapping[str, Any]) -> bytes:
    """Encode ``obj`` as canonical JSON: keys sorted, separators ``,`` and ``:``, UTF-8, no NaN."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode(
        "utf-8"
    )


def check_wire_id(name: str, value: Any) -> None:
    """Refuse ``value`` as an operation id or type: not a non-empty string of at most 256 UTF-8 bytes.

    Args:
        name: the argument, for the error.
        value: what the caller passed.

    Raises:
        InvalidArgument: ``value`` is not a string, is empty, or is longer than
            :data:`MAX_ID_BYTES` (the message shows its start and its size, not all of it).
    """
    if not isinstance(value, str) or not value:
        raise InvalidArgument(name, value, "must be a non-empty string")
    if len(value) > MAX_ID_BYTES // 4:  # at most 4 bytes a character: shorter ones always fit
        size = len(value.encode("utf-8", "surrogatepass"))
        if size > MAX_ID_BYTES:
            shown = f"{value[:32]}... ({size} bytes)"
            raise InvalidArgument(name, shown, f"must be at most {MAX_ID_BYTES} bytes of UTF-8")


def fit_text(text: str, max_bytes: int) -> str:
    """``text`` if its UTF-8 fits in ``max_bytes``, else its start ending in :data:`TRUNCATED` that fits.

    Cuts on a character boundary; the result's UTF-8 is at most ``max_bytes``
    long (``max_bytes`` >= the marker's 12 bytes).

    >>> fit_text("abcdef", 100)
    'abcdef'
    >>> fit_text("r" * 100, 20)
    'rrrrrrrr [truncated]'
    """
    if len(text) * 4 <= max_bytes:
        return text
    data = text.encode("utf-8", "surrogatepass")
    if len(data) <= max_bytes:
        return text
    keep = max(0, max_bytes - len(TRUNCATED))
    return data[:keep].decode("utf-8", "ignore") + TRUNCATED


def _json_size(char: str) -> int:
    """Bytes ``char`` takes inside a JSON string (as :func:`canonical_json` and orjson write it)."""
    code = ord(char)
    if code < 0x20:
        return 2 if char in "\b\f\n\r\t" else 6
    if char in '"\\':
        return 2
    return 1 if code < 0x80 else len(char.encode("utf-8", "surrogatepass"))


def shorten_notes(claim: StatusClaim, over: int) -> StatusClaim | None:
    """A copy of ``claim`` whose encoding is at least ``over`` bytes shorter, by truncating ``notes``.

    Characters are cut from the end of ``notes`` until they free ``over``
    bytes of the JSON encoding plus the marker's; the marker
    (:data:`TRUNCATED`) then ends the notes.

    Returns:
        The shorter claim (unsigned: the encoder signs it), or None if all of
        ``notes`` cannot free ``over`` bytes.
    """
    notes = claim.notes
    need = over + len(TRUNCATED)
    cut, freed = len(notes), 0
    while freed < need:
        if cut == 0:
            return None
        cut -= 1
        freed += _json_size(notes[cut])
    return attrs.evolve(claim, notes=notes[:cut] + TRUNCATED, sig=None, key_id=None, raw=None)


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


#: Past this size a payload is screened before it is decoded (see :func:`_screen`).
SCREEN_BYTES: Final = 1024
_FIRST_BYTE = re.compile(rb"[ \t\n\r]*(.)", re.S)


def _screen(data: bytes, kind: str, type_literal: bytes) -> None:
    """Reject, without decoding it, a payload that cannot be a message of this kind.

    Decoding 64 KiB of JSON costs tens of microseconds; a junk flood should not. Both
    tests are exact (no valid message fails them): a JSON object starts with ``{``
    (after whitespace), and a message whose ``type`` is ``"backbeat.beatframe.v1"``
    holds that string literally unless it has an escape (a backslash) in it.
    Small payloads are not screened: decoding them is cheap and names the reason
    more precisely.
    """
    first = _FIRST_BYTE.match(data)
    if first is None or first.group(1) != b"{":
        what = repr(first.group(1).decode("latin-1")) if first is not None else "nothing"
        raise ProtocolError(kind, f"not a JSON object (it starts with {what}, not '{{')")
    if b"\\" not in data and type_literal not in data:  # one byte: a memchr, the cheaper test first
        raise ProtocolError(kind, f"unknown type (no {type_literal.decode()} in the message)")


def _load(data: bytes | bytearray | memoryview | str, kind: str) -> dict[str, Any]:
    if len(data) > MAX_MESSAGE_BYTES:
        raise ProtocolError(kind, f"message of {len(data)} bytes exceeds {MAX_MESSAGE_BYTES}")
    try:
        text = data if isinstance(data, str) else bytes(data).decode("utf-8")
        obj = json.loads(text, parse_constant=_reject_constant)
    except (ValueError, RecursionError) as exc:
        raise ProtocolError(kind, f"not JSON ({type(exc).__name__})") from None
    if not isinstance(obj, dict):
        raise ProtocolError(kind, f"not a JSON object but {type(obj).__name__}")
    return obj


def _str(obj: Mapping[str, Any], key: str, kind: str, *, required: bool = True) -> Any:
    if key not in obj:
        if required:
            raise ProtocolError(kind, f"missing required field {key!r}")
        return None
    value = obj[key]
    if not isinstance(value, str):
        raise ProtocolError(kind, f"field {key!r} must be a string, not {type(value).__name__}")
    return value


def _int(
    obj: Mapping[str, Any], key: str, kind: str, *, minimum: int | None = 0, required: bool = True
) -> Any:
    if key not in obj:
        if required:
            raise ProtocolError(kind, f"missing required field {key!r}")
        return None
    value = obj[key]
    if isinstance(value, bool) or not isinstance(value, int):
        raise ProtocolError(kind, f"field {key!r} must be an integer, not {type(value).__name__}")
    if minimum is not None and value < minimum:
        raise ProtocolError(kind, f"field {key!r}={value} is below {minimum}")
    if value.bit_length() > 63:
        raise ProtocolError(kind, f"field {key!r} does not fit in 64 bits")
    return value


def _number(obj: Mapping[str, Any], key: str, kind: str, *, required: bool = True) -> Any:
    if key not in obj:
        if not required:
            return None
        raise ProtocolError(kind, f"missing required field {key!r}")
    value = obj[key]
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ProtocolError(kind, f"field {key!r} must be a number, not {type(value).__name__}")
    try:
        number = float(value)
    except OverflowError:
        raise ProtocolError(kind, f"field {key!r} is out of range") from None
    if not math.isfinite(number):
        raise ProtocolError(kind, f"field {key!r} must be finite")
    return value  # as sent (int or float), so re-encoding gives the same JSON


def _bool(obj: Mapping[str, Any], key: str, kind: str) -> bool:
    if key not in obj:
        raise ProtocolError(kind, f"missing required field {key!r}")
    value = obj[key]
    if not isinstance(value, bool):
        raise ProtocolError(kind, f"field {key!r} must be a boolean, not {type(value).__name__}")
    return value


def _timestamp(obj: Mapping[str, Any], key: str, kind: str, *, required: bool) -> Any:
    value = _str(obj, key, kind, required=required)
    if value is None:
        return None
    if not _TIMESTAMP.match(value):
        raise ProtocolError(kind, f"field {key!r}={value!r} is not an RFC 3339 UTC timestamp ending in Z")
    try:
        datetime.strptime(value[:19], "%Y-%m-%dT%H:%M:%S")
    except ValueError:
        raise ProtocolError(kind, f"field {key!r}={value!r} is not a real date and time") from None
    return value


def _type(obj: Mapping[str, Any], expected: str, kind: str) -> None:
    value = _str(obj, "type", kind)
    if value != expected:
        raise ProtocolError(kind, f"unknown type {value!r} (expected {expected!r})")


def _signature(obj: Mapping[str, Any], kind: str) -> tuple[str | None, str | None]:
    return _str(obj, "sig", kind, required=False), _str(obj, "key_id", kind, required=False)


M = TypeVar("M", bound="_Message")


class _Message:
    """What both message kinds share: encoding, signing bytes, parsing."""

    __slots__ = ()
    _KIND: ClassVar[str]
    _TYPE_LITERAL: ClassVar[bytes]  #: the ``type`` value as it appears in JSON, quotes included
    raw: Mapping[str, Any] | None
    sig: str | None
    key_id: str | None

    def to_dict(self, *, signed: bool = True) -> dict[str, Any]:  # pragma: no cover - overridden
        """The JSON object of this message; optional fields only when set."""
        raise NotImplementedError

    def _finish_dict(self, d: dict[str, Any], optional: Mapping[str, Any], signed: bool) -> dict[str, Any]:
        d.update((k, v) for k, v in optional.items() if v is not None)
        if self.key_id is not None:
            d["key_id"] = self.key_id
        if signed and self.sig is not None:
            d["sig"] = self.sig
        return d

    def encode(self) -> bytes:
        """Compact JSON bytes of this message, keys sorted (see :func:`wire_json`)."""
        return wire_json(self.to_dict())

    def signing_bytes(self) -> bytes:
        """The canonical JSON a signature covers: the message without ``sig``.

        For a parsed message this is the object as received (unknown fields and
        number spellings included), so a signature made by any peer verifies.
        """
        if self.raw is None:
            return canonical_json(self.to_dict(signed=False))
        return canonical_json({k: v for k, v in self.raw.items() if k != "sig"})

    @classmethod
    def from_dict(cls: type[M], obj: Mapping[str, Any]) -> M:  # pragma: no cover - overridden
        """Validate a decoded JSON object as this kind of message."""
        raise NotImplementedError

    @classmethod
    def parse(cls: type[M], data: bytes | bytearray | memoryview | str) -> M:
        """Parse a message of this kind from the wire (see :func:`parse_beat_frame`).

        Raises:
            ProtocolError: it breaks a rule of the contract.
        """
        if SCREEN_BYTES < len(data) <= MAX_MESSAGE_BYTES and not isinstance(data, str):
            _screen(data if isinstance(data, bytes) else bytes(data), cls._KIND, cls._TYPE_LITERAL)
        return cls.from_dict(_load(data, cls._KIND))


@attrs.frozen
class BeatFrame(_Message):
    """One beat of the cluster's metronome (pulse -> agents).

    Example:
        >>> f = BeatFrame(cluster_id="dev", beat_index=8, downbeat=True, phase="downbeat",
        ...               tempo_bpm=2, window_id="w-2")
        >>> BeatFrame.parse(f.encode()) == f
        True
    """

    _KIND: ClassVar[str] = _FRAME
    _TYPE_LITERAL: ClassVar[bytes] = b'"' + BEAT_FRAME_TYPE.encode() + b'"'

    cluster_id: str
    beat_index: int
    downbeat: bool
    phase: str
    tempo_bpm: float
    window_id: str
    bar_length: int = DEFAULT_BAR_LENGTH
    sent_at: str | None = None
    deadline_at: str | None = None
    sig: str | None = attrs.field(default=None, repr=False)
    key_id: str | None = None
    #: The decoded JSON object this message was parsed from (None when built in code).
    raw: Mapping[str, Any] | None = attrs.field(default=None, eq=False, repr=False)

    @property
    def beat_duration(self) -> float:
        """Seconds per beat at this frame's tempo."""
        return 60.0 / self.tempo_bpm

    def to_dict(self, *, signed: bool = True) -> dict[str, Any]:
        """The JSON object of this frame; optional fields only when set.

        Args:
            signed: include ``sig`` (False gives the bytes a signature covers).
        """
        d: dict[str, Any] = {
            "type": BEAT_FRAME_TYPE,
            "cluster_id": self.cluster_id,
            "beat_index": self.beat_index,
            "downbeat": self.downbeat,
            "phase": self.phase,
            "tempo_bpm": self.tempo_bpm,
            "window_id": self.window_id,
            "bar_length": self.bar_length,
        }
        return self._finish_dict(d, {"sent_at": self.sent_at, "deadline_at": self.deadline_at}, signed)

    @classmethod
    def from_dict(cls, obj: Mapping[str, Any]) -> BeatFrame:
        """Validate a decoded JSON object as a beat frame.

        Raises:
            ProtocolError: a rule of the contract is broken (the message says which).
        """
        k = _FRAME
        if not isinstance(obj, Mapping):
            raise ProtocolError(k, f"not a JSON object but {type(obj).__name__}")
        _type(obj, BEAT_FRAME_TYPE, k)
        tempo = _number(obj, "tempo_bpm", k)
        if not 0 < tempo <= MAX_TEMPO_BPM:
            raise ProtocolError(k, f"field 'tempo_bpm'={tempo!r} is outside 0 < x <= {MAX_TEMPO_BPM:g}")
        bar = _int(obj, "bar_length", k, minimum=1, required=False)
        sig, key_id = _signature(obj, k)
        return cls(
            cluster_id=_str(obj, "cluster_id", k),
            beat_index=_int(obj, "beat_index", k),
            downbeat=_bool(obj, "downbeat", k),
            phase=_str(obj, "phase", k),
            tempo_bpm=tempo,
            window_id=_str(obj, "window_id", k),
            bar_length=DEFAULT_BAR_LENGTH if bar is None else bar,
            sent_at=_timestamp(obj, "sent_at", k, required=False),
            deadline_at=_timestamp(obj, "deadline_at", k, required=False),
            sig=sig,
            key_id=key_id,
            raw=obj,
        )


@attrs.frozen
class StatusClaim(_Message):
    """What an agent says about one operation, or about its own health (agent -> cluster).

    Example:
        >>> c = StatusClaim(cluster_id="dev", agent_id="a1", node_id="n1", task_id="t",
        ...                 beat_index=3, state="executing", beats_left=2, progress=0.5,
        ...                 notes="P2P election: executing (peers: 3, node: n1)",
        ...                 sent_at="2026-11-28T01:00:00.000Z")
        >>> StatusClaim.parse(c.encode()) == c
        True
    """

    _KIND: ClassVar[str] = _CLAIM
    _TYPE_LITERAL: ClassVar[bytes] = b'"' + STATUS_CLAIM_TYPE.encode() + b'"'

    cluster_id: str
    agent_id: str
    node_id: str
    task_id: str
    beat_index: int
    state: str
    beats_left: int
    progress: float
    notes: str
    sent_at: str
    operation_type: str | None = None
    phase: str | None = None
    peer_count: int | None = None
    sig: str | None = attrs.field(default=None, repr=False)
    key_id: str | None = None
    #: The decoded JSON object this message was parsed from (None when built in code).
    raw: Mapping[str, Any] | None = attrs.field(default=None, eq=False, repr=False)
    #: Where an automatic budget came from: ``fixed``, ``profile`` or ``history`` (optional).
    budget_source: str | None = None
    # Optional workflow fields (docs/protocol.md, "Workflow fields"); None: not sent.
    parent_id: str | None = None
    correlation_id: str | None = None
    depends_on: tuple[str, ...] | None = None
    priority: str | None = None
    work_done: float | None = None
    details: Mapping[str, Any] | None = attrs.field(default=None, hash=False)
    eta_beats: float | None = None

    @property
    def is_final(self) -> bool:
        """True for a ``done`` or ``failed`` operation claim (these are never dropped)."""
        return self.state in ("done", "failed") and self.task_id != HEALTH_TASK_ID

    def to_dict(self, *, signed: bool = True) -> dict[str, Any]:
        """The JSON object of this claim; optional fields only when set.

        Args:
            signed: include ``sig`` (False gives the bytes a signature covers).
        """
        d: dict[str, Any] = {
            "type": STATUS_CLAIM_TYPE,
            "cluster_id": self.cluster_id,
            "agent_id": self.agent_id,
            "node_id": self.node_id,
            "task_id": self.task_id,
            "beat_index": self.beat_index,
            "state": self.state,
            "beats_left": self.beats_left,
            "progress": self.progress,
            "notes": self.notes,
            "sent_at": self.sent_at,
        }
        optional = {
            "operation_type": self.operation_type,
            "phase": self.phase,
            "peer_count": self.peer_count,
            "budget_source": self.budget_source,
            "parent_id": self.parent_id,
            "correlation_id": self.correlation_id,
            "depends_on": None if self.depends_on is None else list(self.depends_on),
            "priority": self.priority,
            "work_done": self.work_done,
            "details": None if self.details is None else dict(self.details),
            "eta_beats": self.eta_beats,
        }
        return self._finish_dict(d, optional, signed)

    @classmethod
    def from_dict(cls, obj: Mapping[str, Any]) -> StatusClaim:
        """Validate a decoded JSON object as a status claim.

        Raises:
            ProtocolError: a rule of the contract is broken (the message says which).
        """
        k = _CLAIM
        if not isinstance(obj, Mapping):
            raise ProtocolError(k, f"not a JSON object but {type(obj).__name__}")
        _type(obj, STATUS_CLAIM_TYPE, k)
        state = _str(obj, "state", k)
        if state not in CLAIM_STATES:
            raise ProtocolError(k, f"field 'state'={state!r} is not one of {sorted(CLAIM_STATES)}")
        progress = _number(obj, "progress", k)
        if not 0.0 <= progress <= 1.0:
            raise ProtocolError(k, f"field 'progress'={progress!r} is outside 0.0 <= x <= 1.0")
        phase = _str(obj, "phase", k, required=False)
        if phase is not None and phase not in _PHASE_SET:
            raise ProtocolError(k, f"field 'phase'={phase!r} is not one of {list(PHASE_NAMES)}")
        source = _str(obj, "budget_source", k, required=False)
        if source is not None and source not in BUDGET_SOURCES:
            raise ProtocolError(k, f"field 'budget_source'={source!r} is not one of {list(BUDGET_SOURCES)}")
        sig, key_id = _signature(obj, k)
        priority = _str(obj, "priority", k, required=False)
        if priority is not None and priority not in _PRIORITY_SET:
            raise ProtocolError(k, f"field 'priority'={priority!r} is not one of {list(PRIORITY_NAMES)}")
        work_done = _number(obj, "work_done", k, required=False)
        if work_done is not None and not 0.0 <= work_done <= 1.0:
            raise ProtocolError(k, f"field 'work_done'={work_done!r} is outside 0.0 <= x <= 1.0")
        eta = _number(obj, "eta_beats", k, required=False)
        if eta is not None and eta < 0:
            raise ProtocolError(k, f"field 'eta_beats'={eta!r} is below 0")
        details = obj.get("details")
        if details is not None and not isinstance(details, Mapping):
            raise ProtocolError(k, f"field 'details' must be an object, not {type(details).__name__}")
        depends_on = obj.get("depends_on")
        if depends_on is not None and (
            not isinstance(depends_on, list) or not all(isinstance(i, str) for i in depends_on)
        ):
            raise ProtocolError(k, "field 'depends_on' must be an array of strings")
        return cls(
            cluster_id=_str(obj, "cluster_id", k),
            agent_id=_str(obj, "agent_id", k),
            node_id=_str(obj, "node_id", k),
            task_id=_str(obj, "task_id", k),
            beat_index=_int(obj, "beat_index", k, minimum=None),
            state=state,
            beats_left=_int(obj, "beats_left", k),
            progress=progress,
            notes=_str(obj, "notes", k),
            sent_at=_timestamp(obj, "sent_at", k, required=True),
            operation_type=_str(obj, "operation_type", k, required=False),
            phase=phase,
            peer_count=_int(obj, "peer_count", k, required=False),
            sig=sig,
            key_id=key_id,
            raw=obj,
            budget_source=source,
            parent_id=_str(obj, "parent_id", k, required=False),
            correlation_id=_str(obj, "correlation_id", k, required=False),
            depends_on=None if depends_on is None else tuple(depends_on),
            priority=priority,
            work_done=work_done,
            details=details,
            eta_beats=eta,
        )


#: The values of a claim's optional ``budget_source``.
BUDGET_SOURCES: Final = ("fixed", "profile", "history")


def parse_beat_frame(data: bytes | bytearray | memoryview | str) -> BeatFrame:
    """Parse and validate a beat frame from the wire.

    Args:
        data: the message payload (UTF-8 JSON, at most 64 KiB).

    Returns:
        The frame.

    Raises:
        ProtocolError: the payload is too large, not UTF-8 JSON, not an object,
            or breaks a field rule; never any other exception.
    """
    return BeatFrame.parse(data)


def parse_status_claim(data: bytes | bytearray | memoryview | str) -> StatusClaim:
    """Parse and validate a status claim from the wire.

    Raises:
        ProtocolError: as :func:`parse_beat_frame`.
    """
    return StatusClaim.parse(data)


def parse_message(data: bytes | bytearray | memoryview | str) -> BeatFrame | StatusClaim:
    """Parse either kind of message, dispatching on its ``type``.

    Raises:
        ProtocolError: as :func:`parse_beat_frame`, or an unknown ``type``.
    """
    obj = _load(data, "message")
    kind = obj.get("type")
    if kind == BEAT_FRAME_TYPE:
        return BeatFrame.from_dict(obj)
    if kind == STATUS_CLAIM_TYPE:
        return StatusClaim.from_dict(obj)
    raise ProtocolError("message", f"unknown type {kind!r}")
