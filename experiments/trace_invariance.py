"""Gamma-invariance at full size, against the recorded traces.

Every shipped trace was decoded under a random gamma per step (the recording's behaviour
policy, e.g. uniform 1..6; the gammas are in the trace's ``step_gamma``). This script decodes
each trace's prompt again on the same pair, path and seed at **gamma 0 every step** (a plain
target step per token: no verification of several rows at all) and compares the tokens with the
trace's. On the exact path (``load_pair(exact=True)``, the default) every output must be
identical, greedy and sampled: that is the project's central guarantee at the size of the
data set (all test prompts x 128 tokens x every compression recorded), where
``experiments/exactness.py`` covers more gammas on fewer prompts.

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python experiments/trace_invariance.py speckv_env/data/traces \\
        --split test --threads 1 --out experiments/results/trace_invariance.json

Results are appended per trace to ``<out>.jsonl`` as they finish (``--resume`` skips those), and
the summary (per compression and mode: outputs compared, tokens compared, outputs that differ,
first differing position) is written to ``--out``. ``--shard I/N`` splits the traces over
processes (run N of them, then once more with ``--summarise``).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch

from replay.trace import Trace, read_traces
from speckv_env.app.profile import make_engines
from speckv_env.pair import load_pair


def first_difference(a: list[int], b: list[int]) -> int | None:
    """The first position where two token lists differ (a length difference counts), or None."""
    if a == b:
        return None
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def check_trace(engines: dict[str, Any], tr: Trace) -> dict[str, Any]:
    """Decode ``tr``'s prompt at gamma 0 with its seed and compare with the recorded tokens."""
    if tr.mode not in engines:
        raise ValueError(f"trace {tr.trace_id}: mode {tr.mode!r} has no engine (modes: {sorted(engines)})")
    ids = [int(x) for x in tr.prompt_tokens]
    if not ids:
        raise ValueError(f"trace {tr.trace_id}: no prompt_tokens (a speckv-trace/1 trace?): need speckv-trace/2")
    t0 = time.perf_counter()
    res = engines[tr.mode].generate(ids, int(tr.max_new_tokens), gamma=0, seed=int(tr.seed))
    recorded = [int(x) for x in tr.tokens]
    diff = first_difference(res.tokens, recorded)
    return {
        "trace_id": tr.trace_id,
        "compression": tr.compression,
        "mode": tr.mode,
        "prompt_id": tr.prompt_id,
        "tokens": len(recorded),
        "recorded_gammas": sorted({int(g) for g in tr.step_gamma}),
        "exact": bool((tr.meta or {}).get("exact", False)),
        "first_difference": diff,
        "seconds": round(time.perf_counter() - t0, 2),
    }


def summarise(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Per compression and mode: outputs, tokens compared, outputs that differ, where."""
    groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        groups[f"{r['compression']}/{r['mode']}"].append(r)
    out = {}
    for key in sorted(groups):
        g = groups[key]
        diffs = [r["first_difference"] for r in g if r["first_difference"] is not None]
        out[key] = {
            "outputs": len(g),
            "tokens_compared": sum(r["tokens"] for r in g),
            "changed": len(diffs),
            "first_difference_at": sorted(diffs),
            "recorded_gammas": sorted({x for r in g for x in r["recorded_gammas"]}),
            "all_exact_path": all(r["exact"] for r in g),
        }
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("folders", nargs="+", help="trace files or folders (speckv-trace/2)")
    ap.add_argument("--split", default="test")
    ap.add_argument("--compressions", default=None, help="comma list (default: every one in the traces)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--shard", default="0/1", help="I/N: this process checks every N-th trace from the I-th")
    ap.add_argument("--out", default="experiments/results/trace_invariance.json")
    ap.add_argument("--resume", action="store_true", help="skip traces already in <out>.jsonl")
    ap.add_argument("--summarise", action="store_true", help="only write the summary from <out>.jsonl")
    a = ap.parse_args(argv)
    out = Path(a.out)
    log = out.with_suffix(".jsonl")
    i_shard, n_shard = (int(x) for x in a.shard.split("/"))
    if not 0 <= i_shard < n_shard:
        ap.error(f"--shard {a.shard}: want I/N with 0 <= I < N")
    if not a.summarise:
        torch.set_num_threads(a.threads)
        comps = a.compressions.split(",") if a.compressions else None
        traces = read_traces(a.folders, split=a.split, compression=comps)
        if not traces:
            ap.error(f"no {a.split} traces in {a.folders}")
        traces.sort(key=lambda t: (t.compression, t.prompt_id, t.mode))
        traces = traces[i_shard::n_shard]
        done = set()
        if a.resume and log.exists():
            done = {json.loads(line)["trace_id"] for line in log.read_text().splitlines() if line.strip()}
        elif log.exists() and n_shard == 1:
            ap.error(f"{log} exists: pass --resume to continue it, or remove it")
        by_comp: dict[str, list[Trace]] = defaultdict(list)
        for tr in traces:
            if tr.trace_id not in done:
                by_comp[tr.compression].append(tr)
        log.parent.mkdir(parents=True, exist_ok=True)
        for comp, trs in by_comp.items():
            pair = load_pair(compression=comp, device="cpu", exact=True)
            modes = sorted({t.mode for t in trs})
            engines = make_engines(pair, modes, max(int(t.gamma_max) for t in trs))
            for tr in trs:
                r = check_trace(engines, tr)
                with log.open("a") as f:
                    f.write(json.dumps(r) + "\n")
                flag = "same" if r["first_difference"] is None else f"DIFFERS at {r['first_difference']}"
                print(f"{comp} {tr.mode} {tr.prompt_id}: {r['tokens']} tokens, {flag} ({r['seconds']} s)", flush=True)
            del engines, pair
    rows = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    summary = {
        "what": "recorded tokens (random gamma per step) vs a gamma-0 decode of the same prompt and seed",
        "folders": a.folders,
        "split": a.split,
        "host": {"cpu": platform.processor() or platform.machine(), "torch": torch.__version__},
        "groups": summarise(rows),
    }
    out.write_text(json.dumps(summary, indent=1) + "\n")
    for k, v in summary["groups"].items():
        print(f"{k}: {v['changed']} of {v['outputs']} outputs changed ({v['tokens_compared']} tokens)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
