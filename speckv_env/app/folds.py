"""How the comparison splits episodes into training and test folds, and how the best fixed
gamma is chosen on a fold's training episodes (see :mod:`speckv_env.app.compare`, "Splits")."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .compare_data import SPLITS, VAL_SPLITS, _Data
from .results import EvalResult


@dataclass
class Fold:
    """One fold: learners are trained on ``train``; ``val`` (held-out prompts, split
    validation; empty in the leave-one-out splits) is where the controller of the primary
    contrast is chosen; ``test`` is evaluated. The fixed baseline is chosen on ``seen``
    (train + val: all the data the learned side uses, for fitting or for selection)."""

    split: str
    name: str
    held_out: str
    train: np.ndarray
    test: np.ndarray
    val: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))

    @property
    def seen(self) -> np.ndarray:
        return np.concatenate([self.train, self.val]) if self.val.size else self.train


def make_folds(data: _Data, split: str) -> list[Fold]:
    """Folds of a split (see the module docs); [] when the split does not apply."""
    all_idx = np.arange(len(data.traces))
    if split == "heldout":
        train = all_idx[data.split == "train"]
        val = all_idx[np.isin(data.split, VAL_SPLITS)]
        test = all_idx[data.split == "test"]
        if not train.size:  # no split named train: the validation episodes are the training data
            train, val = val, val[:0]
        if not train.size or not test.size:
            return []
        return [Fold(split, "heldout", "split=test (prompts)", train, test, val)]
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
                "train": {"split": "train"},
                "val": {"split": "val"},
                "seen": {"split": ["train", "val"]},
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
    val: np.ndarray | None = None,
) -> dict[str, Any]:
    """A fold as results.json records it; ``meta``: per-episode arrays ``task``,
    ``compression``, ``split`` and ``id``. ``train`` here: every episode the fold trains on or
    selects with (train + validation); ``val``: the validation episodes among them."""
    task, comp, split, ids = meta["task"], meta["compression"], meta["split"], meta["id"]
    return {
        "fold": name,
        "held_out": held_out,
        "n_train": int(train.size),
        "n_validation": 0 if val is None else int(val.size),
        "validation_trace_ids": [] if val is None else ids[val].tolist(),
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


def best_fixed_choice(fixed: Mapping[int, EvalResult], data: _Data, seen: np.ndarray) -> dict[str, int]:
    """The fixed gamma per cost model (key: :meth:`_Data.cost_group`, usually the compression),
    chosen on the fold's ``seen`` (training) episodes only, knowing what the learned controllers
    know: for a cost model with training episodes, least total modelled time on those; for one
    absent from training (the held-out compression of leave-one-compression-out), least total
    time of *all* training episodes priced under that cost model (their acceptance, its costs:
    the learned controllers also learn acceptance from the training episodes and are given the
    held-out compression's cost model). Key ``"*"``: the training-best gamma over all training
    episodes, each under its own model (the choice of a baseline that ignores the cost model)."""
    times = {g: r.time[0] for g, r in fixed.items()}  # fixed results cover all episodes in order
    gs = sorted(times)
    groups = data.cost_group()
    out: dict[str, int] = {"*": int(min(gs, key=lambda g: (times[g][seen].sum(), g)))}
    for label in sorted({str(x) for x in groups}):
        sel = seen[groups[seen] == label]
        if sel.size:
            out[label] = int(min(gs, key=lambda g: (times[g][sel].sum(), g)))
        else:
            cm = data.cm[int(np.flatnonzero(groups == label)[0])]
            priced = {g: float(data.fixed_time_under(g, seen, cm).sum()) for g in gs}
            out[label] = int(min(gs, key=lambda g: (priced[g], g)))
    return out


def best_fixed_result(
    fixed: Mapping[int, EvalResult], data: _Data, test: np.ndarray, choice: Mapping[str, int], gammas: Sequence[int]
) -> EvalResult:
    """best-fixed(train) on the test episodes: per episode, the gamma chosen for its cost model."""
    chosen = [choice.get(c, choice["*"]) for c in data.cost_group()[test]]
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
        def key(g: int) -> tuple[float, int]:
            tokens = fixed_tr[g].tokens
            assert tokens is not None, "step-log results carry emitted tokens"
            return tokens[0][sel].sum() / fixed_tr[g].time[0][sel].sum(), -g

        return int(max(gammas, key=key))

    choice: dict[str, int] = {"*": best(np.ones(tr_ids.size, dtype=bool))}
    for c in sorted(set(compression[tr_ids])):
        choice[c] = best(compression[tr_ids] == c)
    rows = [fixed_te[choice.get(c, choice["*"])] for c in compression[te_ids]]
    clipped, tokens = [], []
    for r in rows:
        assert r.clipped is not None and r.tokens is not None, "step-log results carry clipped steps and tokens"
        clipped.append(r.clipped)
        tokens.append(r.tokens)

    def per_row(arrays: Sequence[np.ndarray]) -> np.ndarray:
        return np.array([[a[0, j] for j, a in enumerate(arrays)]])

    bf = EvalResult(
        te_ids,
        per_row([r.time for r in rows]),
        per_row([r.steps for r in rows]),
        per_row([r.gsum for r in rows]),
        np.array([r.hist[j] for j, r in enumerate(rows)]),
        per_row(clipped),
        per_row(tokens),
    )
    return choice, bf
