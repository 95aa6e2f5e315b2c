"""Per-decision latency of every agent: one observation in, one gamma index out, on CPU.

Each agent decides on a pool of real observations (a random-gamma rollout of
``SpecKVReplay-v0`` over a synthetic data set; token mode's stopping rules on a random
continue/stop rollout of its token mode, target 10 us a decision), after a warm-up; each call is timed alone with
``time.perf_counter_ns`` (timer overhead, ~0.1 us, included). Reported: median, p99, mean in
microseconds. Weights are untrained (random init): latency does not depend on their values.
``speckv_mlp[torch]`` times the same MLP through torch (the paper's 0.34 ms path) for
comparison. The lead wires this to ``speckv bench agents --json PATH``.
"""

from __future__ import annotations

import json
import platform
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from agents.base import Agent, make_agent
from speckv_env.core import DEFAULT_GAMMAS, OBS_INDEX

from .compare_data import POLICY_GROUPS

TOKEN_AGENTS: tuple[str, ...] = ("hf_confidence", "svip", "adaedl", "specdecpp", "survival_token")
"""Token mode's stopping rules (:mod:`agents.stopping`), timed on token-mode observations."""
# every policy the comparison knows (its "token" group is the stopping rules, timed one by one)
DEFAULT_AGENTS: tuple[str, ...] = (*(p for p in POLICY_GROUPS if p != "token"), *TOKEN_AGENTS)
TARGET_US = {"speckv_mlp": 20.0, **dict.fromkeys(TOKEN_AGENTS, 10.0)}
I_COST_RATIO = OBS_INDEX["cost_ratio"]


def _observation_pool(n: int = 512, seed: int = 0):
    import gymnasium as gym

    import speckv_env  # noqa: F401
    from replay.trace import synthetic_dataset
    from speckv_env.core import CostModel

    env = gym.make("SpecKVReplay-v0", traces=synthetic_dataset(8, seed=seed), cost_model=CostModel.unit())
    rng = np.random.default_rng(seed)
    obs, info = env.reset(seed=seed)
    pool: list[np.ndarray] = []
    while len(pool) < n:
        pool.append(obs)
        obs, r, term, trunc, info = env.step(int(rng.integers(len(DEFAULT_GAMMAS))))
        if term or trunc:
            obs, info = env.reset()
    return env, pool


def _token_pool(n: int = 512, seed: int = 0, lookahead: bool = True):
    """Token-mode observations: random continue/stop decisions over synthetic /2 traces, in the
    variant ``lookahead`` selects (look-ahead, or draft-then-decide)."""
    import gymnasium as gym

    import speckv_env  # noqa: F401
    from replay.trace import synthetic_dataset
    from speckv_env.core import CostModel

    trs = synthetic_dataset(8, seed=seed, rollouts=True, modes=("greedy", "sample"))
    env = gym.make("SpecKVReplay-v0", traces=trs, cost_model=CostModel.unit(), control="token", lookahead=lookahead)
    rng = np.random.default_rng(seed)
    obs, info = env.reset(seed=seed)
    pool: list[np.ndarray] = []
    while len(pool) < n:
        pool.append(obs)
        obs, r, term, trunc, info = env.step(int(rng.random() < 0.7))
        if term or trunc:
            obs, info = env.reset()
    return env, pool


def bench_token_agents(n: int, warmup: int, seed: int = 0, names: Sequence[str] = TOKEN_AGENTS) -> dict[str, Any]:
    """Per-decision latency of token mode's stopping rules in both variants (keys ``name`` for
    look-ahead, ``name/dtd`` for draft-then-decide; SpecDec++ and survival-token fitted on the
    pool's traces in their variant, so the timed path is the trained one)."""
    out: dict[str, Any] = {}
    for lookahead, suffix in ((True, ""), (False, "/dtd")):
        env, pool = _token_pool(seed=seed, lookahead=lookahead)
        for name in names:
            agent: Any = make_agent(name, gammas=tuple(env.unwrapped.gammas), lookahead=lookahead)
            if name == "specdecpp":
                agent.fit(env.unwrapped.backend.traces)
            elif name == "survival_token":
                agent.fit(env.unwrapped.backend.traces, env.unwrapped.cost_model)
            agent.bind(env)
            r: dict[str, Any] = dict(time_decisions(agent.act, pool, n, warmup))
            target = TARGET_US[name]
            r.update(control="token", lookahead=lookahead, target_us=target, meets_target=r["median_us"] <= target)
            out[name + suffix] = r
    return out


def time_decisions(fn, pool: Sequence[np.ndarray], n: int, warmup: int) -> dict[str, float]:
    m = len(pool)
    for i in range(warmup):
        fn(pool[i % m])
    ns = np.empty(n, dtype=np.int64)
    clock = time.perf_counter_ns
    for i in range(n):
        o = pool[i % m]
        t0 = clock()
        fn(o)
        ns[i] = clock() - t0
    us = ns / 1000.0
    return {
        "median_us": float(np.median(us)),
        "p99_us": float(np.percentile(us, 99)),
        "mean_us": float(us.mean()),
        "n": int(n),
    }


def bench_agents(
    json_path: str | Path | None = None,
    n: int = 5000,
    warmup: int = 500,
    agents: Sequence[str] = DEFAULT_AGENTS,
    include_torch: bool = True,
    seed: int = 0,
) -> dict[str, Any]:
    """Median / p99 per-decision latency (us) of each agent on one observation; optional JSON."""
    env, pool = _observation_pool(seed=seed)
    results: dict[str, Any] = {}
    token = [a for a in agents if a in TOKEN_AGENTS]
    for name in (a for a in agents if a not in TOKEN_AGENTS):
        kw: dict[str, Any] = {"gammas": tuple(env.unwrapped.gammas)}
        agent: Agent = make_agent(name, **kw)
        agent.bind(env)
        if name == "oracle":
            _, info = env.reset(seed=seed)
            agent.begin_episode(env, info)
        elif name == "survival":  # fitted, so the timed path is the trained one
            agent.fit(env.unwrapped.backend.traces, env.unwrapped.cost_model)  # type: ignore[attr-defined]
        elif agent.learns:  # give learners some statistics so the timed path is the steady state
            obs, _ = env.reset(seed=seed)
            for _ in range(200):
                a = agent.act(obs)
                nobs, r, term, trunc, info = env.step(a)
                agent.learn(obs, a, r, nobs, info)
                obs = nobs if not (term or trunc) else env.reset()[0]
        results[name] = time_decisions(agent.act, pool, n, warmup)
        if name in TARGET_US:
            results[name]["target_us"] = TARGET_US[name]
            results[name]["meets_target"] = results[name]["median_us"] <= TARGET_US[name]
        if name == "speckv_mlp" and include_torch:
            import torch

            model = agent.torch_model().eval()  # type: ignore[attr-defined]

            def torch_decide(o: np.ndarray, model: Any = model, mlp: Any = agent) -> int:
                with torch.inference_mode():
                    z = float(model(torch.from_numpy(o).unsqueeze(0)))
                return mlp.table_for(float(o[I_COST_RATIO])).index_logit(z)

            results["speckv_mlp[torch]"] = time_decisions(torch_decide, pool, max(n // 10, 100), max(warmup // 10, 20))
    if token:
        results.update(bench_token_agents(n, warmup, seed, token))
    out = {
        "unit": "microseconds per single-observation decision",
        "agents": results,
        "python": platform.python_version(),
        "numpy": np.__version__,
        "machine": platform.machine(),
        "processor": platform.processor(),
    }
    if json_path is not None:
        p = Path(json_path)
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(json.dumps(out, indent=2))
    return out


def format_table(res: dict[str, Any]) -> str:
    lines = [f"{'agent':<20} {'median us':>10} {'p99 us':>10}"]
    for name, r in res["agents"].items():
        lines.append(f"{name:<20} {r['median_us']:>10.2f} {r['p99_us']:>10.2f}")
    return "\n".join(lines)


if __name__ == "__main__":
    import sys

    print(format_table(bench_agents(sys.argv[1] if len(sys.argv) > 1 else None)))
