"""Live check: do the replay's predictions hold on the real models?

Controllers trained on the shipped traces' training split run live (``SpecKV-v0``, the
default pair, uncompressed, greedy) on held-out test prompts. For each policy we report the
measured tokens/s (tokens / measured draft + verify seconds, prefill excluded, as in the
cost model) beside the replay's prediction on the traces of the same prompts (modelled
tokens/s), both with 95% bootstrap intervals over prompts.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np


def _boot_ratio(num: np.ndarray, den: np.ndarray, n: int = 2000, seed: int = 0) -> tuple[float, float, float]:
    """sum(num)/sum(den) with a 95% bootstrap interval over items (prompts)."""
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(num), size=(n, len(num)))
    r = num[idx].sum(1) / den[idx].sum(1)
    return float(num.sum() / den.sum()), float(np.quantile(r, 0.025)), float(np.quantile(r, 0.975))


def _run_episodes(env, agent, n_episodes: int) -> dict[str, Any]:
    """Run episodes 0..n-1 of ``env`` (live or replay) with ``agent``: per-episode tokens,
    modelled seconds, measured seconds (live only; 0 in replay) and emitted ids."""
    toks, meas, model, ids = [], [], [], []
    for e in range(n_episodes):
        obs, info = env.reset(options={"episode": e, "episode_seed": 0})
        agent.begin_episode(env, info) if hasattr(agent, "begin_episode") else agent.reset()
        done = False
        n = m = t = 0.0
        seq: list[int] = []
        while not done:
            obs, r, te, tr, info = env.step(agent.act(obs))
            seq.extend(int(x) for x in info["tokens"])
            n += info["emitted"]
            m += info["measured_time"] or 0.0
            t += info["modelled_time"]
            done = te or tr
        toks.append(n)
        meas.append(m)
        model.append(t)
        ids.append(seq)
    return {"tokens": np.array(toks), "measured_s": np.array(meas), "modelled_s": np.array(model), "ids": ids}


def live_check(
    traces_dir: str | Path,
    learned: Sequence[str] = ("speckv_mlp", "cost_aware"),
    prompts_per_task: int = 2,
    max_new_tokens: int | None = None,
    train_steps: int = 20_000,
    pair=None,
    progress: bool = True,
) -> dict[str, Any]:
    """Train ``learned`` controllers on the training split, then run them live and in replay."""
    import gymnasium as gym
    from tqdm import tqdm

    import speckv_env  # noqa: F401
    from agents import make_agent
    from agents.training import train_agent
    from replay.oracle import fixed_gamma_time
    from replay.trace import load_cost_models, read_traces
    from speckv_env.pair import load_pair
    from speckv_env.prompts import load_prompts

    gammas = tuple(range(9))
    comp, mode = "fp32", "greedy"
    train = read_traces(traces_dir, split="train", compression=comp, mode=mode)
    test = read_traces(traces_dir, split="test", compression=comp, mode=mode)
    cms = load_cost_models(traces_dir)
    if not train or not test:
        raise ValueError(
            f"{traces_dir}: needs {comp} {mode} traces of both the train and the test split for the live check"
        )
    # best fixed gamma, chosen on the training split only
    best_g = min(gammas, key=lambda g: sum(fixed_gamma_time(t, cms[comp], g) for t in train))
    agents: dict[str, Any] = {
        f"fixed-{best_g} (best fixed on train)": make_agent("fixed", g=best_g, gammas=gammas),
        "hf_heuristic": make_agent("hf_heuristic", gammas=gammas),
    }
    import torch

    threads = torch.get_num_threads()
    for name in learned:
        torch.set_num_threads(1)  # small MLP fits are fastest single-threaded
        agents[name] = train_agent(
            name, traces=train, steps=train_steps, seed=0, progress=progress, env_kwargs={"cost_models": cms}
        )
    torch.set_num_threads(threads)
    # held-out prompts that have a test trace; live episodes use the traces' token budget so
    # that live and replayed episodes are the same episodes
    by_id = {t.prompt_id: t for t in test}
    budgets = {t.max_new_tokens for t in test}
    if max_new_tokens is None:
        max_new_tokens = max(budgets)
    elif budgets != {max_new_tokens}:
        raise ValueError(f"max_new_tokens={max_new_tokens} but the test traces were recorded with {sorted(budgets)}")
    chosen = []
    for task in ("chat", "code", "math", "summarization"):
        chosen += [p for p in load_prompts(task=task, split="test") if p.id in by_id][:prompts_per_task]
    if pair is None:
        pair = load_pair(None, None, compression=comp, device="cpu")
    recorded = {t.meta.get("draft_fingerprint") for t in test if t.meta.get("draft_fingerprint")}
    if recorded and recorded != {pair.draft_fingerprint}:
        raise ValueError(
            f"{traces_dir}: the test traces were recorded with draft {sorted(recorded)}, but the loaded draft is "
            f"{pair.draft_fingerprint}; a trace replays exactly only for its own draft (re-record them with "
            "experiments/make_shipped_dataset.sh)"
        )
    env = gym.make(
        "SpecKV-v0", pair=pair, prompts=chosen, max_new_tokens=max_new_tokens, gammas=gammas, cost_model=cms[comp]
    )
    from replay.env import SpecKVReplayEnv

    replay_env = SpecKVReplayEnv(traces=[by_id[p.id] for p in chosen], cost_models=cms, gammas=gammas)
    rows = []
    t0 = time.time()
    for name, agent in tqdm(agents.items(), desc="live check", unit="policy", disable=not progress):
        live = _run_episodes(env, agent, len(chosen))
        rep = _run_episodes(replay_env, agent, len(chosen))
        m, ml, mh = _boot_ratio(live["tokens"], live["measured_s"])
        lm, lml, lmh = _boot_ratio(live["tokens"], live["modelled_s"])
        r, rl, rh = _boot_ratio(rep["tokens"], rep["modelled_s"])
        rows.append(
            {
                "policy": name,
                "measured_tps": m,
                "measured_ci": [ml, mh],
                "replay_tps": r,
                "replay_ci": [rl, rh],
                "live_modelled_tps": lm,
                "live_modelled_ci": [lml, lmh],
                "same_tokens": live["ids"] == rep["ids"],
                "agree": bool(ml <= rh and rl <= mh),
            }
        )
    target_only = 1.0 / cms[comp].t_target
    return {
        "prompts": [p.id for p in chosen],
        "max_new_tokens": max_new_tokens,
        "rows": rows,
        "best_fixed_gamma": best_g,
        "target_only_tps_model": target_only,
        "seconds": time.time() - t0,
        "cost_model": cms[comp].to_dict(),
    }


def format_live_check(r: dict[str, Any]) -> str:
    lines = [
        f"Live check: default pair, fp32, greedy, {len(r['prompts'])} held-out test prompts x {r['max_new_tokens']} new tokens",
        f"{'policy':<34}{'measured tok/s [95% CI]':>28}{'replay tok/s [95% CI]':>28}  agree",
    ]
    for row in r["rows"]:
        mc, rc = row["measured_ci"], row["replay_ci"]
        lines.append(
            f"{row['policy']:<34}{row['measured_tps']:>9.2f} [{mc[0]:6.2f}, {mc[1]:6.2f}]   "
            f"{row['replay_tps']:>9.2f} [{rc[0]:6.2f}, {rc[1]:6.2f}]   {'yes' if row['agree'] else 'NO'}"
        )
    return "\n".join(lines)
