"""Every gamma policy behind one small interface (see :mod:`agents.base`).

>>> from agents import make_agent, load_agent, train_agent, evaluate_agent
>>> agent = make_agent("ucb1", seed=0)

Registry names (:data:`AGENTS`): fixed, hf_heuristic, cost_aware, speckv_mlp, epsilon_greedy,
ucb1, thompson, exp3, linucb, ppo, oracle; token mode's stopping rules (:mod:`agents.stopping`):
hf_confidence, svip, adaedl, specdecpp, rule_bandit; per_context keeps a bandit per
(compression, mode). torch and stable-baselines3 are imported only when an MLP is trained or
a PPO agent is built.
"""

from .bandits import EXP3, UCB1, EpsilonGreedy, LinUCB, ThompsonSampling
from .base import AGENTS, DEFAULT_VERIFY_SLOPE, Agent, AgentFormatError, GammaTable, load_agent, make_agent
from .mlp import SpecKVMLP
from .oracle import OracleAgent
from .ppo import PPOAgent
from .simple import CostAwareAnalytic, FixedGamma, HFHeuristic
from .stopping import AdaEDL, EntropyStop, HFConfidence, RuleBandit, SpecDecPP, StopRule
from .survival import SurvivalController, SurvivalTokenController
from .training import collect_rollouts, evaluate_agent, make_vec_env, summarize, train_agent

__all__ = [
    "AGENTS",
    "AdaEDL",
    "Agent",
    "AgentFormatError",
    "CostAwareAnalytic",
    "DEFAULT_VERIFY_SLOPE",
    "EXP3",
    "EntropyStop",
    "EpsilonGreedy",
    "FixedGamma",
    "GammaTable",
    "HFConfidence",
    "HFHeuristic",
    "LinUCB",
    "OracleAgent",
    "PPOAgent",
    "RuleBandit",
    "SpecDecPP",
    "SpecKVMLP",
    "StopRule",
    "SurvivalController",
    "SurvivalTokenController",
    "ThompsonSampling",
    "UCB1",
    "collect_rollouts",
    "evaluate_agent",
    "load_agent",
    "make_agent",
    "make_vec_env",
    "summarize",
    "train_agent",
]
