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
    * ``heldout``: learners train on split ``train``; every policy is also evaluated on split
      ``validation``, where the controller of the primary contrast is chosen; evaluate on
      split ``test``. The fixed baseline is chosen on train + validation.
    * ``loto`` (leave one task out): one fold per task; train on all episodes of the other
      tasks, evaluate on every episode of the held-out task; folds pooled.
    * ``loco`` (leave one compression out): the same with compression levels.
    A split whose attribute has a single value (e.g. one compression) is skipped.

Policies
    ``fixed-g`` for every g in the gamma set; ``best-fixed(train)``: per compression (cost
    model), the fixed gamma of least total modelled time on the fold's TRAINING episodes; for a
    compression absent from training (leave-one-compression-out), of all training episodes
    priced under the held-out compression's cost model, the information the learned controllers
    are given too (:func:`.folds.best_fixed_choice`);
    ``hf-heuristic``; ``cost-aware`` (EMA acceptance + Leviathan's formula, the true cost
    model); ``mlp-time`` / ``mlp-tokens`` (the SpecKV MLP with the tokens/s rule and with the
    paper's tokens/step rule: the same trained network); ``survival(train)`` (a hazard model of
    the accepted run length fitted on every training position, gamma by the renewal objective:
    :mod:`agents.survival`); the bandits ``epsilon-greedy``,
    ``ucb1``, ``thompson``, ``exp3``, ``linucb``; ``ppo`` (stable-baselines3, small budget);
    ``oracle`` (the clairvoyant DP: the ceiling, not a controller); with traces that carry the
    draft's rollouts (``speckv-trace/2``), token mode's stopping rules (:mod:`.token_compare`,
    policy group ``token``; held-out split). By default the bandits and
    PPO run on the held-out split only (``bandit_splits``, ``ppo_splits``: their training and
    per-step evaluation are the slow part); the leave-one-out splits run everything else.

Seeds
    Stochastic policies (MLP init and rollouts, bandit randomness, PPO) run ``seeds`` times;
    the per-episode modelled time is averaged over seeds (the prompt stays the bootstrap unit)
    and the seed-to-seed spread of throughput is reported beside the interval.

How bandits are evaluated ("continue-per-episode")
    A bandit keeps one set of statistics per deployment context, compression x decoding mode
    (:class:`agents.bandits.PerContext`). It first learns online on the training episodes
    (``bandit_steps`` steps). Every evaluation episode then starts from that trained state (a copy, with its own seeded
    random stream) and keeps learning *within* the episode, as a deployed online learner
    would; nothing learned on one test episode carries to the next. So each test episode's
    outcome is independent of the order of the test set, and resampling episodes in the
    bootstrap is valid.

Metrics (per policy, over the evaluated episodes; also per task and per compression)
    tokens/s = total tokens / total modelled time (and the per-episode mean); speedup =
    target-only time (N x t_target) / modelled time; tokens/step; mean gamma (chosen);
    regret vs the oracle = total time / oracle time - 1; gap captured (tokens/s) =
    (tps - tps_bestfixed) / (tps_oracle - tps_bestfixed), and in time units
    (``gap_captured_time``); 95% percentile cluster-bootstrap intervals over prompts (``n_boot``
    >= 1000 resamples, shared by all policies, so paired), and a paired bootstrap test of
    tokens/s against ``best-fixed(train)`` (difference, relative difference with intervals,
    two-sided p, a bound "< 2/(B+1)" at the resampling floor; see :mod:`agents.stats`).

Primary contrast and verdict (:func:`.metrics.judge`)
    The learned controller with the highest tokens/s on the validation prompts, against
    best-fixed(train) on the test prompts: ``splits.heldout.primary`` (``policy``,
    ``baseline``, ``rel``, ``lo``, ``hi``, ``p``, ``selected_on``). Every other contrast is
    secondary, Holm-adjusted per split and subset (``p_holm``). The verdict of each split is
    about that one controller.

Learning curves
    The bandits and PPO train in chunks of doubling budget; after each a frozen copy is
    evaluated on the validation prompts (:func:`.evaluate.train_with_curve`).

Modules
    :mod:`.compare_data` (settings, policy names, the traces as arrays), :mod:`.folds` (splits
    and the best fixed gamma), :mod:`.evaluate` (evaluating and training policies),
    :mod:`.metrics` (metrics and the verdict), :mod:`.paper` (the SpecKV paper's step logs),
    :mod:`.results` (per-episode results and their JSON form); this module runs the pipeline.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from speckv_env.core import DEFAULT_GAMMAS, CostModel

from .compare_data import (
    BANDITS,
    BEST_FIXED,
    DISPLAY,
    LEARNED,
    POLICY_GROUPS,
    SPLITS,
    VAL_SPLITS,
    CompareConfig,
    _Data,
    load_traces,
    resolve_obs_version,
)
from .evaluate import (
    eval_online,
    eval_vector,
    mlp_tokens_twin,
    oracle_result,
    survival_on_fold,
    thin,
    train_learner,
    train_with_curve,
)
from .folds import Fold, best_fixed_choice, best_fixed_result, describe_fold, make_folds
from .metrics import judge, policy_metrics, split_metrics
from .paper import paper_env, run_paper_comparison
from .results import EvalResult, concat_folds, jsonable, select, stack_seeds
from .token_compare import TOKEN_SPLITS, TokenPolicies, has_token_data

__all__ = [
    "BANDITS",
    "BEST_FIXED",
    "DISPLAY",
    "LEARNED",
    "POLICY_GROUPS",
    "SPLITS",
    "CompareConfig",
    "EvalResult",
    "Fold",
    "LearnJob",
    "_Data",
    "best_fixed_choice",
    "compare_main",
    "eval_online",
    "eval_vector",
    "make_folds",
    "oracle_result",
    "policy_metrics",
    "run_comparison",
    "run_paper_comparison",
    "train_main",
]


BEST_FIXED_RULE = (
    "per cost model (compression), the fixed gamma of least total modelled time on the fold's training "
    "episodes (held-out split: train + validation prompts); for a compression absent from training "
    "(leave-one-compression-out), least total modelled time of all training episodes priced under the held-out "
    "compression's cost model"
)
INFORMATION = (
    "what each side knows: the learned controllers learn from the fold's training episodes and, at test time, "
    "are given the test episode's true cost model (cost-aware and mlp-time decide with it); best-fixed(train) "
    "sees the same training episodes and the same cost model (in leave-one-compression-out: the training "
    "episodes' acceptance priced under the held-out compression's cost model). Neither sees a test episode"
)
PRIMARY_RULE = (
    "primary contrast (declared): the learned controller with the highest tokens/s on the validation prompts "
    "(learners trained on the train prompts only) against best-fixed(train), on the test prompts; every other "
    "contrast is secondary, Holm-adjusted per split and subset"
)


@dataclass
class _Baselines:
    """The fold-independent results, evaluated once on every episode: each fixed gamma (always:
    best-fixed(train) and the gap captured need them), the static heuristics, the oracle."""

    fixed: dict[int, EvalResult]
    static: dict[str, EvalResult]
    oracle: EvalResult
    tokens: Any = None
    """token mode's policies (:class:`.token_compare.TokenPolicies`), when the traces have rollouts"""


def _config(config: CompareConfig | None, quick: bool, overrides: Mapping[str, Any]) -> CompareConfig:
    cfg = config or (CompareConfig.quick(**overrides) if quick else CompareConfig(**overrides))
    if config is not None and overrides:
        cfg = CompareConfig(**{**asdict(config), **overrides})
    return cfg


def run_comparison(
    logs: str | Path | Sequence[str | Path] | None = None,
    out_dir: str | Path = "compare_out",
    traces: Sequence[Any] | None = None,
    cost_models: Mapping[str, CostModel] | CostModel | None = None,
    source: str | None = None,
    quick: bool = False,
    config: CompareConfig | None = None,
    ray: str | None = None,
    **overrides: Any,
) -> dict[str, Any]:
    """Train and evaluate every policy on every split; write report.md, results.json, plots, tb/.

    ``logs``: a trace folder/file (or list); or ``traces=`` + ``cost_models=`` in memory;
    ``source="speckv-paper"``: the SpecKV paper's step logs (see :func:`run_paper_comparison`).
    ``quick=True``: :meth:`CompareConfig.quick`. ``overrides``: CompareConfig fields.
    ``ray``: train and evaluate the learners (folds x seeds x agents) as Ray tasks on the cluster at
    this address (``local``, ``auto`` or an address; :mod:`.distributed`), with the same results.
    Returns the results dict (also saved as results.json).
    """
    cfg = _config(config, quick, overrides)
    if source is not None:
        if source != "speckv-paper":
            raise ValueError(f"unknown source {source!r}: the only named source is 'speckv-paper'")
        if cfg.obs_version == 2:
            raise ValueError(
                "obs_version=2 needs speckv-trace/2 traces; the SpecKV paper's step logs supply version 1 only"
            )
        return run_paper_comparison(out_dir, replace(cfg, obs_version=1))
    import torch

    torch.set_num_threads(1)
    t0 = time.time()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tb = out / "tb" if cfg.tensorboard else None
    trs, cms = load_traces(logs, traces, cost_models)
    cfg = replace(cfg, obs_version=resolve_obs_version(cfg.obs_version, trs))  # recorded as used
    data = _Data(trs, cms, cfg.gammas, cfg.obs_version)
    pol = set(cfg.policies)
    unknown = pol - set(POLICY_GROUPS)
    if unknown:
        raise ValueError(f"unknown policy group(s) {sorted(unknown)}: choose from {POLICY_GROUPS}")
    base = _baselines(data, cfg, pol)
    done = None if ray is None else _learn_on_ray(ray, data, cfg, pol, base, tb)
    splits_out: dict[str, Any] = {}
    curves: dict[str, list[dict[str, Any]]] = {}
    for split in cfg.splits:
        splits_out[split] = _run_split(split, data, cfg, pol, base, tb, curves, done)

    results = _assemble(data, cfg, splits_out, curves, time.time() - t0, logs)
    if "token" in pol:
        results["token_mode"] = (
            f"token mode's stopping rules ran on split(s) {', '.join(TOKEN_SPLITS)}, in both variants: "
            "look-ahead (each decision sees the distribution the next token would be drafted from; a chosen "
            "stop after g tokens costs g + 1 draft forwards) and draft-then-decide (names ending in `/dtd`: "
            "each decision sees the distribution the last drafted token came from and its probability, as "
            "Hugging Face's rule, SVIP, AdaEDL and SpecDec++ run; a chosen stop after g tokens costs exactly "
            "the step mode's step at gamma g), each rule tuned, fitted or trained in its own variant"
            if base.tokens is not None
            else "token mode's stopping rules skipped: the traces are speckv-trace/1 (no draft rollouts)"
        )
    from .plots import write_plots

    results["plots"] = write_plots(results, splits_out, data, out)
    results["runtime_s"] = time.time() - t0
    for s in splits_out.values():
        s.pop("_pooled", None)
        s.pop("_val_metrics", None)
    (out / "results.json").write_text(json.dumps(jsonable(results), indent=1))
    from .report import write_report

    write_report(results, out / "report.md")
    return results


def _baselines(data: _Data, cfg: CompareConfig, pol: set[str]) -> _Baselines:
    from agents.base import make_agent

    all_idx = np.arange(len(data.traces))
    v = data.obs_version
    fixed = {
        g: eval_vector(make_agent("fixed", g=g, gammas=cfg.gammas, obs_version=v), data, all_idx, "all")
        for g in cfg.gammas
    }
    static: dict[str, EvalResult] = {}
    if "hf_heuristic" in pol:
        agent = make_agent("hf_heuristic", gammas=cfg.gammas, obs_version=v)
        static["hf-heuristic"] = eval_vector(agent, data, all_idx, "all")
    if "cost_aware" in pol:
        agent = make_agent("cost_aware", gammas=cfg.gammas, obs_version=v)
        static["cost-aware"] = eval_vector(agent, data, all_idx, "all")
    tokens = TokenPolicies(data, ppo_steps=cfg.ppo_token_steps) if "token" in pol and has_token_data(data) else None
    return _Baselines(fixed, static, oracle_result(data, all_idx, {}), tokens)


def _run_split(
    split: str,
    data: _Data,
    cfg: CompareConfig,
    pol: set[str],
    base: _Baselines,
    tb: Path | None,
    curves: dict[str, list[dict[str, Any]]],
    done: Mapping[tuple[str, str, str, int], Any] | None = None,
) -> dict[str, Any]:
    """Every policy on every fold of ``split``, pooled over the folds, with its metrics; where
    the folds have validation episodes, every policy's metrics there too (``_val_metrics``).
    ``done``: the learners' results by :attr:`LearnJob.key`, already computed (on Ray)."""
    folds = make_folds(data, split)
    if not folds:
        return {"skipped": f"split {split!r} does not apply to this data (one value, or no train/test)"}
    meta = {"task": data.task, "compression": data.compression, "split": data.split, "id": data.trace_id}
    per_policy: dict[str, list[EvalResult]] = {}
    per_val: dict[str, list[EvalResult]] = {}
    fold_info = []
    for fold in folds:
        choice = best_fixed_choice(base.fixed, data, fold.seen)
        _reference_policies(per_policy, fold.test, data, cfg, pol, base, choice)
        if fold.val.size:
            _reference_policies(per_val, fold.val, data, cfg, pol, base, choice)
        fold_info.append(describe_fold(fold.name, fold.held_out, fold.seen, fold.test, meta, choice, fold.val))
        jobs = _fold_jobs(fold, data, cfg, pol, base, choice, keep_curves=split == "heldout" or len(folds) == 1)
        got, got_val = _learned_on_fold(jobs, data, cfg, tb, curves, done)
        if "survival" in pol:
            sv, sv_val, fold_info[-1]["survival"] = survival_on_fold(data, fold)
            got.update({name: [r] for name, r in sv.items()})
            got_val.update({name: [r] for name, r in sv_val.items()})
        if base.tokens is not None and split in TOKEN_SPLITS:
            tok, tok_val, fold_info[-1]["token_choices"] = base.tokens.on_fold(fold)
            got.update({name: [r] for name, r in tok.items()})
            got_val.update({name: [r] for name, r in tok_val.items()})
        for name, rs in got.items():
            per_policy.setdefault(name, []).append(stack_seeds(rs))
        for name, rs in got_val.items():
            per_val.setdefault(name, []).append(stack_seeds(rs))
    pooled = {name: concat_folds(rs) for name, rs in per_policy.items() if len(rs) == len(folds)}
    out: dict[str, Any] = {"folds": fold_info, "policies": split_metrics(data, pooled, cfg), "_pooled": pooled}
    val_pooled = {name: concat_folds(rs) for name, rs in per_val.items() if len(rs) == len(folds)}
    if val_pooled:
        vm = split_metrics(data, val_pooled, cfg)
        out["_val_metrics"] = vm
        out["validation"] = {
            "episodes": int(val_pooled[BEST_FIXED].idx.size),
            "tokens_per_s": {name: vm[name]["subsets"]["all"]["tokens_per_s"] for name in vm},
        }
    return out


def _reference_policies(
    per_policy: dict[str, list[EvalResult]],
    idx: np.ndarray,
    data: _Data,
    cfg: CompareConfig,
    pol: set[str],
    base: _Baselines,
    choice: Mapping[str, int],
) -> None:
    """Append best-fixed(train), the fixed gammas, the static heuristics and the oracle on
    episodes ``idx`` (evaluated once on every episode, selected here)."""
    per_policy.setdefault(BEST_FIXED, []).append(best_fixed_result(base.fixed, data, idx, choice, cfg.gammas))
    for g in cfg.gammas:
        if "fixed" in pol:
            per_policy.setdefault(f"fixed-{g}", []).append(select(base.fixed[g], idx))
    for name, r in base.static.items():
        per_policy.setdefault(name, []).append(select(r, idx))
    per_policy.setdefault("oracle", []).append(select(base.oracle, idx))


@dataclass
class LearnJob:
    """One learner trained on one fold with one seed and evaluated there: the unit of work that
    runs in parallel (folds x seeds x agents) on Ray."""

    fold: Fold
    policy: str
    seed: int
    curves: bool
    """keep its learning curve (the held-out split, or a split of one fold)"""
    refs: tuple[np.ndarray, np.ndarray] | None
    """the oracle's and best-fixed(train)'s per-episode times on the fold's validation episodes"""

    @property
    def key(self) -> tuple[str, str, str, int]:
        return (self.fold.split, self.fold.name, self.policy, self.seed)


def _fold_jobs(
    fold: Fold,
    data: _Data,
    cfg: CompareConfig,
    pol: set[str],
    base: _Baselines,
    choice: Mapping[str, int],
    keep_curves: bool,
) -> list[LearnJob]:
    """The learners to train on ``fold`` (every seed), in the order their results are pooled."""
    refs = None
    if fold.val.size:
        bf = best_fixed_result(base.fixed, data, fold.val, choice, cfg.gammas)
        refs = (select(base.oracle, fold.val).time[0], bf.time[0])
    learners = [p for p in ("speckv_mlp", *BANDITS, "ppo") if p in pol]
    return [
        LearnJob(fold, p, s, keep_curves, refs)
        for p in learners
        for s in range(cfg.seeds)
        if not (p == "ppo" and fold.split not in cfg.ppo_splits)
        and not (p in BANDITS and fold.split not in cfg.bandit_splits)
    ]


def _learned_on_fold(
    jobs: Sequence[LearnJob],
    data: _Data,
    cfg: CompareConfig,
    tb: Path | None,
    curves: dict[str, list[dict[str, Any]]],
    done: Mapping[tuple[str, str, str, int], Any] | None = None,
) -> tuple[dict[str, list[EvalResult]], dict[str, list[EvalResult]]]:
    """Train every learned policy of ``jobs`` (one fold) and evaluate it on the fold's test and
    validation episodes (:func:`run_learn_job`), or take its results from ``done``; learning
    curves go into ``curves``. Returns (test results, validation results) by policy name."""
    from tqdm.auto import tqdm

    envs: dict[str, Any] = {}
    bar = tqdm(jobs, desc=jobs[0].fold.name if jobs else "", leave=False, disable=not cfg.progress or done is not None)
    got: dict[str, list[EvalResult]] = {}
    got_val: dict[str, list[EvalResult]] = {}
    for job in bar:
        bar.set_postfix_str(f"{job.policy} seed {job.seed}")
        entry, test, val = done[job.key] if done is not None else run_learn_job(job, data, cfg, tb, envs)
        if entry is not None:
            curves.setdefault(job.policy if job.policy == "speckv_mlp" else DISPLAY[job.policy], []).append(entry)
        for name, r in test.items():
            got.setdefault(name, []).append(r)
        for name, r in val.items():
            got_val.setdefault(name, []).append(r)
    return got, got_val


def run_learn_job(
    job: LearnJob, data: _Data, cfg: CompareConfig, tb: Path | None, envs: dict[str, Any]
) -> tuple[dict[str, Any] | None, dict[str, EvalResult], dict[str, EvalResult]]:
    """Train ``job``'s learner on its fold's training episodes and evaluate it on the fold's test
    and validation episodes; with ``job.curves``, its learning-curve entry (the bandits' and
    PPO's with a frozen snapshot evaluated on the validation prompts at several training
    budgets, when the fold has them). Returns (curve entry or None, test results, validation
    results), results by policy name (``envs``: cached evaluation envs by key)."""
    p, s, fold = job.policy, job.seed, job.fold
    run = f"SpecKVReplay-v0__{fold.name.replace(':', '-')}__{p}__{s}"
    curve = None
    if p != "speckv_mlp" and job.curves and job.refs is not None:
        agent, curve = train_with_curve(p, data, fold.train, cfg, s, tb, run, fold.val, job.refs)
    else:
        agent = train_learner(p, data, fold.train, cfg, s, tb, run)
    entry = None
    if job.curves:
        entry = {"seed": s, "fold": fold.name, "log": thin(getattr(agent, "train_log", []))}
        if curve is not None:
            entry["heldout"] = curve
    out: list[dict[str, EvalResult]] = [{}, {}]
    for part, idx, dest in (("test", fold.test, out[0]), ("val", fold.val, out[1])):
        if idx.size:
            dest.update(_evaluate_learned(p, agent, data, idx, f"{fold.name}:{part}", s, envs))
    return entry, out[0], out[1]


def _learn_on_ray(
    address: str, data: _Data, cfg: CompareConfig, pol: set[str], base: _Baselines, tb: Path | None
) -> dict[tuple[str, str, str, int], Any]:
    """Every learner of every split and fold (every seed) as Ray tasks: their results by key."""
    from .distributed import map_tasks

    jobs = []
    for split in cfg.splits:
        folds = make_folds(data, split)
        for fold in folds:
            choice = best_fixed_choice(base.fixed, data, fold.seen)
            jobs += _fold_jobs(fold, data, cfg, pol, base, choice, keep_curves=split == "heldout" or len(folds) == 1)
    shared = (uuid.uuid4().hex, data.traces, data.cms, cfg)
    results = map_tasks(address, _learn_task, shared, jobs, files_to=tb, desc="learners (ray)", progress=cfg.progress)
    return {job.key: r for job, r in zip(jobs, results)}


_TASK_DATA: dict[str, _Data] = {}


def _learn_task(shared: tuple[str, Any, Any, CompareConfig], job: LearnJob, scratch: Path | None) -> Any:
    """:func:`run_learn_job` in a Ray worker (``shared``: a token naming the comparison, the
    traces, cost models and settings; TensorBoard runs go to ``scratch``, copied to the
    driver's tb/ folder)."""
    import torch

    torch.set_num_threads(1)
    token, traces, cms, cfg = shared
    if token not in _TASK_DATA:  # one data set per worker process, its vector envs cached across tasks
        _TASK_DATA.clear()
        _TASK_DATA[token] = _Data(traces, cms, cfg.gammas, cfg.obs_version)
    return run_learn_job(job, _TASK_DATA[token], cfg, scratch, {})


def _evaluate_learned(
    p: str, agent: Any, data: _Data, idx: np.ndarray, key: str, seed: int, envs: dict[str, Any]
) -> dict[str, EvalResult]:
    """A trained learner on episodes ``idx``: batched for the MLP (both rules) and PPO, episode
    by episode from a copy of the trained state for the bandits (``envs``: cached envs by key)."""
    if p == "speckv_mlp":
        return {
            "mlp-time": eval_vector(agent, data, idx, key),
            "mlp-tokens": eval_vector(mlp_tokens_twin(agent), data, idx, key),
        }
    if p == "ppo":
        return {"ppo": eval_vector(agent, data, idx, key)}
    if key not in envs:
        from replay.env import SpecKVReplayEnv

        envs[key] = SpecKVReplayEnv(traces=[data.traces[i] for i in idx], **data.env_kwargs())
    return {DISPLAY[p]: eval_online(agent, envs[key], idx, seed)}


def _assemble(
    data: _Data, cfg: CompareConfig, splits_out: Mapping[str, Any], curves: Any, runtime: float, logs: Any
) -> dict[str, Any]:
    judge(splits_out)
    return {
        "format": "speckv-compare/1",
        "source": "traces",
        "logs": None if logs is None else str(logs),
        "config": asdict(cfg),
        "obs_version": data.obs_version,
        "data": data.summary(),
        "bandit_evaluation": "continue-per-episode: each test episode starts from the state learned on the "
        "training episodes and keeps learning within the episode; nothing carries across "
        "test episodes",
        "best_fixed_rule": BEST_FIXED_RULE,
        "information": INFORMATION,
        "primary_rule": PRIMARY_RULE,
        "splits": splits_out,
        "learning_curves": curves,
        "runtime_s": runtime,
    }


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
    obs_version: int | None = None,
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
        ("obs_version", obs_version),
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

    torch.set_num_threads(1)
    cfg = CompareConfig()
    steps = steps or {"speckv_mlp": cfg.mlp_rollout_steps, "ppo": cfg.ppo_steps}.get(agent, cfg.bandit_steps)
    out = Path(out)
    folder = out.parent if out.suffix in (".json", ".safetensors") else out
    folder.mkdir(parents=True, exist_ok=True)
    kw = dict(agent_kwargs or {})
    kw.setdefault("gammas", tuple(gammas))
    train_kw = {
        "steps": steps,
        "seed": seed,
        "tb_log_dir": folder / "tb" if tensorboard else None,
        "progress": progress,
        "agent_kwargs": kw,
        "run_name": f"SpecKVReplay-v0__train__{agent}__{seed}__{int(time.time())}",
    }
    if source == "speckv-paper":
        trained, train_env, test_env = _train_on_paper(agent, gammas, kw, train_kw)
    else:
        trained, train_env, test_env = _train_on_traces(agent, logs, kw, train_kw, cfg.ppo_n_envs)
    ext = ".safetensors" if trained.get_tensors() else ".json"
    path = out if out.suffix in (".json", ".safetensors") else folder / f"{agent}-seed{seed}{ext}"
    trained.save(path)
    return _train_summary(trained, path, train_env, test_env, kw["gammas"], seed)


def _train_on_paper(agent: str, gammas: Sequence[int], kw: dict[str, Any], train_kw: Mapping[str, Any]):
    """Train on the paper's training runs; returns (agent, train env, test env). Sets kw["gammas"]."""
    from agents.training import train_agent

    if agent == "ppo":
        raise ValueError("PPO trains on full-information traces (vectorised replay), not on the paper's step logs")
    gam = tuple(g for g in gammas if g <= 8)
    kw["gammas"] = gam

    def train_env():
        return paper_env({"split": ["train", "val"]}, gam, (8,))

    test_env = paper_env({"split": "test"}, gam, (8,))
    trained = train_agent(agent, env_factory=train_env, **train_kw)
    return trained, train_env(), test_env


def _train_on_traces(agent: str, logs: Any, kw: Mapping[str, Any], train_kw: Mapping[str, Any], ppo_n_envs: int):
    """Train on the traces' training split (train + val); returns (agent, train env, test env)."""
    from agents.training import train_agent
    from replay.env import SpecKVReplayEnv

    trs, cms = load_traces(logs, None, None)
    train = [t for t in trs if t.split in ("train",) + VAL_SPLITS]
    test = [t for t in trs if t.split == "test"]
    if not train or not test:
        raise ValueError("the data needs episodes in split train (or val) and in split test")
    ek = {"cost_models": cms, "gammas": kw["gammas"]}
    extra: dict[str, Any] = {"n_envs": ppo_n_envs} if agent == "ppo" else {}
    trained = train_agent(agent, traces=train, env_kwargs=ek, **train_kw, **extra)
    return trained, SpecKVReplayEnv(traces=train, **ek), SpecKVReplayEnv(traces=test, **ek)


def _train_summary(
    trained: Any, path: Path, train_env: Any, test_env: Any, gammas: Sequence[int], seed: int
) -> dict[str, Any]:
    """The trained agent's test tokens/s beside the best fixed gamma chosen on the training split."""
    from agents.base import make_agent
    from agents.training import evaluate_agent, summarize

    # online learners keep learning during the test episodes, as in run_comparison (but here the
    # learning carries over from one test episode to the next, as in a deployment)
    test_sum = summarize(evaluate_agent(trained, test_env, seed=seed, learn=trained.learns))
    best_g, best_tps = None, -1.0
    for g in gammas:
        s = summarize(evaluate_agent(make_agent("fixed", g=g, gammas=gammas), train_env))
        if s["tokens_per_second"] > best_tps:
            best_g, best_tps = g, s["tokens_per_second"]
    bf = summarize(evaluate_agent(make_agent("fixed", g=best_g, gammas=gammas), test_env))
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
