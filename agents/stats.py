"""Bootstrap statistics for policy comparisons (numpy only; no scipy).

The unit of resampling is the *episode* (one prompt's trace): throughput over a set of
episodes is a ratio of sums, tokens / modelled seconds, so a resample draws n episodes with
replacement and recomputes the ratio. Every resample is represented by a row of counts
(how often each episode was drawn), ``W`` of shape (B, n); a statistic over all resamples is
then one matrix product ``W @ x``. Sharing one ``W`` between policies evaluated on the same
episodes gives *paired* resamples (the same prompts in every resample), which is what the
paired tests need.

* :func:`resample_weights`  the (B, n) count matrix (B >= 1000 recommended).
* :func:`ratio_ci`          sum(num) / sum(den) with a percentile interval.
* :func:`mean_ci`           mean(x) with a percentile interval.
* :func:`paired_ratio_test` difference of two ratios on the same episodes: point, interval,
  and a two-sided bootstrap p-value.
* :func:`bootstrap_ci`      one-call convenience over a 1-d sample.

p-values. For the paired difference d (a minus b) with bootstrap replicates d*_1..d*_B,
p = min(1, 2 (1 + min(#{d* <= 0}, #{d* >= 0})) / (B + 1)): the two-sided percentile-bootstrap
p-value (the smallest two-sided level whose percentile interval touches zero), with the
usual +1 correction so that it is never exactly zero (its floor is 2 / (B + 1)). Identical
policies give d* = 0 in every resample and p = 1.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def resample_weights(n: int, n_boot: int = 2000, seed: int | np.random.Generator = 0) -> np.ndarray:
    """Counts matrix (n_boot, n): row b says how often each of the n episodes is in resample b."""
    if n < 1:
        raise ValueError("bootstrap needs at least one episode")
    if n_boot < 1:
        raise ValueError("n_boot must be >= 1")
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    idx = rng.integers(0, n, size=(n_boot, n))
    flat = (idx + (np.arange(n_boot, dtype=np.int64) * n)[:, None]).ravel()
    return np.bincount(flat, minlength=n_boot * n).reshape(n_boot, n).astype(np.float64)


def _interval(reps: np.ndarray, level: float) -> tuple[float, float]:
    a = (1.0 - level) / 2.0
    lo, hi = np.quantile(reps, [a, 1.0 - a])
    return float(lo), float(hi)


def ratio_ci(num: np.ndarray, den: np.ndarray, W: np.ndarray, level: float = 0.95) -> dict[str, float]:
    """sum(num) / sum(den) and its percentile bootstrap interval under resamples ``W``."""
    num = np.asarray(num, dtype=np.float64)
    den = np.asarray(den, dtype=np.float64)
    point = float(num.sum() / den.sum()) if den.sum() != 0 else float("nan")
    with np.errstate(divide="ignore", invalid="ignore"):
        reps = (W @ num) / (W @ den)
    reps = reps[np.isfinite(reps)]
    lo, hi = _interval(reps, level) if reps.size else (float("nan"), float("nan"))
    return {"value": point, "lo": lo, "hi": hi}


def mean_ci(x: np.ndarray, W: np.ndarray, level: float = 0.95) -> dict[str, float]:
    """mean(x) and its percentile bootstrap interval under resamples ``W``."""
    x = np.asarray(x, dtype=np.float64)
    reps = (W @ x) / W.sum(axis=1)
    lo, hi = _interval(reps, level)
    return {"value": float(x.mean()), "lo": lo, "hi": hi}


def p_value(reps: np.ndarray) -> float:
    """Two-sided percentile-bootstrap p-value of H0: the statistic is 0 (see module docs)."""
    reps = np.asarray(reps, dtype=np.float64)
    reps = reps[np.isfinite(reps)]
    b = reps.size
    if b == 0:
        return float("nan")
    m = min(int((reps <= 0).sum()), int((reps >= 0).sum()))
    return float(min(1.0, 2.0 * (1 + m) / (b + 1)))


def paired_ratio_test(
    num_a: np.ndarray, den_a: np.ndarray, num_b: np.ndarray, den_b: np.ndarray, W: np.ndarray, level: float = 0.95
) -> dict[str, float]:
    """Paired bootstrap of ratio(a) - ratio(b) on the same episodes (same rows of ``W``).

    Returns ``diff`` (point), ``lo``/``hi`` (percentile interval), ``p`` (two-sided), and
    ``rel`` = diff / ratio(b)."""
    num_a, den_a, num_b, den_b = (np.asarray(v, dtype=np.float64) for v in (num_a, den_a, num_b, den_b))
    ra = num_a.sum() / den_a.sum()
    rb = num_b.sum() / den_b.sum()
    with np.errstate(divide="ignore", invalid="ignore"):
        reps = (W @ num_a) / (W @ den_a) - (W @ num_b) / (W @ den_b)
    lo, hi = _interval(reps[np.isfinite(reps)], level)
    return {"diff": float(ra - rb), "lo": lo, "hi": hi, "p": p_value(reps), "rel": float((ra - rb) / rb)}


def bootstrap_ci(x: Any, n_boot: int = 2000, seed: int = 0, level: float = 0.95) -> dict[str, float]:
    """Mean of a 1-d sample with a percentile bootstrap interval (one call)."""
    x = np.asarray(x, dtype=np.float64).reshape(-1)
    return mean_ci(x, resample_weights(x.size, n_boot, seed), level)
