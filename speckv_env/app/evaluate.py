"""Evaluating and training the comparison's policies on replayed episodes.

Policies whose decisions depend only on the observation run all episodes at once in the
numpy-batched replay (:func:`eval_vector`); online learners run episode by episode, each test
episode from a copy of the trained state (:func:`eval_online`, "continue-per-episode"); the
clairvoyant oracle is a dynamic programme per trace (:func:`oracle_result`).
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np

from speckv_env.core import CostModel

from .compare_data import CompareConfig, _Data
from .results import EvalResult


class _Ctx:
    """What CostModelMixin.bind() needs of an env: gammas, the cost model, the sampling mode."""

    def __init__(self, gammas: Sequence[int], cm: CostModel, sampling: bool, obs_version: int = 1) -> None:
        self.gammas = tuple(gammas)
        self.obs_version = obs_version
        self.cost_model = cm
        self.backend = SimpleNamespace(sampling=sampling, cost_model=cm)
        self.unwrapped = self


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
        ctx = _Ctx(data.gammas, data.cm[int(sel[0])], mode == "sample", data.obs_version)
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


# ---- training ----------------------------------------------------------------------------------


def train_learner(
    name: str, data: _Data, idx: np.ndarray, cfg: CompareConfig, seed: int, tb: Path | None, run: str
) -> Any:
    """Train learner ``name`` (speckv_mlp, ppo or a bandit) on episodes ``idx``, budgets from ``cfg``."""
    from agents.training import train_agent

    train = functools.partial(
        train_agent,
        traces=[data.traces[i] for i in idx],
        seed=seed,
        tb_log_dir=tb,
        progress=False,
        env_kwargs=data.env_kwargs(),
        run_name=run,
    )
    if name == "speckv_mlp":
        return train(
            "speckv_mlp",
            steps=cfg.mlp_rollout_steps,
            agent_kwargs={"rule": "time"},
            fit_kwargs={"epochs": cfg.mlp_epochs, "batch_size": cfg.mlp_batch_size},
        )
    if name == "ppo":
        return train("ppo", steps=cfg.ppo_steps, n_envs=cfg.ppo_n_envs, agent_kwargs=dict(cfg.ppo_kwargs))
    return train(contextual_bandit(name, seed, cfg, data.obs_version), steps=cfg.bandit_steps)


def contextual_bandit(name: str, seed: int, cfg: CompareConfig, obs_version: int = 1) -> Any:
    """A bandit of the comparison, kept per deployment context (compression x decoding mode),
    deciding on observations of ``obs_version``."""
    from agents.base import make_agent

    return make_agent("per_context", bandit=name, seed=seed, gammas=cfg.gammas, obs_version=obs_version)


def checkpoints(name: str, cfg: CompareConfig) -> list[int]:
    """Training budgets at which a frozen snapshot of an online learner is evaluated on the
    held-out (validation) prompts: doubling steps up to the full budget (for PPO whole
    rollouts of ``n_steps x n_envs``, as stable-baselines3 trains)."""
    if name == "ppo":
        roll = int(cfg.ppo_kwargs.get("n_steps", 256)) * cfg.ppo_n_envs
        n = max(1, -(-cfg.ppo_steps // roll))
        return sorted({roll * k for k in (1, 2, 4, 8, 16, 32, 64) if k < n} | {roll * n})
    steps = cfg.bandit_steps
    return sorted({max(1, steps >> k) for k in range(6)})


def train_with_curve(
    name: str,
    data: _Data,
    idx: np.ndarray,
    cfg: CompareConfig,
    seed: int,
    tb: Path | None,
    run: str,
    held_out: np.ndarray,
    refs: tuple[np.ndarray, np.ndarray],
) -> tuple[Any, list[dict[str, Any]]]:
    """Train online learner ``name`` (a bandit or PPO) on episodes ``idx`` in chunks up to
    :func:`checkpoints`, and after each chunk evaluate a frozen copy (no learning) on the
    held-out episodes ``held_out`` (the validation prompts, never the test prompts). ``refs``:
    the oracle's and best-fixed(train)'s per-episode times there. Returns the trained agent
    and the curve: per checkpoint the training steps, held-out tokens/s, time regret against
    the oracle and gap captured (tokens/s)."""
    from agents.training import train_agent

    trs = [data.traces[i] for i in idx]
    # chunks log nothing themselves (each would restart the step count); the joined log is
    # written to TensorBoard once at the end
    common: dict[str, Any] = {"traces": trs, "tb_log_dir": None, "progress": False, "env_kwargs": data.env_kwargs()}
    if name == "ppo":
        common.update(n_envs=cfg.ppo_n_envs)
    agent: Any = name if name == "ppo" else contextual_bandit(name, seed, cfg, data.obs_version)
    done, log = 0, []
    curve: list[dict[str, Any]] = []
    T_o, T_f = refs
    n_tok = data.N[held_out].sum()
    tps_o, tps_f = n_tok / T_o.sum(), n_tok / T_f.sum()
    for k, target in enumerate(checkpoints(name, cfg)):
        kw: dict[str, Any] = {"agent_kwargs": dict(cfg.ppo_kwargs)} if name == "ppo" and k == 0 else {}
        agent = train_agent(agent, steps=target - done, seed=seed + 7919 * k, run_name=run, **common, **kw)
        log += [{**r, "global_step": r["global_step"] + done} for r in agent.train_log if "global_step" in r]
        done = int(getattr(agent, "timesteps", 0) or target)
        frozen = agent if name == "ppo" else copy.deepcopy(agent)  # PPO's act_batch changes nothing
        T = eval_vector(frozen, data, held_out, ("curve", name)).time[0]
        tps = n_tok / T.sum()
        curve.append(
            {
                "steps": done,
                "tokens_per_s": float(tps),
                "regret_time": float(T.sum() / T_o.sum() - 1.0),
                "gap_captured": float((tps - tps_f) / (tps_o - tps_f)) if tps_o > tps_f else float("nan"),
                "oracle_tokens_per_s": float(tps_o),
                "best_fixed_tokens_per_s": float(tps_f),
            }
        )
    agent.train_log = log
    if tb is not None:
        from agents.training import _log_episode, _Writer

        w = _Writer(tb, run)
        for rec in log:
            _log_episode(w, rec)
        for pt in curve:
            w.scalar("heldout/tokens_per_second", pt["tokens_per_s"], pt["steps"])
            w.scalar("heldout/regret_time", pt["regret_time"], pt["steps"])
        w.close()
    return agent, curve


def mlp_tokens_twin(mlp: Any) -> Any:
    """The same trained SpecKV MLP deciding with the paper's tokens-per-step rule."""
    from agents.base import make_agent

    twin = make_agent(
        "speckv_mlp", rule="tokens", seed=mlp.seed, hidden=mlp.hidden, gammas=mlp.gammas, obs_version=mlp.obs_version
    )
    twin.set_tensors(mlp.get_tensors())
    twin.name = "speckv_mlp_tokens"
    return twin


def thin(log: Sequence[dict[str, Any]], max_points: int = 400) -> list[dict[str, Any]]:
    """At most ``max_points`` evenly spaced entries of a training log (for the learning curves)."""
    log = list(log)
    if len(log) <= max_points:
        return log
    step = len(log) / max_points
    return [log[int(i * step)] for i in range(max_points)]


def survival_on_fold(data: _Data, fold: Any) -> tuple[dict[str, EvalResult], dict[str, EvalResult], dict[str, Any]]:
    """The survival controller (:class:`agents.survival.SurvivalController`, deterministic)
    fitted on the fold's training episodes with their cost models, on its test and validation
    episodes: ``survival(train)``, a learned controller (a candidate of the primary contrast)."""
    from agents.base import make_agent

    agent: Any = make_agent("survival", gammas=data.gammas, obs_version=data.obs_version)
    summary = agent.fit([data.traces[int(i)] for i in fold.train], [data.cm[int(i)] for i in fold.train])
    test = {"survival(train)": eval_vector(agent, data, fold.test, ("survival", fold.name, "test"))}
    val = {}
    if fold.val.size:
        val["survival(train)"] = eval_vector(agent, data, fold.val, ("survival", fold.name, "val"))
    return test, val, {"rho": summary.get("rho"), "auc_first_token": summary.get("auc_first_token")}
