"""The clairvoyant ceiling: replay/oracle.py's dynamic programme, as an agent (replay only).

The oracle knows the trace's future acceptance runs, so it must be told the episode:

* in the loops of :mod:`agents.training` (and anywhere after ``env.reset()``), call
  ``agent.begin_episode(env, info)``: it takes the current trace and cost model from the
  replay env's ``TraceBackend`` (``env.unwrapped.backend.trace`` / ``.cost_model``);
* or call ``agent.reset(trace=..., cost_model=...)`` yourself (``cost_model`` defaults to the
  one given at construction).

act() then reads the position from the observation (``position`` x the trace's
max_new_tokens, exact for any realistic length in float32) and returns the DP's optimal gamma
for a step starting there (``OracleResult.best_gamma``), so it stays optimal from wherever it
is, even after steps taken by another policy. Using it without a trace raises RuntimeError.
DP results are cached by content: the trace's id, length, budget, mode and acceptance runs, and
the cost model's times (not by ``id()``: ids are reused after garbage collection, and a cost
model can be changed in place).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from speckv_env.core import DEFAULT_GAMMAS, OBS_INDEX, CostModel

from .base import Agent, register

I_POSITION = OBS_INDEX["position"]


def _trace_key(trace: Any) -> tuple:
    """What the DP reads from a trace (its result depends on nothing else)."""
    return (trace.trace_id, int(trace.max_new_tokens), bool(trace.sampling), trace.L.tobytes())


def _cost_key(cm: CostModel) -> tuple:
    """What the DP reads from a cost model."""
    return (float(cm.t_draft), tuple(float(v) for v in cm.t_verify), float(cm.t_target), float(cm.t_overhead))


@register
class OracleAgent(Agent):
    kind = "oracle"

    def __init__(self, cost_model: CostModel | dict | None = None, gammas: Sequence[int] = DEFAULT_GAMMAS) -> None:
        super().__init__(gammas)
        if isinstance(cost_model, dict):
            cost_model = CostModel.from_dict(cost_model)
        self.cost_model = cost_model
        self.trace: Any = None
        self.result: Any = None
        self._best: list[int] = []
        self._scale = 1
        self._cache: dict[tuple[tuple, tuple], Any] = {}
        self._index = {g: i for i, g in enumerate(self.gammas)}

    def reset(self, trace: Any = None, cost_model: CostModel | None = None) -> None:
        """New episode: ``trace`` (a replay.trace.Trace) is required before act()."""
        if trace is None:
            self.trace, self.result, self._best = None, None, []
            return
        from replay.oracle import oracle

        cm = cost_model or self.cost_model
        if cm is None:
            raise ValueError(
                "OracleAgent.reset(trace=...) needs a cost model: pass cost_model= here or at construction"
            )
        key = (_trace_key(trace), _cost_key(cm))
        res = self._cache.get(key)
        if res is None:
            res = oracle(trace, cm, self.gammas)
            if len(self._cache) > 4096:
                self._cache.clear()
            self._cache[key] = res
        self.trace, self.result = trace, res
        self._best = [self._index[int(g)] for g in res.best_gamma]
        self._scale = int(trace.max_new_tokens)

    def begin_episode(self, env: Any, info: dict[str, Any]) -> None:
        backend = getattr(getattr(env, "unwrapped", env), "backend", None)
        trace = getattr(backend, "trace", None)
        if trace is None:
            raise RuntimeError(
                "OracleAgent works on replayed traces only: the env's backend has no .trace "
                "(use gym.make('SpecKVReplay-v0', traces=...))"
            )
        self.reset(trace=trace, cost_model=getattr(backend, "cost_model", None))

    def act(self, obs: np.ndarray) -> int:
        if not self._best:
            raise RuntimeError(
                "OracleAgent has no trace for this episode: call agent.begin_episode(env, info) "
                "after env.reset(), or agent.reset(trace=..., cost_model=...)"
            )
        t = int(float(obs[I_POSITION]) * self._scale + 0.5)
        return self._best[min(t, len(self._best) - 1)]

    def get_config(self) -> dict[str, Any]:
        return {
            "cost_model": self.cost_model.to_dict() if self.cost_model is not None else None,
            "gammas": list(self.gammas),
        }
