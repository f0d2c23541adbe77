"""Request latency tracking for the voice pipeline.

`LatencyTracker` collects one `RequestRecord` per finished request and turns the
recent window into a `LatencySummary`: mean/median/p95/p99/std of the total time,
time to first token, decode speed and per-stage times, spike counts, context-cache
hit rate and token reuse, plus a check against the targets users of local voice
assistants usually quote (see `LatencySummary.targets`).

Standard library only, so it can run inside the server, a benchmark script or a test.
"""

from __future__ import annotations

import math
import statistics
import threading
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "LatencySummary",
    "LatencyTracker",
    "RequestRecord",
    "Stats",
    "TargetCheck",
    "percentile",
]

# Targets quoted by users of local voice assistants.
AVG_LATENCY_RANGE_S = (0.5, 2.0)
MAX_CV = 0.5
MIN_CACHE_HIT_RATE = 0.8

TARGET_AVG_LATENCY = "average latency"
TARGET_SPIKES = "latency spikes"
TARGET_CONSISTENCY = "consistency"
TARGET_CACHE = "cache hit rate"


@dataclass(frozen=True)
class RequestRecord:
    """One finished (or failed) request.

    `stages` is copied on construction, so the caller may reuse its dict.
    Values are checked by `LatencyTracker.record`, not here.
    """

    total_s: float
    """Wall time submit -> done, queue wait included."""
    ttft_s: float | None = None
    """Time to first token; None if no token was produced."""
    stages: Mapping[str, float] = field(default_factory=dict)
    """Per-stage durations in seconds, e.g. {"queue": .., "asr": .., "tts": ..}."""
    prompt_tokens: int = 0
    cached_tokens: int = 0
    """Prompt tokens reused from the context cache."""
    completion_tokens: int = 0
    cache_hit: bool | None = None
    """None = cache disabled / not applicable (not counted in the hit rate)."""
    error: str | None = None
    """Set for failed requests."""
    label: str = ""
    """Free tag, e.g. "cold", "warm", a client name."""
    warmup: bool = False
    """Warm-up requests are kept out of the steady-state latency statistics."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "stages", dict(self.stages))

    @property
    def tokens_per_s(self) -> float | None:
        """Decode speed: completion_tokens / (total_s - ttft_s).

        None unless ttft_s > 0, total_s > ttft_s and more than one token was produced.
        """
        if self.ttft_s is None or self.ttft_s <= 0 or self.completion_tokens <= 1:
            return None
        decode_s = self.total_s - self.ttft_s
        if decode_s <= 0:
            return None
        return self.completion_tokens / decode_s


def _check_duration(name: str, value: float) -> None:
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value!r}")
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {value!r}")


def _validate(rec: RequestRecord) -> None:
    """Raise ValueError naming the first bad field of `rec`."""
    _check_duration("total_s", rec.total_s)
    if rec.ttft_s is not None:
        _check_duration("ttft_s", rec.ttft_s)
    for stage, seconds in rec.stages.items():
        _check_duration(f"stages[{stage!r}]", seconds)
    for name in ("prompt_tokens", "cached_tokens", "completion_tokens"):
        count: int = getattr(rec, name)
        if count < 0:
            raise ValueError(f"{name} must be >= 0, got {count!r}")
    if rec.cached_tokens > rec.prompt_tokens:
        raise ValueError(
            f"cached_tokens ({rec.cached_tokens}) exceeds prompt_tokens ({rec.prompt_tokens})"
        )


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """The q-th percentile (q in [0, 100]) of already sorted values.

    Linear interpolation between the closest ranks, as numpy's default ("linear")
    method. Raises ValueError on empty input or q outside [0, 100].
    """
    if not sorted_values:
        raise ValueError("percentile of an empty sequence")
    if not 0 <= q <= 100:
        raise ValueError(f"q must be in [0, 100], got {q!r}")
    pos = (len(sorted_values) - 1) * q / 100
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    a, b = sorted_values[lo], sorted_values[hi]
    t = pos - lo
    # Interpolate from the nearer end (as numpy does) and clamp, so rounding
    # never pushes the result outside [a, b] and percentiles stay monotonic in q.
    value = a + (b - a) * t if t < 0.5 else b - (b - a) * (1 - t)
    return min(max(value, a), b)


@dataclass(frozen=True)
class Stats:
    """Summary statistics of one series. std is the population standard deviation."""

    count: int
    mean: float
    median: float
    p95: float
    p99: float
    min: float
    max: float
    std: float
    cv: float
    """Coefficient of variation std/mean (0 when mean == 0)."""

    @classmethod
    def from_values(cls, values: Sequence[float]) -> Stats | None:
        """Stats of finite values; None for empty input."""
        if not values:
            return None
        ordered = sorted(values)
        lo, hi = ordered[0], ordered[-1]
        mean = min(max(statistics.fmean(ordered), lo), hi)  # clamp float rounding
        std = statistics.pstdev(ordered)
        return cls(
            count=len(ordered),
            mean=mean,
            median=percentile(ordered, 50),
            p95=percentile(ordered, 95),
            p99=percentile(ordered, 99),
            min=lo,
            max=hi,
            std=std,
            cv=std / mean if mean != 0 else 0.0,
        )


@dataclass(frozen=True)
class TargetCheck:
    """One target and whether the measured value meets it."""

    name: str
    goal: str
    value: float | None
    ok: bool | None
    """None when it cannot be judged (no data)."""


def _num(x: float | None) -> float | None:
    """JSON-safe number: None for missing or non-finite values."""
    return x if x is not None and math.isfinite(x) else None


def _stats_dict(s: Stats | None, unit: str = "_s") -> dict[str, Any]:
    keys = ("mean", "median", "p95", "p99", "min", "max", "std")
    out: dict[str, Any] = {"count": s.count if s else 0}
    out.update({f"{k}{unit}": _num(getattr(s, k)) if s else None for k in keys})
    out["std_over_mean"] = _num(s.cv) if s else None
    return out


def _fmt_time(x: float) -> str:
    if x == 0:
        return "0 ms"
    if x < 0.01:
        return f"{x * 1000:.2f} ms"
    if x < 1:
        return f"{x * 1000:.0f} ms"
    if x < 100:
        return f"{x:.2f} s"
    return f"{x:.0f} s"


def _fmt_rate(x: float) -> str:
    return f"{x:.1f}"


def _fmt_pct(x: float | None) -> str:
    return "n/a" if x is None else f"{x * 100:.1f} %"


@dataclass(frozen=True)
class LatencySummary:
    """Statistics over a window of records.

    "Steady state" means successful, non-warm-up requests; only those feed the
    latency statistics. Cache figures count every request with cache_hit set
    (warm-up and failed ones included: the cache lookups were real).
    """

    count: int
    """Steady-state requests that succeeded (warm-up and errors excluded)."""
    errors: int
    """Failed requests, warm-up included."""
    warmup_count: int
    total: Stats | None
    ttft: Stats | None
    tokens_per_s: Stats | None
    stages: Mapping[str, Stats]
    spike_threshold_s: float
    spikes: int
    """Steady-state requests with total_s > spike_threshold_s."""
    spikes_3sigma: int
    """Steady-state requests with total_s > mean + 3*std; 0 with fewer than 3 samples.

    With the population std no sample can exceed mean + 3*std before 11 samples.
    """
    cache_queries: int
    cache_hits: int
    cache_hit_rate: float | None
    token_reuse_rate: float | None
    """sum(cached_tokens) / sum(prompt_tokens) over requests with cache_hit set."""

    @classmethod
    def from_records(
        cls, records: Iterable[RequestRecord], spike_threshold_s: float = 5.0
    ) -> LatencySummary:
        """Summarise records (assumed valid, see `LatencyTracker.record`)."""
        errors = warmup_count = 0
        totals: list[float] = []
        ttfts: list[float] = []
        speeds: list[float] = []
        stage_values: dict[str, list[float]] = {}
        cache_queries = cache_hits = prompt_tokens = cached_tokens = 0
        for rec in records:
            if rec.cache_hit is not None:
                cache_queries += 1
                cache_hits += rec.cache_hit
                prompt_tokens += rec.prompt_tokens
                cached_tokens += rec.cached_tokens
            warmup_count += rec.warmup
            if rec.error is not None:
                errors += 1
                continue
            if rec.warmup:
                continue
            totals.append(rec.total_s)
            if rec.ttft_s is not None:
                ttfts.append(rec.ttft_s)
            if (speed := rec.tokens_per_s) is not None:
                speeds.append(speed)
            for stage, seconds in rec.stages.items():
                stage_values.setdefault(stage, []).append(seconds)

        total = Stats.from_values(totals)
        spikes_3sigma = 0
        if total is not None and total.count >= 3:
            limit = total.mean + 3 * total.std
            spikes_3sigma = sum(t > limit for t in totals)
        stages: dict[str, Stats] = {}
        for stage, values in stage_values.items():
            stats = Stats.from_values(values)
            if stats is not None:
                stages[stage] = stats
        return cls(
            count=len(totals),
            errors=errors,
            warmup_count=warmup_count,
            total=total,
            ttft=Stats.from_values(ttfts),
            tokens_per_s=Stats.from_values(speeds),
            stages=stages,
            spike_threshold_s=spike_threshold_s,
            spikes=sum(t > spike_threshold_s for t in totals),
            spikes_3sigma=spikes_3sigma,
            cache_queries=cache_queries,
            cache_hits=cache_hits,
            cache_hit_rate=cache_hits / cache_queries if cache_queries else None,
            token_reuse_rate=cached_tokens / prompt_tokens if prompt_tokens else None,
        )

    def targets(self) -> list[TargetCheck]:
        """The targets users of local voice assistants quote: average latency 0.5–2.0 s
        (judged as at most 2.0 s: being faster than the range is not a failure);
        no spike above the threshold (5 s default); std < 50 % of mean; cache hit rate > 80 %.
        """
        lo, hi = AVG_LATENCY_RANGE_S
        mean = self.total.mean if self.total else None
        cv = self.total.cv if self.total else None
        rate = self.cache_hit_rate
        return [
            TargetCheck(
                TARGET_AVG_LATENCY,
                f"<= {hi:.1f} s (quoted: {lo:.1f}–{hi:.1f} s)",
                mean,
                None if mean is None else mean <= hi,  # faster than the range is no fault
            ),
            TargetCheck(
                TARGET_SPIKES,
                f"none above {self.spike_threshold_s:g} s",
                float(self.spikes) if self.count else None,
                self.spikes == 0 if self.count else None,
            ),
            TargetCheck(
                TARGET_CONSISTENCY,
                f"std < {MAX_CV * 100:g} % of mean",
                cv,
                None if cv is None else cv < MAX_CV,
            ),
            TargetCheck(
                TARGET_CACHE,
                f"> {MIN_CACHE_HIT_RATE * 100:g} %",
                rate,
                None if rate is None else rate > MIN_CACHE_HIT_RATE,
            ),
        ]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready. Flat keys at least: count, errors, warmup_count, mean_s, median_s, p95_s,
        p99_s, min_s, max_s, std_s, std_over_mean, ttft_mean_s, ttft_median_s, ttft_p95_s,
        tokens_per_s_mean, spikes, spikes_3sigma, spike_threshold_s, cache_queries, cache_hits,
        cache_hit_rate, token_reuse_rate, stages ({name: {mean_s, median_s, p95_s, ...}}),
        targets ([{name, goal, value, ok}]). Missing values are None (JSON null), never NaN.
        """
        out: dict[str, Any] = {
            "count": self.count,
            "errors": self.errors,
            "warmup_count": self.warmup_count,
        }
        total = _stats_dict(self.total)
        del total["count"]
        out.update(total)
        ttft = _stats_dict(self.ttft)
        out.update({f"ttft_{k}": v for k, v in ttft.items()})
        speed = _stats_dict(self.tokens_per_s, unit="")
        out.update({f"tokens_per_s_{k}": speed[k] for k in ("count", "mean", "median", "min")})
        out.update(
            spikes=self.spikes,
            spikes_3sigma=self.spikes_3sigma,
            spike_threshold_s=_num(self.spike_threshold_s),
            cache_queries=self.cache_queries,
            cache_hits=self.cache_hits,
            cache_hit_rate=_num(self.cache_hit_rate),
            token_reuse_rate=_num(self.token_reuse_rate),
            stages={name: _stats_dict(s) for name, s in self.stages.items()},
            targets=[
                {"name": t.name, "goal": t.goal, "value": _num(t.value), "ok": t.ok}
                for t in self.targets()
            ],
        )
        return out

    def format_table(self) -> str:
        """Readable fixed-width text table (monospace) with a row per series (total, ttft,
        tokens/s, each stage) and columns n, mean, median, p95, p99, min, max, std, std/mean;
        then spikes, cache hit rate, token reuse, errors; then each target with PASS / FAIL /
        n/a. Times in ms or s with sensible precision. No colours.
        """
        series: list[tuple[str, Stats | None, Callable[[float], str]]] = [
            ("total", self.total, _fmt_time),
            ("ttft", self.ttft, _fmt_time),
            ("tokens/s", self.tokens_per_s, _fmt_rate),
        ]
        series += [(f"stage {name}", s, _fmt_time) for name, s in self.stages.items()]
        name_w = max(12, *(len(name) for name, _, _ in series))
        cols = ("n", "mean", "median", "p95", "p99", "min", "max", "std", "std/mean")
        widths = (6, 10, 10, 10, 10, 10, 10, 10, 9)

        def row(name: str, cells: Sequence[str]) -> str:
            parts = [name.ljust(name_w), *(c.rjust(w) for c, w in zip(cells, widths, strict=True))]
            return " ".join(parts).rstrip()

        lines = [row("series", cols), "-" * (name_w + sum(widths) + len(widths))]
        for name, s, fmt in series:
            if s is None:
                lines.append(row(name, ["0"] + ["-"] * (len(cols) - 1)))
                continue
            values = (s.mean, s.median, s.p95, s.p99, s.min, s.max, s.std)
            lines.append(row(name, [str(s.count), *map(fmt, values), _fmt_pct(s.cv)]))

        reuse = _fmt_pct(self.token_reuse_rate)
        lines += [
            "",
            f"spikes > {self.spike_threshold_s:g} s: {self.spikes}"
            f"   (> mean + 3 std: {self.spikes_3sigma})",
            f"cache hit rate: {_fmt_pct(self.cache_hit_rate)}"
            f" ({self.cache_hits}/{self.cache_queries})   token reuse: {reuse}",
            f"errors: {self.errors}   warm-up: {self.warmup_count}   steady-state: {self.count}",
            "",
            "targets:",
        ]
        checks = self.targets()
        goal_w = max(len(t.goal) for t in checks)
        tname_w = max(len(t.name) for t in checks)
        for t in checks:
            verdict = "n/a" if t.ok is None else "PASS" if t.ok else "FAIL"
            lines.append(
                f"  {verdict:<4}  {t.name:<{tname_w}}  {t.goal:<{goal_w}}  {_fmt_target(t)}"
            )
        return "\n".join(lines)


def _fmt_target(t: TargetCheck) -> str:
    if t.value is None:
        return "n/a"
    if t.name == TARGET_AVG_LATENCY:
        return _fmt_time(t.value)
    if t.name == TARGET_SPIKES:
        return f"{t.value:.0f}"
    return _fmt_pct(t.value)


class LatencyTracker:
    """Thread-safe collector. Bounded memory for months of uptime: keeps the most recent
    `max_records` records (deque) for the statistics, plus lifetime counters (requests,
    errors, cache queries/hits) that are never trimmed.
    """

    def __init__(self, spike_threshold_s: float = 5.0, max_records: int = 10_000) -> None:
        if not (math.isfinite(spike_threshold_s) and spike_threshold_s > 0):
            raise ValueError(f"spike_threshold_s must be > 0, got {spike_threshold_s!r}")
        if max_records < 1:
            raise ValueError(f"max_records must be >= 1, got {max_records!r}")
        self.spike_threshold_s = spike_threshold_s
        self.max_records = max_records
        self._lock = threading.Lock()
        self._records: deque[RequestRecord] = deque(maxlen=max_records)
        self._lifetime = self._zero_counters()

    @staticmethod
    def _zero_counters() -> dict[str, int]:
        return {"requests": 0, "errors": 0, "cache_queries": 0, "cache_hits": 0}

    def record(self, rec: RequestRecord) -> None:
        """Add a finished request. ValueError (naming the field) on negative or
        non-finite durations, negative token counts, or cached > prompt tokens."""
        _validate(rec)
        with self._lock:
            self._records.append(rec)
            life = self._lifetime
            life["requests"] += 1
            life["errors"] += rec.error is not None
            if rec.cache_hit is not None:
                life["cache_queries"] += 1
                life["cache_hits"] += rec.cache_hit

    def records(self) -> list[RequestRecord]:
        """Copy of the kept records, oldest first."""
        with self._lock:
            return list(self._records)

    def summary(self) -> LatencySummary:
        """Statistics over the kept records (computed outside the lock)."""
        return LatencySummary.from_records(self.records(), self.spike_threshold_s)

    def reset(self) -> None:
        """Drop all records and zero the lifetime counters."""
        with self._lock:
            self._records.clear()
            self._lifetime = self._zero_counters()

    @property
    def lifetime(self) -> dict[str, int]:
        """Counters since start or the last reset: requests, errors, cache_queries, cache_hits."""
        with self._lock:
            return dict(self._lifetime)
