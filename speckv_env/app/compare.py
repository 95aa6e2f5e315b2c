"""The comparison engine behind ``speckv compare`` and ``speckv train``.

:func:`run_comparison` trains and evaluates every gamma policy on held-out data and writes a
report a reader can trust (DESIGN.md, "Results people will trust"): ``report.md``,
``results.json``, PNG plots and TensorBoard runs.

Data
    Full-information traces (``speckv-trace/1`` + ``cost-<compression>.json``), from a folder
    (``logs=``) or in memory (``traces=`` + ``cost_models=``). Replay over such traces is exact
    for every policy, so every policy is evaluated on exactly the same episodes (prompts).
    The SpecKV paper's censored step logs (``source="speckv-paper"``) are handled by
    :func:`run_paper_comparison` (per recorded step, restricted to what the log determines).

Splits (each gives one pooled evaluation set; every test episode is evaluated once per split)
    * ``heldout``: train on split ``train`` (+ ``val``/``validation``: no model selection is
      done, so they are training data), evaluate on split ``test``.
    * ``loto`` (leave one task out): one fold per task; train on all episodes of the other
      tasks, evaluate on every episode of the held-out task; folds pooled.
    * ``loco`` (leave one compression out): the same with compression levels.
    A split whose attribute has a single value (e.g. one compression) is skipped.

Policies
    ``fixed-g`` for every g in the gamma set; ``best-fixed(train)``: per compression, the fixed
    gamma of least total modelled time on the fold's TRAINING episodes (for a compression
    absent from training, as in leave-one-compression-out, the global training-best gamma);
    ``hf-heuristic``; ``cost-aware`` (EMA acceptance + Leviathan's formula, the true cost
    model); ``mlp-time`` / ``mlp-tokens`` (the SpecKV MLP with the tokens/s rule and with the
    paper's tokens/step rule: the same trained network); the bandits ``epsilon-greedy``,
    ``ucb1``, ``thompson``, ``exp3``, ``linucb``; ``ppo`` (stable-baselines3, small budget);
    ``oracle`` (the clairvoyant DP: the ceiling, not a controller). By default the bandits and
    PPO run on the held-out split only (``bandit_splits``, ``ppo_splits``: their training and
    per-step evaluation are the slow part); the leave-one-out splits run everything else.

Seeds
    Stochastic policies (MLP init and rollouts, bandit randomness, PPO) run ``seeds`` times;
    the per-episode modelled time is averaged over seeds (the prompt stays the bootstrap unit)
    and the seed-to-seed spread of throughput is reported beside the interval.

How bandits are evaluated ("continue-per-episode")
    A bandit first learns online on the training episodes (``bandit_steps`` steps). Every
    evaluation episode then starts from that trained state (a copy, with its own seeded
    random stream) and keeps learning *within* the episode, as a deployed online learner
    would; nothing learned on one test episode carries to the next. So each test episode's
    outcome is independent of the order of the test set, and resampling episodes in the
    bootstrap is valid.

Metrics (per policy, over the evaluated episodes; also per task and per compression)
    tokens/s = total tokens / total modelled time (and the per-episode mean); speedup =
    target-only time (N x t_target) / modelled time; tokens/step; mean gamma (chosen);
    regret vs the oracle = total time / oracle time - 1; gap captured =
    (T_bestfixed - T) / (T_bestfixed - T_oracle); 95% percentile bootstrap intervals over
    episodes (``n_boot`` >= 1000 resamples, shared by all policies, so paired), and a paired
    bootstrap test of tokens/s against ``best-fixed(train)`` (difference, its interval,
    two-sided p; see :mod:`agents.stats`).
"""

from __future__ import annotations

import copy
import json
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np

from agents import stats
from speckv_env.core import DEFAULT_GAMMAS, CostModel

from .results import EvalResult, align, concat_folds, select, stack_seeds

POLICY_GROUPS = (
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
)
BANDITS = ("epsilon_greedy", "ucb1", "thompson", "exp3", "linucb")
DISPLAY = {
    "hf_heuristic": "hf-heuristic",
    "cost_aware": "cost-aware",
    "epsilon_greedy": "epsilon-greedy",
    "ucb1": "ucb1",
    "thompson": "thompson",
    "exp3": "exp3",
    "linucb": "linucb",
    "ppo": "ppo",
    "oracle": "oracle",
}
BEST_FIXED = "best-fixed(train)"
LEARNED = ("mlp-time", "mlp-tokens", "epsilon-greedy", "ucb1", "thompson", "exp3", "linucb", "ppo")
SPLITS = ("heldout", "loto", "loco")
VAL_SPLITS = ("val", "validation")


@dataclass
class CompareConfig:
    """Settings of a comparison (defaults: the full comparison; :meth:`quick` for demos/tests)."""

    seeds: int = 5
    """number of seeds for every stochastic policy (bandits, MLP, PPO)"""
    gammas: tuple[int, ...] = DEFAULT_GAMMAS
    """the gamma set (action space)"""
    splits: tuple[str, ...] = SPLITS
    """which splits to run: heldout, loto (leave one task out), loco (leave one compression out)"""
    policies: tuple[str, ...] = POLICY_GROUPS
    """policy groups to include (see POLICY_GROUPS)"""
    bandit_steps: int = 10_000
    """online training steps of each bandit on the training episodes (per fold and seed)"""
    paper_recorded_gammas: tuple[int, ...] = (8,)
    """paper mode: evaluate on the runs recorded at these gammas. At the largest (8) every gamma
    <= 8 is determined at every recorded step, so nothing has to be clipped; () = all runs"""
    bandit_splits: tuple[str, ...] = ("heldout",)
    """splits on which the bandits run (their per-step online evaluation is the slowest part;
    add "loto"/"loco" when time allows)"""
    mlp_rollout_steps: int = 10_000
    """random-gamma rollout steps that label the MLP's training data (per fold and seed)"""
    mlp_epochs: int = 15
    """MLP training epochs"""
    mlp_batch_size: int = 1024
    """MLP minibatch size"""
    ppo_steps: int = 50_000
    """PPO environment steps (per fold and seed)"""
    ppo_splits: tuple[str, ...] = ("heldout",)
    """splits on which PPO is trained (it is the slowest learner; add loto/loco if time allows)"""
    ppo_n_envs: int = 8
    """vectorised replay envs feeding PPO"""
    ppo_kwargs: dict[str, Any] = field(default_factory=lambda: {"n_steps": 256, "batch_size": 256, "n_epochs": 5})
    """PPOAgent keyword arguments"""
    n_boot: int = 2000
    """bootstrap resamples (>= 1000)"""
    level: float = 0.95
    """confidence level of the intervals"""
    tensorboard: bool = True
    """write TensorBoard runs under out_dir/tb"""
    progress: bool = True
    """tqdm progress bars"""
    boot_seed: int = 12345
    """seed of the bootstrap resamples"""

    @classmethod
    def quick(cls, **kw: Any) -> CompareConfig:
        """Few seeds and steps, fewer bandits: seconds, for demos and tests."""
        base = dict(
            seeds=2,
            bandit_steps=1500,
            mlp_rollout_steps=1500,
            mlp_epochs=4,
            ppo_steps=1024,
            ppo_n_envs=4,
            ppo_kwargs={"n_steps": 128, "batch_size": 128, "n_epochs": 2},
            n_boot=1000,
            policies=(
                "fixed",
                "hf_heuristic",
                "cost_aware",
                "speckv_mlp",
                "ucb1",
                "thompson",
                "linucb",
                "ppo",
                "oracle",
            ),
        )
        base.update(kw)
        return cls(**base)


# ---- data --------------------------------------------------------------------------------------


class _Ctx:
    """What CostModelMixin.bind() needs of an env: gammas, the cost model, the sampling mode."""

    def __init__(self, gammas: Sequence[int], cm: CostModel, sampling: bool) -> None:
        self.gammas = tuple(gammas)
        self.cost_model = cm
        self.backend = SimpleNamespace(sampling=sampling, cost_model=cm)
        self.unwrapped = self


class _Data:
    """All traces with their per-episode constants, and cached vector envs."""

    def __init__(self, traces: Sequence[Any], cost_models: Mapping[str, CostModel], gammas: Sequence[int]) -> None:
        from replay.backend import resolve_cost_model

        self.traces = list(traces)
        if not self.traces:
            raise ValueError("no traces to compare on")
        self.cms = dict(cost_models)
        self.gammas = tuple(gammas)
        self.cm = [resolve_cost_model(self.cms, t.compression, f"trace {t.trace_id!r}") for t in self.traces]
        self.N = np.array([t.n for t in self.traces], dtype=np.float64)
        self.t_target = np.array([cm.t_target for cm in self.cm], dtype=np.float64)
        self.task = np.array([t.task for t in self.traces])
        self.compression = np.array([t.compression for t in self.traces])
        self.mode = np.array([t.mode for t in self.traces])
        self.split = np.array([t.split for t in self.traces])
        self.trace_id = np.array([t.trace_id for t in self.traces])
        self._venvs: dict[Any, Any] = {}

    def groups(self, idx: np.ndarray) -> list[tuple[tuple[str, str], np.ndarray]]:
        out = []
        for c in sorted(set(self.compression[idx])):
            for m in sorted(set(self.mode[idx])):
                sel = idx[(self.compression[idx] == c) & (self.mode[idx] == m)]
                if sel.size:
                    out.append(((c, m), sel))
        return out

    def venv(self, key: Any, idx: np.ndarray):
        from replay.vector import SpecKVReplayVectorEnv

        v = self._venvs.get(key)
        if v is None:
            v = SpecKVReplayVectorEnv(
                num_envs=len(idx), traces=[self.traces[i] for i in idx], cost_models=self.cms, gammas=self.gammas
            )
            self._venvs[key] = v
        return v


# ---- evaluation --------------------------------------------------------------------------------


def eval_vector(agent: Any, data: _Data, idx: np.ndarray, key: Any) -> EvalResult:
    """Evaluate a policy whose decisions depend only on the observation (and on state that
    does not change during evaluation) on episodes ``idx``, all at once in the numpy-batched
    replay (``act_batch``), one vector env per (compression, mode) group."""
    G = len(data.gammas)
    gam = np.asarray(data.gammas, dtype=np.int64)
    pos = {int(i): j for j, i in enumerate(idx)}
    T = np.zeros(len(idx))
    S = np.zeros(len(idx))
    Gs = np.zeros(len(idx))
    hist = np.zeros((len(idx), G))
    for (comp, mode), sel in data.groups(idx):
        venv = data.venv((key, comp, mode), sel)
        ctx = _Ctx(data.gammas, data.cm[int(sel[0])], mode == "sample")
        if hasattr(agent, "bind"):
            agent.bind(ctx)
        E = len(sel)
        obs, _ = venv.reset(seed=0, options={"episodes": np.arange(E)})
        active = np.ones(E, dtype=bool)
        t = np.zeros(E)
        s = np.zeros(E)
        gs = np.zeros(E)
        h = np.zeros((E, G))
        ar = np.arange(E)
        while active.any():
            a = np.asarray(agent.act_batch(obs), dtype=np.int64)
            obs, _, term, trunc, info = venv.step(a)
            t += np.where(active, info["modelled_time"], 0.0)
            s += active
            gs += np.where(active, gam[a], 0)
            np.add.at(h, (ar[active], a[active]), 1)
            active &= ~(term | trunc)
        j = np.array([pos[int(i)] for i in sel])
        T[j], S[j], Gs[j] = t, s, gs
        hist[j] = h
    return EvalResult(idx, T[None], S[None], Gs[None], hist)


def eval_online(
    agent: Any,
    env: Any,
    idx: np.ndarray,
    seed: int,
    learn: bool = True,
    desc: str | None = None,
    progress: bool = False,
) -> EvalResult:
    """Evaluate an online learner episode by episode on ``env`` (episode j = ``idx[j]``'s
    position in the env's trace list is j): each episode starts from a copy of ``agent``'s
    trained state, with its own random stream seeded by (seed, j), and keeps learning within
    the episode ("continue-per-episode", see the module docs)."""
    from agents.training import begin_episode

    G = len(agent.gammas)
    n = len(idx)
    T, S, Gs, C, K = np.zeros(n), np.zeros(n), np.zeros(n), np.zeros(n), np.zeros(n)
    hist = np.zeros((n, G))
    gam = agent.gammas
    it: Any = range(n)
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(it, desc=desc or f"eval {agent.name}", leave=False)
    online = learn and agent.learns
    if not online:
        agent.bind(env)
    keep = {id(x): x for x in (env, getattr(env, "unwrapped", None), getattr(agent, "_env", None)) if x is not None}
    for j in it:
        ag = agent
        if online:  # a fresh copy of the trained state per episode (the env is shared, not copied)
            ag = copy.deepcopy(agent, dict(keep))
            if hasattr(ag, "rng"):
                ag.rng = np.random.default_rng([int(seed), int(j)])
            ag.bind(env)
        obs, info = env.reset(seed=seed, options={"episode": j})
        begin_episode(ag, env, info)
        t = s = g = c = k = 0.0
        while True:
            a = ag.act(obs)
            nobs, r, term, trunc, sinfo = env.step(a)
            if learn and ag.learns:
                ag.learn(obs, a, r, nobs, sinfo)
            t += sinfo["modelled_time"]
            s += 1
            g += gam[a]
            c += bool(sinfo.get("undetermined", False))
            k += sinfo["emitted"]
            hist[j, a] += 1
            obs = nobs
            if term or trunc:
                break
        T[j], S[j], Gs[j], C[j], K[j] = t, s, g, c, k
    return EvalResult(np.asarray(idx), T[None], S[None], Gs[None], hist, C[None], K[None])


def oracle_result(data: _Data, idx: np.ndarray, cache: dict[int, tuple[float, int, float, np.ndarray]]) -> EvalResult:
    """The clairvoyant DP on each episode (exact ceiling); cached per trace."""
    from replay.oracle import oracle

    G = len(data.gammas)
    gi = {g: i for i, g in enumerate(data.gammas)}
    T, S, Gs = np.zeros(len(idx)), np.zeros(len(idx)), np.zeros(len(idx))
    hist = np.zeros((len(idx), G))
    for j, i in enumerate(idx):
        i = int(i)
        if i not in cache:
            r = oracle(data.traces[i], data.cm[i], data.gammas)
            h = np.zeros(G)
            for g in r.gammas:
                h[gi[int(g)]] += 1
            cache[i] = (r.total_time, r.steps, float(np.sum(r.gammas)), h)
        T[j], S[j], Gs[j], hist[j] = cache[i]
    return EvalResult(np.asarray(idx), T[None], S[None], Gs[None], hist)


# ---- splits ------------------------------------------------------------------------------------


@dataclass
class Fold:
    split: str
    name: str
    held_out: str
    train: np.ndarray
    test: np.ndarray


def make_folds(data: _Data, split: str) -> list[Fold]:
    """Folds of a split (see the module docs); [] when the split does not apply."""
    all_idx = np.arange(len(data.traces))
    if split == "heldout":
        train = all_idx[np.isin(data.split, ("train",) + VAL_SPLITS)]
        test = all_idx[data.split == "test"]
        if not train.size or not test.size:
            return []
        return [Fold(split, "heldout", "split=test (prompts)", train, test)]
    attr = {"loto": data.task, "loco": data.compression}.get(split)
    if attr is None:
        raise ValueError(f"unknown split {split!r}: choose from {SPLITS}")
    values = sorted(set(attr))
    if len(values) < 2:
        return []
    what = "task" if split == "loto" else "compression"
    return [Fold(split, f"{split}:{v}", f"{what}={v}", all_idx[attr != v], all_idx[attr == v]) for v in values]


# ---- training ------------------------------------------------------------------------------------


def _env_kwargs(data: _Data) -> dict[str, Any]:
    return {"cost_models": data.cms, "gammas": data.gammas}


def _train(name: str, data: _Data, idx: np.ndarray, cfg: CompareConfig, seed: int, tb: Path | None, run: str) -> Any:
    from agents.training import train_agent

    trs = [data.traces[i] for i in idx]
    common = dict(traces=trs, seed=seed, tb_log_dir=tb, progress=False, env_kwargs=_env_kwargs(data), run_name=run)
    if name == "speckv_mlp":
        return train_agent(
            "speckv_mlp",
            steps=cfg.mlp_rollout_steps,
            agent_kwargs={"rule": "time"},
            fit_kwargs={"epochs": cfg.mlp_epochs, "batch_size": cfg.mlp_batch_size},
            **common,
        )
    if name == "ppo":
        return train_agent(
            "ppo", steps=cfg.ppo_steps, n_envs=cfg.ppo_n_envs, agent_kwargs=dict(cfg.ppo_kwargs), **common
        )
    return train_agent(name, steps=cfg.bandit_steps, **common)


def _mlp_tokens_twin(mlp: Any) -> Any:
    from agents.base import make_agent

    twin = make_agent("speckv_mlp", rule="tokens", seed=mlp.seed, hidden=mlp.hidden, gammas=mlp.gammas)
    twin.set_tensors(mlp.get_tensors())
    twin.name = "speckv_mlp_tokens"
    return twin


def best_fixed_choice(fixed: Mapping[int, EvalResult], data: _Data, train: np.ndarray) -> dict[str, int]:
    """Per compression: the fixed gamma with least total modelled time on the training
    episodes; key ``"*"``: the global training-best (used for compressions absent from training)."""
    times = {g: r.time[0] for g, r in fixed.items()}  # fixed results cover all episodes in order
    out: dict[str, int] = {}
    gs = sorted(times)
    out["*"] = int(min(gs, key=lambda g: (times[g][train].sum(), g)))
    for c in sorted(set(data.compression)):
        sel = train[data.compression[train] == c]
        if sel.size:
            out[c] = int(min(gs, key=lambda g: (times[g][sel].sum(), g)))
    return out


# ---- metrics -----------------------------------------------------------------------------------


def policy_metrics(
    N: np.ndarray,
    T: np.ndarray,
    S: np.ndarray,
    Gs: np.ndarray,
    tt: np.ndarray,
    O: np.ndarray,
    F: np.ndarray,
    W: np.ndarray,
    level: float,
    T_seeds: np.ndarray | None = None,
) -> dict[str, Any]:
    """Metrics of one policy on one set of episodes (per-episode arrays; W: resamples)."""
    m: dict[str, Any] = {}
    m["tokens_per_s"] = stats.ratio_ci(N, T, W, level)
    m["tokens_per_s_episode_mean"] = stats.mean_ci(N / T, W, level)
    m["speedup"] = stats.ratio_ci(N * tt, T, W, level)
    m["tokens_per_step"] = float(N.sum() / S.sum())
    m["mean_gamma"] = float(Gs.sum() / S.sum())
    r = stats.ratio_ci(T, O, W, level)
    m["regret_time"] = {k: v - 1.0 for k, v in r.items()}
    m["regret_tokens_per_s"] = float(N.sum() / O.sum() - N.sum() / T.sum())
    den = F.sum() - O.sum()
    if den > 1e-12 * max(F.sum(), 1e-300):
        with np.errstate(divide="ignore", invalid="ignore"):
            reps = (W @ F - W @ T) / (W @ F - W @ O)
        reps = reps[np.isfinite(reps)]
        lo, hi = np.quantile(reps, [(1 - level) / 2, (1 + level) / 2]) if reps.size else (math.nan, math.nan)
        m["gap_captured"] = {"value": float((F.sum() - T.sum()) / den), "lo": float(lo), "hi": float(hi)}
    else:
        m["gap_captured"] = {"value": math.nan, "lo": math.nan, "hi": math.nan}
    m["vs_best_fixed"] = stats.paired_ratio_test(N, T, N, F, W, level)
    m["episodes"] = int(N.size)
    m["tokens"] = float(N.sum())
    m["modelled_s"] = float(T.sum())
    if T_seeds is not None and T_seeds.shape[0] > 1:
        per_seed = N.sum() / T_seeds.sum(axis=1)
        m["seed_tokens_per_s"] = [float(x) for x in per_seed]
        m["seed_sd"] = float(np.std(per_seed, ddof=1))
    return m


# ---- the engine --------------------------------------------------------------------------------


def _load(logs: Any, traces: Any, cost_models: Any) -> tuple[list[Any], dict[str, CostModel]]:
    from replay.trace import load_cost_models, read_traces

    if traces is not None:
        if cost_models is None:
            raise ValueError("traces= needs cost_models= ({compression: CostModel})")
        cms = cost_models if isinstance(cost_models, Mapping) else {t.compression: cost_models for t in traces}
        return list(traces), dict(cms)
    if logs is None:
        from replay.env import default_logs

        logs = default_logs()
    paths = [Path(p) for p in ([logs] if isinstance(logs, (str, Path)) else logs)]
    trs = read_traces(paths)
    cms: dict[str, CostModel] = {}
    for p in paths:
        cms.update(load_cost_models(p if p.is_dir() else p.parent))
    if cost_models:
        cms.update(cost_models)
    return trs, cms


def run_comparison(
    logs: str | Path | Sequence[str | Path] | None = None,
    out_dir: str | Path = "compare_out",
    traces: Sequence[Any] | None = None,
    cost_models: Mapping[str, CostModel] | CostModel | None = None,
    source: str | None = None,
    quick: bool = False,
    config: CompareConfig | None = None,
    **overrides: Any,
) -> dict[str, Any]:
    """Train and evaluate every policy on every split; write report.md, results.json, plots, tb/.

    ``logs``: a trace folder/file (or list); or ``traces=`` + ``cost_models=`` in memory;
    ``source="speckv-paper"``: the SpecKV paper's step logs (see :func:`run_paper_comparison`).
    ``quick=True``: :meth:`CompareConfig.quick`. ``overrides``: CompareConfig fields.
    Returns the results dict (also saved as results.json).
    """
    cfg = config or (CompareConfig.quick(**overrides) if quick else CompareConfig(**overrides))
    if config is not None and overrides:
        cfg = CompareConfig(**{**asdict(config), **overrides})
    if source is not None:
        if source != "speckv-paper":
            raise ValueError(f"unknown source {source!r}: the only named source is 'speckv-paper'")
        return run_paper_comparison(out_dir, cfg)
    import torch

    torch.set_num_threads(1)
    t0 = time.time()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tb = out / "tb" if cfg.tensorboard else None
    trs, cms = _load(logs, traces, cost_models)
    data = _Data(trs, cms, cfg.gammas)
    pol = set(cfg.policies)
    unknown = pol - set(POLICY_GROUPS)
    if unknown:
        raise ValueError(f"unknown policy group(s) {sorted(unknown)}: choose from {POLICY_GROUPS}")
    all_idx = np.arange(len(trs))
    seeds = list(range(cfg.seeds))
    from tqdm.auto import tqdm

    # ---- fold-independent policies: evaluated once on every episode ----
    from agents.base import make_agent

    fixed: dict[int, EvalResult] = {}
    for g in cfg.gammas:  # always computed: best-fixed(train) and gap captured need them
        fixed[g] = eval_vector(make_agent("fixed", g=g, gammas=cfg.gammas), data, all_idx, "all")
    static: dict[str, EvalResult] = {}
    if "hf_heuristic" in pol:
        static["hf-heuristic"] = eval_vector(make_agent("hf_heuristic", gammas=cfg.gammas), data, all_idx, "all")
    if "cost_aware" in pol:
        static["cost-aware"] = eval_vector(make_agent("cost_aware", gammas=cfg.gammas), data, all_idx, "all")
    oracle_cache: dict[int, Any] = {}
    oracle_all = oracle_result(data, all_idx, oracle_cache)

    splits_out: dict[str, Any] = {}
    curves: dict[str, list[dict[str, Any]]] = {}
    learners = [p for p in ("speckv_mlp", *BANDITS, "ppo") if p in pol]
    for split in cfg.splits:
        folds = make_folds(data, split)
        if not folds:
            splits_out[split] = {
                "skipped": f"split {split!r} does not apply to this data (one value, or no train/test)"
            }
            continue
        per_policy: dict[str, list[EvalResult]] = {}
        fold_info = []
        for fold in folds:
            choice = best_fixed_choice(fixed, data, fold.train)
            # best-fixed(train): per test episode, the gamma chosen for its compression
            bf_t = np.array(
                [fixed[choice.get(c, choice["*"])].time[0, i] for i, c in zip(fold.test, data.compression[fold.test])]
            )
            bf_s = np.array(
                [fixed[choice.get(c, choice["*"])].steps[0, i] for i, c in zip(fold.test, data.compression[fold.test])]
            )
            bf_g = np.array(
                [fixed[choice.get(c, choice["*"])].gsum[0, i] for i, c in zip(fold.test, data.compression[fold.test])]
            )
            h = np.zeros((fold.test.size, len(cfg.gammas)))
            for j, c in enumerate(data.compression[fold.test]):
                h[j, cfg.gammas.index(choice.get(c, choice["*"]))] = bf_s[j]
            per_policy.setdefault(BEST_FIXED, []).append(EvalResult(fold.test, bf_t[None], bf_s[None], bf_g[None], h))
            for g in cfg.gammas:
                if "fixed" in pol:
                    per_policy.setdefault(f"fixed-{g}", []).append(select(fixed[g], fold.test))
            for name, r in static.items():
                per_policy.setdefault(name, []).append(select(r, fold.test))
            per_policy.setdefault("oracle", []).append(select(oracle_all, fold.test))
            fold_info.append(
                {
                    "fold": fold.name,
                    "held_out": fold.held_out,
                    "n_train": int(fold.train.size),
                    "n_test": int(fold.test.size),
                    "train_tasks": sorted(set(data.task[fold.train])),
                    "test_tasks": sorted(set(data.task[fold.test])),
                    "train_compressions": sorted(set(data.compression[fold.train])),
                    "test_compressions": sorted(set(data.compression[fold.test])),
                    "train_splits": sorted(set(data.split[fold.train])),
                    "test_splits": sorted(set(data.split[fold.test])),
                    "train_trace_ids": data.trace_id[fold.train].tolist(),
                    "test_trace_ids": data.trace_id[fold.test].tolist(),
                    "best_fixed_gamma": choice,
                }
            )
            # ---- learned policies ----
            env = None
            jobs = [
                (p, s)
                for p in learners
                for s in seeds
                if not (p == "ppo" and split not in cfg.ppo_splits)
                and not (p in BANDITS and split not in cfg.bandit_splits)
            ]
            bar = tqdm(jobs, desc=f"{fold.name}", leave=False, disable=not cfg.progress)
            got: dict[str, list[EvalResult]] = {}
            for p, s in bar:
                bar.set_postfix_str(f"{p} seed {s}")
                run = f"SpecKVReplay-v0__{fold.name.replace(':', '-')}__{p}__{s}"
                agent = _train(p, data, fold.train, cfg, s, tb, run)
                log = getattr(agent, "train_log", [])
                if split == "heldout" or len(folds) == 1:
                    curves.setdefault(p if p == "speckv_mlp" else DISPLAY[p], []).append(
                        {"seed": s, "fold": fold.name, "log": _thin(log)}
                    )
                if p == "speckv_mlp":
                    got.setdefault("mlp-time", []).append(eval_vector(agent, data, fold.test, fold.name))
                    got.setdefault("mlp-tokens", []).append(
                        eval_vector(_mlp_tokens_twin(agent), data, fold.test, fold.name)
                    )
                elif p == "ppo":
                    got.setdefault("ppo", []).append(eval_vector(agent, data, fold.test, fold.name))
                else:
                    if env is None:
                        from replay.env import SpecKVReplayEnv

                        env = SpecKVReplayEnv(traces=[data.traces[i] for i in fold.test], **_env_kwargs(data))
                    got.setdefault(DISPLAY[p], []).append(eval_online(agent, env, fold.test, s))
            for name, rs in got.items():
                per_policy.setdefault(name, []).append(stack_seeds(rs))
        pooled = {name: concat_folds(rs) for name, rs in per_policy.items() if len(rs) == len(folds)}
        splits_out[split] = {"folds": fold_info, "policies": _split_metrics(data, pooled, cfg), "_pooled": pooled}

    results = _assemble(data, cfg, splits_out, curves, time.time() - t0, logs)
    from .plots import write_plots

    results["plots"] = write_plots(results, splits_out, data, out)
    results["runtime_s"] = time.time() - t0
    for s in splits_out.values():
        s.pop("_pooled", None)
    (out / "results.json").write_text(json.dumps(_jsonable(results), indent=1))
    from .report import write_report

    write_report(results, out / "report.md")
    return results


def _thin(log: Sequence[dict[str, Any]], max_points: int = 400) -> list[dict[str, Any]]:
    log = list(log)
    if len(log) <= max_points:
        return log
    step = len(log) / max_points
    return [log[int(i * step)] for i in range(max_points)]


def _split_metrics(data: _Data, pooled: Mapping[str, EvalResult], cfg: CompareConfig) -> dict[str, Any]:
    """Metrics overall, per task and per compression, for every policy of a split."""
    ref = pooled[BEST_FIXED]
    idx = ref.idx
    subsets: dict[str, np.ndarray] = {"all": np.ones(idx.size, dtype=bool)}
    for t in sorted(set(data.task[idx])):
        subsets[f"task={t}"] = data.task[idx] == t
    for c in sorted(set(data.compression[idx])):
        subsets[f"compression={c}"] = data.compression[idx] == c
    out: dict[str, Any] = {name: {"subsets": {}} for name in pooled}
    rng = np.random.default_rng(cfg.boot_seed)
    N_all, tt_all = data.N[idx], data.t_target[idx]
    O_all = align(pooled["oracle"], idx).time.mean(0)
    F_all = ref.time.mean(0)
    for sub, mask in subsets.items():
        W = stats.resample_weights(int(mask.sum()), cfg.n_boot, rng)
        for name, r in pooled.items():
            r = align(r, idx)
            m = policy_metrics(
                N_all[mask],
                r.time.mean(0)[mask],
                r.steps.mean(0)[mask],
                r.gsum.mean(0)[mask],
                tt_all[mask],
                O_all[mask],
                F_all[mask],
                W,
                cfg.level,
                r.time[:, mask] if r.time.shape[0] > 1 else None,
            )
            hh = r.hist[mask].sum(0)
            m["gamma_hist"] = (hh / max(hh.sum(), 1)).tolist()
            m["seeds"] = int(r.time.shape[0])
            out[name]["subsets"][sub] = m
    return out


def _verdict(policies: Mapping[str, Any]) -> dict[str, Any]:
    learned = [p for p in LEARNED if p in policies]
    if not learned:
        return {"sentence": "No learned controller was run.", "best_learned": None}
    best = max(learned, key=lambda p: policies[p]["subsets"]["all"]["tokens_per_s"]["value"])
    t = policies[best]["subsets"]["all"]["vs_best_fixed"]
    tp = policies[best]["subsets"]["all"]["tokens_per_s"]["value"]
    bf = policies[BEST_FIXED]["subsets"]["all"]["tokens_per_s"]["value"]
    if t["lo"] > 0:
        s = (
            f"The best learned controller, {best} ({tp:.4g} tokens/s), BEATS the best fixed gamma chosen on "
            f"training data ({bf:.4g} tokens/s): +{t['diff']:.4g} tokens/s ({100 * t['rel']:+.2f}%), "
            f"95% CI [{t['lo']:+.4g}, {t['hi']:+.4g}] excludes zero, paired bootstrap p = {t['p']:.3g}."
        )
        outcome = "beats"
    elif t["hi"] < 0:
        s = (
            f"The best learned controller, {best} ({tp:.4g} tokens/s), is SLOWER than the best fixed gamma "
            f"chosen on training data ({bf:.4g} tokens/s): {t['diff']:+.4g} tokens/s ({100 * t['rel']:+.2f}%), "
            f"95% CI [{t['lo']:+.4g}, {t['hi']:+.4g}], p = {t['p']:.3g}."
        )
        outcome = "worse"
    else:
        s = (
            f"The best learned controller, {best} ({tp:.4g} tokens/s), does NOT beat the best fixed gamma "
            f"chosen on training data ({bf:.4g} tokens/s) with confidence: difference {t['diff']:+.4g} tokens/s "
            f"({100 * t['rel']:+.2f}%), 95% CI [{t['lo']:+.4g}, {t['hi']:+.4g}] includes zero, p = {t['p']:.3g}."
        )
        outcome = "inconclusive"
    return {"sentence": s, "best_learned": best, "outcome": outcome, **t}


def _assemble(
    data: _Data, cfg: CompareConfig, splits_out: Mapping[str, Any], curves: Any, runtime: float, logs: Any
) -> dict[str, Any]:
    for name, s in splits_out.items():
        if "policies" in s:
            s["verdict"] = _verdict(s["policies"])
    return {
        "format": "speckv-compare/1",
        "source": "traces",
        "logs": None if logs is None else str(logs),
        "config": asdict(cfg),
        "data": {
            "episodes": len(data.traces),
            "tokens": float(data.N.sum()),
            "tasks": sorted(set(data.task)),
            "compressions": sorted(set(data.compression)),
            "modes": sorted(set(data.mode)),
            "splits": {s: int((data.split == s).sum()) for s in sorted(set(data.split))},
            "pairs": sorted(set(t.pair for t in data.traces)),
            "devices": sorted(set(t.device for t in data.traces)),
            "synthetic": bool(all(t.meta.get("synthetic") for t in data.traces)),
            "cost_models": {k: v.to_dict() for k, v in data.cms.items()},
        },
        "bandit_evaluation": "continue-per-episode: each test episode starts from the state learned on the "
        "training episodes and keeps learning within the episode; nothing carries across "
        "test episodes",
        "best_fixed_rule": "per compression, least total modelled time on the fold's training episodes; "
        "global training-best for a compression absent from training",
        "splits": splits_out,
        "learning_curves": curves,
        "runtime_s": runtime,
    }


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.ndarray):
        return _jsonable(x.tolist())
    if isinstance(x, (np.floating, float)):
        v = float(x)
        return v if math.isfinite(v) else None
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, (np.bool_,)):
        return bool(x)
    if isinstance(x, Path):
        return str(x)
    return x


# ---- the SpecKV paper's censored step logs ------------------------------------------------------

PAPER_POLICIES = ("fixed", "hf_heuristic", "cost_aware", "speckv_mlp", *BANDITS)


def _paper_env(filters: Mapping[str, Any], gammas: Sequence[int], recorded: Sequence[int] = ()):
    from replay.env import SpecKVReplayEnv

    return SpecKVReplayEnv(
        source="speckv-paper", on_undetermined="clip", gammas=gammas, recorded_gamma=list(recorded) or None, **filters
    )


def _paper_folds(runs: Any, split: str) -> list[dict[str, Any]]:
    if split == "heldout":
        return [
            {
                "name": "heldout",
                "held_out": "split=test (prompt 4 of each task)",
                "train": {"split": ["train", "val"]},
                "test": {"split": "test"},
            }
        ]
    col = {"loto": "task", "loco": "compression"}[split]
    vals = sorted(set(runs[col]))
    if len(vals) < 2:
        return []
    return [
        {
            "name": f"{split}:{v}",
            "held_out": f"{col}={v}",
            "train": {col: [x for x in vals if x != v]},
            "test": {col: v},
        }
        for v in vals
    ]


def run_paper_comparison(out_dir: str | Path, cfg: CompareConfig) -> dict[str, Any]:
    """Compare policies on the SpecKV paper's step logs (``source="speckv-paper"``).

    The logs are censored (only the recorded gamma's outcome is known), so the evaluation is
    the paper's per-step methodology: every policy replays each recorded run step by step,
    positions advance as recorded, and at each step the chosen gamma's outcome is taken from
    the log where the log determines it; where it does not (the recorded step accepted all it
    drafted and the policy asked for more) the step is answered at the largest determined
    gamma (``on_undetermined="clip"``) and counted in the "clipped" column. There is no
    clairvoyant oracle (the log does not determine it) and no PPO (it trains on the
    vectorised full-information replay). Tokens/s is modelled with cost models fitted to the
    paper's wall times (replay.importers.fit_cost_model).
    """
    import torch
    from tqdm.auto import tqdm

    from agents.base import make_agent
    from agents.training import train_agent
    from replay.importers import import_speckv_paper, load_step_log

    torch.set_num_threads(1)
    t0 = time.time()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tb = out / "tb" if cfg.tensorboard else None
    steps_df, cms = load_step_log("speckv-paper")
    _, runs = import_speckv_paper()
    gammas = tuple(g for g in cfg.gammas if g <= 8)
    env_all = _paper_env({}, gammas, cfg.paper_recorded_gammas)
    brs = env_all.backend.runs
    run_index = {r["run_id"]: i for i, r in enumerate(brs)}
    meta = {c: np.array([r[c] for r in brs]) for c in ("task", "compression", "split", "prompt_id", "run_id")}
    t_target = np.array([cm.t_target for cm in env_all.backend.cost_models])
    rec_gamma = np.array([r["gamma"][0] for r in brs])
    pol = set(cfg.policies) & set(PAPER_POLICIES)
    seeds = list(range(cfg.seeds))

    def evaluate(agent: Any, env: Any, seed: int, learn: bool) -> EvalResult:
        ids = np.array([run_index[r["run_id"]] for r in env.backend.runs])
        return eval_online(agent, env, ids, seed, learn=learn)

    splits_out: dict[str, Any] = {}
    curves: dict[str, list[dict[str, Any]]] = {}
    for split in cfg.splits:
        folds = _paper_folds(runs, split)
        if not folds:
            splits_out[split] = {"skipped": f"split {split!r} does not apply"}
            continue
        per_policy: dict[str, list[EvalResult]] = {}
        fold_info = []
        for f in folds:
            env_tr = _paper_env(f["train"], gammas, cfg.paper_recorded_gammas)
            env_te = _paper_env(f["test"], gammas, cfg.paper_recorded_gammas)
            # fixed gammas on train (to choose the best) and on test
            fixed_tr = {g: evaluate(make_agent("fixed", g=g, gammas=gammas), env_tr, 0, False) for g in gammas}
            fixed_te = {g: evaluate(make_agent("fixed", g=g, gammas=gammas), env_te, 0, False) for g in gammas}
            tr_ids = fixed_tr[gammas[0]].idx
            te_ids = fixed_te[gammas[0]].idx
            choice: dict[str, int] = {}

            def best(sel: np.ndarray) -> int:
                return int(
                    max(gammas, key=lambda g: (fixed_tr[g].tokens[0][sel].sum() / fixed_tr[g].time[0][sel].sum(), -g))
                )

            choice["*"] = best(np.ones(tr_ids.size, dtype=bool))
            for c in sorted(set(meta["compression"][tr_ids])):
                choice[c] = best(meta["compression"][tr_ids] == c)
            rows = [fixed_te[choice.get(c, choice["*"])] for c in meta["compression"][te_ids]]
            bf = EvalResult(
                te_ids,
                *(np.array([[getattr(r, k)[0, j] for j, r in enumerate(rows)]]) for k in ("time", "steps", "gsum")),
                np.array([r.hist[j] for j, r in enumerate(rows)]),
                np.array([[r.clipped[0, j] for j, r in enumerate(rows)]]),
                np.array([[r.tokens[0, j] for j, r in enumerate(rows)]]),
            )
            per_policy.setdefault(BEST_FIXED, []).append(bf)
            if "fixed" in pol:
                for g in gammas:
                    per_policy.setdefault(f"fixed-{g}", []).append(fixed_te[g])
            for name in ("hf_heuristic", "cost_aware"):
                if name in pol:
                    per_policy.setdefault(DISPLAY[name], []).append(
                        evaluate(make_agent(name, gammas=gammas), env_te, 0, False)
                    )
            fold_info.append(
                {
                    "fold": f["name"],
                    "held_out": f["held_out"],
                    "n_train": int(tr_ids.size),
                    "n_test": int(te_ids.size),
                    "train_tasks": sorted(set(meta["task"][tr_ids])),
                    "test_tasks": sorted(set(meta["task"][te_ids])),
                    "train_compressions": sorted(set(meta["compression"][tr_ids])),
                    "test_compressions": sorted(set(meta["compression"][te_ids])),
                    "train_splits": sorted(set(meta["split"][tr_ids])),
                    "test_splits": sorted(set(meta["split"][te_ids])),
                    "train_trace_ids": meta["run_id"][tr_ids].tolist(),
                    "test_trace_ids": meta["run_id"][te_ids].tolist(),
                    "best_fixed_gamma": choice,
                }
            )
            learners = [
                p for p in ("speckv_mlp", *BANDITS) if p in pol and (p == "speckv_mlp" or split in cfg.bandit_splits)
            ]
            got: dict[str, list[EvalResult]] = {}
            for p, s in tqdm(
                [(p, s) for p in learners for s in seeds],
                desc=f"paper {f['name']}",
                leave=False,
                disable=not cfg.progress,
            ):
                run = f"SpecKVReplay-v0-paper__{f['name'].replace(':', '-')}__{p}__{s}"
                kw: dict[str, Any] = dict(
                    env_factory=lambda: _paper_env(f["train"], gammas, cfg.paper_recorded_gammas),
                    seed=s,
                    tb_log_dir=tb,
                    progress=False,
                    run_name=run,
                )
                if p == "speckv_mlp":
                    agent = train_agent(
                        "speckv_mlp",
                        steps=cfg.mlp_rollout_steps,
                        agent_kwargs={"rule": "time", "gammas": gammas},
                        fit_kwargs={"epochs": cfg.mlp_epochs, "batch_size": cfg.mlp_batch_size},
                        **kw,
                    )
                    got.setdefault("mlp-time", []).append(evaluate(agent, env_te, s, False))
                    got.setdefault("mlp-tokens", []).append(evaluate(_mlp_tokens_twin(agent), env_te, s, False))
                else:
                    agent = train_agent(p, steps=cfg.bandit_steps, agent_kwargs={"gammas": gammas}, **kw)
                    got.setdefault(DISPLAY[p], []).append(evaluate(agent, env_te, s, True))
                if split == "heldout":
                    curves.setdefault(p if p == "speckv_mlp" else DISPLAY[p], []).append(
                        {"seed": s, "fold": f["name"], "log": _thin(getattr(agent, "train_log", []))}
                    )
            for name, rs in got.items():
                per_policy.setdefault(name, []).append(stack_seeds(rs))
        pooled = {n: concat_folds(rs) for n, rs in per_policy.items() if len(rs) == len(folds)}
        splits_out[split] = {
            "folds": fold_info,
            "policies": _paper_metrics(pooled, meta, t_target, cfg),
            "_pooled": pooled,
        }

    # the paper's own numbers: recorded tokens/step and measured tokens/s per (compression, gamma)
    paper_table = []
    for (c, g), grp in runs.groupby(["compression", "gamma"]):
        # every recorded run at this gamma (the replay env holds only the runs that determine
        # every gamma, i.e. those recorded at gamma 8)
        st = steps_df[steps_df["run_id"].isin(set(grp["run_id"]))]
        cm = cms[c]
        mt = float(sum(cm.step_time(int(d), int(k)) for d, k in zip(st["drafted"], st["accepted"])))
        paper_table.append(
            {
                "compression": c,
                "gamma": int(g),
                "runs": int(len(grp)),
                "paper_tokens_per_step": float(grp["tokens"].sum() / grp["n_steps"].sum()),
                "paper_measured_tokens_per_s": float(grp["tokens"].sum() / grp["elapsed_sec"].sum()),
                # None where the logs hold no steps of that run (a trimmed or partial data set)
                "modelled_tokens_per_s": float(st["tokens_produced"].sum() / mt) if mt > 0 else None,
            }
        )
    for s in splits_out.values():
        if "policies" in s:
            s["verdict"] = _verdict(s["policies"])
    results = {
        "format": "speckv-compare/1",
        "source": "speckv-paper",
        "logs": "speckv-paper (replay/data/speckv_paper)",
        "config": asdict(cfg),
        "data": {
            "episodes": len(brs),
            "tokens": float(runs["tokens"].sum()),
            "tasks": sorted(set(meta["task"])),
            "compressions": sorted(set(meta["compression"])),
            "modes": ["greedy"],
            "splits": {s: int((meta["split"] == s).sum()) for s in sorted(set(meta["split"]))},
            "pairs": sorted(set(steps_df["pair"])),
            "devices": sorted(set(steps_df["device"])),
            "synthetic": False,
            "cost_models": {k: v.to_dict() for k, v in cms.items()},
            "recorded_gammas": sorted(int(g) for g in set(rec_gamma)),
            "censored_step_fraction": float(steps_df["censored"].mean()),
        },
        "evaluation": "per recorded step (the paper's methodology), on the runs recorded at gamma "
        f"{list(cfg.paper_recorded_gammas) or 'any'}; undetermined outcomes (none when only the largest "
        "recorded gamma is used) answered at the largest determined gamma (clip) and counted",
        "bandit_evaluation": "continue-per-episode: each test run starts from the state learned on the training runs "
        "and keeps learning within the run; nothing carries across test runs",
        "best_fixed_rule": "per compression, highest modelled tokens/s on the fold's training runs (per recorded step); "
        "global training-best for a compression absent from training",
        "paper_table": paper_table,
        "splits": splits_out,
        "learning_curves": curves,
    }
    from .plots import write_paper_plots

    results["plots"] = write_paper_plots(results, out, gammas)
    results["runtime_s"] = time.time() - t0
    for s in splits_out.values():
        s.pop("_pooled", None)
    (out / "results.json").write_text(json.dumps(_jsonable(results), indent=1))
    from .report import write_paper_report

    write_paper_report(results, out / "report.md")
    return results


def _paper_metrics(
    pooled: Mapping[str, EvalResult], meta: Mapping[str, np.ndarray], t_target: np.ndarray, cfg: CompareConfig
) -> dict[str, Any]:
    ref = pooled[BEST_FIXED]
    idx = ref.idx
    subsets: dict[str, np.ndarray] = {"all": np.ones(idx.size, dtype=bool)}
    for t in sorted(set(meta["task"][idx])):
        subsets[f"task={t}"] = meta["task"][idx] == t
    for c in sorted(set(meta["compression"][idx])):
        subsets[f"compression={c}"] = meta["compression"][idx] == c
    rng = np.random.default_rng(cfg.boot_seed)
    tt = t_target[idx]
    F_T, F_N, F_S = ref.time.mean(0), ref.tokens.mean(0), ref.steps.mean(0)
    out: dict[str, Any] = {n: {"subsets": {}} for n in pooled}
    for sub, mask in subsets.items():
        W = stats.resample_weights(int(mask.sum()), cfg.n_boot, rng)
        for name, r in pooled.items():
            r = align(r, idx) if not np.array_equal(r.idx, idx) else r
            T, N, S = r.time.mean(0)[mask], r.tokens.mean(0)[mask], r.steps.mean(0)[mask]
            m: dict[str, Any] = {
                "tokens_per_s": stats.ratio_ci(N, T, W, cfg.level),
                "speedup": stats.ratio_ci(N * tt[mask], T, W, cfg.level),
                "tokens_per_step_ci": stats.ratio_ci(N, S, W, cfg.level),
                "tokens_per_step": float(N.sum() / S.sum()),
                "mean_gamma": float(r.gsum.mean(0)[mask].sum() / S.sum()),
                "clipped_fraction": float(r.clipped.mean(0)[mask].sum() / S.sum()),
                "vs_best_fixed": stats.paired_ratio_test(N, T, F_N[mask], F_T[mask], W, cfg.level),
                "tokens_per_step_vs_best_fixed": stats.paired_ratio_test(N, S, F_N[mask], F_S[mask], W, cfg.level),
                "episodes": int(mask.sum()),
                "seeds": int(r.time.shape[0]),
            }
            hh = r.hist[mask].sum(0)
            m["gamma_hist"] = (hh / max(hh.sum(), 1)).tolist()
            if r.time.shape[0] > 1:
                per_seed = r.tokens[:, mask].sum(1) / r.time[:, mask].sum(1)
                m["seed_tokens_per_s"] = per_seed.tolist()
                m["seed_sd"] = float(np.std(per_seed, ddof=1))
            out[name]["subsets"][sub] = m
    return out


# ---- plain-argument entry points for the CLI ------------------------------------------------------


def compare_main(
    logs: str | Path | Sequence[str | Path] | None,
    out_dir: str | Path,
    source: str | None = None,
    quick: bool = False,
    seeds: int | None = None,
    splits: Sequence[str] | None = None,
    policies: Sequence[str] | None = None,
    ppo_steps: int | None = None,
    bandit_steps: int | None = None,
    n_boot: int | None = None,
    progress: bool = True,
    tensorboard: bool = True,
) -> dict[str, Any]:
    """``speckv compare``: run :func:`run_comparison` and print the verdict; returns the results.

    ``logs``: trace folder/file(s) (None: the shipped data set), or ``source="speckv-paper"``.
    Other arguments override :class:`CompareConfig` fields (None = default)."""
    kw: dict[str, Any] = {"progress": progress, "tensorboard": tensorboard}
    for k, v in (
        ("seeds", seeds),
        ("splits", splits),
        ("policies", policies),
        ("ppo_steps", ppo_steps),
        ("bandit_steps", bandit_steps),
        ("n_boot", n_boot),
    ):
        if v is not None:
            kw[k] = tuple(v) if isinstance(v, (list, tuple)) else v
    res = run_comparison(logs=logs, out_dir=out_dir, source=source, quick=quick, **kw)
    print(f"wrote {Path(out_dir) / 'report.md'} ({res['runtime_s']:.0f} s)")
    for split, s in res["splits"].items():
        if "verdict" in s:
            print(f"[{split}] {s['verdict']['sentence']}")
    return res


def train_main(
    agent: str,
    logs: str | Path | Sequence[str | Path] | None,
    out: str | Path,
    steps: int | None = None,
    seed: int = 0,
    source: str | None = None,
    agent_kwargs: Mapping[str, Any] | None = None,
    gammas: Sequence[int] = DEFAULT_GAMMAS,
    tensorboard: bool = True,
    progress: bool = True,
) -> dict[str, Any]:
    """``speckv train``: train one agent on the training split (train + val) and save it.

    ``agent``: a registry name (fixed, hf_heuristic, cost_aware, speckv_mlp, epsilon_greedy, ucb1,
    thompson, exp3, linucb, ppo). ``out``: the agent file (``.json`` or ``.safetensors``), or a
    folder (then ``<out>/<agent>-seed<seed>.<ext>``); TensorBoard runs go beside it in ``tb/``.
    ``steps``: training steps (default: the full comparison's budget for that agent kind).
    Evaluates the trained agent on the test split (modelled tokens/s vs the best fixed gamma
    chosen on the training split) and returns ``{"path", "test": {...}, "best_fixed": {...}}``.
    """
    import torch

    from agents.base import make_agent
    from agents.training import evaluate_agent, summarize, train_agent

    torch.set_num_threads(1)
    cfg = CompareConfig()
    steps = steps or {"speckv_mlp": cfg.mlp_rollout_steps, "ppo": cfg.ppo_steps}.get(agent, cfg.bandit_steps)
    out = Path(out)
    folder = out.parent if out.suffix in (".json", ".safetensors") else out
    folder.mkdir(parents=True, exist_ok=True)
    tb = folder / "tb" if tensorboard else None
    kw = dict(agent_kwargs or {})
    kw.setdefault("gammas", tuple(gammas))
    run = f"SpecKVReplay-v0__train__{agent}__{seed}__{int(time.time())}"
    if source == "speckv-paper":
        if agent == "ppo":
            raise ValueError("PPO trains on full-information traces (vectorised replay), not on the paper's step logs")
        gam = tuple(g for g in gammas if g <= 8)
        kw["gammas"] = gam
        train_env = lambda: _paper_env({"split": ["train", "val"]}, gam, (8,))
        test_env = _paper_env({"split": "test"}, gam, (8,))
        trained = train_agent(
            agent,
            env_factory=train_env,
            steps=steps,
            seed=seed,
            tb_log_dir=tb,
            progress=progress,
            agent_kwargs=kw,
            run_name=run,
        )
        train_e = train_env()
    else:
        from replay.env import SpecKVReplayEnv

        trs, cms = _load(logs, None, None)
        train = [t for t in trs if t.split in ("train",) + VAL_SPLITS]
        test = [t for t in trs if t.split == "test"]
        if not train or not test:
            raise ValueError("the data needs episodes in split train (or val) and in split test")
        ek = {"cost_models": cms, "gammas": kw["gammas"]}
        trained = train_agent(
            agent,
            traces=train,
            steps=steps,
            seed=seed,
            tb_log_dir=tb,
            progress=progress,
            agent_kwargs=kw,
            env_kwargs=ek,
            run_name=run,
            **({"n_envs": cfg.ppo_n_envs} if agent == "ppo" else {}),
        )
        test_env = SpecKVReplayEnv(traces=test, **ek)
        train_e = SpecKVReplayEnv(traces=train, **ek)
    ext = ".safetensors" if trained.get_tensors() else ".json"
    path = out if out.suffix in (".json", ".safetensors") else folder / f"{agent}-seed{seed}{ext}"
    trained.save(path)
    # online learners keep learning during the test episodes, as in run_comparison (but here the
    # learning carries over from one test episode to the next, as in a deployment)
    test_sum = summarize(evaluate_agent(trained, test_env, seed=seed, learn=trained.learns))
    best_g, best_tps = None, -1.0
    for g in kw["gammas"]:
        s = summarize(evaluate_agent(make_agent("fixed", g=g, gammas=kw["gammas"]), train_e))
        if s["tokens_per_second"] > best_tps:
            best_g, best_tps = g, s["tokens_per_second"]
    bf = summarize(evaluate_agent(make_agent("fixed", g=best_g, gammas=kw["gammas"]), test_env))
    print(
        f"saved {path}; test: {test_sum['tokens_per_second']:.4g} modelled tokens/s over {test_sum['episodes']} "
        f"episodes (best fixed gamma on train = {best_g}: {bf['tokens_per_second']:.4g} tokens/s on test)"
    )
    return {
        "path": str(path),
        "test": test_sum,
        "best_fixed": {"gamma": best_g, **bf},
        "train_log": getattr(trained, "train_log", []),
    }
