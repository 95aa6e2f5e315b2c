"""Importers of censored step logs (schema ``speckv-steps/2``) and their replay backend.

The SpecKV paper's released profiling data (``replay/data/speckv_paper/``, MIT, see its
README) logs one row per speculation step of ordinary runs: only the chosen gamma's outcome.
Such logs are *censored* (DESIGN.md): a step that drafted d tokens and accepted k < d tells
the outcome of every gamma g (min(k, g) accepted); a step with k == d tells it only for
g <= d. For the paper d = min(recorded gamma, max_new_tokens - position): it clipped the last
step's gamma to the tokens still wanted (``gamma_clip = "paper"``), so such a step is censored
at d, not at gamma; live logs (:class:`replay.recorder.RecordSteps`) use the engine's clip,
max_new_tokens - 1 - position. The step rule itself is :mod:`replay.steprule`'s.

Replay over a step log follows the *recorded* steps: the position advances as recorded,
whatever gamma the policy asks for, and each step answers the chosen gamma's outcome
counterfactually where the log determines it (a per-step, bandit-style evaluation: the
recorded trajectory is not re-planned). Asking for more raises
:class:`UndeterminedOutcomeError` unless the environment was made with
``on_undetermined="clip"`` (answer the largest determined gamma, d) or ``"skip"`` (the step
passes with reward 0, no time, no events; ``info["skipped"] = True``).

The paper's draft signals are POST-DRAFT (means/extremes over the tokens drafted in that
same step): they are leakage for a controller that chooses gamma before drafting, so the
step-log columns carry a ``post_`` prefix and the environment observes them only when asked
(``paper_features=True``); by default it observes the previous step's values.

The paper recorded no per-step timing and used no KV cache (every draft token and every
verification re-runs the full sequence). :func:`fit_cost_model` fits, per compression,
elapsed ~ n_steps * c_step + drafted_tokens * c_draft (non-negative least squares) from the
per-run wall times, and maps it to a :class:`CostModel` with t_draft = c_draft,
t_verify[g] = c_step for every g (no KV cache: a verification costs a full forward whatever
gamma is) and t_target = c_step (a target-only step is one full target forward).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from speckv_env.core import CostModel, DraftSignals, EpisodeInfo, StepOutcome

from . import steprule
from .backend import resolve_cost_model
from .costs import CostModelSet, load_cost_models
from .schema import STEPS_SCHEMA_VERSION, TraceFormatError, canonical_splits
from .steplog import read_step_log, write_step_log  # noqa: F401  (write_step_log: re-exported)
from .steprule import CLIP_PAPER, CLIP_RESERVE
from .trace import PathLike

PAPER_DIR = Path(__file__).resolve().parent / "data" / "speckv_paper"
PAPER_MAX_NEW_TOKENS = 80
PAPER_PAIR = "Llama-3.2-1B-Instruct -> Llama-3.2-3B-Instruct"
PAPER_DEVICE = "RTX 3090 (CUDA)"
_LN2 = math.log(2.0)


class UndeterminedOutcomeError(RuntimeError):
    """The log does not determine the requested gamma's outcome (the recorded step accepted
    everything it drafted, and a larger gamma was asked for)."""


# ---- import ---------------------------------------------------------------------------------


def paper_split(prompt_index: int) -> str:
    """Split of the paper's prompts: per task, prompts 0-2 train, 3 validation, 4 test."""
    return "train" if prompt_index < 3 else ("validation" if prompt_index == 3 else "test")


def import_speckv_paper(
    step_csv: PathLike = PAPER_DIR / "phase2_step_results.csv",
    experiment_csv: PathLike = PAPER_DIR / "phase2_experiment_results.csv",
    max_new_tokens: int = PAPER_MAX_NEW_TOKENS,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Import the paper's step CSV into ``speckv-steps/2`` rows (paper clip convention), plus one row per run.

    Runs are delimited where ``step == 0`` and matched in order with the experiment file's
    rows (which give the prompt text and the wall time). Raises :class:`TraceFormatError`
    naming the file when the two files disagree (run count, compression/gamma/task, steps).
    Returns ``(steps, runs)``; ``runs`` has run_id, compression, gamma, task, prompt_id,
    n_steps, tokens, drafted_tokens, elapsed_sec.
    """
    step_csv, experiment_csv = Path(step_csv), Path(experiment_csv)
    s, e = _read_paper_csvs(step_csv, experiment_csv)
    sizes = _check_paper_runs(s, e, step_csv, experiment_csv)
    e = _with_paper_ids(e)
    position, drafted = _paper_positions(s, sizes, max_new_tokens, step_csv)
    steps = _paper_step_rows(s, e, sizes, position, drafted, max_new_tokens)
    runs = pd.DataFrame(
        {
            "run_id": e["run_id"],
            "compression": e["compression"],
            "gamma": e["gamma"],
            "task": e["task"],
            "prompt_id": e["prompt_id"],
            "split": e["split"],
            "n_steps": sizes,
            "tokens": steps.groupby("run_id", sort=False)["tokens_produced"].sum().to_numpy(),
            "drafted_tokens": steps.groupby("run_id", sort=False)["drafted"].sum().to_numpy(),
            "elapsed_sec": e["elapsed_sec"].astype(float),
        }
    )
    if (runs["tokens"].to_numpy() != e["num_tokens"].to_numpy()).any():
        i = int(np.nonzero(runs["tokens"].to_numpy() != e["num_tokens"].to_numpy())[0][0])
        raise TraceFormatError(
            f"{step_csv}: run {i} produces {runs['tokens'].iloc[i]} tokens "
            f"but {experiment_csv} says {e['num_tokens'].iloc[i]}"
        )
    return steps, runs


def _read_paper_csvs(step_csv: Path, experiment_csv: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The paper's two CSV files, with the columns the import needs (named in the error)."""
    need_s = [
        "compression",
        "gamma",
        "task",
        "step",
        "accepted",
        "tokens_produced",
        "mean_draft_entropy",
        "mean_draft_confidence",
        "max_draft_entropy",
        "min_draft_confidence",
    ]
    need_e = ["compression", "gamma", "task", "prompt", "num_tokens", "elapsed_sec", "num_steps"]
    try:
        s = pd.read_csv(step_csv)
        e = pd.read_csv(experiment_csv)
    except (OSError, pd.errors.ParserError, UnicodeDecodeError) as err:
        raise TraceFormatError(f"{step_csv} / {experiment_csv}: cannot read CSV ({err})") from None
    for df, need, f in ((s, need_s, step_csv), (e, need_e, experiment_csv)):
        miss = [c for c in need if c not in df.columns]
        if miss:
            raise TraceFormatError(f"{f}: missing column(s) {', '.join(miss)}")
    return s, e


def _check_paper_runs(s: pd.DataFrame, e: pd.DataFrame, step_csv: Path, experiment_csv: Path) -> np.ndarray:
    """Check that the step file's runs match the experiment file's rows; returns the run sizes."""
    if len(s) == 0 or s["step"].iloc[0] != 0:
        raise TraceFormatError(f"{step_csv}: the first row must start a run (step == 0)")
    run = (s["step"] == 0).cumsum().to_numpy() - 1
    n_runs = int(run[-1]) + 1
    if n_runs != len(e):
        raise TraceFormatError(f"{step_csv}: {n_runs} runs (step == 0 rows) but {experiment_csv} has {len(e)} rows")
    first = s.groupby(run).first()
    sizes = s.groupby(run).size().to_numpy()
    for col in ("compression", "gamma", "task"):
        bad = np.nonzero(first[col].to_numpy() != e[col].to_numpy())[0]
        if bad.size:
            i = int(bad[0])
            raise TraceFormatError(
                f"{step_csv}: run {i} has {col} {first[col].iloc[i]!r} "
                f"but {experiment_csv} row {i} has {e[col].iloc[i]!r}"
            )
    if (sizes != e["num_steps"].to_numpy()).any():
        i = int(np.nonzero(sizes != e["num_steps"].to_numpy())[0][0])
        raise TraceFormatError(
            f"{step_csv}: run {i} has {sizes[i]} steps but {experiment_csv} says num_steps = {e['num_steps'].iloc[i]}"
        )
    steps_ok = s["step"].to_numpy() == (np.arange(len(s)) - np.repeat(np.cumsum(sizes) - sizes, sizes))
    if not steps_ok.all():
        raise TraceFormatError(
            f"{step_csv}: row {int(np.nonzero(~steps_ok)[0][0]) + 2}: step indices within a run must be 0, 1, 2, ..."
        )
    if (
        (s["tokens_produced"] != s["accepted"] + 1).any()
        or (s["accepted"] < 0).any()
        or (s["accepted"] > s["gamma"]).any()
    ):
        raise TraceFormatError(f"{step_csv}: tokens_produced must be accepted + 1 with 0 <= accepted <= gamma")

    return sizes


def _with_paper_ids(e: pd.DataFrame) -> pd.DataFrame:
    """The experiment rows with prompt_id, split and run_id columns."""
    # prompt ids: order of first appearance within each task
    prompt_ids: dict[tuple[str, str], tuple[str, int]] = {}
    for task, prompt in zip(e["task"], e["prompt"]):
        if (task, prompt) not in prompt_ids:
            idx = sum(1 for (t, _) in prompt_ids if t == task)
            prompt_ids[(task, prompt)] = (f"{task}-{idx}", idx)
    e = e.copy()
    e["prompt_id"] = [prompt_ids[(t, p)][0] for t, p in zip(e["task"], e["prompt"])]
    e["split"] = [paper_split(prompt_ids[(t, p)][1]) for t, p in zip(e["task"], e["prompt"])]
    e["run_id"] = [f"speckv-paper/{c}/g{g}/{pid}" for c, g, pid in zip(e["compression"], e["gamma"], e["prompt_id"])]

    return e


def _paper_positions(
    s: pd.DataFrame, sizes: np.ndarray, max_new_tokens: int, step_csv: Path
) -> tuple[np.ndarray, np.ndarray]:
    """Each step's output position and the tokens it could draft (the paper's clip)."""
    tp = s["tokens_produced"].to_numpy().astype(np.int64)
    position = np.cumsum(tp) - tp
    starts = np.cumsum(sizes) - sizes
    position = position - np.repeat(position[starts], sizes)
    gamma = s["gamma"].to_numpy().astype(np.int64)
    drafted = np.minimum(gamma, max_new_tokens - position)
    accepted = s["accepted"].to_numpy().astype(np.int64)
    if (drafted < 1).any() or (accepted > drafted).any():
        i = int(np.nonzero((drafted < 1) | (accepted > drafted))[0][0])
        raise TraceFormatError(
            f"{step_csv}: row {i + 2}: accepted {accepted[i]} exceeds the {drafted[i]} tokens "
            f"that could be drafted at position {position[i]}"
        )
    return position, drafted


def _paper_step_rows(
    s: pd.DataFrame,
    e: pd.DataFrame,
    sizes: np.ndarray,
    position: np.ndarray,
    drafted: np.ndarray,
    max_new_tokens: int,
) -> pd.DataFrame:
    """The ``speckv-steps/2`` rows of the imported runs."""
    tp = s["tokens_produced"].to_numpy().astype(np.int64)
    gamma = s["gamma"].to_numpy().astype(np.int64)
    accepted = s["accepted"].to_numpy().astype(np.int64)
    rep = lambda col: np.repeat(e[col].to_numpy(), sizes)
    return pd.DataFrame(
        {
            "schema": STEPS_SCHEMA_VERSION,
            "source": "speckv-paper",
            "run_id": rep("run_id"),
            "pair": PAPER_PAIR,
            "compression": s["compression"].astype(str).to_numpy(),
            "device": PAPER_DEVICE,
            "task": s["task"].astype(str).to_numpy(),
            "split": rep("split"),
            "prompt_id": rep("prompt_id"),
            "prompt": rep("prompt"),
            "mode": "greedy",
            "max_new_tokens": np.int32(max_new_tokens),
            "step": s["step"].to_numpy().astype(np.int32),
            "position": position.astype(np.int32),
            "gamma": gamma.astype(np.int16),
            "drafted": drafted.astype(np.int16),
            "accepted": accepted.astype(np.int16),
            "tokens_produced": tp.astype(np.int16),
            "censored": accepted == drafted,
            "post_mean_entropy_bits": s["mean_draft_entropy"].to_numpy().astype(np.float32),
            "post_mean_confidence": s["mean_draft_confidence"].to_numpy().astype(np.float32),
            "post_max_entropy_bits": s["max_draft_entropy"].to_numpy().astype(np.float32),
            "post_min_confidence": s["min_draft_confidence"].to_numpy().astype(np.float32),
            "gamma_clip": CLIP_PAPER,
            "finish_reason": np.repeat(np.where(e["num_tokens"].to_numpy() >= max_new_tokens, "length", "eos"), sizes),
            "draft_fingerprint": "",
        }
    )


# ---- cost model ------------------------------------------------------------------------------


def _nnls2(X: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Non-negative least squares for two columns (exact: checks the feasible faces)."""
    best, best_err = np.zeros(2), float(np.sum(y**2))
    cands = []
    sol, *_ = np.linalg.lstsq(X, y, rcond=None)
    cands.append(sol)
    for j in range(2):
        c = np.zeros(2)
        xx = float(X[:, j] @ X[:, j])
        c[j] = max(float(X[:, j] @ y) / xx, 0.0) if xx > 0 else 0.0
        cands.append(c)
    for c in cands:
        if (c >= 0).all():
            err = float(np.sum((X @ c - y) ** 2))
            if err < best_err:
                best, best_err = c, err
    return best


@dataclass
class CostFit:
    """Result of :func:`fit_cost_model` for one compression."""

    compression: str
    c_step: float
    c_draft: float
    n_runs: int
    r2: float
    cost_model: CostModel


def fit_cost_model(runs: pd.DataFrame, compression: str, gamma_max: int = 8) -> CostFit:
    """Fit elapsed ~ n_steps * c_step + drafted_tokens * c_draft (NNLS) for one compression."""
    r = runs[runs["compression"] == compression]
    if len(r) < 2:
        raise ValueError(f"need at least 2 runs to fit a cost model for {compression!r}, have {len(r)}")
    X = np.stack([r["n_steps"].to_numpy(float), r["drafted_tokens"].to_numpy(float)], axis=1)
    y = r["elapsed_sec"].to_numpy(float)
    c_step, c_draft = (float(v) for v in _nnls2(X, y))
    resid = y - X @ np.array([c_step, c_draft])
    r2 = 1.0 - float(resid @ resid) / float(((y - y.mean()) ** 2).sum())
    if c_step <= 0:
        raise ValueError(f"cost model fit for {compression!r} gave a non-positive step cost")
    cm = CostModel(
        t_draft=c_draft,
        t_verify=[c_step] * (gamma_max + 1),
        t_target=c_step,
        pair=PAPER_PAIR,
        compression=compression,
        device=PAPER_DEVICE,
        meta={
            "source": "speckv-paper phase2_experiment_results.csv (per-run wall time)",
            "fit": "elapsed ~ n_steps * c_step + drafted_tokens * c_draft, non-negative least squares",
            "n_runs": int(len(r)),
            "r2": r2,
            "no_kv_cache": True,
            "note": "the paper used no KV cache: each draft token and each verification re-ran the full "
            "sequence, so costs are averages over 80-token generations; t_verify is flat in gamma and "
            "t_target is taken equal to c_step (no target-only runs were recorded)",
        },
    )
    return CostFit(compression, c_step, c_draft, int(len(r)), r2, cm)


def fit_cost_models(runs: pd.DataFrame, gamma_max: int = 8) -> dict[str, CostModel]:
    return {c: fit_cost_model(runs, c, gamma_max).cost_model for c in sorted(runs["compression"].unique())}


# ---- files -----------------------------------------------------------------------------------


_PAPER_CACHE: dict[str, Any] = {}


def load_step_log(
    src: PathLike | Sequence[PathLike] | str,
    task: None | str | Sequence[str] = None,
    split: None | str | Sequence[str] = None,
    compression: None | str | Sequence[str] = None,
    mode: None | str | Sequence[str] = None,
) -> tuple[pd.DataFrame, CostModelSet]:
    """Step rows (filtered) and cost models: ``src="speckv-paper"`` imports the shipped paper
    data (cost models fitted from its wall times); otherwise ``src`` is a step-log path (or a
    list) and the ``cost-*.json`` beside each are loaded (conflicts between folders raise).
    Split filters accept aliases (``val`` for ``validation``)."""
    cms = CostModelSet()
    if isinstance(src, str) and src == "speckv-paper":
        if "paper" not in _PAPER_CACHE:
            steps, runs = import_speckv_paper()
            _PAPER_CACHE["paper"] = (steps, fit_cost_models(runs))
        steps, fitted = _PAPER_CACHE["paper"]
        for c, cm in fitted.items():
            cms.add(cm, f"fitted to the SpecKV paper's {c} runs")
    else:
        steps = read_step_log(src)
        items: list[PathLike] = [src] if isinstance(src, (str, os.PathLike)) else list(src)
        for folder in dict.fromkeys(Path(it) if Path(it).is_dir() else Path(it).parent for it in items):
            cms.update(load_cost_models(folder))
    keep = np.ones(len(steps), dtype=bool)
    for col, want in (("task", task), ("split", canonical_splits(split)), ("compression", compression), ("mode", mode)):
        if want is not None:
            keep &= steps[col].isin([want] if isinstance(want, str) else list(want)).to_numpy()
    return steps[keep].reset_index(drop=True), cms


# ---- replay backend ---------------------------------------------------------------------------


class StepLogBackend:
    """Replays censored step logs: episodes are recorded runs, positions advance as recorded.

    ``step(g)`` answers the outcome of gamma ``g`` at the current recorded step where the log
    determines it (see the module docstring), with the step rule of :mod:`replay.steprule`
    under the run's clip convention (``gamma_clip``); ``on_undetermined`` is ``"raise"``,
    ``"clip"`` or ``"skip"``. A run ends with its recorded finish reason (``eos``: terminated).
    Emitted token ids are not in the logs: ``tokens`` holds -1s.
    """

    def __init__(
        self, steps: pd.DataFrame, cost_models: Any, on_undetermined: str = "raise", paper_features: bool = False
    ) -> None:
        if on_undetermined not in ("raise", "clip", "skip"):
            raise ValueError(f"on_undetermined must be 'raise', 'clip' or 'skip', got {on_undetermined!r}")
        if len(steps) == 0:
            raise ValueError("StepLogBackend needs at least one step (the filters may have removed them all)")
        self.on_undetermined = on_undetermined
        self.paper_features = bool(paper_features)
        self.runs = _runs(steps)
        if callable(cost_models):
            self.cost_models = [cost_models(r, f"run {r['run_id']!r}") for r in self.runs]
        else:
            self.cost_models = [
                resolve_cost_model(cost_models, r["compression"], f"run {r['run_id']!r}") for r in self.runs
            ]
        self.gamma_max = max(max(r["gamma"]) for r in self.runs)
        self.sampling = False
        self._load(0)

    def _load(self, index: int) -> None:
        self.index = index
        self.run = self.runs[index]
        self.max_new_tokens = self.run["max_new_tokens"]
        self.compression = self.run["compression"]
        self.cost_model = self.cost_models[index]
        self._reserve = CLIP_RESERVE[self.run["gamma_clip"]]
        self._i = 0
        self._pos = 0

    def num_episodes(self) -> int:
        return len(self.runs)

    def reset(self, index: int, seed: int | None) -> EpisodeInfo:
        if not 0 <= index < len(self.runs):
            raise IndexError(f"episode {index} out of range: {len(self.runs)} runs")
        self._load(index)
        r = self.run
        return EpisodeInfo(
            r["prompt_id"],
            r["task"],
            r["compression"],
            r["mode"],
            r["max_new_tokens"],
            extra={"run_id": r["run_id"], "split": r["split"]},
        )

    def signals(self) -> DraftSignals:
        """Paper features (post-draft, leaky) of the current step if asked; else the previous
        step's (zeros at the first step). The paper recorded no top-1/top-2 margin: 0."""
        j = self._i if self.paper_features else self._i - 1
        if j < 0 or j >= len(self.run["gamma"]):
            return DraftSignals(0.0, 0.0, 0.0)
        return DraftSignals(self.run["conf"][j], self.run["ent"][j], 0.0)

    def position(self) -> int:
        return self._pos

    def step(self, gamma: int) -> StepOutcome:
        r, i = self.run, self._i
        if i >= len(r["gamma"]):
            raise RuntimeError("step() past the end of the run: reset first")
        d, k_rec = r["drafted"][i], r["accepted"][i]
        limit = r["max_new_tokens"] - self._reserve - r["position"][i]
        # k_rec < d: the run of acceptances is k_rec, every gamma is determined; k_rec == d: it is
        # at least d, so gammas whose g_eff exceeds d are not determined
        undetermined = k_rec == d and min(int(gamma), limit) > d
        skipped = False
        g_req = int(gamma)
        if undetermined:
            if self.on_undetermined == "raise":
                raise UndeterminedOutcomeError(
                    f"run {r['run_id']!r} step {r['step'][i]}: the log recorded gamma {r['gamma'][i]} "
                    f"(drafted {d}, all accepted), so the outcome of the requested gamma {int(gamma)} is not "
                    f"determined; ask for gamma <= {d} here, or make the env with on_undetermined='clip' or 'skip'"
                )
            skipped = self.on_undetermined == "skip"
            g_req = d
        # the proposal at this position was tested iff the step drafted (d >= 1): a_t = k_rec >= 1
        a_t = (k_rec >= 1) if d >= 1 else None
        g, k, ones, rejected = steprule.step(k_rec, a_t, g_req, limit)
        self._pos += k_rec + 1
        self._i += 1
        done = self._i >= len(r["gamma"])
        return StepOutcome(
            gamma=g,
            accepted=k,
            tokens=[-1] * (k + 1),
            done=done,
            finish_reason=r["finish_reason"] if done else None,
            events=steprule.events(ones, rejected),
            extra={
                "undetermined": undetermined,
                "skipped": skipped,
                "recorded_gamma": r["gamma"][i],
                "recorded_accepted": k_rec,
                "recorded_tokens": k_rec + 1,
                "run_id": r["run_id"],
                "step": r["step"][i],
            },
        )

    def close(self) -> None:
        pass


def _runs(steps: pd.DataFrame) -> list[dict[str, Any]]:
    """Step rows (validated by the reader or the importer) grouped into runs, in order of first
    appearance, each with its run columns and its per-step lists."""
    codes, run_ids = pd.factorize(steps["run_id"], sort=False)
    order = np.lexsort((steps["step"].to_numpy(), codes))  # by run (first appearance), then step
    bounds = np.flatnonzero(np.diff(codes[order])) + 1
    cols = {
        "gamma": steps["gamma"].to_numpy(np.int64),
        "drafted": steps["drafted"].to_numpy(np.int64),
        "accepted": steps["accepted"].to_numpy(np.int64),
        "position": steps["position"].to_numpy(np.int64),
        "step": steps["step"].to_numpy(np.int64),
        "conf": steps["post_mean_confidence"].to_numpy(np.float64),
        "ent": steps["post_mean_entropy_bits"].to_numpy(np.float64) * _LN2,
    }
    meta_cols = ("task", "compression", "prompt_id", "split", "mode", "pair", "device", "gamma_clip", "finish_reason")
    meta = {c: steps[c].to_numpy() for c in (*meta_cols, "draft_fingerprint")}
    mnt = steps["max_new_tokens"].to_numpy()
    runs = []
    for rows in np.split(order, bounds):
        r0 = int(rows[0])
        run: dict[str, Any] = {"run_id": str(run_ids[codes[r0]]), "max_new_tokens": int(mnt[r0])}
        run.update({c: str(meta[c][r0]) for c in meta_cols})
        run["draft_fingerprint"] = str(meta["draft_fingerprint"][r0])
        run.update({c: v[rows].tolist() for c, v in cols.items()})
        if run["position"][0] != 0 or any(
            b != a + k + 1 for a, b, k in zip(run["position"], run["position"][1:], run["accepted"])
        ):
            raise TraceFormatError(f"step log run {run['run_id']!r}: positions do not follow the recorded steps")
        runs.append(run)
    return runs
