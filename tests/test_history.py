"""BudgetHistory on its own: the figures, the ``"auto"`` rule, profiles, the SQLite file."""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path

import pytest

import backbeat_sync as bb
from backbeat_sync.history import (
    DEFAULT_PROFILES,
    OTHER_NAME,
    SCHEMA_VERSION,
    BudgetHistory,
    check_profiles,
    name_of,
    round_up_quarter,
)


def _runs(h: BudgetHistory, typ: str, used: list[float], *, budget: float = 4.0, **kw: object) -> None:
    for u in used:
        h.record(typ, "f", budget=budget, beats_used=u, **kw)  # type: ignore[arg-type]


# -- figures ---------------------------------------------------------------------------------


def test_stats_over_known_samples() -> None:
    """p50/p95/max are nearest-rank over done and exceeded runs; failed runs only count."""
    h = BudgetHistory()
    _runs(h, "t", [float(i) for i in range(1, 101)])  # 1..100 done
    _runs(h, "t", [1000.0] * 3, outcome="failed")
    st = h.stats("t")
    assert (st.count, st.done, st.failed, st.exceeded) == (103, 100, 3, 0)
    assert (st.p50, st.p95, st.max) == (50.0, 95.0, 100.0)
    assert st.on_time_rate == 1.0


def test_exceeded_runs_count_with_their_beats_and_their_kind() -> None:
    """Exceeded runs are in the percentiles (beats used) and split into interrupted / late."""
    h = BudgetHistory()
    _runs(h, "t", [1.0] * 6)
    _runs(h, "t", [4.0, 4.0, 4.0], outcome="exceeded", exceeded_kind="interrupted")
    _runs(h, "t", [9.0], outcome="exceeded", exceeded_kind="late")
    st = h.stats("t")
    assert (st.done, st.exceeded, st.interrupted, st.late) == (6, 4, 3, 1)
    assert (st.p50, st.max) == (1.0, 9.0)
    assert st.on_time_rate == pytest.approx(0.6)


def test_stats_by_name_and_types() -> None:
    """stats(type, name) restricts to one name; types() and names() list what was recorded."""
    h = BudgetHistory()
    h.record("a", "x", budget=1, beats_used=0.5)
    h.record("a", "y", budget=1, beats_used=2.0, outcome="exceeded", exceeded_kind="interrupted")
    h.record("b", "x", budget=1, beats_used=0.1)
    assert h.types() == ["a", "b"]
    assert h.names("a") == ["x", "y"]
    assert h.stats("a", "x").count == 1
    assert h.stats("a", "y").exceeded == 1
    assert h.stats("a").count == 2
    empty = h.stats("nothing")
    assert (empty.count, empty.p95, empty.on_time_rate) == (0, 0.0, 0.0)


def test_record_refuses_nonsense() -> None:
    """A sample no run could produce is an InvalidArgument naming what is wrong."""
    h = BudgetHistory()
    with pytest.raises(bb.InvalidArgument, match="outcome"):
        h.record("t", "f", budget=1, beats_used=1, outcome="maybe")
    with pytest.raises(bb.InvalidArgument, match="exceeded_kind"):
        h.record("t", "f", budget=1, beats_used=1, outcome="done", exceeded_kind="late")
    with pytest.raises(bb.InvalidArgument, match="budget"):
        h.record("t", "f", budget=0, beats_used=1)


def test_bounded_newest_n_per_type_and_name() -> None:
    """Only the newest ``keep`` samples of each (type, name) are kept."""
    h = BudgetHistory(keep=5)
    for i in range(12):
        h.record("t", "f", budget=10, beats_used=float(i))
        h.record("t", "g", budget=10, beats_used=100.0)
    assert [s.beats_used for s in h.samples("t", "f")] == [7.0, 8.0, 9.0, 10.0, 11.0]
    assert h.stats("t").count == 10


def test_names_past_the_cap_share_one_name() -> None:
    """A type keeps at most ``max_names`` names; the runs of names past them are kept under
    OTHER_NAME, so operation ids with no numbered suffix do not grow the history without bound."""
    h = BudgetHistory(keep=4, max_names=3)
    for url in ("a", "b", "c", "d", "e", "f"):
        h.record("fetch", f"fetch-https://host/{url}", budget=10, beats_used=1.0)
    h.record("fetch", "fetch-https://host/a", budget=10, beats_used=2.0)  # a name it has: kept as is
    h.record("other-type", "x", budget=10, beats_used=1.0)  # the cap is per type
    assert h.names("fetch") == [OTHER_NAME] + [f"fetch-https://host/{u}" for u in "abc"]
    kept = h.samples("fetch", OTHER_NAME)
    assert [s.name for s in kept] == [OTHER_NAME] * 3  # d, e and f
    assert h.stats("fetch").count == 2 + 1 + 1 + 3  # a twice, b, c, and (other)'s three
    assert h.names("other-type") == ["x"]
    with pytest.raises(bb.InvalidArgument, match="max_names"):
        BudgetHistory(max_names=0)


def test_names_cap_bounds_the_file(tmp_path: Path) -> None:
    """Written samples carry the shared name, so the file stays bounded by names x keep."""
    path = tmp_path / "h.sqlite"
    h = BudgetHistory(path, keep=3, max_names=5)
    h.open()
    for i in range(200):
        page = "".join(chr(97 + int(d)) for d in str(i))  # no digit: every id is its own name
        h.record("fetch", f"fetch-https://host/{page}", budget=10, beats_used=1.0)
    h.close()
    with sqlite3.connect(path) as db:
        (names,) = db.execute("SELECT count(DISTINCT name) FROM samples").fetchone()
        (rows,) = db.execute("SELECT count(*) FROM samples").fetchone()
    assert names == 5 + 1  # the first five, and (other)
    assert rows == 5 + 3  # one run each, and the newest keep=3 of (other)'s 195
    again = BudgetHistory(path, keep=3, max_names=5)
    again.open()
    assert len(again.names("fetch")) == 6
    assert len(again.samples("fetch", OTHER_NAME)) == 3
    again.close()


def test_clear_forgets_everything() -> None:
    """clear() empties the history."""
    h = BudgetHistory()
    _runs(h, "dht_store", [1.0] * 30)
    h.clear()
    assert h.types() == []
    assert h.suggest("dht_store") == 4.0


# -- the "auto" rule -------------------------------------------------------------------------


def test_round_up_quarter() -> None:
    """Rounded up to a quarter beat; an exact quarter stays."""
    assert [round_up_quarter(x) for x in (1.3, 1.5, 1.501, 0.01, 2.0)] == [1.5, 1.5, 1.75, 0.25, 2.0]


def test_min_samples_switch_from_profile_to_history() -> None:
    """19 runs: the profile's max; the 20th: p95 * 1.25 rounded up (here above the profile's min)."""
    h = BudgetHistory()
    assert h.resolve("task_coordination") == (20.0, "profile")
    _runs(h, "task_coordination", [7.1] * 19, budget=20)
    assert h.resolve("task_coordination") == (20.0, "profile")
    _runs(h, "task_coordination", [7.1], budget=20)
    assert h.resolve("task_coordination") == (9.0, "history")  # 7.1 * 1.25 = 8.875 -> 9.0


def test_learned_budget_never_below_the_profile_min() -> None:
    """dht_store at ~1 beat: p95 * 1.25 = 1.375 -> 1.5, but the profile's min is 2."""
    h = BudgetHistory()
    _runs(h, "dht_store", [1.0] * 19 + [1.1])
    assert h.suggest("dht_store") == 2.0


def test_type_whose_profile_allows_less_settles_at_p95_times_margin() -> None:
    """pubsub_sync (1-2): runs of 1.0 beat settle at 1.25."""
    h = BudgetHistory()
    _runs(h, "pubsub_sync", [1.0] * 20, budget=2)
    assert h.suggest("pubsub_sync") == 1.25


def test_without_profile_the_floor_is_a_quarter_beat() -> None:
    """No profile: p95 * margin, never below 0.25."""
    h = BudgetHistory()
    _runs(h, "mine", [0.01] * 20, budget=1)
    assert h.suggest("mine") == 0.25


def test_no_profile_and_too_little_history_names_the_type() -> None:
    """An InvalidArgument that names the type and says what to do."""
    h = BudgetHistory()
    _runs(h, "ingest", [1.0] * 5, budget=1)
    with pytest.raises(bb.InvalidArgument, match=r"'ingest'.*5 of 20.*give a number of beats or a profile"):
        h.suggest("ingest")


def test_ratchet_exceeded_runs_raise_the_budget_until_runs_finish() -> None:
    """A type whose runs keep running out at their budget: each generation gets 1.25x more,
    until the budget covers the work (6 beats), then it stays."""
    work = 6.0
    h = BudgetHistory(min_samples=20, margin=1.25)
    budgets = []
    for _ in range(12):
        b = h.suggest("ingest_big") if h.stats("ingest_big").timed >= 20 else 1.0
        budgets.append(b)
        for _ in range(20):
            if work <= b:
                h.record("ingest_big", "f", budget=b, beats_used=work)
            else:
                h.record(
                    "ingest_big", "f", budget=b, beats_used=b, outcome="exceeded", exceeded_kind="interrupted"
                )
    assert budgets[:4] == [1.0, 1.25, 1.75, 2.25]  # 1.25*1.25=1.5625 -> 1.75, ...
    assert budgets == sorted(budgets)
    assert budgets[-1] == budgets[-2] >= work
    assert budgets[-1] == round_up_quarter(work * 1.25)


def test_learned_budget_above_its_profile_is_reported_once_per_type() -> None:
    """dht_store needing 6.25 beats: one error line, however often it is suggested."""
    errors: list[str] = []
    h = BudgetHistory(on_error=errors.append)
    _runs(h, "dht_store", [5.0] * 20)
    assert h.suggest("dht_store") == 6.25
    h.record("dht_store", "f", budget=6.25, beats_used=5.0)
    assert h.suggest("dht_store") == 6.25
    assert errors == ["dht_store needs 6.25 beats, above its profile 2-4 (p95 5.00 beats over 20 runs)"]


def test_fixed_budget_below_history_p50_is_flagged_once() -> None:
    """A fixed budget below its type's p50 (with >= min_samples runs): counted once per (type, budget)."""
    logs: list[str] = []

    class Log:
        def warn(self, msg: str) -> None:
            logs.append(msg)

    h = BudgetHistory(log=Log())
    _runs(h, "t", [3.0] * 19, budget=2)
    assert h.budgets_below_history == 0  # too few runs to judge
    _runs(h, "t", [3.0] * 5, budget=2)
    _runs(h, "t", [3.0] * 5, budget=5)  # a budget above p50 is fine
    assert h.budgets_below_history == 1
    _runs(h, "t", [3.0] * 5, budget=2)
    assert h.budgets_below_history == 1
    assert len([m for m in logs if "below what its runs take" in m]) == 1


def test_auto_budgets_are_never_flagged_below_history() -> None:
    """Only fixed budgets are judged against the history."""
    h = BudgetHistory()
    _runs(h, "t", [3.0] * 30, budget=1, budget_source="history")
    assert h.budgets_below_history == 0


def test_margin_and_min_samples_are_configurable() -> None:
    """min_samples and margin change the rule."""
    h = BudgetHistory(min_samples=3, margin=2.0)
    _runs(h, "election", [4.0] * 3)
    assert h.suggest("election") == 8.0


# -- profiles --------------------------------------------------------------------------------


def test_builtin_profiles_are_the_seed_table() -> None:
    """The seed's 'Beat Budget Guidelines'."""
    assert DEFAULT_PROFILES == {
        "peer_discovery": (2, 5),
        "dht_store": (2, 4),
        "dht_retrieve": (1, 3),
        "pubsub_sync": (1, 2),
        "election": (3, 10),
        "task_coordination": (5, 20),
    }


def test_config_profiles_add_and_override() -> None:
    """BackbeatConfig(budget_profiles=...) adds types and overrides built-in ones."""
    cfg = bb.BackbeatConfig(nats_url="local://", budget_profiles={"ingest": (2, 8), "election": (1, 2)})
    integration = bb.Integration(cfg, node_id="n")
    assert integration.history.profile("ingest") == (2.0, 8.0)
    assert integration.history.profile("election") == (1.0, 2.0)
    assert integration.history.profile("dht_store") == (2.0, 4.0)


@pytest.mark.parametrize(
    "bad",
    [{"x": (0, 1)}, {"x": (3, 2)}, {"x": 5}, {"": (1, 2)}, {"x": (1, float("nan"))}, [("x", (1, 2))]],
)
def test_bad_profiles_are_a_config_error(bad: object) -> None:
    """0 < min <= max, finite numbers, non-empty type names, a mapping."""
    with pytest.raises(bb.ConfigError, match="budget_profiles"):
        bb.BackbeatConfig(budget_profiles=bad)  # type: ignore[arg-type]
    with pytest.raises(bb.ConfigError):
        check_profiles(bad)


def test_history_path_from_env() -> None:
    """CHORUS_BACKBEAT_HISTORY_PATH sets history_path."""
    cfg = bb.BackbeatConfig.from_env({"CHORUS_BACKBEAT_HISTORY_PATH": "/tmp/x.sqlite"})
    assert cfg.history_path == "/tmp/x.sqlite"


def test_name_of_operation_ids() -> None:
    """An operation id's trailing numbered part is dropped: its runs share a name."""
    assert name_of("election-17") == "election"
    assert name_of("upload:3f2a") == "upload"
    assert name_of("dht-store-k") == "dht-store-k"
    assert name_of("x7") == "x7"


# -- the file --------------------------------------------------------------------------------


def test_file_survives_and_is_bounded(tmp_path: Path) -> None:
    """Samples written to the file are loaded by a new history; the file keeps N per (type, name)."""
    path = tmp_path / "h.sqlite"
    h = BudgetHistory(path, keep=10)
    h.open()
    _runs(h, "dht_store", [1.0] * 8)
    h.flush()
    _runs(h, "dht_store", [1.0] * 17)  # only the newest 10 of these need writing
    h.close()
    assert h.written == 8 + 10
    with sqlite3.connect(path) as db:
        assert db.execute("SELECT count(*) FROM samples").fetchone() == (10,)
        assert db.execute("PRAGMA user_version").fetchone() == (SCHEMA_VERSION,)
        assert db.execute("PRAGMA journal_mode").fetchone() == ("wal",)
    again = BudgetHistory(path, keep=10)
    again.open()
    assert again.stats("dht_store").count == 10
    again.close()


def test_stats_see_runs_not_yet_written(tmp_path: Path) -> None:
    """stats() sees a run the moment it is recorded, before any flush writes it."""
    h = BudgetHistory(tmp_path / "h.sqlite")
    h.open()
    h.push(bb.history.Sample("t", "f", 1.0, 0.5, "done"))  # as the engine does
    assert h.stats("t").count == 1
    assert h.written == 0
    h.close()
    assert h.written == 1


def test_corrupt_row_is_skipped_and_counted(tmp_path: Path) -> None:
    """A row this library could not have written is skipped, counted and reported; the rest load."""
    path = tmp_path / "h.sqlite"
    h = BudgetHistory(path)
    h.open()
    _runs(h, "t", [1.0, 2.0])
    h.close()
    with sqlite3.connect(path) as db:
        db.execute("UPDATE samples SET beats_used = 'lots' WHERE id = 1")
    errors: list[str] = []
    again = BudgetHistory(path, on_error=errors.append)
    again.open()
    assert again.stats("t").count == 1
    assert again.errors == 1
    assert "corrupt row 1" in errors[0]
    again.close()


def test_not_a_database_is_a_config_error_naming_the_path(tmp_path: Path) -> None:
    """A file that is not SQLite: ConfigError at open, naming history_path and the path."""
    path = tmp_path / "junk.sqlite"
    path.write_bytes(b"this is not a database" * 100)
    with pytest.raises(bb.ConfigError, match=r"history_path.*junk\.sqlite"):
        BudgetHistory(path).open()


def test_unreadable_path_is_a_config_error_at_start(tmp_path: Path) -> None:
    """A history_path that cannot be opened fails Integration.start() with a ConfigError; nothing runs."""
    cfg = bb.BackbeatConfig(
        nats_url="local://hist-bad?pulse=manual", history_path=str(tmp_path / "no" / "such" / "dir.db")
    )
    integration = bb.Integration(cfg, node_id="n")
    with pytest.raises(bb.ConfigError, match=r"history_path.*dir\.db"):
        integration.start()
    assert not integration.running
    assert not [t for t in threading.enumerate() if t.name == "backbeat-beat"]


def test_newer_schema_is_refused(tmp_path: Path) -> None:
    """A file written by a newer schema is a ConfigError saying so (migration rule)."""
    path = tmp_path / "new.sqlite"
    with sqlite3.connect(path) as db:
        db.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    with pytest.raises(bb.ConfigError, match="newer"):
        BudgetHistory(path).open()


def test_two_histories_on_one_file_see_each_other(tmp_path: Path) -> None:
    """Each flush reads what other writers added (and not its own rows twice)."""
    path = tmp_path / "shared.sqlite"
    a, b = BudgetHistory(path), BudgetHistory(path)
    a.open()
    b.open()
    _runs(a, "t", [1.0] * 3)
    a.flush()
    _runs(b, "t", [2.0] * 2)
    b.flush()
    a.flush()
    assert a.stats("t").count == 5
    assert b.stats("t").count == 5
    a.close()
    b.close()


def test_a_forked_child_never_touches_the_file(tmp_path: Path) -> None:
    """After fork the child keeps its history in memory; the parent's file stays whole and its own."""
    import subprocess
    import sys
    import textwrap

    path = tmp_path / "fork.sqlite"
    script = textwrap.dedent(
        f"""
        import os, sqlite3
        from backbeat_sync.history import BudgetHistory
        h = BudgetHistory({str(path)!r})
        h.open()
        h.record("t", "parent", budget=1, beats_used=0.5)
        h.flush()
        pid = os.fork()
        if pid == 0:
            h.record("t", "child", budget=1, beats_used=0.5)
            h.flush()
            h.close()
            assert h.stats("t").count == 2  # the child still sees both, in memory
            os._exit(0)
        _, status = os.waitpid(pid, 0)
        assert status == 0, status
        h.record("t", "parent", budget=1, beats_used=0.5)
        h.close()
        db = sqlite3.connect({str(path)!r})
        rows = db.execute("SELECT name, count(*) FROM samples GROUP BY name").fetchall()
        assert rows == [("parent", 2)], rows
        print("ok")
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "ok"


def test_a_bad_record_in_a_run_log_is_dropped_not_raised() -> None:
    """Something in a run log that is not an engine record is dropped; stats and close go on."""
    from backbeat_sync.history import new_run_log

    class Owner:
        pass

    owner = Owner()
    log = new_run_log("junk-type", owner)
    log.append((None, None, 0.0))
    h = BudgetHistory()
    assert h.stats("junk-type").count == 0
    assert not log
    h.close()
