"""The oracle's dynamic programme equals brute-force enumeration on small traces."""

from __future__ import annotations

import numpy as np
import pytest

from replay.env import SpecKVReplayEnv
from replay.oracle import fixed_gamma_time, oracle, oracle_dataset
from replay.trace import synthetic_dataset, synthetic_trace
from speckv_env.core import CostModel


def _brute(tr, cm, gammas) -> float:
    n = tr.n

    def best(t: int) -> float:
        if t >= n:
            return 0.0
        out = np.inf
        for g in gammas:
            ge = min(g, tr.max_new_tokens - 1 - t)
            k = min(int(tr.L[t]), ge)
            out = min(out, cm.step_time(ge, k, tr.sampling) + best(t + k + 1))
        return out

    return best(0)


@pytest.mark.parametrize("seed", range(12))
def test_dp_equals_brute_force(seed: int) -> None:
    rng = np.random.default_rng(seed)
    mode = "sample" if seed % 2 else "greedy"
    tr = synthetic_trace(
        int(rng.integers(1, 10)), gamma_max=4, p_accept=float(rng.uniform(0.3, 0.95)), seed=seed, mode=mode
    )
    cm = CostModel(
        t_draft=float(rng.uniform(0.01, 0.5)),
        t_verify=[1.0 + float(rng.uniform(0, 0.3)) * g for g in range(5)],
        t_target=1.0,
        t_overhead=0.05,
    )
    gammas = (0, 1, 2, 3, 4) if seed % 3 else (0, 2, 3)
    res = oracle(tr, cm, gammas)
    assert res.total_time == pytest.approx(_brute(tr, cm, gammas), rel=1e-12)
    # the path replayed in the environment has exactly that modelled time and emits N tokens
    env = SpecKVReplayEnv(traces=[tr], cost_model=cm, gammas=gammas)
    env.reset(seed=0)
    total, done = 0.0, False
    for g in res.gammas:
        assert not done
        _, _, te, trc, info = env.step(gammas.index(int(g)))
        total += info["modelled_time"]
        done = te or trc
    assert done and total == pytest.approx(res.total_time, rel=1e-12)
    assert res.tokens == tr.n and res.positions[0] == 0


def test_oracle_beats_every_fixed_gamma() -> None:
    cm = CostModel.unit()
    for tr in synthetic_dataset(6, n_range=(80, 200)):
        res = oracle(tr, cm)
        for g in range(9):
            assert res.total_time <= fixed_gamma_time(tr, cm, g) + 1e-9
        assert res.best_gamma.shape == (tr.n,) and res.best_gamma[0] == res.gammas[0]


def test_oracle_dataset_and_errors() -> None:
    ds = synthetic_dataset(4)
    res, tps = oracle_dataset(ds, CostModel.unit())
    assert len(res) == 4 and tps == pytest.approx(sum(r.tokens for r in res) / sum(r.total_time for r in res))
    with pytest.raises(ValueError, match="gamma_max"):
        oracle(ds[0], CostModel.unit(), gammas=(0, 12))


def test_oracle_agent_cache_is_keyed_by_content_not_object_id() -> None:
    from agents.oracle import OracleAgent

    tr = synthetic_trace(120, seed=4)
    cheap = CostModel.unit(draft_ratio=0.01, verify_slope=0.0)
    dear = CostModel.unit(draft_ratio=2.0, verify_slope=0.5)
    want_cheap, want_dear = oracle(tr, cheap).best_gamma.tolist(), oracle(tr, dear).best_gamma.tolist()
    assert want_cheap != want_dear
    agent = OracleAgent(cost_model=cheap)
    agent.reset(trace=tr)
    assert agent.result.best_gamma.tolist() == want_cheap
    # the same object (same id()) now describes another machine: the cache must not answer
    cheap.t_draft, cheap.t_verify = dear.t_draft, list(dear.t_verify)
    agent.reset(trace=tr)
    assert agent.result.best_gamma.tolist() == want_dear
    # another trace object reusing the id and trace_id of a dropped one, with other content
    other = synthetic_trace(120, seed=5, trace_id=tr.trace_id)
    agent.reset(trace=other, cost_model=dear)
    assert agent.result.best_gamma.tolist() == oracle(other, dear).best_gamma.tolist()
