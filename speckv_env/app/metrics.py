"""The comparison's metrics: tokens/s with bootstrap intervals, regret against the oracle, gap
captured, paired tests against best-fixed(train), and the verdict sentence of a split."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from agents import stats

from .compare_data import BEST_FIXED, LEARNED, CompareConfig, _Data
from .results import EvalResult, align


def policy_metrics(
    N: np.ndarray,
    T: np.ndarray,
    S: np.ndarray,
    Gs: np.ndarray,
    tt: np.ndarray,
    T_oracle: np.ndarray,
    T_fixed: np.ndarray,
    W: np.ndarray,
    level: float,
    T_seeds: np.ndarray | None = None,
) -> dict[str, Any]:
    """Metrics of one policy on one set of episodes (per-episode arrays: tokens N, modelled time
    T, steps S, gamma sums Gs, target-only token time tt, the oracle's and best-fixed(train)'s
    times; W: bootstrap resample weights)."""
    m: dict[str, Any] = {}
    m["tokens_per_s"] = stats.ratio_ci(N, T, W, level)
    m["tokens_per_s_episode_mean"] = stats.mean_ci(N / T, W, level)
    m["speedup"] = stats.ratio_ci(N * tt, T, W, level)
    m["tokens_per_step"] = float(N.sum() / S.sum())
    m["mean_gamma"] = float(Gs.sum() / S.sum())
    r = stats.ratio_ci(T, T_oracle, W, level)
    m["regret_time"] = {k: v - 1.0 for k, v in r.items()}
    m["regret_tokens_per_s"] = float(N.sum() / T_oracle.sum() - N.sum() / T.sum())
    m["gap_captured"] = _gap_captured(T, T_oracle, T_fixed, W, level)
    m["vs_best_fixed"] = stats.paired_ratio_test(N, T, N, T_fixed, W, level)
    m["episodes"] = int(N.size)
    m["tokens"] = float(N.sum())
    m["modelled_s"] = float(T.sum())
    if T_seeds is not None and T_seeds.shape[0] > 1:
        per_seed = N.sum() / T_seeds.sum(axis=1)
        m["seed_tokens_per_s"] = [float(x) for x in per_seed]
        m["seed_sd"] = float(np.std(per_seed, ddof=1))
    return m


def _gap_captured(T: np.ndarray, T_oracle: np.ndarray, T_fixed: np.ndarray, W: np.ndarray, level: float) -> dict:
    """(T_fixed - T) / (T_fixed - T_oracle) over the totals, with its bootstrap interval."""
    den = T_fixed.sum() - T_oracle.sum()
    if not den > 1e-12 * max(T_fixed.sum(), 1e-300):
        return {"value": math.nan, "lo": math.nan, "hi": math.nan}
    with np.errstate(divide="ignore", invalid="ignore"):
        reps = (W @ T_fixed - W @ T) / (W @ T_fixed - W @ T_oracle)
    reps = reps[np.isfinite(reps)]
    lo, hi = np.quantile(reps, [(1 - level) / 2, (1 + level) / 2]) if reps.size else (math.nan, math.nan)
    return {"value": float((T_fixed.sum() - T.sum()) / den), "lo": float(lo), "hi": float(hi)}


def _subsets(task: np.ndarray, compression: np.ndarray) -> dict[str, np.ndarray]:
    """Masks over the evaluated episodes: all, per task, per compression."""
    subsets: dict[str, np.ndarray] = {"all": np.ones(task.size, dtype=bool)}
    for t in sorted(set(task)):
        subsets[f"task={t}"] = task == t
    for c in sorted(set(compression)):
        subsets[f"compression={c}"] = compression == c
    return subsets


def _gamma_hist(r: EvalResult, mask: np.ndarray) -> list[float]:
    hh = r.hist[mask].sum(0)
    return (hh / max(hh.sum(), 1)).tolist()


def split_metrics(data: _Data, pooled: Mapping[str, EvalResult], cfg: CompareConfig) -> dict[str, Any]:
    """Metrics overall, per task and per compression, for every policy of a split."""
    ref = pooled[BEST_FIXED]
    idx = ref.idx
    subsets = _subsets(data.task[idx], data.compression[idx])
    out: dict[str, Any] = {name: {"subsets": {}} for name in pooled}
    rng = np.random.default_rng(cfg.boot_seed)
    N_all, tt_all = data.N[idx], data.t_target[idx]
    O_all = align(pooled["oracle"], idx).time.mean(0)
    F_all = ref.time.mean(0)
    for sub, mask in subsets.items():
        W = stats.resample_weights(int(mask.sum()), cfg.n_boot, rng)
        for name, r in pooled.items():
            r = align(r, idx)
            m = policy_metrics(
                N_all[mask],
                r.time.mean(0)[mask],
                r.steps.mean(0)[mask],
                r.gsum.mean(0)[mask],
                tt_all[mask],
                O_all[mask],
                F_all[mask],
                W,
                cfg.level,
                r.time[:, mask] if r.time.shape[0] > 1 else None,
            )
            m["gamma_hist"] = _gamma_hist(r, mask)
            m["seeds"] = int(r.time.shape[0])
            out[name]["subsets"][sub] = m
    return out


def paper_metrics(
    pooled: Mapping[str, EvalResult], meta: Mapping[str, np.ndarray], t_target: np.ndarray, cfg: CompareConfig
) -> dict[str, Any]:
    """Step logs: metrics overall, per task and per compression, for every policy of a split
    (tokens emitted depend on the policy there, and clipped steps are counted)."""
    ref = pooled[BEST_FIXED]
    idx = ref.idx
    subsets = _subsets(meta["task"][idx], meta["compression"][idx])
    rng = np.random.default_rng(cfg.boot_seed)
    tt = t_target[idx]
    F_T, F_N, F_S = ref.time.mean(0), ref.tokens.mean(0), ref.steps.mean(0)
    out: dict[str, Any] = {n: {"subsets": {}} for n in pooled}
    for sub, mask in subsets.items():
        W = stats.resample_weights(int(mask.sum()), cfg.n_boot, rng)
        for name, r in pooled.items():
            r = align(r, idx) if not np.array_equal(r.idx, idx) else r
            T, N, S = r.time.mean(0)[mask], r.tokens.mean(0)[mask], r.steps.mean(0)[mask]
            m: dict[str, Any] = {
                "tokens_per_s": stats.ratio_ci(N, T, W, cfg.level),
                "speedup": stats.ratio_ci(N * tt[mask], T, W, cfg.level),
                "tokens_per_step_ci": stats.ratio_ci(N, S, W, cfg.level),
                "tokens_per_step": float(N.sum() / S.sum()),
                "mean_gamma": float(r.gsum.mean(0)[mask].sum() / S.sum()),
                "clipped_fraction": float(r.clipped.mean(0)[mask].sum() / S.sum()),
                "vs_best_fixed": stats.paired_ratio_test(N, T, F_N[mask], F_T[mask], W, cfg.level),
                "tokens_per_step_vs_best_fixed": stats.paired_ratio_test(N, S, F_N[mask], F_S[mask], W, cfg.level),
                "episodes": int(mask.sum()),
                "seeds": int(r.time.shape[0]),
            }
            m["gamma_hist"] = _gamma_hist(r, mask)
            if r.time.shape[0] > 1:
                per_seed = r.tokens[:, mask].sum(1) / r.time[:, mask].sum(1)
                m["seed_tokens_per_s"] = per_seed.tolist()
                m["seed_sd"] = float(np.std(per_seed, ddof=1))
            out[name]["subsets"][sub] = m
    return out


def verdict(policies: Mapping[str, Any]) -> dict[str, Any]:
    """The split's verdict: does the best learned controller beat best-fixed(train)?"""
    learned = [p for p in LEARNED if p in policies]
    if not learned:
        return {"sentence": "No learned controller was run.", "best_learned": None}
    best = max(learned, key=lambda p: policies[p]["subsets"]["all"]["tokens_per_s"]["value"])
    t = policies[best]["subsets"]["all"]["vs_best_fixed"]
    tp = policies[best]["subsets"]["all"]["tokens_per_s"]["value"]
    bf = policies[BEST_FIXED]["subsets"]["all"]["tokens_per_s"]["value"]
    ci = f"95% CI [{t['lo']:+.4g}, {t['hi']:+.4g}]"
    who = f"The best learned controller, {best} ({tp:.4g} tokens/s),"
    if t["lo"] > 0:
        s = (
            f"{who} BEATS the best fixed gamma chosen on training data ({bf:.4g} tokens/s): "
            f"+{t['diff']:.4g} tokens/s ({100 * t['rel']:+.2f}%), {ci} excludes zero, "
            f"paired bootstrap p = {t['p']:.3g}."
        )
        outcome = "beats"
    elif t["hi"] < 0:
        s = (
            f"{who} is SLOWER than the best fixed gamma chosen on training data ({bf:.4g} tokens/s): "
            f"{t['diff']:+.4g} tokens/s ({100 * t['rel']:+.2f}%), {ci}, p = {t['p']:.3g}."
        )
        outcome = "worse"
    else:
        s = (
            f"{who} does NOT beat the best fixed gamma chosen on training data ({bf:.4g} tokens/s) with "
            f"confidence: difference {t['diff']:+.4g} tokens/s ({100 * t['rel']:+.2f}%), {ci} includes zero, "
            f"p = {t['p']:.3g}."
        )
        outcome = "inconclusive"
    return {"sentence": s, "best_learned": best, "outcome": outcome, **t}
