"""Building status claims exactly as PROTOCOL.md prescribes (fields, maths, notes)."""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING, Any, Final, TypeAlias

from ._time import TimeSource, format_rfc3339
from .errors import ConfigError
from .operations import OperationPhase, P2POperation
from .protocol import (
    HEALTH_TASK_ID,
    MAX_ID_BYTES,
    MAX_REASON_BYTES,
    STATUS_CLAIM_TYPE,
    StatusClaim,
    fit_text,
    wire_json,
)

_orjson: Any
try:
    import orjson as _orjson
except ImportError:  # pragma: no cover - exercised when the extra is absent
    _orjson = None

if TYPE_CHECKING:
    from collections.abc import Iterable

    from .workflow import Flow

_COMPLETED = OperationPhase.COMPLETED
_FAILED = OperationPhase.FAILED
_new = object.__new__
#: The largest integer orjson writes (past it, it raises: the claim goes the general way).
_U64: Final = (1 << 64) - 1
#: Cached pieces of sweep encodings kept before the caches are emptied (distinct operation
#: types x phases x peer counts, and progress values; a few in any real cluster).
_CACHE_LIMIT: Final = 4096

__all__ = [
    "Claim",
    "ClaimFactory",
    "EncodedClaim",
    "EncodedRun",
    "LazyClaim",
    "claim_msg_id",
    "health_notes",
    "resolve",
]


class LazyClaim:
    """The claim of one operation change, built when something first needs it.

    The registry emits under its lock, on the thread that made the change. There
    a snapshot of the operation costs a fraction of building and validating the
    claim, which the transport's loop thread (or the callback thread) does
    instead, off the caller's thread. Everything the claim says is taken from the
    snapshot except ``sent_at``, which is the time it is built (about when it is sent).

    Attributes:
        task_id: the operation id.
        is_final: the snapshot is COMPLETED or FAILED (the outbox never drops those).
    """

    __slots__ = (
        "_claim",
        "_factory",
        "beat",
        "budget_source",
        "direct",
        "estimated",
        "flow",
        "is_final",
        "notes",
        "peers",
        "phase",
        "reason",
        "start_beat",
        "start_time",
        "task_id",
        "type",
    )

    task_id: str
    is_final: bool
    _factory: ClaimFactory
    _claim: StatusClaim | None
    type: str
    phase: OperationPhase
    peers: int
    start_beat: int
    #: The operation's wall-clock start (epoch seconds): with the task id, it names the
    #: operation (the claims stream's ``Nats-Msg-Id``, see ``backbeat_sync.streams``).
    start_time: float
    estimated: int
    reason: str | None
    beat: int
    notes: str | None
    #: A beat sweep's claim: :meth:`wire` may encode it without making the StatusClaim.
    direct: bool
    #: Where an automatic budget came from (None: a number given; omitted from the claim).
    budget_source: str | None
    #: Its place in a workflow (``P2POperation.flow`` when the snapshot was taken).
    flow: Flow | None

    @property
    def priority(self) -> str | None:
        """The claim's ``priority`` field (None: ``normal``, not sent)."""
        flow = self.flow
        if flow is None or flow.priority == "normal":
            return None
        return flow.priority

    def wire(self) -> bytes:
        """The claim's wire bytes (``StatusClaim.encode`` of :meth:`build`, byte for byte),
        straight from the snapshot when the claim is not built yet: no StatusClaim is made.
        """
        claim = self._claim
        if claim is not None:
            return claim.encode()
        f = self._factory
        state, beats_left, progress, line = f.figures(
            self.type, self.phase, self.peers, self.start_beat, self.estimated, self.reason, self.beat
        )
        flow = self.flow
        if flow is None:
            d: dict[str, Any] = {"correlation_id": self.task_id}
        else:
            state, line, d = f.workflow_view(
                flow,
                self.task_id,
                self.type,
                self.phase,
                state,
                line,
                self.beat - self.start_beat,
                self.notes,
            )
        d |= {
            "type": STATUS_CLAIM_TYPE,
            "cluster_id": f.cluster_id,
            "agent_id": f.agent_id,
            "node_id": f.node_id,
            "task_id": self.task_id,
            "beat_index": self.beat,
            "state": state,
            "beats_left": beats_left,
            "progress": progress,
            "notes": line if self.notes is None else self.notes,
            "sent_at": f.sent_at(),
            "operation_type": self.type,
            "phase": self.phase.value,
            "peer_count": self.peers,
        }
        if self.budget_source is not None:  # optional, last: as StatusClaim.to_dict orders it
            d["budget_source"] = self.budget_source
        return wire_json(d)

    def build(self) -> StatusClaim:
        """The claim (built on the first call; a race between two threads builds it twice, harmlessly)."""
        claim = self._claim
        if claim is None:
            claim = self._claim = self._factory.make(
                self.task_id,
                self.type,
                self.phase,
                self.peers,
                self.start_beat,
                self.estimated,
                self.reason,
                self.beat,
                self.notes,
                self.budget_source,
                self.flow,
            )
        return claim

    def __repr__(self) -> str:
        return f"<LazyClaim {self.task_id} {self.phase.value} at beat {self.beat}>"


#: What a transport is given to publish: a claim, or one to build when it is sent.
Claim: TypeAlias = "StatusClaim | LazyClaim"


class EncodedRun:
    """The claims of consecutive operations of one beat's sweep, encoded at the sweep
    (:meth:`ClaimFactory.sweep`) but for one %-format each: what the NATS outbox queues as
    one item. Claim ``i``'s wire bytes are ``fmt % args[i]`` (:meth:`payloads`), made just
    before it is sent, so a beat of 100,000 claims is not 40 MB of bytes at once.

    Every claim in a run is intermediate (the operation is active) and of an operation
    with no workflow (so of ``normal`` priority, which an operation never leaves): the
    outbox may keep them together without breaking a rule of coalescing.

    Attributes:
        task_ids: the operations, in the sweep's order.
        fmt: the bytes every claim of the chunk shares, with its %-fields.
        args: each claim's fields for ``fmt``, in the same order.
    """

    __slots__ = ("args", "fmt", "task_ids")

    def __init__(self, task_ids: list[str], fmt: bytes, args: list[tuple[Any, ...]]) -> None:
        self.task_ids = task_ids
        self.fmt = fmt
        self.args = args

    def __len__(self) -> int:
        return len(self.args)

    def payloads(self) -> list[bytes]:
        """The claims' wire bytes (``StatusClaim.encode``'s), in order."""
        fmt = self.fmt
        return [fmt % a for a in self.args]

    def __repr__(self) -> str:
        return f"<{type(self).__name__} of {len(self.args)} claims>"


class EncodedClaim:
    """One claim of an :class:`EncodedRun`, on its own: the outbox queues a run claim by
    claim while it is bounded (disconnected), where each may be coalesced.

    Attributes:
        task_id: the operation id.
        data: the claim's wire bytes.
    """

    __slots__ = ("data", "task_id")

    #: A sweep's claims are intermediate and of ``normal`` priority (see :class:`EncodedRun`).
    is_final: Final = False
    priority: Final = None

    def __init__(self, task_id: str, data: bytes) -> None:
        self.task_id = task_id
        self.data = data

    def build(self) -> StatusClaim:
        """The claim, decoded from its bytes (to cut its notes to fit a small ``max_payload``:
        never on the hot path). Not :meth:`StatusClaim.parse`, which refuses what is too large."""
        return StatusClaim.from_dict(_orjson.loads(self.data))

    def __repr__(self) -> str:
        return f"<EncodedClaim {self.task_id}>"


def resolve(claim: Claim | EncodedClaim) -> StatusClaim:
    """The :class:`StatusClaim` of ``claim`` (built now if it is a :class:`LazyClaim`)."""
    if type(claim) is LazyClaim or type(claim) is EncodedClaim:
        return claim.build()
    return claim  # type: ignore[return-value]


def health_notes(connected: bool, operations: int, tempo_bpm: float, node_id: str) -> str:
    """``CHORUS P2P healthy: connected={true|false}, operations={n}, tempo={bpm} BPM, node={node_id}``."""
    flag = "true" if connected else "false"
    return (
        f"CHORUS P2P healthy: connected={flag}, operations={operations},"
        f" tempo={tempo_bpm:g} BPM, node={node_id}"
    )


class ClaimFactory:
    """Makes the claims of one agent.

    Args:
        cluster_id: the cluster.
        agent_id: this agent.
        node_id: this agent's P2P node id.
        time_source: where ``sent_at`` comes from.

    Raises:
        ConfigError: ``node_id`` is longer than 256 bytes of UTF-8 (it goes into every claim).
    """

    def __init__(self, cluster_id: str, agent_id: str, node_id: str, time_source: TimeSource) -> None:
        size = len(node_id.encode("utf-8", "surrogatepass"))
        if size > MAX_ID_BYTES:
            shown = f"{node_id[:32]}... ({size} bytes)"
            raise ConfigError("node_id", shown, f"must be at most {MAX_ID_BYTES} bytes of UTF-8")
        self.cluster_id = cluster_id
        self.agent_id = agent_id
        self.node_id = node_id
        self._time = time_source
        self._stamp_ms = -1
        self._stamp = ""
        # The pieces of sweep encodings that repeat (see :meth:`sweep`); any thread may fill
        # them (a race computes one piece twice, the same bytes).
        self._pieces: dict[tuple[str, str, int], bytes] = {}
        self._progress: dict[float, bytes] = {}
        self._sources: dict[str, bytes] = {}

    def sent_at(self) -> str:
        """The current time as an RFC 3339 timestamp (cached per millisecond)."""
        now = self._time.time()
        ms = int(now * 1000)
        if ms != self._stamp_ms:  # benign race: both threads compute the same string
            self._stamp = format_rfc3339(ms / 1000)
            self._stamp_ms = ms
        return self._stamp

    def for_operation(self, op: P2POperation, current_beat: int, *, notes: str | None = None) -> StatusClaim:
        """The claim for ``op`` at ``current_beat``.

        Args:
            op: the operation, in its current phase.
            current_beat: index of the last beat frame received.
            notes: override the notes line (budget warnings use this).
        """
        return self.make(
            op.id,
            op.type,
            op.phase,
            op.peer_count,
            op.start_beat,
            op.estimated_beats,
            op.reason,
            current_beat,
            notes,
            op.budget_source,
            op.flow,
        )

    def lazy(self, op: P2POperation, current_beat: int, direct: bool = False) -> LazyClaim:
        """A snapshot of ``op`` at ``current_beat`` whose claim is built when first needed.

        The claim built from it equals :meth:`for_operation` of the same operation
        at the same beat (``sent_at`` aside): it is the same :meth:`make`.
        ``direct``: a beat sweep's claim (see :meth:`LazyClaim.wire`).
        """
        lazy = _new(LazyClaim)
        lazy.direct = direct
        lazy._factory = self
        lazy._claim = None
        lazy.task_id = op.id
        lazy.type = op.type
        phase = lazy.phase = op.phase
        lazy.is_final = phase is _COMPLETED or phase is _FAILED
        lazy.peers = op.peer_count
        lazy.start_beat = op.start_beat
        lazy.start_time = op.start_time
        lazy.estimated = op.estimated_beats
        lazy.reason = op.reason
        lazy.beat = current_beat
        lazy.notes = None
        lazy.budget_source = op.budget_source
        lazy.flow = op.flow
        return lazy

    def sweep(self, ops: Iterable[P2POperation], beat: int) -> list[EncodedRun | LazyClaim]:
        """The claims of one chunk of a beat's sweep, in order: each run of operations with no
        workflow encoded at once (:class:`EncodedRun`), any other operation as :meth:`lazy` of it.

        Called under the registry lock, so the operations cannot change meanwhile. An
        encoded claim is ``for_operation(op, beat).encode()``, byte for byte (the tests compare
        them in every phase), except that ``sent_at`` is read once for the chunk. The bytes
        are put together from pieces that orjson encoded (each string, float and integer
        piece is the bytes orjson writes for it inside an object, keys sorted) instead of
        building a dict per claim and sorting its keys: the per-beat hot path, 100,000 claims
        a beat for 100,000 operations, so it is inlined; :meth:`figures` is the maths it repeats.
        An operation the pieces cannot encode exactly (a workflow, a final phase, a figure
        that is not a plain integer, a string orjson refuses) goes as a :class:`LazyClaim`,
        which the transport encodes (and, if it must, refuses) as any other claim. Without
        orjson every claim goes as a :class:`LazyClaim`.
        """
        if _orjson is None:
            return [self.lazy(op, beat, True) for op in ops]
        dumps = _orjson.dumps
        node = self.node_id
        try:
            # Keys in sorted order (as OPT_SORT_KEYS writes them): agent_id, beat_index,
            # beats_left, [budget_source], cluster_id, correlation_id, node_id, notes,
            # operation_type, peer_count, phase, progress, sent_at, state, task_id, type.
            head = b'{"agent_id":' + dumps(self.agent_id) + b',"beat_index":' + dumps(beat)
            tail = b',"sent_at":' + dumps(self.sent_at()) + b',"state":"executing","task_id":"'
            end = b'"' + b',"type":' + dumps(STATUS_CLAIM_TYPE) + b"}"
            cluster = b',"cluster_id":' + dumps(self.cluster_id) + b',"correlation_id":"'
            node_piece = b'","node_id":' + dumps(node) + b',"notes":'
        except Exception:  # an id orjson refuses: every claim is refused, each on its own
            return [self.lazy(op, beat, True) for op in ops]
        # One %-format a claim (made when it is sent, EncodedRun.payloads): beats_left,
        # [budget_source and] the cluster piece, the task id (inside quotes), the
        # operation's piece, progress, the task id again.
        fmt = (
            head.replace(b"%", b"%%")
            + b',"beats_left":%d%s%s%s%s'
            + tail.replace(b"%", b"%%")
            + b"%s"
            + end.replace(b"%", b"%%")
        )
        pieces, progresses, sources = self._pieces, self._progress, self._sources
        completed, failed, integer, u64, limit = _COMPLETED, _FAILED, int, _U64, _CACHE_LIMIT
        out: list[EncodedRun | LazyClaim] = []
        ids: list[str] = []
        args: list[tuple[Any, ...]] = []
        for op in ops:
            phase = op.phase
            start = op.start_beat
            estimated = op.estimated_beats
            peers = op.peer_count
            fields = None
            if (
                op.flow is None
                and phase is not completed
                and phase is not failed
                and type(start) is integer
                and type(estimated) is integer
                and type(peers) is integer
                and estimated <= u64
            ):
                try:
                    # figures() for an active phase: p = c - s; beats_left = max(0, e - p);
                    # progress = min(1.0, p / e) (PROTOCOL.md).
                    passed = beat - start
                    if passed < 0:
                        passed = 0
                    if passed < estimated:
                        left, progress = estimated - passed, passed / estimated
                    else:
                        left, progress = 0, 1.0
                    typ = op.type
                    value = phase._value_
                    key = (typ, value, peers)
                    piece = pieces.get(key)
                    if piece is None:
                        if len(pieces) >= limit:  # bounded: forget them all (a rare miss)
                            pieces.clear()
                        piece = pieces[key] = (
                            node_piece
                            + dumps(f"P2P {typ}: {value} (peers: {peers}, node: {node})")
                            + b',"operation_type":'
                            + dumps(typ)
                            + b',"peer_count":'
                            + dumps(peers)
                            + b',"phase":'
                            + dumps(value)
                            + b',"progress":'
                        )
                    fraction = progresses.get(progress)
                    if fraction is None:
                        if len(progresses) >= limit:
                            progresses.clear()
                        fraction = progresses[progress] = dumps(progress)
                    source = op.budget_source
                    if source is None:
                        lead = cluster
                    else:
                        known = sources.get(source)
                        if known is None:
                            if len(sources) >= limit:
                                sources.clear()
                            known = sources[source] = b',"budget_source":' + dumps(source) + cluster
                        lead = known
                    task_id = op.id
                    # Printable ASCII with no quote or backslash is its own JSON string; anything
                    # else as orjson writes it, less the quotes (orjson.dumps of a short string
                    # allocates a large buffer: 3x the cost of these checks and str.encode).
                    if (
                        task_id.isascii()
                        and task_id.isprintable()
                        and '"' not in task_id
                        and "\\" not in task_id
                    ):
                        quoted = task_id.encode()
                    else:
                        quoted = dumps(task_id)[1:-1]
                    fields = (left, lead, quoted, piece, fraction, quoted)
                except Exception:  # a string orjson refuses: the transport refuses it, as any claim
                    fields = None
            if fields is None:
                if args:
                    out.append(EncodedRun(ids, fmt, args))
                    ids, args = [], []
                out.append(self.lazy(op, beat, True))
            else:
                ids.append(task_id)
                args.append(fields)
        if args:
            out.append(EncodedRun(ids, fmt, args))
        return out

    def make(
        self,
        task_id: str,
        operation_type: str,
        phase: OperationPhase,
        peer_count: int,
        start_beat: int,
        estimated: int,
        reason: str | None,
        current_beat: int,
        notes: str | None,
        budget_source: str | None = None,
        flow: Flow | None = None,
    ) -> StatusClaim:
        """The claim of an operation with these figures (the maths of PROTOCOL.md, in one place).

        Args:
            task_id: the operation id.
            operation_type: its type.
            phase: its phase.
            peer_count: its peers.
            start_beat: the beat it started at.
            estimated: its estimated beats.
            reason: why it failed (FAILED only).
            current_beat: index of the last beat frame received.
            notes: override the notes line (budget warnings use this).
            budget_source: where an automatic budget came from (None: omitted from the claim).
            flow: its place in a workflow (``P2POperation.flow``): the optional workflow
                fields, ``waiting`` while dependencies run (see ``docs/workflows.md``).
        """
        state, beats_left, progress, line = self.figures(
            operation_type, phase, peer_count, start_beat, estimated, reason, current_beat
        )
        value = phase.value
        if flow is None:  # a root with nothing more to say: its own id correlates it
            return StatusClaim(
                self.cluster_id,
                self.agent_id,
                self.node_id,
                task_id,
                current_beat,
                state,
                beats_left,
                progress,
                line if notes is None else notes,
                self.sent_at(),
                operation_type,
                value,
                peer_count,
                budget_source=budget_source,
                correlation_id=task_id,
            )
        state, line, fields = self.workflow_view(
            flow, task_id, operation_type, phase, state, line, current_beat - start_beat, notes
        )
        return StatusClaim(
            self.cluster_id,
            self.agent_id,
            self.node_id,
            task_id,
            current_beat,
            state,
            beats_left,
            progress,
            line,
            self.sent_at(),
            operation_type,
            value,
            peer_count,
            budget_source=budget_source,
            **fields,
        )

    def workflow_view(
        self,
        flow: Flow,
        task_id: str,
        operation_type: str,
        phase: OperationPhase,
        state: str,
        line: str,
        passed: int,
        notes: str | None,
    ) -> tuple[str, str, dict[str, Any]]:
        """``(state, notes, workflow fields)`` of an operation in a workflow (docs/protocol.md):
        ``waiting`` while a dependency runs, a failed dependency's note once, and the optional
        fields that have a value (:meth:`make` and :meth:`LazyClaim.wire` both use it)."""
        active = not (phase is _COMPLETED or phase is _FAILED)
        if active and flow.pending:
            state = "waiting"
            line = f"P2P {operation_type}: waiting for {', '.join(flow.pending)} (node: {self.node_id})"
        if notes is not None:
            line = notes
        elif flow.note is not None:
            line = f"{line}; {flow.note}"
        fields: dict[str, Any] = {"correlation_id": flow.correlation_id or task_id}
        if flow.parent_id is not None:
            fields["parent_id"] = flow.parent_id
        if flow.depends_on:
            fields["depends_on"] = flow.depends_on
        if flow.priority != "normal":
            fields["priority"] = flow.priority
        if flow.work_done is not None:
            fields["work_done"] = flow.work_done
        if flow.details is not None:
            fields["details"] = flow.details
        if active and flow.projected is not None:
            fields["eta_beats"] = round(max(0.0, flow.projected - max(0, passed)), 2)
        return state, line, fields

    def figures(
        self,
        operation_type: str,
        phase: OperationPhase,
        peer_count: int,
        start_beat: int,
        estimated: int,
        reason: str | None,
        current_beat: int,
    ) -> tuple[str, int, float, str]:
        """``(state, beats_left, progress, notes line)`` of an operation: the maths of PROTOCOL.md,
        in one place (:meth:`make` and :meth:`LazyClaim.wire` both use it)."""
        # The per-beat hot path (one call per active operation per beat), kept inline.
        # PROTOCOL.md: p = c - s; beats_left = max(0, e - p); progress = min(1.0, p / e).
        if phase is _COMPLETED:
            return (
                "done",
                0,
                1.0,
                f"P2P {operation_type}: {phase.value} (peers: {peer_count}, node: {self.node_id})",
            )
        if phase is _FAILED:
            # A reason of any length fits a message: it is cut to MAX_REASON_BYTES, marked.
            why = fit_text(reason, MAX_REASON_BYTES) if reason else "unknown"
            return "failed", 0, 0.0, f"P2P operation failed: {why} (type: {operation_type})"
        passed = current_beat - start_beat
        if passed < 0:
            passed = 0
        if passed < estimated:
            beats_left, progress = estimated - passed, passed / estimated
        else:
            beats_left, progress = 0, 1.0
        return (
            "executing",
            beats_left,
            progress,
            f"P2P {operation_type}: {phase.value} (peers: {peer_count}, node: {self.node_id})",
        )

    def for_health(
        self,
        *,
        current_beat: int,
        connected: bool,
        operations: int,
        tempo_bpm: float,
        recent_errors: bool,
    ) -> StatusClaim:
        """The health claim (``task_id`` ``chorus-p2p-health``).

        State is ``failed`` with recent errors, else ``executing`` with active
        operations, else ``waiting``.
        """
        if recent_errors:
            state = "failed"
        elif operations > 0:
            state = "executing"
        else:
            state = "waiting"
        return StatusClaim(
            cluster_id=self.cluster_id,
            agent_id=self.agent_id,
            node_id=self.node_id,
            task_id=HEALTH_TASK_ID,
            beat_index=current_beat,
            state=state,
            beats_left=0,
            progress=1.0,
            notes=health_notes(connected, operations, tempo_bpm, self.node_id),
            sent_at=self.sent_at(),
        )


def claim_msg_id(agent_id: str, claim: Claim) -> str:
    """The ``Nats-Msg-Id`` of a final claim: a digest of (agent, task id, operation start, state).

    The operation's start is its wall-clock start time (for a claim built without its
    operation, the beat and time it was sent), so two operations that reuse one task id
    get two ids, and every resend of one claim gets the same one.

    >>> from backbeat_sync.protocol import StatusClaim
    >>> c = StatusClaim(cluster_id="c", agent_id="a", node_id="n", task_id="t", beat_index=3,
    ...                 state="done", beats_left=0, progress=1.0, notes="",
    ...                 sent_at="2026-01-01T00:00:00.000Z")
    >>> claim_msg_id("a", c) == claim_msg_id("a", c), len(claim_msg_id("a", c))
    (True, 32)
    """
    if isinstance(claim, LazyClaim):
        start = repr(claim.start_time)
        state = "done" if claim.phase is _COMPLETED else "failed"
    else:
        start = f"{claim.beat_index}@{claim.sent_at}"
        state = claim.state
    text = "\x00".join((agent_id, claim.task_id, start, state))
    return hashlib.sha256(text.encode()).hexdigest()[:32]
