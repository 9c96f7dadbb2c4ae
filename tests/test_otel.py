"""Tests for backbeat_sync.otel: one span per tracked operation, with the SDK's in-memory exporter."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode

from backbeat_sync import (
    BackbeatConfig,
    BeatBudgetExceeded,
    Integration,
    OperationPhase,
    beat_budget,
    track_operation,
)
from backbeat_sync.operations import OperationRegistry, P2POperation
from backbeat_sync.otel import instrument

from .support import PATIENCE, HandledBeats, ManualPulse, unique_bus, wait_until


@pytest.fixture
def traced() -> Iterator[tuple[Integration, InMemorySpanExporter, Any]]:
    """A started integration at 600 BPM (a beat is 0.1 s), instrumented into an in-memory exporter."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    cfg = BackbeatConfig(
        cluster_id="otel", agent_id="agent-1", nats_url=f"local://{unique_bus()}", tempo_bpm=600
    )
    with Integration(cfg, node_id="n-1") as integration:
        handle = instrument(integration, tracer_provider=provider)
        yield integration, exporter, provider.get_tracer("test")
        handle.uninstrument()


def spans_named(exporter: InMemorySpanExporter, name: str) -> list[ReadableSpan]:
    return [s for s in exporter.get_finished_spans() if s.name == name]


def one(exporter: InMemorySpanExporter, name: str) -> ReadableSpan:
    wait_until(lambda: len(spans_named(exporter, name)) == 1, what=f"one {name} span")
    (span,) = spans_named(exporter, name)
    return span


def phases(span: ReadableSpan) -> list[str]:
    return [str(e.attributes["backbeat.phase"]) for e in span.events if e.name == "backbeat.phase"]


def test_track_operation_done_is_a_child_span_with_the_attributes(
    traced: tuple[Integration, InMemorySpanExporter, Any],
) -> None:
    """A track_operation block: one span named after its type, child of the current span, outcome done."""
    integration, exporter, tracer = traced
    with (
        tracer.start_as_current_span("request") as parent,
        track_operation("store-k", "dht_store", beats=50, peers=3, integration=integration) as op,
    ):
        op.set_phase(OperationPhase.EXECUTING, peers=5)
    span = one(exporter, "dht_store")
    assert span.parent is not None
    assert span.parent.span_id == parent.get_span_context().span_id
    attrs = dict(span.attributes or {})
    assert attrs["backbeat.operation_id"] == "store-k"
    assert attrs["backbeat.budget_beats"] == 50
    assert attrs["backbeat.outcome"] == "done"
    assert "backbeat.exceeded" not in attrs
    assert (attrs["backbeat.cluster_id"], attrs["backbeat.agent_id"]) == ("otel", "agent-1")
    assert isinstance(attrs["backbeat.start_beat"], int)
    assert isinstance(attrs["backbeat.beats_used"], int)
    assert phases(span)[0] in ("started", "executing")
    assert phases(span)[-1] == "completed"
    assert span.status.status_code is StatusCode.UNSET


def test_failed_block_is_error_with_the_exception(
    traced: tuple[Integration, InMemorySpanExporter, Any],
) -> None:
    """An exception out of the block: status ERROR, the exception recorded, outcome failed."""
    integration, exporter, _ = traced
    with (
        pytest.raises(ValueError, match="no quorum"),
        track_operation("elect-1", "election", beats=50, integration=integration),
    ):
        raise ValueError("no quorum")
    span = one(exporter, "election")
    assert span.status.status_code is StatusCode.ERROR
    assert "ValueError: no quorum" in (span.status.description or "")
    assert dict(span.attributes or {})["backbeat.outcome"] == "failed"
    (exc_event,) = [e for e in span.events if e.name == "exception"]
    assert dict(exc_event.attributes or {})["exception.type"] == "ValueError"


def test_explicit_operation_has_an_event_per_phase_and_fails_with_reason(
    traced: tuple[Integration, InMemorySpanExporter, Any],
) -> None:
    """start_p2p_operation .. phases .. complete, and .. fail: events per phase; the reason as status."""
    integration, exporter, _ = traced
    integration.start_p2p_operation("sync-1", "pubsub_sync", 20)
    integration.update_p2p_operation_phase("sync-1", OperationPhase.CONNECTING, 2)
    integration.update_p2p_operation_phase("sync-1", OperationPhase.NEGOTIATING, 3)
    integration.complete_p2p_operation("sync-1", 3)
    span = one(exporter, "pubsub_sync")
    assert phases(span) == ["started", "connecting", "negotiating", "completed"]
    assert span.parent is None  # no span was current
    integration.start_p2p_operation("disc-1", "peer_discovery", 20)
    integration.fail_p2p_operation("disc-1", "no peers answered")
    failed = one(exporter, "peer_discovery")
    assert failed.status.status_code is StatusCode.ERROR
    assert failed.status.description == "no peers answered"
    assert dict(failed.attributes or {})["backbeat.outcome"] == "failed"


def test_interrupted_budget_is_exceeded_with_warning_events(
    traced: tuple[Integration, InMemorySpanExporter, Any],
) -> None:
    """A block that outruns its budget: exceeded, interrupted, a warning event per fraction."""
    integration, exporter, _ = traced
    with (
        pytest.raises(BeatBudgetExceeded),
        track_operation("slow-1", "election", beats=2, integration=integration),
    ):
        deadline = time.monotonic() + PATIENCE
        while time.monotonic() < deadline:
            time.sleep(0.005)
    span = one(exporter, "election")
    attrs = dict(span.attributes or {})
    assert (attrs["backbeat.outcome"], attrs["backbeat.exceeded"]) == ("exceeded", "interrupted")
    warnings = [
        dict(e.attributes or {})["backbeat.fraction"]
        for e in span.events
        if e.name == "backbeat.budget_warning"
    ]
    assert warnings == [0.5, 0.75, 0.9]
    assert [e for e in span.events if e.name == "backbeat.budget_exceeded"]
    assert span.status.status_code is StatusCode.ERROR
    assert [e for e in span.events if e.name == "exception"]


def test_raise_after_is_exceeded_late(traced: tuple[Integration, InMemorySpanExporter, Any]) -> None:
    """on_exhaust="raise_after": the code ran past its budget and learned after: exceeded late."""
    integration, exporter, _ = traced
    with (
        pytest.raises(BeatBudgetExceeded),
        track_operation("late-1", "dht_store", beats=1, on_exhaust="raise_after", integration=integration),
    ):
        time.sleep(0.35)
    attrs = dict(one(exporter, "dht_store").attributes or {})
    assert (attrs["backbeat.outcome"], attrs["backbeat.exceeded"]) == ("exceeded", "late")


def test_decorated_calls_get_a_span_only_once_claimed() -> None:
    """On a hand-driven pulse: decorated calls between two beats make no claim and no span; a call
    running when a beat comes is claimed and gets a span, parented where the call was made."""
    exporter = InMemorySpanExporter()
    provider = _provider_of(exporter)
    tracer = provider.get_tracer("test")
    bus = unique_bus()
    cfg = BackbeatConfig(cluster_id="otel", agent_id="agent-1", nats_url=f"local://{bus}?pulse=manual")
    integration = Integration(cfg, node_id="n-1")
    pulse = ManualPulse(bus, "otel", handled=HandledBeats(integration))
    with integration:
        pulse.beat(1)
        handle = instrument(integration, tracer_provider=provider)

        @beat_budget(50, operation_type="quick", integration=integration)
        def quick() -> int:
            return 1

        running, beaten = threading.Event(), threading.Event()

        @beat_budget(50, operation_type="long", integration=integration)
        def long_call() -> None:
            running.set()
            assert beaten.wait(PATIENCE)

        for _ in range(100):
            quick()
        parent_ids: list[int] = []

        def caller() -> None:
            with tracer.start_as_current_span("job") as parent:
                parent_ids.append(parent.get_span_context().span_id)
                long_call()

        t = threading.Thread(target=caller)
        t.start()
        assert running.wait(PATIENCE)
        time.sleep(0.05)  # the span's start must be the call's, not the beat's
        pulse.beat(2)  # handled: the beat hook claimed the running call
        beaten.set()
        t.join(PATIENCE)
        handle.uninstrument()
    span = one(exporter, "long")
    assert span.parent is not None
    assert span.parent.span_id == parent_ids[0]  # found at the finish, in the owner's thread
    attrs = dict(span.attributes or {})
    assert attrs["backbeat.outcome"] == "done"
    assert str(attrs["backbeat.operation_id"]).startswith("test_decorated_calls")
    assert spans_named(exporter, "quick") == []
    assert span.start_time is not None
    assert span.end_time is not None
    assert span.end_time - span.start_time >= 50_000_000  # from the call's start (>= 0.05 s before the beat)


def test_spans_all_traces_every_decorated_call() -> None:
    """spans="all": every decorated call gets one span, nested calls nest, a claimed call is not doubled."""
    exporter = InMemorySpanExporter()
    cfg = BackbeatConfig(
        cluster_id="otel", agent_id="agent-1", nats_url=f"local://{unique_bus()}", tempo_bpm=600
    )
    with Integration(cfg, node_id="n-1") as integration:
        handle = instrument(integration, tracer_provider=_provider_of(exporter), spans="all")

        @beat_budget(50, operation_type="inner", integration=integration)
        def inner() -> int:
            return 2

        @beat_budget(50, operation_type="outer", integration=integration)
        def outer() -> int:
            with track_operation("block-1", "block", beats=50, integration=integration):
                pass  # a block inside a call: its own span, the call's child, not taken for the call's
            return inner() + inner()

        @beat_budget(1, operation_type="boom", integration=integration)
        def boom() -> None:
            raise KeyError("k")

        assert outer() == 4
        with pytest.raises(KeyError):
            boom()  # a failed call is claimed: its operation's span is the call's span
        handle.uninstrument()
    (out,) = spans_named(exporter, "outer")
    inners = spans_named(exporter, "inner")
    assert len(inners) == 2
    assert all(s.parent is not None and s.parent.span_id == out.context.span_id for s in inners)
    assert dict(out.attributes or {})["backbeat.outcome"] == "done"
    (b,) = spans_named(exporter, "boom")
    assert b.status.status_code is StatusCode.ERROR
    attrs = dict(b.attributes or {})
    assert attrs["backbeat.outcome"] == "failed"
    assert str(attrs["backbeat.operation_id"]).endswith(tuple("0123456789"))  # the claim's id, adopted
    (block,) = spans_named(exporter, "block")
    assert block.parent is not None
    assert block.parent.span_id == out.context.span_id
    assert dict(block.attributes or {})["backbeat.operation_id"] == "block-1"
    assert len(exporter.get_finished_spans()) == 5


def _provider_of(exporter: InMemorySpanExporter) -> TracerProvider:
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return provider


def test_spans_in_many_threads_keep_their_own_parents(
    traced: tuple[Integration, InMemorySpanExporter, Any],
) -> None:
    """Eight threads at once, each in its own request span: each operation's span is its thread's child."""
    integration, exporter, tracer = traced
    barrier = threading.Barrier(8)
    parents: dict[str, int] = {}
    errors: list[BaseException] = []

    def work(n: int) -> None:
        try:
            with tracer.start_as_current_span(f"request-{n}") as parent:
                parents[f"op-{n}"] = parent.get_span_context().span_id
                barrier.wait(PATIENCE)
                for i in range(5):
                    with track_operation(f"op-{n}-{i}", "threaded", beats=50, integration=integration):
                        pass
                integration.start_p2p_operation(f"op-{n}", "threaded", 20)
                barrier.wait(PATIENCE)
                if n % 2:
                    integration.complete_p2p_operation(f"op-{n}", 1)
                else:
                    integration.fail_p2p_operation(f"op-{n}", "odd one out")
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(PATIENCE)
    assert errors == []
    wait_until(lambda: len(spans_named(exporter, "threaded")) == 48, what="48 spans")
    for span in spans_named(exporter, "threaded"):
        op_id = str(dict(span.attributes or {})["backbeat.operation_id"])
        thread_key = "-".join(op_id.split("-")[:2])
        assert span.parent is not None
        assert span.parent.span_id == parents[thread_key], op_id
        outcome = dict(span.attributes or {})["backbeat.outcome"]
        if op_id.count("-") == 1:
            assert outcome == ("done" if int(op_id.split("-")[1]) % 2 else "failed")


def test_uninstrument_stops_spans(traced: tuple[Integration, InMemorySpanExporter, Any]) -> None:
    """After uninstrument() no new span is made (and calling it twice is fine)."""
    integration, exporter, _ = traced
    handle = instrument(integration, tracer_provider=_provider_of(exporter))
    handle.uninstrument()
    handle.uninstrument()
    with track_operation("once", "counted", beats=50, integration=integration):
        pass
    assert len(one_or_more(exporter, "counted")) == 1  # the fixture's instrumentation only


def test_uninstrument_ends_the_spans_of_running_operations(
    traced: tuple[Integration, InMemorySpanExporter, Any],
) -> None:
    """An operation still running at uninstrument(): its span ends then, outcome unknown, none later."""
    integration, exporter, _ = traced
    handle = instrument(integration, tracer_provider=_provider_of(exporter))
    integration.start_p2p_operation("running-1", "pending", 50)
    handle.uninstrument()
    ended = [
        s
        for s in spans_named(exporter, "pending")
        if dict(s.attributes or {})["backbeat.outcome"] == "unknown"
    ]
    assert len(ended) == 1
    integration.complete_p2p_operation("running-1", 1)
    assert len(one_or_more(exporter, "pending")) == 2  # and the fixture's own, when it completed


def one_or_more(exporter: InMemorySpanExporter, name: str) -> list[ReadableSpan]:
    wait_until(lambda: bool(spans_named(exporter, name)), what=f"a {name} span")
    return spans_named(exporter, name)


def test_bad_spans_argument_and_two_all_integrations() -> None:
    """spans= must be claimed or all; spans="all" is on for one integration at a time."""
    a = Integration(BackbeatConfig(nats_url=f"local://{unique_bus()}", tempo_bpm=600), node_id="a")
    b = Integration(BackbeatConfig(nats_url=f"local://{unique_bus()}", tempo_bpm=600), node_id="b")
    with pytest.raises(ValueError, match="spans must be"):
        instrument(a, spans="some")  # type: ignore[arg-type]
    first = instrument(a, spans="all")
    try:
        with pytest.raises(RuntimeError, match="already on"):
            instrument(b, spans="all")
    finally:
        first.uninstrument()
    instrument(b, spans="all").uninstrument()


def test_config_otel_uses_the_global_provider() -> None:
    """BackbeatConfig(otel=True) (or CHORUS_BACKBEAT_OTEL=1): start() instruments with the global provider."""
    script = textwrap.dedent(
        """
        import os
        from opentelemetry import trace
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import SimpleSpanProcessor
        from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
        from backbeat_sync import BackbeatConfig, Integration, track_operation

        exporter = InMemorySpanExporter()
        provider = TracerProvider()
        provider.add_span_processor(SimpleSpanProcessor(exporter))
        trace.set_tracer_provider(provider)
        os.environ["CHORUS_BACKBEAT_OTEL"] = "true"
        cfg = BackbeatConfig.from_env(nats_url="local://cfg-otel", tempo_bpm=600)
        assert cfg.otel is True
        with Integration(cfg, node_id="n") as i:
            with track_operation("op-1", "configured", beats=50):
                pass
            i.start_p2p_operation("op-2", "left-running", 50)
        names = sorted(s.name for s in exporter.get_finished_spans())
        print(names)
        assert names == ["configured", "left-running"], names
        """
    )
    subprocess.run([sys.executable, "-c", script], check=True, timeout=60, capture_output=True, text=True)


def test_config_otel_without_the_extra_names_it() -> None:
    """otel=True without opentelemetry installed: start() raises an ImportError naming the extra,
    and leaves nothing running."""
    script = textwrap.dedent(
        """
        import sys, threading
        sys.modules["opentelemetry"] = None  # as if the otel extra were not installed
        from backbeat_sync import BackbeatConfig, Integration
        i = Integration(BackbeatConfig(nats_url="local://no-otel", otel=True), node_id="n")
        try:
            i.start()
        except ImportError as exc:
            assert "backbeat_sync[otel]" in str(exc), exc
        else:
            raise AssertionError("start() did not refuse")
        assert [t.name for t in threading.enumerate() if t.name.startswith("backbeat-")] == []
        assert i.state.value == "new"
        """
    )
    subprocess.run([sys.executable, "-c", script], check=True, timeout=60, capture_output=True, text=True)


# -- the registry's listener seam -------------------------------------------------------------


class Recorder:
    def __init__(self) -> None:
        self.events: list[tuple[str, str, str]] = []

    def added(self, op: P2POperation) -> None:
        self.events.append(("added", op.id, op.phase.value))

    def changed(self, op: P2POperation) -> None:
        self.events.append(("changed", op.id, op.phase.value))

    def noted(self, op: P2POperation, notes: str) -> None:
        self.events.append(("noted", op.id, notes))

    def finished(self, op: P2POperation) -> None:
        self.events.append(("finished", op.id, op.phase.value))


class Raising(Recorder):
    def added(self, op: P2POperation) -> None:
        raise RuntimeError("listener bug")


def test_registry_listener_hears_the_lifecycle() -> None:
    """added, changed, noted, finished, in order; a raising listener breaks nothing; remove() stops it."""
    claimed: list[str] = []
    registry = OperationRegistry(lambda op: claimed.append(op.id))
    rec = Recorder()
    registry.add_listener(Raising())
    remove = registry.add_listener(rec)
    registry.start(P2POperation("a", "t", 0, 3), OperationPhase.EXECUTING)
    registry.set_phase("a", OperationPhase.EXECUTING, 4)
    registry.emit_now("a", lambda op: None, notes="beat budget warning: 50% of 3 beats used")
    registry.emit_now("a", lambda op: None)  # no notes: nothing to hear
    registry.finish("a", OperationPhase.COMPLETED)
    quiet = P2POperation("q", "t", 0, 3, announced=False)
    registry.add(quiet)
    registry.finish("q", OperationPhase.COMPLETED, quiet=True)  # never claimed: not finished for listeners
    remove()
    registry.add(P2POperation("b", "t", 0, 3))
    assert rec.events == [
        ("added", "a", "executing"),
        ("changed", "a", "executing"),
        ("noted", "a", "beat budget warning: 50% of 3 beats used"),
        ("finished", "a", "completed"),
        ("added", "q", "started"),
    ]
    assert claimed == ["a", "a", "a", "a", "b"]


def test_exceeded_span_has_its_event_when_the_block_finishes_before_the_note(
    traced: tuple[Integration, InMemorySpanExporter, Any],
) -> None:
    """The watchdog notes an interrupt after delivering it, so the owner can finish first: the
    finish (reason "beat budget exceeded") still gives the span its budget_exceeded event."""
    integration, exporter, _ = traced
    integration.start_p2p_operation("race-1", "election", 2)
    integration.fail_p2p_operation("race-1", "beat budget exceeded: used 2.01 of 2 beats")
    span = one(exporter, "election")
    attrs = dict(span.attributes or {})
    assert (attrs["backbeat.outcome"], attrs["backbeat.exceeded"]) == ("exceeded", "interrupted")
    assert [e.name for e in span.events if e.name == "backbeat.budget_exceeded"] == [
        "backbeat.budget_exceeded"
    ]


def test_spans_carry_the_workflow_ids(traced: tuple[Integration, InMemorySpanExporter, Any]) -> None:
    """Spans carry the claims' correlation id (the root's) and parent id (issue 13, workflows)."""
    integration, exporter, _tracer = traced
    with (
        track_operation("wf-root", "wf_root", beats=50, integration=integration),
        track_operation("wf-child", "wf_child", beats=50, integration=integration),
    ):
        pass
    root = dict(one(exporter, "wf_root").attributes or {})
    child = dict(one(exporter, "wf_child").attributes or {})
    assert (root["backbeat.correlation_id"], "backbeat.parent_id" in root) == ("wf-root", False)
    assert (child["backbeat.correlation_id"], child["backbeat.parent_id"]) == ("wf-root", "wf-root")
