"""Budget history through the engine: every face records its runs; ``"auto"`` and ``profile=``."""

from __future__ import annotations

import multiprocessing
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import attrs
import pytest

import backbeat_sync as bb
from backbeat_sync._time import ManualTime
from tests.support import ClaimLog, unique_bus, wait_until


@contextmanager
def manual(tempo: float = 60.0, **cfg: Any) -> Iterator[tuple[bb.Integration, ManualTime]]:
    """A started integration on a manual clock and a silent manual pulse: beats are manual seconds."""
    t = ManualTime()
    config = bb.BackbeatConfig(
        cluster_id="h", agent_id="a", nats_url=f"local://{unique_bus()}?pulse=manual", tempo_bpm=tempo, **cfg
    )
    with bb.Integration(config, node_id="n", time_source=t) as integration:
        yield integration, t


@contextmanager
def fast(tempo: float = 600.0, **cfg: Any) -> Iterator[bb.Integration]:
    """A started integration with its own in-process pulse at ``tempo``."""
    config = bb.BackbeatConfig(
        cluster_id="h", agent_id="a", nats_url=f"local://{unique_bus()}", tempo_bpm=tempo, **cfg
    )
    with bb.Integration(config, node_id="n") as integration:
        yield integration


# -- every face records, with the beats it used (manual clock) ------------------------------------


def test_decorated_call_is_recorded_with_its_beats() -> None:
    """A @beat_budget call that returns: done, its qualname, its budget, the beats it took."""
    with manual() as (integration, t):

        @bb.beat_budget(4, operation_type="dht_store", integration=integration, warn_at=None)
        def store() -> None:
            t.advance(1.5)  # 1.5 beats at 60 BPM

        store()
        (s,) = integration.history.samples("dht_store")
        assert (s.name, s.budget, s.outcome, s.budget_source) == (
            "test_decorated_call_is_recorded_with_its_beats.<locals>.store",
            4.0,
            "done",
            "fixed",
        )
        assert s.beats_used == pytest.approx(1.5)
        assert s.tempo_bpm == pytest.approx(60.0)
        assert s.end_beat == pytest.approx(integration.clock.budget_position())


def test_failed_decorated_call_is_recorded_failed() -> None:
    """A call that raises is a failed run."""
    with manual() as (integration, t):

        @bb.beat_budget(4, operation_type="t", integration=integration, warn_at=None)
        def boom() -> None:
            t.advance(0.5)
            raise KeyError("x")

        with pytest.raises(KeyError):
            boom()
        (s,) = integration.history.samples("t")
        assert (s.outcome, s.exceeded_kind) == ("failed", None)
        assert s.beats_used == pytest.approx(0.5)


def test_track_operation_block_is_recorded_under_its_id_prefix() -> None:
    """A track_operation block: done under the id without its numbered tail; a failing one failed."""
    with manual() as (integration, t):
        for i in range(3):
            with bb.track_operation(f"election-{i}", "election", beats=5, integration=integration):
                t.advance(2.0)
        with (
            pytest.raises(RuntimeError),
            bb.track_operation("election-9", "election", beats=5, integration=integration),
        ):
            t.advance(1.0)
            raise RuntimeError("lost quorum")
        st = integration.history.stats("election", "election")
        assert (st.count, st.done, st.failed, st.p50) == (4, 3, 1, pytest.approx(2.0))


def test_start_p2p_operation_runs_are_recorded() -> None:
    """start_p2p_operation ... complete / fail: done, failed, and a completion past its estimate is late."""
    with manual() as (integration, t):
        integration.start_p2p_operation("store-1", "dht_store", 3)
        t.advance(2.0)
        integration.complete_p2p_operation("store-1", 3)
        integration.start_p2p_operation("store-2", "dht_store", 3)
        t.advance(1.0)
        integration.fail_p2p_operation("store-2", "no peers")
        integration.start_p2p_operation("store-3", "dht_store", 3)
        t.advance(5.0)
        integration.complete_p2p_operation("store-3", 3)
        integration.start_p2p_operation("store-4", "dht_store", 3)
        integration.update_p2p_operation_phase("store-4", bb.OperationPhase.FAILED, 0)
        runs = [
            (s.name, s.outcome, s.exceeded_kind, round(s.beats_used, 6))
            for s in integration.history.samples("dht_store")
        ]
        assert runs == [
            ("store", "done", None, 2.0),
            ("store", "failed", None, 1.0),
            ("store", "exceeded", "late", 5.0),
            ("store", "failed", None, 0.0),
        ]


def test_execute_with_beat_budget_is_recorded_with_its_type() -> None:
    """execute_with_beat_budget(..., operation_type=) records under that type; fn gets its own kwargs."""
    with manual() as (integration, t):

        def work(x: int, *, y: int) -> int:
            t.advance(0.25)
            return x + y

        assert integration.execute_with_beat_budget(2, work, 1, y=2, operation_type="pubsub_sync") == 3
        (s,) = integration.history.samples("pubsub_sync")
        assert (s.name, s.beats_used) == (work.__qualname__, pytest.approx(0.25))


def test_runs_of_a_budget_that_is_gone_are_kept() -> None:
    """A decorated function (or an execute_with_beat_budget call) collected before the drain loses no run."""
    import gc

    with manual() as (integration, _):

        def make() -> Any:
            @bb.beat_budget(4, operation_type="gone", integration=integration)
            def f() -> None:
                pass

            return f

        f = make()
        f()
        f()
        integration.execute_with_beat_budget(3, lambda: None, operation_type="gone")
        del f
        gc.collect()
        assert integration.history.stats("gone").count == 3


def test_exceeded_runs_are_recorded_interrupted_or_late() -> None:
    """A spinning call stopped in Python is exceeded/interrupted; raise_after is exceeded/late."""
    with fast(tempo=1200) as integration:

        @bb.beat_budget(1, operation_type="spin", integration=integration, warn_at=None)
        def spin() -> None:
            while True:
                pass

        @bb.beat_budget(
            1, operation_type="slow", integration=integration, warn_at=None, on_exhaust="raise_after"
        )
        def slow() -> None:
            # 8 beats at 1200 BPM: a loaded machine's late frames snap the position back, so a
            # sleep of 2 beats could count under 1 (it did once in a full run).
            time.sleep(0.4)

        with pytest.raises(bb.BeatBudgetExceeded):
            spin()
        with pytest.raises(bb.BeatBudgetExceeded):
            slow()
        (a,) = integration.history.samples("spin")
        (b,) = integration.history.samples("slow")
        assert (a.outcome, b.outcome) == ("exceeded", "exceeded")
        assert b.exceeded_kind == "late"
        assert a.exceeded_kind in ("interrupted", "late")  # late only if the GIL hand-over was slow
        assert a.beats_used >= 1.0
        assert b.beats_used >= 1.0


def test_recording_writes_only_from_the_beat_thread(tmp_path: Path) -> None:
    """Callers only append; while running, every write to the file happens on the beat thread."""
    writers: list[str] = []
    with fast(tempo=1200, history_path=str(tmp_path / "h.sqlite")) as integration:
        history = integration.history
        real = history._write

        def spy(db: Any, batch: Any) -> Any:
            if batch:
                writers.append(threading.current_thread().name)
            return real(db, batch)

        history._write = spy  # type: ignore[method-assign]

        @bb.beat_budget(100, operation_type="w", integration=integration)
        def quick() -> None:
            pass

        for _ in range(50):
            quick()
        assert integration.history.stats("w").count == 50  # seen before any write
        wait_until(lambda: history.written == 50, what="the beat thread wrote the runs")
    assert writers
    assert set(writers) == {"backbeat-beat"}


def test_threads_record_while_others_read() -> None:
    """8 threads finish 500 runs each while another thread reads stats: every run is counted once."""
    with fast(tempo=1200, history_keep=10_000) as integration:
        barrier = threading.Barrier(9)
        done = threading.Event()
        counts: list[int] = []

        def worker(i: int) -> None:
            @bb.beat_budget(100, operation_type="conc", name=f"w{i}", integration=integration)
            def work() -> None:
                pass

            barrier.wait(30)
            for _ in range(500):
                work()

        def reader() -> None:
            barrier.wait(30)
            while not done.is_set():
                counts.append(integration.history.stats("conc").count)

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
        watcher = threading.Thread(target=reader)
        for t in [*threads, watcher]:
            t.start()
        for t in threads:
            t.join(60)
        done.set()
        watcher.join(60)
        assert integration.history.stats("conc").count == 4000
        assert counts == sorted(counts)  # never went back
        assert {integration.history.stats("conc", f"w{i}").count for i in range(8)} == {500}


# -- "auto" -----------------------------------------------------------------------------------


def test_auto_end_to_end_at_600_bpm() -> None:
    """A dht_store function taking about 1 beat, @beat_budget("auto"): 4 beats (the profile's max) for
    its first 20 runs, then 2 (the profile's min: p95 * 1.25 is about 1.5); its claims say why."""
    with fast(tempo=600) as integration:
        log = ClaimLog()
        integration.on_claim(log)
        budgets: list[float] = []

        @bb.beat_budget("auto", operation_type="dht_store", warn_at=None)
        def store() -> float:
            time.sleep(0.08)  # about 1 beat at 600 BPM (0.8: a loaded machine may add 80 ms to a p95)
            return 0.0

        for _ in range(24):
            budgets.append(integration.history.suggest("dht_store"))
            store()
        assert budgets[:20] == [4.0] * 20
        assert budgets[20:] == [2.0] * 4
        samples = integration.history.samples("dht_store")
        assert [s.budget for s in samples] == budgets
        assert [s.budget_source for s in samples] == ["profile"] * 20 + ["history"] * 4
        assert all(s.outcome == "done" for s in samples)
        # Calls still running at a beat are claimed, with where their budget came from.
        sources = {c.budget_source for c in log.snapshot() if c.operation_type == "dht_store"}
        assert sources <= {"profile", "history"}
        assert sources


def test_auto_settles_at_p95_when_the_profile_allows_less() -> None:
    """pubsub_sync (1-2 beats) with runs of 1 beat settles at p95 * 1.25 = 1.25."""
    with manual() as (integration, t):

        @bb.beat_budget("auto", operation_type="pubsub_sync", integration=integration, warn_at=None)
        def sync() -> None:
            t.advance(1.0)

        for _ in range(20):
            sync()
        assert integration.history.suggest("pubsub_sync") == 1.25
        sync()
        assert [s.budget for s in integration.history.samples("pubsub_sync")][-2:] == [2.0, 1.25]


def test_auto_without_profile_learns_below_one_beat() -> None:
    """A type without profile (user profile given) settles at p95 * 1.25."""
    with manual(budget_profiles={"ingest": (0.5, 8)}) as (integration, t):

        @bb.beat_budget("auto", operation_type="ingest", integration=integration, warn_at=None)
        def ingest() -> None:
            t.advance(1.0)

        for _ in range(20):
            ingest()
        ingest()
        assert [s.budget for s in integration.history.samples("ingest")][-2:] == [8.0, 1.25]


def test_spinning_auto_function_is_stopped_at_the_suggested_budget() -> None:
    """A spinning "auto" function is interrupted at the budget suggest() reported."""
    with fast(tempo=1200) as integration:
        for _ in range(20):
            integration.history.record("dht_retrieve", "get", budget=3, beats_used=1.0)
        suggested = integration.history.suggest("dht_retrieve")
        assert suggested == 1.25

        @bb.beat_budget("auto", operation_type="dht_retrieve")
        def spin() -> None:
            while True:
                pass

        with pytest.raises(bb.BeatBudgetExceeded) as info:
            spin()
        assert info.value.budget_beats == suggested
        assert info.value.beats_used >= suggested


def test_auto_without_profile_or_history_fails_at_the_call_naming_the_type() -> None:
    """Not at decoration: at the call, an InvalidArgument naming the type."""
    with manual() as (integration, _):

        @bb.beat_budget("auto", operation_type="mystery", integration=integration)
        def f() -> None:
            pass

        with pytest.raises(bb.InvalidArgument, match=r"'mystery'.*give a number of beats or a profile"):
            f()
        with pytest.raises(bb.InvalidArgument, match="mystery"):
            bb.track_operation("m-1", "mystery", beats="auto", integration=integration)
        with pytest.raises(bb.InvalidArgument, match="mystery"):
            integration.start_p2p_operation("m-2", "mystery", "auto")
        with pytest.raises(bb.InvalidArgument, match="mystery"):
            integration.execute_with_beat_budget("auto", f, operation_type="mystery")


def test_auto_with_no_integration_runs_plainly() -> None:
    """With no integration started, an "auto" function runs plainly, as a fixed one does."""

    @bb.beat_budget("auto", operation_type="mystery")
    def f() -> int:
        return 7

    assert f() == 7


def test_track_operation_and_start_p2p_auto() -> None:
    """track_operation(beats="auto") and start_p2p_operation(..., "auto") take the suggested budget."""
    with manual() as (integration, t):
        log = ClaimLog()
        integration.on_claim(log)
        with bb.track_operation("store-1", "dht_store", beats="auto", integration=integration) as op:
            assert op.budget_beats == 4.0
        integration.start_p2p_operation("store-2", "dht_store", "auto")
        integration.complete_p2p_operation("store-2", 1)
        for i in range(20):
            with bb.track_operation(f"store-{i + 3}", "dht_store", beats=3, integration=integration):
                t.advance(3.0)
        with bb.track_operation("store-x", "dht_store", beats="auto", integration=integration) as op:
            assert op.budget_beats == 3.75  # p95 3.0 * 1.25
        log.wait_for(lambda cs: any(c.task_id == "store-x" and c.state == "done" for c in cs))
        by_task = {c.task_id: c.budget_source for c in log.snapshot()}
        assert by_task["store-1"] == "profile"
        assert by_task["store-2"] == "profile"
        assert by_task["store-3"] is None  # a fixed number: nothing added on the wire
        assert by_task["store-x"] == "history"


def test_execute_with_beat_budget_auto_needs_a_type() -> None:
    """execute_with_beat_budget("auto", fn) without operation_type is an InvalidArgument."""
    with manual() as (integration, _):
        with pytest.raises(bb.InvalidArgument, match="operation_type"):
            integration.execute_with_beat_budget("auto", lambda: None)
        assert integration.execute_with_beat_budget("auto", lambda: 5, operation_type="election") == 5
        assert integration.history.samples("election")[0].budget == 10.0


def test_profile_takes_the_profile_max() -> None:
    """@beat_budget(profile="election") has a 10-beat budget, type election; a config profile counts."""
    with manual(budget_profiles={"ingest": (2, 8)}) as (integration, _):

        @bb.beat_budget(profile="election", integration=integration)
        def elect() -> None:
            pass

        @bb.beat_budget(profile="ingest", integration=integration)
        def ingest() -> None:
            pass

        @bb.beat_budget(profile="nope", integration=integration)
        def nope() -> None:
            pass

        elect()
        ingest()
        assert integration.history.samples("election")[0].budget == 10.0
        assert integration.history.samples("ingest")[0].budget == 8.0
        with pytest.raises(bb.InvalidArgument, match="profile"):
            nope()


def test_decoration_checks() -> None:
    """Neither or both of beats and profile, or a word other than "auto", fail at decoration."""
    with pytest.raises(bb.InvalidArgument):
        bb.beat_budget()
    with pytest.raises(bb.InvalidArgument):
        bb.beat_budget(3, profile="election")
    with pytest.raises(bb.InvalidArgument):
        bb.beat_budget("fast")  # type: ignore[arg-type]
    with pytest.raises(bb.InvalidArgument):
        bb.track_operation("x", "t", beats="fast")  # type: ignore[arg-type]


def test_fixed_budget_below_history_counts_in_health() -> None:
    """A fixed 1-beat budget for work that takes 3: budgets_below_history is 1 in health."""
    with manual() as (integration, t):
        for i in range(20):
            with bb.track_operation(f"e-{i}", "election", beats=5, integration=integration):
                t.advance(3.0)
        assert integration.get_health()["budgets_below_history"] == 0
        with bb.track_operation(
            "e-x", "election", beats=1, integration=integration, on_exhaust="warn", warn_at=None
        ):
            pass
        assert integration.get_health()["budgets_below_history"] == 1


def test_learned_budget_outside_profile_goes_to_health_errors() -> None:
    """dht_store runs of 5 beats: its learned budget (6.25) is reported in errors once."""
    with manual() as (integration, _t):
        for _i in range(20):
            integration.history.record("dht_store", "s", budget=8, beats_used=5.0)
        assert integration.history.suggest("dht_store") == 6.25
        integration.history.suggest("dht_store")
        errors = integration.get_health()["errors"]
        assert [e for e in errors if "dht_store needs 6.25 beats" in e] == [
            "dht_store needs 6.25 beats, above its profile 2-4 (p95 5.00 beats over 20 runs)"
        ]


# -- persistence ------------------------------------------------------------------------------


def test_persistence_a_new_integration_suggests_from_the_file(tmp_path: Path) -> None:
    """30 runs recorded to a file; a new integration on the same file suggests from them."""
    path = str(tmp_path / "budgets.sqlite")
    with manual(history_path=path) as (integration, t):

        @bb.beat_budget("auto", operation_type="dht_store", integration=integration, warn_at=None)
        def store() -> None:
            t.advance(2.8)

        for _ in range(30):
            store()
        assert integration.history.suggest("dht_store") == 3.5
    with manual(history_path=path) as (again, _):
        assert again.history.stats("dht_store").count == 30
        assert again.history.suggest("dht_store") == 3.5  # 2.8 * 1.25 = 3.5


def _writer(path: str, n: int, tag: str, barrier: Any) -> None:
    import backbeat_sync as bb

    cfg = bb.BackbeatConfig(
        cluster_id="p", agent_id=tag, nats_url=f"local://{tag}", tempo_bpm=600, history_path=path
    )
    with bb.Integration(cfg, node_id=tag):

        @bb.beat_budget(100, operation_type="shared", name=tag)
        def work() -> None:
            pass

        barrier.wait(30)
        for _ in range(n):
            work()


def test_two_processes_writing_one_file_lose_no_sample(tmp_path: Path) -> None:
    """Two processes record 700 runs each into one file at once: all 1,400 are in it."""
    path = str(tmp_path / "shared.sqlite")
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(2)
    procs = [ctx.Process(target=_writer, args=(path, 700, f"w{i}", barrier)) for i in range(2)]
    for p in procs:
        p.start()
    try:
        for p in procs:
            p.join(120)
        assert [p.exitcode for p in procs] == [0, 0]  # None: hung (killed below)
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
    with sqlite3.connect(path) as db:
        rows = dict(db.execute("SELECT name, count(*) FROM samples GROUP BY name").fetchall())
    assert rows == {"w0": 700, "w1": 700}


# -- the wire ---------------------------------------------------------------------------------


def test_budget_source_on_the_wire() -> None:
    """budget_source is optional: omitted when None, round-trips, and a bad value is rejected."""
    claim = bb.StatusClaim(
        cluster_id="c",
        agent_id="a",
        node_id="n",
        task_id="t",
        beat_index=1,
        state="executing",
        beats_left=1,
        progress=0.5,
        notes="x",
        sent_at="2026-11-28T01:00:00.000Z",
    )
    assert "budget_source" not in claim.to_dict()
    learned = attrs.evolve(claim, budget_source="history")
    assert learned.to_dict()["budget_source"] == "history"
    assert bb.StatusClaim.parse(learned.encode()) == learned
    with pytest.raises(bb.ProtocolError, match="budget_source"):
        bb.StatusClaim.parse(claim.encode().replace(b'"type"', b'"budget_source":"guess","type"'))


def _opener(path: str, barrier: Any, results: Any) -> None:
    history = bb.BudgetHistory(path=path)
    barrier.wait(30)
    try:
        history.open()
        history.close()
        results.put("ok")
    except Exception as exc:
        results.put(repr(exc))


def test_processes_opening_one_new_file_at_once_all_open_it(tmp_path: Path) -> None:
    """Six processes open one new history file at the same moment, 15 times: every open
    succeeds. (SQLite answers the first WAL switch and schema of a new file with "database is
    locked" at once, past its busy handler: before open() retried, about 1 trial in 5 failed.)"""
    ctx = multiprocessing.get_context("fork")
    failures = []
    for trial in range(15):
        path = str(tmp_path / f"new-{trial}.sqlite")
        barrier, results = ctx.Barrier(6), ctx.Queue()
        procs = [ctx.Process(target=_opener, args=(path, barrier, results)) for _ in range(6)]
        for p in procs:
            p.start()
        try:
            outcomes = [results.get(timeout=60) for _ in procs]
        finally:
            for p in procs:
                p.join(60)
                if p.is_alive():
                    p.kill()
        failures += [o for o in outcomes if o != "ok"]
    assert failures == []
