"""stable-baselines3's own front door with its defaults: ``make_vec_env("SpecKVReplay-v0")``
(which asks for ``render_mode="rgb_array"``), DQN and A2C training through it, its callbacks,
and its vectorised env's frames."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest
import torch

import speckv_env  # noqa: F401
from speckv_env.base_env import RENDER_HEIGHT, RENDER_WIDTH

N_ENVS = 8
STEPS = 4000


@pytest.fixture(scope="module")
def venv():
    from stable_baselines3.common.env_util import make_vec_env

    torch.set_num_threads(1)
    v = make_vec_env("SpecKVReplay-v0", n_envs=N_ENVS, seed=0)  # SB3's defaults: render_mode="rgb_array"
    yield v
    v.close()


@pytest.fixture(scope="module")
def judge():
    """Mean return of a policy over a fixed set of the shipped test episodes (same episodes for all)."""
    env = gym.make("SpecKVReplay-v0", split="test")
    episodes = range(0, env.unwrapped.backend.num_episodes(), 8)

    def mean_return(policy) -> float:
        totals = []
        for e in episodes:
            obs, _ = env.reset(seed=0, options={"episode": e})
            total, done = 0.0, False
            while not done:
                a = policy(obs)
                assert env.action_space.contains(a), a
                obs, r, term, trunc, _ = env.step(a)
                total += r
                done = term or trunc
            totals.append(total)
        return float(np.mean(totals))

    rng = np.random.default_rng(0)
    random_return = mean_return(lambda obs: int(rng.integers(env.action_space.n)))
    return mean_return, random_return


def test_make_vec_env_defaults_give_rgb_frames(venv):
    assert venv.render_mode == "rgb_array" and venv.num_envs == N_ENVS
    venv.reset()
    venv.step(np.full(N_ENVS, 2))
    frames = venv.get_images()
    assert len(frames) == N_ENVS
    assert all(f.shape == (RENDER_HEIGHT, RENDER_WIDTH, 3) and f.dtype == np.uint8 for f in frames)
    tiled = venv.render()  # SB3 tiles the envs' frames into one picture
    assert tiled.ndim == 3 and tiled.shape[2] == 3 and tiled.size >= N_ENVS * frames[0].size


@pytest.mark.parametrize("algo", ["DQN", "A2C"])
def test_sb3_learns_through_make_vec_env(algo, venv, judge, tmp_path):
    import stable_baselines3 as sb3
    from stable_baselines3.common.callbacks import EvalCallback
    from stable_baselines3.common.env_util import make_vec_env

    mean_return, random_return = judge
    eval_env = make_vec_env("SpecKVReplay-v0", n_envs=1, seed=1)
    callback = EvalCallback(
        eval_env, eval_freq=STEPS // N_ENVS // 2, n_eval_episodes=3, log_path=str(tmp_path), verbose=0
    )
    model = getattr(sb3, algo)("MlpPolicy", venv, seed=0, verbose=0)
    model.learn(STEPS, callback=callback)
    assert model.num_timesteps >= STEPS
    # the callback ran its evaluations on the same kind of env, and logged them
    assert len(callback.evaluations_results) == 2 and np.isfinite(callback.evaluations_results).all()
    assert (tmp_path / "evaluations.npz").is_file()

    learned = mean_return(lambda obs: int(model.predict(obs, deterministic=True)[0]))
    # a uniformly random gamma loses time to target-only decoding (about -12 target-token times
    # per episode); a few thousand steps are enough to learn to draft a few tokens and gain
    assert learned > random_return + 5.0, (algo, learned, random_return)
