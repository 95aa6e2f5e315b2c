"""Token mode's stopping rules (agents/stopping.py): semantics, fitting, tuning, persistence."""

from __future__ import annotations

import numpy as np
import pytest

from agents import AdaEDL, EntropyStop, HFConfidence, SpecDecPP, load_agent
from agents.stopping import (
    THRESHOLD_GRIDS,
    RuleBandit,
    auc,
    fit_logistic,
    head_training_data,
    run_token_episodes,
    token_features,
    tune_threshold,
)
from replay.env import SpecKVReplayEnv
from replay.trace import synthetic_dataset
from speckv_env.core import TOKEN_OBS_DIM, CostModel

CM = CostModel.unit(draft_ratio=0.1)


@pytest.fixture(scope="module")
def traces():
    return synthetic_dataset(30, rollouts=True, modes=("greedy", "sample"), seed=11)


def _env(trs):
    return SpecKVReplayEnv(traces=trs, cost_model=CM, control="token")


def test_hf_confidence_drafts_first_then_while_the_last_token_is_confident(traces):
    env = _env(traces)
    agent = HFConfidence(0.4).bind(env)
    for ep in range(6):
        obs, _ = env.reset(options={"episode": ep})
        done = False
        while not done:
            a = agent.act(obs)
            drafted, last_p = float(obs[-3]), float(obs[-1])
            assert a == (1 if drafted == 0.0 or last_p >= 0.4 else 0)
            obs, _, te, tu, info = env.step(a)
            done = te or tu
            if info["decision"] == "verify" and info["drafted"] > 0 and info["gamma"] < 8:
                # it stopped only after a token below the threshold
                assert info["draft_p"] is None and last_p < 0.4


def test_rules_act_batch_equals_act_and_refuse_step_mode(traces):
    rng = np.random.default_rng(0)
    obs = rng.uniform(0, 1, (200, TOKEN_OBS_DIM)).astype(np.float32)
    obs[:, 1] *= 6.0
    obs[::3, -3] = 0.0
    for agent in (HFConfidence(0.3), EntropyStop(1.2), AdaEDL(0.3)):
        assert agent.act_batch(obs).tolist() == [agent.act(o) for o in obs]
    step_env = SpecKVReplayEnv(traces=traces, cost_model=CM)
    with pytest.raises(ValueError, match="control='token'"):
        HFConfidence().bind(step_env)


def test_specdecpp_head_learns_acceptance_and_tuning_picks_the_best(traces):
    train = [t for t in traces if t.split == "train"]
    X, y = head_training_data(train, 8)
    assert X.shape == (len(y), 8) and 0.2 < y.mean() < 0.95
    w = fit_logistic(X, y)
    a = auc(X @ w, y)
    assert a > 0.65  # the synthetic signals are informative; a constant score has AUC 0.5
    # the head is better than chance on held-out traces too
    Xt, yt = head_training_data([t for t in traces if t.split != "train"], 8)
    assert auc(Xt @ w, yt) > 0.6
    env = _env(train)
    eps = range(len(train))

    def tps(agent):
        n, s = run_token_episodes(agent, env, eps)
        return n / s

    name, grid = THRESHOLD_GRIDS["specdecpp"]
    best, scores = tune_threshold(lambda h: SpecDecPP(w, h=h), grid, tps)
    assert scores[best.h] == max(scores.values()) and len(set(scores.values())) > 1
    best_hf, hf_scores = tune_threshold(lambda v: HFConfidence(v), THRESHOLD_GRIDS["hf_confidence"][1], tps)
    assert hf_scores[best_hf.threshold] >= hf_scores[0.4]


def test_token_features_match_between_fitting_and_acting(traces):
    """The head sees at act time exactly the features it was fitted on (same function)."""
    tr = next(t for t in traces if t.split == "train")
    agent = SpecDecPP(np.linspace(-1, 1, 8), h=0.99)
    env = _env([tr])
    obs, _ = env.reset(options={"episode": 0})
    obs, *_ = env.step(1)  # one token drafted, looked past
    x_act = token_features(obs[0], obs[1], obs[2], obs[-3], obs[-2], obs[-1])
    x_fit = token_features(
        tr.roll_top1[0, 1], tr.roll_entropy[0, 1], tr.roll_margin[0, 1], 1 / 8, tr.roll_p[0, 0], tr.roll_p[0, 0]
    )
    np.testing.assert_allclose(x_act, x_fit, rtol=1e-6)
    p = agent.accept_prob(obs)
    assert 0.0 < float(p) < 1.0


def test_auc_known_values():
    assert auc(np.array([0.1, 0.2, 0.3, 0.4]), np.array([0, 0, 1, 1])) == 1.0
    assert auc(np.array([0.4, 0.3, 0.2, 0.1]), np.array([0, 0, 1, 1])) == 0.0
    assert auc(np.array([0.5, 0.5, 0.5, 0.5]), np.array([0, 1, 0, 1])) == 0.5


def test_stopping_rules_save_and_load(tmp_path):
    for agent in (HFConfidence(0.55), EntropyStop(1.3), AdaEDL(0.2, c=0.7), SpecDecPP(np.arange(8.0), h=0.3)):
        p = agent.save(tmp_path / f"{agent.kind}.json")
        back = load_agent(p)
        assert type(back) is type(agent) and back.get_config() == agent.get_config()
    with pytest.raises(ValueError, match="weights expected"):
        SpecDecPP([1.0, 2.0])


def test_rule_bandit_learns_the_better_rule_and_saves(traces, tmp_path):
    """Arms: a rule that never drafts and one that drafts confidently; with a cheap draft the
    bandit must come to prefer drafting, one rule per step, and round-trip through save/load."""
    from agents import RuleBandit

    rules = [("hf_confidence", {"threshold": 1.0}), ("svip", {"h": 3.0})]  # hf@1.0 still drafts one token
    bandit = RuleBandit(rules, seed=0)
    env = _env([t for t in traces if t.split == "train"])
    bandit.bind(env)
    for ep in range(len(env.unwrapped.backend.traces)):
        obs, info = env.reset(options={"episode": ep})
        bandit.begin_episode(env, info)
        done = False
        while not done:
            a = bandit.act(obs)
            nobs, r, te, tu, info = env.step(a)
            bandit.learn(obs, a, r, nobs, info)
            obs, done = nobs, te or tu
    pulls = bandit.ucb.stats[0]
    assert pulls.sum() > 100 and pulls[1] > pulls[0]
    back = load_agent(bandit.save(tmp_path / "rb.json"))
    assert back.get_config() == bandit.get_config() and (back.ucb.stats == bandit.ucb.stats).all()
    with pytest.raises(ValueError, match="not a token-mode stopping rule"):
        RuleBandit([("fixed", {"g": 2})])


def test_stateful_rules_refuse_batches():
    """SpecDec++ and the rule bandit carry per-step state: a batch of rows from different envs
    would share it, so act_batch is an error, not a silently wrong answer."""
    from agents import RuleBandit

    obs = np.zeros((4, TOKEN_OBS_DIM), dtype=np.float32)
    for agent in (SpecDecPP(), RuleBandit()):
        with pytest.raises(NotImplementedError, match="once per env"):
            agent.act_batch(obs)


# ---- draft-then-decide (lookahead=False) --------------------------------------------------


def _dtd_env(trs):
    return SpecKVReplayEnv(traces=trs, cost_model=CM, control="token", lookahead=False)


def _play(agent, env, episodes):
    """(obs, action, info after) of every decision of ``agent`` on ``episodes``."""
    agent.bind(env)
    out = []
    for ep in episodes:
        obs, info = env.reset(options={"episode": ep})
        agent.begin_episode(env, info)
        done = False
        while not done:
            a = agent.act(obs)
            nobs, _, te, tu, info = env.step(a)
            out.append((obs, a, info))
            obs, done = nobs, te or tu
    return out


def test_dtd_rules_draft_first_then_judge_the_drafted_token(traces):
    """In draft-then-decide, HF's rule is HF's (always the first token, then while the last drafted
    token's probability >= threshold), and SVIP / AdaEDL / SpecDec++ always draft the first token,
    then judge the distribution the last drafted token came from."""
    env = _dtd_env(traces)
    w = fit_logistic(*head_training_data([t for t in traces if t.split == "train"], 8, lookahead=False))
    rules = (
        HFConfidence(0.4, lookahead=False),
        EntropyStop(1.0, lookahead=False),
        AdaEDL(0.3, lookahead=False),
        SpecDecPP(w, h=0.5, lookahead=False),
    )
    for agent in rules:
        seen = 0
        for obs, a, _ in _play(agent, env, range(5)):
            drafted = float(obs[-3])
            if drafted == 0.0:
                assert a == 1  # draft, then decide
                continue
            seen += 1
            if isinstance(agent, HFConfidence):
                assert a == int(obs[-1] >= 0.4)
            elif isinstance(agent, EntropyStop):
                assert a == int(obs[1] <= 1.0)
            elif isinstance(agent, AdaEDL):
                assert a == agent.act(obs)  # stateless
        assert seen > 20
    # the batch form of the stateless rules equals act
    rng = np.random.default_rng(1)
    obs = rng.uniform(0, 1, (200, TOKEN_OBS_DIM)).astype(np.float32)
    obs[:, 1] *= 6.0
    obs[::3, -3] = 0.0
    for agent in rules[:3]:
        assert agent.act_batch(obs).tolist() == [agent.act(o) for o in obs]


def test_dtd_head_rows_are_the_envs_observations(traces):
    """head_training_data(lookahead=False) builds each row from what the draft-then-decide env
    shows right after drafting the token the row labels (and the look-ahead rows differ)."""
    tr = next(t for t in traces if t.split == "train")
    X, y = head_training_data([tr], 8, lookahead=False)
    Xl, _ = head_training_data([tr], 8)
    env = _dtd_env([tr])
    obs, _ = env.reset(options={"episode": 0})
    checked = 0
    for _ in range(200):  # always draft: every decision with j >= 1 at a step start t
        obs, _, te, tu, info = env.step(1)
        if te or tu:
            break
        if info["decision"] != "draft" or "gamma" in info:  # verified (a stop, or the cap)
            continue
        t, j = info["position"], info["drafted"]
        if j >= 1 and all(tr.accept[t + k] for k in range(j - 1)):  # the tokens before j accepted: a row
            x = token_features(obs[0], obs[1], obs[2], obs[-3], obs[-2], obs[-1])
            assert np.isclose(X, x, rtol=1e-5, atol=1e-6).all(axis=1).any(), (t, j)
            checked += 1
    assert checked > 5
    assert X.shape == Xl.shape and not np.allclose(X, Xl)


def test_variant_refusal_and_saved_variant_round_trip(traces, tmp_path):
    """A rule built for one variant refuses an env of the other, naming both; saved rules carry
    their variant."""
    look, dtd = _env(traces), _dtd_env(traces)
    w = np.linspace(-1, 1, 8)
    for agent in (
        HFConfidence(0.5, lookahead=False),
        EntropyStop(1.1, lookahead=False),
        AdaEDL(0.2, lookahead=False),
        SpecDecPP(w, h=0.4, lookahead=False),
        RuleBandit(lookahead=False),
    ):
        assert agent.bind(dtd) is agent
        with pytest.raises(ValueError, match=r"dtd variant \(lookahead=False\).*lookahead variant \(lookahead=True\)"):
            agent.bind(look)
        back = load_agent(agent.save(tmp_path / f"{agent.kind}.json"))
        assert back.lookahead is False and back.get_config() == agent.get_config()
        with pytest.raises(ValueError, match="lookahead=True"):
            back.bind(look)
    assert all(a.lookahead is False for a in RuleBandit(lookahead=False).arms)
    with pytest.raises(ValueError, match=r"lookahead variant \(lookahead=True\).*dtd variant"):
        HFConfidence().bind(dtd)
    assert load_agent(HFConfidence().save(tmp_path / "hf.json")).lookahead is True
