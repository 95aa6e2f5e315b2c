"""Token mode's agents: the per-token stopping rules inference engines and papers use.

In token mode (``control="token"``) an agent sees, at each decision, the step-level features
plus the signals of the distribution the next token would be drafted from, the tokens drafted
so far in the step, the product of their own draft probabilities and the last one's
(:data:`speckv_env.core.TOKEN_OBS_SPEC`), and answers 1 (draft one more) or 0 (verify).

- :class:`HFConfidence` (``hf_confidence``): Hugging Face assisted generation's default since
  transformers 4.45 (``assistant_confidence_threshold = 0.4``): draft a token, and keep drafting
  while the drafted token's own probability is at least the threshold (the token that falls
  below it is kept and verified). With a threshold chosen on training data it is the token-mode
  analogue of the best fixed gamma (:func:`tune_threshold`).
- :class:`EntropyStop` (``svip``): an SVIP-style rule: draft the next token while
  ``sqrt(H)`` of its distribution is at most ``h`` (entropy in nats).
- :class:`AdaEDL` (``adaedl``): AdaEDL's entropy lower bound on acceptance: draft the next token
  while ``1 - sqrt(c * H) >= lam``, with ``lam`` moved by the episode's acceptance rate
  (``lam - eta * (accept_ema - alpha_ref)``; the paper adapts its threshold to the observed
  acceptance rate too, our update rule is this simple one).
- :class:`SpecDecPP` (``specdecpp``): SpecDec++: a small acceptance head (logistic regression
  on per-token signals, :func:`token_features`) predicts each token's acceptance given the
  previous ones were accepted; stop when the predicted probability that some token of the
  candidate is rejected exceeds ``h``. Fitted on every training position of full-information
  traces (:func:`fit_acceptance_head`), ``h`` chosen on training data.

Every rule is a few float operations per decision (``speckv bench agents`` measures them).

**Variants.** Each rule takes ``lookahead`` (default True), the token-mode variant it runs in
(``speckv_env.base_env.TOKEN_MODE_DOC``). In draft-then-decide (``lookahead=False``) a decision
with j >= 1 drafted sees the distribution token j came from and its probability, which is how
these rules run in inference engines: draft a token, then judge it; so ``svip``, ``adaedl`` and
``specdecpp`` always draft the first token there (``hf_confidence`` does in both variants).
A rule refuses an env of the other variant (:func:`agents.base.check_token_variant`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from speckv_env.base_env import TOKEN_ACTIONS
from speckv_env.core import DEFAULT_GAMMAS, OBS_INDEX, TOKEN_OBS_DIM, TOKEN_OBS_SPEC, check_lookahead

from .base import Agent, check_token_variant, env_obs_version, register

_TOK = {name: i for i, (name, *_rest) in enumerate(TOKEN_OBS_SPEC)}
I_TOP1, I_ENT, I_MARGIN = _TOK["draft_top1"], _TOK["draft_entropy"], _TOK["draft_margin"]
# token mode's three fields are the observation's last three in every observation version
I_DRAFTED, I_SURV, I_LASTP = (_TOK[n] - TOKEN_OBS_DIM for n in ("drafted", "survival", "last_draft_p"))
I_EMA = OBS_INDEX["accept_ema"]
DRAFT, VERIFY = TOKEN_ACTIONS.index("draft"), TOKEN_ACTIONS.index("verify")


class StopRule(Agent):
    """Base of token-mode agents: ``act(obs)`` is 1 (draft one more) or 0 (verify).

    ``gammas`` names the step mode's gamma set; in token mode only its maximum matters (the
    env stops drafting there by force). ``lookahead``: the token-mode variant the rule runs in
    (True: look-ahead, False: draft-then-decide; module docstring); :meth:`bind` refuses an env
    of the other variant, and the config (so a saved agent) carries it."""

    control = "token"

    def __init__(self, gammas: Sequence[int] = DEFAULT_GAMMAS, lookahead: bool = True) -> None:
        super().__init__(gammas)
        self.lookahead = check_lookahead(lookahead)

    def bind(self, env: Any) -> Agent:
        u = getattr(env, "unwrapped", env)
        version = env_obs_version(env)
        if version is not None:
            self.check_obs_version(version)
        control = getattr(u, "control", "token")
        if control != "token":
            raise ValueError(
                f"{self.name} decides per drafted token: make the env with control='token' (got {control!r})"
            )
        check_token_variant(self.name, self.lookahead, env)
        return self

    def _config(self, **kw: Any) -> dict[str, Any]:
        """The config: the rule's parameters, the gammas and the variant."""
        return {**kw, "gammas": list(self.gammas), "lookahead": self.lookahead}


@register
class HFConfidence(StopRule):
    """Draft while the last drafted token's own probability is >= ``threshold`` (HF's default 0.4);
    always draft the first token. The same rule in both variants (``last_draft_p`` is the last
    drafted token's probability in each): in draft-then-decide it is Hugging Face's rule and cost
    exactly; in look-ahead it pays the forward past each token before deciding."""

    kind = "hf_confidence"

    def __init__(self, threshold: float = 0.4, gammas: Sequence[int] = DEFAULT_GAMMAS, lookahead: bool = True) -> None:
        super().__init__(gammas, lookahead)
        if not 0.0 <= threshold <= 1.0:
            raise ValueError(f"threshold must be in [0, 1], got {threshold}")
        self.threshold = float(threshold)

    def act(self, obs: np.ndarray) -> int:
        return DRAFT if obs[I_DRAFTED] == 0.0 or obs[I_LASTP] >= self.threshold else VERIFY

    def act_batch(self, obs: np.ndarray) -> np.ndarray:
        obs = np.asarray(obs)
        return ((obs[:, I_DRAFTED] == 0.0) | (obs[:, I_LASTP] >= self.threshold)).astype(np.int64)

    def get_config(self) -> dict[str, Any]:
        return self._config(threshold=self.threshold)


@register
class EntropyStop(StopRule):
    """SVIP-style: draft the next token while sqrt(entropy) of its distribution is <= ``h``
    (look-ahead); draft-then-decide, as SVIP runs: draft the first token, then draft another
    while sqrt(entropy) of the just-drafted token's distribution is <= ``h``."""

    kind = "svip"

    def __init__(self, h: float = 1.0, gammas: Sequence[int] = DEFAULT_GAMMAS, lookahead: bool = True) -> None:
        super().__init__(gammas, lookahead)
        if not h >= 0.0:
            raise ValueError(f"h must be >= 0, got {h}")
        self.h = float(h)
        self._h2 = self.h * self.h

    def act(self, obs: np.ndarray) -> int:
        if not self.lookahead and obs[I_DRAFTED] == 0.0:
            return DRAFT
        return DRAFT if obs[I_ENT] <= self._h2 else VERIFY

    def act_batch(self, obs: np.ndarray) -> np.ndarray:
        obs = np.asarray(obs)
        go = obs[:, I_ENT] <= self._h2
        if not self.lookahead:
            go |= obs[:, I_DRAFTED] == 0.0
        return go.astype(np.int64)

    def get_config(self) -> dict[str, Any]:
        return self._config(h=self.h)


@register
class AdaEDL(StopRule):
    """Entropy lower bound on acceptance, ``1 - sqrt(c * H)``, against an adaptive threshold: H of
    the next token's distribution (look-ahead), or, after always drafting the first token, of the
    just-drafted token's (draft-then-decide, as AdaEDL runs)."""

    kind = "adaedl"

    def __init__(
        self,
        lam: float = 0.4,
        c: float = 0.5,
        eta: float = 0.5,
        alpha_ref: float = 0.5,
        gammas: Sequence[int] = DEFAULT_GAMMAS,
        lookahead: bool = True,
    ) -> None:
        super().__init__(gammas, lookahead)
        if c <= 0 or not (math.isfinite(lam) and math.isfinite(eta) and 0.0 <= alpha_ref <= 1.0):
            raise ValueError(
                f"adaedl: need c > 0, finite lam and eta, alpha_ref in [0, 1] (got {c}, {lam}, {eta}, {alpha_ref})"
            )
        self.lam, self.c, self.eta, self.alpha_ref = float(lam), float(c), float(eta), float(alpha_ref)

    def act(self, obs: np.ndarray) -> int:
        if not self.lookahead and obs[I_DRAFTED] == 0.0:
            return DRAFT
        lam = self.lam - self.eta * (float(obs[I_EMA]) - self.alpha_ref)
        return DRAFT if 1.0 - math.sqrt(self.c * float(obs[I_ENT])) >= lam else VERIFY

    def act_batch(self, obs: np.ndarray) -> np.ndarray:
        obs = np.asarray(obs, dtype=np.float64)
        lam = self.lam - self.eta * (obs[:, I_EMA] - self.alpha_ref)
        go = 1.0 - np.sqrt(self.c * obs[:, I_ENT]) >= lam
        if not self.lookahead:
            go |= obs[:, I_DRAFTED] == 0.0
        return go.astype(np.int64)

    def get_config(self) -> dict[str, Any]:
        return self._config(lam=self.lam, c=self.c, eta=self.eta, alpha_ref=self.alpha_ref)


# ---- SpecDec++: an acceptance head ---------------------------------------------------------

FEATURES: tuple[str, ...] = ("bias", "top1", "entropy", "margin", "logit_top1", "drafted", "log_survival", "last_p")


def token_features(top1, entropy, margin, drafted, survival, last_p):
    """The acceptance head's features (numpy arrays or floats, broadcasting): one definition for
    fitting (from traces) and acting (from observations). Order: :data:`FEATURES`."""
    t = np.clip(np.asarray(top1, dtype=np.float64), 1e-6, 1 - 1e-6)
    s = np.clip(np.asarray(survival, dtype=np.float64), 1e-12, 1.0)
    cols = (np.ones_like(t), t, entropy, margin, np.log(t) - np.log1p(-t), drafted, np.log(s), last_p)
    return np.stack([np.broadcast_to(np.asarray(c, dtype=np.float64), t.shape) for c in cols], axis=-1)


def head_training_data(traces: Sequence[Any], gamma_max: int, lookahead: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """(X, y) over every training decision of ``traces`` (speckv-trace/2): at position t with i
    rollout tokens (0-based: tokens 0 .. i - 1) already drafted and accepted, whether token i is
    accepted (``accept[t + i]``), with the features the env shows when that is the question.
    Look-ahead: the decision with i drafted (the distribution token i is drafted from,
    ``roll_*[t, i]``, i / gamma_max, the survival product of tokens < i, token i - 1's own
    probability). Draft-then-decide (``lookahead=False``): the decision right after drafting
    token i (``roll_*[t, i]`` again: the distribution it came from, (i + 1) / gamma_max, the survival
    product through token i, and token i's own probability ``roll_p[t, i]``)."""
    Xs, ys = [], []
    for tr in traces:
        if not tr.has_rollouts:
            raise ValueError(f"{tr.source}: trace {tr.trace_id!r} has no rollouts (speckv-trace/2 needed)")
        n, G = tr.n, min(tr.gamma_max, gamma_max)
        acc = tr.accept
        for i in range(G):
            t = np.arange(n - i)
            reach = np.ones(n - i, dtype=bool) if i == 0 else np.all([acc[t + k] for k in range(i)], axis=0)
            t = t[reach]
            if not t.size:
                break
            j = i if lookahead else i + 1  # tokens drafted at the decision
            p = tr.roll_p[t, :j].astype(np.float64)
            surv = np.prod(p, axis=1) if j else np.ones(t.size)
            last = p[:, -1] if j else np.ones(t.size)
            Xs.append(
                token_features(
                    tr.roll_top1[t, i], tr.roll_entropy[t, i], tr.roll_margin[t, i], j / gamma_max, surv, last
                )
            )
            ys.append(acc[t + i])
    if not Xs:
        raise ValueError("no training decisions: the traces are empty")
    return np.concatenate(Xs), np.concatenate(ys).astype(np.float64)


def fit_logistic(X: np.ndarray, y: np.ndarray, l2: float = 1e-3, iters: int = 50) -> np.ndarray:
    """L2-regularised logistic regression by Newton's method (features standardised inside)."""
    mu = X[:, 1:].mean(axis=0)
    sd = X[:, 1:].std(axis=0) + 1e-9
    Z = np.concatenate([X[:, :1], (X[:, 1:] - mu) / sd], axis=1)
    w = np.zeros(Z.shape[1])
    reg = np.full(Z.shape[1], l2 * len(y))
    reg[0] = 0.0
    for _ in range(iters):
        p = 1.0 / (1.0 + np.exp(-(Z @ w)))
        g = Z.T @ (p - y) + reg * w
        H = (Z * (p * (1 - p))[:, None]).T @ Z + np.diag(reg + 1e-9)
        step = np.linalg.solve(H, g)
        w -= step
        if np.abs(step).max() < 1e-10:
            break
    # fold the standardisation back into raw-feature weights
    raw = np.empty_like(w)
    raw[1:] = w[1:] / sd
    raw[0] = w[0] - float(np.sum(w[1:] * mu / sd))
    return raw


def auc(score: np.ndarray, y: np.ndarray) -> float:
    """Area under the ROC curve (the probability a positive outranks a negative; ties half)."""
    y = np.asarray(y, dtype=bool)
    pos, neg = int(y.sum()), int((~y).sum())
    if not pos or not neg:
        return float("nan")
    order = np.argsort(score, kind="mergesort")
    ranks = np.empty(len(score))
    s = np.asarray(score)[order]
    i = 0
    while i < len(s):  # average ranks over ties
        j = i
        while j + 1 < len(s) and s[j + 1] == s[i]:
            j += 1
        ranks[order[i : j + 1]] = 0.5 * (i + j) + 1.0
        i = j + 1
    return float((ranks[y].sum() - pos * (pos + 1) / 2) / (pos * neg))


@register
class SpecDecPP(StopRule):
    """Stop when the predicted probability that some candidate token is rejected exceeds ``h``:
    look-ahead, the candidate includes the next token (predicted from its distribution);
    draft-then-decide, as SpecDec++ runs, the tokens drafted so far (the first always drafted, each
    next one judged from its own distribution and probability once drafted). The head is fitted
    on the variant's observations (:func:`head_training_data`)."""

    kind = "specdecpp"

    def __init__(
        self,
        weights: Sequence[float] | np.ndarray | None = None,
        h: float = 0.5,
        gammas: Sequence[int] = DEFAULT_GAMMAS,
        lookahead: bool = True,
    ) -> None:
        super().__init__(gammas, lookahead)
        self.weights = np.zeros(len(FEATURES)) if weights is None else np.asarray(weights, dtype=np.float64)
        if self.weights.shape != (len(FEATURES),):
            raise ValueError(
                f"specdecpp: {len(FEATURES)} weights expected ({', '.join(FEATURES)}), got {self.weights.shape}"
            )
        if not 0.0 <= h <= 1.0:
            raise ValueError(f"h must be in [0, 1], got {h}")
        self.h = float(h)
        self.gmax = max(self.gammas)
        self._keep = 1.0  # predicted probability that every token drafted so far is accepted

    def fit(self, traces: Sequence[Any]) -> dict[str, float]:
        """Fit the acceptance head on ``traces`` (training split); returns its training AUC."""
        X, y = head_training_data(traces, self.gmax, self.lookahead)
        self.weights = fit_logistic(X, y)
        return {"auc": auc(X @ self.weights, y), "decisions": float(len(y)), "accept_rate": float(y.mean())}

    def accept_prob(self, obs: np.ndarray) -> np.ndarray:
        obs = np.asarray(obs, dtype=np.float64)
        x = token_features(
            obs[..., I_TOP1],
            obs[..., I_ENT],
            obs[..., I_MARGIN],
            obs[..., I_DRAFTED],
            obs[..., I_SURV],
            obs[..., I_LASTP],
        )
        return 1.0 / (1.0 + np.exp(-(x @ self.weights)))

    def reset(self) -> None:
        self._keep = 1.0

    def act_batch(self, obs: np.ndarray) -> np.ndarray:
        raise NotImplementedError(
            "specdecpp keeps the product of its predicted acceptances over the step's decisions, one "
            "state per episode: call act() once per env (a batch of rows from different envs would share it)"
        )

    def act(self, obs: np.ndarray) -> int:
        if obs[I_DRAFTED] == 0.0:
            self._keep = 1.0
            if not self.lookahead:  # draft-then-decide: draft, then judge the drafted token
                return DRAFT
        a = obs.astype(np.float64)
        t = min(max(a[I_TOP1], 1e-6), 1 - 1e-6)
        s = min(max(a[I_SURV], 1e-12), 1.0)
        w = self.weights
        z = (
            w[0]
            + w[1] * t
            + w[2] * a[I_ENT]
            + w[3] * a[I_MARGIN]
            + w[4] * (math.log(t) - math.log1p(-t))
            + w[5] * a[I_DRAFTED]
            + w[6] * math.log(s)
            + w[7] * a[I_LASTP]
        )
        keep = self._keep / (1.0 + math.exp(-z)) if z > -700 else 0.0
        if 1.0 - keep > self.h:
            return VERIFY
        self._keep = keep
        return DRAFT

    def get_config(self) -> dict[str, Any]:
        return self._config(weights=[float(x) for x in self.weights], h=self.h)


# ---- thresholds chosen on training data -------------------------------------------------------

THRESHOLD_GRIDS: dict[str, tuple[str, tuple[float, ...]]] = {
    "hf_confidence": ("threshold", (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95)),
    "svip": ("h", (0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0, 2.5, 3.0)),
    "adaedl": ("lam", (-0.4, -0.2, 0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.8)),
    "specdecpp": ("h", (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)),
}
"""Per rule: the parameter chosen on training data and its candidate values."""


def tune_threshold(
    make: Callable[[float], StopRule], grid: Sequence[float], score: Callable[[StopRule], float]
) -> tuple[StopRule, dict[float, float]]:
    """The rule whose parameter maximises ``score`` (e.g. tokens/s over the training episodes);
    ties go to the first value of ``grid``. Returns the agent and every value's score."""
    scores: dict[float, float] = {}
    best: StopRule | None = None
    for v in grid:
        agent = make(float(v))
        scores[float(v)] = s = float(score(agent))
        if best is None or s > scores[_param(best)]:
            best = agent
    assert best is not None
    return best, scores


def _param(agent: StopRule) -> float:
    name = THRESHOLD_GRIDS[agent.kind][0]
    return float(getattr(agent, name))


def run_token_episodes(agent: StopRule, env: Any, episodes: Sequence[int]) -> tuple[int, float]:
    """Play ``agent`` on the token-mode ``env`` for ``episodes``; (tokens, modelled seconds)."""
    agent.bind(env)
    tokens, seconds = 0, 0.0
    for ep in episodes:
        obs, info = env.reset(options={"episode": int(ep)})
        agent.begin_episode(env, info)
        done = False
        while not done:
            obs, _, te, tu, info = env.step(agent.act(obs))
            done = te or tu
        s = info["episode_summary"]
        tokens += int(s["tokens"])
        seconds += float(s["modelled_s"])
    return tokens, seconds


# ---- a bandit over stopping rules -------------------------------------------------------------


@register
class RuleBandit(StopRule):
    """A bandit whose arms are stopping rules: at each step's first decision it picks a rule
    (UCB1 on the renewal throughput reward, :mod:`agents.bandits`), which then makes every
    decision of that step; the step's emitted tokens and modelled time (summed over its
    decisions) are the arm's outcome. Rules by registry name and parameters, e.g.
    ``[("hf_confidence", {"threshold": 0.4}), ("svip", {"h": 1.0})]``."""

    kind = "rule_bandit"
    learns = True

    DEFAULT_RULES: tuple[tuple[str, dict[str, Any]], ...] = (
        ("hf_confidence", {"threshold": 0.4}),
        ("hf_confidence", {"threshold": 0.7}),
        ("svip", {"h": 1.0}),
        ("adaedl", {"lam": 0.4}),
    )

    def __init__(
        self,
        rules: Sequence[tuple[str, dict[str, Any]]] | None = None,
        c: float = 0.5,
        seed: int | None = 0,
        gammas: Sequence[int] = DEFAULT_GAMMAS,
        lookahead: bool = True,
    ) -> None:
        from .bandits import UCB1
        from .base import AGENTS, _ensure_registered, make_agent

        super().__init__(gammas, lookahead)
        _ensure_registered()
        self.rules = [(str(k), dict(kw)) for k, kw in (rules if rules is not None else self.DEFAULT_RULES)]
        if not self.rules:
            raise ValueError("rule_bandit needs at least one rule")
        self.arms: list[StopRule] = []
        for k, kw in self.rules:
            cls = AGENTS.get(k)
            variant = {"lookahead": self.lookahead} if cls is not None and issubclass(cls, StopRule) else {}
            agent = make_agent(k, **{"gammas": self.gammas, **kw, **variant})
            if not isinstance(agent, StopRule):
                raise ValueError(f"rule_bandit: {k!r} is not a token-mode stopping rule")
            self.arms.append(agent)
        self.c, self.seed = float(c), seed
        self.ucb = UCB1(c=c, seed=seed, gammas=tuple(range(len(self.arms))))
        self.rng = self.ucb.rng
        self._arm = 0
        self._e = self._t = 0.0

    def act_batch(self, obs: np.ndarray) -> np.ndarray:
        raise NotImplementedError(
            "rule_bandit keeps the step's rule and statistics per episode: call act() once per env"
        )

    def act(self, obs: np.ndarray) -> int:
        if obs[I_DRAFTED] == 0.0:
            self._arm = self.ucb.act(obs)
        return self.arms[self._arm].act(obs)

    def learn(self, obs, action, reward, next_obs, info) -> None:
        self._e += float(info.get("emitted", 0))
        self._t += float(info.get("modelled_time", 0.0))
        if "gamma" in info:  # the step's verification: the arm's outcome is known
            self.ucb._record(self._arm, 0.0, {"emitted": self._e, "modelled_time": self._t})
            self._e = self._t = 0.0

    def reset(self) -> None:
        self._e = self._t = 0.0
        for a in self.arms:
            a.reset()

    def get_config(self) -> dict[str, Any]:
        return self._config(rules=[[k, kw] for k, kw in self.rules], c=self.c, seed=self.seed)

    def get_state(self) -> dict[str, Any]:
        return {"ucb": self.ucb.get_state()}

    def set_state(self, state: dict[str, Any]) -> None:
        self.ucb.set_state(state["ucb"])
        self.rng = self.ucb.rng
