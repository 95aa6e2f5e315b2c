"""Bootstrap statistics for policy comparisons (numpy only; no scipy).

Throughput over a set of episodes is a ratio of sums, tokens / modelled seconds, so a
resample draws units with replacement and recomputes the ratio. Every resample is represented
by a row of counts (how often each episode was drawn), ``W`` of shape (B, n); a statistic over
all resamples is then one matrix product ``W @ x``. Sharing one ``W`` between policies
evaluated on the same episodes gives *paired* resamples (the same prompts in every resample),
which is what the paired tests need.

The unit of resampling should be the unit that was sampled: the *prompt*. One prompt gives
several episodes (a trace per compression and decoding mode, and seeds), and those are
correlated; resampling episodes as if independent understates the spread.
:func:`cluster_weights` resamples clusters (prompts) and gives every episode of a drawn prompt
the prompt's count, so all its traces stay together; :func:`resample_weights` is the special
case of one episode per cluster.

* :func:`cluster_weights`   the (B, n) count matrix of a cluster (prompt) bootstrap.
* :func:`resample_weights`  the (B, n) count matrix of an episode bootstrap (B >= 1000 recommended).
* :func:`ratio_ci`          sum(num) / sum(den) with a percentile interval.
* :func:`mean_ci`           mean(x) with a percentile interval.
* :func:`paired_ratio_test` difference of two ratios on the same episodes: point, interval,
  and a two-sided bootstrap p-value.
* :func:`bootstrap_ci`      one-call convenience over a 1-d sample.
* :func:`holm`              Holm's step-down adjustment of a family of p-values.
* :func:`format_p`          a p-value as text, "< 2/(B+1)" at the resampling floor.

p-values. For the paired difference d (a minus b) with bootstrap replicates d*_1..d*_B,
p = min(1, 2 (1 + min(#{d* <= 0}, #{d* >= 0})) / (B + 1)): the two-sided percentile-bootstrap
p-value (the smallest two-sided level whose percentile interval touches zero), with the
usual +1 correction so that it is never exactly zero. Its floor is 2 / (B + 1), reached when
no resample crosses zero: the p-value is then below what B resamples can resolve, so it is
reported as a bound ("p < 2/(B+1)", flag ``p_at_floor``), never as a measured value. (A
one-sided tail at the floor is < 1/(B+1); the two-sided test doubles it.) Identical policies
give d* = 0 in every resample and p = 1.
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


def cluster_weights(
    clusters: np.ndarray | list[Any], n_boot: int = 2000, seed: int | np.random.Generator = 0
) -> np.ndarray:
    """Counts matrix (n_boot, n) of a cluster bootstrap: each resample draws as many clusters as
    there are, with replacement, and every episode gets its cluster's count (episodes of one
    cluster, e.g. the traces of one prompt, always move together). ``clusters``: a label per
    episode (any hashable values)."""
    labels = np.asarray(clusters)
    if labels.size < 1:
        raise ValueError("bootstrap needs at least one episode")
    _, inverse = np.unique(labels, return_inverse=True)
    counts = resample_weights(int(inverse.max()) + 1, n_boot, seed)  # (B, n_clusters)
    return counts[:, inverse.reshape(-1)]


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
    return p_test(reps)["p"]


def p_test(reps: np.ndarray) -> dict[str, Any]:
    """The two-sided p-value with its resolution: ``p``, ``p_at_floor`` (no resample crossed
    zero: the true p-value is below ``p_floor`` = 2/(B+1)), ``n_boot`` (B, finite resamples)
    and ``p_text`` (:func:`format_p`)."""
    reps = np.asarray(reps, dtype=np.float64)
    reps = reps[np.isfinite(reps)]
    b = reps.size
    if b == 0:
        return {"p": float("nan"), "p_at_floor": False, "p_floor": float("nan"), "n_boot": 0, "p_text": "n/a"}
    m = min(int((reps <= 0).sum()), int((reps >= 0).sum()))
    p = float(min(1.0, 2.0 * (1 + m) / (b + 1)))
    return {"p": p, "p_at_floor": m == 0, "p_floor": 2.0 / (b + 1), "n_boot": b, "p_text": format_p(p, b, m == 0)}


def format_p(p: float, n_boot: int, at_floor: bool) -> str:
    """``p`` as text: at the floor a bound, ``"< 2/(B+1) = 0.0009995 (B = 2000)"``; else 3 digits."""
    if p is None or not np.isfinite(p):
        return "n/a"
    if at_floor:
        return f"< 2/(B+1) = {2.0 / (n_boot + 1):.2g} (B = {n_boot})"
    return f"{p:.3f}" if p >= 0.001 else f"{p:.1e}"


def holm(p: Any, at_floor: Any = None) -> tuple[np.ndarray, np.ndarray]:
    """Holm's step-down adjustment of a family of m p-values: with p sorted ascending,
    adj_(i) = max_{j <= i} min(1, (m - j + 1) p_(j)). Returns (adjusted p-values in the input
    order, whether each adjusted value is a bound: the p-value it comes from was at the
    resampling floor). NaN p-values are left out of the family and stay NaN."""
    pv = np.asarray(p, dtype=np.float64).reshape(-1)
    floor = np.zeros(pv.size, dtype=bool) if at_floor is None else np.asarray(at_floor, dtype=bool).reshape(-1)
    adj = np.full(pv.size, np.nan)
    bound = np.zeros(pv.size, dtype=bool)
    ok = np.flatnonzero(np.isfinite(pv))
    order = ok[np.argsort(pv[ok], kind="stable")]
    m = order.size
    run, run_bound = 0.0, False
    for j, i in enumerate(order):
        v = min(1.0, (m - j) * pv[i])
        if v > run:
            run, run_bound = v, bool(floor[i])
        adj[i], bound[i] = run, run_bound and run < 1.0
    return adj, bound


def paired_ratio_test(
    num_a: np.ndarray, den_a: np.ndarray, num_b: np.ndarray, den_b: np.ndarray, W: np.ndarray, level: float = 0.95
) -> dict[str, float]:
    """Paired bootstrap of ratio(a) - ratio(b) on the same episodes (same rows of ``W``).

    Returns ``diff`` (point), ``lo``/``hi`` (percentile interval), ``rel`` = diff / ratio(b)
    with its interval ``rel_lo``/``rel_hi``, and the two-sided p-value (:func:`p_test`: ``p``,
    ``p_at_floor``, ``p_floor``, ``n_boot``, ``p_text``)."""
    num_a, den_a, num_b, den_b = (np.asarray(v, dtype=np.float64) for v in (num_a, den_a, num_b, den_b))
    ra = num_a.sum() / den_a.sum()
    rb = num_b.sum() / den_b.sum()
    with np.errstate(divide="ignore", invalid="ignore"):
        reps = (W @ num_a) / (W @ den_a) - (W @ num_b) / (W @ den_b)
    lo, hi = _interval(reps[np.isfinite(reps)], level)
    with np.errstate(divide="ignore", invalid="ignore"):
        rel = reps / ((W @ num_b) / (W @ den_b))
    rlo, rhi = _interval(rel[np.isfinite(rel)], level)
    return {
        "diff": float(ra - rb),
        "lo": lo,
        "hi": hi,
        "rel": float((ra - rb) / rb),
        "rel_lo": rlo,
        "rel_hi": rhi,
        **p_test(reps),
    }


def bootstrap_ci(x: Any, n_boot: int = 2000, seed: int = 0, level: float = 0.95) -> dict[str, float]:
    """Mean of a 1-d sample with a percentile bootstrap interval (one call)."""
    x = np.asarray(x, dtype=np.float64).reshape(-1)
    return mean_ci(x, resample_weights(x.size, n_boot, seed), level)
