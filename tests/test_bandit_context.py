"""Bandits kept per deployment context (compression x decoding mode): agents.bandits.PerContext."""

from __future__ import annotations

import pytest

from agents import load_agent, make_agent
from agents.training import train_agent
from replay.env import SpecKVReplayEnv
from replay.trace import synthetic_dataset
from speckv_env.core import CostModel

# a cheap draft makes long drafts pay; an expensive one makes short drafts pay
CMS = {"fp32": CostModel.unit(draft_ratio=0.05), "nf4": CostModel.unit(draft_ratio=0.8, verify_slope=0.3)}


@pytest.fixture(scope="module")
def trained():
    trs = synthetic_dataset(24, compressions=("fp32", "nf4"), modes=("greedy", "sample"), seed=1)
    agent = make_agent("per_context", bandit="ucb1", seed=0)
    return train_agent(agent, steps=3000, traces=trs, seed=0, env_kwargs={"cost_models": CMS}, progress=False), trs


def test_each_context_learns_its_own_gamma(trained):
    agent, _ = trained
    assert set(agent.contexts) == {"fp32/greedy", "fp32/sample", "nf4/greedy", "nf4/sample"}
    best = {c: agent.gammas[b.best_arm()] for c, b in agent.contexts.items()}
    for mode in ("greedy", "sample"):
        assert best[f"fp32/{mode}"] > best[f"nf4/{mode}"], best
    assert agent.name == "ucb1"


def test_the_episode_selects_the_context(trained):
    agent, trs = trained
    env = SpecKVReplayEnv(traces=trs, cost_models=CMS)
    for ep in range(4):
        obs, info = env.reset(options={"episode": ep})
        agent.begin_episode(env, info)
        assert agent.context == f"{info['compression']}/{info['mode']}"
        assert agent.act(obs) == agent.contexts[agent.context].act(obs)


def test_per_context_save_load_and_errors(trained, tmp_path):
    agent, _ = trained
    back = load_agent(agent.save(tmp_path / "pc.json"))
    assert set(back.contexts) == set(agent.contexts)
    assert all(back.contexts[c].best_arm() == b.best_arm() for c, b in agent.contexts.items())
    with pytest.raises(ValueError, match="not a bandit"):
        make_agent("per_context", bandit="fixed")
