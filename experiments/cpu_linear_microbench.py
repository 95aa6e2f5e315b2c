"""Microbenchmark behind speckv_env/cpu_linear.py: one linear layer's product for 1..8 rows,
weights streamed from memory (30 copies cycled, a 64 MB buffer written between passes), on
SmolLM2-135M's shapes. Prints microseconds per product (min of 4 passes) for:

  lin    torch.nn.functional.linear(x, W)          (PyTorch's stock path: x @ W.T)
  Wx     W @ x.T                                    (the weight as the tall left operand)
  pad    W @ x.T with a 1-row x padded to 2 rows    (what the plans use for one row)
  mkl    MKL packed sgemm (torch.ops.mkl._mkl_linear with a reordered weight)

Usage: python experiments/cpu_linear_microbench.py [THREADS]
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable

import torch

F = torch.nn.functional
SHAPES = {
    "q_proj/o_proj 576x576": (576, 576),
    "gate/up 1536x576": (1536, 576),
    "down 576x1536": (576, 1536),
    "head 49152x576": (49152, 576),
}

Kernel = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def kernels(x: torch.Tensor, k: int) -> dict[str, Kernel]:
    """The ways to compute ``x @ w.T`` for ``k`` rows ``x``, each called as ``fn(w, packed_w)``."""
    return {
        "lin": lambda w, p: F.linear(x, w),
        "Wx": lambda w, p: w @ x.t(),
        "pad": lambda w, p: w @ (x.repeat(2, 1) if k == 1 else x).t(),
        "mkl": lambda w, p: torch.ops.mkl._mkl_linear(x, p, w, None, k),
    }


def main(threads: int) -> None:
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    flush = torch.randn(16 << 20)
    for name, (o, i) in SHAPES.items():
        n_w = 3 if o > 10000 else 30
        ws = [torch.randn(o, i) for _ in range(n_w)]
        print(name)
        for k in (1, 2, 4, 5, 8):
            x = torch.randn(k, i)
            packs = [torch.ops.mkl._mkl_reorder_linear_weight(w, k) for w in ws]
            row = []
            for label, fn in kernels(x, k).items():
                best = float("inf")
                for _ in range(4):
                    flush.add_(1.0)
                    t0 = time.perf_counter()
                    for w, p in zip(ws, packs):
                        fn(w, p)
                    best = min(best, (time.perf_counter() - t0) / n_w)
                row.append(f"{label} {best * 1e6:7.0f}")
            print(f"  rows {k}: " + "  ".join(row))


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 2)
