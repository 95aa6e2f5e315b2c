"""SpecKVReplay-v0 over full-information traces: exact semantics, fast path == base path."""

from __future__ import annotations

import subprocess
import sys

import gymnasium as gym
import numpy as np
import pytest

import speckv_env  # noqa: F401  (registers the environments)
from replay.backend import TraceBackend
from replay.env import SpecKVReplayEnv
from replay.trace import synthetic_dataset, synthetic_trace
from speckv_env.base_env import SpecKVBaseEnv
from speckv_env.core import CostModel

CM = CostModel.unit()


def _dataset():
    return synthetic_dataset(10, compressions=("fp16", "int8"), modes=("greedy", "sample"))


def _cms():
    return {"fp16": CM, "int8": CostModel.unit(draft_ratio=0.2, verify_slope=0.1)}


def test_step_semantics_match_trace_model() -> None:
    tr = synthetic_trace(120, seed=5, finish_reason="eos")
    env = SpecKVReplayEnv(traces=[tr], cost_model=CM)
    env.reset(seed=0)
    rng = np.random.default_rng(0)
    t, out = 0, []
    while True:
        a = int(rng.integers(9))
        obs, r, term, trunc, info = env.step(a)
        g = min(a, tr.max_new_tokens - 1 - t)  # known before the step, as live
        k = min(int(tr.L[t]), g)
        assert (info["gamma"], info["accepted"], info["requested_gamma"]) == (g, k, a)
        assert info["tokens"] == tr.tokens[t : t + k + 1].tolist()
        assert r == pytest.approx((k + 1) - CM.step_time(g, k) / CM.t_target)
        out += info["tokens"]
        t += k + 1
        assert info["position"] == t
        if term or trunc:
            break
    assert term and not trunc and t == tr.n and out == tr.tokens.tolist() == env.emitted_tokens
    s = info["episode_summary"]
    assert s["tokens"] == tr.n and s["finish_reason"] == "eos"
    with pytest.raises(RuntimeError, match="reset"):
        env.step(0)


def test_observation_uses_signals_at_current_position() -> None:
    tr = synthetic_trace(60, seed=9)
    env = SpecKVReplayEnv(traces=[tr], cost_model=CM)
    obs, _ = env.reset(seed=0)
    assert obs[:3].tolist() == [tr.sig_top1[0], tr.sig_entropy[0], tr.sig_margin[0]]
    obs, *_, info = env.step(3)
    p = info["position"]
    assert obs[:3].tolist() == [tr.sig_top1[p], tr.sig_entropy[p], tr.sig_margin[p]]
    assert obs[8] == np.float32(p / tr.max_new_tokens)


@pytest.mark.parametrize("reward", ["cost", "tokens", "time"])
def test_fast_path_identical_to_base_step(reward: str) -> None:
    ds, cms = _dataset(), _cms()
    fast = SpecKVReplayEnv(traces=ds, cost_models=cms, reward=reward)
    slow = SpecKVReplayEnv(traces=ds, cost_models=cms, reward=reward)
    slow._trace_backend = None  # the generic SpecKVBaseEnv.step path
    rng = np.random.default_rng(1)
    for ep in range(len(ds)):
        o1, i1 = fast.reset(seed=ep, options={"episode": ep})
        o2, i2 = slow.reset(seed=ep, options={"episode": ep})
        assert np.array_equal(o1, o2)
        done = False
        while not done:
            a = int(rng.integers(9))
            r1 = fast.step(a)
            r2 = SpecKVBaseEnv.step(slow, a)
            assert np.array_equal(r1[0], r2[0]) and r1[0].dtype == np.float32
            assert r1[1:4] == r2[1:4] and type(r1[1]) is float
            assert r1[4] == r2[4]
            done = r1[2] or r1[3]


def test_seeded_determinism_through_make() -> None:
    def run(seed: int) -> list:
        env = gym.make("SpecKVReplay-v0", traces=_dataset(), cost_models=_cms())
        obs, info = env.reset(seed=seed)
        env.action_space.seed(seed)
        rec = [info["trace_id"]]
        for _ in range(300):
            obs, r, te, tr, info = env.step(env.action_space.sample())
            rec.append((obs.tobytes(), r))
            if te or tr:
                obs, info = env.reset()
                rec.append(info["trace_id"])
        return rec

    assert run(3) == run(3)
    assert run(3) != run(4)


def test_gammas_and_filters() -> None:
    env = SpecKVReplayEnv(traces=_dataset(), cost_models=_cms(), gammas=(0, 2, 4), compression="int8")
    assert isinstance(env.action_space, gym.spaces.Discrete) and env.action_space.n == 3
    assert isinstance(env.backend, TraceBackend)
    assert all(t.compression == "int8" for t in env.backend.traces)
    _, info = env.reset(seed=0)
    _, _, _, _, info = env.step(2)
    assert info["requested_gamma"] == 4
    with pytest.raises(ValueError, match="gamma_max"):
        SpecKVReplayEnv(traces=_dataset(), cost_models=_cms(), gammas=(0, 9))
    with pytest.raises(ValueError, match="no traces left"):
        SpecKVReplayEnv(traces=_dataset(), cost_models=_cms(), task="nope")
    with pytest.raises(ValueError, match=r"no cost model for trace .*compression 'int8'"):
        SpecKVReplayEnv(traces=_dataset(), cost_models={"fp16": CM})


def test_logs_folder_with_cost_models(tmp_path) -> None:
    from replay.trace import TraceWriter

    with TraceWriter(tmp_path) as w:
        for t in _dataset():
            w.write(t)
        for c, cm in _cms().items():
            cm.compression = c
            w.save_cost_model(cm)
    env = gym.make("SpecKVReplay-v0", logs=tmp_path, split="train")
    env.reset(seed=0)
    u = env.unwrapped
    assert isinstance(u, SpecKVReplayEnv) and isinstance(u.backend, TraceBackend)
    assert all(t.split == "train" for t in u.backend.traces)


def test_default_logs_error_when_none_shipped(monkeypatch, tmp_path) -> None:
    import replay.env as renv

    monkeypatch.setattr(renv, "DEFAULT_TRACES_DIR", tmp_path / "none")
    with pytest.raises(FileNotFoundError, match="no default replay data is shipped yet.*logs="):
        SpecKVReplayEnv()


def test_import_does_not_pull_torch() -> None:
    code = (
        "import sys, gymnasium as gym, speckv_env, replay.env, replay.vector, replay.oracle\n"
        "from replay.trace import synthetic_dataset\nfrom speckv_env.core import CostModel\n"
        "e = gym.make('SpecKVReplay-v0', traces=synthetic_dataset(2), cost_model=CostModel.unit())\n"
        "e.reset(seed=0); e.step(1)\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_docstring_example_runs() -> None:
    import doctest

    import replay.env as renv

    finder = doctest.DocTestFinder()
    runner = doctest.DocTestRunner()
    for t in finder.find(renv.SpecKVReplayEnv, "SpecKVReplayEnv", globs={}):
        runner.run(t)
    assert runner.failures == 0 and runner.tries >= 5
