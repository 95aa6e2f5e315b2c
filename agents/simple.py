"""Non-learning baselines: fixed gamma, the Hugging Face heuristic, the cost-aware analytic rule."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from speckv_env.core import DEFAULT_GAMMAS, OBS_INDEX, CostModel

from .base import DEFAULT_VERIFY_SLOPE, I_COST_RATIO, Agent, CostModelMixin, register

I_LAST_GAMMA = OBS_INDEX["last_gamma"]
I_LAST_FULL = OBS_INDEX["last_full_accept"]
I_EMA = OBS_INDEX["accept_ema"]
I_MEAN = OBS_INDEX["accept_mean"]

#: transformers' GenerationConfig default ``num_assistant_tokens`` (checked in the installed
#: transformers 5.24, generation/configuration_utils.py); early 4.x releases used 5 together
#: with the "heuristic" schedule as the default.
HF_NUM_ASSISTANT_TOKENS = 20


@register
class FixedGamma(Agent):
    """Always the same gamma (``g`` must be in ``gammas``)."""

    kind = "fixed"

    def __init__(self, g: int = 4, gammas: Sequence[int] = DEFAULT_GAMMAS) -> None:
        super().__init__(gammas)
        if int(g) not in self.gammas:
            raise ValueError(f"fixed gamma {g} is not in gammas {self.gammas}")
        self.g = int(g)
        self.index = self.gammas.index(self.g)
        self.name = f"fixed{self.g}"

    def act(self, obs: np.ndarray) -> int:
        return self.index

    def act_batch(self, obs: np.ndarray) -> np.ndarray:
        return np.full(len(obs), self.index, dtype=np.int64)

    def get_config(self) -> dict[str, Any]:
        return {"g": self.g, "gammas": list(self.gammas)}


@register
class HFHeuristic(Agent):
    """Hugging Face assisted generation's ``"heuristic"`` schedule.

    transformers (``AssistedCandidateGenerator.update_candidate_strategy``)::

        if num_matches == number of candidates:  num_assistant_tokens += 2
        else:                                    num_assistant_tokens = max(1, num_assistant_tokens - 1)

    starting from ``GenerationConfig.num_assistant_tokens`` (20 in the installed transformers).
    Here the counter is bounded to the gamma set: it lives in [smallest positive gamma, max gamma]
    (HF's counter is unbounded above), so the start value 20 becomes max gamma. A counter value
    missing from a sparse gamma set is snapped to the nearest gamma (ties: the smaller).

    State source: the observation, not learn(). Because the counter equals the gamma actually
    used, it is recovered from ``last_gamma`` (x max gamma) and ``last_full_accept``; a first
    step (``last_gamma == 0``) uses the initial value. So act() is a pure function of the
    observation (act_batch is vectorised) and each episode restarts from the initial value:
    HF's ``"heuristic_transient"`` behaviour (one generate() call = one episode). A step the
    backend clipped at the end of the output only affects the episode's last step.
    """

    kind = "hf_heuristic"

    def __init__(
        self,
        initial: int = HF_NUM_ASSISTANT_TOKENS,
        increase: int = 2,
        decrease: int = 1,
        gammas: Sequence[int] = DEFAULT_GAMMAS,
    ) -> None:
        super().__init__(gammas)
        self.initial, self.increase, self.decrease = int(initial), int(increase), int(decrease)
        self.gmax = max(self.gammas)
        pos = [g for g in self.gammas if g > 0]
        self.gmin = min(pos) if pos else 0
        # counter value n (0 .. gmax) -> action index (nearest gamma, ties to the smaller)
        order = sorted(range(len(self.gammas)), key=lambda i: self.gammas[i])
        self._index_of = [
            min(order, key=lambda i: (abs(self.gammas[i] - n), self.gammas[i])) for n in range(self.gmax + 1)
        ]
        self._next = self._transition_table()
        self._init_index = self._index_of[self.counter(self.initial)]

    def counter(self, n: int) -> int:
        return min(max(n, self.gmin), self.gmax)

    def next_counter(self, last_gamma: int, full: bool) -> int:
        if last_gamma <= 0:
            return self.counter(self.initial)
        n = last_gamma + self.increase if full else max(1, last_gamma - self.decrease)
        return self.counter(n)

    def _transition_table(self) -> np.ndarray:
        t = np.empty((self.gmax + 1, 2), dtype=np.int64)
        for g in range(self.gmax + 1):
            for f in (0, 1):
                t[g, f] = self._index_of[self.next_counter(g, bool(f))]
        return t

    def act(self, obs: np.ndarray) -> int:
        lg = int(obs[I_LAST_GAMMA] * self.gmax + 0.5)
        if lg <= 0:
            return self._init_index
        return int(self._next[lg, 1 if obs[I_LAST_FULL] > 0.5 else 0])

    def act_batch(self, obs: np.ndarray) -> np.ndarray:
        obs = np.asarray(obs)
        lg = np.clip((obs[:, I_LAST_GAMMA] * self.gmax + 0.5).astype(np.int64), 0, self.gmax)
        full = (obs[:, I_LAST_FULL] > 0.5).astype(np.int64)
        return self._next[lg, full]

    def get_config(self) -> dict[str, Any]:
        return {
            "initial": self.initial,
            "increase": self.increase,
            "decrease": self.decrease,
            "gammas": list(self.gammas),
        }


@register
class CostAwareAnalytic(CostModelMixin, Agent):
    """gamma = argmax_g E[tokens per second | alpha, g] (Leviathan et al.), alpha estimated online.

    ``estimate``:
      - ``"ema"`` (default): the observation's ``accept_ema`` (rate ``core.EMA_RATE``, from ``core.EMA_START``);
      - ``"mean"``: the observation's ``accept_mean`` (Laplace-smoothed episode mean);
      - ``"beta"``: the agent's own Beta(a, b) posterior over the acceptance events it sees
        through learn() (k ones, then a zero if the draft was rejected), kept across episodes
        with a forgetting factor ``decay`` per event (1.0 = never forget).
    The cost model comes from ``cost_model=``, ``bind(env)``, or the observation's cost_ratio
    with :data:`agents.base.DEFAULT_VERIFY_SLOPE` (see :class:`agents.base.CostModelMixin`).
    A decision is one lookup in a precomputed exact :class:`agents.base.GammaTable`.
    """

    kind = "cost_aware"

    def __init__(
        self,
        estimate: str = "ema",
        cost_model: CostModel | dict | None = None,
        sampling: bool = False,
        verify_slope: float = DEFAULT_VERIFY_SLOPE,
        prior: tuple[float, float] = (1.0, 1.0),
        decay: float = 0.995,
        gammas: Sequence[int] = DEFAULT_GAMMAS,
    ) -> None:
        super().__init__(gammas)
        if estimate not in ("ema", "mean", "beta"):
            raise ValueError(f"unknown estimate {estimate!r}: choose 'ema', 'mean' or 'beta'")
        self.estimate = estimate
        self.learns = estimate == "beta"
        self._init_cost(cost_model, sampling, verify_slope)
        self.prior = (float(prior[0]), float(prior[1]))
        self.decay = float(decay)
        self.hits = 0.0
        self.misses = 0.0

    def alpha(self, obs: np.ndarray) -> float:
        if self.estimate == "ema":
            return float(obs[I_EMA])
        if self.estimate == "mean":
            return float(obs[I_MEAN])
        a = self.prior[0] + self.hits
        return a / (a + self.prior[1] + self.misses)

    def act(self, obs: np.ndarray) -> int:
        return self.table_for(float(obs[I_COST_RATIO])).index(self.alpha(obs))

    def act_batch(self, obs: np.ndarray) -> np.ndarray:
        obs = np.asarray(obs)
        cr = obs[:, I_COST_RATIO]
        if self.cost_model is None and self._env is None and not np.all(cr == cr[0]):
            return super().act_batch(obs)
        t = self.table_for(float(cr[0]) if len(cr) else 0.0)
        if self.estimate == "beta":
            return np.full(len(obs), t.index(self.alpha(obs[0]) if len(obs) else 0.0), dtype=np.int64)
        col = I_EMA if self.estimate == "ema" else I_MEAN
        return t.index_batch(obs[:, col].astype(np.float64))

    def learn(self, obs, action, reward, next_obs, info) -> None:
        if self.estimate != "beta":
            return
        g, k = int(info["gamma"]), int(info["accepted"])
        if g <= 0:
            return
        n = k + (1 if k < g else 0)
        f = self.decay**n
        self.hits = self.hits * f + k
        self.misses = self.misses * f + (1 if k < g else 0)

    def get_config(self) -> dict[str, Any]:
        return {
            "estimate": self.estimate,
            **self._cost_config(),
            "prior": list(self.prior),
            "decay": self.decay,
            "gammas": list(self.gammas),
        }

    def get_state(self) -> dict[str, Any]:
        return {"hits": self.hits, "misses": self.misses}

    def set_state(self, state: dict[str, Any]) -> None:
        self.hits = float(state.get("hits", 0.0))
        self.misses = float(state.get("misses", 0.0))
