"""Bandits over gammas: epsilon-greedy, UCB1, Thompson sampling, EXP3, LinUCB (contextual).

What reward makes a per-step bandit maximise throughput?
Throughput is a ratio, tokens / time, and arms (gammas) differ in step length, so the mean
per-step reward of the env's ``"cost"`` reward, ``emitted - time / t_target``, is *not* maximised
by the fastest arm in general: it values a step at the target-only rate 1 / t_target, which is
below the achievable rate, and so it overrates long (large-gamma) steps. Renewal-reward theory
gives the right per-step objective: arm a's long-run throughput is E[e_a] / E[t_a], and
``argmax_a E[e_a] / E[t_a] = argmax_a E[e_a] - lambda* E[t_a]`` when lambda* is the optimal
throughput (Dinkelbach). We use ``reward_mode="throughput"`` (default):

    r = emitted - lambda * modelled_time,   lambda = running throughput estimate
                                                   = sum(emitted) / sum(modelled_time) so far

and keep per-arm sufficient statistics (sums of e, t, e^2, t^2, e*t) instead of sums of r, so
every arm's mean and variance of r are recomputed exactly at the current lambda (no stale
rewards). ``reward_mode="env"`` uses the reward the env passes to learn() (e.g. the default
``"cost"`` reward, i.e. lambda fixed at 1 / t_target), the simple option. Rewards are divided
by ``max(gammas) + 1`` (the most tokens one step can emit) so exploration constants are
comparable across gamma sets.

All randomness comes from the agent's own ``numpy.random.default_rng(seed)``; its state is
saved, so a reloaded bandit makes the same draws.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from speckv_env.core import DEFAULT_GAMMAS, obs_bounds

from .base import Agent, register

REWARD_MODES = ("throughput", "env")


class BanditAgent(Agent):
    """Shared statistics and reward handling of the bandits (not registered)."""

    learns = True

    def __init__(
        self, reward_mode: str = "throughput", seed: int | None = 0, gammas: Sequence[int] = DEFAULT_GAMMAS
    ) -> None:
        super().__init__(gammas)
        if reward_mode not in REWARD_MODES:
            raise ValueError(f"unknown reward_mode {reward_mode!r}: choose one of {REWARD_MODES}")
        self.reward_mode = reward_mode
        self.seed = seed
        self.rng = np.random.default_rng(seed)
        self.K = len(self.gammas)
        self.scale = float(max(self.gammas) + 1)
        # per arm: n, sum e, sum t, sum e^2, sum t^2, sum e*t, sum r, sum r^2
        self.stats = np.zeros((8, self.K), dtype=np.float64)
        self.total_e = 0.0
        self.total_t = 0.0
        self._mv_cache: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None

    # ---- reward bookkeeping -------------------------------------------------------------
    @property
    def lam(self) -> float:
        """Running throughput estimate (tokens per modelled second)."""
        return self.total_e / self.total_t if self.total_t > 0 else 0.0

    def _record(self, a: int, reward: float, info: dict[str, Any]) -> float:
        """Update statistics; return the normalised reward of this step at the current lambda."""
        e = float(info.get("emitted", 0.0))
        t = float(info.get("modelled_time", 0.0))
        s = self.stats
        s[:, a] += (1.0, e, t, e * e, t * t, e * t, reward, reward * reward)
        self._mv_cache = None
        self.total_e += e
        self.total_t += t
        if self.reward_mode == "throughput":
            return (e - self.lam * t) / self.scale
        return reward / self.scale

    def means_vars(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(n, mean, variance) of each arm's normalised reward at the current lambda.

        Cached between learn() calls (statistics and lambda change only there), so a decision
        costs only the arm-selection arithmetic."""
        c = self._mv_cache
        if c is None:
            c = self._mv_cache = self._means_vars()
        return c

    def _means_vars(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        s = self.stats
        n = s[0]
        m = np.maximum(n, 1.0)
        if self.reward_mode == "throughput":
            lam = self.lam
            me, mt = s[1] / m, s[2] / m
            ve = s[3] / m - me * me
            vt = s[4] / m - mt * mt
            cov = s[5] / m - me * mt
            mean = me - lam * mt
            var = ve + lam * lam * vt - 2 * lam * cov
        else:
            mean = s[6] / m
            var = s[7] / m - mean * mean
        return n, mean / self.scale, np.maximum(var, 0.0) / (self.scale * self.scale)

    def learn(self, obs, action, reward, next_obs, info) -> None:
        self._record(int(action), float(reward), info)

    def best_arm(self) -> int:
        """The arm with the highest estimated mean (untried arms last)."""
        n, mean, _ = self.means_vars()
        return int(np.argmax(np.where(n > 0, mean, -np.inf)))

    # ---- persistence ----------------------------------------------------------------------
    def get_config(self) -> dict[str, Any]:
        return {"reward_mode": self.reward_mode, "seed": self.seed, "gammas": list(self.gammas)}

    def get_state(self) -> dict[str, Any]:
        return {
            "stats": self.stats.tolist(),
            "total_e": self.total_e,
            "total_t": self.total_t,
            "rng": self.rng.bit_generator.state,
        }

    def set_state(self, state: dict[str, Any]) -> None:
        stats = np.asarray(state["stats"], dtype=np.float64)
        if stats.shape != self.stats.shape:
            raise ValueError(f"stats shape {stats.shape} != expected {self.stats.shape}")
        self.stats = stats
        self.total_e = float(state["total_e"])
        self.total_t = float(state["total_t"])
        self._mv_cache = None
        self.rng.bit_generator.state = state["rng"]


@register
class EpsilonGreedy(BanditAgent):
    """Each arm once, then with probability epsilon a uniform arm, else the best mean."""

    kind = "epsilon_greedy"

    def __init__(
        self,
        epsilon: float = 0.1,
        reward_mode: str = "throughput",
        seed: int | None = 0,
        gammas: Sequence[int] = DEFAULT_GAMMAS,
    ) -> None:
        super().__init__(reward_mode, seed, gammas)
        self.epsilon = float(epsilon)
        self._greedy_src: Any = None
        self._untried, self._greedy = 0, 0

    def act(self, obs: np.ndarray) -> int:
        n, mean, _ = self.means_vars()
        if self._greedy_src is not self._mv_cache:
            untried = np.flatnonzero(n == 0)
            self._untried = int(untried[0]) if len(untried) else -1
            self._greedy = int(np.argmax(np.where(n > 0, mean, -np.inf)))
            self._greedy_src = self._mv_cache
        if self._untried >= 0:
            return self._untried
        if self.rng.random() < self.epsilon:
            return int(self.rng.integers(self.K))
        return self._greedy

    def get_config(self) -> dict[str, Any]:
        return {"epsilon": self.epsilon, **super().get_config()}


@register
class UCB1(BanditAgent):
    """UCB1 (Auer et al. 2002): mean + c * sqrt(2 ln N / n_a), each arm once first.

    Rewards are normalised by max(gammas)+1; c (default 0.5) scales the bonus to that range.
    """

    kind = "ucb1"

    def __init__(
        self,
        c: float = 0.5,
        reward_mode: str = "throughput",
        seed: int | None = 0,
        gammas: Sequence[int] = DEFAULT_GAMMAS,
    ) -> None:
        super().__init__(reward_mode, seed, gammas)
        self.c = float(c)
        self._ucb_src: Any = None  # the (n, mean, var) the cached decision was computed from
        self._ucb_arm = 0

    def act(self, obs: np.ndarray) -> int:
        n, mean, _ = self.means_vars()
        if self._ucb_src is not self._mv_cache:
            untried = np.flatnonzero(n == 0)
            if len(untried):
                self._ucb_arm = int(untried[0])
            else:
                self._ucb_arm = int(np.argmax(mean + self.c * np.sqrt(2.0 * math.log(n.sum()) / n)))
            self._ucb_src = self._mv_cache
        return self._ucb_arm

    def get_config(self) -> dict[str, Any]:
        return {"c": self.c, **super().get_config()}


@register
class ThompsonSampling(BanditAgent):
    """Gaussian Thompson sampling with unknown mean and variance.

    Under the Jeffreys prior, the posterior of an arm's mean reward given n samples with mean m
    and variance s^2 is m + s / sqrt(n) * T(n - 1) (Student t). Each arm is played
    ``min_plays`` (>= 2) times first; ``var_floor`` keeps a zero-variance arm explorable.
    """

    kind = "thompson"

    def __init__(
        self,
        min_plays: int = 2,
        var_floor: float = 1e-4,
        reward_mode: str = "throughput",
        seed: int | None = 0,
        gammas: Sequence[int] = DEFAULT_GAMMAS,
    ) -> None:
        super().__init__(reward_mode, seed, gammas)
        self.min_plays = max(int(min_plays), 2)
        self.var_floor = float(var_floor)

    def act(self, obs: np.ndarray) -> int:
        n, mean, var = self.means_vars()
        few = np.flatnonzero(n < self.min_plays)
        if len(few):
            return int(few[0])
        var_unbiased = np.maximum(var * n / (n - 1), self.var_floor)
        sample = mean + np.sqrt(var_unbiased / n) * self.rng.standard_t(n - 1)
        return int(np.argmax(sample))

    def get_config(self) -> dict[str, Any]:
        return {"min_plays": self.min_plays, "var_floor": self.var_floor, **super().get_config()}


@register
class EXP3(BanditAgent):
    """EXP3 (Auer et al. 2002) for adversarial bandits.

    p = (1 - eta) w / sum(w) + eta / K; after playing a with reward x in [0, 1]:
    log w_a += eta * (x / p_a) / K. The normalised reward r (about [-1, 1]) is mapped to
    x = clip((r + 1) / 2, 0, 1). Under reward_mode "throughput", lambda moves as the policy
    improves, which EXP3 tolerates (rewards may be adversarial).
    """

    kind = "exp3"

    def __init__(
        self,
        eta: float = 0.1,
        reward_mode: str = "throughput",
        seed: int | None = 0,
        gammas: Sequence[int] = DEFAULT_GAMMAS,
    ) -> None:
        super().__init__(reward_mode, seed, gammas)
        self.eta = float(eta)
        self.log_w = np.zeros(self.K, dtype=np.float64)

    def probs(self) -> np.ndarray:
        w = np.exp(self.log_w - self.log_w.max())
        return (1.0 - self.eta) * w / w.sum() + self.eta / self.K

    def act(self, obs: np.ndarray) -> int:
        p = self.probs()
        return int(min(np.searchsorted(np.cumsum(p), self.rng.random() * p.sum(), side="right"), self.K - 1))

    def learn(self, obs, action, reward, next_obs, info) -> None:
        a = int(action)
        p = self.probs()[a]
        r = self._record(a, float(reward), info)
        x = min(max((r + 1.0) / 2.0, 0.0), 1.0)
        self.log_w[a] += self.eta * (x / p) / self.K

    def best_arm(self) -> int:
        return int(np.argmax(self.log_w))

    def get_config(self) -> dict[str, Any]:
        return {"eta": self.eta, **super().get_config()}

    def get_state(self) -> dict[str, Any]:
        return {**super().get_state(), "log_w": self.log_w.tolist()}

    def set_state(self, state: dict[str, Any]) -> None:
        super().set_state(state)
        lw = np.asarray(state["log_w"], dtype=np.float64)
        if lw.shape != (self.K,):
            raise ValueError(f"log_w shape {lw.shape} != ({self.K},)")
        self.log_w = lw


@register
class LinUCB(BanditAgent):
    """LinUCB with disjoint arms (Li et al. 2010) on the observation.

    Context x = [obs / OBS_HIGH, 1] (D + 1 features in [0, 1]). Per arm: A_a = ridge I + sum x x^T,
    and, for reward_mode "throughput", b^e_a = sum e x and b^t_a = sum t x, so that
    theta_a = A_a^-1 (b^e_a - lambda b^t_a) is exact at the current lambda. Score:
    x.theta_a / scale + alpha sqrt(x^T A_a^-1 x). A_a^-1 is kept by Sherman-Morrison updates.
    Deterministic (no randomness; ties go to the smaller index).
    """

    kind = "linucb"
    obs_state = True  # learned on one observation version

    def __init__(
        self,
        alpha: float = 0.5,
        ridge: float = 1.0,
        reward_mode: str = "throughput",
        seed: int | None = 0,
        gammas: Sequence[int] = DEFAULT_GAMMAS,
    ) -> None:
        super().__init__(reward_mode, seed, gammas)
        self.alpha = float(alpha)
        self.ridge = float(ridge)
        self._init_arms()

    def _init_arms(self) -> None:
        """Fresh per-arm statistics for the agent's observation size (D + 1 features)."""
        d = self.obs_dim + 1
        self.d = d
        self.A_inv = np.tile(np.eye(d) / self.ridge, (self.K, 1, 1))
        self.b = np.zeros((3, self.K, d))  # b_e, b_t, b_r
        self._inv_high = np.concatenate([1.0 / obs_bounds(self.obs_version)[1].astype(np.float64), [1.0]])

    def _on_obs_version(self) -> None:
        if self.d != self.obs_dim + 1:
            if np.any(self.b):
                raise ValueError(f"{self.name}: trained on another observation version: it cannot change version")
            self._init_arms()

    def _x(self, obs: np.ndarray) -> np.ndarray:
        x = np.ones(self.d)
        x[:-1] = obs
        return x * self._inv_high

    def scores(self, obs: np.ndarray) -> np.ndarray:
        x = self._x(obs)
        Ax = self.A_inv @ x  # (K, d)
        if self.reward_mode == "throughput":
            bb = self.b[0] - self.lam * self.b[1]
        else:
            bb = self.b[2]
        mean = np.einsum("kd,kd->k", bb, Ax) / self.scale
        width = np.sqrt(np.maximum(Ax @ x, 0.0))
        return mean + self.alpha * width

    def act(self, obs: np.ndarray) -> int:
        return int(np.argmax(self.scores(obs)))

    def act_batch(self, obs: np.ndarray) -> np.ndarray:
        obs = np.asarray(obs, dtype=np.float64)
        self._check_obs_batch(obs)
        X = np.concatenate([obs, np.ones((len(obs), 1))], axis=1) * self._inv_high  # (N, d)
        AX = np.einsum("kij,nj->nki", self.A_inv, X)  # (N, K, d)
        bb = self.b[0] - self.lam * self.b[1] if self.reward_mode == "throughput" else self.b[2]
        mean = np.einsum("kd,nkd->nk", bb, AX) / self.scale
        width = np.sqrt(np.maximum(np.einsum("nkd,nd->nk", AX, X), 0.0))
        return np.argmax(mean + self.alpha * width, axis=1).astype(np.int64)

    def learn(self, obs, action, reward, next_obs, info) -> None:
        a = int(action)
        self._record(a, float(reward), info)
        x = self._x(obs)
        Ai = self.A_inv[a]
        Ax = Ai @ x
        self.A_inv[a] = Ai - np.outer(Ax, Ax) / (1.0 + x @ Ax)
        self.b[0, a] += float(info.get("emitted", 0.0)) * x
        self.b[1, a] += float(info.get("modelled_time", 0.0)) * x
        self.b[2, a] += float(reward) * x

    def get_config(self) -> dict[str, Any]:
        return {"alpha": self.alpha, "ridge": self.ridge, **super().get_config()}

    def get_state(self) -> dict[str, Any]:
        return {**super().get_state(), "A_inv": self.A_inv.tolist(), "b": self.b.tolist()}

    def set_state(self, state: dict[str, Any]) -> None:
        super().set_state(state)
        A = np.asarray(state["A_inv"], dtype=np.float64)
        b = np.asarray(state["b"], dtype=np.float64)
        if A.shape != self.A_inv.shape or b.shape != self.b.shape:
            raise ValueError(
                f"LinUCB tables have shapes {A.shape}, {b.shape}; expected {self.A_inv.shape}, {self.b.shape}"
            )
        self.A_inv, self.b = A, b


@register
class PerContext(Agent):
    """A bandit kept per deployment context: one set of statistics per (compression, decoding
    mode), since the best gamma differs between an fp32 and an nf4 target and between greedy and
    sampled decoding. The context is taken from the episode (``begin_episode``: its info's
    ``compression`` and ``mode``) or from the env when bound (its backend's compression and
    sampling). A context seen for the first time starts from a fresh copy of the bandit."""

    kind = "per_context"
    learns = True

    def __init__(
        self,
        bandit: str = "ucb1",
        bandit_kwargs: dict[str, Any] | None = None,
        seed: int | None = 0,
        gammas: Sequence[int] = DEFAULT_GAMMAS,
    ) -> None:
        from .base import make_agent

        super().__init__(gammas)
        self.bandit = str(bandit)
        self.bandit_kwargs = dict(bandit_kwargs or {})
        self.seed = seed
        from .base import AGENTS, _ensure_registered

        _ensure_registered()
        if not issubclass(AGENTS.get(self.bandit, Agent), BanditAgent):
            raise ValueError(f"per_context keeps bandits per context; {self.bandit!r} is not a bandit")
        tpl = make_agent(self.bandit, seed=seed, gammas=self.gammas, **self.bandit_kwargs)
        if not isinstance(tpl, BanditAgent):
            raise ValueError(f"per_context keeps bandits per context; {self.bandit!r} is not a bandit")
        self.template: BanditAgent = tpl
        self.name = self.template.name
        self.contexts: dict[str, BanditAgent] = {}
        self.context = ""
        self.current: BanditAgent = self.template

    @property
    def obs_state(self) -> bool:  # type: ignore[override]  # as the bandits it keeps
        return self.template.obs_state

    def _on_obs_version(self) -> None:
        for b in (self.template, *self.contexts.values()):
            b.set_obs_version(self.obs_version)

    @staticmethod
    def context_of(compression: Any, sampling: Any) -> str:
        return f"{compression}/{'sample' if sampling in (True, 'sample') else 'greedy'}"

    def select(self, context: str) -> BanditAgent:
        """Switch to ``context``'s bandit (a fresh copy of the bandit for a new context)."""
        import copy

        if context not in self.contexts:
            self.contexts[context] = copy.deepcopy(self.template)
        self.context, self.current = context, self.contexts[context]
        return self.current

    @property
    def rng(self) -> np.random.Generator:
        return self.current.rng

    @rng.setter
    def rng(self, value: np.random.Generator) -> None:  # evaluation reseeds each episode's copy
        for b in (self.template, *self.contexts.values()):
            b.rng = value

    def bind(self, env: Any) -> Agent:
        super().bind(env)  # the gammas and the observation version, for every context's bandit
        u = getattr(env, "unwrapped", env)
        b = getattr(u, "backend", None)
        comp = getattr(b, "compression", None) or getattr(getattr(u, "cost_model", None), "compression", "?")
        self.select(self.context_of(comp, getattr(b, "sampling", False)))
        self.current.bind(env)
        return self

    def begin_episode(self, env: Any, info: dict[str, Any]) -> None:
        if "compression" in info:
            self.select(self.context_of(info["compression"], info.get("mode", "greedy")))
        self.current.begin_episode(env, info)

    def act(self, obs: np.ndarray) -> int:
        return self.current.act(obs)

    def act_batch(self, obs: np.ndarray) -> np.ndarray:
        return self.current.act_batch(obs)

    def learn(self, obs, action, reward, next_obs, info) -> None:
        self.current.learn(obs, action, reward, next_obs, info)

    def reset(self) -> None:
        self.current.reset()

    def best_arm(self) -> int:
        return self.current.best_arm()

    def get_config(self) -> dict[str, Any]:
        return {
            "bandit": self.bandit,
            "bandit_kwargs": self.bandit_kwargs,
            "seed": self.seed,
            "gammas": list(self.gammas),
        }

    def get_state(self) -> dict[str, Any]:
        return {"contexts": {c: b.get_state() for c, b in self.contexts.items()}, "context": self.context}

    def set_state(self, state: dict[str, Any]) -> None:
        self.contexts = {}
        for c, s in dict(state.get("contexts", {})).items():
            self.select(str(c)).set_state(s)
        if state.get("context") in self.contexts:
            self.select(str(state["context"]))
