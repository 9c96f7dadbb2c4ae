"""A beat's sweep on NATS: claims encoded at the sweep (``ClaimFactory.sweep``), queued as runs
(``Outbox.put_sweep``), published in a tight loop (``ClaimLink._send_run``). The bytes are
``StatusClaim.encode``'s, the outbox's rules hold for every claim, the wire sees them in order."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import attrs
import nats
import nats.errors as nats_errors
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from backbeat_sync import BackbeatConfig, BeatFrame, Integration, ManualTime, OperationPhase, P2POperation
from backbeat_sync import claims as claims_module
from backbeat_sync.claims import ClaimFactory, EncodedClaim, EncodedRun, LazyClaim, resolve
from backbeat_sync.protocol import TRUNCATED, parse_status_claim
from backbeat_sync.transport.base import TransportEvent
from backbeat_sync.transport.nats.claim_link import ClaimLink
from backbeat_sync.transport.nats.outbox import Entry, Outbox, Run
from backbeat_sync.workflow import Flow

from .natsserver import AsyncRunner, NatsServer, Witness
from .support import outbox_claim as claim
from .support import wait_until

CLUSTER = "sweep-c"
NODE = "12D3KooWSweep"
ACTIVE = [p for p in OperationPhase if not p.is_final]


def op(task: str, **kw: Any) -> P2POperation:
    fields: dict[str, Any] = {"id": task, "type": "dht_store", "start_beat": 5, "estimated_beats": 4}
    fields.update(kw)
    return P2POperation(**fields)


def sent(parts: list[EncodedRun | LazyClaim]) -> list[bytes]:
    """The bytes of a sweep's claims, in order (a snapshot encoded as the transport would)."""
    out: list[bytes] = []
    for part in parts:
        if isinstance(part, EncodedRun):
            out.extend(part.payloads())
        else:
            assert part.direct
            out.append(part.wire())
    return out


# -- the encoding -------------------------------------------------------------------------


ids = st.text(min_size=1, max_size=12)


@settings(max_examples=300, deadline=None)
@given(
    names=st.tuples(ids, ids, ids),
    task=ids,
    typ=ids,
    phase=st.sampled_from(ACTIVE),
    start=st.integers(-5, 2**40),
    estimate=st.one_of(st.integers(1, 50), st.integers(1, 2**64 + 5)),
    beat=st.integers(0, 2**40),
    peers=st.integers(0, 2**65),
    source=st.sampled_from([None, "fixed", "profile", "history"]),
)
def test_a_sweep_encodes_each_claim_to_the_bytes_of_its_claim(
    names: tuple[str, str, str],
    task: str,
    typ: str,
    phase: OperationPhase,
    start: int,
    estimate: int,
    beat: int,
    peers: int,
    source: str | None,
) -> None:
    """Whatever the strings (quotes, '%', control characters, surrogates), figures and budget
    source: the sweep's bytes are ``for_operation(op, beat).encode()``, or it refuses the same way."""
    cluster, agent, node = names
    factory = ClaimFactory(cluster, agent, node, ManualTime())
    o = op(task, type=typ, phase=phase, start_beat=start, estimated_beats=estimate, peer_count=peers)
    o.budget_source = source
    try:
        expected: bytes | type[BaseException] = factory.for_operation(o, beat).encode()
    except Exception as exc:
        expected = type(exc)
    parts = factory.sweep([o], beat)
    try:
        got: bytes | type[BaseException] = sent(parts)[0]
    except Exception as exc:
        got = type(exc)
    assert got == expected
    if isinstance(expected, bytes) and estimate < 2**64 and peers < 2**64:  # plain: encoded at the sweep
        assert isinstance(parts[0], EncodedRun)


@pytest.mark.parametrize(
    "task", ["plain-1", 'q"uote', "back\\slash", "tab\t", "del\x7f", "é", "\u2028", "%s%d", "/slash"]
)
def test_a_sweep_quotes_task_ids_as_orjson_does(task: str) -> None:
    """The task id is written twice, as orjson writes it (the fast path is printable ASCII only)."""
    factory = ClaimFactory("c%", "a", NODE, ManualTime())
    o = op(task, type="ty%pe")
    (run,) = factory.sweep([o], 7)
    assert isinstance(run, EncodedRun)
    assert run.payloads() == [factory.for_operation(o, 7).encode()]


def test_a_sweep_keeps_the_order_and_snapshots_what_it_does_not_encode() -> None:
    """Runs of plain operations encoded; a workflow, a final phase, a figure that is not a plain
    integer, a refused string each a LazyClaim of the snapshot, in the sweep's order."""
    clock = ManualTime()
    factory = ClaimFactory(CLUSTER, "a", NODE, clock)
    ops = [
        op("p1"),
        op("p2", phase=OperationPhase.EXECUTING, peer_count=3),
        op("wf", flow=Flow(priority="high")),
        op("p3"),
        op("done", phase=OperationPhase.COMPLETED),
        op("bool", peer_count=True),
        op("float", estimated_beats=4.0),
        op("\udc80"),
        op("p4", start_beat=1),
    ]
    expected = [factory.for_operation(o, 7).encode() for o in ops[:2]]
    parts = factory.sweep(ops, 7)
    kinds = [(type(p).__name__, p.task_ids if isinstance(p, EncodedRun) else p.task_id) for p in parts]
    assert kinds == [
        ("EncodedRun", ["p1", "p2"]),
        ("LazyClaim", "wf"),
        ("EncodedRun", ["p3"]),
        ("LazyClaim", "done"),
        ("LazyClaim", "bool"),
        ("LazyClaim", "float"),
        ("LazyClaim", "\udc80"),
        ("EncodedRun", ["p4"]),
    ]
    for o in ops[:3]:
        o.phase, o.peer_count = OperationPhase.FAILED, 9  # taken at the sweep: later changes do not show
    assert sent(parts[:1]) == expected
    lazy = parts[1]
    assert isinstance(lazy, LazyClaim)
    assert (lazy.priority, lazy.phase, lazy.peers) == ("high", OperationPhase.STARTED, 0)


def test_without_orjson_a_sweep_snapshots_every_operation(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without orjson the encoding is the stdlib's: every claim goes as a snapshot, the same bytes."""
    factory = ClaimFactory(CLUSTER, "a", NODE, ManualTime())
    ops = [op("x"), op("y", phase=OperationPhase.CONNECTING)]
    encoded = sent(factory.sweep(ops, 6))
    monkeypatch.setattr(claims_module, "_orjson", None)
    parts = factory.sweep(ops, 6)
    assert all(isinstance(p, LazyClaim) and p.direct for p in parts)
    assert [resolve(p).encode() for p in parts] == encoded  # type: ignore[arg-type]


def test_the_sweeps_cached_pieces_stay_bounded() -> None:
    """Distinct types x phases x peer counts (and progress values) are cached up to a limit,
    then forgotten: the bytes stay the same."""
    factory = ClaimFactory(CLUSTER, "a", NODE, ManualTime())
    for k in range(3):
        ops = [op(f"t{i}", type=f"type-{k}-{i}") for i in range(claims_module._CACHE_LIMIT)]
        before = [c.encode() for c in (factory.for_operation(o, 9) for o in ops)]
        assert sent(factory.sweep(ops, 9)) == before
        assert len(factory._pieces) <= claims_module._CACHE_LIMIT


def test_an_encoded_claim_decodes_to_its_claim() -> None:
    """What cutting the notes of an encoded claim starts from: the claim its bytes say."""
    factory = ClaimFactory(CLUSTER, "a", NODE, ManualTime())
    o = op("x", phase=OperationPhase.NEGOTIATING, peer_count=2)
    o.budget_source = "history"
    (run,) = factory.sweep([o], 8)
    assert isinstance(run, EncodedRun)
    encoded = EncodedClaim("x", run.payloads()[0])
    assert resolve(encoded) == factory.for_operation(o, 8)
    assert (encoded.is_final, encoded.priority) == (False, None)


# -- the outbox ---------------------------------------------------------------------------


def run_of(*tasks: str, beat: int = 1) -> EncodedRun:
    return EncodedRun(list(tasks), b"%s@%d", [(t.encode(), beat) for t in tasks])


def taken(items: list[Entry | Run], *, beats: bool = False) -> list[str]:
    """What was taken, claim by claim: ``task@beat`` for a run's, ``task:state`` for others
    (``task@beat:state`` with ``beats``)."""
    out: list[str] = []
    for item in items:
        if isinstance(item, Run):
            out.extend(p.decode() for p in item.payloads())
        elif isinstance(item.claim, EncodedClaim):
            out.append(item.claim.data.decode())
        else:
            c = resolve(item.claim)
            out.append(f"{c.task_id}@{c.beat_index}:{c.state}" if beats else f"{c.task_id}:{c.state}")
    return out


def workflow_snapshot(task: str) -> LazyClaim:
    """The snapshot a sweep gives for an operation in a workflow."""
    return ClaimFactory(CLUSTER, "a", NODE, ManualTime()).lazy(op(task, flow=Flow()), 1, True)


def unbounded(limit: int = 100) -> Outbox:
    box = Outbox(limit)
    box.bounded = False
    return box


def test_outbox_queues_a_sweep_run_as_one_item_and_takes_it_by_claims() -> None:
    """A run is one item, counted by its claims; take(n) splits it, in order, among other claims."""
    box = unbounded()
    assert box.put("s", claim("before")) is True
    assert box.put_sweep("s", [run_of("a", "b", "c"), workflow_snapshot("wf"), run_of("d", "e")]) is False
    assert len(box) == 7
    assert len(box._items) == 4  # one entry, a run, a snapshot, a run
    first = box.take(3)
    assert taken(first) == ["before:executing", "a@1", "b@1"]
    assert len(box) == 4
    assert taken(box.take(2)) == ["c@1", "wf:executing"]
    assert taken(box.take(10)) == ["d@1", "e@1"]
    assert len(box) == 0


def test_outbox_while_bounded_takes_a_sweep_claim_by_claim() -> None:
    """Disconnected past the bound, a sweep's claims coalesce with the queued ones (latest wins,
    at the back) or are dropped, as any intermediate claim."""
    box = Outbox(limit=3)
    box.put_sweep("s", [run_of("a", "b", "c", beat=1)])
    assert len(box._items) == 3  # claim by claim
    box.put_sweep("s", [run_of("b", "d", beat=2)])
    assert (box.coalesced, box.dropped) == (1, 1)
    assert taken(box.take(10)) == ["a@1", "c@1", "b@2"]


def test_outbox_splits_its_runs_when_it_becomes_bounded() -> None:
    """Runs queued while connected are split at the disconnect: each claim may then be replaced
    by a newer claim of its task (latest wins, at the back), as if it had been queued alone."""
    box = unbounded(limit=4)
    box.put_sweep("s", [run_of("a", "b", "c", beat=1)])
    box.put_sweep("s", [run_of("a", "d", beat=2)])  # while unbounded: kept, in order
    assert len(box._items) == 2
    box.bounded = True
    assert len(box._items) == 5
    box.put_sweep("s", [run_of("b", "a", "e", beat=3)])
    assert (box.coalesced, box.dropped) == (2, 1)
    assert len(box) == 5
    # b@1 replaced by b@3 at the back; a@2 (the latest of a) by a@3; e had nothing to replace.
    assert taken(box.take(10)) == ["a@1", "c@1", "d@2", "b@3", "a@3"]


def test_outbox_never_replaces_a_run_claim_queued_before_a_final() -> None:
    """After a final claim of a task, nothing of that task queued before it is replaced."""
    box = unbounded(limit=2)
    box.put_sweep("s", [run_of("a", "b", beat=1)])
    box.put("s", claim("a", "done"))
    box.bounded = True
    box.put_sweep("s", [run_of("a", "b", beat=2)])
    assert (box.coalesced, box.dropped) == (1, 1)  # b@1 replaced; a@2 had nothing to replace
    assert taken(box.take(10)) == ["a@1", "a:done", "b@2"]
    assert box.finals() == 0


def test_outbox_puts_a_run_back_at_the_front_in_order() -> None:
    """A run the loop could not send goes back first, claim by claim, in its order."""
    box = unbounded()
    box.put_sweep("s", [run_of("a", "b", "c")])
    first = box.take(10)
    box.put("s", claim("later"))
    rest = first[0]
    assert isinstance(rest, Run)
    box.put_back([rest.split(1), *first[1:]])
    assert len(box) == 3
    assert taken(box.take(10)) == ["b@1", "c@1", "later:executing"]


def test_outbox_finals_and_final_entries_ignore_runs() -> None:
    box = unbounded()
    box.put_sweep("s", [run_of("a")])
    box.put("s", claim("b", "failed"))
    assert box.finals() == 1
    assert [e.claim.task_id for e in box.final_entries()] == ["b"]


PLAIN = ["a", "b", "c", "d"]  # operations with no workflow: in sweeps, normal priority for good
LOW = ["x", "y"]  # low-priority operations: never in a run

steps = st.lists(
    st.one_of(
        st.tuples(st.just("sweep"), st.lists(st.sampled_from(PLAIN), min_size=1, max_size=4, unique=True)),
        st.tuples(st.just("claim"), st.sampled_from(PLAIN + LOW), st.booleans()),
        st.tuples(st.just("bounded"), st.booleans()),
        st.tuples(st.just("take"), st.integers(1, 6)),
    ),
    max_size=40,
)


def said(items: list[Entry | Run]) -> list[str]:
    """What was taken, claim by claim, whichever way it was queued (with beats)."""
    return taken(items, beats=True)


@settings(max_examples=400, deadline=None)
@given(script=steps, limit=st.integers(1, 6))
def test_outbox_with_runs_behaves_as_with_one_entry_per_claim(
    script: list[tuple[Any, ...]], limit: int
) -> None:
    """Whatever comes (sweeps, single claims, finals, low-priority claims, disconnects, takes):
    queuing a sweep as runs takes out the same claims, in the same order, with the same
    counts, as queuing each claim on its own (the outbox's rules, claim by claim)."""
    box, ref = Outbox(limit), Outbox(limit)
    for beat, step in enumerate(script, 1):
        if step[0] == "sweep":
            tasks = step[1]
            box.put_sweep("s", [EncodedRun(list(tasks), b"%s@%d", [(t.encode(), beat) for t in tasks])])
            ref.put_many("s", [EncodedClaim(t, f"{t}@{beat}".encode()) for t in tasks])  # type: ignore[misc]
        elif step[0] == "claim":
            task, final = step[1], step[2]
            c = attrs.evolve(
                claim(task, "done" if final else "executing", beat), priority="low" if task in LOW else None
            )
            box.put("s", c)
            ref.put("s", c)
        elif step[0] == "bounded":
            box.bounded = ref.bounded = step[1]
        else:
            assert said(box.take(step[1])) == said(ref.take(step[1]))
        assert (len(box), box.coalesced, box.dropped, box.finals()) == (
            len(ref),
            ref.coalesced,
            ref.dropped,
            ref.finals(),
        )
        assert box.coalesced_by_priority == ref.coalesced_by_priority
    assert said(box.take(1000)) == said(ref.take(1000))


# -- the loop's tight publishing -----------------------------------------------------------


class FakeClient:
    """What ``_send_run`` uses of a nats-py client: ``publish`` (recording; raising on cue)."""

    def __init__(self, refuse: set[bytes] = frozenset(), down_at: int | None = None) -> None:  # type: ignore[assignment]
        self.published: list[bytes] = []
        self.refuse = refuse
        self.down_at = down_at

    async def publish(self, subject: str, payload: bytes) -> None:
        if self.down_at is not None and len(self.published) == self.down_at:
            raise nats_errors.ConnectionClosedError
        if payload in self.refuse:
            raise nats_errors.MaxPayloadError
        self.published.append(payload)


class Sink:
    def __init__(self) -> None:
        self.events: list[tuple[TransportEvent, str]] = []

    def frame_received(self, data: bytes, arrival: float) -> None:
        pass

    def transport_event(self, event: TransportEvent, detail: str) -> None:
        self.events.append((event, detail))

    def audience_changed(self) -> None:
        pass


def link(sink: Sink) -> ClaimLink:
    cfg = BackbeatConfig(cluster_id=CLUSTER, agent_id="a", nats_url="nats://127.0.0.1:1")
    return ClaimLink(cfg, lambda c: resolve(c).encode(), ManualTime(), sink)


def test_a_run_is_published_in_order_and_a_refused_claim_is_counted_lost() -> None:
    sink = Sink()
    claim_link = link(sink)
    nc = FakeClient(refuse={b"b@1"})
    run = Run("s", ["a", "b", "c"], b"%s@1", [(b"a",), (b"b",), (b"c",)])
    assert asyncio.run(claim_link._send_run(nc, run, 1000)) is None  # type: ignore[arg-type]
    assert nc.published == [b"a@1", b"c@1"]
    assert (claim_link.published, claim_link.lost) == (2, 1)
    assert any("claim b refused" in detail for _, detail in sink.events)


def test_a_run_cut_short_by_the_connection_returns_what_was_not_sent() -> None:
    claim_link = link(Sink())
    nc = FakeClient(down_at=2)
    run = Run.made("s", ["a", "b", "c", "d%"], [b"a", b"b", b"c", b"d%"])
    rest = asyncio.run(claim_link._send_run(nc, run, 1000))  # type: ignore[arg-type]
    assert nc.published == [b"a", b"b"]
    assert rest is not None
    assert (rest.task_ids, rest.payloads()) == (["c", "d%"], [b"c", b"d%"])
    assert claim_link.published == 2


def test_a_run_claim_over_the_servers_limit_is_cut_to_fit() -> None:
    """Its notes are cut (marked), as for any claim; one that cannot fit is counted lost."""
    sink = Sink()
    claim_link = link(sink)
    factory = ClaimFactory(CLUSTER, "a", NODE, ManualTime())
    ops = [op("small"), op("big", type="t" * 200), op("x" * 240, type="y" * 240)]
    (encoded,) = factory.sweep(ops, 6)
    assert isinstance(encoded, EncodedRun)
    limit = len(encoded.payloads()[0]) + 250
    assert len(encoded.payloads()[1]) > limit
    nc = FakeClient()
    run = Run("s", encoded.task_ids, encoded.fmt, encoded.args)
    assert asyncio.run(claim_link._send_run(nc, run, limit)) is None  # type: ignore[arg-type]
    assert nc.published[0] == encoded.payloads()[0]
    assert len(nc.published) == 2
    big = parse_status_claim(nc.published[1])
    assert len(nc.published[1]) <= limit
    assert big.task_id == "big"
    assert big.notes.endswith(TRUNCATED)
    assert (claim_link.truncated, claim_link.lost, claim_link.published) == (1, 1, 2)
    assert any(f"cannot encode claim {'x' * 240}" in detail for _, detail in sink.events)


# -- real servers -------------------------------------------------------------------------


def publish_frame(runner: AsyncRunner, url: str, index: int) -> None:
    frame = BeatFrame(
        cluster_id=CLUSTER,
        beat_index=index,
        downbeat=False,
        phase="upbeat",
        tempo_bpm=60.0,
        window_id="w",
        bar_length=4,
    )

    async def send() -> None:
        nc = await nats.connect(url)
        await nc.publish(f"backbeat.beat.{CLUSTER}", frame.encode())
        await nc.flush()
        await nc.close()

    runner.run(send())


@pytest.mark.nats
def test_a_beat_of_claims_reaches_an_outside_subscriber_in_the_sweeps_order(
    nats_server: NatsServer, nats_runner: AsyncRunner
) -> None:
    """3,000 operations (several chunks, runs broken by workflow operations): every claim of the
    beat arrives once, as canonical bytes, with PROTOCOL.md's figures, critical and high first."""
    witness = Witness(nats_runner, nats_server.url, "backbeat.status.>")
    cfg = BackbeatConfig(cluster_id=CLUSTER, agent_id="a", nats_url=nats_server.url, tempo_bpm=60.0)
    n = 3000
    with Integration(cfg, node_id=NODE) as integration:
        for i in range(n):
            priority = {7: "critical", 500: "high", 1500: "low", 2999: "high"}.get(i, "normal")
            integration.start_p2p_operation(f"op-{i}", "dht_store", 5, priority=priority)
        wait_until(lambda: integration.get_health()["claims_queued"] == 0, what="the start claims")
        publish_frame(nats_runner, nats_server.url, 10_001)

        def beat(ds: list[dict[str, Any]]) -> list[dict[str, Any]]:
            return [d for d in ds if d["beat_index"] == 10_001 and d["task_id"].startswith("op-")]

        witness.wait_for(lambda ds: len(beat(ds)) >= n, what="the beat's claims")
        health = integration.get_health()
        raw = [m for m in witness.messages if b'"beat_index":10001,' in m and b'"task_id":"op-' in m]
    witness.close()  # (stop() failed every operation meanwhile: those claims came after)
    assert (health["claims_dropped"], health["claims_coalesced"]) == (0, 0)
    assert len(raw) == n
    decoded = [json.loads(m) for m in raw]
    order = [d["task_id"] for d in decoded]
    assert order[:3] == ["op-7", "op-500", "op-2999"]
    assert order[-1] == "op-1500"
    assert order[3:-1] == [f"op-{i}" for i in range(n) if i not in (7, 500, 1500, 2999)]
    for m, d in zip(raw, decoded, strict=True):
        assert parse_status_claim(m).encode() == m  # keys sorted, compact: the encoder's bytes
        assert d["notes"] == f"P2P dht_store: started (peers: 0, node: {NODE})"
        assert d["state"] == "executing"


class SmallPayloadServer(NatsServer):
    def __init__(self, binary: str, workdir: Path, limit: int) -> None:
        super().__init__(binary, workdir)
        self.conf = self.workdir / "server.conf"
        self.conf.write_text(f"max_payload: {limit}\n")

    def _args(self) -> list[str]:
        return [*super()._args(), "-c", str(self.conf)]


@pytest.mark.nats
def test_a_sweep_claim_too_large_for_the_server_arrives_cut_to_fit(
    nats_binary: str, tmp_path: Path, nats_runner: AsyncRunner
) -> None:
    """max_payload 4 KiB: a per-beat claim of an operation whose id and type escape to 2.5 KB arrives with
    its notes cut (marked, recorded in errors); its neighbours arrive whole."""
    server = SmallPayloadServer(nats_binary, tmp_path / "small", 4096)
    server.start()
    try:
        witness = Witness(nats_runner, server.url, "backbeat.status.>")
        cfg = BackbeatConfig(cluster_id=CLUSTER, agent_id="a", nats_url=server.url, tempo_bpm=60.0)
        big_id, big_type = "\x01" * 256, "\t" * 256
        uncut = ClaimFactory(CLUSTER, "a", NODE, ManualTime()).sweep([op(big_id, type=big_type)], 20_001)
        assert 4096 < len(sent(uncut)[0]) < 4096 + 400  # over by less than the notes take
        with Integration(cfg, node_id=NODE) as integration:
            integration.start_p2p_operation("before", "dht_store", 5)
            integration.start_p2p_operation(big_id, big_type, 5)
            integration.start_p2p_operation("after", "dht_store", 5)
            wait_until(lambda: integration.get_health()["claims_queued"] == 0, what="the start claims")
            publish_frame(nats_runner, server.url, 20_001)
            witness.wait_for(
                lambda ds: (
                    sum(d["beat_index"] == 20_001 and d["task_id"] != "chorus-p2p-health" for d in ds) >= 3
                ),
                what="the beat's claims",
            )
            health = integration.get_health()
            beat = [parse_status_claim(m) for m in witness.messages if b'"beat_index":20001,' in m]
        witness.close()
    finally:
        server.kill()
    assert [c.task_id for c in beat] == ["before", big_id, "after"]
    assert beat[1].notes.endswith(TRUNCATED)
    assert beat[1].notes.startswith("P2P \t\t\t")
    assert not beat[0].notes.endswith(TRUNCATED)
    assert health["claims_dropped"] == 0
    assert any("truncated to fit the server's limit of 4096 bytes" in e for e in health["errors"])
