"""Render modes of both environments: ``rgb_array`` frames (a bar chart of the episode so far),
``human`` (a line per step), through Gymnasium's checkers and wrappers."""

from __future__ import annotations

import warnings

import gymnasium as gym
import numpy as np
import pytest
import torch
from conftest import requires_default

import speckv_env  # noqa: F401
from replay.trace import synthetic_dataset
from speckv_env.base_env import RENDER_HEIGHT, RENDER_WIDTH, draw_episode
from speckv_env.core import CostModel

ACCEPTED = (31, 119, 180)
REJECTED = (244, 170, 160)
ALL_ACCEPTED = (44, 160, 44)
TARGET_STEP = (150, 150, 150)


def _replay(render_mode, n=8, **kw):
    return gym.make(
        "SpecKVReplay-v0", traces=synthetic_dataset(n), cost_model=CostModel.unit(), render_mode=render_mode, **kw
    )


def _is(frame: np.ndarray, colour) -> np.ndarray:
    return (frame == np.array(colour, dtype=np.uint8)).all(axis=-1)


def _play(env, actions, seed=0):
    """Play an episode; returns the frames (after reset and after every step) and the infos."""
    env.reset(seed=seed, options={"episode": 0})
    frames, infos = [env.render()], []
    for a in actions:
        _, _, term, trunc, info = env.step(a)
        frames.append(env.render())
        infos.append(info)
        if term or trunc:
            break
    return frames, infos


def test_rgb_array_frames_are_uint8_pictures_that_change_with_the_episode():
    env = _replay("rgb_array")
    rng = np.random.default_rng(0)
    frames, infos = _play(env, rng.integers(0, 9, 500))
    assert infos[-1].get("episode_summary")  # the episode ran to its end
    for f in frames:
        assert f.shape == (RENDER_HEIGHT, RENDER_WIDTH, 3) and f.dtype == np.uint8
    # every step changes the picture (a new bar, and the progress bar moves)
    for a, b in zip(frames, frames[1:]):
        assert not np.array_equal(a, b)
    # the picture is the episode's steps, as the env reported them in info
    steps = [(i["gamma"], i["accepted"]) for i in infos]
    u = env.unwrapped
    want = draw_episode(steps, max(u.gammas), u.backend.position(), u.backend.max_new_tokens, done=True)
    np.testing.assert_array_equal(frames[-1], want)
    # a new episode starts from an empty chart
    env.reset(seed=1, options={"episode": 1})
    assert not _is(env.render(), ACCEPTED).any()


def test_frame_bars_show_gamma_drafted_and_tokens_accepted():
    gmax = 8
    f = draw_episode([(4, 1), (2, 2), (0, 0), (8, 0)], gmax, position=7, max_new_tokens=20)
    chart_rows = slice(20, RENDER_HEIGHT - 4)
    acc, rej, full, tgt = (_is(f[chart_rows], c) for c in (ACCEPTED, REJECTED, ALL_ACCEPTED, TARGET_STEP))
    cols = [np.flatnonzero(m.any(axis=0)) for m in (acc, rej, full, tgt)]
    unit = (RENDER_HEIGHT - 4 - 20) // gmax
    # heights in pixels, per bar: accepted part and rejected part
    acc_h = acc.sum(axis=0)
    rej_h = rej.sum(axis=0)
    first = cols[0][0]  # the first bar: gamma 4, 1 accepted
    assert acc_h[first] == 1 * unit and rej_h[first] == 3 * unit
    assert full.sum(axis=0).max() == 2 * unit  # the second bar: 2 of 2 accepted (green)
    assert rej_h.max() == 8 * unit  # the fourth bar: 8 drafted, none accepted
    assert cols[3].size and not acc_h[cols[3]].any()  # gamma 0: a grey mark, no accepted part
    # bars appear left to right in step order
    assert cols[0].max() < cols[2].min() < cols[3].min() < cols[1].max()
    # progress bar: 7 of 20 tokens
    bar = (f[4:12] != 225).any(axis=-1) & (f[4:12] != 255).any(axis=-1)
    assert bar[0].sum() == round(7 / 20 * (RENDER_WIDTH - 8))


def test_human_prints_each_step_and_rgb_frames_cost_little(capsys):
    env = _replay("human")
    _, infos = _play(env, [3, 8, 0])
    assert len(infos) == 3 and env.render() is None
    lines = capsys.readouterr().out.splitlines()
    steps = [ln for ln in lines if ln.startswith("step")]
    assert len(steps) == 3
    for ln, info in zip(steps, infos):
        assert f"gamma {info['gamma']:>2}  accepted {info['accepted']:>2}" in ln
    assert lines[-1].startswith("prompt=")  # render(): the summary
    # the default render mode records nothing: no render() frames to pay for
    assert type(_replay(None).unwrapped._builder).__name__ == "ObservationBuilder"


@pytest.mark.parametrize("mode", ["rgb_array", "human", "ansi"])
def test_gymnasium_checker_passes_in_every_render_mode(mode, capsys):
    from gymnasium.utils.env_checker import check_env

    env = _replay(mode)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        check_env(env.unwrapped)
    assert not [str(x.message) for x in w]
    assert set(env.unwrapped.metadata["render_modes"]) == {"ansi", "human", "rgb_array"}


def test_render_collection_and_record_video_wrappers():
    from gymnasium.wrappers import RenderCollection

    env = RenderCollection(_replay("rgb_array"))
    env.reset(seed=0)
    for _ in range(5):
        env.step(2)
    frames = env.render()
    assert len(frames) == 6 and all(f.shape == (RENDER_HEIGHT, RENDER_WIDTH, 3) for f in frames)
    assert len({f.tobytes() for f in frames}) == 6


def test_record_video_writes_a_video(tmp_path):
    pytest.importorskip("moviepy")  # RecordVideo needs moviepy; the frames are tested above
    from gymnasium.wrappers import RecordVideo

    env = RecordVideo(_replay("rgb_array"), str(tmp_path), episode_trigger=lambda e: True, disable_logger=True)
    env.reset(seed=0)
    done = False
    while not done:
        _, _, term, trunc, _ = env.step(2)
        done = term or trunc
    env.close()
    assert list(tmp_path.glob("*.mp4"))


def test_step_log_replay_renders_its_steps():
    env = gym.make("SpecKVReplay-v0", source="speckv-paper", on_undetermined="clip", render_mode="rgb_array")
    frames, infos = _play(env, [2] * 5)
    assert len(infos) == 5
    assert all(f.shape == (RENDER_HEIGHT, RENDER_WIDTH, 3) for f in frames)
    assert not np.array_equal(frames[0], frames[-1])
    # each frame is the run's steps so far, as the env reported them (gamma drafted, accepted)
    u = env.unwrapped
    steps = [(i["gamma"], i["accepted"]) for i in infos]
    assert any(k > 0 for _, k in steps) and any(k < g for g, k in steps)  # accepted and rejected bars both drawn
    for j in range(1, len(frames)):
        pos = int(infos[j - 1]["position"])
        done = "episode_summary" in infos[j - 1]
        want = draw_episode(steps[:j], max(u.gammas), pos, u.backend.max_new_tokens, done=done)
        np.testing.assert_array_equal(frames[j], want, err_msg=f"frame after step {j}")


@requires_default
def test_live_env_renders_rgb_array():
    from tiny_models import make_tiny_pair

    from speckv_env.models import load_tokenizer
    from speckv_env.pair import ModelPair

    tok = load_tokenizer(None)
    target, draft = make_tiny_pair(vocab=49152, hidden=32, seed=4)  # tiny models, the real tokenizer's vocabulary
    for m in (target, draft):
        m.config.eos_token_id = tok.eos_token_id
        m.generation_config.eos_token_id = tok.eos_token_id
    pair = ModelPair(target, draft, tok, "tiny-target", "tiny-draft", "fp32", torch.device("cpu"))
    env = gym.make(
        "SpecKV-v0",
        pair=pair,
        cost_model=CostModel.unit(),
        split="test",
        task="math",
        max_new_tokens=12,
        render_mode="rgb_array",
    )
    frames, infos = _play(env, [3, 1, 4, 0, 2])
    assert infos and all(f.shape == (RENDER_HEIGHT, RENDER_WIDTH, 3) and f.dtype == np.uint8 for f in frames)
    u = env.unwrapped
    steps = [(i["gamma"], i["accepted"]) for i in infos]
    done = "episode_summary" in infos[-1]
    want = draw_episode(steps, max(u.gammas), u.backend.position(), u.backend.max_new_tokens, done=done)
    np.testing.assert_array_equal(frames[-1], want)
