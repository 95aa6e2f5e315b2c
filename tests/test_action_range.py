"""Out-of-range and malformed actions, the same matrix on every environment: the single replay
env (its fast path and the generic path), the vector replay env and the live env on the tiny
pair. Each bad action raises ValueError with a message naming it, and leaves the episode as it
was (the next valid step gives what it gives on an untouched env)."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest
from conftest import requires_default
from tiny_models import make_tiny_smol_pair

import speckv_env  # noqa: F401  (registers the envs)
from replay.env import SpecKVReplayEnv
from replay.trace import synthetic_dataset
from replay.vector import SpecKVReplayVectorEnv
from speckv_env.core import CostModel

CM = CostModel.unit()
GAMMAS = (0, 2, 4, 8)  # 4 actions: 0..3

# (action, message pattern) for an env whose actions are 0..3
BAD_SINGLE = [
    (4, r"invalid action 4: must be in 0\.\.3"),
    (-1, r"invalid action -1"),
    (-4, r"invalid action -4"),
    (10**6, r"invalid action 1000000"),
    (np.int64(4), r"invalid action 4"),
    (np.int32(-1), r"invalid action -1"),
    (np.uint8(255), r"invalid action 255"),
    (4.0, r"invalid action 4"),
    (2.5, "expected an integer index"),
    (float("nan"), "expected an integer index"),
    ("1", "expected an integer index"),
    (None, "expected an integer index"),
    (True, "expected an integer index"),
    (np.array([1, 2]), "expected one index"),
]
VALID_SINGLE = [0, 3, np.int64(1), np.int32(2), np.array(1), np.array([2]), 3.0]


def _replay(fast: bool) -> SpecKVReplayEnv:
    env = SpecKVReplayEnv(traces=synthetic_dataset(4, seed=3), cost_model=CM, gammas=GAMMAS)
    if not fast:
        env._trace_backend = None  # the generic SpecKVBaseEnv.step path
    return env


def _check_single(make_env, reset_options: dict) -> None:
    env, ref = make_env(), make_env()
    env.reset(seed=0, options=reset_options)
    ref.reset(seed=0, options=reset_options)
    for bad, msg in BAD_SINGLE:
        with pytest.raises(ValueError, match=msg):
            env.unwrapped.step(bad)
    # nothing moved: the next valid step is the untouched env's
    got, want = env.unwrapped.step(2), ref.unwrapped.step(2)
    assert np.array_equal(got[0], want[0]) and got[1:4] == want[1:4]
    assert (got[4]["gamma"], got[4]["accepted"], got[4]["position"]) == (
        want[4]["gamma"],
        want[4]["accepted"],
        want[4]["position"],
    )
    for ok in VALID_SINGLE:
        *_, term, trunc, info = env.unwrapped.step(ok)
        assert info["requested_gamma"] == GAMMAS[int(np.asarray(ok).reshape(-1)[0])]
        if term or trunc:
            env.reset(seed=1, options=reset_options)


@pytest.mark.parametrize("fast", [True, False], ids=["fast-path", "generic-path"])
def test_single_replay_env(fast: bool) -> None:
    _check_single(lambda: _replay(fast), {"episode": 1})


def test_single_replay_env_through_gym_make_checks_before_the_wrappers() -> None:
    env = gym.make("SpecKVReplay-v0", traces=synthetic_dataset(4, seed=3), cost_model=CM, gammas=GAMMAS)
    env.reset(seed=0)
    with pytest.raises(ValueError, match=r"invalid action 4: must be in 0\.\.3"):
        env.step(4)
    with pytest.raises(ValueError, match="invalid action -1"):
        env.step(-1)


@pytest.mark.parametrize("position", [0, 2, 4])
@pytest.mark.parametrize(
    ("bad", "msg"),
    [
        (4, r"invalid action\(s\) \[4\]: must be in 0\.\.3"),
        (-1, r"invalid action\(s\) \[-1\]"),
        (-5, r"invalid action\(s\) \[-5\]"),
        (2**40, rf"invalid action\(s\) \[{2**40}\]"),
    ],
)
def test_vector_replay_env_one_bad_action(position: int, bad: int, msg: str) -> None:
    vec = SpecKVReplayVectorEnv(num_envs=5, traces=synthetic_dataset(4, seed=3), cost_model=CM, gammas=GAMMAS)
    ref = SpecKVReplayVectorEnv(num_envs=5, traces=synthetic_dataset(4, seed=3), cost_model=CM, gammas=GAMMAS)
    vec.reset(seed=0)
    ref.reset(seed=0)
    actions = np.array([1, 2, 3, 0, 1], dtype=np.int64)
    bad_actions = actions.copy()
    bad_actions[position] = bad
    with pytest.raises(ValueError, match=msg):
        vec.step(bad_actions)
    got, want = vec.step(actions), ref.step(actions)
    for a, b in zip(got[:4], want[:4]):
        assert np.array_equal(a, b)


@pytest.mark.parametrize(
    ("actions", "msg"),
    [
        (np.array([1.0, 2.0, 3.0]), "expected integer indices"),
        (np.array([1, 2]), r"expected shape \(3,\)"),
        (np.array([[1, 2, 3]]), r"expected shape \(3,\)"),
        (np.array(["1", "2", "3"]), "expected integer indices"),
        (np.array([4, -1, 9]), r"invalid action\(s\) \[4, -1, 9\]"),
        (np.array([255, 0, 0], dtype=np.uint8), r"invalid action\(s\) \[255\]"),
    ],
)
def test_vector_replay_env_malformed_actions(actions: np.ndarray, msg: str) -> None:
    vec = SpecKVReplayVectorEnv(num_envs=3, traces=synthetic_dataset(4, seed=3), cost_model=CM, gammas=GAMMAS)
    vec.reset(seed=0)
    with pytest.raises(ValueError, match=msg):
        vec.step(actions)
    vec.step(np.array([0, 1, 3], dtype=np.int32))  # still usable


@pytest.fixture(scope="module")
def tiny_smol_pair():
    return make_tiny_smol_pair()


@requires_default
def test_live_env(tiny_smol_pair) -> None:
    def make():
        return gym.make(
            "SpecKV-v0",
            pair=tiny_smol_pair,
            cost_model=CM,
            split="test",
            task="math",
            max_new_tokens=24,
            gammas=GAMMAS,
        )

    _check_single(make, {"episode": 0, "episode_seed": 5})
