"""Step-cost micro-benchmarks of the replay environments, against Gymnasium's CartPole-v1
measured in the same run (so the ratios hold on a loaded or slow machine).

    python -m speckv_env.app.bench_env --json bench.json --seconds 2

Measured: single-env steps/s of ``SpecKVReplay-v0`` through ``gym.make`` (with Gymnasium's
default wrappers) and of ``CartPole-v1`` through ``gym.make``; env-steps/s of the vectorised
replay (``gym.make_vec(..., vectorization_mode="vector_entry_point")``) and of CartPole's
vector form at 1, 16 and 256 envs. Each figure is the best of ``repeats`` interleaved rounds.
The replay runs over a SYNTHETIC data set (random traces; the step cost does not depend on
where the traces came from) with uniformly random actions.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np

import speckv_env  # noqa: F401  (registers SpecKVReplay-v0)
from replay.trace import synthetic_dataset
from speckv_env.core import DEFAULT_GAMMAS, CostModel


def _single_runner(env: gym.Env, n_actions: int, seed: int = 0) -> Callable[[float], float]:
    actions = np.random.default_rng(seed).integers(n_actions, size=65536).tolist()
    env.reset(seed=seed)

    def run(seconds: float) -> float:
        step, reset = env.step, env.reset
        n, i = 0, 0
        t0 = time.perf_counter()
        deadline = t0 + seconds
        while True:
            for _ in range(1000):
                _, _, te, tr, _ = step(actions[i])
                i = (i + 1) & 65535
                if te or tr:
                    reset()
            n += 1000
            now = time.perf_counter()
            if now >= deadline:
                return n / (now - t0)

    return run


def _vector_runner(env: gym.vector.VectorEnv, n_actions: int, num_envs: int, seed: int = 0) -> Callable[[float], float]:
    acts = np.random.default_rng(seed).integers(n_actions, size=(64, num_envs))
    env.reset(seed=seed)

    def run(seconds: float) -> float:
        step = env.step
        n = 0
        t0 = time.perf_counter()
        deadline = t0 + seconds
        while True:
            for j in range(64):
                step(acts[j])
            n += 64
            now = time.perf_counter()
            if now >= deadline:
                return n * num_envs / (now - t0)

    return run


def bench_env(
    json_path: str | os.PathLike | None = None,
    seconds: float = 2.0,
    num_envs: tuple[int, ...] = (1, 16, 256),
    repeats: int = 3,
) -> dict[str, Any]:
    """Measure replay step throughput against CartPole-v1 (single env and vector form).

    ``seconds`` is the time spent per measurement in total (split over ``repeats`` rounds).
    Returns (and writes to ``json_path`` if given) a dict with steps/s and ratios.
    """
    traces = synthetic_dataset(64, n_range=(100, 300), seed=0)
    cm = CostModel.unit()
    runners: dict[str, Callable[[float], float]] = {
        "replay_single": _single_runner(gym.make("SpecKVReplay-v0", traces=traces, cost_model=cm), len(DEFAULT_GAMMAS)),
        "cartpole_single": _single_runner(gym.make("CartPole-v1"), 2),
    }
    for e in num_envs:
        runners[f"replay_vector_{e}"] = _vector_runner(
            gym.make_vec(
                "SpecKVReplay-v0", num_envs=e, vectorization_mode="vector_entry_point", traces=traces, cost_model=cm
            ),
            9,
            e,
        )
        runners[f"cartpole_vector_{e}"] = _vector_runner(
            gym.make_vec("CartPole-v1", num_envs=e, vectorization_mode="vector_entry_point"), 2, e
        )
    for r in runners.values():  # warm up
        r(0.05)
    best = dict.fromkeys(runners, 0.0)
    for _ in range(repeats):
        for k, r in runners.items():
            best[k] = max(best[k], r(seconds / repeats))
    out: dict[str, Any] = {
        "what": "env steps per second (best of interleaved rounds); vector figures count env-steps",
        "seconds_per_measurement": seconds,
        "repeats": repeats,
        "data": "synthetic: 64 traces of 100-300 tokens, uniformly random actions over gammas 0..8",
        "machine": {
            "python": platform.python_version(),
            "numpy": np.__version__,
            "gymnasium": gym.__version__,
            "cpus": os.cpu_count(),
            "loadavg_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        },
        "single": {
            "replay_steps_per_s": best["replay_single"],
            "cartpole_steps_per_s": best["cartpole_single"],
            "ratio_replay_over_cartpole": best["replay_single"] / best["cartpole_single"],
            "replay_us_per_step": 1e6 / best["replay_single"],
        },
        "vector": {},
    }
    for e in num_envs:
        rv, cv = best[f"replay_vector_{e}"], best[f"cartpole_vector_{e}"]
        out["vector"][str(e)] = {
            "replay_env_steps_per_s": rv,
            "cartpole_env_steps_per_s": cv,
            "ratio_replay_over_cartpole": rv / cv,
            "replay_us_per_batched_step": 1e6 * e / rv,
        }
    if json_path is not None:
        Path(json_path).write_text(json.dumps(out, indent=2))
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", default=None, help="write the results to this JSON file")
    ap.add_argument("--seconds", type=float, default=2.0, help="time per measurement")
    ap.add_argument("--repeats", type=int, default=3, help="interleaved rounds per measurement")
    args = ap.parse_args(argv)
    res = bench_env(args.json, seconds=args.seconds, repeats=args.repeats)
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
