"""Gamma-invariance on the real default pair: divergence rates and the cost of exactness.

For each compression, the exact path (``load_pair(exact=True)``: row-invariant forwards) and
the fast path (``exact=False``: stock kernels, row-count plans on CPU) decode the same test
prompts three ways: gamma 0 every step, gamma 8 every step, and random gammas 0..8. An output
"changed with gamma" when the gamma-8 or the random run differs from the gamma-0 run.

Timing: per compression, the two paths alternate prompt by prompt (ABBA order), each decoding
at gamma 0 and at gamma 3, and the medians of the tokens/s over prompts and repeats are kept,
so drift on a shared host falls on both paths alike.

    python experiments/exactness.py --prompts-per-task 4 --tokens 128 --out experiments/results/exactness.json

Results are written after every compression (the run can be stopped and resumed with --resume).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from collections.abc import Mapping
from pathlib import Path

import torch

from speckv_env.engine import SpeculativeEngine
from speckv_env.pair import ModelPair, load_pair
from speckv_env.prompts import TASKS, load_prompts


def _prompts(per_task: int) -> list:
    out = []
    for task in TASKS:
        out.extend(load_prompts(task=task, split="test")[:per_task])
    return out


def _first_diff(a: list[int], b: list[int]) -> int | None:
    if a == b:
        return None
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def divergence(pair: ModelPair, prompts: list, tokens: int, temperature: float, seed: int = 0) -> dict:
    """How many outputs change with gamma (gamma 8 and random gammas against gamma 0)."""
    eng = SpeculativeEngine(
        pair.target, pair.draft, temperature=temperature, eos_token_id=pair.eos_token_id, max_gamma=8
    )
    changed, firsts = 0, []
    for i, p in enumerate(prompts):
        ids = pair.encode_chat(p.text)
        g0 = eng.generate(ids, tokens, gamma=0, seed=seed + i).tokens
        rand = random.Random(seed + i).choices(range(9), k=tokens)  # one gamma per step at most
        for other in (
            eng.generate(ids, tokens, gamma=8, seed=seed + i).tokens,
            eng.generate(ids, tokens, gamma=rand, seed=seed + i).tokens,
        ):
            d = _first_diff(g0, other)
            if d is not None:
                changed += 1
                firsts.append(d)
    return {"outputs": 2 * len(prompts), "changed": changed, "first_difference_at": firsts}


def _tps(eng: SpeculativeEngine, ids: list[int], tokens: int, gamma: int) -> float:
    r = eng.generate(ids, tokens, gamma=gamma, seed=0)
    return len(r.tokens) / sum(s.draft_s + s.verify_s for s in r.steps)


def timing(pairs: Mapping[str, ModelPair], prompts: list, tokens: int, repeats: int, gammas=(0, 3)) -> dict:
    """Median decode tokens/s (prefill excluded) per path and gamma, paths interleaved ABBA."""
    engines = {
        k: SpeculativeEngine(p.target, p.draft, eos_token_id=p.eos_token_id, max_gamma=8) for k, p in pairs.items()
    }
    names = list(pairs)
    samples: dict[str, dict[int, list[float]]] = {k: {g: [] for g in gammas} for k in names}
    for rep in range(repeats):
        for i, p in enumerate(prompts):
            order = names if (rep + i) % 2 == 0 else names[::-1]
            for k in order:
                ids = pairs[k].encode_chat(p.text)
                for g in gammas:
                    samples[k][g].append(_tps(engines[k], ids, tokens, g))
    return {
        k: {
            str(g): {"median_tps": statistics.median(v), "min": min(v), "max": max(v), "n": len(v)}
            for g, v in samples[k].items()
        }
        for k in names
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--compressions", default="fp32,bf16,fp16,int8,nf4")
    ap.add_argument("--prompts-per-task", type=int, default=4, help="test prompts per task (4 tasks)")
    ap.add_argument("--tokens", type=int, default=128, help="new tokens per output")
    ap.add_argument("--timing-prompts", type=int, default=4, help="prompts in the timing part (0 = skip timing)")
    ap.add_argument("--timing-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="experiments/results/exactness.json")
    ap.add_argument("--resume", action="store_true", help="keep the parts already in --out")
    ap.add_argument("--skip-divergence", action="store_true", help="timing only (divergence from an earlier run)")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    out = Path(a.out)
    res = json.loads(out.read_text()) if a.resume and out.exists() else {}
    res.setdefault("settings", {}).update({k: v for k, v in vars(a).items() if k not in ("out", "resume")})
    prompts = _prompts(a.prompts_per_task)
    for comp in a.compressions.split(","):
        entry = res.setdefault("compressions", {}).get(comp, {})
        todo_div = not a.skip_divergence and "exact" not in entry
        todo_time = a.timing_prompts > 0 and "timing" not in entry
        if not (todo_div or todo_time):
            continue
        t0 = time.time()
        pairs = {
            "exact": load_pair(compression=comp, device="cpu", exact=True),
            "fast": load_pair(compression=comp, device="cpu", exact=False),
        }
        entry["kernels"] = {k: p.kernels for k, p in pairs.items()}
        for k, pair in pairs.items() if todo_div else ():
            entry[k] = {
                mode: divergence(pair, prompts, a.tokens, temp) for mode, temp in (("greedy", 0.0), ("sample", 0.7))
            }
            print(
                f"[exactness] {comp} {k}: "
                + ", ".join(f"{m} {d['changed']}/{d['outputs']} changed" for m, d in entry[k].items()),
                file=sys.stderr,
                flush=True,
            )
        if todo_time:
            sel = prompts[:: max(1, len(prompts) // a.timing_prompts)][: a.timing_prompts]
            entry["timing"] = timing(pairs, sel, a.timing_tokens, a.repeats)
        entry["seconds"] = round(time.time() - t0, 1) + entry.get("seconds", 0)
        res["compressions"][comp] = entry
        res["host"] = {"cpu": _cpu(), "threads": torch.get_num_threads(), "torch": torch.__version__}
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(".tmp")
        tmp.write_text(json.dumps(res, indent=1))
        tmp.replace(out)
        del pairs
    print(
        json.dumps(
            {
                c: {
                    k: {m: f"{d['changed']}/{d['outputs']}" for m, d in e[k].items()}
                    for k in ("exact", "fast")
                    if k in e
                }
                for c, e in res["compressions"].items()
            },
            indent=1,
        )
    )
    return 0


def _cpu() -> str:
    from speckv_env.cpu_linear import cpu_model

    return cpu_model()


if __name__ == "__main__":
    raise SystemExit(main())
