"""Per-product timing of the row-invariant CPU kernel (speckv_env/csrc/rowdot.c) against
PyTorch's own ``x @ W.T``, for SmolLM2-135M's weight shapes, weights streamed from memory
(cycled through enough copies to exceed the caches), 2 threads, min of 5 passes.

    python experiments/rowdot_microbench.py

Also checks that the kernel's rows are bit-identical for every row count (the point of it).
"""

from __future__ import annotations

import time

import torch

from speckv_env import rowdot

SHAPES = [(576, 576, 60), (192, 576, 60), (1536, 576, 60), (576, 1536, 30), (49152, 576, 1)]


def _ms(ws: list[torch.Tensor], x: torch.Tensor, kernel: bool, reps: int = 5) -> float:
    """Milliseconds per product (min over ``reps`` passes over ``ws``)."""
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        for w in ws:
            rowdot.linear(x, w, None) if kernel else x @ w.T
        best = min(best, time.perf_counter() - t0)
    return 1e3 * best / len(ws)


def main() -> None:
    torch.set_num_threads(2)
    if not rowdot.available():
        raise SystemExit("the compiled kernel is not available on this host (no C compiler?)")
    w, x = torch.randn(1536, 576), torch.randn(16, 576)
    ref = rowdot.linear(x, w, None)
    assert all(torch.equal(rowdot.linear(x[:k], w, None), ref[:k]) for k in range(1, 17)), "rows differ"
    for out, inn, copies in SHAPES:
        ws = [torch.randn(out, inn) for _ in range(copies)]
        row = f"{out}x{inn} ms: torch 1 row {_ms(ws, torch.randn(1, inn), False):.3f}"
        for k in (1, 2, 4, 9, 16):
            row += f" | kernel {k} {_ms(ws, torch.randn(k, inn), True):.3f}"
        row += f" | torch 9 rows {_ms(ws, torch.randn(9, inn), False):.3f}"
        print(row, flush=True)


if __name__ == "__main__":
    main()
