"""Per-episode evaluation results of policies, how they are stacked, joined and aligned, and the
JSON form of a comparison's results."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np


@dataclass
class EvalResult:
    """Per-episode results of one policy on a set of episodes (``idx`` into the data set);
    arrays have shape (seeds, episodes)."""

    idx: np.ndarray
    time: np.ndarray
    steps: np.ndarray
    gsum: np.ndarray
    hist: np.ndarray  # (episodes, len(gammas)) chosen-gamma counts, summed over seeds
    clipped: np.ndarray | None = None  # step logs: steps whose requested gamma was undetermined
    tokens: np.ndarray | None = None  # step logs: emitted tokens (they depend on the policy there)


def stack_seeds(results: Sequence[EvalResult]) -> EvalResult:
    """Seeds of one policy on the same episodes -> one EvalResult with a seed axis."""
    r0 = results[0]
    hist = r0.hist.copy()
    for r in results[1:]:
        hist = hist + r.hist
    return EvalResult(
        r0.idx,
        np.concatenate([r.time for r in results]),
        np.concatenate([r.steps for r in results]),
        np.concatenate([r.gsum for r in results]),
        hist,
        None if r0.clipped is None else np.concatenate([r.clipped for r in results]),
        None if r0.tokens is None else np.concatenate([r.tokens for r in results]),
    )


def concat_folds(results: Sequence[EvalResult]) -> EvalResult:
    """Folds of one policy (disjoint episodes, same seeds) -> one EvalResult."""
    return EvalResult(
        np.concatenate([r.idx for r in results]),
        np.concatenate([r.time for r in results], axis=1),
        np.concatenate([r.steps for r in results], axis=1),
        np.concatenate([r.gsum for r in results], axis=1),
        np.concatenate([r.hist for r in results], axis=0),
        None if results[0].clipped is None else np.concatenate([r.clipped for r in results], axis=1),
        None if results[0].tokens is None else np.concatenate([r.tokens for r in results], axis=1),
    )


def select(res: EvalResult, idx: np.ndarray) -> EvalResult:
    pos = {int(i): j for j, i in enumerate(res.idx)}
    j = np.array([pos[int(i)] for i in idx], dtype=np.int64)
    return EvalResult(
        np.asarray(idx),
        res.time[:, j],
        res.steps[:, j],
        res.gsum[:, j],
        res.hist[j],
        None if res.clipped is None else res.clipped[:, j],
        None if res.tokens is None else res.tokens[:, j],
    )


def align(r: EvalResult, idx: np.ndarray) -> EvalResult:
    if r.idx.shape == idx.shape and np.array_equal(r.idx, idx):
        return r
    return select(r, idx)


def jsonable(x: Any) -> Any:
    """``x`` with numpy scalars and arrays, tuples and paths made JSON types; NaN and inf -> None."""
    if isinstance(x, dict):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    if isinstance(x, np.ndarray):
        return jsonable(x.tolist())
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
