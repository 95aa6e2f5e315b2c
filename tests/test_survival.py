"""The survival (ordinal) controller (agents/survival.py): the hazard model learns, the renewal
rule beats the best fixed gamma (step mode) and HF's 0.4 rule (token mode) on held-out
synthetic traces, every position's observation is the env's, persistence, clear errors."""

from __future__ import annotations

import json

import numpy as np
import pytest

from agents import (
    AgentFormatError,
    FixedGamma,
    HFConfidence,
    SurvivalController,
    SurvivalTokenController,
    load_agent,
    make_agent,
)
from agents.stopping import auc, head_training_data, run_token_episodes, token_features
from agents.survival import _constant, hazard_data, replay_observations, token_decision_data
from replay.env import SpecKVReplayEnv
from replay.trace import synthetic_dataset, synthetic_trace
from speckv_env.core import OBS_DIM, TOKEN_OBS_DIM, CostModel

CM = CostModel.unit(draft_ratio=0.1)


@pytest.fixture(scope="module")
def data():
    trs = synthetic_dataset(40, rollouts=True, modes=("greedy", "sample"), seed=5)
    train = [t for t in trs if t.split == "train"]
    held = [t for t in trs if t.split != "train"]
    return train, held


@pytest.fixture(scope="module")
def token_agent(data):
    agent = SurvivalTokenController(iterations=4)
    agent.fit(data[0], CM)
    return agent


@pytest.fixture(scope="module")
def step_agent(token_agent):
    # the token agent's fit is the step agent's fit plus the token head and token mode's rho
    agent = SurvivalController(iterations=4)
    agent.set_state({**token_agent.get_state(), "rho": token_agent.summary["step_rho"]})
    return agent


def _step_rate(agent, traces):
    env = SpecKVReplayEnv(traces=traces, cost_model=CM)
    agent.bind(env)
    tokens, seconds = 0, 0.0
    for ep in range(len(traces)):
        obs, _ = env.reset(options={"episode": ep})
        done = False
        while not done:
            obs, _, te, tu, info = env.step(agent.act(obs))
            done = te or tu
        tokens += info["episode_summary"]["tokens"]
        seconds += info["episode_summary"]["modelled_s"]
    return tokens / seconds


def test_every_position_observation_is_the_envs_at_step_starts(data):
    train, _ = data
    env = SpecKVReplayEnv(traces=train[:4], cost_model=CM)
    for ep, tr in enumerate(train[:4]):
        ref, n, seconds = replay_observations(tr, CM, env.gammas, _constant(3))
        assert ref.shape == (tr.n, OBS_DIM) and n == tr.n
        obs, _ = env.reset(options={"episode": ep})
        done = False
        while not done:
            assert np.array_equal(obs, ref[env.unwrapped.backend.position()])
            obs, _, te, tu, info = env.step(3)
            done = te or tu
        assert seconds == pytest.approx(info["episode_summary"]["modelled_s"])
    # inside accepted runs: the path "one fully accepted step" arrives there
    assert np.all((ref[:, 7] == 0) | (ref[:, 7] == 1))


def test_hazard_model_learns_held_out(data, token_agent):
    _, held = data
    scores, labels = [], []
    for tr in held:  # every held-out position, features from a fixed-gamma path
        obs, _, _ = replay_observations(tr, CM, token_agent.gammas, _constant(3))
        x, y = hazard_data(obs, tr, token_agent.G)
        scores.append(x[0] @ token_agent.weights[0])  # "the next token is accepted"
        labels.append(y[0])
    a_step = auc(np.concatenate(scores), np.concatenate(labels))
    X, y = token_decision_data(held, token_agent.G)  # were the drafted tokens all accepted?
    a_reach = auc(X @ token_agent.token_weights[0], y)
    X, y = head_training_data(held, token_agent.G)  # is the next one, given they were?
    a_cond = auc(X @ token_agent.token_weights[1], y)
    assert a_step > 0.6 and a_reach > 0.6 and a_cond > 0.6, (a_step, a_reach, a_cond)
    s = token_agent.summary
    assert s["fitted"] and s["positions"] == sum(t.n for t in data[0]) and s["auc_first_token"][0] > 0.6
    # the hazards are probabilities and the survival curve falls
    S = np.cumprod(token_agent.hazards(obs), axis=1)
    assert np.all((S > 0) & (S < 1)) and np.all(np.diff(S, axis=1) <= 0)


def test_step_controller_beats_the_best_fixed_gamma_held_out(data, step_agent):
    train, held = data
    fixed = {g: _step_rate(FixedGamma(g), train) for g in range(9)}
    best = max(fixed, key=lambda g: fixed[g])
    base = _step_rate(FixedGamma(best), held)
    ours = _step_rate(step_agent, held)
    assert ours > base * 1.01, (ours, base, best)


def test_token_controller_beats_hf_default_held_out(data, token_agent):
    _, held = data
    env = SpecKVReplayEnv(traces=held, cost_model=CM, control="token")
    n_hf, s_hf = run_token_episodes(HFConfidence(0.4), env, range(len(held)))
    n_us, s_us = run_token_episodes(token_agent, env, range(len(held)))
    assert n_us == n_hf  # gamma-invariance: the same tokens, less time
    assert n_us / s_us > 1.02 * n_hf / s_hf, (n_us / s_us, n_hf / s_hf)
    # token mode's rho is its own fixed point: above the step controller's
    assert token_agent.rho["*"] > token_agent.summary["step_rho"]["*"]


def test_act_batch_equals_act(step_agent, token_agent):
    rng = np.random.default_rng(0)
    for agent, dim in ((step_agent, OBS_DIM), (token_agent, TOKEN_OBS_DIM)):
        obs = rng.uniform(0, 1, (400, dim)).astype(np.float32)
        obs[:, 1] *= 6.0
        obs[:, 9] = rng.choice([0.05, 0.1, 0.3], 400)
        obs[:, 10:13] = np.eye(3, dtype=np.float32)[rng.integers(0, 3, 400)]
        if dim == TOKEN_OBS_DIM:
            obs[:, 13] = rng.integers(0, 9, 400) / 8
        acts = [agent.act(o) for o in obs]
        assert agent.act_batch(obs).tolist() == acts
        assert len(set(acts)) > 1


def test_save_load_round_trip(data, step_agent, token_agent, tmp_path):
    rng = np.random.default_rng(1)
    for agent, dim in ((step_agent, OBS_DIM), (token_agent, TOKEN_OBS_DIM)):
        p = agent.save(tmp_path / f"{agent.kind}.json")
        back = load_agent(p)
        env = SpecKVReplayEnv(traces=data[1], cost_model=CM, control=agent.control)
        agent.bind(env)
        back.bind(env)
        assert type(back) is type(agent) and back.get_config() == agent.get_config()
        assert back.rho == agent.rho and np.array_equal(back.weights, agent.weights)
        obs = rng.uniform(0, 1, (200, dim)).astype(np.float32)
        obs[:, 10:13] = [1, 0, 0]
        assert back.act_batch(obs).tolist() == agent.act_batch(obs).tolist()
    doc = json.loads((tmp_path / "survival.json").read_text())
    doc["state"]["features"] = "survival-features/0"
    (tmp_path / "old.json").write_text(json.dumps(doc))
    with pytest.raises(AgentFormatError, match="features"):
        load_agent(tmp_path / "old.json")
    with pytest.raises(AgentFormatError, match="'survival' agent"):
        SurvivalTokenController.load(tmp_path / "survival.json")
    assert make_agent("survival").control == "step" and make_agent("survival_token").control == "token"


def test_clear_errors_on_the_wrong_env_mode_and_data(data, step_agent, token_agent):
    train, _ = data
    step_env = SpecKVReplayEnv(traces=train, cost_model=CM)
    token_env = SpecKVReplayEnv(traces=train, cost_model=CM, control="token")
    with pytest.raises(ValueError, match="control='step'.*use 'survival_token'"):
        step_agent.bind(token_env)
    with pytest.raises(ValueError, match="control='token'.*use 'survival'"):
        token_agent.bind(step_env)
    with pytest.raises(ValueError, match="width 16"):
        token_agent.act(np.zeros(OBS_DIM, dtype=np.float32))
    with pytest.raises(ValueError, match="width 13"):
        step_agent.act_batch(np.zeros((2, TOKEN_OBS_DIM), dtype=np.float32))
    v1 = synthetic_dataset(4, rollouts=False)
    with pytest.raises(ValueError, match="no rollouts"):
        SurvivalTokenController(iterations=1, refits=0).fit(v1, CM)
    with pytest.raises(ValueError, match="no training traces"):
        SurvivalController().fit([], CM)
    # degenerate data fits without error: a 1-token trace (no decision after a draft), all accepted
    for trs in ([synthetic_trace(1, rollouts=True)], [synthetic_trace(30, p_accept=0.999, rollouts=True)]):
        agent = SurvivalTokenController(iterations=2)
        agent.fit(trs, CM)
        assert np.isfinite(agent.weights).all() and np.isfinite(agent.token_weights).all()


def test_token_controller_in_the_vector_env_equals_the_scalar_env(data, token_agent):
    from replay.vector import SpecKVReplayVectorEnv

    held = [t for t in data[1] if t.mode == "sample"]  # one mode per vector env, as the comparison groups them
    E = len(held)
    env = SpecKVReplayEnv(traces=held, cost_model=CM, control="token")
    scalar = [run_token_episodes(token_agent, env, [e])[1] for e in range(E)]
    venv = SpecKVReplayVectorEnv(num_envs=E, traces=held, cost_model=CM, control="token")
    obs, _ = venv.reset(seed=0, options={"episodes": np.arange(E)})
    assert token_agent.bind(env)._sampling_now()
    active = np.ones(E, dtype=bool)
    seconds = np.zeros(E)
    while active.any():  # stateless within a step: act_batch decides every env at once
        obs, _, term, trunc, info = venv.step(token_agent.act_batch(obs))
        seconds += np.where(active, info["modelled_time"], 0.0)
        active &= ~(term | trunc)
    assert seconds == pytest.approx(scalar, rel=1e-9)


# ---- draft-then-decide (lookahead=False) --------------------------------------------------


@pytest.fixture(scope="module")
def dtd_agent(data):
    agent = SurvivalTokenController(iterations=4, lookahead=False)
    agent.fit(data[0], CM)
    return agent


def test_dtd_controller_fits_on_its_variant_and_beats_hf_default_held_out(data, dtd_agent):
    """survival_token in draft-then-decide: fitted on the variant's rows (they are the dtd env's
    observations), its rho from dtd replays; held out it beats HF's rule in the same variant."""
    train, held = data
    assert dtd_agent.summary["auc_cond"] > 0.6 and dtd_agent.summary["cond_decisions"] > 100
    env = SpecKVReplayEnv(traces=held, cost_model=CM, control="token", lookahead=False)
    n_hf, s_hf = run_token_episodes(HFConfidence(0.4, lookahead=False), env, range(len(held)))
    n_us, s_us = run_token_episodes(dtd_agent, env, range(len(held)))
    assert n_us == n_hf
    assert n_us / s_us > 1.02 * n_hf / s_hf, (n_us / s_us, n_hf / s_hf)
    # the reach rows are what the dtd env shows, decision by decision (any earlier outcome)
    tr = train[0]
    X, y = token_decision_data([tr], 8, lookahead=False)
    Xl, _ = token_decision_data([tr], 8)
    assert X.shape == Xl.shape and not np.allclose(X, Xl)
    denv = SpecKVReplayEnv(traces=[tr], cost_model=CM, control="token", lookahead=False)
    denv.reset(options={"episode": 0})
    checked = 0
    for _ in range(100):
        obs, _, te, tu, info = denv.step(1)
        if te or tu:
            break
        if "gamma" not in info and info["drafted"] >= 1:
            x = token_features(obs[0], obs[1], obs[2], obs[-3], obs[-2], obs[-1])
            assert np.isclose(X, x, rtol=1e-5, atol=1e-6).all(axis=1).any()
            checked += 1
    assert checked > 5


def test_dtd_controller_act_batch_refusal_and_round_trip(data, dtd_agent, token_agent, tmp_path):
    rng = np.random.default_rng(2)
    obs = rng.uniform(0, 1, (400, TOKEN_OBS_DIM)).astype(np.float32)
    obs[:, 1] *= 6.0
    obs[:, 9] = rng.choice([0.05, 0.1, 0.3], 400)
    obs[:, 10:13] = np.eye(3, dtype=np.float32)[rng.integers(0, 3, 400)]
    obs[:, 13] = rng.integers(0, 9, 400) / 8
    acts = [dtd_agent.act(o) for o in obs]
    assert dtd_agent.act_batch(obs).tolist() == acts and len(set(acts)) > 1
    look = SpecKVReplayEnv(traces=data[1], cost_model=CM, control="token")
    dtd = SpecKVReplayEnv(traces=data[1], cost_model=CM, control="token", lookahead=False)
    with pytest.raises(ValueError, match=r"survival_token was built for token mode's dtd variant.*lookahead=True"):
        dtd_agent.bind(look)
    with pytest.raises(ValueError, match=r"lookahead variant \(lookahead=True\).*dtd variant \(lookahead=False\)"):
        token_agent.bind(dtd)
    back = load_agent(dtd_agent.save(tmp_path / "dtd.json"))
    assert back.lookahead is False and back.get_config() == dtd_agent.get_config()
    back.bind(dtd)
    dtd_agent.bind(dtd)
    assert back.act_batch(obs).tolist() == dtd_agent.act_batch(obs).tolist()
    with pytest.raises(ValueError, match="lookahead=True"):
        back.bind(look)
