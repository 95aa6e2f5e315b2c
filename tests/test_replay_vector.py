"""The vectorised replay gives bit-identical per-env trajectories to the single env."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest

import speckv_env  # noqa: F401
from replay.env import SpecKVReplayEnv
from replay.trace import synthetic_dataset
from replay.vector import SpecKVReplayVectorEnv
from speckv_env.core import CostModel

CMS = {"fp16": CostModel.unit(), "nf4": CostModel.unit(draft_ratio=0.25, verify_slope=0.02)}


def _ds():
    ds = synthetic_dataset(9, n_range=(5, 60), compressions=("fp16", "nf4"), modes=("greedy", "sample"))
    # a trace with entropy above the observation bound, to check identical clipping
    ds[0].sig_entropy[:] = 13.5
    return ds


@pytest.mark.parametrize("reward", ["cost", "tokens"])
@pytest.mark.parametrize("gammas", [(0, 1, 2, 3, 4, 5, 6, 7, 8), (0, 3, 6), (0,)])
def test_next_step_matches_single_env(reward: str, gammas: tuple[int, ...]) -> None:
    ds, E = _ds(), 6
    vec = SpecKVReplayVectorEnv(E, traces=ds, cost_models=CMS, gammas=gammas, reward=reward)
    singles = [SpecKVReplayEnv(traces=ds, cost_models=CMS, gammas=gammas, reward=reward) for _ in range(E)]
    obs, _ = vec.reset(seed=0, options={"episodes": [0, 1, 2, 3, 4, 5]})
    for e, env in enumerate(singles):
        o, _ = env.reset(seed=0, options={"episode": e})
        assert np.array_equal(o, obs[e])
    rng = np.random.default_rng(1)
    pending = np.zeros(E, dtype=bool)
    ends = 0
    for _ in range(300):
        a = rng.integers(len(gammas), size=E)
        obs, rew, term, trunc, info = vec.step(a)
        eps = vec.episode_index
        for e, env in enumerate(singles):
            if pending[e]:  # autoreset step: the vector env started episode eps[e]
                o, _ = env.reset(options={"episode": int(eps[e])})
                assert np.array_equal(o, obs[e]) and rew[e] == 0.0 and not term[e] and not trunc[e]
                pending[e] = False
                continue
            o, r, te, tr, inf = env.step(int(a[e]))
            assert np.array_equal(o, obs[e]), (e, o, obs[e])
            assert r == rew[e] and te == term[e] and tr == trunc[e]
            assert inf["gamma"] == info["gamma"][e] and inf["accepted"] == info["accepted"][e]
            if te or tr:
                pending[e] = True
                ends += 1
                assert info["_episode_tps"][e]
                assert info["episode_tps"][e] == pytest.approx(inf["episode_summary"]["modelled_tps"])
    assert ends > 10
    assert obs.dtype == np.float32 and vec.observation_space.contains(obs)


def test_same_step_autoreset() -> None:
    ds, E = _ds(), 4
    vec = SpecKVReplayVectorEnv(E, traces=ds, cost_models=CMS, autoreset_mode="same-step")
    singles = [SpecKVReplayEnv(traces=ds, cost_models=CMS) for _ in range(E)]
    obs, _ = vec.reset(seed=3, options={"episodes": [5, 6, 7, 8]})
    for e, env in enumerate(singles):
        env.reset(options={"episode": 5 + e})
    rng = np.random.default_rng(2)
    for _ in range(200):
        a = rng.integers(9, size=E)
        obs, rew, term, trunc, info = vec.step(a)
        eps = vec.episode_index
        for e, env in enumerate(singles):
            o, r, te, tr, _ = env.step(int(a[e]))
            assert r == rew[e] and te == term[e] and tr == trunc[e]
            if te or tr:
                assert info["_final_obs"][e] and np.array_equal(info["final_obs"][e], o)
                o, _ = env.reset(options={"episode": int(eps[e])})
            assert np.array_equal(o, obs[e])


def test_make_vec_and_invalid_actions() -> None:
    vec = gym.make_vec(
        "SpecKVReplay-v0", num_envs=3, vectorization_mode="vector_entry_point", traces=_ds(), cost_models=CMS
    )
    vec.reset(seed=0)
    obs, *_ = vec.step(np.array([0, 4, 8]))
    assert obs.shape == (3, 13)
    with pytest.raises(ValueError, match=r"invalid action\(s\) \[9\]"):
        vec.step(np.array([0, 9, 1]))
    with pytest.raises(ValueError, match=r"invalid action\(s\) \[-1\]"):
        vec.step(np.array([0, -1, 1]))
    with pytest.raises(ValueError, match="integer indices"):
        vec.step(np.array([0.5, 1.0, 2.0]))
    with pytest.raises(ValueError, match=r"shape \(3,\)"):
        vec.step(np.array([1, 2]))


def test_seeded_vector_determinism() -> None:
    def run(seed: int) -> bytes:
        vec = SpecKVReplayVectorEnv(8, traces=_ds(), cost_models=CMS)
        obs, _ = vec.reset(seed=seed)
        out = [obs.tobytes()]
        rng = np.random.default_rng(0)
        for _ in range(100):
            obs, r, *_ = vec.step(rng.integers(9, size=8))
            out += [obs.tobytes(), r.tobytes()]
        return b"".join(out)

    assert run(1) == run(1) and run(1) != run(2)


@pytest.mark.parametrize("bad", [-1, -9, -10, -18, -19, 9, 10, 2**62, -(2**63)])
def test_every_action_outside_range_is_an_error(bad: int) -> None:
    # regression: a negative take() wrapped -10..-18 onto real gammas (9 gammas + 9 sentinels)
    vec = SpecKVReplayVectorEnv(3, traces=_ds(), cost_models=CMS)
    vec.reset(seed=0)
    before = vec._buf.copy()
    with pytest.raises(ValueError, match=rf"invalid action\(s\) \[{bad}\]: must be in 0\.\.8"):
        vec.step(np.array([0, bad, 1], dtype=np.int64))
    assert np.array_equal(vec._buf, before)  # a rejected step changes nothing
    single = SpecKVReplayEnv(traces=_ds(), cost_models=CMS)
    single.reset(seed=0)
    with pytest.raises(ValueError, match="invalid action"):
        single.step(bad)
    # unsigned and smaller integer dtypes are validated the same way
    with pytest.raises(ValueError, match=r"invalid action\(s\) \[200\]"):
        vec.step(np.array([0, 200, 1], dtype=np.uint8))
    obs, *_ = vec.step(np.array([0, 8, 1], dtype=np.uint8))
    assert obs.shape == (3, 13)
