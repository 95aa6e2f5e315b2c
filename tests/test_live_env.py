"""SpecKV-v0 (live) on tiny random models with the real SmolLM2 tokenizer: checkers, exact
record/replay, crash-safe profiling with --resume, step-log recording."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
import warnings

import gymnasium as gym
import numpy as np
import pytest
import torch
from conftest import requires_default
from tiny_models import make_tiny_smol_pair

import speckv_env  # noqa: F401
from speckv_env.core import CostModel

pytestmark = requires_default

VOCAB = 49152


@pytest.fixture(scope="module")
def tiny_smol_pair():
    return make_tiny_smol_pair()


def _env(pair, **kw):
    kw.setdefault("cost_model", CostModel.unit())
    kw.setdefault("split", "test")
    kw.setdefault("task", "math")
    kw.setdefault("max_new_tokens", 24)
    return gym.make("SpecKV-v0", pair=pair, **kw)


def test_checkers_pass_with_zero_warnings(tiny_smol_pair):
    from gymnasium.utils.env_checker import check_env as gym_check
    from stable_baselines3.common.env_checker import check_env as sb3_check

    env = _env(tiny_smol_pair)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        gym_check(env.unwrapped)
        sb3_check(env.unwrapped)
    assert not [str(x.message) for x in w]


def test_tokens_observations_rewards_are_deterministic(tiny_smol_pair):
    runs = []
    for _ in range(2):
        env = _env(tiny_smol_pair, temperature=0.7)
        obs, _ = env.reset(seed=3)
        trace = [obs.tolist()]
        rng = random.Random(0)
        done = False
        while not done:
            obs, r, te, tr, info = env.step(rng.randint(0, 8))
            trace.append((obs.tolist(), r, info["tokens"], info["accepted"]))
            done = te or tr
        runs.append(trace)
    assert runs[0] == runs[1]
    assert gym.spec("SpecKV-v0").nondeterministic  # only the measured times in info vary


def test_invalid_actions_and_info(tiny_smol_pair):
    env = _env(tiny_smol_pair)
    env.reset(seed=0)
    with pytest.raises(ValueError, match=r"invalid action 9: must be in 0..8"):
        env.unwrapped.step(9)
    with pytest.raises(ValueError, match="integer index"):
        env.unwrapped.step(1.5)
    obs, r, term, trunc, info = env.step(3)
    assert env.observation_space.contains(obs)
    for k in ("gamma", "accepted", "tokens", "modelled_time", "measured_time", "draft_time", "verify_time"):
        assert k in info
    assert info["measured_time"] > 0 and len(info["tokens"]) == info["accepted"] + 1


@pytest.fixture(scope="module")
def tiny_smol_lookup_pair(tiny_smol_pair):
    """The same target with a draft that mixes in context lookup (speckv_env/lookup.py)."""
    from tiny_models import make_tiny_lookup_draft

    from speckv_env.pair import ModelPair

    p = tiny_smol_pair
    draft = make_tiny_lookup_draft(p.target, noise=0.03)
    draft.generation_config.eos_token_id = p.tokenizer.eos_token_id
    return ModelPair(p.target, draft, p.tokenizer, "tiny-target", "tiny-lookup-draft", "fp32", torch.device("cpu"))


@pytest.mark.parametrize("draft_kind", ["plain", "lookup"])
@pytest.mark.parametrize("temperature", [0.0, 0.7])
def test_record_then_replay_counterfactual_is_exact(tiny_smol_pair, tiny_smol_lookup_pair, temperature, draft_kind):
    """A trace recorded under one gamma schedule answers another schedule exactly: replaying
    live episodes' random gamma choices gives identical accepted counts and tokens, step by step.
    Holds for a draft with context lookup too (its proposal depends on the prefix only)."""
    from replay.env import SpecKVReplayEnv
    from speckv_env.app.profile import record_episode
    from speckv_env.engine import SpeculativeEngine

    pair = tiny_smol_pair if draft_kind == "plain" else tiny_smol_lookup_pair
    env = _env(pair, temperature=temperature)
    prompts = env.unwrapped.backend.prompts
    eng = SpeculativeEngine(pair.target, pair.draft, temperature=temperature, eos_token_id=pair.eos_token_id)
    mode = "sample" if temperature else "greedy"
    for ep in range(3):
        seed = 1000 + ep
        tr = record_episode(eng, pair, prompts[ep], max_new_tokens=24, gamma_max=8, mode=mode, seed=seed)
        assert tr.meta["draft_fingerprint"] == pair.draft_fingerprint
        renv = SpecKVReplayEnv(traces=[tr], cost_model=CostModel.unit())
        o_live, _ = env.reset(options={"episode": ep, "episode_seed": seed})
        o_rep, _ = renv.reset(options={"episode": 0})
        np.testing.assert_allclose(o_live, o_rep, atol=1e-6)
        rng = random.Random(ep)
        done = False
        while not done:
            a = rng.randint(0, 8)
            o_live, r_live, te, tr_, i_live = env.step(a)
            o_rep, r_rep, te2, tr2, i_rep = renv.step(a)
            assert (i_live["gamma"], i_live["accepted"], i_live["tokens"]) == (
                i_rep["gamma"],
                i_rep["accepted"],
                list(i_rep["tokens"]),
            )
            assert r_live == pytest.approx(r_rep) and (te, tr_) == (te2, tr2)
            np.testing.assert_allclose(o_live, o_rep, atol=1e-5)
            done = te or tr_


def test_record_steps_wrapper_writes_a_censored_step_log(tiny_smol_pair, tmp_path):
    from replay.importers import read_step_log
    from replay.recorder import RecordSteps

    env = RecordSteps(_env(tiny_smol_pair), tmp_path / "log")
    for ep in range(2):
        env.reset(options={"episode": ep})
        done = False
        while not done:
            _, _, te, tr, info = env.step(4)
            done = te or tr
    df = read_step_log(tmp_path / "log")
    assert df["run_id"].nunique() == 2 and (df["gamma"] == 4).all()
    assert (df["censored"] == (df["accepted"] >= df["drafted"])).all()
    assert (tmp_path / "log" / "cost-fp32.json").exists()


def _save_tiny(pair, folder):
    pair.target.save_pretrained(folder / "target")
    pair.draft.save_pretrained(folder / "draft")
    for n in ("target", "draft"):
        pair.tokenizer.save_pretrained(folder / n)
    return str(folder / "target"), str(folder / "draft")


def test_profile_is_crash_safe_and_resumes_without_duplicates_or_gaps(tiny_smol_pair, tmp_path):
    from replay.trace import read_traces

    t, d = _save_tiny(tiny_smol_pair, tmp_path)
    out = tmp_path / "traces"
    env = dict(os.environ, SPECKV_CACHE=str(tmp_path / "cache"))
    cmd = [
        sys.executable,
        "-m",
        "speckv_env.app.cli",
        "profile",
        "--target",
        t,
        "--draft",
        d,
        "--device",
        "cpu",
        "--compressions",
        "fp32",
        "--tasks",
        "math,code",
        "--splits",
        "test",
        "--modes",
        "greedy,sample",
        "--max-new-tokens",
        "24",
        "--out",
        str(out),
        "--threads",
        "1",
    ]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and len(list(out.glob("part-*.parquet"))) < 3:
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)  # kill -9 in the middle of the recording
    proc.wait()
    before = read_traces(out)
    assert 3 <= len(before) < 64
    subprocess.run(
        cmd + ["--resume"], env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=600
    )
    after = read_traces(out)
    ids = [tr.trace_id for tr in after]
    assert len(ids) == len(set(ids)) == 2 * 2 * 16  # 2 tasks x 16 test prompts x 2 modes
    old = {tr.trace_id: tr for tr in before}
    for tr in after:  # finished episodes were kept as they were
        if tr.trace_id in old:
            assert tr.equals(old[tr.trace_id])


def test_draft_fingerprint_tells_drafts_apart(tiny_smol_pair, tiny_smol_lookup_pair):
    from speckv_env.pair import model_fingerprint

    a, b = tiny_smol_pair.draft_fingerprint, tiny_smol_lookup_pair.draft_fingerprint
    assert a != b and len(a) == 12
    assert model_fingerprint(tiny_smol_pair.draft) == a  # deterministic
    assert model_fingerprint(tiny_smol_pair.target) != a


def test_engine_bench_compares_methods_and_restores_the_plans(tiny_smol_pair):
    import dataclasses

    from speckv_env import cpu_linear
    from speckv_env.app.bench_engine import bench_prompts, format_engine_table, run_engine_bench

    plan = {n: max(n, 2) + 1 for n in range(1, cpu_linear.MAX_ROWS + 1)}
    for m in (tiny_smol_pair.target, tiny_smol_pair.draft):
        shapes = {tuple(layer.weight.shape) for layer in m.modules() if type(layer) is torch.nn.Linear}
        cpu_linear.install(m, dict.fromkeys(shapes, plan))
    pair = dataclasses.replace(tiny_smol_pair, cpu_kernels=True)
    try:
        r = run_engine_bench(
            pair, prompts=bench_prompts()[:2], max_new_tokens=8, gammas_engine=(0, 2), gammas_hf=(1,), progress=False
        )
        assert r["outputs_identical"], r["output_mismatches"]  # every method, stock kernels included
        assert r["hf_target_tps"] > 0 and r["hf_target_stock_tps"] > 0 and set(r["engine_tps"]) == {"0", "2"}
        assert r["engine_speedup_vs_stock_target"] == pytest.approx(r["best_engine_tps"] / r["hf_target_stock_tps"])
        assert r["cpu_kernels"] and any("W@x.T/3" in line for line in r["cpu_linear_plans"])
        # the stock measurement took the plans off and put the same ones back
        assert cpu_linear.current_plans(pair.target) and all(
            p == plan for p in cpu_linear.current_plans(pair.target).values()
        )
        assert "stock CPU kernels" in format_engine_table(r)
    finally:
        cpu_linear.uninstall(tiny_smol_pair.target)
        cpu_linear.uninstall(tiny_smol_pair.draft)
