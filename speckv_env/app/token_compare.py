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

Every policy runs in both variants of token mode (``speckv_env.base_env.TOKEN_MODE_DOC``):
look-ahead (the names above) and draft-then-decide (``lookahead=False``; the same names with
the suffix ``/dtd``, :data:`DTD`): each tuned, fitted or trained in its own variant, and the
learned ones of both are candidates of the primary contrast.
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from .compare_data import _Data
from .results import EvalResult, select

DTD = "/dtd"
"""Suffix of the draft-then-decide variant's policy names (``lookahead=False``)."""
VARIANTS: tuple[bool, ...] = (True, False)
"""Token mode's variants the comparison runs: look-ahead, then draft-then-decide."""


def variant_name(name: str, lookahead: bool) -> str:
    """A token policy's name in a variant (draft-then-decide: the :data:`DTD` suffix)."""
    return name if lookahead else name + DTD


STATIC_TOKEN = {"hf-confidence": ("hf_confidence", 0.4)}
TUNED_TOKEN = {"hf-confidence(train)": "hf_confidence", "svip(train)": "svip", "adaedl(train)": "adaedl"}
_LEARNED = ("specdecpp(train)", "survival-token(train)", "rule-bandit(train)", "ppo-token(train)")
LEARNED_TOKEN = tuple(variant_name(n, la) for la in VARIANTS for n in _LEARNED)
TOKEN_POLICIES: tuple[str, ...] = tuple(
    variant_name(n, la) for la in VARIANTS for n in (*STATIC_TOKEN, *TUNED_TOKEN, *_LEARNED)
)
TOKEN_SPLITS: tuple[str, ...] = ("heldout",)
"""Splits on which token mode's rules run (their grids make them the slowest reference policies)."""


def has_token_data(data: _Data) -> bool:
    """True when every trace carries the draft's rollouts (token mode can replay them)."""
    return all(getattr(t, "has_rollouts", False) for t in data.traces)


def _make(kind: str, value: float, gammas: Sequence[int], lookahead: bool = True, **kw: Any) -> Any:
    from agents.base import make_agent
    from agents.stopping import THRESHOLD_GRIDS

    param = THRESHOLD_GRIDS[kind][0]
    return make_agent(kind, gammas=tuple(gammas), lookahead=lookahead, **{param: value, **kw})


def _make_fit(kind: str, data: _Data, train: np.ndarray, lookahead: bool = True) -> Any:
    """Agent ``kind`` fitted on the training episodes ``train`` with their cost models."""
    from agents.base import make_agent

    agent: Any = make_agent(kind, gammas=data.gammas, lookahead=lookahead, obs_version=data.obs_version)
    agent.fit([data.traces[int(i)] for i in train], [data.cm[int(i)] for i in train])
    return agent


def eval_token(
    agent: Any, data: _Data, idx: np.ndarray, learn: bool = False, per_episode: bool = True, seed: int = 0
) -> EvalResult:
    """Play ``agent`` (a token-mode rule) on episodes ``idx``, one scalar token env per cost model,
    in the agent's variant of token mode (its ``lookahead``).

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
        env = SpecKVReplayEnv(
            traces=[data.traces[int(idx[j])] for j in js],
            cost_model=cm,
            gammas=gam,
            control="token",
            lookahead=bool(getattr(agent, "lookahead", True)),
            obs_version=data.obs_version,
        )
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
    """Token-mode results on a data set, in each variant of :data:`VARIANTS`: the fixed-parameter
    evaluations over every episode are computed once and shared by the folds; fold-dependent fits
    (SpecDec++, the survival controller, the rule bandit, PPO) run per fold."""

    def __init__(
        self,
        data: _Data,
        grids: Mapping[str, Sequence[float]] | None = None,
        ppo_steps: int = 0,
        variants: Sequence[bool] = VARIANTS,
    ) -> None:
        from agents.stopping import THRESHOLD_GRIDS

        self.data = data
        self.ppo_steps = int(ppo_steps)
        self.variants = tuple(bool(v) for v in variants)
        self.all = np.arange(len(data.traces))
        self.grids = {k: tuple(grids[k]) if grids and k in grids else v[1] for k, v in THRESHOLD_GRIDS.items()}
        self._cache: dict[tuple[str, float, bool], EvalResult] = {}

    def full(self, kind: str, value: float, lookahead: bool = True) -> EvalResult:
        """The rule ``kind`` at parameter ``value`` on every episode (cached)."""
        key = (kind, float(value), bool(lookahead))
        if key not in self._cache:
            agent = _make(kind, value, self.data.gammas, lookahead, obs_version=self.data.obs_version)
            self._cache[key] = eval_token(agent, self.data, self.all)
        return self._cache[key]

    def choose(self, kind: str, seen: np.ndarray, lookahead: bool = True) -> dict[str, float]:
        """Per cost model (and ``"*"`` for all), the grid value of least total time on ``seen``."""
        groups = self.data.cost_group()
        times = {v: self.full(kind, v, lookahead).time[0] for v in self.grids[kind]}
        out = {"*": min(times, key=lambda v: float(times[v][seen].sum()))}
        for label in sorted({str(x) for x in groups[seen]}):
            sel = seen[groups[seen] == label]
            out[label] = min(times, key=lambda v: float(times[v][sel].sum()))
        return out

    def tuned(self, kind: str, choice: Mapping[str, float], idx: np.ndarray, lookahead: bool = True) -> EvalResult:
        """The tuned rule on ``idx``: per episode, the value chosen for its cost model."""
        groups = self.data.cost_group()
        parts = [
            select(self.full(kind, choice.get(str(groups[i]), choice["*"]), lookahead), np.array([i])) for i in idx
        ]
        return EvalResult(
            np.asarray(idx),
            np.concatenate([p.time for p in parts], axis=1),
            np.concatenate([p.steps for p in parts], axis=1),
            np.concatenate([p.gsum for p in parts], axis=1),
            np.concatenate([p.hist for p in parts], axis=0),
        )

    def specdecpp(self, train: np.ndarray, seen: np.ndarray, lookahead: bool = True) -> tuple[Any, dict[str, Any]]:
        """SpecDec++ fitted on ``train``, its threshold chosen on ``seen`` (least total time; the
        comparison passes the training episodes for both: validation selects among learners)."""
        from agents.stopping import SpecDecPP

        g, ver = self.data.gammas, self.data.obs_version
        head = SpecDecPP(gammas=g, lookahead=lookahead)
        fit = head.fit([self.data.traces[int(i)] for i in train])
        scores = {}
        for h in self.grids["specdecpp"]:
            agent = SpecDecPP(head.weights, h=h, gammas=g, lookahead=lookahead).set_obs_version(ver)
            scores[h] = float(eval_token(agent, self.data, seen).time[0].sum())
        h = min(scores, key=lambda v: scores[v])
        return SpecDecPP(head.weights, h=h, gammas=g, lookahead=lookahead).set_obs_version(ver), {**fit, "h": h}

    def on_fold(self, fold: Any) -> tuple[dict[str, EvalResult], dict[str, EvalResult], dict[str, Any]]:
        """Every token policy, in every variant, on the fold's test and validation episodes, and
        what was chosen."""
        test: dict[str, EvalResult] = {}
        val: dict[str, EvalResult] = {}
        info: dict[str, Any] = {}
        for la in self.variants:
            t, v, i = self._on_fold(fold, la)
            test.update(t)
            val.update(v)
            info.update(i)
        return test, val, info

    def _on_fold(self, fold: Any, la: bool) -> tuple[dict[str, EvalResult], dict[str, EvalResult], dict[str, Any]]:
        """:meth:`on_fold` in one variant (``la``: lookahead), under the variant's names."""
        test: dict[str, EvalResult] = {}
        val: dict[str, EvalResult] = {}
        info: dict[str, Any] = {}

        def put(name: str, run: Any) -> None:
            test[variant_name(name, la)] = run(fold.test)
            if fold.val.size:
                val[variant_name(name, la)] = run(fold.val)

        for name, (kind, value) in STATIC_TOKEN.items():
            r = self.full(kind, value, la)
            put(name, lambda idx, r=r: select(r, idx))
        for name, kind in TUNED_TOKEN.items():
            choice = self.choose(kind, fold.seen, la)
            info[variant_name(name, la)] = choice
            put(name, lambda idx, kind=kind, choice=choice: self.tuned(kind, choice, idx, la))
        agent, fit = self.specdecpp(fold.train, fold.train, la)
        info[variant_name("specdecpp(train)", la)] = fit
        put("specdecpp(train)", lambda idx: eval_token(agent, self.data, idx))
        surv = _make_fit("survival_token", self.data, fold.train, la)
        info[variant_name("survival-token(train)", la)] = {
            "rho": surv.summary.get("rho"),
            "auc_reach": surv.summary.get("auc_reach"),
        }
        put("survival-token(train)", lambda idx: eval_token(surv, self.data, idx))
        bandit = self.rule_bandit(fold.train, lookahead=la)
        info[variant_name("rule-bandit(train)", la)] = {"pulls": bandit.ucb.stats[0].tolist(), "rules": bandit.rules}
        put("rule-bandit(train)", lambda idx: eval_token(bandit, self.data, idx, learn=True))
        if self.ppo_steps > 0:
            ppo = self.ppo(fold.train, lookahead=la)
            info[variant_name("ppo-token(train)", la)] = {"steps": int(ppo.timesteps)}
            put("ppo-token(train)", lambda idx: eval_token(ppo, self.data, idx))
        return test, val, info

    def ppo(self, train: np.ndarray, seed: int = 0, lookahead: bool = True) -> Any:
        """Token mode's PPO (:class:`agents.ppo.PPOAgent`, ``control="token"``: observation and
        reward normalisation, discount 1, the budget's end terminal) trained on the training
        episodes for ``ppo_steps`` decisions on the vector replay env, in the variant ``lookahead``."""
        from agents.training import train_agent

        return train_agent(
            "ppo",
            traces=[self.data.traces[int(i)] for i in train],
            steps=self.ppo_steps,
            seed=seed,
            progress=False,
            n_envs=64,
            env_kwargs={**self.data.env_kwargs(), "control": "token", "lookahead": lookahead},
            agent_kwargs={"n_steps": 128, "batch_size": 1024, "n_epochs": 4},
        )

    def rule_bandit(self, train: np.ndarray, seed: int = 0, lookahead: bool = True) -> Any:
        """The bandit over stopping rules, trained online on the training episodes (one pass,
        in a seeded random order)."""
        from agents.base import make_agent

        agent = make_agent(
            "rule_bandit", seed=seed, gammas=self.data.gammas, lookahead=lookahead, obs_version=self.data.obs_version
        )
        order = np.random.default_rng(seed).permutation(train)
        eval_token(agent, self.data, order, learn=True, per_episode=False)
        return agent
