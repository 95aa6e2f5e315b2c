"""A preliminary comparison on the partial speckv-trace/2 re-recording (both modes, one report).

    OMP_WAIT_POLICY=PASSIVE python experiments/preview_compare.py [OUT] [--ppo-token-steps N]

Reads the traces recorded so far under runs/profile_v2/ (fp32 and nf4), prices them with the
exact-path cost models in experiments/results/calibration_exact/ (fp32 measured on a mostly
quiet host, nf4 under load 3-4: see its README), and runs ``speckv compare``'s quick settings
on the held-out split with every policy group. Token mode's policies run in both of its variants,
look-ahead and draft-then-decide (names ending in ``/dtd``). Writes OUT (default
experiments/results/preview_v2) with report.md, results.json and summary.json, and prints the
summary: tokens/s per policy, the primary contrast, and each token policy in both variants
against best-fixed(train) (relative difference with its 95% interval and p).
Preliminary by construction: the data set is partial and the cost models are not the shipped ones.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from replay.trace import read_traces
from speckv_env.app.compare import run_comparison
from speckv_env.app.token_compare import DTD, TOKEN_POLICIES
from speckv_env.core import CostModel

CAL = "experiments/results/calibration_exact"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", nargs="?", default="experiments/results/preview_v2")
    ap.add_argument("--ppo-token-steps", type=int, default=200_000)
    a = ap.parse_args()
    trs = [
        t for t in read_traces(["runs/profile_v2/fp32", "runs/profile_v2/quant"]) if t.compression in ("fp32", "nf4")
    ]
    cms = {c: CostModel.load(f"{CAL}/cost-{c}.json") for c in ("fp32", "nf4")}
    t0 = time.time()
    r = run_comparison(
        traces=trs,
        cost_models=cms,
        out_dir=a.out,
        quick=True,
        splits=("heldout",),
        seeds=2,
        ppo_token_steps=a.ppo_token_steps,
        progress=False,
    )
    h = r["splits"]["heldout"]
    summary = {
        "traces": len(trs),
        "by_split": {s: sum(t.split == s for t in trs) for s in ("train", "validation", "test")},
        "by_compression": {c: sum(t.compression == c for t in trs) for c in cms},
        "runtime_s": round(time.time() - t0, 1),
        "tokens_per_s": {k: v["subsets"]["all"]["tokens_per_s"]["value"] for k, v in h["policies"].items()},
        "primary": {k: h["primary"].get(k) for k in ("policy", "rel", "lo", "hi", "p", "gap_captured", "prompts")},
        "token_vs_best_fixed": token_table(h["policies"]),
    }
    (Path(a.out) / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(json.dumps(summary, indent=1))


def token_table(policies: dict) -> dict:
    """Each token policy in both variants (look-ahead, draft-then-decide): tokens/s and the
    relative difference against best-fixed(train) with its interval and p."""
    out: dict = {}
    for name in TOKEN_POLICIES:
        if name not in policies:
            continue
        base, variant = (name[: -len(DTD)], "dtd") if name.endswith(DTD) else (name, "lookahead")
        m = policies[name]["subsets"]["all"]
        v = m["vs_best_fixed"]
        out.setdefault(base, {})[variant] = {
            "tokens_per_s": round(m["tokens_per_s"]["value"], 3),
            "rel": round(v["rel"], 4),
            "rel_lo": round(v["rel_lo"], 4),
            "rel_hi": round(v["rel_hi"], 4),
            "p": round(v["p"], 4),
        }
    return out


if __name__ == "__main__":
    main()
