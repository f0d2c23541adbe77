"""Tests for jarvis.latency: statistics, targets, reporting, bounds and thread safety."""

from __future__ import annotations

import json
import math
import threading

import pytest
from hypothesis import given
from hypothesis import strategies as st

from jarvis.latency import (
    LatencySummary,
    LatencyTracker,
    RequestRecord,
    Stats,
    TargetCheck,
    percentile,
)


def tracker_with(totals: list[float], cache_hit: bool | None = None) -> LatencyTracker:
    tracker = LatencyTracker()
    for total in totals:
        tracker.record(RequestRecord(total_s=total, cache_hit=cache_hit))
    return tracker


def by_name(summary: LatencySummary) -> dict[str, TargetCheck]:
    return {t.name: t for t in summary.targets()}


def reference_percentile(values: list[float], q: float) -> float:
    """Textbook linear interpolation between closest ranks (numpy 'linear')."""
    s = sorted(values)
    pos = (len(s) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


# --- hand-computed statistics ---------------------------------------------------------


def test_stats_hand_computed() -> None:
    s = tracker_with([1, 2, 3, 4, 10]).summary()
    assert s.count == 5
    assert s.total is not None
    t = s.total
    assert t.count == 5
    assert t.mean == pytest.approx(4.0)
    assert t.median == pytest.approx(3.0)
    assert t.std == pytest.approx(math.sqrt(10), abs=1e-4)
    assert t.std == pytest.approx(3.1623, abs=1e-4)
    assert t.p95 == pytest.approx(8.8)
    assert t.p99 == pytest.approx(9.76)
    assert (t.min, t.max) == (1, 10)
    assert t.cv == pytest.approx(math.sqrt(10) / 4)
    assert s.spike_threshold_s == 5.0
    assert s.spikes == 1
    assert s.spikes_3sigma == 0  # 10 < 4 + 3 * 3.16


def test_percentile_known_values() -> None:
    assert percentile([1, 2, 3, 4, 10], 0) == 1
    assert percentile([1, 2, 3, 4, 10], 100) == 10
    assert percentile([1, 2, 3, 4, 10], 50) == 3
    assert percentile([1, 2, 3, 4], 50) == pytest.approx(2.5)
    assert percentile([1, 2, 3, 4], 25) == pytest.approx(1.75)  # numpy gives 1.75
    assert percentile([7.0], 95) == 7.0


@pytest.mark.parametrize("q", [-0.1, 100.1, math.nan])
def test_percentile_bad_q(q: float) -> None:
    with pytest.raises(ValueError):
        percentile([1.0, 2.0], q)


def test_percentile_empty() -> None:
    with pytest.raises(ValueError):
        percentile([], 50)


def test_stats_from_values_empty_and_zero_mean() -> None:
    assert Stats.from_values([]) is None
    zero = Stats.from_values([0.0, 0.0])
    assert zero is not None
    assert zero.mean == 0 and zero.std == 0 and zero.cv == 0


def test_three_sigma_spike() -> None:
    s = tracker_with([1.0] * 20 + [10.0]).summary()
    assert s.total is not None
    assert s.total.mean + 3 * s.total.std < 10.0
    assert s.spikes_3sigma == 1
    assert s.spikes == 1


def test_three_sigma_needs_three_samples() -> None:
    assert tracker_with([0.1, 100.0]).summary().spikes_3sigma == 0


def test_ttft_tokens_per_s_and_stages() -> None:
    tracker = LatencyTracker()
    tracker.record(
        RequestRecord(
            total_s=2.0,
            ttft_s=0.5,
            completion_tokens=30,
            stages={"asr": 0.2, "tts": 0.4},
        )
    )
    tracker.record(
        RequestRecord(total_s=1.0, ttft_s=0.5, completion_tokens=10, stages={"asr": 0.4})
    )
    tracker.record(RequestRecord(total_s=1.0))  # no token: no ttft, no speed
    s = tracker.summary()
    assert s.ttft is not None and s.ttft.count == 2
    assert s.tokens_per_s is not None
    assert s.tokens_per_s.count == 2
    assert s.tokens_per_s.mean == pytest.approx((20.0 + 20.0) / 2)
    assert list(s.stages) == ["asr", "tts"]
    assert s.stages["asr"].count == 2
    assert s.stages["asr"].mean == pytest.approx(0.3)
    assert s.stages["tts"].count == 1


@pytest.mark.parametrize(
    ("total", "ttft", "tokens", "expected"),
    [
        (2.0, 0.5, 30, 20.0),
        (2.0, 0.5, 1, None),  # a single token gives no rate
        (2.0, None, 30, None),
        (2.0, 0.0, 30, None),
        (0.5, 0.5, 30, None),  # no decode time
    ],
)
def test_tokens_per_s_property(
    total: float, ttft: float | None, tokens: int, expected: float | None
) -> None:
    rec = RequestRecord(total_s=total, ttft_s=ttft, completion_tokens=tokens)
    assert rec.tokens_per_s == (pytest.approx(expected) if expected is not None else None)


def test_record_copies_stages() -> None:
    stages = {"asr": 0.1}
    rec = RequestRecord(total_s=1.0, stages=stages)
    stages["asr"] = 99.0
    assert rec.stages == {"asr": 0.1}


# --- cache, warm-up, errors -----------------------------------------------------------


def test_cache_warmup_and_errors() -> None:
    tracker = LatencyTracker()
    # warm-up: cache miss, counted in cache stats, not in latency stats
    tracker.record(
        RequestRecord(total_s=9.0, cache_hit=False, prompt_tokens=100, warmup=True, label="cold")
    )
    # steady state
    tracker.record(RequestRecord(total_s=1.0, cache_hit=True, prompt_tokens=100, cached_tokens=90))
    tracker.record(RequestRecord(total_s=1.0, cache_hit=True, prompt_tokens=200, cached_tokens=150))
    # cache not applicable: excluded from cache stats (its tokens too)
    tracker.record(RequestRecord(total_s=3.0, cache_hit=None, prompt_tokens=1000))
    # failure: counted as error, out of latency stats, but its cache lookup counts
    tracker.record(RequestRecord(total_s=20.0, cache_hit=True, prompt_tokens=100, error="oom"))
    # failed warm-up
    tracker.record(RequestRecord(total_s=30.0, warmup=True, error="timeout"))

    s = tracker.summary()
    assert s.count == 3
    assert s.errors == 2
    assert s.warmup_count == 2
    assert s.total is not None
    assert s.total.max == 3.0
    assert s.total.mean == pytest.approx(5 / 3)
    assert s.spikes == 0
    assert s.cache_queries == 4
    assert s.cache_hits == 3
    assert s.cache_hit_rate == pytest.approx(0.75)
    assert s.token_reuse_rate == pytest.approx((0 + 90 + 150 + 0) / (100 + 100 + 200 + 100))
    assert tracker.lifetime == {"requests": 6, "errors": 2, "cache_queries": 4, "cache_hits": 3}


def test_no_cache_queries_gives_none() -> None:
    s = tracker_with([1.0, 1.0]).summary()
    assert s.cache_queries == 0
    assert s.cache_hit_rate is None
    assert s.token_reuse_rate is None


def test_cache_queries_without_prompt_tokens() -> None:
    s = tracker_with([1.0], cache_hit=True).summary()
    assert s.cache_hit_rate == 1.0
    assert s.token_reuse_rate is None


# --- targets --------------------------------------------------------------------------


def _good_records() -> list[RequestRecord]:
    return [
        RequestRecord(total_s=t, cache_hit=True, prompt_tokens=10, cached_tokens=9)
        for t in (0.9, 1.0, 1.1, 1.2, 1.0)
    ]


def _summary(records: list[RequestRecord], threshold: float = 5.0) -> LatencySummary:
    tracker = LatencyTracker(spike_threshold_s=threshold)
    for rec in records:
        tracker.record(rec)
    return tracker.summary()


def test_targets_all_pass() -> None:
    checks = _summary(_good_records()).targets()
    assert len(checks) == 4
    assert all(c.ok is True for c in checks), checks
    names = by_name(_summary(_good_records()))
    assert set(names) == {"average latency", "latency spikes", "consistency", "cache hit rate"}
    assert names["average latency"].goal == "<= 2.0 s (quoted: 0.5–2.0 s)"
    assert names["average latency"].value == pytest.approx(1.04)


def _only_failing(summary: LatencySummary) -> set[str]:
    return {c.name for c in summary.targets() if c.ok is False}


def test_target_average_latency_fails_only_when_slow() -> None:
    slow = [RequestRecord(total_s=t, cache_hit=True) for t in (2.5, 2.6, 2.4)]
    assert _only_failing(_summary(slow)) == {"average latency"}
    fast = [RequestRecord(total_s=t, cache_hit=True) for t in (0.1, 0.12, 0.11)]
    assert _only_failing(_summary(fast)) == set()  # faster than 0.5 s is no failure


def test_target_spike_fails() -> None:
    # steady ~2 s, but one request above a 2.05 s threshold
    records = [RequestRecord(total_s=t, cache_hit=True) for t in (1.8, 1.9, 2.0, 2.1)]
    s = _summary(records, threshold=2.05)
    assert s.spikes == 1
    assert _only_failing(s) == {"latency spikes"}


def test_target_consistency_fails() -> None:
    records = [RequestRecord(total_s=t, cache_hit=True) for t in (0.2, 0.2, 0.2, 3.0)]
    s = _summary(records)
    assert s.total is not None and s.total.cv > 0.5
    assert _only_failing(s) == {"consistency"}


def test_target_cache_hit_rate_fails() -> None:
    # exactly 80 % is not "> 80 %"
    records = [RequestRecord(total_s=1.0, cache_hit=i < 4) for i in range(5)]
    s = _summary(records)
    assert s.cache_hit_rate == pytest.approx(0.8)
    assert _only_failing(s) == {"cache hit rate"}


def test_targets_na_without_data() -> None:
    checks = LatencyTracker().summary().targets()
    assert len(checks) == 4
    assert all(c.ok is None and c.value is None for c in checks)


# --- reporting ------------------------------------------------------------------------


def test_to_dict_json_empty_tracker() -> None:
    d = LatencyTracker().summary().to_dict()
    json.dumps(d, allow_nan=False)
    assert d["count"] == 0
    assert d["mean_s"] is None
    assert d["cache_hit_rate"] is None
    assert d["stages"] == {}
    assert [t["ok"] for t in d["targets"]] == [None] * 4


REQUIRED_KEYS = (
    *("count", "errors", "warmup_count", "mean_s", "median_s", "p95_s", "p99_s", "min_s"),
    *("max_s", "std_s", "std_over_mean", "ttft_mean_s", "ttft_median_s", "ttft_p95_s"),
    *("tokens_per_s_mean", "spikes", "spikes_3sigma", "spike_threshold_s", "cache_queries"),
    *("cache_hits", "cache_hit_rate", "token_reuse_rate", "stages", "targets"),
)


def test_to_dict_full() -> None:
    tracker = LatencyTracker()
    tracker.record(RequestRecord(total_s=5.0, cache_hit=False, prompt_tokens=50, warmup=True))
    for t in (1, 2, 3, 4, 10):
        tracker.record(
            RequestRecord(
                total_s=t,
                ttft_s=0.25,
                completion_tokens=20,
                stages={"queue": 0.0, "asr": 0.3},
                cache_hit=True,
                prompt_tokens=50,
                cached_tokens=40,
            )
        )
    tracker.record(RequestRecord(total_s=0.0, error="boom"))
    d = tracker.summary().to_dict()
    text = json.dumps(d, allow_nan=False)
    assert json.loads(text) == d
    for key in REQUIRED_KEYS:
        assert key in d, key
    assert d["mean_s"] == pytest.approx(4.0)
    assert d["p95_s"] == pytest.approx(8.8)
    assert d["errors"] == 1 and d["warmup_count"] == 1 and d["spikes"] == 1
    assert d["cache_hit_rate"] == pytest.approx(5 / 6)
    assert d["token_reuse_rate"] == pytest.approx(200 / 300)
    assert d["stages"]["asr"]["mean_s"] == pytest.approx(0.3)
    assert {"mean_s", "median_s", "p95_s"} <= set(d["stages"]["queue"])
    assert d["stages"]["queue"]["std_over_mean"] == 0
    assert {"name", "goal", "value", "ok"} == set(d["targets"][0])


def test_format_table() -> None:
    tracker = LatencyTracker()
    for t in (0.8, 1.0, 1.2, 6.0):
        tracker.record(
            RequestRecord(
                total_s=t,
                ttft_s=0.2,
                completion_tokens=12,
                stages={"asr": 0.15, "tts": 0.3},
                cache_hit=True,
                prompt_tokens=10,
                cached_tokens=5,
            )
        )
    tracker.record(RequestRecord(total_s=1.0, error="x"))
    text = tracker.summary().format_table()
    lines = text.splitlines()
    header = lines[0]
    for col in ("n", "mean", "median", "p95", "p99", "min", "max", "std", "std/mean"):
        assert col in header
    for series in ("total", "ttft", "tokens/s", "asr", "tts"):
        assert any(line.startswith(series) or series in line.split() for line in lines), series
    lowered = text.lower()
    for word in ("spikes", "cache hit rate", "token reuse", "errors: 1"):
        assert word in lowered
    assert "PASS" in text and "FAIL" in text  # spike fails, cache passes
    assert "\x1b" not in text
    assert "200 ms" in text  # ttft shown in ms
    assert "6.00 s" in text  # max total shown in s


def test_format_table_empty() -> None:
    text = LatencyTracker().summary().format_table()
    assert "total" in text
    assert text.count("n/a") >= 4
    assert "PASS" not in text and "FAIL" not in text


# --- bounds, reset, threads -----------------------------------------------------------


def test_bounded_memory_keeps_newest() -> None:
    tracker = LatencyTracker(max_records=10)
    for i in range(25):
        tracker.record(
            RequestRecord(total_s=float(i), cache_hit=i % 2 == 0, error="e" if i < 3 else None)
        )
    kept = tracker.records()
    assert [r.total_s for r in kept] == [float(i) for i in range(15, 25)]
    assert tracker.summary().count == 10
    assert tracker.lifetime == {"requests": 25, "errors": 3, "cache_queries": 25, "cache_hits": 13}


def test_records_returns_copy_and_reset() -> None:
    tracker = tracker_with([1.0, 2.0], cache_hit=True)
    copy = tracker.records()
    copy.clear()
    assert len(tracker.records()) == 2
    tracker.reset()
    assert tracker.records() == []
    assert tracker.summary().count == 0
    assert tracker.lifetime == {"requests": 0, "errors": 0, "cache_queries": 0, "cache_hits": 0}


def test_thread_safety() -> None:
    tracker = LatencyTracker(max_records=100_000)
    threads_n, per_thread = 8, 500
    start = threading.Barrier(threads_n + 1)

    def worker(k: int) -> None:
        start.wait()
        for i in range(per_thread):
            tracker.record(
                RequestRecord(
                    total_s=0.001 * (i % 7),
                    cache_hit=i % 2 == 0,
                    error="boom" if i % 10 == 0 else None,
                    label=f"t{k}",
                )
            )

    def reader() -> None:
        start.wait()
        for _ in range(20):
            tracker.summary()

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(threads_n)]
    threads.append(threading.Thread(target=reader))
    for th in threads:
        th.start()
    for th in threads:
        th.join()

    total = threads_n * per_thread
    assert len(tracker.records()) == total
    assert tracker.lifetime == {
        "requests": total,
        "errors": threads_n * 50,
        "cache_queries": total,
        "cache_hits": threads_n * 250,
    }
    s = tracker.summary()
    assert s.count + s.errors == total
    assert s.cache_hits == threads_n * 250


# --- bad input ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("rec", "field"),
    [
        (RequestRecord(total_s=-0.1), "total_s"),
        (RequestRecord(total_s=math.nan), "total_s"),
        (RequestRecord(total_s=math.inf), "total_s"),
        (RequestRecord(total_s=1.0, ttft_s=-1.0), "ttft_s"),
        (RequestRecord(total_s=1.0, ttft_s=math.nan), "ttft_s"),
        (RequestRecord(total_s=1.0, stages={"asr": -0.5}), "asr"),
        (RequestRecord(total_s=1.0, stages={"tts": math.inf}), "tts"),
        (RequestRecord(total_s=1.0, prompt_tokens=-1), "prompt_tokens"),
        (RequestRecord(total_s=1.0, completion_tokens=-1), "completion_tokens"),
        (RequestRecord(total_s=1.0, prompt_tokens=5, cached_tokens=6), "cached_tokens"),
    ],
)
def test_record_rejects_bad_values(rec: RequestRecord, field: str) -> None:
    tracker = LatencyTracker()
    with pytest.raises(ValueError, match=field):
        tracker.record(rec)
    assert tracker.records() == []
    assert tracker.lifetime["requests"] == 0


@pytest.mark.parametrize(
    "kwargs",
    [
        {"spike_threshold_s": 0.0},
        {"spike_threshold_s": -1.0},
        {"spike_threshold_s": math.nan},
        {"max_records": 0},
        {"max_records": -5},
    ],
)
def test_constructor_rejects_bad_args(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        LatencyTracker(**kwargs)  # type: ignore[arg-type]


# --- properties -----------------------------------------------------------------------

durations = st.floats(min_value=0.0, max_value=1e6, allow_nan=False, allow_infinity=False)


def _le(a: float, b: float) -> bool:
    return a <= b + 1e-9 * max(1.0, abs(b))


@given(st.lists(durations, min_size=1, max_size=60))
def test_stats_invariants(values: list[float]) -> None:
    s = Stats.from_values(values)
    assert s is not None
    assert s.count == len(values)
    assert s.std >= 0
    assert s.cv >= 0
    assert s.min == min(values) and s.max == max(values)
    assert _le(s.min, s.median) and _le(s.median, s.p95)
    assert _le(s.p95, s.p99) and _le(s.p99, s.max)
    assert _le(s.min, s.mean) and _le(s.mean, s.max)


@given(
    st.lists(durations, min_size=1, max_size=60),
    st.floats(min_value=0, max_value=100, allow_nan=False),
)
def test_percentile_matches_reference(values: list[float], q: float) -> None:
    got = percentile(sorted(values), q)
    want = reference_percentile(values, q)
    assert math.isclose(got, want, rel_tol=1e-9, abs_tol=1e-9)


@given(
    st.lists(
        st.tuples(durations, st.none() | st.booleans(), st.booleans(), st.booleans()),
        max_size=40,
    )
)
def test_summary_invariants(rows: list[tuple[float, bool | None, bool, bool]]) -> None:
    tracker = LatencyTracker()
    for total, hit, warmup, failed in rows:
        tracker.record(
            RequestRecord(
                total_s=total,
                cache_hit=hit,
                warmup=warmup,
                error="x" if failed else None,
                prompt_tokens=10,
                cached_tokens=10 if hit else 0,
            )
        )
    s = tracker.summary()
    assert s.count == sum(not w and not f for _, _, w, f in rows)
    assert s.errors == sum(f for *_, f in rows)
    # Every lookup counts (warm-ups and failures too); only "no cache" does not.
    assert s.cache_queries == sum(hit is not None for _, hit, _, _ in rows)
    assert s.cache_hits == sum(hit is True for _, hit, _, _ in rows)
    assert (s.cache_hit_rate is None) == (s.cache_queries == 0)
    if s.cache_hit_rate is not None:
        assert 0 <= s.cache_hit_rate <= 1
    if s.token_reuse_rate is not None:
        assert 0 <= s.token_reuse_rate <= 1
    assert 0 <= s.spikes_3sigma <= s.count
    json.dumps(s.to_dict(), allow_nan=False)
    assert s.format_table()
