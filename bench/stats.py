"""Latency statistics from raw timings, and the interleaved order in which models are measured."""

import math
from typing import List, Sequence, Tuple

from ..bundle.rows import Latency


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Linearly interpolated percentile of an ascending list (numpy's default method)."""
    if not sorted_values:
        return float("nan")
    k = (len(sorted_values) - 1) * q / 100.0
    lo = math.floor(k)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (k - lo)


def timing(times_ms: Sequence[float], batch_size: int) -> Tuple[Latency, float]:
    """p50/p90/p99, mean, sample std, min, max of per-call latencies (ms), and throughput in images/s.

    Throughput is batch_size / mean latency: what one caller calling back to back sustains.
    """
    times = sorted(float(t) for t in times_ms)
    n = len(times)
    if n == 0:
        raise ValueError("no timings to summarize")
    mean = sum(times) / n
    std = math.sqrt(sum((t - mean) ** 2 for t in times) / (n - 1)) if n > 1 else 0.0
    latency = Latency(p50=percentile(times, 50), p90=percentile(times, 90), p99=percentile(times, 99), mean=mean,
                      std=std, min=times[0], max=times[-1], runs=n)
    return latency, batch_size * 1000.0 / mean


def summarize(times_ms: Sequence[float], batch_size: int) -> dict:
    """``timing`` as results.json's row writes it: ``{"latency_ms": {...}, "throughput_ips": ...}``."""
    latency, throughput = timing(times_ms, batch_size)
    return {"latency_ms": latency.to_json(), "throughput_ips": throughput}


def p50(times_ms: Sequence[float]) -> float:
    """The median of per-call latencies (ms)."""
    return percentile(sorted(float(t) for t in times_ms), 50)


def schedule(n_models: int, batch_sizes: Sequence[int], rounds: int) -> List[Tuple[int, int, int]]:
    """The order of timed visits: ``[(round, batch_size, model_index), ...]``.

    Every round visits every batch size, and within it every model in turn, so slow drift of the
    machine (other jobs, heat, frequency) lands on all models alike. The starting model rotates
    each round so no model always follows the same neighbour.
    """
    order = []
    for r in range(rounds):
        for b in batch_sizes:
            for k in range(n_models):
                order.append((r, b, (r + k) % n_models))
    return order


def split_runs(total: int, rounds: int) -> List[int]:
    """Timed runs per visit: ``total`` spread over ``rounds`` as evenly as possible (earlier rounds take the rest)."""
    base, extra = divmod(total, rounds)
    return [base + (1 if r < extra else 0) for r in range(rounds)]
