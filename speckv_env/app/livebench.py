"""Live environment overhead over the bare engine loop (same prompts, same gammas, same run)."""

from __future__ import annotations

import random
import time
from typing import Any

import gymnasium as gym


def bench_live_overhead(
    max_new_tokens: int = 48, prompts_per_task: int = 1, repeats: int = 3, pair=None
) -> dict[str, Any]:
    """Wall time of SpecKV-v0 episodes (through gym.make) vs the engine driven directly.

    Both run the same prompts with the same per-step gamma sequence; runs are interleaved and
    the minimum over ``repeats`` is kept, so background load affects both alike.
    """
    import speckv_env  # noqa: F401  (registration)
    from speckv_env.pair import load_pair

    from .bench_engine import bench_prompts, machine_info

    prompts = bench_prompts(prompts_per_task)
    pair = pair or load_pair(None, None, device="cpu")
    env = gym.make("SpecKV-v0", pair=pair, prompts=prompts, max_new_tokens=max_new_tokens)
    u: Any = env.unwrapped
    eng = u.engine
    gamma_seq = [random.Random(i).randint(0, 8) for i in range(4096)]
    encoded = [u.backend.prompt_ids(i) for i in range(len(prompts))]

    def bare(with_signals: bool = True) -> float:
        t0 = time.perf_counter()
        for ids in encoded:
            eng.start(ids, max_new_tokens, seed=0)
            i = 0
            while not eng.done:
                if with_signals:
                    eng.observe()  # the pre-choice draft signals a controller reads
                eng.step(gamma_seq[i])
                i += 1
        return time.perf_counter() - t0

    def through_env() -> float:
        t0 = time.perf_counter()
        for e in range(len(prompts)):
            env.reset(options={"episode": e, "episode_seed": 0})
            i, done = 0, False
            while not done:
                _, _, term, trunc, _ = env.step(u.gammas.index(gamma_seq[i]))
                done = term or trunc
                i += 1
        return time.perf_counter() - t0

    bare()  # warm-up
    b, v, n = [], [], []
    for _ in range(repeats):
        b.append(bare())
        v.append(through_env())
        n.append(bare(with_signals=False))
    return {
        "bare_engine_s": min(b),
        "env_s": min(v),
        "overhead_ratio": min(v) / min(b) - 1.0,
        "bare_engine_no_signals_s": min(n),
        "overhead_ratio_vs_no_signals": min(v) / min(n) - 1.0,
        "note": "bare = engine.observe() + engine.step(g) per step (the observation's draft signals included); "
        "no_signals = engine.step(g) only",
        "all_bare_s": b,
        "all_env_s": v,
        "all_bare_no_signals_s": n,
        "prompts": [p.id for p in prompts],
        "max_new_tokens": max_new_tokens,
        "machine": machine_info(),
    }
