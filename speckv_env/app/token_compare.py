"""Token mode in the comparison: the per-token stopping rules on the same episodes as step mode.

Run on splits whose traces are all ``speckv-trace/2`` (the draft's rollouts recorded), by the
scalar token-mode replay (``SpecKVReplay-v0``, ``control="token"``), one env per cost model.
Policies (names in the report):

- ``hf-confidence``: Hugging Face's default rule, threshold 0.4 (no tuning: as shipped);
- ``hf-confidence(train)``, ``svip(train)``, ``adaedl(train)``: the rule's parameter chosen per
  cost model (compression) on the fold's training episodes (train + validation prompts in the
  held-out split), as ``best-fixed(train)`` chooses its gamma: the token-mode analogues of the
  best fixed gamma;
- ``specdecpp(train)``: SpecDec++'s acceptance head fitted on the fold's training prompts, its
  stop threshold chosen on the same training episodes. A learned controller: a candidate for
  the primary contrast (chosen on validation like every learned one);
- ``rule-bandit(train)``: a bandit whose arms are stopping rules (UCB1 on the renewal
  throughput reward, one rule per step), trained online on the training episodes and evaluated
  continue-per-episode as the gamma bandits are. Also a candidate of the primary contrast;
- ``survival-token(train)``: the survival controller in token mode (:mod:`agents.survival`),
  fitted on the training prompts, a candidate of the primary contrast;
- ``ppo-token(train)``: PPO in token mode (``ppo_token_steps`` decisions of training on the
  fold's training episodes, 64 vector envs), a candidate of the primary contrast.

A rule's per-episode results record the tokens drafted per verification as its "gamma", so
the report's mean gamma and histograms read as in step mode.
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from .compare_data import _Data
from .results import EvalResult, select

STATIC_TOKEN = {"hf-confidence": ("hf_confidence", 0.4)}
TUNED_TOKEN = {"hf-confidence(train)": "hf_confidence", "svip(train)": "svip", "adaedl(train)": "adaedl"}
LEARNED_TOKEN = ("specdecpp(train)", "survival-token(train)", "rule-bandit(train)", "ppo-token(train)")
TOKEN_POLICIES: tuple[str, ...] = (*STATIC_TOKEN, *TUNED_TOKEN, *LEARNED_TOKEN)
TOKEN_SPLITS: tuple[str, ...] = ("heldout",)
"""Splits on which token mode's rules run (their grids make them the slowest reference policies)."""


def has_token_data(data: _Data) -> bool:
    """True when every trace carries the draft's rollouts (token mode can replay them)."""
    return all(getattr(t, "has_rollouts", False) for t in data.traces)


def _make(kind: str, value: float, gammas: Sequence[int], **kw: Any) -> Any:
    from agents.base import make_agent
    from agents.stopping import THRESHOLD_GRIDS

    param = THRESHOLD_GRIDS[kind][0]
    return make_agent(kind, gammas=tuple(gammas), **{param: value, **kw})


def _make_fit(kind: str, data: _Data, train: np.ndarray) -> Any:
    """Agent ``kind`` fitted on the training episodes ``train`` with their cost models."""
    from agents.base import make_agent

    agent: Any = make_agent(kind, gammas=data.gammas)
    agent.fit([data.traces[int(i)] for i in train], [data.cm[int(i)] for i in train])
    return agent


def eval_token(
    agent: Any, data: _Data, idx: np.ndarray, learn: bool = False, per_episode: bool = True, seed: int = 0
) -> EvalResult:
    """Play ``agent`` (a token-mode rule) on episodes ``idx``, one scalar token env per cost model.

    ``learn`` (online learners): the agent learns from every decision; with ``per_episode``
    each episode starts from a copy of the agent's state with its own random stream and keeps
    learning within the episode only (the comparison's "continue-per-episode"); without it the
    agent itself learns across the episodes (training)."""
    import copy

    from replay.env import SpecKVReplayEnv

    gam = list(data.gammas)
    n = len(idx)
    T, S, Gs = np.zeros(n), np.zeros(n), np.zeros(n)
    hist = np.zeros((n, len(gam)))
    by_cm: dict[int, list[int]] = {}
    for j, i in enumerate(idx):
        by_cm.setdefault(id(data.cm[int(i)]), []).append(j)
    for js in by_cm.values():
        cm = data.cm[int(idx[js[0]])]
        env = SpecKVReplayEnv(traces=[data.traces[int(idx[j])] for j in js], cost_model=cm, gammas=gam, control="token")
        agent.bind(env)
        for e, j in enumerate(js):
            ag = agent
            if learn and per_episode:
                ag = copy.deepcopy(agent)
                ag.rng = np.random.default_rng([int(seed), int(idx[j])])
            obs, info = env.reset(options={"episode": e})
            ag.begin_episode(env, info)
            done = False
            while not done:
                a = ag.act(obs)
                nobs, r, te, tu, info = env.step(a)
                if learn:
                    ag.learn(obs, a, r, nobs, info)
                obs, done = nobs, te or tu
                if "gamma" in info:  # a verification
                    S[j] += 1
                    Gs[j] += info["gamma"]
                    hist[j, max(bisect_right(gam, info["gamma"]) - 1, 0)] += 1  # the largest gamma <= drafted
            T[j] = info["episode_summary"]["modelled_s"]
    return EvalResult(np.asarray(idx), T[None], S[None], Gs[None], hist)


class TokenPolicies:
    """Token-mode results on a data set: the fixed-parameter evaluations over every episode are
    computed once and shared by the folds; fold-dependent fits (SpecDec++, the survival
    controller, the rule bandit, PPO) run per fold."""

    def __init__(self, data: _Data, grids: Mapping[str, Sequence[float]] | None = None, ppo_steps: int = 0) -> None:
        from agents.stopping import THRESHOLD_GRIDS

        self.data = data
        self.ppo_steps = int(ppo_steps)
        self.all = np.arange(len(data.traces))
        self.grids = {k: tuple(grids[k]) if grids and k in grids else v[1] for k, v in THRESHOLD_GRIDS.items()}
        self._cache: dict[tuple[str, float], EvalResult] = {}

    def full(self, kind: str, value: float) -> EvalResult:
        """The rule ``kind`` at parameter ``value`` on every episode (cached)."""
        key = (kind, float(value))
        if key not in self._cache:
            self._cache[key] = eval_token(_make(kind, value, self.data.gammas), self.data, self.all)
        return self._cache[key]

    def choose(self, kind: str, seen: np.ndarray) -> dict[str, float]:
        """Per cost model (and ``"*"`` for all), the grid value of least total time on ``seen``."""
        groups = self.data.cost_group()
        times = {v: self.full(kind, v).time[0] for v in self.grids[kind]}
        out = {"*": min(times, key=lambda v: float(times[v][seen].sum()))}
        for label in sorted({str(x) for x in groups[seen]}):
            sel = seen[groups[seen] == label]
            out[label] = min(times, key=lambda v: float(times[v][sel].sum()))
        return out

    def tuned(self, kind: str, choice: Mapping[str, float], idx: np.ndarray) -> EvalResult:
        """The tuned rule on ``idx``: per episode, the value chosen for its cost model."""
        groups = self.data.cost_group()
        parts = [select(self.full(kind, choice.get(str(groups[i]), choice["*"])), np.array([i])) for i in idx]
        return EvalResult(
            np.asarray(idx),
            np.concatenate([p.time for p in parts], axis=1),
            np.concatenate([p.steps for p in parts], axis=1),
            np.concatenate([p.gsum for p in parts], axis=1),
            np.concatenate([p.hist for p in parts], axis=0),
        )

    def specdecpp(self, train: np.ndarray, seen: np.ndarray) -> tuple[Any, dict[str, Any]]:
        """SpecDec++ fitted on ``train``, its threshold chosen on ``seen`` (least total time; the
        comparison passes the training episodes for both: validation selects among learners)."""
        from agents.stopping import SpecDecPP

        head = SpecDecPP(gammas=self.data.gammas)
        fit = head.fit([self.data.traces[int(i)] for i in train])
        scores = {}
        for h in self.grids["specdecpp"]:
            agent = SpecDecPP(head.weights, h=h, gammas=self.data.gammas)
            scores[h] = float(eval_token(agent, self.data, seen).time[0].sum())
        h = min(scores, key=lambda v: scores[v])
        return SpecDecPP(head.weights, h=h, gammas=self.data.gammas), {**fit, "h": h}

    def on_fold(self, fold: Any) -> tuple[dict[str, EvalResult], dict[str, EvalResult], dict[str, Any]]:
        """Every token policy on the fold's test and validation episodes, and what was chosen."""
        test: dict[str, EvalResult] = {}
        val: dict[str, EvalResult] = {}
        info: dict[str, Any] = {}
        for name, (kind, value) in STATIC_TOKEN.items():
            r = self.full(kind, value)
            test[name] = select(r, fold.test)
            if fold.val.size:
                val[name] = select(r, fold.val)
        for name, kind in TUNED_TOKEN.items():
            choice = self.choose(kind, fold.seen)
            info[name] = choice
            test[name] = self.tuned(kind, choice, fold.test)
            if fold.val.size:
                val[name] = self.tuned(kind, choice, fold.val)
        agent, fit = self.specdecpp(fold.train, fold.train)
        info["specdecpp(train)"] = fit
        test["specdecpp(train)"] = eval_token(agent, self.data, fold.test)
        if fold.val.size:
            val["specdecpp(train)"] = eval_token(agent, self.data, fold.val)
        surv = _make_fit("survival_token", self.data, fold.train)
        info["survival-token(train)"] = {"rho": surv.summary.get("rho"), "auc_reach": surv.summary.get("auc_reach")}
        test["survival-token(train)"] = eval_token(surv, self.data, fold.test)
        if fold.val.size:
            val["survival-token(train)"] = eval_token(surv, self.data, fold.val)
        bandit = self.rule_bandit(fold.train)
        info["rule-bandit(train)"] = {"pulls": bandit.ucb.stats[0].tolist(), "rules": bandit.rules}
        test["rule-bandit(train)"] = eval_token(bandit, self.data, fold.test, learn=True)
        if fold.val.size:
            val["rule-bandit(train)"] = eval_token(bandit, self.data, fold.val, learn=True)
        if self.ppo_steps > 0:
            ppo = self.ppo(fold.train)
            info["ppo-token(train)"] = {"steps": int(ppo.timesteps)}
            test["ppo-token(train)"] = eval_token(ppo, self.data, fold.test)
            if fold.val.size:
                val["ppo-token(train)"] = eval_token(ppo, self.data, fold.val)
        return test, val, info

    def ppo(self, train: np.ndarray, seed: int = 0) -> Any:
        """Token mode's PPO (:class:`agents.ppo.PPOAgent`, ``control="token"``: observation and
        reward normalisation, discount 1, the budget's end terminal) trained on the training
        episodes for ``ppo_steps`` decisions on the vector replay env."""
        from agents.training import train_agent

        return train_agent(
            "ppo",
            traces=[self.data.traces[int(i)] for i in train],
            steps=self.ppo_steps,
            seed=seed,
            progress=False,
            n_envs=64,
            env_kwargs={**self.data.env_kwargs(), "control": "token"},
            agent_kwargs={"n_steps": 128, "batch_size": 1024, "n_epochs": 4},
        )

    def rule_bandit(self, train: np.ndarray, seed: int = 0) -> Any:
        """The bandit over stopping rules, trained online on the training episodes (one pass,
        in a seeded random order)."""
        from agents.base import make_agent

        agent = make_agent("rule_bandit", seed=seed, gammas=self.data.gammas)
        order = np.random.default_rng(seed).permutation(train)
        eval_token(agent, self.data, order, learn=True, per_episode=False)
        return agent
