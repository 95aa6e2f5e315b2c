"""Plots of a comparison (matplotlib, Agg backend): throughput with intervals, gamma choices,
learning curves, regret curves. Called by :func:`speckv_env.app.compare.run_comparison`."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _order(policies: Mapping[str, Any]) -> list[str]:
    return sorted(policies, key=lambda p: policies[p]["subsets"]["all"]["tokens_per_s"]["value"])


def plot_throughput(results: Mapping[str, Any], path: Path) -> Path | None:
    plt = _plt()
    splits = [(s, v) for s, v in results["splits"].items() if "policies" in v]
    if not splits:
        return None
    n_pol = max(len(v["policies"]) for _, v in splits)
    fig, axes = plt.subplots(1, len(splits), figsize=(5.5 * len(splits), 0.32 * n_pol + 1.6), squeeze=False)
    for ax, (split, v) in zip(axes[0], splits):
        pol = v["policies"]
        names = _order(pol)
        vals = np.array([pol[p]["subsets"]["all"]["tokens_per_s"]["value"] for p in names])
        lo = np.array([pol[p]["subsets"]["all"]["tokens_per_s"]["lo"] for p in names])
        hi = np.array([pol[p]["subsets"]["all"]["tokens_per_s"]["hi"] for p in names])
        colors = [
            "#888888"
            if p.startswith("fixed-")
            else "#d62728"
            if p == "oracle"
            else "#2ca02c"
            if p == "best-fixed(train)"
            else "#1f77b4"
            for p in names
        ]
        y = np.arange(len(names))
        ax.barh(y, vals, xerr=[vals - lo, hi - vals], color=colors, capsize=2)
        ax.set_yticks(y, names, fontsize=8)
        bf = pol["best-fixed(train)"]["subsets"]["all"]["tokens_per_s"]["value"]
        ax.axvline(bf, color="#2ca02c", ls="--", lw=1)
        ax.set_xlim(min(vals) * 0.9, max(hi) * 1.02)
        ax.set_xlabel("modelled tokens/s (95% bootstrap CI)")
        ax.set_title(f"{split}: {pol['best-fixed(train)']['subsets']['all']['episodes']} test episodes", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_gamma_choices(results: Mapping[str, Any], gammas: Any, path: Path) -> Path | None:
    plt = _plt()
    split = next((s for s, v in results["splits"].items() if "policies" in v), None)
    if split is None:
        return None
    pol = results["splits"][split]["policies"]
    names = [p for p in _order(pol) if not p.startswith("fixed-")]
    M = np.array([pol[p]["subsets"]["all"]["gamma_hist"] for p in names])
    fig, ax = plt.subplots(figsize=(0.5 * len(gammas) + 3, 0.32 * len(names) + 1.5))
    im = ax.imshow(M, aspect="auto", cmap="viridis", vmin=0, vmax=1)
    ax.set_xticks(range(len(gammas)), [str(g) for g in gammas])
    ax.set_yticks(range(len(names)), names, fontsize=8)
    ax.set_xlabel("gamma chosen")
    ax.set_title(f"share of steps per gamma ({split} split)", fontsize=10)
    for i in range(M.shape[0]):
        for j in range(M.shape[1]):
            if M[i, j] >= 0.05:
                ax.text(
                    j, i, f"{M[i, j]:.2f}", ha="center", va="center", fontsize=6, color="w" if M[i, j] < 0.6 else "k"
                )
    fig.colorbar(im, ax=ax, fraction=0.04)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _binned(
    logs: list[list[dict[str, Any]]], xkey: str, ykey: str, bins: int = 30
) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    pts = [(r[xkey], r[ykey]) for log in logs for r in log if r.get(ykey) is not None and r.get(xkey) is not None]
    if len(pts) < 2:
        return None
    x = np.array([p[0] for p in pts], dtype=float)
    y = np.array([p[1] for p in pts], dtype=float)
    edges = np.linspace(x.min(), x.max() + 1e-9, bins + 1)
    b = np.clip(np.digitize(x, edges) - 1, 0, bins - 1)
    xs, ms, ss = [], [], []
    for k in range(bins):
        sel = b == k
        if sel.any():
            xs.append(x[sel].mean())
            ms.append(y[sel].mean())
            ss.append(y[sel].std() / max(np.sqrt(sel.sum()), 1))
    return np.array(xs), np.array(ms), np.array(ss)


def _heldout_curves(results: Mapping[str, Any]) -> dict[str, tuple[np.ndarray, list[list[dict[str, Any]]]]]:
    """Per online learner with held-out checkpoints: (training steps of the checkpoints, the
    curve of every seed)."""
    out = {}
    for p, runs in (results.get("learning_curves") or {}).items():
        cs = [r["heldout"] for r in runs if r.get("heldout")]
        if cs:
            n = min(len(c) for c in cs)
            out[p] = (np.array([pt["steps"] for pt in cs[0][:n]], dtype=float), cs)
    return out


def _curve_panel(ax: Any, curves: Mapping[str, Any], key: str, scale: float = 1.0) -> None:
    """Mean over seeds of ``key`` at each checkpoint, with a band of one sd."""
    for p, (x, cs) in curves.items():
        n = len(x)
        y = np.array([[c[i][key] for i in range(n)] for c in cs], dtype=float) * scale
        m = y.mean(0)
        sd = y.std(0, ddof=1) if y.shape[0] > 1 else np.zeros_like(m)
        ax.plot(x, m, marker="o", ms=3, label=f"{p} ({y.shape[0]} seeds)")
        ax.fill_between(x, m - sd, m + sd, alpha=0.2)
    ax.set_xscale("log")
    ax.set_xlabel("training steps (log scale)")


def _training_episode_panel(ax: Any, results: Mapping[str, Any], online: Mapping[str, Any]) -> None:
    """Without held-out checkpoints (the paper's step logs): tokens/s of the training episodes."""
    for p, runs in online.items():
        r = _binned([run["log"] for run in runs], "global_step", "tokens_per_second")
        if r is None:
            continue
        x, m, s = r
        ax.plot(x, m, label=f"{p} ({len(runs)} seeds)")
        ax.fill_between(x, m - s, m + s, alpha=0.2)
    split = next((v for v in results["splits"].values() if "policies" in v), None)
    if split is not None:
        for ref, st in (("best-fixed(train)", "--"), ("oracle", ":")):
            if ref in split["policies"]:
                val = split["policies"][ref]["subsets"]["all"]["tokens_per_s"]["value"]
                ax.axhline(val, color="k", ls=st, lw=1, label=f"{ref} (test set)")
    ax.set_xscale("log")
    ax.set_xlabel("training steps (log scale)")
    ax.set_ylabel("episode modelled tokens/s (training episodes)")
    ax.set_title("online learners while training (training episodes)", fontsize=10)


def plot_learning_curves(results: Mapping[str, Any], path: Path) -> Path | None:
    """Left: the online learners' held-out tokens/s (a frozen snapshot on the validation prompts)
    over training, beside best-fixed(train) and the oracle there (or, without held-out
    checkpoints, tokens/s of the training episodes); right: the SpecKV MLP's training loss."""
    plt = _plt()
    curves = results.get("learning_curves", {})
    online = {p: c for p, c in curves.items() if p != "speckv_mlp"}
    mlp = curves.get("speckv_mlp")
    if not online and not mlp:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    ax = axes[0]
    held = _heldout_curves(results)
    if held:
        _curve_panel(ax, held, "tokens_per_s")
        c0 = next(iter(held.values()))[1][0][0]
        ax.axhline(c0["best_fixed_tokens_per_s"], color="k", ls="--", lw=1, label="best-fixed(train)")
        ax.axhline(c0["oracle_tokens_per_s"], color="k", ls=":", lw=1, label="oracle (ceiling)")
        ax.set_ylabel("modelled tokens/s on the validation prompts")
        ax.set_title("held-out evaluation of a frozen snapshot during training", fontsize=10)
    else:
        _training_episode_panel(ax, results, online)
    ax.legend(fontsize=7)
    ax = axes[1]
    if mlp:
        r = _binned([run["log"] for run in mlp], "epoch", "loss", bins=max(len(mlp[0]["log"]), 2))
        if r is not None:
            ax.plot(r[0], r[1], marker="o", label=f"speckv_mlp ({len(mlp)} seeds)")
        ax.set_xlabel("epoch")
        ax.set_ylabel("weighted BCE over acceptance events")
        ax.set_title("SpecKV MLP training loss", fontsize=10)
        ax.legend(fontsize=7)
    else:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_regret_curves(results: Mapping[str, Any], path: Path) -> Path | None:
    """The online learners' held-out regret over training: time regret against the oracle and
    the share of the fixed-to-oracle gap captured (tokens/s), frozen snapshots on the
    validation prompts after each training chunk."""
    plt = _plt()
    held = _heldout_curves(results)
    if not held:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    _curve_panel(axes[0], held, "regret_time", 100.0)
    c0 = next(iter(held.values()))[1][0][0]
    tps_f, tps_o = c0["best_fixed_tokens_per_s"], c0["oracle_tokens_per_s"]
    axes[0].axhline(100 * (tps_o / tps_f - 1), color="k", ls="--", lw=1, label="best-fixed(train)")
    axes[0].set_ylabel("time regret vs oracle on validation prompts (%)")
    axes[0].set_title("held-out regret while training (lower is better)", fontsize=10)
    _curve_panel(axes[1], held, "gap_captured", 100.0)
    axes[1].axhline(0, color="k", ls="--", lw=1, label="best-fixed(train) (0%)")
    axes[1].set_ylabel("gap captured, tokens/s (%)")
    axes[1].set_title("share of the fixed-to-oracle gap captured (validation prompts)", fontsize=10)
    for ax in axes:
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_plots(results: Mapping[str, Any], splits_out: Mapping[str, Any], data: Any, out: Path) -> dict[str, str]:
    made = {
        "throughput": plot_throughput(results, out / "throughput.png"),
        "gamma_choices": plot_gamma_choices(results, data.gammas, out / "gamma_choices.png"),
        "learning_curves": plot_learning_curves(results, out / "learning_curves.png"),
        "regret_curves": plot_regret_curves(results, out / "regret_curves.png"),
    }
    return {k: str(v.name) for k, v in made.items() if v is not None}


def plot_paper_tokens_vs_speed(results: Mapping[str, Any], path: Path) -> Path | None:
    """The SpecKV paper's runs: tokens/step (the paper's objective) grows with gamma; tokens/s does not."""
    plt = _plt()
    tab = results.get("paper_table") or []
    if not tab:
        return None
    comps = sorted({r["compression"] for r in tab})
    fig, axes = plt.subplots(1, len(comps), figsize=(4.2 * len(comps), 3.6), squeeze=False)
    for ax, c in zip(axes[0], comps):
        rows = sorted((r for r in tab if r["compression"] == c), key=lambda r: r["gamma"])
        g = [r["gamma"] for r in rows]
        ax.plot(g, [r["paper_tokens_per_step"] for r in rows], "o-", color="#1f77b4", label="tokens/step (paper)")
        ax.set_xlabel("gamma (recorded runs)")
        ax.set_ylabel("tokens per step", color="#1f77b4")
        ax2 = ax.twinx()
        ax2.plot(
            g,
            [r["paper_measured_tokens_per_s"] for r in rows],
            "s--",
            color="#d62728",
            label="tokens/s measured (paper wall time)",
        )
        ax2.plot(
            g,
            [float("nan") if r["modelled_tokens_per_s"] is None else r["modelled_tokens_per_s"] for r in rows],
            "^:",
            color="#ff7f0e",
            label="tokens/s modelled (fitted cost)",
        )
        ax2.set_ylabel("tokens per second", color="#d62728")
        ax.set_title(c, fontsize=10)
        if c == comps[0]:
            h1, l1 = ax.get_legend_handles_labels()
            h2, l2 = ax2.get_legend_handles_labels()
            ax.legend(h1 + h2, l1 + l2, fontsize=7, loc="lower center")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_paper_plots(results: Mapping[str, Any], out: Path, gammas: Any) -> dict[str, str]:
    made = {
        "throughput": plot_throughput(results, out / "throughput.png"),
        "gamma_choices": plot_gamma_choices(results, gammas, out / "gamma_choices.png"),
        "learning_curves": plot_learning_curves(results, out / "learning_curves.png"),
        "tokens_per_step_vs_tokens_per_s": plot_paper_tokens_vs_speed(results, out / "paper_tokens_vs_speed.png"),
    }
    return {k: str(v.name) for k, v in made.items() if v is not None}


# ---- the live (online) comparison --------------------------------------------------------------


def plot_live_throughput(results: Mapping[str, Any], path: Path) -> Path | None:
    """Measured tokens/s with intervals (bars) and modelled tokens/s (markers) per policy."""
    plt = _plt()
    pol = results["splits"]["heldout"]["policies"]
    names = _order(pol)
    get = lambda p, k, f: pol[p]["subsets"]["all"][k][f]
    meas = np.array([get(p, "tokens_per_s", "value") for p in names])
    lo = np.array([get(p, "tokens_per_s", "lo") for p in names])
    hi = np.array([get(p, "tokens_per_s", "hi") for p in names])
    mod = np.array([get(p, "modelled_tokens_per_s", "value") for p in names])
    fig, ax = plt.subplots(figsize=(7, 0.32 * len(names) + 1.6))
    y = np.arange(len(names))
    colors = [
        "#888888" if p.startswith("fixed-") else "#2ca02c" if p == "best-fixed(train)" else "#1f77b4" for p in names
    ]
    ax.barh(y, meas, xerr=[meas - lo, hi - meas], color=colors, capsize=2, label="measured (95% CI)")
    ax.plot(mod, y, "k|", ms=12, mew=2, label="modelled (cost model)")
    ax.set_yticks(y, names, fontsize=8)
    ax.axvline(get("best-fixed(train)", "tokens_per_s", "value"), color="#2ca02c", ls="--", lw=1)
    ax.set_xlim(min(meas.min(), mod.min()) * 0.9, max(hi.max(), mod.max()) * 1.02)
    ax.set_xlabel("tokens/s on the held-out test prompts")
    ax.set_title(f"live: {pol['best-fixed(train)']['subsets']['all']['episodes']} test prompts", fontsize=10)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_online_learning(results: Mapping[str, Any], path: Path) -> Path | None:
    """The bandits' online learning curves, measured: left, measured tokens/s per training
    episode of each learner beside every fixed gamma on the same prompts; right, the learner's
    measured (solid) and modelled (dotted) tokens/s over best-fixed(train)'s on the same prompt."""
    plt = _plt()
    on = results.get("online") or {}
    curves = on.get("online") or {}
    if not curves:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    for n, v in (on.get("fixed_measured_tps") or {}).items():
        best = n == on.get("best_fixed")
        x = np.arange(1, len(v) + 1)
        axes[0].plot(x, v, color="k" if best else "#bbbbbb", lw=1.5 if best else 0.8, ls="--" if best else "-",
                     label=f"{n} (best fixed, train)" if best else None)  # fmt: skip
    for i, (n, pts) in enumerate(curves.items()):
        x = np.array([p["episode"] + 1 for p in pts])
        c = f"C{i}"
        axes[0].plot(x, [p["measured_tps"] for p in pts], marker="o", ms=3, color=c, label=n)
        axes[1].plot(x, [p["ratio_measured"] for p in pts], marker="o", ms=3, color=c, label=f"{n} measured")
        axes[1].plot(x, [p["ratio_modelled"] for p in pts], ls=":", color=c, lw=1)
    axes[0].set_ylabel("measured tokens/s (grey: fixed gammas, same prompts)")
    axes[0].set_title("online learning, live, on the train prompts", fontsize=10)
    axes[1].axhline(1.0, color="k", ls="--", lw=1)
    axes[1].set_ylabel("tokens/s / best-fixed(train) on the same prompt")
    axes[1].set_title("relative to best-fixed(train): measured (solid), modelled (dotted)", fontsize=10)
    for ax in axes:
        ax.set_xlabel("training episode (prompt, in order)")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_live_plots(results: Mapping[str, Any], out: Path) -> dict[str, str]:
    made = {
        "throughput": plot_live_throughput(results, out / "throughput.png"),
        "gamma_choices": plot_gamma_choices(results, results["config"]["gammas"], out / "gamma_choices.png"),
        "online_learning": plot_online_learning(results, out / "online_learning.png"),
    }
    return {k: str(v.name) for k, v in made.items() if v is not None}
