"""Agents: the interface, learning, save/load, fast paths, training and evaluation loops."""

from __future__ import annotations

import json
import math
import struct

import gymnasium as gym
import numpy as np
import pytest
from fixtures_agents import toy_env

import speckv_env  # noqa: F401  (registers the envs)
from agents import (
    AGENTS,
    UCB1,
    AgentFormatError,
    CostAwareAnalytic,
    FixedGamma,
    GammaTable,
    HFHeuristic,
    OracleAgent,
    PPOAgent,
    SpecKVMLP,
    evaluate_agent,
    load_agent,
    make_agent,
    summarize,
    train_agent,
)
from agents.training import collect_rollouts, run_online
from speckv_env.app.bench_agents import bench_agents
from speckv_env.core import OBS_DIM, OBS_INDEX, CostModel

GAMMAS = tuple(range(9))


def replay_env(n: int = 10, seed: int = 0, **kw):
    from replay.trace import synthetic_dataset

    return gym.make("SpecKVReplay-v0", traces=synthetic_dataset(n, seed=seed), cost_model=CostModel.unit(), **kw)


def obs_with(**fields) -> np.ndarray:
    o = np.zeros(OBS_DIM, np.float32)
    o[OBS_INDEX["compression_none"]] = 1.0
    o[OBS_INDEX["cost_ratio"]] = 0.1
    for k, v in fields.items():
        o[OBS_INDEX[k]] = v
    return o


def rollout_obs(env, n: int = 300, seed: int = 0) -> np.ndarray:
    return collect_rollouts(env, n, seed=seed)["obs"]


# ---- interface --------------------------------------------------------------------------


TOKEN_KINDS = {"hf_confidence", "svip", "adaedl", "specdecpp", "rule_bandit", "survival_token"}
"""Token mode's agents (``control = "token"``): they act on token-mode observations."""


def token_env(n: int = 6, seed: int = 0):
    from replay.trace import synthetic_dataset

    trs = synthetic_dataset(n, seed=seed, rollouts=True, modes=("greedy", "sample"))
    return gym.make("SpecKVReplay-v0", traces=trs, cost_model=CostModel.unit(), control="token")


def token_obs(env, n: int = 300, seed: int = 0) -> np.ndarray:
    """Token-mode observations of random draft/verify decisions."""
    rng = np.random.default_rng(seed)
    obs, _ = env.reset(seed=seed)
    out: list[np.ndarray] = []
    while len(out) < n:
        out.append(obs)
        obs, _, te, tu, _ = env.step(int(rng.random() < 0.7))
        if te or tu:
            obs, _ = env.reset()
    return np.asarray(out)


def test_registry_has_every_kind():
    assert (
        set(AGENTS)
        == {
            "fixed",
            "hf_heuristic",
            "cost_aware",
            "speckv_mlp",
            "epsilon_greedy",
            "ucb1",
            "thompson",
            "exp3",
            "linucb",
            "ppo",
            "oracle",
            "per_context",
            "survival",
        }
        | TOKEN_KINDS
    )
    with pytest.raises(ValueError, match="unknown agent"):
        make_agent("nope")


@pytest.mark.parametrize("name", sorted(set(AGENTS) - {"oracle"}))
def test_act_returns_valid_index_and_batch_matches(name):
    token = name in TOKEN_KINDS
    env = token_env(4) if token else replay_env(4)
    agent = make_agent(name)
    agent.bind(env)
    obs = token_obs(env, 64) if token else rollout_obs(env, 64)
    acts = [agent.act(o) for o in obs]
    assert all(isinstance(a, (int, np.integer)) and 0 <= a < env.action_space.n for a in acts)
    # randomised bandits draw per call; stateful token rules decide a step's tokens in sequence
    if name not in ("epsilon_greedy", "thompson", "exp3", "specdecpp", "rule_bandit", "survival_token"):
        assert np.array_equal(agent.act_batch(obs), np.array(acts))


def test_bind_rejects_mismatched_gammas():
    with pytest.raises(ValueError, match="differ"):
        FixedGamma(2, gammas=(0, 2, 4)).bind(replay_env(2))


# ---- HF heuristic --------------------------------------------------------------------------


def test_hf_heuristic_follows_plus2_minus1_rule():
    hf = HFHeuristic()
    gm = 8
    assert hf.gammas[hf.act(obs_with())] == 8  # transformers' default start (20), bounded to max gamma
    assert HFHeuristic(initial=5).gammas[HFHeuristic(initial=5).act(obs_with())] == 5
    for g in range(1, 9):
        full = hf.gammas[hf.act(obs_with(last_gamma=g / gm, last_full_accept=1.0))]
        part = hf.gammas[hf.act(obs_with(last_gamma=g / gm, last_full_accept=0.0))]
        assert full == min(g + 2, 8)
        assert part == max(1, g - 1)
    # in an env: every next gamma follows the rule from the previous step's outcome
    env = toy_env(alpha=0.75, n_episodes=2, length=200)
    obs, _ = env.reset(seed=0)
    prev = None
    done = False
    while not done:
        g = hf.gammas[hf.act(obs)]
        if prev is None:
            assert g == 8
        else:
            pg, pk = prev
            assert g == (min(pg + 2, 8) if pk == pg else max(1, pg - 1))
        obs, r, term, trunc, info = env.step(hf.act(obs))
        prev = (info["gamma"], info["accepted"])
        done = term or trunc
    # sparse gamma sets snap to the nearest gamma
    sparse = HFHeuristic(gammas=(0, 2, 4, 8))
    assert sparse.gammas[sparse.act(obs_with(last_gamma=4 / 8, last_full_accept=1.0))] == 4  # 6 -> 4 (tie: smaller)


# ---- cost-aware analytic and the gamma table ----------------------------------------------------


def test_gamma_table_is_exact_and_tokens_rule_picks_max():
    cm = CostModel.unit(8, 0.1, 0.05)
    t = GammaTable(cm, GAMMAS)
    rng = np.random.default_rng(0)
    for a in np.concatenate([rng.random(2000), [0.0, 1.0, 0.5]]):
        assert t.index(float(a)) == t.best_exact(float(a))
    assert np.array_equal(t.index_batch(np.array([0.1, 0.5, 0.9])), [t.best_exact(x) for x in (0.1, 0.5, 0.9)])
    assert t.choices == sorted(t.choices)  # more acceptance -> larger gamma
    tok = GammaTable(None, GAMMAS, rule="tokens")
    assert all(tok.index(float(a)) == 8 for a in np.linspace(1e-3, 1.0, 200))


def test_cost_aware_picks_larger_gamma_when_cheaper_or_more_accepted():
    agent = CostAwareAnalytic()  # cost from the observation's cost_ratio
    g = lambda **kw: agent.gammas[agent.act(obs_with(**kw))]
    alphas = [0.3, 0.5, 0.7, 0.8, 0.9, 0.95]
    by_alpha = [g(accept_ema=a, cost_ratio=0.1) for a in alphas]
    assert by_alpha == sorted(by_alpha) and by_alpha[-1] > by_alpha[0]
    ratios = [0.6, 0.3, 0.1, 0.03, 0.01]
    by_cost = [g(accept_ema=0.8, cost_ratio=c) for c in ratios]
    assert by_cost == sorted(by_cost) and by_cost[-1] > by_cost[0]
    # matches the brute-force argmax of expected_tokens_per_second
    cm = CostModel.unit(8, 0.1, 0.05)
    bound = CostAwareAnalytic(cost_model=cm)
    for a in alphas:
        best = max(GAMMAS, key=lambda x: (cm.expected_tokens_per_second(a, x), -x))
        assert bound.gammas[bound.act(obs_with(accept_ema=a))] == best


def test_cost_aware_beta_estimate_learns_alpha():
    env = toy_env(alpha=0.9, n_episodes=2, length=256, cost_model=CostModel.unit(8, 0.05, 0.02))
    agent = CostAwareAnalytic(estimate="beta")
    run_online(agent, env, 400)
    assert agent.alpha(None) == pytest.approx(0.9, abs=0.05)
    assert agent.gammas[agent.act(obs_with())] == 8


# ---- bandits ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["ucb1", "thompson", "epsilon_greedy", "exp3", "linucb"])
@pytest.mark.parametrize("alpha,draft,slope", [(0.9, 0.05, 0.02), (0.5, 0.25, 0.05), (0.7, 0.1, 0.05)])
def test_bandit_finds_the_best_gamma(name, alpha, draft, slope):
    cm = CostModel.unit(8, draft, slope)
    env = toy_env(alpha=alpha, cost_model=cm, n_episodes=4, length=256)
    agent = make_agent(name, seed=0)
    log = run_online(agent, env, 4000, seed=0)
    v = np.array([cm.expected_tokens_per_second(alpha, g) for g in GAMMAS])
    assert v[agent.best_arm()] >= 0.97 * v.max()
    # and late episodes beat the worst fixed gamma by a margin
    late = np.mean([r["tokens_per_second"] for r in log[-5:]])
    assert late > v.min() * 1.1


def test_dinkelbach_reward_beats_per_step_cost_reward():
    """The env's per-step 'cost' reward (lambda = 1/t_target) overrates long steps; the
    throughput (Dinkelbach) reward does not."""
    alpha, cm = 0.7, CostModel.unit(8, 0.1, 0.05)
    e = lambda g: (1 - alpha ** (g + 1)) / (1 - alpha)
    t = lambda g: cm.step_time(g, 0)  # accepted count does not change greedy step time here
    tput = max(GAMMAS, key=lambda g: e(g) / t(g))
    cost = max(GAMMAS, key=lambda g: e(g) - t(g) / cm.t_target)
    assert cost > tput  # analytic: 5 vs 3
    found = {}
    for mode in ("throughput", "env"):
        env = toy_env(alpha=alpha, cost_model=cm, n_episodes=4, length=256)
        agent = UCB1(reward_mode=mode, seed=0)
        run_online(agent, env, 4000, seed=0)
        found[mode] = agent.best_arm()
    v = [cm.expected_tokens_per_second(alpha, g) for g in GAMMAS]
    assert v[found["throughput"]] > v[found["env"]]


def test_bandits_are_seeded():
    env = toy_env(alpha=0.7, n_episodes=2)
    runs = []
    for _ in range(2):
        a = make_agent("thompson", seed=3)
        runs.append([r["tokens_per_second"] for r in run_online(a, env, 1500, seed=1)])
    assert runs[0] == runs[1]


# ---- SpecKV MLP ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained_mlp():
    cm = CostModel.unit(8, 0.1, 0.05)
    make = lambda: toy_env(regimes=(0.25, 0.92), n_episodes=16, length=256, cost_model=cm, seed=1)
    agent = train_agent("speckv_mlp", env_factory=make, steps=6000, seed=0, progress=False, fit_kwargs={"epochs": 40})
    return agent, make, cm


def test_mlp_learns_acceptance_and_beats_bad_fixed_gamma(trained_mlp):
    agent, make, cm = trained_mlp
    assert agent.train_log[-1]["loss"] < agent.train_log[0]["loss"]
    env = make()
    data = collect_rollouts(env, 3000, seed=5)
    # ground truth p_t for each logged observation: re-derive from the backend's episodes
    env2 = make()
    obs, _ = env2.reset(seed=5)
    rng = np.random.default_rng(5)
    truth, preds = [], []
    for _ in range(3000):
        truth.append(env2.unwrapped.backend.p[env2.unwrapped.backend.pos])
        preds.append(agent.predict_alpha(obs))
        obs, r, te, tr, info = env2.step(int(rng.integers(9)))
        if te or tr:
            obs, _ = env2.reset()
    corr = np.corrcoef(truth, preds)[0, 1]
    assert corr > 0.9, corr
    assert data["obs"].shape == (3000, OBS_DIM)
    mlp_tps = summarize(evaluate_agent(agent, make()))["tokens_per_second"]
    for bad in (0, 8):
        fixed_tps = summarize(evaluate_agent(FixedGamma(bad), make()))["tokens_per_second"]
        assert mlp_tps > 1.05 * fixed_tps
    # the context helps: better than the best single fixed gamma
    best_fixed = max(summarize(evaluate_agent(FixedGamma(g), make()))["tokens_per_second"] for g in GAMMAS)
    assert mlp_tps > best_fixed


def test_mlp_tokens_rule_always_picks_largest_gamma(trained_mlp):
    agent, make, cm = trained_mlp
    tok = SpecKVMLP(rule="tokens")
    tok.set_tensors(agent.get_tensors())
    obs = rollout_obs(make(), 500)
    assert set(tok.act_batch(obs).tolist()) == {8}
    assert len(set(agent.act_batch(obs).tolist())) > 1  # the time rule adapts


def test_mlp_fast_path_matches_torch(trained_mlp):
    agent, make, cm = trained_mlp
    obs = np.concatenate([rollout_obs(make(), 1500, seed=2), rollout_obs(replay_env(6), 500)])
    z_np = np.array([agent.predict_logit(o) for o in obs])
    z_torch = agent.predict_logit_torch(obs)
    np.testing.assert_allclose(z_np, z_torch, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(agent.predict_logit_batch(obs), z_torch, rtol=1e-5, atol=1e-5)
    agent.bind(make())
    fast = np.array([agent.act(o) for o in obs])
    assert np.array_equal(fast, agent.act_torch(obs))
    assert np.array_equal(fast, agent.act_batch(obs))


def test_mlp_on_replay_predicts_acceptance():
    env = replay_env(20, seed=3)
    agent = train_agent(
        "speckv_mlp", env_factory=lambda: env, steps=4000, seed=0, progress=False, fit_kwargs={"epochs": 30}
    )
    # predicted alpha vs the trace's actual first-token acceptance at that position
    obs, _ = env.reset(seed=0)
    rng = np.random.default_rng(0)
    pred, acc = [], []
    for _ in range(3000):
        b = env.unwrapped.backend
        pred.append(agent.predict_alpha(obs))
        acc.append(bool(b.trace.accept[b.position()]))
        obs, r, te, tr, _ = env.step(int(rng.integers(9)))
        if te or tr:
            obs, _ = env.reset()
    pred, acc = np.array(pred), np.array(acc)
    assert pred[acc].mean() > pred[~acc].mean() + 0.1


# ---- PPO --------------------------------------------------------------------------------------------


def test_replay_vec_env_adapter_is_an_sb3_vecenv():
    from stable_baselines3.common.vec_env import VecEnv

    from agents.training import make_vec_env
    from replay.trace import synthetic_dataset

    v = make_vec_env(n_envs=3, traces=synthetic_dataset(3), env_kwargs={"cost_model": CostModel.unit()})
    assert isinstance(v, VecEnv)
    obs = v.reset()
    assert obs.shape == (3, OBS_DIM)
    ends = 0
    for _ in range(150):
        obs, rew, done, infos = v.step(np.full(3, 8))
        assert obs.shape == (3, OBS_DIM) and rew.shape == (3,) and len(infos) == 3
        for i in np.flatnonzero(done):
            ends += 1
            assert infos[i]["terminal_observation"].shape == (OBS_DIM,)
            assert infos[i]["episode_summary"]["modelled_tps"] > 0
    assert ends > 0


def test_ppo_tiny_budget_learn_save_load(tmp_path):
    tb = tmp_path / "tb"
    agent = train_agent(
        "ppo",
        traces=__import__("replay.trace", fromlist=["x"]).synthetic_dataset(4),
        env_kwargs={"cost_model": CostModel.unit()},
        steps=256,
        seed=0,
        tb_log_dir=tb,
        progress=False,
        n_envs=2,
        agent_kwargs={"n_steps": 64, "batch_size": 32, "n_epochs": 2},
    )
    assert agent.timesteps >= 256
    assert list(tb.rglob("events.out.tfevents*"))
    assert agent.train_log and agent.train_log[0]["tokens_per_second"] > 0  # episodes seen through the adapter
    obs = rollout_obs(replay_env(4), 300)
    fast = agent.act_batch(obs)
    assert np.array_equal(fast, agent.act_torch(obs))
    assert np.array_equal(fast, [agent.act(o) for o in obs])
    p = agent.save(tmp_path / "ppo.safetensors")
    back = PPOAgent.load(p)
    assert np.array_equal(back.act_batch(obs), fast)
    assert back.timesteps == agent.timesteps
    assert not any(tmp_path.rglob("*.zip")) and not any(tmp_path.rglob("*.pkl"))


# ---- oracle -------------------------------------------------------------------------------------------


def test_oracle_matches_dp_and_beats_everyone():
    from replay.oracle import oracle

    env = replay_env(6, seed=1)
    agent = OracleAgent()
    with pytest.raises(RuntimeError, match="no trace"):
        agent.act(env.reset(seed=0)[0])
    recs = evaluate_agent(agent, env)
    for i, r in enumerate(recs):
        b = env.unwrapped.backend
        res = oracle(b.traces[i], b.cost_models[i], GAMMAS)
        assert r["modelled_s"] == pytest.approx(res.total_time, rel=1e-9)
    top = summarize(recs)["tokens_per_second"]
    for other in (FixedGamma(3), HFHeuristic(), CostAwareAnalytic()):
        assert top >= summarize(evaluate_agent(other, env))["tokens_per_second"] - 1e-12
    with pytest.raises(RuntimeError, match="replayed traces"):
        agent.begin_episode(toy_env(), {})


# ---- save / load ------------------------------------------------------------------------------------


def _trained(name: str):
    if name in TOKEN_KINDS:
        env = token_env(4)
        agent = make_agent(name)
        if agent.learns:
            run_online(agent, env, 500)
        return agent, env
    env = toy_env(regimes=(0.3, 0.9), n_episodes=4, length=128)
    if name == "speckv_mlp":
        return train_agent(name, env_factory=lambda: env, steps=800, progress=False, fit_kwargs={"epochs": 3}), env
    if name == "ppo":
        return PPOAgent(seed=1), env
    agent = make_agent(name)
    if agent.learns:
        run_online(agent, env, 500)
    return agent, env


@pytest.mark.parametrize("name", sorted(AGENTS))
def test_save_load_round_trip_identical_decisions(name, tmp_path):
    agent, env = _trained(name)
    p = agent.save(tmp_path / f"{name}.agent")
    back = load_agent(p)
    assert type(back) is type(agent) and back.get_config() == agent.get_config()
    assert type(agent).load(p).kind == name
    head = p.read_bytes()[:1]
    assert (head == b"{") == (not agent.get_tensors())  # JSON unless there are tensors
    obs = token_obs(env, 200, seed=9) if name in TOKEN_KINDS else rollout_obs(env, 200, seed=9)
    if name == "oracle":
        tr = replay_env(2)
        o, info = tr.reset(seed=0)
        agent.begin_episode(tr, info)
        back.begin_episode(tr, info)
        obs = [o]
    # identical decision sequences, including the random draws of randomised bandits
    assert [agent.act(o) for o in obs] == [back.act(o) for o in obs]


def _write(tmp_path, name: str, data: bytes):
    p = tmp_path / name
    p.write_bytes(data)
    return p


def test_malformed_agent_files_raise_agent_format_error(tmp_path):
    good_json = UCB1().save(tmp_path / "ucb.json").read_bytes()
    good_st = SpecKVMLP().save(tmp_path / "mlp.safetensors").read_bytes()
    cases = {
        "empty.json": b"",
        "trunc.json": good_json[: len(good_json) // 2],
        "trunc.safetensors": good_st[: len(good_st) // 2],
        "tiny.safetensors": good_st[:5],
        "garbage.bin": b"\x00\x01\x02garbage" * 10,
        "list.json": b"[1, 2]",
        "wrongformat.json": json.dumps({"format": "other/1", "kind": "ucb1"}).encode(),
        "unknownkind.json": json.dumps({"format": "speckv-agent/1", "kind": "nope", "config": {}}).encode(),
        "badconfig.json": json.dumps(
            {"format": "speckv-agent/1", "kind": "ucb1", "config": {"c": "x", "bogus": 1}}
        ).encode(),
        "badstate.json": json.dumps(
            {"format": "speckv-agent/1", "kind": "ucb1", "config": {}, "state": {"stats": [[1]]}}
        ).encode(),
    }
    for fname, data in cases.items():
        p = _write(tmp_path, fname, data)
        with pytest.raises(AgentFormatError, match=fname.replace(".", r"\.")):
            load_agent(p)
    # a safetensors file with a tensor of the wrong shape
    from safetensors.numpy import load, save_file

    t = load(good_st)
    t["W1"] = np.zeros((3, 3), np.float32)
    meta = json.loads(good_st[8 : 8 + struct.unpack("<Q", good_st[:8])[0]])["__metadata__"]
    save_file(t, str(tmp_path / "shape.safetensors"), metadata=meta)
    with pytest.raises(AgentFormatError, match=r"shape\.safetensors.*W1"):
        load_agent(tmp_path / "shape.safetensors")
    # the wrong kind through a class's load()
    with pytest.raises(AgentFormatError, match=r"ucb\.json.*'ucb1'"):
        SpecKVMLP.load(tmp_path / "ucb.json")
    with pytest.raises(FileNotFoundError):
        load_agent(tmp_path / "missing.json")


# ---- training / evaluation loops and bench --------------------------------------------------------------


def test_train_agent_records_learning_curve(tmp_path):
    agent = train_agent(
        "thompson",
        env_factory=lambda: toy_env(alpha=0.8, n_episodes=4),
        steps=1500,
        seed=0,
        tb_log_dir=tmp_path,
        progress=False,
    )
    assert len(agent.train_log) >= 5
    assert {"global_step", "episodic_return", "tokens_per_second", "mean_gamma"} <= set(agent.train_log[0])
    ev = list(tmp_path.rglob("events.out.tfevents*"))
    assert ev
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(ev[0].parent))
    acc.Reload()
    assert {"charts/episodic_return", "charts/tokens_per_second"} <= set(acc.Tags()["scalars"])
    recs = evaluate_agent(agent, toy_env(alpha=0.8, n_episodes=3))
    assert len(recs) == 3
    r = recs[0]
    assert sum(r["gamma_hist"].values()) == r["steps"] and r["tokens"] == 256
    assert r["tokens_per_step"] == pytest.approx(r["tokens"] / r["steps"])
    assert math.isfinite(r["tokens_per_second"]) and r["speedup"] > 1


def test_bench_agents_writes_json(tmp_path):
    res = bench_agents(
        tmp_path / "bench.json", n=300, warmup=50, agents=("fixed", "speckv_mlp", "ucb1"), include_torch=False
    )
    assert set(res["agents"]) == {"fixed", "speckv_mlp", "ucb1"}
    assert json.loads((tmp_path / "bench.json").read_text())["agents"]["speckv_mlp"]["median_us"] > 0
    assert all(v["median_us"] <= v["p99_us"] for v in res["agents"].values())
