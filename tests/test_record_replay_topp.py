"""Record -> replay with nucleus sampling (top_p < 1) on the tiny pair: a trace recorded by the
engine under temperature and top_p answers a live episode's random gamma choices exactly, step by
step (gamma used, accepted count, tokens, reward, termination, observation)."""

from __future__ import annotations

import random

import gymnasium as gym
import numpy as np
import pytest
from conftest import requires_default
from tiny_models import make_tiny_smol_pair

import speckv_env  # noqa: F401
from speckv_env.base_env import SpecKVBaseEnv
from speckv_env.core import CostModel
from speckv_env.env import LiveBackend

pytestmark = requires_default


@pytest.fixture(scope="module")
def tiny_smol_pair():
    return make_tiny_smol_pair()


@pytest.mark.parametrize("top_p", [0.9, 0.5])
def test_record_then_replay_with_top_p(tiny_smol_pair, top_p: float) -> None:
    from replay.env import SpecKVReplayEnv
    from speckv_env.app.profile import record_episode
    from speckv_env.engine import SpeculativeEngine

    pair, temperature = tiny_smol_pair, 0.8
    env = gym.make(
        "SpecKV-v0",
        pair=pair,
        cost_model=CostModel.unit(),
        split="test",
        task="math",
        max_new_tokens=24,
        temperature=temperature,
        top_p=top_p,
    )
    u = env.unwrapped
    assert isinstance(u, SpecKVBaseEnv) and isinstance(u.backend, LiveBackend)
    prompts = u.backend.prompts
    eng = SpeculativeEngine(
        pair.target, pair.draft, temperature=temperature, top_p=top_p, eos_token_id=pair.eos_token_id
    )
    for ep in range(2):
        seed = 2000 + ep
        tr = record_episode(eng, pair, prompts[ep], max_new_tokens=24, gamma_max=8, mode="sample", seed=seed)
        assert tr.mode == "sample" and tr.top_p == pytest.approx(top_p)
        renv = SpecKVReplayEnv(traces=[tr], cost_model=CostModel.unit())
        o_live, _ = env.reset(options={"episode": ep, "episode_seed": seed})
        o_rep, _ = renv.reset(options={"episode": 0})
        np.testing.assert_allclose(o_live, o_rep, atol=1e-6)
        rng = random.Random(ep)
        done, steps = False, 0
        while not done:
            a = rng.randint(0, 8)
            o_live, r_live, te, tr_, i_live = env.step(a)
            o_rep, r_rep, te2, tr2, i_rep = renv.step(a)
            assert (i_live["gamma"], i_live["accepted"], list(i_live["tokens"])) == (
                i_rep["gamma"],
                i_rep["accepted"],
                list(i_rep["tokens"]),
            )
            assert r_live == pytest.approx(r_rep) and (te, tr_) == (te2, tr2)
            np.testing.assert_allclose(o_live, o_rep, atol=1e-5)
            done, steps = te or tr_, steps + 1
        assert steps > 1
