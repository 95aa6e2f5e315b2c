"""Per-forward time of the target at 1, 2, 5 and 9 rows, stock kernels against row-invariant
forwards, on one loaded model (the same weights, switched with ``invariant.undo`` /
``make_row_invariant``), two rounds alternating the two paths.

    python experiments/forward_rows_timing.py int8 [THREADS]     # or fp32, nf4, bf16; threads default 2

The prompt's prefill is not timed; each timed forward is cropped off the cache again; min of 3.
"""

from __future__ import annotations

import sys
import time

import torch
from transformers import DynamicCache

from speckv_env import invariant
from speckv_env.pair import load_pair


def bench(model, ids: list[int], rows: list[int], reps: int = 3) -> dict[int, float]:
    """Milliseconds per forward of ``k`` new rows after the prompt, min over ``reps``."""
    cache = DynamicCache(config=model.config)
    out: dict[int, float] = {}
    with torch.inference_mode():
        model(input_ids=torch.tensor([ids]), cache=cache, use_cache=True)
        for k in rows:
            best = float("inf")
            for _ in range(reps):
                t0 = time.perf_counter()
                model(input_ids=torch.tensor([[100 + j for j in range(k)]]), cache=cache, use_cache=True)
                best = min(best, time.perf_counter() - t0)
                cache.crop(-k)
            out[k] = round(1000 * best, 1)
    return out


def main() -> None:
    torch.set_num_threads(int(sys.argv[2]) if len(sys.argv) > 2 else 2)
    comp = sys.argv[1] if len(sys.argv) > 1 else "fp32"
    pair = load_pair(compression=comp, device="cpu", exact=False, cpu_kernels=False)
    ids = pair.encode_chat("Write a Python function that returns the n-th Fibonacci number, with a docstring.")
    rows = [1, 2, 5, 9]
    for _ in range(2):
        invariant.undo(pair.target)
        stock = bench(pair.target, ids, rows)
        invariant.make_row_invariant(pair.target)
        exact = bench(pair.target, ids, rows)
        print(comp, "stock", stock, "row-invariant", exact, flush=True)


if __name__ == "__main__":
    main()
