"""How much each candidate pre-decision feature says about the next drafted token's acceptance.

For issue 14 item 3 (richer pre-decision features): before any feature goes into the
observation, measure its ROC AUC for the event "the draft's proposal is accepted", on the
TRAINING split of ``speckv-trace/2`` traces (validation + test reported separately, as a check
only; nothing is chosen on them).

Step-start decisions (every output position t, event ``accept[t]``; what a controller knows
before choosing at a step that starts at t):

- ``sig_top1``, ``sig_entropy``, ``sig_margin``: the draft's distribution at t;
- ``lookup_match_len``, ``lookup_agrees``: the context lookup on ``prompt_tokens + tokens[:t]``
  (``speckv_env.lookup.lookup_table``, max n-gram 8: match length, and whether its proposal
  equals ``draft_argmax[t]``);
- ``tgt_top1_prev``, ``tgt_entropy_prev``: the target at the last verified position t - 1
  (t = 0 skipped for these two);
- ``greedy``: the decoding mode (1 = greedy), only in groups pooled over modes.

Token-mode decisions (after i >= 1 drafted and accepted tokens, event ``accept[t + i]``): the
decision points and features of ``agents.stopping.head_training_data`` (called per trace, rows
with i = 0 dropped): ``roll_top1``/``roll_entropy``/``roll_margin`` at [t, i], the survival
product of ``roll_p[t, :i]``, the last drafted token's ``roll_p[t, i - 1]``, and i itself.
Acceptance can change with i (a run that survived tends to lie in easy text), so pooled over i a
feature that falls with i (the survival product) can rank below 0.5 for that reason alone;
``auc_within_drafted`` is the AUC over pairs with the same i only (point estimate, no interval).

Every AUC is that of ``sign * feature`` with a sign fixed here in advance (entropies negated, so
0.5 = no information and > 0.5 = informative in the expected direction), computed by
``agents.stopping.auc``; the 95% interval is a cluster bootstrap over prompts (1000 resamples,
percentile). One logistic model on all features (``agents.stopping.fit_logistic``) is fitted on
train and scored on validation + test against the single feature that is best on train.

    .venv/bin/python experiments/feature_auc.py [FOLDER ...] [--out experiments/results/feature_auc.json]
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from agents.stopping import FEATURES as HEAD_FEATURES  # noqa: E402
from agents.stopping import auc, fit_logistic, head_training_data  # noqa: E402
from replay.trace import Trace, read_traces  # noqa: E402
from speckv_env.lookup import lookup_table  # noqa: E402  (pure numpy; the module imports torch)

DEFAULT_FOLDERS = [REPO / "runs/profile_v2/fp32", REPO / "runs/profile_v2/quant"]
DEFAULT_OUT = REPO / "experiments/results/feature_auc.json"
MAX_NGRAM = 8  # the shipped draft's lookup (len(speckv_draft.lookup_weights))
RESAMPLES = 1000
SEED = 0
HELDOUT = ("validation", "test")
SPLITS = ("train", *HELDOUT)

# name -> (sign, description); the sign is fixed before looking at data
STEP_FEATURES: dict[str, tuple[float, str]] = {
    "sig_top1": (1.0, "draft top-1 probability at t"),
    "sig_entropy": (-1.0, "draft entropy at t (negated)"),
    "sig_margin": (1.0, "draft top-1 minus top-2 at t"),
    "lookup_match_len": (1.0, "context lookup's match length at t (0-8)"),
    "lookup_agrees": (1.0, "lookup's proposal == draft_argmax[t]"),
    "tgt_top1_prev": (1.0, "target top-1 probability at t-1 (t >= 1)"),
    "tgt_entropy_prev": (-1.0, "target entropy at t-1 (negated; t >= 1)"),
    "greedy": (1.0, "decoding mode: 1 = greedy, 0 = sampling (groups pooled over modes only)"),
}
TOKEN_FEATURES: dict[str, tuple[float, str]] = {
    "roll_top1": (1.0, "draft top-1 probability of rollout token i from t"),
    "roll_entropy": (-1.0, "draft entropy of rollout token i (negated)"),
    "roll_margin": (1.0, "draft margin of rollout token i"),
    "survival": (1.0, "product of roll_p[t, :i]"),
    "last_p": (1.0, "roll_p[t, i-1], the last drafted token's own probability"),
    "drafted": (-1.0, "i, tokens already drafted and accepted (negated)"),
}
# token_features column of each token-mode feature (monotone transforms keep the AUC)
_HEAD_COL = {"roll_top1": "top1", "roll_entropy": "entropy", "roll_margin": "margin"}
_HEAD_COL.update({"survival": "log_survival", "last_p": "last_p", "drafted": "drafted"})


# ---- per-position tables ------------------------------------------------------------------


def step_rows(tr: Trace) -> dict[str, np.ndarray]:
    """Step-start features and the event accept[t] for every position t of one trace."""
    n = tr.n
    ctx = np.concatenate([np.asarray(tr.prompt_tokens, np.int64), np.asarray(tr.tokens, np.int64)])
    start = int(tr.prompt_tokens.shape[0])
    props, ns = lookup_table(ctx, start, MAX_NGRAM)  # entry k: the token after ctx[:start + k]
    prev = np.full(n, np.nan)
    tgt_top1, tgt_ent = prev.copy(), prev.copy()
    tgt_top1[1:], tgt_ent[1:] = tr.tgt_top1[:-1], tr.tgt_entropy[:-1]
    return {
        "y": tr.accept.astype(bool),
        "sig_top1": tr.sig_top1.astype(np.float64),
        "sig_entropy": tr.sig_entropy.astype(np.float64),
        "sig_margin": tr.sig_margin.astype(np.float64),
        "lookup_match_len": ns[:n].astype(np.float64),
        "lookup_agrees": ((props[:n] >= 0) & (props[:n] == tr.draft_argmax)).astype(np.float64),
        "tgt_top1_prev": tgt_top1,
        "tgt_entropy_prev": tgt_ent,
        "greedy": np.full(n, 0.0 if tr.sampling else 1.0),
    }


def token_rows(tr: Trace) -> dict[str, np.ndarray]:
    """Token-mode decisions after i >= 1 accepted drafted tokens: head_training_data's rows of
    this trace with i = 0 dropped."""
    X, y = head_training_data([tr], tr.gamma_max)
    keep = X[:, HEAD_FEATURES.index("drafted")] > 0
    out = {name: X[keep, HEAD_FEATURES.index(col)] for name, col in _HEAD_COL.items()}
    out["y"] = y[keep].astype(bool)
    return out


def build_table(traces: Sequence[Trace], rows_fn: Any) -> dict[str, np.ndarray]:
    """Concatenate per-trace rows, with each row's compression, mode, split and prompt."""
    parts: dict[str, list[np.ndarray]] = {}
    for tr in traces:
        rows = rows_fn(tr)
        m = rows["y"].shape[0]
        rows.update(
            compression=np.full(m, tr.compression, dtype=object),
            mode=np.full(m, tr.mode, dtype=object),
            split=np.full(m, tr.split, dtype=object),
            prompt=np.full(m, tr.prompt_id, dtype=object),
            trace=np.full(m, tr.trace_id, dtype=object),
        )
        for k, v in rows.items():
            parts.setdefault(k, []).append(v)
    return {k: np.concatenate(v) for k, v in parts.items()}


# ---- AUC with a cluster bootstrap -----------------------------------------------------------


def pair_counts(score: np.ndarray, y: np.ndarray, cl: np.ndarray, C: int) -> tuple[np.ndarray, ...]:
    """U[c, d] = positives of cluster c outranking negatives of cluster d (ties half), and the
    positives and negatives per cluster: any resample's AUC is w'Uw / ((w.P)(w.N))."""
    sp, cp, sn, cn = score[y], cl[y], score[~y], cl[~y]
    U = np.zeros((C, C))
    for d in np.unique(cn):
        nd = np.sort(sn[cn == d])
        lt = np.searchsorted(nd, sp, "left")
        le = np.searchsorted(nd, sp, "right")
        U[:, d] = np.bincount(cp, weights=lt + 0.5 * (le - lt), minlength=C)
    return U, np.bincount(cp, minlength=C).astype(float), np.bincount(cn, minlength=C).astype(float)


def boot_aucs(score: np.ndarray, y: np.ndarray, cl: np.ndarray, W: np.ndarray) -> np.ndarray:
    """The AUC under each row of cluster weights ``W`` (B x C); NaN where a resample lacks a class."""
    U, P, N = pair_counts(score, y, cl, W.shape[1])
    num = np.einsum("bc,cd,bd->b", W, U, W)
    den = (W @ P) * (W @ N)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1.0), np.nan)


def within_auc(score: np.ndarray, y: np.ndarray, strata: np.ndarray) -> float | None:
    """AUC over the positive-negative pairs of the same stratum only (point estimate)."""
    C = int(strata.max()) + 1 if strata.size else 0
    U, P, N = pair_counts(score, y, strata, C)
    den = float(P @ N)
    return _num(float(np.trace(U)) / den) if den > 0 else None


def _num(x: float) -> float | None:
    return None if x is None or not math.isfinite(x) else round(float(x), 4)


def auc_ci(score: np.ndarray, y: np.ndarray, cl: np.ndarray, W: np.ndarray) -> dict[str, Any]:
    """Point AUC (agents.stopping.auc), 95% cluster-bootstrap interval, counts."""
    point = auc(score, y)
    out: dict[str, Any] = {"auc": _num(point), "lo": None, "hi": None, "n_positions": int(y.shape[0])}
    out["n_accepted"] = int(y.sum())
    if not math.isfinite(point):
        return out
    ones = np.ones((1, W.shape[1]))
    check = float(boot_aucs(score, y, cl, ones)[0])
    assert abs(check - point) < 1e-9, (check, point)  # the bootstrap's form agrees with auc()
    if W.shape[1] >= 2:
        b = boot_aucs(score, y, cl, W)
        ok = b[np.isfinite(b)]
        if ok.size:
            out["lo"], out["hi"] = _num(float(np.percentile(ok, 2.5))), _num(float(np.percentile(ok, 97.5)))
        out["degenerate_resamples"] = int(b.size - ok.size)
    return out


def resample_weights(C: int, key: str) -> np.ndarray:
    """Multiplicities of C prompts in each of RESAMPLES cluster-bootstrap draws (seeded per group)."""
    rng = np.random.default_rng([SEED, *key.encode()])
    return rng.multinomial(C, np.full(C, 1.0 / C), size=RESAMPLES).astype(float)


# ---- groups and splits ------------------------------------------------------------------------


def group_masks(table: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """compression/mode groups: each pair, each compression over modes, each mode, everything."""
    comps, modes = sorted(set(table["compression"])), sorted(set(table["mode"]))
    out: dict[str, np.ndarray] = {}
    for c in [*comps, "all"]:
        for m in [*modes, "all"]:
            mask = np.ones(table["y"].shape[0], dtype=bool)
            if c != "all":
                mask &= table["compression"] == c
            if m != "all":
                mask &= table["mode"] == m
            if mask.any():
                out[f"{c}/{m}"] = mask
    return out


def evaluate(table: dict[str, np.ndarray], features: dict[str, tuple[float, str]]) -> dict[str, Any]:
    """Every feature's AUC and interval in every group of ``table`` (one split)."""
    groups: dict[str, Any] = {}
    for key, mask in group_masks(table).items():
        prompts, cl = np.unique(table["prompt"][mask], return_inverse=True)
        W = resample_weights(len(prompts), key)
        y = table["y"][mask]
        res: dict[str, Any] = {
            "n_traces": len(set(table["trace"][mask])),
            "n_prompts": len(prompts),
            "n_positions": int(mask.sum()),
            "accept_rate": _num(float(y.mean())),
            "features": {},
        }
        for name, (sign, _) in features.items():
            if name == "greedy" and len(set(table["mode"][mask])) < 2:
                continue  # the mode is constant within one mode
            x = table[name][mask]
            ok = np.isfinite(x)
            res["features"][name] = auc_ci(sign * x[ok], y[ok], cl[ok], W)
            if "drafted" in table and name != "drafted":  # token mode: also within equal i
                strata = np.unique(table["drafted"][mask][ok], return_inverse=True)[1]
                res["features"][name]["auc_within_drafted"] = within_auc(sign * x[ok], y[ok], strata)
        groups[key] = res
    return groups


def split_table(table: dict[str, np.ndarray], splits: Sequence[str]) -> dict[str, np.ndarray]:
    mask = np.isin(table["split"].astype(str), list(splits))
    return {k: v[mask] for k, v in table.items()}


# ---- one logistic model on all features ---------------------------------------------------------


def _design(table: dict[str, np.ndarray], names: Sequence[str]) -> np.ndarray:
    return np.column_stack([np.ones(table["y"].shape[0]), *[table[n] for n in names]])


def logistic_check(train: dict[str, np.ndarray], held: dict[str, np.ndarray], features: dict, names: list) -> dict:
    """Fit on train, score validation + test pooled over every group; against the single feature
    with the best pooled train AUC, on the same held-out rows, with a paired cluster bootstrap."""
    if not train["y"].shape[0] or not held["y"].shape[0] or len(set(train["y"])) < 2:
        return {"skipped": "train or held-out split empty, or one class only on train"}
    tr_rows = np.all(np.isfinite(_design(train, names)), axis=1)
    he_rows = np.all(np.isfinite(_design(held, names)), axis=1)
    w = fit_logistic(_design(train, names)[tr_rows], train["y"][tr_rows].astype(float))
    train_auc = {n: auc(features[n][0] * train[n][tr_rows], train["y"][tr_rows]) for n in names}
    best = max((n for n in names if math.isfinite(train_auc[n])), key=lambda n: train_auc[n])
    y = held["y"][he_rows]
    prompts, cl = np.unique(held["prompt"][he_rows], return_inverse=True)
    W = resample_weights(len(prompts), "logistic")
    s_logit = _design(held, names)[he_rows] @ w
    s_best = features[best][0] * held[best][he_rows]
    diff = boot_aucs(s_logit, y, cl, W) - boot_aucs(s_best, y, cl, W)
    diff = diff[np.isfinite(diff)]
    return {
        "features": list(names),
        "weights_raw": [round(float(v), 6) for v in w],
        "train_positions": int(tr_rows.sum()),
        "heldout_positions": int(he_rows.sum()),
        "heldout_prompts": len(prompts),
        "train_auc": _num(auc(_design(train, names)[tr_rows] @ w, train["y"][tr_rows])),
        "heldout_auc": auc_ci(s_logit, y, cl, W),
        "best_single_on_train": best,
        "best_single_train_auc": _num(train_auc[best]),
        "best_single_heldout_auc": auc_ci(s_best, y, cl, W),
        "heldout_auc_gain": _num(auc(s_logit, y) - auc(s_best, y)),
        "gain_lo": _num(float(np.percentile(diff, 2.5))) if len(prompts) >= 2 and diff.size else None,
        "gain_hi": _num(float(np.percentile(diff, 97.5))) if len(prompts) >= 2 and diff.size else None,
    }


# ---- report -------------------------------------------------------------------------------------


def _cell(r: dict | None) -> str:
    if not r or r.get("auc") is None:
        return "-"
    ci = f" [{r['lo']:.2f}, {r['hi']:.2f}]" if r.get("lo") is not None else " [n/a]"
    return f"{r['auc']:.3f}{ci}"


def markdown_table(groups: dict[str, Any], features: dict, title: str) -> str:
    keys = list(groups)
    lines = [f"**{title}**", "", "| feature | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
    for name in features:
        lines.append(f"| {name} | " + " | ".join(_cell(groups[k]["features"].get(name)) for k in keys) + " |")
    for label, field in (("prompts", "n_prompts"), ("positions", "n_positions"), ("accept rate", "accept_rate")):
        lines.append(f"| *{label}* | " + " | ".join(str(groups[k][field]) for k in keys) + " |")
    return "\n".join(lines)


def within_table(token: dict[str, Any]) -> str:
    """Token mode, all/all: the AUC pooled over i beside the AUC within equal i."""
    lines = [
        "**token mode, all/all: AUC pooled over i vs within equal i (point estimates)**",
        "",
        "| feature | train pooled | train within i | val+test pooled | val+test within i |",
        "|---|---|---|---|---|",
    ]
    for name in TOKEN_FEATURES:
        cells = []
        for split in ("train", "heldout"):
            r = token[split].get("all/all", {}).get("features", {}).get(name, {})
            cells += [str(r.get("auc", "-")), str(r.get("auc_within_drafted", "-"))]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def logistic_line(name: str, r: dict) -> str:
    if "skipped" in r:
        return f"- {name}: logistic skipped ({r['skipped']})"
    return (
        f"- {name}: logistic on all features, fitted on train ({r['train_positions']} positions): "
        f"validation+test AUC {_cell(r['heldout_auc'])} vs best single feature on train "
        f"`{r['best_single_on_train']}` {_cell(r['best_single_heldout_auc'])}; gain {r['heldout_auc_gain']} "
        f"[{r['gain_lo']}, {r['gain_hi']}] ({r['heldout_positions']} positions, {r['heldout_prompts']} prompts)"
    )


def report(result: dict) -> str:
    out = [
        f"Traces: {result['n_traces']} from {', '.join(result['trace_folders'])} (commit {result['commit'][:10]}, "
        f"{result['generated_utc']}).",
        "AUC of sign x feature (entropies and `drafted` negated); 95% cluster-bootstrap interval over prompts.",
        "",
    ]
    for decision, feats in (("step", STEP_FEATURES), ("token", TOKEN_FEATURES)):
        for split, label in (("train", "TRAINING split"), ("heldout", "CHECK ONLY: validation + test")):
            groups = result[decision][split]
            what = "step start, event accept[t]" if decision == "step" else "token mode i >= 1, event accept[t+i]"
            if groups:
                out += [markdown_table(groups, feats, f"{what} - {label}"), ""]
            else:
                out += [f"**{what} - {label}**: no positions", ""]
    out += [within_table(result["token"]), ""]
    out += [logistic_line(k, r) for k, r in result["logistic"].items()]
    return "\n".join(out)


def git_commit() -> tuple[str, bool]:
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO, capture_output=True, text=True
        ).stdout
        return head or "unknown", bool(dirty.strip())
    except OSError:
        return "unknown", False


def analyse(traces: Sequence[Trace], folders: Sequence[str]) -> dict[str, Any]:
    """Every number of the report, from traces (v1 traces are skipped and counted)."""
    v2 = [t for t in traces if t.has_rollouts]
    commit, dirty = git_commit()
    result: dict[str, Any] = {
        "schema": "speckv-feature-auc/1",
        "trace_folders": [str(f) for f in folders],
        "commit": commit,
        "worktree_dirty": dirty,  # tracked files changed since the commit
        "generated_utc": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "n_traces": len(v2),
        "n_traces_skipped_v1": len(traces) - len(v2),
        "traces_by_split": {s: sum(t.split == s for t in v2) for s in SPLITS},
        "prompts_by_split": {s: len({t.prompt_id for t in v2 if t.split == s}) for s in SPLITS},
        "compressions": sorted({t.compression for t in v2}),
        "modes": sorted({t.mode for t in v2}),
        "auc": "ROC AUC of sign * feature (agents.stopping.auc; ties half); 0.5 = uninformative",
        "interval": f"95% percentile, cluster bootstrap over prompt_id, {RESAMPLES} resamples, seed {SEED}",
        "splits": {"train": "train", "heldout": "validation + test (check only; nothing chosen on it)"},
        "lookup": f"speckv_env.lookup.lookup_table on prompt_tokens + tokens[:t], max n-gram {MAX_NGRAM}",
        "features": {
            "step": {k: {"sign": s, "description": d} for k, (s, d) in STEP_FEATURES.items()},
            "token": {k: {"sign": s, "description": d} for k, (s, d) in TOKEN_FEATURES.items()},
        },
        "logistic": {},
    }
    for decision, fn, feats in (("step", step_rows, STEP_FEATURES), ("token", token_rows, TOKEN_FEATURES)):
        table = build_table(v2, fn) if v2 else {}
        train = split_table(table, ["train"]) if table else {}
        held = split_table(table, HELDOUT) if table else {}
        result[decision] = {
            "train": evaluate(train, feats) if train and train["y"].size else {},
            "heldout": evaluate(held, feats) if held and held["y"].size else {},
        }
        if train and held:
            result["logistic"][decision] = logistic_check(train, held, feats, list(feats))
    return result


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folders", nargs="*", help="trace folders or files (default: runs/profile_v2/{fp32,quant})")
    ap.add_argument("--out", default=str(DEFAULT_OUT), help="JSON output path")
    args = ap.parse_args(argv)
    folders = [str(f) for f in (args.folders or DEFAULT_FOLDERS)]
    result = analyse(read_traces(folders), folders)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(report(result))
    return result


if __name__ == "__main__":
    main()
