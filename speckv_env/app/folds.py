"""How the comparison splits episodes into training and test folds, and how the best fixed
gamma is chosen on a fold's training episodes (see :mod:`speckv_env.app.compare`, "Splits")."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .compare_data import SPLITS, VAL_SPLITS, _Data
from .results import EvalResult


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


def paper_folds(runs: Any, split: str) -> list[dict[str, Any]]:
    """Folds of a split over the SpecKV paper's runs, as replay-env filters (train, test)."""
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


def describe_fold(
    name: str,
    held_out: str,
    train: np.ndarray,
    test: np.ndarray,
    meta: Mapping[str, np.ndarray],
    choice: Mapping[str, int],
) -> dict[str, Any]:
    """A fold as results.json records it; ``meta``: per-episode arrays ``task``,
    ``compression``, ``split`` and ``id``."""
    task, comp, split, ids = meta["task"], meta["compression"], meta["split"], meta["id"]
    return {
        "fold": name,
        "held_out": held_out,
        "n_train": int(train.size),
        "n_test": int(test.size),
        "train_tasks": sorted(set(task[train])),
        "test_tasks": sorted(set(task[test])),
        "train_compressions": sorted(set(comp[train])),
        "test_compressions": sorted(set(comp[test])),
        "train_splits": sorted(set(split[train])),
        "test_splits": sorted(set(split[test])),
        "train_trace_ids": ids[train].tolist(),
        "test_trace_ids": ids[test].tolist(),
        "best_fixed_gamma": choice,
    }


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


def best_fixed_result(
    fixed: Mapping[int, EvalResult], data: _Data, test: np.ndarray, choice: Mapping[str, int], gammas: Sequence[int]
) -> EvalResult:
    """best-fixed(train) on the test episodes: per episode, the gamma chosen for its compression."""
    chosen = [choice.get(c, choice["*"]) for c in data.compression[test]]
    bf_t = np.array([fixed[g].time[0, i] for i, g in zip(test, chosen)])
    bf_s = np.array([fixed[g].steps[0, i] for i, g in zip(test, chosen)])
    bf_g = np.array([fixed[g].gsum[0, i] for i, g in zip(test, chosen)])
    h = np.zeros((test.size, len(gammas)))
    for j, g in enumerate(chosen):
        h[j, list(gammas).index(g)] = bf_s[j]
    return EvalResult(test, bf_t[None], bf_s[None], bf_g[None], h)


def paper_best_fixed(
    fixed_tr: Mapping[int, EvalResult],
    fixed_te: Mapping[int, EvalResult],
    compression: np.ndarray,
    gammas: Sequence[int],
) -> tuple[dict[str, int], EvalResult]:
    """Step logs: per compression, the fixed gamma of highest modelled tokens/s on the training
    runs (``"*"``: over all of them), and best-fixed(train) on the test runs."""
    tr_ids = fixed_tr[gammas[0]].idx
    te_ids = fixed_te[gammas[0]].idx

    def best(sel: np.ndarray) -> int:
        return int(max(gammas, key=lambda g: (fixed_tr[g].tokens[0][sel].sum() / fixed_tr[g].time[0][sel].sum(), -g)))

    choice: dict[str, int] = {"*": best(np.ones(tr_ids.size, dtype=bool))}
    for c in sorted(set(compression[tr_ids])):
        choice[c] = best(compression[tr_ids] == c)
    rows = [fixed_te[choice.get(c, choice["*"])] for c in compression[te_ids]]
    bf = EvalResult(
        te_ids,
        *(np.array([[getattr(r, k)[0, j] for j, r in enumerate(rows)]]) for k in ("time", "steps", "gsum")),
        np.array([r.hist[j] for j, r in enumerate(rows)]),
        np.array([[r.clipped[0, j] for j, r in enumerate(rows)]]),
        np.array([[r.tokens[0, j] for j, r in enumerate(rows)]]),
    )
    return choice, bf
