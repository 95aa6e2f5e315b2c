"""The comparison on the SpecKV paper's censored step logs (``speckv compare --logs speckv-paper``).

The logs are censored (only the recorded gamma's outcome is known), so the evaluation is the
paper's per-step methodology: every policy replays each recorded run step by step, positions
advance as recorded, and at each step the chosen gamma's outcome is taken from the log where
the log determines it; where it does not (the recorded step accepted all it drafted and the
policy asked for more) the step is answered at the largest determined gamma
(``on_undetermined="clip"``) and counted in the "clipped" column. There is no clairvoyant
oracle (the log does not determine it) and no PPO (it trains on the vectorised
full-information replay). Tokens/s is modelled with cost models fitted to the paper's wall
times (replay.importers.fit_cost_model).
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from .compare_data import BANDITS, BEST_FIXED, DISPLAY, CompareConfig
from .evaluate import eval_online, mlp_tokens_twin, thin
from .folds import describe_fold, paper_best_fixed, paper_folds
from .metrics import judge, paper_metrics
from .results import EvalResult, concat_folds, jsonable, stack_seeds

PAPER_POLICIES = ("fixed", "hf_heuristic", "cost_aware", "speckv_mlp", *BANDITS)


def paper_env(filters: Mapping[str, Any], gammas: Sequence[int], recorded: Sequence[int] = ()):
    """A replay env over the paper's step logs (``filters``: task/split/compression values),
    on the runs recorded at gammas ``recorded`` (() = all), undetermined outcomes clipped."""
    from replay.env import SpecKVReplayEnv

    return SpecKVReplayEnv(
        source="speckv-paper", on_undetermined="clip", gammas=gammas, recorded_gamma=list(recorded) or None, **filters
    )


class _PaperRuns:
    """The recorded runs the comparison evaluates, with their per-run constants."""

    def __init__(self, gammas: Sequence[int], cfg: CompareConfig) -> None:
        self.gammas = tuple(gammas)
        self.recorded = cfg.paper_recorded_gammas
        env_all = paper_env({}, self.gammas, self.recorded)
        self.runs = env_all.backend.runs
        self.run_index = {r["run_id"]: i for i, r in enumerate(self.runs)}
        cols = ("task", "compression", "split", "prompt_id", "run_id")
        self.meta = {c: np.array([r[c] for r in self.runs]) for c in cols}
        self.meta["id"] = self.meta["run_id"]
        self.t_target = np.array([cm.t_target for cm in env_all.backend.cost_models])
        self.rec_gamma = np.array([r["gamma"][0] for r in self.runs])

    def env(self, filters: Mapping[str, Any]):
        return paper_env(filters, self.gammas, self.recorded)

    def evaluate(self, agent: Any, env: Any, seed: int, learn: bool) -> EvalResult:
        """``agent`` on every run of ``env``, indexed by the run's place in :attr:`runs`."""
        ids = np.array([self.run_index[r["run_id"]] for r in env.backend.runs])
        return eval_online(agent, env, ids, seed, learn=learn)


def run_paper_comparison(out_dir: str | Path, cfg: CompareConfig) -> dict[str, Any]:
    """Compare policies on the SpecKV paper's step logs (``source="speckv-paper"``); see the
    module docs for the per-step methodology. Writes report.md, results.json and plots."""
    import torch

    from replay.importers import import_speckv_paper, load_step_log

    torch.set_num_threads(1)
    t0 = time.time()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tb = out / "tb" if cfg.tensorboard else None
    steps_df, cms = load_step_log("speckv-paper")
    _, runs = import_speckv_paper()
    gammas = tuple(g for g in cfg.gammas if g <= 8)
    pr = _PaperRuns(gammas, cfg)
    pol = set(cfg.policies) & set(PAPER_POLICIES)
    splits_out: dict[str, Any] = {}
    curves: dict[str, list[dict[str, Any]]] = {}
    for split in cfg.splits:
        folds = paper_folds(runs, split)
        if not folds:
            splits_out[split] = {"skipped": f"split {split!r} does not apply"}
            continue
        per_policy: dict[str, list[EvalResult]] = {}
        per_val: dict[str, list[EvalResult]] = {}
        fold_info = [_paper_fold(f, split, pr, cfg, pol, tb, (per_policy, per_val), curves) for f in folds]
        pooled = {n: concat_folds(rs) for n, rs in per_policy.items() if len(rs) == len(folds)}
        splits_out[split] = {
            "folds": fold_info,
            "policies": paper_metrics(pooled, pr.meta, pr.t_target, cfg),
            "_pooled": pooled,
        }
        val_pooled = {n: concat_folds(rs) for n, rs in per_val.items() if len(rs) == len(folds)}
        if val_pooled:
            vm = paper_metrics(val_pooled, pr.meta, pr.t_target, cfg)
            splits_out[split]["_val_metrics"] = vm
            splits_out[split]["validation"] = {
                "episodes": int(val_pooled[BEST_FIXED].idx.size),
                "tokens_per_s": {n: vm[n]["subsets"]["all"]["tokens_per_s"] for n in vm},
            }
    judge(splits_out)
    results = _paper_results(cfg, pr, runs, steps_df, cms, splits_out, curves)
    from .plots import write_paper_plots

    results["plots"] = write_paper_plots(results, out, gammas)
    results["runtime_s"] = time.time() - t0
    for s in splits_out.values():
        s.pop("_pooled", None)
        s.pop("_val_metrics", None)
    (out / "results.json").write_text(json.dumps(jsonable(results), indent=1))
    from .report import write_paper_report

    write_paper_report(results, out / "report.md")
    return results


def _paper_fold(
    f: Mapping[str, Any],
    split: str,
    pr: _PaperRuns,
    cfg: CompareConfig,
    pol: set[str],
    tb: Path | None,
    out: tuple[dict[str, list[EvalResult]], dict[str, list[EvalResult]]],
    curves: dict[str, list[dict[str, Any]]],
) -> dict[str, Any]:
    """Evaluate every policy on one fold, appending to ``out`` = (test results, validation
    results: only where the fold has validation runs); returns the fold's record. The fixed
    baseline is chosen on the fold's seen runs (train + validation), learners train on train."""
    from agents.base import make_agent

    gammas = pr.gammas
    env_tr = pr.env(f.get("seen", f["train"]))
    fixed_tr = {g: pr.evaluate(make_agent("fixed", g=g, gammas=gammas), env_tr, 0, False) for g in gammas}
    envs = {"test": pr.env(f["test"]), **({"val": pr.env(f["val"])} if "val" in f else {})}
    info: dict[str, Any] = {}
    for part, env in envs.items():
        dest = out[0] if part == "test" else out[1]
        fixed_te = {g: pr.evaluate(make_agent("fixed", g=g, gammas=gammas), env, 0, False) for g in gammas}
        choice, bf = paper_best_fixed(fixed_tr, fixed_te, pr.meta["compression"], gammas)
        dest.setdefault(BEST_FIXED, []).append(bf)
        if "fixed" in pol:
            for g in gammas:
                dest.setdefault(f"fixed-{g}", []).append(fixed_te[g])
        for name in ("hf_heuristic", "cost_aware"):
            if name in pol:
                dest.setdefault(DISPLAY[name], []).append(pr.evaluate(make_agent(name, gammas=gammas), env, 0, False))
        if part == "test":
            val = None
            if "val" in envs:
                val = np.array([pr.run_index[r["run_id"]] for r in envs["val"].backend.runs])
            info = describe_fold(f["name"], f["held_out"], fixed_tr[gammas[0]].idx, bf.idx, pr.meta, choice, val)
    got = _paper_learners(f, split, pr, cfg, pol, tb, envs, curves)
    for part, res in got.items():
        for name, rs in res.items():
            (out[0] if part == "test" else out[1]).setdefault(name, []).append(stack_seeds(rs))
    return info


def _paper_learners(
    f: Mapping[str, Any],
    split: str,
    pr: _PaperRuns,
    cfg: CompareConfig,
    pol: set[str],
    tb: Path | None,
    envs: Mapping[str, Any],
    curves: dict[str, list[dict[str, Any]]],
) -> dict[str, dict[str, list[EvalResult]]]:
    """Train the learned policies on the fold's training runs (every seed) and evaluate them on
    each of ``envs`` (test, and validation where the fold has it); returns results by part;
    learning curves of the held-out split go into ``curves``."""
    from tqdm.auto import tqdm

    from agents.training import train_agent

    gammas = pr.gammas
    learners = [p for p in ("speckv_mlp", *BANDITS) if p in pol and (p == "speckv_mlp" or split in cfg.bandit_splits)]
    jobs = [(p, s) for p in learners for s in range(cfg.seeds)]
    got: dict[str, dict[str, list[EvalResult]]] = {part: {} for part in envs}
    for p, s in tqdm(jobs, desc=f"paper {f['name']}", leave=False, disable=not cfg.progress):
        kw: dict[str, Any] = {
            "env_factory": lambda: pr.env(f["train"]),
            "seed": s,
            "tb_log_dir": tb,
            "progress": False,
            "run_name": f"SpecKVReplay-v0-paper__{f['name'].replace(':', '-')}__{p}__{s}",
        }
        if p == "speckv_mlp":
            agent = train_agent(
                "speckv_mlp",
                steps=cfg.mlp_rollout_steps,
                agent_kwargs={"rule": "time", "gammas": gammas},
                fit_kwargs={"epochs": cfg.mlp_epochs, "batch_size": cfg.mlp_batch_size},
                **kw,
            )
            twin = mlp_tokens_twin(agent)
            for part, env in envs.items():
                got[part].setdefault("mlp-time", []).append(pr.evaluate(agent, env, s, False))
                got[part].setdefault("mlp-tokens", []).append(pr.evaluate(twin, env, s, False))
        else:
            agent = train_agent(p, steps=cfg.bandit_steps, agent_kwargs={"gammas": gammas}, **kw)
            for part, env in envs.items():
                got[part].setdefault(DISPLAY[p], []).append(pr.evaluate(agent, env, s, True))
        if split == "heldout":
            curves.setdefault(p if p == "speckv_mlp" else DISPLAY[p], []).append(
                {"seed": s, "fold": f["name"], "log": thin(getattr(agent, "train_log", []))}
            )
    return got


def paper_table(runs: Any, steps_df: Any, cms: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The paper's own numbers per (compression, gamma): recorded tokens/step, measured tokens/s,
    and tokens/s modelled from every recorded run at that gamma."""
    table = []
    for (c, g), grp in runs.groupby(["compression", "gamma"]):
        # every recorded run at this gamma (the replay env holds only the runs that determine
        # every gamma, i.e. those recorded at gamma 8)
        st = steps_df[steps_df["run_id"].isin(set(grp["run_id"]))]
        cm = cms[c]
        mt = float(sum(cm.step_time(int(d), int(k)) for d, k in zip(st["drafted"], st["accepted"])))
        table.append(
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
    return table


def _paper_results(
    cfg: CompareConfig,
    pr: _PaperRuns,
    runs: Any,
    steps_df: Any,
    cms: Mapping[str, Any],
    splits_out: Mapping[str, Any],
    curves: Any,
) -> dict[str, Any]:
    meta = pr.meta
    return {
        "format": "speckv-compare/1",
        "source": "speckv-paper",
        "logs": "speckv-paper (replay/data/speckv_paper)",
        "config": asdict(cfg),
        "data": {
            "episodes": len(pr.runs),
            "tokens": float(runs["tokens"].sum()),
            "tasks": sorted(set(meta["task"])),
            "compressions": sorted(set(meta["compression"])),
            "modes": ["greedy"],
            "splits": {s: int((meta["split"] == s).sum()) for s in sorted(set(meta["split"]))},
            "pairs": sorted(set(steps_df["pair"])),
            "devices": sorted(set(steps_df["device"])),
            "synthetic": False,
            "cost_models": {k: v.to_dict() for k, v in cms.items()},
            "recorded_gammas": sorted(int(g) for g in set(pr.rec_gamma)),
            "censored_step_fraction": float(steps_df["censored"].mean()),
        },
        "evaluation": "per recorded step (the paper's methodology), on the runs recorded at gamma "
        f"{list(cfg.paper_recorded_gammas) or 'any'}; undetermined outcomes (none when only the largest "
        "recorded gamma is used) answered at the largest determined gamma (clip) and counted",
        "bandit_evaluation": "continue-per-episode: each test run starts from the state learned on the training runs "
        "and keeps learning within the run; nothing carries across test runs",
        "best_fixed_rule": "per compression, highest modelled tokens/s on the fold's training runs "
        "(held-out split: train + validation prompts; per recorded step); global training-best for a compression "
        "absent from training",
        "primary_rule": "the learned controller with the highest tokens/s on the validation prompt (learners "
        "trained on the train prompts) against best-fixed(train) on the test prompt; every other contrast "
        "secondary, Holm-adjusted",
        "paper_table": paper_table(runs, steps_df, cms),
        "splits": splits_out,
        "learning_curves": curves,
    }
