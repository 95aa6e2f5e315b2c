"""A tiny in-memory backend with known acceptance, for the agent tests (no models, no traces).

Each drafted token from position t is accepted with probability p_t, independently (the
geometric-run model of Leviathan et al.), so the expected throughput of a fixed gamma is
exactly ``CostModel.expected_tokens_per_second(p, gamma)`` when p_t = p is constant. With
``regimes=(lo, hi)``, p_t follows a two-state Markov chain (stay probability ``stay``) and
the draft signal ``top1`` is a noisy copy of p_t, so a model can learn acceptance from it.
Runs are drawn from a generator keyed by (seed, episode), so every policy sees the same
future (as in full-information replay).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from speckv_env.base_env import SpecKVBaseEnv
from speckv_env.core import CostModel, DraftSignals, EpisodeInfo, StepOutcome, acceptance_events


class ToyBackend:
    def __init__(
        self,
        alpha: float = 0.7,
        regimes: Sequence[float] | None = None,
        stay: float = 0.97,
        n_episodes: int = 8,
        length: int = 256,
        gamma_max: int = 8,
        cost_model: CostModel | None = None,
        compression: str = "fp16",
        noise: float = 0.05,
        seed: int = 0,
    ) -> None:
        self.alpha = alpha
        self.regimes = tuple(regimes) if regimes is not None else None
        self.stay = stay
        self.n_eps = n_episodes
        self.length = length
        self.gamma_max = gamma_max
        self.max_new_tokens = length
        self.compression = compression
        self.sampling = False
        self.cost_model = cost_model or CostModel.unit(gamma_max)
        self.noise = noise
        self.seed = seed
        self.reset(0, None)

    def num_episodes(self) -> int:
        return self.n_eps

    def _episode(self, index: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        rng = np.random.default_rng((self.seed, index))
        n = self.length
        if self.regimes is None:
            p = np.full(n, self.alpha)
        else:
            state = np.empty(n, dtype=np.int64)
            state[0] = rng.integers(len(self.regimes))
            flips = rng.random(n) > self.stay
            for t in range(1, n):
                state[t] = rng.integers(len(self.regimes)) if flips[t] else state[t - 1]
            p = np.asarray(self.regimes)[state]
        u = rng.random((n, self.gamma_max))
        ok = u < p[:, None]
        L = np.where(ok.all(1), self.gamma_max, np.argmin(ok, axis=1))
        top1 = np.clip(p + rng.normal(0, self.noise, n), 0.0, 1.0)
        return p, L, top1

    def reset(self, index: int, seed: int | None) -> EpisodeInfo:
        self.index = index
        self.p, self.L, self.top1 = self._episode(index)
        self.pos = 0
        return EpisodeInfo(f"toy-{index}", "toy", self.compression, "greedy", self.length)

    def signals(self) -> DraftSignals:
        t = min(self.pos, self.length - 1)
        top1 = float(self.top1[t])
        return DraftSignals(top1, float((1 - top1) * 3.0), float(top1 * 0.8))

    def position(self) -> int:
        return self.pos

    def step(self, gamma: int) -> StepOutcome:
        t = self.pos
        g = min(int(gamma), self.length - 1 - t)
        k = min(int(self.L[t]), g)
        self.pos = t + k + 1
        done = self.pos >= self.length
        return StepOutcome(
            gamma=g,
            accepted=k,
            tokens=list(range(t, t + k + 1)),
            done=done,
            finish_reason="length" if done else None,
            events=acceptance_events(g, k, bool(self.L[t] >= 1) if g == 0 else None),
        )

    def close(self) -> None:
        pass


def toy_env(**kwargs) -> SpecKVBaseEnv:
    gammas = kwargs.pop("gammas", tuple(range(9)))
    reward = kwargs.pop("reward", "cost")
    return SpecKVBaseEnv(ToyBackend(**kwargs), gammas=gammas, reward=reward)
