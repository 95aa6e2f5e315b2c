"""A survival (ordinal) controller: a discrete-time hazard model of the accepted run length,
fitted on every training position of full-information traces, choosing by the renewal objective.

**The model.** From the step observation at a step starting at t (:data:`speckv_env.core.OBS_SPEC`),
one logistic hazard per draft token j = 1..G (G = max gamma)::

    h_j(obs) = P(L_t >= j | L_t >= j - 1, obs) = sigmoid(W[j - 1] . x(obs)),    x = STEP_FEATURES
    S_j(obs) = P(L_t >= j | obs) = h_1 * ... * h_j

fitted, per j, on every training position t whose run reaches j - 1 (``L_t >= j - 1``) and whose
token j - 1 is still inside the trace (L is capped there); L_t is the trace's run length.

**Features of every position (path-dependent ones included).** The draft signals at t are trace
columns, but the EMA, the acceptance mean and the previous step's outcome depend on the path
that arrived at t. We replay each training trace once under a behaviour policy with the env's
own :class:`~speckv_env.core.ObservationBuilder` and the step rule (:mod:`replay.steprule`):
a step start gets the observation the env shows there; a position u inside the accepted run of
the behaviour's step at s (s < u <= s + k) gets the observation of the path that is the
behaviour's up to s and then one step at s of gamma u - s - 1, fully accepted (a legal path
that ends at u: that gamma accepts all its tokens because L_s >= k >= u - s - 1). So every
position gets the observation of a path that reaches it, through the env's own code, and the
arrivals after a rejection are the behaviour's own. The behaviour is first the best fixed gamma
on the training traces, then (``refits``, default 1) the fitted controller itself. Why not the
path-independent features alone: the path's acceptance statistics carry information the draft's
signals do not (on the partial real speckv-trace/2 recording, held-out AUC of "the next token is
accepted": 0.80 with them, 0.78 without, 0.77 from the signals alone).

**The decision (renewal objective).** With C(g) = S_1 + ... + S_g the expected accepted tokens
at gamma g and T(g, k) the cost model's step time in target-step units (t_target = 1)::

    gamma = argmax_g  1 + C(g) - rho * E[T(g, k)],
    E[T(g, k)] = T(g, 0) + S_g * (T(g, g) - T(g, 0))     (the sampled bonus draw when k = g)

where rho is the long-run emitted tokens per target-step time of the controller itself: the
fixed point of rho <- (tokens / time of the controller with rho on the training traces),
started at the best fixed gamma's rate (Dinkelbach's iteration; the renewal-reward theorem
makes maximising E[reward] - rho * E[time] per step the optimal policy's rule at the optimal
rate). rho is kept per compression level (the observation's one-hot) and overall.

**Token mode** (``survival_token``, ``control="token"``): at a decision with j tokens drafted,
``P1 = P(L_t >= j + 1 | obs_j)`` is, at j = 0, the step model's h_1 (the token observation's
first 13 values are then the step observation), and for j >= 1 the product of two logistic
heads on :func:`agents.stopping.token_features` of the token observation (the next
distribution's signals, drafted, survival, last_draft_p): a reach head P(L_t >= j | obs_j),
fitted on every decision point (t, j) a step at t can reach whatever became of the tokens drafted
before (:func:`token_decision_data`), times SpecDec++'s conditional acceptance head
P(token j accepted | tokens < j accepted, obs_j), fitted on the decisions whose drafted tokens
were all accepted (:func:`agents.stopping.head_training_data`). The policy keeps no state
within a step (so ``act_batch`` serves vector envs). Tokens further on use the step model's
conditional hazards at the next distribution (the observation's first 13 values: with the
drafted tokens accepted they are the step observation of position t + j)::

    P(L_t >= j + m | obs_j) = P1 * h_2 * ... * h_m        (h from the step model on obs_j[:13])

Draft one more iff  max_m  [sum_{i<=m} P(L_t >= j + i | obs_j)] - rho * (T_stop(j + m) - T_stop(j)) > 0,
with T_stop(j') = (j' + 1) t_draft + t_verify[j'] (a chosen stop looks one distribution ahead),
and at the cap G the forced stop's G t_draft + t_verify[G] (+ t_draft * P(L_t >= G) when
sampling), all over t_target; rho is token mode's own fixed point (token-mode replays of the
training traces), started at the step controller's.

In token mode's draft-then-decide variant (``survival_token`` with ``lookahead=False``) a
decision with j >= 1 drafted sees the distribution token j came from and its probability: the
heads are fitted on those observations (reach: P(L_t >= j - 1 | obs_j), conditional: P(token j
accepted | tokens < j accepted, obs_j)), P(L_t >= j | obs_j) is their product, further tokens take
the step model's h_2, h_3, ... on obs_j's first 13 values, and T_stop(j') is the step mode's
T(j', 0) (plus t_draft * P(L_t >= j') when sampling, j' >= 1: no stop looks ahead).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from speckv_env.core import (
    COMPRESSION_LEVELS,
    DEFAULT_GAMMAS,
    OBS_DIM,
    OBS_INDEX,
    OBS_V2_FEATURES,
    CostModel,
    ObservationBuilder,
    check_lookahead,
    compression_level,
    obs_dim,
    obs_version_of_dim,
)

from .base import I_COST_RATIO, Agent, CostModelMixin, check_token_variant, cost_from_ratio, register
from .stopping import (
    DRAFT,
    FEATURES,
    I_DRAFTED,
    I_ENT,
    I_LASTP,
    I_MARGIN,
    I_SURV,
    I_TOP1,
    VERIFY,
    auc,
    fit_logistic,
    head_training_data,
    token_features,
)

STEP_FEATURES: tuple[str, ...] = (
    "bias",
    "draft_top1",
    "draft_entropy",
    "draft_margin",
    "logit_top1",
    "accept_ema",
    "accept_mean",
    "last_gamma",
    "last_accepted",
    "last_full_accept",
    "position",
    "compression_none",
    "compression_int8",
    "compression_nf4",
)
"""The step hazard model's features of the step observation (:func:`step_features`); on
observation version 2 the five features of :data:`speckv_env.core.OBS_V2_FEATURES` follow
(:func:`step_feature_names`)."""
FEATURE_VERSION = "survival-features/1"
_COLS = [OBS_INDEX[n] for n in STEP_FEATURES[5:]]
_I_COMP = OBS_INDEX["compression_none"]
_V2_COLS = list(range(OBS_DIM, OBS_DIM + len(OBS_V2_FEATURES)))


def step_feature_names(obs_version: int = 1) -> tuple[str, ...]:
    """The hazard model's features on observations of ``obs_version``."""
    return STEP_FEATURES + (tuple(s[0] for s in OBS_V2_FEATURES) if obs_version == 2 else ())


CostSource = CostModel | Mapping[str, CostModel] | Sequence[CostModel]


def step_features(obs: np.ndarray, obs_version: int = 1) -> np.ndarray:
    """:func:`step_feature_names` of step observations (``(..., >= 13)``, version 2 ``>= 18``; float64)."""
    o = np.asarray(obs, dtype=np.float64)
    t = np.clip(o[..., 0], 1e-6, 1 - 1e-6)
    head = np.stack((np.ones_like(t), t, o[..., 1], o[..., 2], np.log(t) - np.log1p(-t)), axis=-1)
    return np.concatenate((head, o[..., _COLS + (_V2_COLS if obs_version == 2 else [])]), axis=-1)


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.clip(z, -60.0, 60.0)))


def _cost_of(costs: CostSource, i: int, compression: str) -> CostModel:
    if isinstance(costs, CostModel):
        return costs
    if isinstance(costs, Mapping):
        if compression in costs:
            return costs[compression]
        level = compression_level(compression)
        for k, v in costs.items():
            if compression_level(k) == level:
                return v
        raise ValueError(f"no cost model for compression {compression!r} (have {sorted(costs)})")
    return costs[i]


# ---- every position's observation: a replay under a behaviour policy -----------------------------


def replay_observations(
    trace: Any, cost: CostModel, gammas: Sequence[int], choose: Callable[[np.ndarray], int], obs_version: int = 1
) -> tuple[np.ndarray, int, float]:
    """Observations (of ``obs_version``) at every position of ``trace`` (see the module
    docstring), and the behaviour's (tokens, modelled seconds). ``choose(obs)`` is the
    behaviour: a gamma index. Version 2's features come from :func:`replay.backend.trace_features`,
    as the replay env shows them."""
    from replay import steprule

    G = max(gammas)
    b = ObservationBuilder(G, trace.max_new_tokens, trace.compression, cost.cost_ratio)
    n, mnt = trace.n, trace.max_new_tokens
    L, acc = trace.L.tolist(), trace.accept.tolist()
    top1, ent, mar = trace.sig_top1.tolist(), trace.sig_entropy.tolist(), trace.sig_margin.tolist()
    if obs_version == 2:
        from replay.backend import trace_features

        feats: Any = trace_features(trace)
    else:
        feats = [None] * n
    obs = np.empty((n, obs_dim(obs_version)), dtype=np.float32)
    t, seconds = 0, 0.0
    while t < n:
        obs[t] = o = b.observe_values(top1[t], ent[t], mar[t], t, feats[t])
        geff, k, ones, rejected = steprule.step(L[t], acc[t], gammas[choose(o)], mnt - 1 - t)
        seconds += cost.step_time(geff, k, trace.sampling)
        for u in range(t + 1, t + k + 1):  # inside the accepted run: arrive by one full step
            c = copy.copy(b)
            g = u - t - 1
            c.update_run(g, g, max(g, 1), False)  # gamma 0 reveals the (accepted) event at t
            obs[u] = c.observe_values(top1[u], ent[u], mar[u], u, feats[u])
        b.update_run(geff, k, ones, rejected)
        t += k + 1
    return obs, n, seconds


def hazard_data(obs: np.ndarray, trace: Any, G: int, obs_version: int = 1) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Per j = 1..G: (features, label) of the positions whose run reaches j - 1 with token j - 1
    inside the trace; label ``L_t >= j``."""
    L = trace.L.astype(np.int64)
    n = trace.n
    room = n - 1 - np.arange(n)  # the most tokens a step at t can accept
    X = step_features(obs, obs_version)
    xs, ys = [], []
    for j in range(1, G + 1):
        m = (j - 1 <= L) & (room >= j)
        xs.append(X[m])
        ys.append((L[m] >= j).astype(np.float64))
    return xs, ys


def token_decision_data(
    traces: Sequence[Any], G: int, first: int = 1, ahead: int = 0, lookahead: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """(X, y) over every decision point (t, j), ``first <= j < G``, that a token-mode step at t
    can reach, whatever became of the tokens drafted before (j below the budget's cap):
    :func:`agents.stopping.token_features` of the observation there in the variant
    (``lookahead``: the distribution of token j + 1, ``roll_*[t, j]``; draft-then-decide: the one
    token j came from, ``roll_*[t, j - 1]``), label ``L_t >= j + ahead`` (look-ahead's default: the
    j drafted tokens are all accepted), ``L_t >= j - 1 + ahead`` in draft-then-decide (the tokens
    before the just-drafted one: its own acceptance is the conditional head's)."""
    Xs, ys = [], []
    for tr in traces:
        if not tr.has_rollouts:
            raise ValueError(f"{tr.source}: trace {tr.trace_id!r} has no rollouts (speckv-trace/2 needed)")
        if tr.gamma_max < G:
            raise ValueError(f"{tr.source}: trace {tr.trace_id!r} records runs up to {tr.gamma_max} < {G}")
        n, L = tr.n, tr.L.astype(np.int64)
        for j in range(first, G):
            t = np.arange(min(n, max(tr.max_new_tokens - 1 - j, 0)))
            if not t.size:
                break
            p = tr.roll_p[t, :j].astype(np.float64)
            surv = np.prod(p, axis=1) if j else np.ones(t.size)
            last = p[:, -1] if j else np.ones(t.size)
            r = j if lookahead else j - 1
            sig = (tr.roll_top1[t, r], tr.roll_entropy[t, r], tr.roll_margin[t, r])
            Xs.append(token_features(*sig, j / G, surv, last))
            ys.append(L[t] >= r + ahead)
    if not Xs:
        return np.zeros((0, len(FEATURES))), np.zeros(0)
    return np.concatenate(Xs), np.concatenate(ys).astype(np.float64)


def fit_head(X: np.ndarray, y: np.ndarray, l2: float) -> np.ndarray | None:
    """A logistic head (:func:`agents.stopping.fit_logistic`); with one class only, the bias at
    the smoothed rate (the weights would run off); None without data."""
    if not len(y):
        return None
    if y.min() == y.max():
        w = np.zeros(X.shape[1])
        rate = (y.sum() + 0.5) / (len(y) + 1.0)
        w[0] = math.log(rate) - math.log1p(-rate)
        return w
    return fit_logistic(X, y, l2=l2)


def base_all(cm: CostModel, G: int, sampling: bool) -> np.ndarray:
    """``T(j, 0)`` for j = 0 .. G: the step mode's step with none accepted (seconds)."""
    return np.array([cm.step_time(j, 0, sampling) for j in range(G + 1)])


def _constant(a: int) -> Callable[[np.ndarray], int]:
    def choose(obs: np.ndarray) -> int:
        return a

    return choose


def _fixed_rates(
    traces: Sequence[Any], cms: Sequence[CostModel], gammas: Sequence[int]
) -> tuple[dict[str, int], dict[str, float]]:
    """Per compression level (and ``"*"``): the fixed gamma index of least total time on
    ``traces`` and its rate (tokens per target-step time)."""
    levels = [compression_level(tr.compression) for tr in traces]
    tok = np.zeros((len(gammas), len(traces)))
    tim = np.zeros((len(gammas), len(traces)))
    for a in range(len(gammas)):
        for i, (tr, cm) in enumerate(zip(traces, cms)):
            _, n, s = replay_observations(tr, cm, gammas, _constant(a))
            tok[a, i], tim[a, i] = n, s / cm.t_target
    best: dict[str, int] = {}
    rate: dict[str, float] = {}
    for lv in ("*", *sorted(set(levels))):
        sel = np.array([lv in ("*", x) for x in levels])
        r = tok[:, sel].sum(axis=1) / tim[:, sel].sum(axis=1)
        best[lv] = int(np.argmax(r))
        rate[lv] = float(r.max())
    return best, rate


@register
class SurvivalController(CostModelMixin, Agent):
    """Step mode: gamma = argmax_g 1 + C(g) - rho * E[T(g, k)] under a hazard model of the run
    length (module docstring). Fit with :meth:`fit` on training traces."""

    kind = "survival"
    obs_state = True  # learned on one observation version
    control = "step"

    def __init__(
        self,
        gammas: Sequence[int] = DEFAULT_GAMMAS,
        cost_model: CostModel | dict | None = None,
        sampling: bool = False,
        verify_slope: float = 0.05,
        l2: float = 1e-3,
        refits: int = 1,
        iterations: int = 6,
    ) -> None:
        Agent.__init__(self, gammas)
        self._init_cost(cost_model, sampling, verify_slope)
        self.G = max(self.gammas)
        if self.G < 1:
            raise ValueError(f"{self.kind}: needs a gamma set with a positive gamma, got {self.gammas}")
        self.l2, self.refits, self.iterations = float(l2), int(refits), int(iterations)
        self.weights = np.zeros((self.G, len(step_feature_names(self.obs_version))))
        # token mode: the reach head (row 0) and the conditional acceptance head (row 1)
        self.token_weights = np.zeros((2, len(FEATURES)))
        # unfitted: rho = 1 token per target step (plain decoding's rate), hazards 1/2
        self.rho: dict[str, float] = {"*": 1.0}
        self.summary: dict[str, Any] = {"fitted": False}
        self._gam = np.asarray(self.gammas, dtype=np.int64)
        self._cache: dict[tuple[int, bool], tuple[CostModel, dict[str, Any]]] = {}
        self._ratio_cms: dict[float, CostModel] = {}
        self._lists: tuple[Any, ...] = (None, None)

    def _on_obs_version(self) -> None:
        n = len(step_feature_names(self.obs_version))
        if self.weights.shape[1] != n:
            if self.summary.get("fitted"):
                raise ValueError(f"{self.kind}: fitted on another observation version: it cannot change version")
            self.weights = np.zeros((self.G, n))

    # ---- env and cost model ----------------------------------------------------------
    def bind(self, env: Any) -> Any:
        u = getattr(env, "unwrapped", env)
        control = getattr(u, "control", "step")
        if control != self.control:
            other = "survival_token" if self.control == "step" else "survival"
            raise ValueError(
                f"{self.kind} is a control={self.control!r} agent but the env has control={control!r}: "
                f"make the env with control={self.control!r}, or use {other!r}"
            )
        return CostModelMixin.bind(self, env)

    def _cost_for(self, cost_ratio: float) -> CostModel:
        if self.cost_model is not None:
            return self.cost_model
        if self._env is not None:
            return self._env.cost_model
        cm = self._ratio_cms.get(cost_ratio)
        if cm is None:
            if len(self._ratio_cms) > 64:
                self._ratio_cms.clear()
            cm = self._ratio_cms[cost_ratio] = cost_from_ratio(cost_ratio, self.G, self.verify_slope)
        return cm

    def _sampling_now(self) -> bool:
        """The bound env's current sampling mode (re-read at each decision, like its cost model:
        a data set may mix greedy and sampled episodes), else the configured one."""
        backend = getattr(self._env, "backend", None)
        return bool(getattr(backend, "sampling", self.sampling))

    def _context(self, o: Sequence[float]) -> tuple[dict[str, Any], float, list[list[float]]]:
        """One decision's tables, rho and the step weights as lists (the scalar fast path)."""
        tab = self.tables(self._cost_for(float(o[I_COST_RATIO])), self._sampling_now())
        c = o[_I_COMP : _I_COMP + 3]
        lv = 0 if c[0] >= c[1] and c[0] >= c[2] else (1 if c[1] >= c[2] else 2)
        if self._lists[0] is not self.weights or self._lists[1] is not self.rho:
            rl = [self.rho.get(x, self.rho["*"]) for x in COMPRESSION_LEVELS]
            self._lists = (self.weights, self.rho, self.weights.tolist(), rl, self.token_weights.tolist())
        return tab, self._lists[3][lv], self._lists[2]

    def _step_survival(self, o: Sequence[float], W: list[list[float]], first: int) -> list[float]:
        """Hazards ``h_{first+1} .. h_G`` of a step observation (python floats)."""
        t = min(max(float(o[0]), 1e-6), 1 - 1e-6)
        x = np.array((1.0, t, o[1], o[2], math.log(t) - math.log1p(-t), *[o[c] for c in self._cols]))
        z = np.clip(self.weights[first:] @ x, -60.0, 60.0).tolist()
        return [1.0 / (1.0 + math.exp(-v)) for v in z]

    def _act_fast(self, o: Sequence[float]) -> int:
        tab, rho, W = self._context(o)
        C, S = [0.0], [1.0]
        for h in self._step_survival(o, W, 0):
            S.append(S[-1] * h)
            C.append(C[-1] + S[-1])
        base, bonus = tab["base_l"], tab["bonus_l"]
        best, bi = -math.inf, 0
        for i, g in enumerate(self.gammas):
            v = C[g] - rho * (base[i] + bonus[i] * S[g])
            if v > best:
                best, bi = v, i
        return bi

    def tables(self, cm: CostModel, sampling: bool) -> dict[str, Any]:
        """Times in target-step units: step mode's ``base[i]`` = T(g_i, 0), ``bonus[i]`` =
        T(g_i, g_i) - T(g_i, 0); token mode's ``stop[j]`` = T_stop(j), ``cap_bonus``."""
        key = (id(cm), bool(sampling))
        hit = self._cache.get(key)
        if hit is not None and hit[0] is cm:
            return hit[1]
        tt = cm.t_target
        base = np.array([cm.step_time(g, 0, sampling) for g in self.gammas]) / tt
        full = np.array([cm.step_time(g, g, sampling) for g in self.gammas]) / tt
        G = self.G
        stop = [cm.step_time(j, 0, sampling, lookahead=True) for j in range(G)] + [cm.step_time(G, 0, sampling)]
        tab: dict[str, Any] = {
            "base": base,
            "bonus": full - base,
            "stop": np.array(stop) / tt,
            "cap_bonus": cm.t_draft / tt if sampling else 0.0,
            # draft-then-decide: every stop is the step mode's step (bonus forward when sampling
            # and all drafted are accepted, g >= 1)
            "stop_dtd": base_all(cm, G, sampling) / tt,
        }
        tab.update({f"{k}_l": tab[k].tolist() for k in ("base", "bonus", "stop", "stop_dtd")})
        if len(self._cache) > 64:
            self._cache.clear()
        self._cache[key] = (cm, tab)
        return tab

    def rho_of(self, obs: np.ndarray) -> np.ndarray:
        """rho per row, by the observation's compression one-hot (overall rho for unseen levels)."""
        lv = np.argmax(np.asarray(obs)[:, _I_COMP : _I_COMP + 3], axis=1)
        table = np.array([self.rho.get(c, self.rho["*"]) for c in COMPRESSION_LEVELS])
        return table[lv]

    # ---- decisions ---------------------------------------------------------------------
    def hazards(self, obs: np.ndarray) -> np.ndarray:
        """``h[:, j - 1]`` = P(L >= j | L >= j - 1, obs) for step observations ``obs`` (N, >= 13)."""
        v = self.obs_version
        return _sigmoid(step_features(np.asarray(obs)[:, : obs_dim(v)], v) @ self.weights.T)

    def decide(self, obs: np.ndarray, tab: dict[str, Any], rho: np.ndarray) -> np.ndarray:
        """The renewal rule's gamma index per row of ``obs`` (N, 13)."""
        S = np.cumprod(self.hazards(obs), axis=1)
        n = S.shape[0]
        C = np.concatenate((np.zeros((n, 1)), np.cumsum(S, axis=1)), axis=1)[:, self._gam]
        Sg = np.concatenate((np.ones((n, 1)), S), axis=1)[:, self._gam]
        V = C - rho[:, None] * (tab["base"][None, :] + tab["bonus"][None, :] * Sg)
        return np.argmax(V, axis=1)

    def _check(self, obs: np.ndarray, dim: int) -> np.ndarray:
        o = np.asarray(obs, dtype=np.float64)
        if o.ndim == 1:
            o = o[None, :]
        if o.ndim != 2 or o.shape[1] != dim:
            other = obs_version_of_dim(o.shape[-1], self.control) if o.ndim == 2 else None
            if other is not None:  # another observation version's width: say so
                self.check_obs_version(other, f"these observations ({o.shape[-1]} values)")
            mode = self.control
            raise ValueError(f"{self.kind}: expects {mode}-mode observations of width {dim}, got shape {o.shape}")
        return o

    def _batch(self, o: np.ndarray) -> np.ndarray:
        rho = self.rho_of(o)
        if self.cost_model is not None or self._env is not None:
            return self._decide_rows(o, self.tables(self._cost_for(0.0), self._sampling_now()), rho)
        out = np.empty(len(o), dtype=np.int64)
        ratios = o[:, OBS_INDEX["cost_ratio"]]
        for r in np.unique(ratios):
            m = ratios == r
            out[m] = self._decide_rows(o[m], self.tables(self._cost_for(float(r)), self._sampling_now()), rho[m])
        return out

    def _decide_rows(self, o: np.ndarray, tab: dict[str, Any], rho: np.ndarray) -> np.ndarray:
        return self.decide(o, tab, rho)

    @property
    def _cols(self) -> list[int]:
        """The observation's columns the hazard model reads after its five head features."""
        return _COLS + (_V2_COLS if self.obs_version == 2 else [])

    def act(self, obs: np.ndarray) -> int:
        if isinstance(obs, np.ndarray) and obs.shape == (self.obs_dim,):
            return self._act_fast(obs.tolist())
        return int(self._batch(self._check(obs, self.obs_dim))[0])

    def act_batch(self, obs: np.ndarray) -> np.ndarray:
        return self._batch(self._check(obs, self.obs_dim)).astype(np.int64)

    # ---- fitting -----------------------------------------------------------------------
    def _chooser(self, cm: CostModel, sampling: bool) -> Callable[[np.ndarray], int]:
        tab = self.tables(cm, sampling)

        def choose(o: np.ndarray) -> int:
            row = o[None, :].astype(np.float64)
            return int(self.decide(row, tab, self.rho_of(row))[0])

        return choose

    def _fit_hazards(self, traces: Sequence[Any], cms: Sequence[CostModel], fixed: Mapping[str, int] | None) -> float:
        """Refit the hazards on every position's observation under the behaviour (``fixed``:
        a gamma index per compression level, else the controller); returns h_1's training AUC."""
        xs: list[list[np.ndarray]] = [[] for _ in range(self.G)]
        ys: list[list[np.ndarray]] = [[] for _ in range(self.G)]
        for tr, cm in zip(traces, cms):
            if fixed is not None:
                choose = _constant(fixed.get(compression_level(tr.compression), fixed["*"]))
            else:
                choose = self._chooser(cm, tr.sampling)
            obs, _, _ = replay_observations(tr, cm, self.gammas, choose, self.obs_version)
            xj, yj = hazard_data(obs, tr, self.G, self.obs_version)
            for j in range(self.G):
                xs[j].append(xj[j])
                ys[j].append(yj[j])
        W = np.zeros_like(self.weights)
        first_auc = float("nan")
        for j in range(self.G):
            X, y = np.concatenate(xs[j]), np.concatenate(ys[j])
            w = fit_head(X, y, self.l2)
            W[j] = w if w is not None else (W[j - 1] if j else 0.0)  # no data this deep: the last one
            if j == 0 and w is not None:
                first_auc = auc(X @ W[0], y)
        self.weights = W
        return first_auc

    def _rates(self, traces: Sequence[Any], cms: Sequence[CostModel]) -> dict[str, float]:
        """The controller's tokens per target-step time on ``traces``, per level and overall."""
        tok: dict[str, float] = {}
        tim: dict[str, float] = {}
        for tr, cm in zip(traces, cms):
            _, n, s = replay_observations(tr, cm, self.gammas, self._chooser(cm, tr.sampling), self.obs_version)
            for lv in ("*", compression_level(tr.compression)):
                tok[lv] = tok.get(lv, 0.0) + n
                tim[lv] = tim.get(lv, 0.0) + s / cm.t_target
        return {lv: tok[lv] / tim[lv] for lv in tok}

    def _iterate_rho(self, rates: Callable[[], dict[str, float]]) -> list[float]:
        """rho <- the controller's own rate, to the fixed point (at most ``iterations`` times);
        returns the overall rho after each iteration."""
        path = []
        for _ in range(max(self.iterations, 0)):
            new = rates()
            change = max(abs(new[k] - self.rho.get(k, new[k])) / new[k] for k in new)
            self.rho = new
            path.append(new["*"])
            if change < 1e-4:
                break
        return path

    def fit(self, traces: Sequence[Any], costs: CostSource) -> dict[str, Any]:
        """Fit on training ``traces`` (``costs``: one CostModel, ``{compression: CostModel}`` or
        one per trace). Returns a summary (AUCs, rho path, the best fixed gamma's rates)."""
        traces = list(traces)
        if not traces:
            raise ValueError(f"{self.kind}: no training traces")
        low = [t for t in traces if t.gamma_max < self.G]
        if low:
            raise ValueError(f"{self.kind}: trace {low[0].trace_id!r} records runs up to {low[0].gamma_max} < {self.G}")
        cms = [_cost_of(costs, i, tr.compression) for i, tr in enumerate(traces)]
        best, rate = _fixed_rates(traces, cms, self.gammas)
        self.rho = dict(rate)
        aucs, paths = [], []
        for r in range(self.refits + 1):
            aucs.append(self._fit_hazards(traces, cms, best if r == 0 else None))
            paths.append(self._iterate_rho(lambda: self._rates(traces, cms)))
        self.summary = {
            "fitted": True,
            "positions": int(sum(t.n for t in traces)),
            "traces": len(traces),
            "auc_first_token": aucs,
            "rho_path": paths,
            "rho": dict(self.rho),
            "best_fixed_gamma": {k: self.gammas[v] for k, v in best.items()},
            "best_fixed_rate": rate,
        }
        return self.summary

    # ---- persistence -------------------------------------------------------------------
    def get_config(self) -> dict[str, Any]:
        return {
            "gammas": list(self.gammas),
            **self._cost_config(),
            "l2": self.l2,
            "refits": self.refits,
            "iterations": self.iterations,
        }

    def get_state(self) -> dict[str, Any]:
        return {
            "features": FEATURE_VERSION,
            "step_features": list(step_feature_names(self.obs_version)),
            "token_features": list(FEATURES),
            "weights": self.weights.tolist(),
            "token_weights": self.token_weights.tolist(),
            "rho": dict(self.rho),
            "summary": self.summary,
        }

    def set_state(self, state: dict[str, Any]) -> None:
        names = list(step_feature_names(self.obs_version))
        if state.get("features") != FEATURE_VERSION or list(state.get("step_features", [])) != names:
            raise ValueError(
                f"saved with features {state.get('features')!r} {state.get('step_features')}, "
                f"this version uses {FEATURE_VERSION!r} {names}"
            )
        if list(state.get("token_features", [])) != list(FEATURES):
            raise ValueError(f"saved token features {state.get('token_features')} differ from {list(FEATURES)}")
        W = np.asarray(state["weights"], dtype=np.float64)
        w = np.asarray(state["token_weights"], dtype=np.float64)
        if W.shape != self.weights.shape or w.shape != self.token_weights.shape:
            raise ValueError(f"weights of shape {W.shape} / {w.shape}, expected {self.weights.shape} / {w.shape}")
        rho = {str(k): float(v) for k, v in dict(state["rho"]).items()}
        if "*" not in rho or not all(math.isfinite(v) and v > 0 for v in rho.values()):
            raise ValueError(f"rho must hold a positive overall value '*', got {rho}")
        self.weights, self.token_weights, self.rho = W, w, rho
        self.summary = dict(state.get("summary", {}))


@register
class SurvivalTokenController(SurvivalController):
    """Token mode: draft one more iff the renewal rule's best stopping point lies further on
    (module docstring). :meth:`fit` fits the step model, then the token head and token mode's rho."""

    kind = "survival_token"
    control = "token"

    def __init__(self, *args: Any, lookahead: bool = True, **kwargs: Any) -> None:
        """:class:`SurvivalController`'s arguments, and ``lookahead``: the token-mode variant it
        is fitted for and runs in (module docstring)."""
        super().__init__(*args, **kwargs)
        self.lookahead = check_lookahead(lookahead)

    def bind(self, env: Any) -> Any:
        out = super().bind(env)
        check_token_variant(self.kind, self.lookahead, env)
        return out

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "lookahead": self.lookahead}

    def token_decide(self, obs: np.ndarray, tab: dict[str, Any], rho: np.ndarray) -> np.ndarray:
        """1 (draft) or 0 (verify) per row of token observations ``obs`` (N, 16)."""
        if not self.lookahead:
            return self._dtd_decide(obs, tab, rho)
        G = self.G
        n = obs.shape[0]
        j = np.minimum(np.rint(obs[:, I_DRAFTED] * G).astype(np.int64), G)
        x = token_features(
            obs[:, I_TOP1], obs[:, I_ENT], obs[:, I_MARGIN], obs[:, I_DRAFTED], obs[:, I_SURV], obs[:, I_LASTP]
        )
        r, c = _sigmoid(x @ self.token_weights.T).T
        h = self.hazards(obs)
        p1 = np.where(j == 0, h[:, 0], r * c)
        chain = np.concatenate((np.ones((n, 1)), np.cumprod(h[:, 1:], axis=1)), axis=1)
        P = p1[:, None] * chain  # P[:, m - 1] = P(L_t >= j + m | obs)
        gain = np.cumsum(P, axis=1)
        stop_at = j[:, None] + np.arange(1, G + 1)[None, :]
        to = np.minimum(stop_at, G)
        stop = tab["stop"]
        dT = stop[to] - stop[j][:, None] + np.where(stop_at == G, tab["cap_bonus"] * P, 0.0)
        val = np.where(stop_at <= G, gain - rho[:, None] * dT, -np.inf)
        go = (val.max(axis=1) > 0.0) & (j < G)
        return np.where(go, DRAFT, VERIFY).astype(np.int64)

    def _dtd_decide(self, obs: np.ndarray, tab: dict[str, Any], rho: np.ndarray) -> np.ndarray:
        """Draft-then-decide (module docstring): with j drafted, ``P0 = P(L_t >= j | obs)`` (1 at
        j = 0; else the reach head times the conditional head, on the distribution token j came
        from), further tokens by the step model's hazards (h_1, h_2, .. at j = 0; h_2, h_3, .. after:
        the observation's signals are those of position t + j - 1); a stop at j' costs the step
        mode's T(j', 0), plus t_draft times P(L_t >= j') when sampling and j' >= 1."""
        G = self.G
        n = obs.shape[0]
        j = np.minimum(np.rint(obs[:, I_DRAFTED] * G).astype(np.int64), G)
        x = token_features(
            obs[:, I_TOP1], obs[:, I_ENT], obs[:, I_MARGIN], obs[:, I_DRAFTED], obs[:, I_SURV], obs[:, I_LASTP]
        )
        r, c = _sigmoid(x @ self.token_weights.T).T
        h = self.hazards(obs)
        first = j == 0
        p0 = np.where(first, 1.0, r * c)
        factors = np.where(first[:, None], h, np.concatenate((h[:, 1:], np.ones((n, 1))), axis=1))
        P = p0[:, None] * np.cumprod(factors, axis=1)  # P[:, m - 1] = P(L_t >= j + m | obs)
        gain = np.cumsum(P, axis=1)
        stop_at = j[:, None] + np.arange(1, G + 1)[None, :]
        to = np.minimum(stop_at, G)
        stop = tab["stop_dtd"]
        cb = tab["cap_bonus"]  # t_draft / t_target when sampling: the bonus token's forward
        now = np.where(first, 0.0, cb * p0)
        dT = stop[to] - stop[j][:, None] + cb * P - now[:, None]
        val = np.where(stop_at <= G, gain - rho[:, None] * dT, -np.inf)
        go = (val.max(axis=1) > 0.0) & (j < G)
        return np.where(go, DRAFT, VERIFY).astype(np.int64)

    def _decide_rows(self, o: np.ndarray, tab: dict[str, Any], rho: np.ndarray) -> np.ndarray:
        return self.token_decide(o, tab, rho)

    def _act_fast(self, o: Sequence[float]) -> int:
        if not self.lookahead:
            return int(self._batch(np.asarray(o, dtype=np.float64)[None, :])[0])
        tab, rho, W = self._context(o)
        G = self.G
        j = min(round(o[I_DRAFTED] * G), G)
        if j >= G:
            return VERIFY
        hs: list[float] | None = None
        if j == 0:
            hs = self._step_survival(o, W, 0)
            P = hs[0]
        else:
            t = min(max(float(o[I_TOP1]), 1e-6), 1 - 1e-6)
            surv = min(max(float(o[I_SURV]), 1e-12), 1.0)
            x = (1.0, t, o[I_ENT], o[I_MARGIN], math.log(t) - math.log1p(-t), o[I_DRAFTED], math.log(surv), o[I_LASTP])
            P = 1.0
            for w in self._lists[4]:
                z = sum([a * b for a, b in zip(w, x)])
                P *= 1.0 / (1.0 + math.exp(-min(max(z, -60.0), 60.0)))
        stop, cap_bonus = tab["stop_l"], tab["cap_bonus"]
        gain = 0.0
        for m in range(1, G - j + 1):  # the first stopping point worth more than stopping now
            if m > 1:
                if hs is None:
                    hs = self._step_survival(o, W, 0)
                P *= hs[m - 1]
            gain += P
            dT = stop[j + m] - stop[j] + (cap_bonus * P if j + m == G else 0.0)
            if gain - rho * dT > 0.0:
                return DRAFT
        return VERIFY

    def act(self, obs: np.ndarray) -> int:
        if isinstance(obs, np.ndarray) and obs.shape == (self.obs_dim,):
            return self._act_fast(obs.tolist())
        return int(self._batch(self._check(obs, self.obs_dim))[0])

    def act_batch(self, obs: np.ndarray) -> np.ndarray:
        return self._batch(self._check(obs, self.obs_dim)).astype(np.int64)

    def _token_rates(self, traces: Sequence[Any], cms: Sequence[CostModel]) -> dict[str, float]:
        """Token mode's tokens per target-step time on ``traces`` (scalar token replays)."""
        from replay.env import SpecKVReplayEnv

        tok: dict[str, float] = {}
        tim: dict[str, float] = {}
        groups: dict[int, list[int]] = {}
        for i, cm in enumerate(cms):
            groups.setdefault(id(cm), []).append(i)
        saved = (self._env, self.cost_model)
        try:
            for idx in groups.values():
                cm = cms[idx[0]]
                env = SpecKVReplayEnv(
                    traces=[traces[i] for i in idx],
                    cost_model=cm,
                    gammas=self.gammas,
                    control="token",
                    lookahead=self.lookahead,
                    obs_version=self.obs_version,
                )
                self._env, self.cost_model = None, cm
                for e, i in enumerate(idx):
                    self.sampling = traces[i].sampling
                    obs, _ = env.reset(options={"episode": e})
                    done = False
                    while not done:
                        obs, _, te, tu, info = env.step(self.act(obs))
                        done = te or tu
                    s = info["episode_summary"]
                    for lv in ("*", compression_level(traces[i].compression)):
                        tok[lv] = tok.get(lv, 0.0) + s["tokens"]
                        tim[lv] = tim.get(lv, 0.0) + s["modelled_s"] / cm.t_target
        finally:
            self._env, self.cost_model = saved
        return {lv: tok[lv] / tim[lv] for lv in tok}

    def fit(self, traces: Sequence[Any], costs: CostSource) -> dict[str, Any]:
        traces = list(traces)
        summary = super().fit(traces, costs)
        cms = [_cost_of(costs, i, tr.compression) for i, tr in enumerate(traces)]
        Xr, yr = token_decision_data(traces, self.G, lookahead=self.lookahead)
        Xc, yc = head_training_data(traces, self.G, self.lookahead)
        heads = [fit_head(Xr, yr, self.l2), fit_head(Xc, yc, self.l2)]
        self.token_weights = np.stack([np.zeros(len(FEATURES)) if w is None else w for w in heads])
        sampling = self.sampling
        try:
            path = self._iterate_rho(lambda: self._token_rates(traces, cms))
        finally:
            self.sampling = sampling
        summary.update(
            reach_decisions=len(yr),
            auc_reach=auc(Xr @ self.token_weights[0], yr),
            cond_decisions=len(yc),
            auc_cond=auc(Xc @ self.token_weights[1], yc),
            step_rho=summary["rho"],
            rho=dict(self.rho),
            token_rho_path=path,
        )
        self.summary = summary
        return summary
