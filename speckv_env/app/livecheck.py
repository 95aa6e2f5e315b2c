"""Live check: do the replay's predictions hold on the real models, on this host?

For each compression (fp32 and nf4 by default) the host's own cost model is used: calibrated
here first, or reused from the cache of this host and these kernels
(:func:`speckv_env.calibrate.cached_calibration`), never the cost model shipped beside the
traces (measured on another machine). Under it the best fixed gamma is chosen on the training
traces and the learned controllers are trained there; then on held-out test prompts every
policy runs live (``SpecKV-v0``) and in replay (its trace of the same prompt, modelled time
under the host's cost model).

Live runs are interleaved per prompt in ABBA order (the policies, then the same policies
reversed; the next prompt starts with the reversed order), so every policy runs twice per
prompt at balanced positions and drift of the machine does not masquerade as a policy effect.
Measured tokens/s = tokens / measured draft + verify seconds (prefill excluded, as in the cost
model).

The test is paired, per prompt: for each policy p and the baseline b (the best fixed gamma),
``d = measured tps(p) - measured tps(b)`` against ``e = predicted tps(p) - predicted tps(b)``.
We report the mean of d, of e and of d - e with t intervals over prompts; prediction and
measurement agree when the interval of mean(d - e) contains 0 or lies within a margin (5% of
the baseline's measured tokens/s). Beside it, each policy's measured / predicted ratio (the
issue's 15% criterion).

Tokens are compared between live and replay only when the trace says it was recorded with
row-invariant forwards (``meta["exact"]``) and the live pair is exact too; otherwise the same
prompt may decode differently at near-ties (other kernels), and only timings are compared.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

#: two-sided 95% t quantiles by degrees of freedom (larger df: the next smaller entry, conservative)
_T975 = {
    1: 12.706,
    2: 4.303,
    3: 3.182,
    4: 2.776,
    5: 2.571,
    6: 2.447,
    7: 2.365,
    8: 2.306,
    9: 2.262,
    10: 2.228,
    12: 2.179,
    15: 2.131,
    20: 2.086,
    25: 2.060,
    30: 2.042,
    40: 2.021,
    60: 2.000,
    120: 1.980,
}
#: prediction and measurement agree when mean(d - e) is within this share of the baseline's tps
MARGIN_REL = 0.05
#: a policy's measured tokens/s within this share of its prediction
RATIO_TOL = 0.15


def t975(df: int) -> float:
    if df < 1:
        return math.inf
    return _T975[max(k for k in _T975 if k <= df)]


def mean_ci(x: Sequence[float]) -> dict[str, float]:
    """Mean with a 95% t interval (infinite with one value)."""
    a = np.asarray(x, dtype=float)
    m = float(a.mean())
    if len(a) < 2:
        return {"mean": m, "lo": -math.inf, "hi": math.inf, "n": len(a)}
    h = t975(len(a) - 1) * float(a.std(ddof=1)) / math.sqrt(len(a))
    return {"mean": m, "lo": m - h, "hi": m + h, "n": len(a)}


def paired_differences(
    measured: dict[str, Any],
    predicted: dict[str, Any],
    baseline: str,
    margin_rel: float = MARGIN_REL,
) -> list[dict[str, Any]]:
    """Per policy other than ``baseline``: per-prompt measured and predicted differences to the
    baseline, their means with intervals, and the discrepancy test (see the module docstring)."""
    mb, pb = np.asarray(measured[baseline], float), np.asarray(predicted[baseline], float)
    margin = margin_rel * float(mb.mean())
    rows = []
    for name in measured:
        if name == baseline:
            continue
        d = np.asarray(measured[name], float) - mb
        e = np.asarray(predicted[name], float) - pb
        md, me, disc = mean_ci(d), mean_ci(e), mean_ci(d - e)
        consistent = disc["lo"] <= 0.0 <= disc["hi"]
        within = -margin <= disc["lo"] and disc["hi"] <= margin
        rows.append(
            {
                "policy": name,
                "baseline": baseline,
                "measured_diff": md,
                "predicted_diff": me,
                "discrepancy": disc,
                "margin": margin,
                "consistent": bool(consistent),
                "within_margin": bool(within),
                "agree": bool(consistent or within),
                # the measured sign is the predicted one, or the measurement cannot tell
                "sign_agrees": bool(md["lo"] <= 0.0 <= md["hi"] or np.sign(md["mean"]) == np.sign(me["mean"])),
                "per_prompt_measured": d.tolist(),
                "per_prompt_predicted": e.tolist(),
            }
        )
    return rows


def abba_order(policies: Sequence[str], prompt_index: int) -> list[str]:
    """ABBA: the policies then the same reversed (even prompts), the reverse first (odd prompts).
    Every policy runs twice per prompt, at positions that average to the same."""
    p = list(policies)
    first = p if prompt_index % 2 == 0 else p[::-1]
    return first + first[::-1]


# ---- running episodes ----------------------------------------------------------------------------


def run_episode(env, agent, episode: int) -> dict[str, Any]:
    """One episode of ``env`` (live or replay) with ``agent``: tokens, modelled seconds,
    measured seconds (live only; 0 in replay) and the emitted ids."""
    agent.bind(env)
    obs, info = env.reset(options={"episode": episode, "episode_seed": 0})
    agent.begin_episode(env, info) if hasattr(agent, "begin_episode") else agent.reset()
    done = False
    n, meas, model = 0, 0.0, 0.0
    ids: list[int] = []
    while not done:
        obs, _, te, tr, info = env.step(agent.act(obs))
        ids.extend(int(x) for x in info["tokens"])
        n += int(info["emitted"])
        meas += info["measured_time"] or 0.0
        model += info["modelled_time"]
        done = te or tr
    return {"tokens": n, "measured_s": meas, "modelled_s": model, "ids": ids}


@dataclass
class PolicyRuns:
    """Per prompt: the live runs (two, ABBA) and the replay run of one policy."""

    live: list[list[dict[str, Any]]] = field(default_factory=list)
    replay: list[dict[str, Any]] = field(default_factory=list)

    def measured_tps(self) -> np.ndarray:
        return np.array([sum(r["tokens"] for r in rs) / sum(r["measured_s"] for r in rs) for rs in self.live])

    def live_modelled_tps(self) -> np.ndarray:
        return np.array([sum(r["tokens"] for r in rs) / sum(r["modelled_s"] for r in rs) for rs in self.live])

    def replay_tps(self) -> np.ndarray:
        return np.array([r["tokens"] / r["modelled_s"] for r in self.replay])


def run_abba(
    live_env, replay_env, agents: dict[str, Any], n_prompts: int, progress: bool = False
) -> dict[str, PolicyRuns]:
    """Every policy on every prompt: live twice in ABBA order, replay once."""
    from tqdm import tqdm

    runs = {name: PolicyRuns() for name in agents}
    bar = tqdm(total=n_prompts * 2 * len(agents), desc="live check", unit="episode", disable=not progress)
    for j in range(n_prompts):
        got: dict[str, list[dict[str, Any]]] = {name: [] for name in agents}
        for name in abba_order(list(agents), j):
            got[name].append(run_episode(live_env, agents[name], j))
            bar.update(1)
        for name, agent in agents.items():
            runs[name].live.append(got[name])
            runs[name].replay.append(run_episode(replay_env, agent, j))
    bar.close()
    return runs


# ---- one compression -----------------------------------------------------------------------------


def _traces(traces_dir: str | Path, comp: str, pair) -> tuple[list, list]:
    """The ``comp`` greedy traces of the train and the test split, read by the replay
    environments' loader (the cost models it finds beside them are not used: the check prices
    episodes under the host's own model)."""
    from replay.env import load_traces

    trs, _ = load_traces(traces_dir, None, {"split": ["train", "test"], "compression": comp, "mode": "greedy"})
    train = [t for t in trs if t.split == "train"]
    test = [t for t in trs if t.split == "test"]
    if not train or not test:
        raise ValueError(
            f"{traces_dir}: needs {comp} greedy traces of both the train and the test split for the live check"
        )
    recorded = {str(t.meta["draft_fingerprint"]) for t in test if t.meta.get("draft_fingerprint")}
    if recorded and recorded != {pair.draft_fingerprint}:
        raise ValueError(
            f"{traces_dir}: the test traces were recorded with draft {sorted(recorded)}, but the loaded draft is "
            f"{pair.draft_fingerprint}; a trace replays exactly only for its own draft (re-record them with "
            "experiments/make_shipped_dataset.sh)"
        )
    return train, test


def _policies(train, cm, learned: Sequence[str], train_steps: int, progress: bool) -> tuple[dict[str, Any], int]:
    """The best fixed gamma on the training traces under ``cm`` (the baseline, first) and the
    other policies, learned ones trained on those traces under ``cm``."""
    import torch

    from agents import make_agent
    from agents.training import train_agent
    from replay.oracle import fixed_gamma_time

    gammas = tuple(range(9))
    best_g = min(gammas, key=lambda g: sum(fixed_gamma_time(t, cm, g) for t in train))
    agents: dict[str, Any] = {
        f"fixed-{best_g}": make_agent("fixed", g=best_g, gammas=gammas),
        "hf_heuristic": make_agent("hf_heuristic", gammas=gammas),
    }
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)  # small MLP fits are fastest single-threaded
        for name in learned:
            agents[name] = train_agent(
                name,
                traces=train,
                steps=train_steps,
                seed=0,
                progress=progress,
                env_kwargs={"cost_models": {cm.compression: cm}},
            )
    finally:
        torch.set_num_threads(threads)
    return agents, best_g


def _choose_prompts(test, prompts_per_task: int, max_new_tokens: int | None) -> tuple[list, int]:
    from speckv_env.prompts import load_prompts

    by_id = {t.prompt_id: t for t in test}
    budgets = {t.max_new_tokens for t in test}
    if max_new_tokens is None:
        max_new_tokens = max(budgets)
    elif budgets != {max_new_tokens}:
        raise ValueError(f"max_new_tokens={max_new_tokens} but the test traces were recorded with {sorted(budgets)}")
    chosen = []
    for task in ("chat", "code", "math", "summarization"):
        chosen += [p for p in load_prompts(task=task, split="test") if p.id in by_id][:prompts_per_task]
    return chosen, max_new_tokens


def check_compression(
    traces_dir: str | Path,
    pair,
    cm,
    learned: Sequence[str] = ("speckv_mlp", "cost_aware"),
    prompts_per_task: int = 4,
    max_new_tokens: int | None = None,
    train_steps: int = 20_000,
    progress: bool = False,
    margin_rel: float = MARGIN_REL,
) -> dict[str, Any]:
    """The live check of one loaded pair under its host cost model ``cm``."""
    import gymnasium as gym

    import speckv_env  # noqa: F401  (registration)
    from replay.env import SpecKVReplayEnv

    comp = pair.compression
    train, test = _traces(traces_dir, comp, pair)
    agents, best_g = _policies(train, cm, learned, train_steps, progress)
    chosen, max_new_tokens = _choose_prompts(test, prompts_per_task, max_new_tokens)
    by_id = {t.prompt_id: t for t in test}
    traces = [by_id[p.id] for p in chosen]
    gammas = tuple(range(9))
    live_env = gym.make(
        "SpecKV-v0", pair=pair, prompts=chosen, max_new_tokens=max_new_tokens, gammas=gammas, cost_model=cm
    )
    replay_env = SpecKVReplayEnv(traces=traces, cost_models={comp: cm}, gammas=gammas)
    t0 = time.time()
    runs = run_abba(live_env, replay_env, agents, len(chosen), progress)
    trace_exact = all(bool(t.meta.get("exact")) for t in traces)
    compare_tokens = trace_exact and bool(getattr(pair, "exact", False))
    rows = [_policy_row(name, pr, compare_tokens) for name, pr in runs.items()]
    baseline = next(iter(agents))
    paired = paired_differences(
        {n: pr.measured_tps() for n, pr in runs.items()},
        {n: pr.replay_tps() for n, pr in runs.items()},
        baseline,
        margin_rel,
    )
    return {
        "compression": comp,
        "prompts": [p.id for p in chosen],
        "max_new_tokens": max_new_tokens,
        "baseline": baseline,
        "best_fixed_gamma": best_g,
        "rows": rows,
        "paired": paired,
        "tokens_compared": compare_tokens,
        "trace_exact": trace_exact,
        "pair_exact": bool(getattr(pair, "exact", False)),
        "kernels": getattr(pair, "kernels", "stock"),
        "trace_kernels": sorted({str(t.meta.get("kernels", "unrecorded")) for t in traces}),
        "target_only_tps_model": 1.0 / cm.t_target,
        "cost_model": cm.to_dict(),
        "seconds": time.time() - t0,
    }


def _policy_row(name: str, pr: PolicyRuns, compare_tokens: bool) -> dict[str, Any]:
    tok = sum(r["tokens"] for rs in pr.live for r in rs)
    meas = sum(r["measured_s"] for rs in pr.live for r in rs)
    mod = sum(r["modelled_s"] for rs in pr.live for r in rs)
    rtok = sum(r["tokens"] for r in pr.replay)
    rmod = sum(r["modelled_s"] for r in pr.replay)
    measured, replay = tok / meas, rtok / rmod
    same = None
    if compare_tokens:
        same = all(r["ids"] == rep["ids"] for rs, rep in zip(pr.live, pr.replay, strict=True) for r in rs)
    return {
        "policy": name,
        "measured_tps": measured,
        "replay_tps": replay,
        "live_modelled_tps": tok / mod,
        "ratio": measured / replay,
        "within_tolerance": bool(abs(measured / replay - 1.0) <= RATIO_TOL),
        "per_prompt_measured_tps": pr.measured_tps().tolist(),
        "per_prompt_replay_tps": pr.replay_tps().tolist(),
        "same_tokens": same,
    }


# ---- the whole check -----------------------------------------------------------------------------


def live_check(
    traces_dir: str | Path,
    compressions: Sequence[str] = ("fp32", "nf4"),
    learned: Sequence[str] = ("speckv_mlp", "cost_aware"),
    prompts_per_task: int = 4,
    max_new_tokens: int | None = None,
    train_steps: int = 20_000,
    pairs: dict[str, Any] | None = None,
    cost_models: dict[str, Any] | None = None,
    progress: bool = True,
    margin_rel: float = MARGIN_REL,
) -> dict[str, Any]:
    """The live check for each compression (see the module docstring). ``pairs`` and
    ``cost_models`` (by compression) replace loading the default pair and calibrating it."""
    from speckv_env.calibrate import cached_calibration, cached_calibration_exists
    from speckv_env.models import ModelLoadError
    from speckv_env.pair import load_pair

    out: dict[str, Any] = {"compressions": {}, "skipped": {}, "prompts_per_task": prompts_per_task}
    for comp in compressions:
        try:
            pair = (pairs or {}).get(comp) or load_pair(None, None, compression=comp, device="cpu")
        except (ModelLoadError, ImportError, RuntimeError) as e:
            out["skipped"][comp] = f"the {comp} pair did not load here: {e}"
            continue
        cm = (cost_models or {}).get(comp)
        source = "given"
        if cm is None:
            source = "cached (this host, these kernels)" if cached_calibration_exists(pair) else "calibrated now"
            cm = cached_calibration(pair, progress=progress)
        r = check_compression(
            traces_dir, pair, cm, learned, prompts_per_task, max_new_tokens, train_steps, progress, margin_rel
        )
        r["cost_model_source"] = source
        out["compressions"][comp] = r
    n = [len(r["prompts"]) for r in out["compressions"].values()]
    out["held_out_prompts"] = min(n) if n else 0
    out["all_agree"] = all(p["agree"] for r in out["compressions"].values() for p in r["paired"])
    out["all_within_tolerance"] = all(
        row["within_tolerance"] for r in out["compressions"].values() for row in r["rows"]
    )
    return out


def disagreements(r: dict[str, Any]) -> list[str]:
    """``comp/policy`` for each paired difference that disagrees or policy off by more than 15%."""
    bad = []
    for comp, c in r["compressions"].items():
        bad += [f"{comp}/{p['policy']} (paired difference)" for p in c["paired"] if not p["agree"]]
        bad += [
            f"{comp}/{row['policy']} (ratio {row['ratio']:.2f})" for row in c["rows"] if not row["within_tolerance"]
        ]
    return bad


def _ci(d: dict[str, float]) -> str:
    return f"{d['mean']:+7.2f} [{d['lo']:+7.2f}, {d['hi']:+7.2f}]"


def format_live_check(r: dict[str, Any]) -> str:
    lines = []
    for comp, c in r["compressions"].items():
        lines.append(
            f"Live check: default pair, {comp} ({c['kernels']}), greedy, {len(c['prompts'])} held-out test prompts x "
            f"{c['max_new_tokens']} new tokens, ABBA-interleaved, host cost model ({c['cost_model_source']})"
        )
        if not c["tokens_compared"]:
            lines.append(
                f"  tokens not compared: the traces were recorded with kernels {', '.join(c['trace_kernels'])} "
                "(not row-invariant), so live and replayed episodes may decode differently; timings only"
            )
        lines.append(f"  {'policy':<18}{'measured tok/s':>15}{'predicted':>11}{'ratio':>8}  within 15%")
        for row in c["rows"]:
            lines.append(
                f"  {row['policy']:<18}{row['measured_tps']:>15.2f}{row['replay_tps']:>11.2f}{row['ratio']:>8.3f}  "
                f"{'yes' if row['within_tolerance'] else 'NO'}"
            )
        lines.append(f"  paired per prompt vs {c['baseline']} (tok/s; mean [95% t interval] over prompts):")
        lines.append(f"  {'policy':<18}{'measured diff':>28}{'predicted diff':>28}{'measured - predicted':>28}  agree")
        for p in c["paired"]:
            lines.append(
                f"  {p['policy']:<18}{_ci(p['measured_diff']):>28}{_ci(p['predicted_diff']):>28}"
                f"{_ci(p['discrepancy']):>28}  {'yes' if p['agree'] else 'NO'}"
            )
    for comp, why in r.get("skipped", {}).items():
        lines.append(f"Live check: {comp} skipped: {why}")
    return "\n".join(lines)
