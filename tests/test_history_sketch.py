"""The mergeable sketch of beats used (shared history): merge, quantiles within ALPHA, JSON form."""

from __future__ import annotations

import json
import math
import random

import pytest

from backbeat_sync.history import Sample, Sketch, history_key
from backbeat_sync.history.rules import quantile
from backbeat_sync.history.sketch import ALPHA, GAMMA, MIN_BEATS, bucket_of, representative


def sample(used: float, outcome: str = "done", kind: str | None = None) -> Sample:
    return Sample("t", "f", 10.0, used, outcome, kind)


def sketch_of(samples: list[Sample]) -> Sketch:
    s = Sketch()
    for x in samples:
        s.add(x)
    return s


def test_every_bucket_representative_is_within_alpha_of_its_values() -> None:
    """Bucket i holds (GAMMA**(i-1), GAMMA**i]; its representative is within ALPHA of both ends."""
    for i in range(-160, 300, 7):  # GAMMA**-160 > MIN_BEATS
        lo, hi, rep = GAMMA ** (i - 1), GAMMA**i, representative(i)
        assert abs(rep - lo) / lo <= ALPHA + 1e-12
        assert abs(rep - hi) / hi <= ALPHA + 1e-12
        assert bucket_of(hi) == i  # the upper bound is in the bucket
        assert bucket_of(lo * 1.0000001) == i
    assert bucket_of(MIN_BEATS / 2) is None
    assert bucket_of(0.0) is None
    assert representative(None) == 0.0


@pytest.mark.parametrize("seed", range(5))
def test_quantiles_are_the_nearest_rank_ones_within_alpha(seed: int) -> None:
    """p50/p95 (and any q) of a sketch are the exact nearest-rank quantiles within ALPHA relative."""
    rng = random.Random(seed)
    values = [rng.lognormvariate(0.0, 1.5) for _ in range(rng.randint(1, 3000))]
    s = sketch_of([sample(v) for v in values])
    ordered = sorted(values)
    for q in (0.01, 0.25, 0.5, 0.9, 0.95, 0.99, 1.0):
        exact = quantile(ordered, q)
        got = s.quantile(q)
        if exact < MIN_BEATS:
            assert got == 0.0
        else:
            assert abs(got - exact) <= ALPHA * exact + 1e-12, (q, exact, got)
    assert s.max == max(values)
    assert s.quantile(1.0) <= s.max


def test_merge_equals_the_sketch_of_all_runs() -> None:
    """Merging two agents' sketches gives exactly the sketch of their runs together."""
    rng = random.Random(7)
    a = [sample(rng.uniform(0, 5)) for _ in range(300)]
    b = [sample(rng.uniform(0, 50), rng.choice(["done", "failed", "exceeded"]), "late") for _ in range(200)]
    b = [x if x.outcome == "exceeded" else x._replace(exceeded_kind=None) for x in b]
    merged = sketch_of(a).merge(sketch_of(b))
    assert merged == sketch_of(a + b)
    assert merged.count == 500
    stats = merged.stats("t")
    assert stats.count == 500
    assert stats.failed == sum(x.outcome == "failed" for x in b)
    assert stats.late == stats.exceeded == sum(x.outcome == "exceeded" for x in b)
    assert stats.interrupted == 0


def test_outcomes_are_counted_and_failed_runs_have_no_duration() -> None:
    s = sketch_of([sample(1.0), sample(9.0, "failed"), sample(3.0, "exceeded", "interrupted")])
    st = s.stats("t")
    assert (st.count, st.done, st.failed, st.exceeded, st.interrupted, st.late) == (3, 1, 1, 1, 1, 0)
    assert st.max == 3.0  # the failed run's 9 beats are not a duration
    assert st.on_time_rate == 0.5
    assert Sketch().stats("t").p95 == 0.0


def test_json_round_trip_and_refusals() -> None:
    s = sketch_of([sample(0.0), sample(1.5), sample(2.5, "exceeded", "late"), sample(1.0, "failed")])
    back = Sketch.from_json(json.loads(json.dumps(s.to_json())))
    assert back == s
    assert back.buckets == s.buckets
    bad = [
        [],
        {"d": 1},
        {**s.to_json(), "d": -1},
        {**s.to_json(), "m": math.inf},
        {**s.to_json(), "b": {"x": 1}},
        {**s.to_json(), "d": 5},  # the buckets hold fewer runs than done + exceeded
    ]
    for data in bad:
        with pytest.raises(ValueError):
            Sketch.from_json(data)


def test_history_key_is_a_valid_kv_key_per_cluster_and_type() -> None:
    assert history_key("chorus", "dht_store") == "chorus.dht_store"
    odd = history_key("a.b", "x y/z")
    assert odd == "=" + b"a.b".hex() + "." + "=" + b"x y/z".hex()
    assert history_key("ab", "c") != history_key("a", "bc")
