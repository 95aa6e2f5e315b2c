"""Observation version 2 (issue 14 item 3): five pre-decision features after version 1's values.

One function (``speckv_env.core.pre_decision_features``) computes them for every env: checked here
against hand-computed values; the live env against a freshly recorded ``speckv-trace/2`` trace,
bit for bit, in both action modes; the vector env against the scalar env; both checkers; the
errors on data that cannot supply version 2; and agents' version bookkeeping.
"""

from __future__ import annotations

import random
import warnings
from dataclasses import replace
from typing import Any

import gymnasium as gym
import numpy as np
import pytest
import torch
from tiny_models import make_tiny_pair

import speckv_env  # noqa: F401  (registers the envs)
from replay.backend import trace_features
from replay.env import SpecKVReplayEnv
from replay.trace import synthetic_dataset, write_traces
from replay.vector import SpecKVReplayVectorEnv
from speckv_env.base_env import SpecKVBaseEnv
from speckv_env.core import (
    LOOKUP_FEATURE_NGRAM,
    OBS_DIM,
    OBS_SPEC,
    OBS_SPECS,
    OBS_V2_FEATURES,
    TOKEN_OBS_SPEC,
    CostModel,
    obs_dim,
    obs_spec,
    pre_decision_features,
)

CMS = {"fp16": CostModel.unit(), "nf4": CostModel.unit(draft_ratio=0.25, verify_slope=0.02)}
NAN = float("nan")


def _ds(seed: int = 0, n: int = 10):
    """Synthetic /2 traces whose prompts repeat their answers' tokens, so that the lookup matches
    (and agrees with the draft's top-1 exactly where a greedy draft was accepted)."""
    ds = synthetic_dataset(
        n, n_range=(5, 60), seed=seed, compressions=("fp16", "nf4"), modes=("greedy", "sample"), rollouts=True
    )
    for i, t in enumerate(ds):
        if i % 3:  # every third keeps its random prompt (lookup rarely matches)
            t.prompt_tokens = np.resize(t.tokens, t.prompt_len).astype(np.int32)
    ds[0].sig_entropy[:] = 13.5  # above the bound: clipped alike
    ds[1].tgt_entropy[:] = 12.5
    return ds


# ---- the spec and the one function -------------------------------------------------------------


def test_spec_versions_extend_version_1() -> None:
    assert OBS_SPECS[1] == OBS_SPEC and OBS_SPECS[2][:OBS_DIM] == OBS_SPEC
    assert OBS_SPECS[2][OBS_DIM:] == OBS_V2_FEATURES
    assert [s[0] for s in OBS_V2_FEATURES] == [
        "lookup_match",
        "lookup_agrees",
        "target_top1",
        "target_entropy",
        "sampling",
    ]
    assert obs_spec(1, "token") == TOKEN_OBS_SPEC
    assert obs_spec(2, "token")[:18] == OBS_SPECS[2] and obs_spec(2, "token")[18:] == TOKEN_OBS_SPEC[OBS_DIM:]
    assert (obs_dim(1), obs_dim(2), obs_dim(1, "token"), obs_dim(2, "token")) == (13, 18, 16, 21)
    assert all(desc for *_, desc in OBS_V2_FEATURES)
    with pytest.raises(ValueError, match="obs_version must be one of"):
        obs_dim(3)


def test_features_against_hand_computed_values() -> None:
    # context: prompt [5, 6, 7, 9] then emitted [5, 6]; positions index the context
    ctx = [5, 6, 7, 9, 5, 6, 7, 5, 6]
    #           pos 4: suffix [9] never earlier          -> no match
    #           pos 6: suffix [9, 5, 6] ... longest earlier [5, 6] at 0..1 -> proposal 7, length 2
    #           pos 7: suffix [5,6,7] occurred at 0..2    -> proposal 9, length 3
    #           pos 9: suffix [7,5,6] never; [5,6] latest at 4..5 -> proposal 7, length 2
    out = pre_decision_features(
        ctx, [4, 6, 7, 9], [7, 7, 3, 8], [NAN, 0.25, 0.5, 1.5], [NAN, 2.0, 13.0, 0.1], sampling=True
    )
    assert out.dtype == np.float32 and out.shape == (4, 5)
    want = np.array(
        [
            [0 / 8, 0, 0.0, 0.0, 1],  # first decision: nothing verified yet -> 0, 0
            [2 / 8, 1, 0.25, 2.0, 1],  # lookup proposes 7, the draft's top-1 is 7
            [3 / 8, 0, 0.5, 12.0, 1],  # proposes 9, draft says 3; entropy clipped to 12
            [2 / 8, 0, 1.0, 0.1, 1],  # proposes 7, draft says 8; top-1 clipped to 1
        ],
        dtype=np.float32,
    )
    np.testing.assert_array_equal(out, want)
    assert LOOKUP_FEATURE_NGRAM == 8
    # many positions take the one-pass table, a few the vectorised search: the same answers
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 5, 200)
    pos = np.arange(150, 200)
    arg = rng.integers(0, 5, 50)
    t1, h = rng.random(50).astype(np.float32), rng.random(50).astype(np.float32)
    many = pre_decision_features(ids, pos, arg, t1, h, False)
    few = np.concatenate(
        [
            pre_decision_features(ids, pos[i : i + 1], arg[i : i + 1], t1[i : i + 1], h[i : i + 1], False)
            for i in range(50)
        ]
    )
    np.testing.assert_array_equal(many, few)
    assert (many[:, 0] > 0).all() and 0 < many[:, 1].sum() < 50 and (many[:, 4] == 0).all()


def test_trace_features_follow_the_trace_columns() -> None:
    tr = _ds()[1]  # greedy, prompt repeats the answer
    f = trace_features(tr)
    assert f.shape == (tr.n, 5)
    assert f[0, 2] == 0.0 and f[0, 3] == 0.0  # nothing verified at t = 0
    np.testing.assert_array_equal(f[1:, 2], tr.tgt_top1[:-1])
    np.testing.assert_array_equal(f[1:, 3], np.minimum(tr.tgt_entropy[:-1], 12.0))
    assert set(f[:, 4].tolist()) == {1.0 if tr.mode == "sample" else 0.0}
    assert (f[:, 0] > 0).any() and (f[:, 1] > 0).any()


# ---- replay: fast path, generic path, vector env -------------------------------------------------


@pytest.mark.parametrize("control", ["step", "token"])
def test_replay_fast_path_equals_generic_path(control: str) -> None:
    ds = _ds()
    fast = SpecKVReplayEnv(traces=ds, cost_models=CMS, control=control, obs_version=2)
    slow = SpecKVReplayEnv(traces=ds, cost_models=CMS, control=control, obs_version=2)
    slow._trace_backend = None
    rng = np.random.default_rng(3)
    for ep in range(len(ds)):
        o1, _ = fast.reset(options={"episode": ep})
        o2, _ = slow.reset(options={"episode": ep})
        assert o1.shape == (obs_dim(2, control),) and np.array_equal(o1, o2)
        f = trace_features(ds[ep])
        np.testing.assert_array_equal(o1[OBS_DIM : OBS_DIM + 5], f[0])
        done = False
        while not done:
            a = int(rng.integers(fast.action_space.n))  # type: ignore[attr-defined]
            r1, r2 = fast.step(a), SpecKVBaseEnv.step(slow, a)
            assert np.array_equal(r1[0], r2[0]) and r1[1:4] == r2[1:4]
            assert fast.observation_space.contains(r1[0])
            # the features are those of the current step's start (or the last one's once ended)
            done = r1[2] or r1[3]
            if not done:  # every decision of a step shows its start's features (a draft's position is it)
                np.testing.assert_array_equal(r1[0][OBS_DIM : OBS_DIM + 5], f[r1[4]["position"]])
    # version 1 of the same episode and decisions is version 2 without the five features
    v1 = SpecKVReplayEnv(traces=ds, cost_models=CMS, control=control)
    o1, _ = v1.reset(options={"episode": 2})
    o2, _ = fast.reset(options={"episode": 2})
    done = False
    while True:
        np.testing.assert_array_equal(o1, np.delete(o2, np.s_[OBS_DIM : OBS_DIM + 5]))
        if done:
            break
        a = int(rng.integers(fast.action_space.n))  # type: ignore[attr-defined]
        o1, _, te, tu, _ = v1.step(a)
        o2, *_ = fast.step(a)
        done = te or tu


@pytest.mark.parametrize(
    ("control", "lookahead"), [("step", True), ("token", True), ("token", False)], ids=["step", "token", "token-dtd"]
)
@pytest.mark.parametrize("autoreset", ["next-step", "same-step"])
def test_vector_equals_scalar(control: str, lookahead: bool, autoreset: str) -> None:
    ds, E = _ds(1), 6
    kw: dict[str, Any] = {"traces": ds, "cost_models": CMS, "control": control, "obs_version": 2}
    if not lookahead:
        kw["lookahead"] = False  # token mode's draft-then-decide variant
    vec = SpecKVReplayVectorEnv(E, autoreset_mode=autoreset, **kw)
    singles = [SpecKVReplayEnv(**kw) for _ in range(E)]
    obs, _ = vec.reset(seed=0, options={"episodes": list(range(E))})
    assert obs.shape == (E, obs_dim(2, control)) and obs.dtype == np.float32
    for e, env in enumerate(singles):
        o, _ = env.reset(options={"episode": e})
        assert np.array_equal(o, obs[e])
    rng = np.random.default_rng(2)
    pending = np.zeros(E, dtype=bool)
    ends = 0
    for _ in range(400):
        a = rng.integers(vec.single_action_space.n, size=E)  # type: ignore[attr-defined]
        if control == "token":
            a = (rng.random(E) < 0.75).astype(np.int64)
        obs, rew, term, trunc, info = vec.step(a)
        eps = vec.episode_index
        for e, env in enumerate(singles):
            if pending[e]:  # next-step autoreset: the vector env started episode eps[e]
                o, _ = env.reset(options={"episode": int(eps[e])})
                assert np.array_equal(o, obs[e]) and rew[e] == 0.0
                pending[e] = False
                continue
            o, r, te, tr, _ = env.step(int(a[e]))
            assert r == rew[e] and te == term[e] and tr == trunc[e]
            if te or tr:
                ends += 1
                if autoreset == "same-step":
                    assert np.array_equal(o, info["final_obs"][e])
                    o2, _ = env.reset(options={"episode": int(eps[e])})
                    assert np.array_equal(o2, obs[e])
                else:
                    assert np.array_equal(o, obs[e])
                    pending[e] = True
            else:
                assert np.array_equal(o, obs[e]), (e, o, obs[e])
    assert ends > 10
    assert vec.observation_space.contains(obs)


def test_replay_checkers_pass_with_zero_warnings() -> None:
    from gymnasium.utils.env_checker import check_env as gym_check_env
    from stable_baselines3.common.env_checker import check_env as sb3_check_env

    for control in ("step", "token"):
        env = gym.make("SpecKVReplay-v0", traces=_ds(), cost_models=CMS, control=control, obs_version=2)
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            gym_check_env(env.unwrapped, skip_render_check=True)
            sb3_check_env(env)
        assert not w, [str(x.message) for x in w]


# ---- data that cannot supply version 2 ------------------------------------------------------------


def test_version_2_on_v1_traces_and_step_logs_names_the_file(tmp_path) -> None:
    path = write_traces(tmp_path / "old.parquet", synthetic_dataset(3))
    for make in (SpecKVReplayEnv, lambda **kw: SpecKVReplayVectorEnv(2, **kw)):
        with pytest.raises(ValueError, match=r"obs_version=2 needs speckv-trace/2.*old\.parquet"):
            make(logs=path, cost_model=CostModel.unit(), obs_version=2)
        make(logs=path, cost_model=CostModel.unit())  # version 1 (the default) still replays them
    with pytest.raises(ValueError, match=r"obs_version=2 needs full-information.*speckv-paper.*step log"):
        SpecKVReplayEnv(source="speckv-paper", obs_version=2)
    from replay.importers import import_speckv_paper, write_step_log

    steps, _ = import_speckv_paper()
    folder = tmp_path / "steps"
    write_step_log(steps[steps["run_id"] == steps["run_id"].iloc[0]], folder)
    with pytest.raises(ValueError, match=r"obs_version=2 needs full-information.*steps.*step log"):
        SpecKVReplayEnv(logs=folder, obs_version=2)
    with pytest.raises(ValueError, match="obs_version must be one of"):
        SpecKVReplayEnv(traces=_ds(), cost_models=CMS, obs_version=3)


# ---- live == replay, bit for bit, on a tiny exact pair ----------------------------------------------


@pytest.fixture(scope="module")
def exact_pair():
    """A tiny random pair over the real tokenizer, with row-invariant forwards (exact)."""
    from speckv_env import invariant
    from speckv_env.models import load_tokenizer
    from speckv_env.pair import ModelPair

    tok = load_tokenizer(None)
    target, draft = make_tiny_pair(vocab=49152, hidden=32, noise=0.03, seed=4)
    for m in (target, draft):
        m.config.eos_token_id = tok.eos_token_id
        m.generation_config.eos_token_id = tok.eos_token_id
        invariant.make_row_invariant(m)
    return ModelPair(target, draft, tok, "tiny-target", "tiny-draft", "fp32", torch.device("cpu"), exact=True)


def _live(pair, temperature, control, max_new_tokens=24, lookahead=True):
    return gym.make(
        "SpecKV-v0",
        pair=pair,
        cost_model=CostModel.unit(),
        split="test",
        task="math",
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        control=control,
        obs_version=2,
        **({} if lookahead else {"lookahead": False}),
    )


def _record(pair, prompt, temperature, seed, max_new_tokens=24):
    from speckv_env.app.profile import record_episode
    from speckv_env.engine import SpeculativeEngine

    eng = SpeculativeEngine(pair.target, pair.draft, temperature=temperature, eos_token_id=pair.eos_token_id)
    mode = "sample" if temperature else "greedy"
    return record_episode(eng, pair, prompt, max_new_tokens=max_new_tokens, gamma_max=8, mode=mode, seed=seed)


@pytest.mark.parametrize(
    ("control", "lookahead", "temperature"),
    [("step", True, 0.0), ("step", True, 0.7), ("token", True, 0.0), ("token", True, 0.7), ("token", False, 0.7)],
)
def test_live_v2_observations_equal_replay_bit_for_bit(exact_pair, temperature, control, lookahead):
    live = _live(exact_pair, temperature, control, lookahead=lookahead)
    prompts = live.unwrapped.backend.prompts
    matched = 0
    for ep in range(2):
        seed = 700 + ep
        tr = _record(exact_pair, prompts[ep], temperature, seed)
        kw: dict[str, Any] = {} if lookahead else {"lookahead": False}
        rep = SpecKVReplayEnv(traces=[tr], cost_model=CostModel.unit(), control=control, obs_version=2, **kw)
        o_l, _ = live.reset(options={"episode": ep, "episode_seed": seed})
        o_r, _ = rep.reset(options={"episode": 0})
        assert o_l.shape == (obs_dim(2, control),) and o_l.dtype == np.float32
        np.testing.assert_array_equal(o_l, o_r)
        assert o_l[OBS_DIM + 2] == 0.0 and o_l[OBS_DIM + 3] == 0.0  # nothing verified yet
        assert o_l[OBS_DIM + 4] == (1.0 if temperature else 0.0)
        matched += o_l[OBS_DIM] > 0
        rng = random.Random(seed)
        done, steps = False, 0
        while not done:
            a = int(rng.random() < 0.7) if control == "token" else rng.randrange(live.action_space.n)
            o_l, r_l, te, tu, i_l = live.step(a)
            o_r, r_r, te_r, tu_r, i_r = rep.step(a)
            np.testing.assert_array_equal(o_l, o_r)
            assert list(i_l["tokens"]) == list(i_r["tokens"]) and (te, tu) == (te_r, tu_r)
            steps += "gamma" in i_l
            matched += o_l[OBS_DIM] > 0
            done = te or tu
        assert live.unwrapped.emitted_tokens == tr.tokens.tolist()
        # the target's signals after the last verification are the engine's own record of them
        eng = live.unwrapped.engine
        assert steps > 3 and eng.target_signals().top1 == pytest.approx(float(tr.tgt_top1[-1]), abs=0)
    assert matched > 0  # the lookup fired (the chat template repeats itself: '\\n' then '<|im_start|>')


def test_live_checkers_pass_with_zero_warnings(exact_pair) -> None:
    from gymnasium.utils.env_checker import check_env as gym_check_env
    from stable_baselines3.common.env_checker import check_env as sb3_check_env

    for control in ("step", "token"):
        env = _live(exact_pair, 0.7, control, max_new_tokens=12)
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            gym_check_env(env.unwrapped, skip_render_check=True)
            sb3_check_env(env)
        assert not w, [str(x.message) for x in w]


# ---- agents: the version they decide on, saved with them ---------------------------------------------


def test_agent_version_round_trip_and_refusal(tmp_path) -> None:
    import json

    from agents import load_agent, make_agent, train_agent
    from agents.base import AgentFormatError

    ds = _ds(2)
    v1_env = SpecKVReplayEnv(traces=ds, cost_models=CMS)
    v2_env = SpecKVReplayEnv(traces=ds, cost_models=CMS, obs_version=2)
    # a JSON agent (LinUCB: its context has the observation's width) and a safetensors one (MLP)
    lin: Any = train_agent("linucb", env_factory=lambda: v2_env, steps=300, progress=False)
    mlp: Any = train_agent(
        "speckv_mlp", traces=ds, env_kwargs={"cost_models": CMS, "obs_version": 2}, steps=400, progress=False
    )
    for agent, name in ((lin, "lin.json"), (mlp, "mlp.safetensors")):
        assert agent.obs_version == 2 and agent.obs_dim == 18
        path = agent.save(tmp_path / name)
        back = load_agent(path)
        assert back.obs_version == 2 and type(back) is type(agent)
        obs, _ = v2_env.reset(options={"episode": 0})
        batch = np.stack([obs, obs])
        np.testing.assert_array_equal(back.act_batch(batch), agent.act_batch(batch))
        back.bind(v2_env)
        with pytest.raises(ValueError, match=r"observation version 2.*observes version 1"):
            back.bind(v1_env)
        with pytest.raises(ValueError, match=r"observation version 2.*version 1"):
            back.act_batch(np.zeros((2, OBS_DIM), dtype=np.float32))
    assert lin.d == 19 and mlp.params["W1"].shape[1] == 18
    # a version 1 agent with observation-shaped state refuses a version 2 env the same way
    lin1 = make_agent("linucb")
    with pytest.raises(ValueError, match=r"observation version 1.*observes version 2"):
        lin1.bind(v2_env)
    # agents that read only values every version has in the same place (rules, context-free
    # bandits, per-context bandits of those) take the env's version, and decide as on version 1
    obs1, _ = v1_env.reset(options={"episode": 0})
    obs2, _ = v2_env.reset(options={"episode": 0})
    np.testing.assert_array_equal(obs2[:OBS_DIM], obs1)
    for name, kw in (("fixed", {"g": 3}), ("cost_aware", {}), ("hf_heuristic", {}), ("ucb1", {}), ("per_context", {})):
        a1, a2 = make_agent(name, **kw), make_agent(name, **kw)
        a1.bind(v1_env)
        a2.bind(v2_env)
        assert a1.obs_version == 1 and a2.obs_version == 2 and not a2.obs_state, name
        assert a2.act(obs2) == a1.act(obs1), name
        np.testing.assert_array_equal(a2.act_batch(np.stack([obs2, obs2])), a1.act_batch(np.stack([obs1, obs1])))
    assert make_agent("per_context", bandit="linucb").obs_state
    # files saved before versions existed hold no obs_version: version 1
    p = make_agent("linucb").save(tmp_path / "old.json")
    doc = json.loads(p.read_text())
    assert doc.pop("obs_version") == 1
    p.write_text(json.dumps(doc))
    assert load_agent(p).obs_version == 1
    doc["obs_version"] = 7
    p.write_text(json.dumps(doc))
    with pytest.raises(AgentFormatError, match="old.json.*obs_version must be one of"):
        load_agent(p)


def test_learned_agents_train_and_act_on_version_2() -> None:
    from agents import SurvivalController, SurvivalTokenController, make_agent, train_agent

    ds = _ds(3)
    train = [t for t in ds if t.split == "train"] or ds
    for control, cls in (("step", SurvivalController), ("token", SurvivalTokenController)):
        env = SpecKVReplayEnv(traces=ds, cost_models=CMS, control=control, obs_version=2)
        agent: Any = make_agent(cls.kind, obs_version=2, iterations=1, refits=0)
        agent.fit(train, CMS)
        assert agent.weights.shape[1] == 19  # the five features are in the hazard model
        agent.bind(env)
        obs, _ = env.reset(options={"episode": 1})
        done = False
        while not done:
            a = agent.act(obs)
            assert a == agent.act_batch(obs[None])[0]
            obs, _, te, tu, _ = env.step(a)
            done = te or tu
    # token mode's rules read the last three values, whatever the version
    env = SpecKVReplayEnv(traces=ds, cost_models=CMS, control="token", obs_version=2)
    rule = make_agent("hf_confidence", obs_version=2).bind(env)
    obs, _ = env.reset(options={"episode": 0})
    obs, *_ = env.step(1)
    assert obs[-3] > 0 and rule.act(obs) == int(obs[-1] >= 0.4)
    # PPO: its policy and statistics take the version's width, and it trains on the vector env
    ppo: Any = train_agent(
        "ppo",
        traces=ds,
        env_kwargs={"cost_models": CMS, "obs_version": 2},
        steps=256,
        n_envs=2,
        agent_kwargs={"n_steps": 128, "batch_size": 64, "n_epochs": 1},
        progress=False,
    )
    assert ppo.obs_version == 2 and ppo.spaces()[0].shape == (18,)
    obs, _ = SpecKVReplayEnv(traces=ds, cost_models=CMS, obs_version=2).reset(options={"episode": 0})
    assert 0 <= ppo.act(obs) < 9


# ---- speckv compare: --obs-version ------------------------------------------------------------------


def test_compare_runs_every_policy_on_version_2_and_records_it(tmp_path) -> None:
    import json

    from speckv_env.app.compare import run_comparison

    trs = synthetic_dataset(
        30, rollouts=True, modes=("greedy", "sample"), compressions=("fp16", "nf4"), n_range=(20, 60), seed=5
    )
    pol = ("fixed", "oracle", "cost_aware", "speckv_mlp", "linucb", "survival", "ppo", "token")
    kw: dict[str, Any] = {"quick": True, "splits": ("heldout",), "policies": pol, "seeds": 1, "ppo_token_steps": 2048}
    r = run_comparison(traces=trs, cost_models=CMS, out_dir=tmp_path / "auto", **kw)  # every trace /2: version 2
    assert r["obs_version"] == 2 and r["config"]["obs_version"] == 2 and r["data"]["obs_version"] == 2
    assert "Observations: version 2" in (tmp_path / "auto" / "report.md").read_text()
    assert json.loads((tmp_path / "auto" / "results.json").read_text())["obs_version"] == 2
    h = r["splits"]["heldout"]["policies"]
    assert {"mlp-time", "linucb", "survival(train)", "ppo", "ppo-token(train)", "survival-token(train)"} <= set(h)
    r1 = run_comparison(traces=trs, cost_models=CMS, out_dir=tmp_path / "v1", obs_version=1, **kw)
    assert r1["obs_version"] == 1 and "Observations: version 1" in (tmp_path / "v1" / "report.md").read_text()
    # the fixed gammas and the oracle do not read the observation: the same under both versions
    for name in ("fixed-4", "oracle"):
        assert h[name]["subsets"]["all"] == r1["splits"]["heldout"]["policies"][name]["subsets"]["all"]


def test_compare_version_2_on_version_1_traces_is_an_error(tmp_path) -> None:
    import subprocess
    import sys

    from speckv_env.app.compare import run_comparison

    folder = tmp_path / "old"
    folder.mkdir()
    write_traces(folder / "part.parquet", synthetic_dataset(12))
    replace(CostModel.unit(), compression="fp16").save(folder / "cost-fp16.json")
    with pytest.raises(ValueError, match=r"obs_version=2 needs speckv-trace/2.*part\.parquet"):
        run_comparison(logs=folder, out_dir=tmp_path / "x", quick=True, obs_version=2, splits=("heldout",))
    with pytest.raises(ValueError, match="SpecKV paper's step logs supply version 1"):
        run_comparison(source="speckv-paper", out_dir=tmp_path / "y", quick=True, obs_version=2)
    cmd = [sys.executable, "-m", "speckv_env.app.cli", "compare", "--out", str(tmp_path / "z"), "--obs-version", "2"]
    r = subprocess.run([*cmd, "--logs", "speckv-paper"], capture_output=True, text=True, timeout=300)
    assert r.returncode != 0 and "--obs-version 2 needs speckv-trace/2" in r.stderr
