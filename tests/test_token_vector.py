"""Token mode of the vector replay env: per env, decision by decision, the scalar env's token mode.

Each env of :class:`replay.vector.SpecKVReplayVectorEnv` with ``control="token"`` must give what a
scalar ``SpecKVReplay-v0`` with ``control="token"`` gives on the same episode under the same
decisions: bit-identical float32 observations, equal rewards, end flags and info, through episode
ends and both autoreset modes; and every episode's rewards add up to N - T / t_target."""

from __future__ import annotations

import math
from typing import Any

import gymnasium as gym
import numpy as np
import pytest

import speckv_env  # noqa: F401  (registers the envs)
from replay.env import SpecKVReplayEnv
from replay.oracle import oracle
from replay.trace import synthetic_dataset
from replay.vector import SpecKVReplayVectorEnv
from speckv_env.core import TOKEN_OBS_DIM, CostModel

# a unit model, and a non-unit one with overhead, t_target != 1 and a non-linear verify curve
CMS = {
    "fp16": CostModel.unit(),
    "nf4": CostModel(t_draft=0.031, t_verify=[0.21, 0.215, 0.23, 0.24, 0.26, 0.27, 0.29, 0.3, 0.33], t_target=0.2,
                     t_overhead=0.017),
}  # fmt: skip


def _ds(seed: int = 0):
    ds = synthetic_dataset(
        10, n_range=(5, 60), seed=seed, compressions=("fp16", "nf4"), modes=("greedy", "sample"), rollouts=True
    )
    # signals above the observation's bound, at the step's position and in the rollout: clipped alike
    ds[0].sig_entropy[:] = 13.5
    ds[0].roll_entropy[:] = 13.5
    ds[1].roll_entropy[:, 2:] = 12.5
    return ds


def _check_decision(e: int, vec_out: tuple, single_out: tuple, obs_e: np.ndarray | None = None) -> bool:
    """Compare env ``e`` of a vector step with the scalar env's step (``obs_e``: env e's observation
    if not ``vec_out``'s, e.g. a final one); True at an episode end."""
    obs, rew, term, trunc, info = vec_out
    o, r, te, tr, inf = single_out
    obs_e = obs[e] if obs_e is None else obs_e
    assert np.array_equal(o, obs_e), (e, o, obs_e)
    assert r == rew[e] and te == term[e] and tr == trunc[e]
    assert inf["modelled_time"] == info["modelled_time"][e]
    assert inf["drafted"] == info["drafted"][e]
    p = inf["draft_p"]
    assert math.isnan(info["draft_p"][e]) if p is None else p == info["draft_p"][e], (p, info["draft_p"][e])
    verified = "lookahead" in inf
    assert info["verified"][e] == verified
    if verified:
        assert inf["gamma"] == info["gamma"][e] and inf["accepted"] == info["accepted"][e]
        assert inf["lookahead"] == info["lookahead"][e] and inf["step_time"] == info["step_time"][e]
    else:
        assert info["gamma"][e] == 0 and info["accepted"][e] == 0 and not info["lookahead"][e]
    if te or tr:
        assert info["_episode_tps"][e]
        assert info["episode_tps"][e] == pytest.approx(inf["episode_summary"]["modelled_tps"], rel=1e-12)
        return True
    assert "_episode_tps" not in info or not info["_episode_tps"][e]
    return False


def _decisions(rng: np.random.Generator, p_draft: np.ndarray) -> np.ndarray:
    return (rng.random(p_draft.shape[0]) < p_draft).astype(np.int64)


LOOKAHEAD = pytest.mark.parametrize("lookahead", [True, False], ids=["lookahead", "dtd"])
"""Both token-mode variants: look-ahead and draft-then-decide (``lookahead=False``)."""


@LOOKAHEAD
@pytest.mark.parametrize("reward", ["cost", "time"])
@pytest.mark.parametrize("gammas", [tuple(range(9)), (0, 2, 5), (0,)])
def test_next_step_matches_scalar_token_envs(reward: str, gammas: tuple[int, ...], lookahead: bool) -> None:
    ds, E = _ds(), 7
    kw: dict[str, Any] = {"gammas": gammas, "reward": reward, "control": "token", "lookahead": lookahead}
    vec = SpecKVReplayVectorEnv(E, traces=ds, cost_models=CMS, **kw)
    singles = [SpecKVReplayEnv(traces=ds, cost_models=CMS, **kw) for _ in range(E)]
    obs, _ = vec.reset(seed=0, options={"episodes": list(range(E))})
    assert obs.shape == (E, TOKEN_OBS_DIM) and obs.dtype == np.float32
    for e, env in enumerate(singles):
        o, _ = env.reset(options={"episode": e})
        assert np.array_equal(o, obs[e])
    rng = np.random.default_rng(1)
    p_draft = np.array([0.0, 0.3, 0.6, 0.8, 0.9, 1.0, 0.7])  # per env: from never to always drafting
    pending = np.zeros(E, dtype=bool)
    ends = verifications = drafts = 0
    for _ in range(500):
        a = _decisions(rng, p_draft)
        out = vec.step(a)
        obs, rew, term, trunc, info = out
        eps = vec.episode_index
        for e, env in enumerate(singles):
            if pending[e]:  # autoreset step: the vector env started episode eps[e]
                o, _ = env.reset(options={"episode": int(eps[e])})
                assert np.array_equal(o, obs[e]) and rew[e] == 0.0 and not term[e] and not trunc[e]
                assert not info["verified"][e] and info["drafted"][e] == 0 and math.isnan(info["draft_p"][e])
                assert info["modelled_time"][e] == 0.0 and info["step_time"][e] == 0.0
                pending[e] = False
                continue
            single_out = env.step(int(a[e]))
            pending[e] = _check_decision(e, out, single_out)
            ends += pending[e]
            verifications += "lookahead" in single_out[4]
            drafts += single_out[4]["draft_p"] is not None
    assert ends > 20 and verifications > 100
    assert drafts > (100 if max(gammas) else -1)
    assert vec.observation_space.contains(obs)


@LOOKAHEAD
def test_same_step_autoreset_matches_scalar_token_envs(lookahead: bool) -> None:
    ds, E = _ds(1), 5
    kw: dict[str, Any] = {"control": "token", "lookahead": lookahead}
    vec = SpecKVReplayVectorEnv(E, traces=ds, cost_models=CMS, autoreset_mode="same-step", **kw)
    singles = [SpecKVReplayEnv(traces=ds, cost_models=CMS, **kw) for _ in range(E)]
    vec.reset(seed=3, options={"episodes": [5, 6, 7, 8, 9]})
    for e, env in enumerate(singles):
        env.reset(options={"episode": 5 + e})
    rng = np.random.default_rng(2)
    p_draft = np.array([0.5, 0.75, 0.85, 0.95, 0.2])
    ends = 0
    for _ in range(400):
        a = _decisions(rng, p_draft)
        out = vec.step(a)
        obs, info = out[0], out[4]
        eps = vec.episode_index
        for e, env in enumerate(singles):
            single_out = env.step(int(a[e]))
            if single_out[2] or single_out[3]:
                ends += 1
                assert info["_final_obs"][e]
                assert _check_decision(e, out, single_out, obs_e=info["final_obs"][e])
                o, _ = env.reset(options={"episode": int(eps[e])})
                assert np.array_equal(o, obs[e])
            else:
                assert not _check_decision(e, out, single_out)
                assert "_final_obs" not in info or not info["_final_obs"][e]
    assert ends > 10


@LOOKAHEAD
def test_episode_returns_are_n_minus_time_over_t_target(lookahead: bool) -> None:
    """Every finished episode's rewards add up to N - T / t_target, T its modelled time (the sum of
    its decisions' times, also N / episode_tps), and no decision sequence beats the oracle."""
    ds, E = _ds(2), 8
    cm_of = [CMS[t.compression] for t in ds]
    vec = SpecKVReplayVectorEnv(E, traces=ds, cost_models=CMS, control="token", lookahead=lookahead)
    vec.reset(seed=5)
    rng = np.random.default_rng(3)
    p_draft = np.linspace(0.0, 1.0, E)
    ret, time, ends = np.zeros(E), np.zeros(E), 0
    for _ in range(600):
        eps = vec.episode_index
        _, rew, term, trunc, info = vec.step(_decisions(rng, p_draft))
        ret += rew
        time += info["modelled_time"]
        for e in np.flatnonzero(term | trunc):
            tr, cm = ds[eps[e]], cm_of[eps[e]]
            assert ret[e] == pytest.approx(tr.n - time[e] / cm.t_target, abs=1e-9)
            assert info["episode_tps"][e] == pytest.approx(tr.n / time[e], rel=1e-12)
            assert time[e] >= oracle(tr, cm).total_time - 1e-9
            ret[e] = time[e] = 0.0
            ends += 1
    assert ends > 30


@pytest.mark.parametrize(("action", "gamma"), [(1, 8), (0, 0)])
def test_always_draft_is_gamma_max_and_never_draft_is_gamma_zero(action: int, gamma: int) -> None:
    """Drafting to the cap every step costs what step mode's gamma_max costs (a forced stop pays
    no lookahead); never drafting is gamma 0: the first episodes' tokens/s agree."""
    ds, E = _ds(4), 10
    tok = SpecKVReplayVectorEnv(E, traces=ds, cost_models=CMS, control="token")
    step = SpecKVReplayVectorEnv(E, traces=ds, cost_models=CMS)
    tps = {}
    for env, act in ((tok, action), (step, gamma)):
        env.reset(seed=0, options={"episodes": list(range(E))})
        first = np.full(E, np.nan)
        while np.isnan(first).any():
            *_, info = env.step(np.full(E, act))
            if "_episode_tps" in info:
                new = info["_episode_tps"] & np.isnan(first)
                first[new] = info["episode_tps"][new]
        tps[env is tok] = first
    np.testing.assert_allclose(tps[True], tps[False], rtol=1e-12)


def test_make_vec_spaces_and_bad_actions() -> None:
    vec = gym.make_vec(
        "SpecKVReplay-v0",
        num_envs=3,
        vectorization_mode="vector_entry_point",
        traces=_ds(),
        cost_models=CMS,
        control="token",
        lookahead=False,
    )
    obs, _ = vec.reset(seed=0)
    assert obs.shape == (3, TOKEN_OBS_DIM) and vec.single_action_space == gym.spaces.Discrete(2)
    obs, *_ = vec.step(np.array([1, 0, 1]))
    assert obs.shape == (3, TOKEN_OBS_DIM)
    inner = vec.unwrapped
    assert isinstance(inner, SpecKVReplayVectorEnv) and inner.control == "token" and inner.lookahead is False
    before = inner._buf.copy()
    for bad, msg in (
        (np.array([0, 2, 1]), r"invalid action\(s\) \[2\]: must be in 0\.\.1, indices into token actions"),
        (np.array([-1, 0, 1]), r"invalid action\(s\) \[-1\]"),
        (np.array([0, 1, 3], dtype=np.uint8), r"invalid action\(s\) \[3\]"),
        (np.array([0.5, 1.0, 0.0]), "integer indices into token actions"),
        (np.array([1, 0]), r"shape \(3,\)"),
    ):
        with pytest.raises(ValueError, match=msg):
            vec.step(bad)
        assert np.array_equal(inner._buf, before)  # a rejected step changes nothing
    vec.step(np.array([1, 1, 0], dtype=np.int32))  # still usable


def test_token_mode_needs_v2_traces_like_the_scalar_env() -> None:
    v1 = synthetic_dataset(3)
    with pytest.raises(ValueError, match="speckv-trace/2") as vec_err:
        SpecKVReplayVectorEnv(2, traces=v1, cost_model=CostModel.unit(), control="token")
    with pytest.raises(ValueError, match="speckv-trace/2") as scalar_err:
        SpecKVReplayEnv(traces=v1, cost_model=CostModel.unit(), control="token")
    assert str(vec_err.value) == str(scalar_err.value)
    with pytest.raises(ValueError, match="control must be one of"):
        SpecKVReplayVectorEnv(2, traces=_ds(), cost_model=CostModel.unit(), control="tokens")
    with pytest.raises(ValueError, match="applies to control='token' only"):
        SpecKVReplayVectorEnv(2, traces=_ds(), cost_model=CostModel.unit(), lookahead=False)
    # step mode still replays /1 traces, and /2 ones unchanged
    assert SpecKVReplayVectorEnv(2, traces=v1, cost_model=CostModel.unit()).reset(seed=0)[0].shape == (2, 13)
