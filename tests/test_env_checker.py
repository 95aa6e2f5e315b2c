"""Gymnasium's and stable-baselines3's env checkers pass on SpecKVReplay-v0 with zero warnings."""

from __future__ import annotations

import warnings

import gymnasium as gym
import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env as gym_check_env
from stable_baselines3.common.env_checker import check_env as sb3_check_env

import speckv_env  # noqa: F401
from replay.trace import synthetic_dataset
from speckv_env.core import CostModel

# ---- replay part ------------------------------------------------------------------------------


def _make_replay(**kw) -> gym.Env:
    return gym.make(
        "SpecKVReplay-v0",
        traces=synthetic_dataset(6, compressions=("fp16", "int8"), modes=("greedy", "sample")),
        cost_models={"fp16": CostModel.unit(), "int8": CostModel.unit(draft_ratio=0.3)},
        **kw,
    )


@pytest.mark.parametrize("kw", [{}, {"reward": "tokens", "gammas": (0, 2, 4)}, {"render_mode": "ansi"}])
def test_replay_gymnasium_check_env_no_warnings(kw) -> None:
    env = _make_replay(**kw)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        gym_check_env(env.unwrapped)
    assert not w, [str(x.message) for x in w]


@pytest.mark.parametrize("kw", [{}, {"reward": "time"}])
def test_replay_sb3_check_env_no_warnings(kw) -> None:
    env = _make_replay(**kw)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        sb3_check_env(env)
    assert not w, [str(x.message) for x in w]


def test_replay_paper_source_checkers_no_warnings() -> None:
    env = gym.make("SpecKVReplay-v0", source="speckv-paper", on_undetermined="clip")
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        gym_check_env(env.unwrapped)
        sb3_check_env(env)
    assert not w, [str(x.message) for x in w]


def test_replay_invalid_actions() -> None:
    env = _make_replay()
    env.reset(seed=0)
    for bad, msg in [
        (9, r"invalid action 9: must be in 0\.\.8"),
        (-1, r"invalid action -1"),
        (np.int64(12), "invalid action 12"),
        ("2", "expected an integer index"),
        (2.5, "expected an integer index"),
        (None, "expected an integer index"),
        (True, "expected an integer index"),
        (np.array([1, 2]), "expected one index"),
    ]:
        with pytest.raises(ValueError, match=msg):
            env.unwrapped.step(bad)
    # accepted forms: python int, numpy integer, size-1 array, integral float
    for ok in (1, np.int32(2), np.array([3]), np.array(0), 4.0):
        env.unwrapped.step(ok)
