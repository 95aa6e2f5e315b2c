"""The comparison's metrics: tokens/s with bootstrap intervals, regret against the oracle, gap
captured, paired tests against best-fixed(train), the primary contrast, Holm's adjustment of
the secondary ones, and the verdict sentence of a split.

Bootstrap unit: the prompt. Every resample draws prompts with replacement and keeps all the
episodes of a drawn prompt (its traces per compression and mode, each averaged over seeds)
together (:func:`agents.stats.cluster_weights`).

Primary contrast (declared before looking at test results): the learned controller with the
highest tokens/s on the *validation* prompts (:func:`select_on_validation`), against
best-fixed(train), on the held-out test prompts. Every other contrast against best-fixed(train)
is secondary; their p-values are Holm-adjusted per split and subset (``p_holm``)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from agents import stats

from .compare_data import BEST_FIXED, LEARNED, CompareConfig, _Data
from .results import EvalResult, align
from .token_compare import LEARNED_TOKEN

CANDIDATES: tuple[str, ...] = (*LEARNED, *LEARNED_TOKEN)
"""The learned controllers the primary contrast chooses among (both modes), in tie-break order."""


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
    m["gap_captured"] = _gap_captured_tps(N, T, T_oracle, T_fixed, W, level)
    m["gap_captured_time"] = _gap_captured(T, T_oracle, T_fixed, W, level)
    m["vs_best_fixed"] = stats.paired_ratio_test(N, T, N, T_fixed, W, level)
    m["episodes"] = int(N.size)
    m["tokens"] = float(N.sum())
    m["modelled_s"] = float(T.sum())
    if T_seeds is not None and T_seeds.shape[0] > 1:
        per_seed = N.sum() / T_seeds.sum(axis=1)
        m["seed_tokens_per_s"] = [float(x) for x in per_seed]
        m["seed_sd"] = float(np.std(per_seed, ddof=1))
    return m


def _gap_captured_tps(
    N: np.ndarray, T: np.ndarray, T_oracle: np.ndarray, T_fixed: np.ndarray, W: np.ndarray, level: float
) -> dict:
    """(tps - tps_bestfixed) / (tps_oracle - tps_bestfixed), tokens/s over the totals, with its
    bootstrap interval (the headline "gap captured")."""
    tps, tf, to = (N.sum() / x.sum() for x in (T, T_fixed, T_oracle))
    if not to - tf > 1e-12 * max(abs(tf), 1e-300):
        return {"value": math.nan, "lo": math.nan, "hi": math.nan}
    with np.errstate(divide="ignore", invalid="ignore"):
        n = W @ N
        rf = n / (W @ T_fixed)
        reps = (n / (W @ T) - rf) / (n / (W @ T_oracle) - rf)
    reps = reps[np.isfinite(reps)]
    lo, hi = np.quantile(reps, [(1 - level) / 2, (1 + level) / 2]) if reps.size else (math.nan, math.nan)
    return {"value": float((tps - tf) / (to - tf)), "lo": float(lo), "hi": float(hi)}


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
    prompts = data.prompt[idx]
    for sub, mask in subsets.items():
        W = stats.cluster_weights(prompts[mask], cfg.n_boot, rng)
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
            m["prompts"] = len(set(prompts[mask]))
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
    assert ref.tokens is not None, "step-log results carry emitted tokens"
    F_T, F_N, F_S = ref.time.mean(0), ref.tokens.mean(0), ref.steps.mean(0)
    out: dict[str, Any] = {n: {"subsets": {}} for n in pooled}
    prompts = np.array([f"{t}/{q}" for t, q in zip(meta["task"][idx], meta["prompt_id"][idx])])
    for sub, mask in subsets.items():
        W = stats.cluster_weights(prompts[mask], cfg.n_boot, rng)
        for name, r in pooled.items():
            r = align(r, idx) if not np.array_equal(r.idx, idx) else r
            assert r.tokens is not None and r.clipped is not None, "step-log results carry tokens and clipped steps"
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
                "prompts": len(set(prompts[mask])),
                "seeds": int(r.time.shape[0]),
            }
            m["gamma_hist"] = _gamma_hist(r, mask)
            if r.time.shape[0] > 1:
                per_seed = r.tokens[:, mask].sum(1) / r.time[:, mask].sum(1)
                m["seed_tokens_per_s"] = per_seed.tolist()
                m["seed_sd"] = float(np.std(per_seed, ddof=1))
            out[name]["subsets"][sub] = m
    return out


def holm_adjust(policies: Mapping[str, Any], primary: str | None = None) -> None:
    """Holm-adjust the contrasts against best-fixed(train) in place, one family per subset:
    every policy but the reference, the oracle (a ceiling, not a controller) and, in subset
    "all", the ``primary`` policy (its contrast is the declared primary one, not adjusted).
    Adds ``p_holm``, ``p_holm_bound`` (the adjusted value is an upper bound: it comes from a
    p-value at the resampling floor) and ``family`` (the family size) to ``vs_best_fixed``."""
    names = [p for p in policies if p not in (BEST_FIXED, "oracle")]
    subs = next(iter(policies.values()))["subsets"] if policies else {}
    for sub in subs:
        fam = [p for p in names if not (sub == "all" and p == primary)]
        tests = [policies[p]["subsets"][sub]["vs_best_fixed"] for p in fam]
        adj, bound = stats.holm([t["p"] for t in tests], [t.get("p_at_floor", False) for t in tests])
        for t, a, b in zip(tests, adj, bound):
            t["p_holm"], t["p_holm_bound"], t["family"] = float(a), bool(b), len(fam)
        if sub == "all" and primary is not None and primary in policies:
            policies[primary]["subsets"][sub]["vs_best_fixed"].update(
                {"p_holm": None, "p_holm_bound": False, "family": 0, "primary": True}
            )


def select_on_validation(val_policies: Mapping[str, Any]) -> str | None:
    """The learned controller with the highest tokens/s on the validation episodes (ties: the
    order of CANDIDATES). Looks at nothing but ``val_policies`` (validation metrics)."""
    learned = [p for p in CANDIDATES if p in val_policies]
    if not learned:
        return None
    return max(learned, key=lambda p: (val_policies[p]["subsets"]["all"]["tokens_per_s"]["value"], -learned.index(p)))


def primary_contrast(policies: Mapping[str, Any], selected: str | None, val_policies: Mapping[str, Any]) -> dict:
    """``splits.heldout.primary``: the controller chosen on validation against best-fixed(train)
    on the test prompts (``policies``: the test metrics of the split)."""
    if selected is None or selected not in policies:
        return {"policy": None, "baseline": BEST_FIXED, "selected_on": "validation", "why": "no learned controller"}
    m = policies[selected]["subsets"]["all"]
    t = m["vs_best_fixed"]
    return {
        "policy": selected,
        "baseline": BEST_FIXED,
        "rel": t["rel"],
        "lo": t["rel_lo"],
        "hi": t["rel_hi"],
        "p": t["p"],
        "p_at_floor": t["p_at_floor"],
        "p_text": t["p_text"],
        "n_boot": t["n_boot"],
        "selected_on": "validation",
        "diff": t["diff"],
        "diff_lo": t["lo"],
        "diff_hi": t["hi"],
        "tokens_per_s": m["tokens_per_s"]["value"],
        "baseline_tokens_per_s": policies[BEST_FIXED]["subsets"]["all"]["tokens_per_s"]["value"],
        "gap_captured": m.get("gap_captured"),
        "episodes": m["episodes"],
        "prompts": m.get("prompts"),
        "warning": _few_prompts(m.get("prompts")),
        "validation_tokens_per_s": {
            p: val_policies[p]["subsets"]["all"]["tokens_per_s"]["value"] for p in CANDIDATES if p in val_policies
        },
    }


def _few_prompts(n: int | None) -> str | None:
    """A caution when the test set has few prompts: a bootstrap over n clusters takes at most
    C(2n-1, n) distinct resamples, and no test over n prompts can be more certain than an exact
    sign test, whose smallest two-sided p-value is 2 / 2^n."""
    if n is None or n >= 20:
        return None
    return (
        f"only {n} test prompts: the bootstrap interval and p-value rest on {n} clusters and are not reliable; "
        f"an exact sign test over {n} prompts cannot give p below {2.0 / 2**n:.3g}"
    )


def verdict(policies: Mapping[str, Any], primary: Mapping[str, Any] | None, split: str = "heldout") -> dict[str, Any]:
    """The split's verdict on the controller chosen on validation (``primary["policy"]``): the
    primary contrast in the held-out split, a secondary (Holm-adjusted) one elsewhere."""
    sel = None if primary is None else primary.get("policy")
    if sel is None:
        why = "the held-out split did not run" if primary is None else primary.get("why", "no validation split")
        return {"sentence": f"No controller declared: {why}.", "best_learned": None, "outcome": "none"}
    if sel not in policies:
        why = f"{sel}, the controller chosen on the validation prompts, was not run on the {split} split"
        return {
            "sentence": f"No verdict: {why} (see bandit_splits/ppo_splits).",
            "best_learned": None,
            "outcome": "none",
        }
    t = policies[sel]["subsets"]["all"]["vs_best_fixed"]
    tp = policies[sel]["subsets"]["all"]["tokens_per_s"]["value"]
    bf = policies[BEST_FIXED]["subsets"]["all"]["tokens_per_s"]["value"]
    is_primary = bool(t.get("primary"))
    role = "primary contrast" if is_primary else "secondary contrast"
    p = t["p_text"] if is_primary else _holm_text(t)
    ci = f"95% CI of the relative difference [{100 * t['rel_lo']:+.2f}%, {100 * t['rel_hi']:+.2f}%]"
    who = f"The controller chosen on the validation prompts, {sel} ({tp:.4g} tokens/s),"
    diff = f"{t['diff']:+.4g} tokens/s ({100 * t['rel']:+.2f}%)"
    if t["lo"] > 0:
        outcome, what = "beats", "BEATS"
    elif t["hi"] < 0:
        outcome, what = "worse", "is SLOWER than"
    else:
        outcome, what = "inconclusive", "does NOT beat (the interval includes zero)"
    s = (
        f"{who} {what} the best fixed gamma chosen on training data ({bf:.4g} tokens/s): {diff}, {ci}, "
        f"{'p' if is_primary else 'Holm-adjusted p'} {p if p.startswith('<') or p.startswith('≤') else '= ' + p} "
        f"({role}; cluster bootstrap over prompts)."
    )
    return {"sentence": s, "best_learned": sel, "outcome": outcome, "role": role, **t}


def _holm_text(t: Mapping[str, Any]) -> str:
    ph = t.get("p_holm")
    if ph is None or not math.isfinite(ph):
        return "n/a"
    return f"≤ {ph:.3g}" if t.get("p_holm_bound") else f"{ph:.3g}"


def judge(splits_out: Mapping[str, Any]) -> str | None:
    """The primary contrast and the verdicts, in place: the learned controller is chosen on the
    held-out split's validation prompts (never on test results); in the held-out split its
    contrast against best-fixed(train) is the primary one (``splits.heldout.primary``), every
    other contrast of every split is secondary and Holm-adjusted. Returns the chosen controller."""
    h = splits_out.get("heldout", {})
    val = h.get("_val_metrics")
    selected = select_on_validation(val) if val else None
    primary = None
    if "policies" in h:
        holm_adjust(h["policies"], selected)
        why = "the held-out split has no validation prompts" if val is None else "no learned controller was run"
        primary = (
            primary_contrast(h["policies"], selected, val)
            if selected
            else {"policy": None, "baseline": BEST_FIXED, "selected_on": "validation", "why": why}
        )
        h["primary"] = primary
    for split, s in splits_out.items():
        if "policies" not in s:
            continue
        if split != "heldout":
            holm_adjust(s["policies"], None)
        s["verdict"] = verdict(s["policies"], primary, split)
    return selected
