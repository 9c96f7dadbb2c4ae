"""History shared by the cluster: BackbeatConfig(history_bucket=...) against a real ``nats-server -js``.

The outside witness is the bucket itself, read back with raw nats-py.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest

from backbeat_sync import BackbeatConfig, Integration
from backbeat_sync.errors import ConfigError
from backbeat_sync.history import ClusterHistory, Sample, history_key
from backbeat_sync.pulse import Pulse

from .natsserver import AsyncRunner, NatsServer
from .support import wait_until

CLUSTER = "hb"
BUCKET = "backbeat-history"
TYPE = "dht_store"
NODE = "12D3KooWSharedHistory"


def config(url: str, agent: str, **changes: Any) -> BackbeatConfig:
    fields: dict[str, Any] = {
        "cluster_id": CLUSTER,
        "agent_id": agent,
        "nats_url": url,
        "tempo_bpm": 600.0,
        "bar_length": 2,
        "reconnect_wait": 0.05,
        "connect_timeout": 5.0,
        "flush_timeout": 10.0,
        "history_bucket": BUCKET,
    }
    fields.update(changes)
    return BackbeatConfig(**fields)


def run_ops(integration: Integration, n: int, typ: str = TYPE) -> None:
    """``n`` budgeted runs of ``typ`` that end done at once."""
    for _ in range(n):
        integration.execute_with_beat_budget(4, lambda: None, operation_type=typ)


def read_value(runner: AsyncRunner, url: str, key: str) -> dict[str, Any]:
    """The bucket's value at ``key``, read with raw nats-py."""
    import nats

    async def read() -> dict[str, Any]:
        nc = await nats.connect(url)
        try:
            kv = await nc.jetstream().key_value(BUCKET)
            entry = await kv.get(key)
            assert entry.value is not None
            doc: dict[str, Any] = json.loads(entry.value)
            return doc
        finally:
            await nc.close()

    return runner.run(read())


@pytest.fixture
def agents(nats_jetstream: NatsServer) -> Iterator[list[Integration]]:
    """Integrations the test starts; each is stopped at the end, whatever happened."""
    started: list[Integration] = []
    yield started
    for i in started:
        i.stop()


def start(agents: list[Integration], cfg: BackbeatConfig) -> Integration:
    i = Integration(cfg, NODE)
    agents.append(i)
    i.start()
    return i


def test_two_agents_thirty_runs_each_count_sixty_in_either_ones_cluster_stats(
    nats_jetstream: NatsServer, agents: list[Integration], nats_runner: AsyncRunner
) -> None:
    url = nats_jetstream.url
    a = start(agents, config(url, "agent-a"))
    b = start(agents, config(url, "agent-b"))
    run_ops(a, 30)
    run_ops(b, 30)
    assert a.history.sync_cluster(10.0)  # creates the bucket, writes a's entry
    assert b.history.sync_cluster(10.0)  # reads a's, writes b's
    assert a.history.sync_cluster(10.0)  # reads b's
    for i in (a, b):
        cluster = i.history.stats(TYPE, scope="cluster")
        assert (cluster.count, cluster.done, cluster.failed, cluster.exceeded) == (60, 60, 0, 0)
        assert i.history.stats(TYPE).count == 30  # the local figures are unchanged
        assert i.history.stats(TYPE, scope="local").count == 30
    doc = read_value(nats_runner, url, history_key(CLUSTER, TYPE))
    assert sorted(doc["agents"]) == ["agent-a", "agent-b"]
    assert [doc["agents"][x]["d"] for x in ("agent-a", "agent-b")] == [30, 30]
    assert a.get_health()["errors"] == []
    assert b.get_health()["errors"] == []
    # A resend of the same figures (a retry, a second sync) replaces the entry: still 60.
    assert a.history.sync_cluster(10.0)
    assert b.history.sync_cluster(10.0)
    assert a.history.stats(TYPE, scope="cluster").count == 60


def test_the_merge_runs_once_a_bar_by_itself(nats_jetstream: NatsServer, agents: list[Integration]) -> None:
    """With a pulse, no sync_cluster(): each downbeat hands a merge to the loop."""
    url = nats_jetstream.url
    pulse = Pulse(config(url, "hb-pulse"), tempo_bpm=600.0)
    pulse.start()
    try:
        a = start(agents, config(url, "agent-a"))
        b = start(agents, config(url, "agent-b"))
        assert a.wait_for_beat(30)
        assert b.wait_for_beat(30)
        run_ops(a, 30)
        run_ops(b, 30)
        for i in (a, b):
            wait_until(lambda i=i: i.history.stats(TYPE, scope="cluster").count == 60, 30, "60 runs")
        assert a.history.cluster is not None
        assert a.history.cluster.merges >= 1
    finally:
        pulse.stop()


def test_a_restarted_agent_goes_on_from_its_entry_and_counts_nothing_twice(
    nats_jetstream: NatsServer, agents: list[Integration]
) -> None:
    url = nats_jetstream.url
    b = start(agents, config(url, "agent-b"))
    run_ops(b, 30)
    first = start(agents, config(url, "agent-a"))
    run_ops(first, 30)
    first.stop()  # stop() merges this run's last runs
    again = start(agents, config(url, "agent-a"))
    run_ops(again, 10)
    assert again.history.sync_cluster(10.0)
    assert b.history.sync_cluster(10.0)  # b's entry goes in after a's
    assert again.history.sync_cluster(10.0)
    assert again.history.stats(TYPE, scope="cluster").count == 70  # 30 + 10 of a's, 30 of b's
    assert b.history.stats(TYPE, scope="cluster").count == 70
    assert again.history.stats(TYPE).count == 10  # the local (in-memory) history began again


def test_auto_budgets_learn_from_the_cluster_with_history_scope_cluster(
    nats_jetstream: NatsServer, agents: list[Integration]
) -> None:
    """An agent with no runs of its own learns "auto" from another agent's runs."""
    url = nats_jetstream.url
    teacher = start(agents, config(url, "teacher"))
    for _ in range(30):
        teacher.history.record(TYPE, "f", budget=4, beats_used=1.1)
    learner = start(agents, config(url, "learner", history_scope="cluster"))
    local = start(agents, config(url, "local-only"))
    assert learner.history.resolve(TYPE) == (4.0, "profile")  # nothing learned yet
    assert teacher.history.sync_cluster(10.0)
    assert learner.history.sync_cluster(10.0)
    assert local.history.sync_cluster(10.0)
    # p95 1.1 (within 2 %) * 1.25 = 1.375.. -> 1.5, below the profile's min 2
    assert learner.history.resolve(TYPE) == (2.0, "history")
    assert abs(learner.history.stats(TYPE, scope="cluster").p95 - 1.1) <= 0.022
    assert local.history.resolve(TYPE) == (4.0, "profile")  # scope "local": its own (no) runs


class Meddler:
    """A KeyValue whose first update lets another agent write the key in between."""

    def __init__(self, kv: Any, between: Any) -> None:
        self._kv = kv
        self._between = between
        self.meddled = False

    async def get(self, key: str) -> Any:
        return await self._kv.get(key)

    async def create(self, key: str, value: bytes) -> Any:
        return await self._meddle(self._kv.create, key, value)

    async def update(self, key: str, value: bytes, last: int) -> Any:
        return await self._meddle(self._kv.update, key, value, last=last)

    async def _meddle(self, fn: Any, *args: Any, **kw: Any) -> Any:
        if not self.meddled:
            self.meddled = True
            assert await self._between()
        return await fn(*args, **kw)


def sketch_side(agent: str, n: int) -> ClusterHistory:
    errors: list[str] = []
    c = ClusterHistory(
        BUCKET,
        CLUSTER,
        agent,
        lambda fn: None,
        on_error=errors.append,
        on_change=lambda typ: None,
        time_source=lambda: 0.0,
    )
    for k in range(n):
        c.add(Sample(TYPE, "f", 4.0, 0.5 + k / 10, "done"))
    return c


@pytest.mark.parametrize("existing", [False, True], ids=["create", "update"])
def test_a_concurrent_writer_between_read_and_write_loses_nothing(
    nats_jetstream: NatsServer, nats_runner: AsyncRunner, existing: bool
) -> None:
    """The compare-and-set fails, the merge reads again and retries: both entries survive."""
    import nats

    from backbeat_sync.ha import open_bucket

    a, b, c = sketch_side("agent-a", 30), sketch_side("agent-b", 30), sketch_side("agent-c", 5)

    async def scenario() -> dict[str, Any]:
        nc = await nats.connect(nats_jetstream.url)
        try:
            kv = await open_bucket(nc, BUCKET, create=True, replicas=1, timeout=5.0)
            if existing:  # the key exists already: the conflict is on update(last=...)
                assert await c.merge(kv)
            assert await a.merge(Meddler(kv, lambda: b.merge(kv)))
            assert await b.merge(kv)  # reads a's entry
            entry = await kv.get(history_key(CLUSTER, TYPE))
            doc: dict[str, Any] = json.loads(entry.value)
            return doc
        finally:
            await nc.close()

    doc = nats_runner.run(scenario())
    assert a.retries == 1
    assert b.retries == 0
    expected = ["agent-a", "agent-b"] + (["agent-c"] if existing else [])
    assert sorted(doc["agents"]) == expected
    total = 60 + (5 if existing else 0)
    assert sum(e["d"] for e in doc["agents"].values()) == total
    assert a.stats(TYPE).count == total
    assert b.stats(TYPE).count == total


DAY = 86_400.0
T0 = 1_764_000_000.0


def timed_side(agent: str, n: int, clock: list[float]) -> ClusterHistory:
    """A cluster history of ``agent`` with ``n`` done runs, on the clock ``clock[0]``."""
    c = ClusterHistory(
        BUCKET,
        CLUSTER,
        agent,
        lambda fn: None,
        on_error=lambda msg: None,
        on_change=lambda typ: None,
        time_source=lambda: clock[0],
        retire_after=7 * DAY,
    )
    add_runs(c, n)
    return c


def add_runs(c: ClusterHistory, n: int) -> None:
    for k in range(n):
        c.add(Sample(TYPE, "f", 4.0, 0.5 + k / 10, "done"))


def merge_all(nats_jetstream: NatsServer, nats_runner: AsyncRunner, steps: list[Any]) -> dict[str, Any]:
    """Run each step (``async (kv) -> None``) on one bucket; return the key's value after them."""
    import nats

    from backbeat_sync.ha import open_bucket

    async def scenario() -> dict[str, Any]:
        nc = await nats.connect(nats_jetstream.url)
        try:
            kv = await open_bucket(nc, BUCKET, create=True, replicas=1, timeout=5.0)
            for step in steps:
                await step(kv)
            entry = await kv.get(history_key(CLUSTER, TYPE))
            doc: dict[str, Any] = json.loads(entry.value)
            return doc
        finally:
            await nc.close()

    return nats_runner.run(scenario())


def merged(c: ClusterHistory) -> Any:
    async def step(kv: Any) -> None:
        assert await c.merge(kv)

    return step


def test_an_agent_gone_longer_than_retire_after_is_folded_into_retired(
    nats_jetstream: NatsServer, nats_runner: AsyncRunner
) -> None:
    """The next writer folds a stale entry into RETIRED: the value stops growing with agents
    that never come back, and the cluster's counts do not change."""
    from backbeat_sync.history.cluster import RETIRED

    then, later = [T0], [T0 + 8 * DAY]
    gone = timed_side("agent-gone", 5, then)
    a = timed_side("agent-a", 30, later)
    b = timed_side("agent-b", 10, later)
    doc = merge_all(nats_jetstream, nats_runner, [merged(gone), merged(a), merged(b)])
    assert sorted(doc["agents"]) == [RETIRED, "agent-a", "agent-b"]
    assert doc["agents"][RETIRED]["d"] == 5
    assert sum(e["d"] for e in doc["agents"].values()) == 45
    assert (a.retired, b.retired) == (1, 0)
    assert a.stats(TYPE).count == 35  # a read before b wrote
    assert b.stats(TYPE).count == 45


def test_a_retired_agent_that_comes_back_counts_nothing_twice(
    nats_jetstream: NatsServer, nats_runner: AsyncRunner
) -> None:
    """An agent away longer than retire_after finds its entry folded; what it had written is
    in RETIRED, so its entry then holds only the runs it had not written."""
    from backbeat_sync.history.cluster import RETIRED

    clock_a, clock_b = [T0], [T0 + 8 * DAY]
    a = timed_side("agent-a", 10, clock_a)
    b = timed_side("agent-b", 1, clock_b)

    async def a_comes_back(kv: Any) -> None:
        add_runs(a, 3)
        clock_a[0] = T0 + 8 * DAY
        assert await a.merge(kv)

    async def and_goes_on(kv: Any) -> None:
        add_runs(a, 2)
        assert await a.merge(kv)

    doc = merge_all(nats_jetstream, nats_runner, [merged(a), merged(b), a_comes_back, and_goes_on])
    assert doc["agents"][RETIRED]["d"] == 10
    assert doc["agents"]["agent-a"]["d"] == 5  # 3 + 2 written after its return
    assert doc["agents"]["agent-b"]["d"] == 1
    assert a.stats(TYPE).count == 16  # every run once: 10 + 3 + 2 of a's, 1 of b's
    assert a.sketch(TYPE).done == 16


def test_a_live_agent_rewrites_its_entry_before_it_could_be_retired(
    nats_jetstream: NatsServer, nats_runner: AsyncRunner
) -> None:
    """With no new runs, an agent rewrites its entry once it is a quarter of retire_after
    old (and not before), so another agent never takes it for gone."""
    clock = [T0]
    a = timed_side("agent-a", 4, clock)

    async def idle(kv: Any) -> None:
        clock[0] = T0 + DAY  # fresh: nothing to write
        assert await a.merge(kv)
        assert a.merges == 1
        clock[0] = T0 + 2 * DAY  # past 7 / 4 days: rewritten
        assert await a.merge(kv)
        assert a.merges == 2

    doc = merge_all(nats_jetstream, nats_runner, [merged(a), idle])
    assert doc["agents"]["agent-a"]["t"] == T0 + 2 * DAY
    assert doc["agents"]["agent-a"]["d"] == 4


def test_an_entry_with_no_time_is_never_retired(nats_jetstream: NatsServer, nats_runner: AsyncRunner) -> None:
    """An entry without "t" (another writer's) has no known age: it stays as it is."""
    a = timed_side("agent-a", 2, [T0 + 100 * DAY])

    async def foreign(kv: Any) -> None:
        value = {
            "v": 1,
            "type": TYPE,
            "agents": {"peer": {"d": 7, "f": 0, "e": 0, "l": 0, "m": 1.0, "b": {"0": 7}}},
        }
        await kv.create(history_key(CLUSTER, TYPE), json.dumps(value).encode())

    doc = merge_all(nats_jetstream, nats_runner, [foreign, merged(a)])
    assert sorted(doc["agents"]) == ["agent-a", "peer"]
    assert a.retired == 0
    assert a.stats(TYPE).count == 9


def test_without_jetstream_it_is_reported_once_and_history_stays_local(
    nats_server: NatsServer, agents: list[Integration]
) -> None:
    i = start(agents, config(nats_server.url, "agent-a", history_scope="cluster"))
    run_ops(i, 25)
    assert not i.history.sync_cluster(10.0)
    assert not i.history.sync_cluster(10.0)
    problems = [e for e in i.get_health()["errors"] if "history bucket" in e]
    assert len(problems) == 1, i.get_health()["errors"]
    assert "JetStream" in problems[0]
    assert "stays local" in problems[0]
    assert i.history.stats(TYPE, scope="cluster") == i.history.stats(TYPE)
    assert i.history.resolve(TYPE)[1] == "history"  # learned from its own 25 runs


def test_local_scheme_has_no_shared_history() -> None:
    with Integration(config("local://", "agent-a", tempo_bpm=120.0), NODE) as i:
        assert i.history.cluster is None
        assert not i.history.sync_cluster(1.0)
        run_ops(i, 3)
        assert i.history.stats(TYPE, scope="cluster").count == 3


def test_config_fields_are_validated_and_read_from_the_environment() -> None:
    cfg = BackbeatConfig.from_env(
        environ={"CHORUS_BACKBEAT_HISTORY_BUCKET": "hist-1", "CHORUS_BACKBEAT_HISTORY_SCOPE": "cluster"}
    )
    assert (cfg.history_bucket, cfg.history_scope) == ("hist-1", "cluster")
    assert BackbeatConfig().history_bucket is None
    assert BackbeatConfig().history_scope == "local"
    for bad in ("a.b", "", "a b", "x*"):
        with pytest.raises(ConfigError, match="history_bucket"):
            BackbeatConfig(history_bucket=bad)
    with pytest.raises(ConfigError, match="history_scope"):
        BackbeatConfig(history_bucket="h", history_scope="global")
    with pytest.raises(ConfigError, match="needs history_bucket"):
        BackbeatConfig(history_scope="cluster")


def test_stats_scope_is_checked() -> None:
    with Integration(config("local://", "a", tempo_bpm=120.0), NODE) as i:
        with pytest.raises(ValueError, match="scope"):
            i.history.stats(TYPE, scope="global")
        with pytest.raises(ValueError, match="name"):
            i.history.stats(TYPE, "f", scope="cluster")


AGENT_PROCESS = """
import sys, time
from backbeat_sync import BackbeatConfig, Integration
url, agent = sys.argv[1], sys.argv[2]
cfg = BackbeatConfig(cluster_id="hb", agent_id=agent, nats_url=url, history_bucket="backbeat-history",
                     flush_timeout=10.0)
with Integration(cfg, "12D3KooWSharedHistory") as i:
    for _ in range(30):
        i.execute_with_beat_budget(4, lambda: None, operation_type="dht_store")
    deadline = time.monotonic() + 30
    while True:
        i.history.sync_cluster(10.0)
        count = i.history.stats("dht_store", scope="cluster").count
        if count >= 60 or time.monotonic() > deadline:
            break
    print(count, i.history.cluster.retries, len(i.get_health()["errors"]))
"""


def test_two_agent_processes_writing_at_once_both_count_sixty(nats_jetstream: NatsServer) -> None:
    """Two processes, 30 runs each, merging concurrently: each ends with 60, none lost."""
    import subprocess
    import sys

    procs = [
        subprocess.Popen(
            [sys.executable, "-c", AGENT_PROCESS, nats_jetstream.url, name],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name in ("proc-a", "proc-b")
    ]
    try:
        outs = [p.communicate(timeout=90) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for p, (out, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err
        count, _retries, errors = (int(x) for x in out.split())
        assert count == 60, out
        assert errors == 0, err
