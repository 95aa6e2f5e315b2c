"""Figures of the default pair from its profiling traces: alpha per task x compression x mode.

alpha = mean greedy/sampled acceptance per drafted token along the target's own output
(the trace's a_s: would the draft's proposal at s be accepted), the loop fraction (outputs
where one repeated n-gram covers > 30% of the tokens), and the modelled speedup of the best
fixed gamma over target-only decoding under each compression's calibrated cost model.

    python experiments/pair_figures.py [TRACES] [--json OUT.json] [--split test]
"""

from __future__ import annotations

import argparse
import json
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np

from replay.oracle import fixed_gamma_time
from replay.trace import load_cost_models, read_traces


def loop_fraction_one(tokens: np.ndarray, n: int = 4, cover: float = 0.3) -> bool:
    """True if the most frequent n-gram (repeated >= 3 times) covers more than ``cover`` of the output."""
    t = tokens.tolist()
    if len(t) < 3 * n:
        return False
    grams = Counter(tuple(t[i : i + n]) for i in range(len(t) - n + 1))
    g, c = grams.most_common(1)[0]
    return c >= 3 and c * n / len(t) > cover


def figures(traces_dir: str, splits: list[str]) -> dict:
    trs = read_traces(traces_dir, split=splits)
    cms = load_cost_models(traces_dir)
    groups: dict[tuple[str, str, str], list] = defaultdict(list)
    loops = {t.trace_id: loop_fraction_one(t.tokens) for t in trs}
    for t in trs:
        groups[(t.compression, t.mode, t.task)].append(t)
        groups[(t.compression, t.mode, "all")].append(t)
    out = {}
    for (comp, mode, task), ts in sorted(groups.items()):
        acc = np.concatenate([t.accept[:-1] for t in ts if t.n > 1])  # the last token is always the target's
        clean = [t.accept[:-1] for t in ts if t.n > 1 and not loops[t.trace_id]]
        acc_clean = float(np.concatenate(clean).mean()) if clean else float("nan")
        cm = cms[comp]
        n_tok = sum(t.n for t in ts)
        fixed = {g: n_tok / sum(fixed_gamma_time(t, cm, g) for t in ts) for g in range(9)}
        best = max(fixed, key=lambda g: fixed[g])
        out[f"{comp}/{mode}/{task}"] = {
            "compression": comp,
            "mode": mode,
            "task": task,
            "episodes": len(ts),
            "tokens": n_tok,
            "alpha": float(acc.mean()),
            "alpha_no_loops": acc_clean,
            "loop_fraction": float(np.mean([loops[t.trace_id] for t in ts])),
            "best_fixed_gamma": int(best),
            "best_fixed_modelled_tps": fixed[best],
            "target_only_tps": 1.0 / cm.t_target,
            "modelled_speedup": fixed[best] * cm.t_target,
            "cost_ratio": cm.cost_ratio,
        }
    return {"splits": splits, "traces": traces_dir, "groups": out}


def markdown(fig: dict) -> str:
    rows = [
        "| compression | mode | chat | code | math | summarization | mean of tasks | mean w/o loop outputs | loops "
        "| best fixed gamma | modelled speedup |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    g = fig["groups"]
    keys = sorted({(v["compression"], v["mode"]) for v in g.values()})
    for comp, mode in keys:
        alphas = [g.get(f"{comp}/{mode}/{t}", {}).get("alpha") for t in ("chat", "code", "math", "summarization")]
        mean = np.mean([a for a in alphas if a is not None]) if any(a is not None for a in alphas) else float("nan")
        clean = [
            g.get(f"{comp}/{mode}/{t}", {}).get("alpha_no_loops") for t in ("chat", "code", "math", "summarization")
        ]
        mean_clean = (
            np.nanmean([c for c in clean if c is not None]) if any(c is not None for c in clean) else float("nan")
        )
        a = g[f"{comp}/{mode}/all"]
        rows.append(
            f"| {comp} | {mode} | "
            + " | ".join("-" if x is None else f"{x:.3f}" for x in alphas)
            + f" | **{mean:.3f}** | {mean_clean:.3f} | {a['loop_fraction']:.2f}"
            + f" | {a['best_fixed_gamma']} | {a['modelled_speedup']:.2f}x |"
        )
    return "\n".join(rows)


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("traces", nargs="?", default="speckv_env/data/traces")
    ap.add_argument("--split", default="test")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    f = figures(a.traces, a.split.split(","))
    print(markdown(f))
    if a.json:
        Path(a.json).write_text(json.dumps(f, indent=2))
