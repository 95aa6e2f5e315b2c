"""Engine tokens/s with the dynamic against the static KV cache (#15), on the CPU.

    OMP_WAIT_POLICY=PASSIVE python experiments/static_cache_timing.py [--threads 1] [--out PATH]

The default pair in fp32 (exact kernels, as ``load_pair`` gives it), greedy, gamma 3, one test
prompt per task (4 prompts) x 64 new tokens. The two engines share the models and run
interleaved A B A B (dynamic, static) per prompt, 3 repeats, after a short warm-up of each.
Reported: per configuration the median over runs of tokens/s (whole ``generate``: prefill
included) and of decode tokens/s (the steps' measured draft + verify times only), the median
per-repeat aggregate (4 prompts' tokens over their time), and the median paired ratio
static / dynamic over (repeat, prompt). The outputs of the two caches must be identical.
The host's load average is recorded before and after: on a shared host the figures are noisy.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch

from speckv_env.app.bench_engine import bench_prompts, machine_info
from speckv_env.engine import SpeculativeEngine
from speckv_env.pair import load_pair

CACHES = ("dynamic", "static")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--gamma", type=int, default=3)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "static_cache_timing.json"))
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    machine = machine_info()
    pair = load_pair(compression="fp32", device="cpu")
    prompts = bench_prompts()
    encoded = [pair.encode_chat(p.text) for p in prompts]
    engines = {
        c: SpeculativeEngine(pair.target, pair.draft, eos_token_id=pair.eos_token_id, max_gamma=8, cache=c)
        for c in CACHES
    }
    for eng in engines.values():  # warm-up: every code path once, short
        eng.generate(encoded[0], 8, gamma=a.gamma)
    runs: list[dict] = []
    outputs: dict[str, dict[int, list[int]]] = {c: {} for c in CACHES}
    t_start = time.time()
    for r in range(a.repeats):
        for i, ids in enumerate(encoded):
            for c in CACHES:  # A B A B ...
                res = engines[c].generate(ids, a.max_new_tokens, gamma=a.gamma)
                decode_s = sum(s.draft_s + s.verify_s for s in res.steps)
                runs.append(
                    {
                        "repeat": r,
                        "prompt": prompts[i].id,
                        "cache": c,
                        "tokens": len(res.tokens),
                        "wall_s": res.wall_s,
                        "decode_s": decode_s,
                        "tps": len(res.tokens) / res.wall_s,
                        "decode_tps": len(res.tokens) / decode_s,
                    }
                )
                outputs[c][i] = res.tokens
            print(f"repeat {r} prompt {i}: " + ", ".join(f"{x['cache']} {x['tps']:.2f} tok/s" for x in runs[-2:]))
    print(json.dumps(summarise(runs, outputs, a, machine, time.time() - t_start), indent=1))


def summarise(runs: list[dict], outputs: dict, a: argparse.Namespace, machine: dict, elapsed: float) -> dict:
    result: dict = {"config": {}, "paired": {}}
    for c in CACHES:
        mine = [x for x in runs if x["cache"] == c]
        per_repeat = [
            sum(x["tokens"] for x in mine if x["repeat"] == r) / sum(x["wall_s"] for x in mine if x["repeat"] == r)
            for r in range(a.repeats)
        ]
        result["config"][c] = {
            "median_tps": statistics.median(x["tps"] for x in mine),
            "median_decode_tps": statistics.median(x["decode_tps"] for x in mine),
            "per_repeat_aggregate_tps": per_repeat,
            "median_per_repeat_aggregate_tps": statistics.median(per_repeat),
        }
    pairs = [(d, s) for d, s in zip(runs[0::2], runs[1::2], strict=True)]
    result["paired"] = {
        "median_ratio_static_over_dynamic_tps": statistics.median(s["tps"] / d["tps"] for d, s in pairs),
        "median_ratio_static_over_dynamic_decode_tps": statistics.median(
            s["decode_tps"] / d["decode_tps"] for d, s in pairs
        ),
    }
    result.update(
        outputs_identical=outputs["dynamic"] == outputs["static"],
        gamma=a.gamma,
        max_new_tokens=a.max_new_tokens,
        repeats=a.repeats,
        threads=a.threads,
        compression="fp32",
        mode="greedy",
        order="interleaved A B A B (dynamic, static) per prompt and repeat",
        elapsed_s=elapsed,
        loadavg_at_end=os.getloadavg(),
        machine=machine,
        note="shared 2-core host running other jobs (a long profiling recording among them): noisy",
        command=f"OMP_WAIT_POLICY=PASSIVE python experiments/static_cache_timing.py --threads {a.threads}",
        runs=runs,
    )
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=1) + "\n")
    return {k: v for k, v in result.items() if k != "runs"}


if __name__ == "__main__":
    main()
