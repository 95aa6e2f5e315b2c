"""Row-count-aware matrix products for decoding on CPU.

Speculative decoding rests on one assumption: a target forward over ``gamma + 1`` tokens costs
about as much as a forward over one, because decoding is memory-bound (every weight is read
once either way). PyTorch's CPU ``nn.Linear`` (``x @ W.T`` through MKL) breaks that assumption
for the handful of rows decoding uses. Measured on a 2-core AMD EPYC (Zen 4) host, SmolLM2-135M's
weights streamed from memory, 2 threads (``python experiments/cpu_linear_microbench.py``):

* one row goes through a matrix-vector kernel that reaches ~11 GB/s: the 576 x 1536 MLP
  projection takes 0.33 ms, the 576 x 49152 output head 9.6 ms;
* 2 to 9 rows go through a general product that is slower still: 0.35-0.48 ms and 16-22 ms,
  so a 2-5-token verification cost 1.35-1.65x a 1-token step (calibrated), which left
  speculation nothing to gain;
* the same product written ``W @ x.T`` (the weight as the left, "tall" operand) streams the
  weight at ~34 GB/s for 2 columns: 0.11 ms and 3.5 ms, but is poor for some column counts
  (5 is slower than 8 for the head).

:func:`install` gives each ``nn.Linear`` of a model a plan: for each row count up to
``max_rows`` the fastest of ``x @ W.T`` and ``W @ x'.T`` with ``x'`` padded with copies of its
last row to a few more columns (see :func:`tune`), timed on this host on the model's own weights
(a few seconds; cached per CPU model, core count, thread count, torch version and shape). Rows beyond ``max_rows``
(prefill) keep PyTorch's own path. Results are the same products summed in a different order:
equal up to float rounding, like any change of BLAS kernel (PyTorch's own path already gives a
row different bits when it shares a forward with other rows). The engine therefore stays
lossless in the sense every speculative decoder is: it emits the target's argmax (or sample) as
computed by the verifying forward.

Only float32 weights on CPU are planned; quantised (bitsandbytes) layers and GPU models are left
alone. :func:`uninstall` restores the stock path.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn

#: row counts planned per call; more rows (prefill) use PyTorch's own path
MAX_ROWS = 10
_ATTR = "_speckv_plan"
PLAN_VERSION = 1


def _wx(x2: torch.Tensor, w: torch.Tensor, cols: int) -> torch.Tensor:
    # both operands and the result row-major: the BLAS kernel MKL picks depends on the layout
    # (a column-major x runs the 576 x 1536 product 3x slower), so never pass views on
    n = x2.shape[0]
    if cols > n:
        x2 = torch.cat([x2, x2[-1:].expand(cols - n, -1)])
    else:
        x2 = x2.contiguous()
    return (w @ x2.t())[:, :n].t().contiguous()


class PlannedLinear(nn.Linear):
    """``nn.Linear`` with a row-count plan (:func:`install`): rows -> columns of ``W @ x.T``.

    A class (not a closure over the module), so ``copy.deepcopy`` and ``pickle`` give a layer
    that computes with its own weights and plan."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w, b = self.weight, self.bias
        n = x.numel() // x.shape[-1] if x.shape[-1] else 0
        cols = getattr(self, _ATTR, {}).get(n, 0)
        if cols == 0 or x.dtype != w.dtype or w.device.type != "cpu" or torch.is_grad_enabled():
            return nn.functional.linear(x, w, b)
        y = _wx(x.reshape(n, x.shape[-1]), w, cols)
        if b is not None:
            y = y + b
        return y.reshape(*x.shape[:-1], w.shape[0])


def _weight(m: nn.Module) -> torch.Tensor:
    return cast(torch.Tensor, m.weight)


def _shape(w: torch.Tensor) -> tuple[int, int]:
    return int(w.shape[0]), int(w.shape[1])


def _eligible(m: nn.Module) -> bool:
    return (
        type(m) in (nn.Linear, PlannedLinear)
        and m.weight.device.type == "cpu"
        and m.weight.dtype == torch.float32
        and m.weight.dim() == 2
    )


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``), else what :mod:`platform` knows."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _host_key() -> str:
    return f"{cpu_model()}|cpus={os.cpu_count()}|threads={torch.get_num_threads()}|torch={torch.__version__}"


def _cache_file() -> Path:
    from .models import cache_dir

    return cache_dir() / "cpu_linear_plans.json"


def _time_variant(weights: list[torch.Tensor], x: torch.Tensor, cols: int, reps: int) -> float:
    """Seconds per product, min over ``reps`` passes over ``weights`` (cycled so they stream from memory)."""
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        for w in weights:
            if cols == 0:
                nn.functional.linear(x, w)
            else:
                _wx(x, w, cols)
        best = min(best, (time.perf_counter() - t0) / len(weights))
    return best


@torch.inference_mode()
def tune(weights: list[torch.Tensor], max_rows: int = MAX_ROWS, reps: int = 2) -> dict[int, int]:
    """Plan for one weight shape: rows -> columns of the ``W @ x.T`` product (0 = ``x @ W.T``).

    ``weights`` are the model's weights of that shape; timing cycles through them (repeated to
    at least 64 MB, so they stream from memory as in decoding). Candidates for ``n`` rows: the
    stock path and ``W @ x.T`` padded to ``n .. n + 3`` or 2, 4, 8 columns; one must beat the
    stock path by 3% to be chosen.
    """
    out_f, in_f = weights[0].shape
    g = torch.Generator().manual_seed(0)
    per = out_f * in_f * weights[0].element_size()
    cycle = list(weights) * max(1, -(-(64 << 20) // (per * len(weights))))
    cycle = cycle[: max(len(weights), min(len(cycle), 64))]
    plan: dict[int, int] = {}
    for n in range(1, max_rows + 1):
        x = torch.randn(n, in_f, generator=g, dtype=weights[0].dtype)
        best_cols, best_t = 0, _time_variant(cycle, x, 0, reps) / 1.03
        for cols in sorted({*range(max(n, 2), n + 4), *(c for c in (2, 4, 8) if c >= n)}):
            t = _time_variant(cycle, x, cols, reps)
            if t < best_t:
                best_cols, best_t = cols, t
        plan[n] = best_cols
    return plan


def plans_for(
    model: nn.Module, max_rows: int = MAX_ROWS, use_cache: bool = True, refresh: bool = False
) -> dict[tuple[int, int], dict[int, int]]:
    """Plans for every planned weight shape of ``model``, from the per-host cache or timed now.

    ``refresh`` times every shape again and overwrites the cached plans (``speckv calibrate``
    does, since it is meant to run on a quiet machine: plans timed while other processes compete
    for the cores, e.g. parallel ``speckv profile`` runs, can be poor).
    """
    shapes: dict[tuple[int, int], list[torch.Tensor]] = {}
    for m in model.modules():
        if _eligible(m):
            w = _weight(m)
            shapes.setdefault(_shape(w), []).append(w)
    host = _host_key()
    cache: dict = {}
    path = _cache_file()
    if use_cache and path.exists():
        try:
            cache = json.loads(path.read_text())
            if cache.get("version") != PLAN_VERSION:
                cache = {}
        except (OSError, ValueError):
            cache = {}
    entries = cache.setdefault("plans", {})
    keys = {shape: f"{host}|{shape[0]}x{shape[1]}|rows={max_rows}" for shape in shapes}
    todo = [shape for shape in shapes if refresh or keys[shape] not in entries]
    if sum(shapes[s][0].numel() * len(shapes[s]) for s in todo) > (16 << 20):  # worth saying for a real model
        print(
            f"[speckv] timing CPU matrix-product plans for {len(todo)} weight shapes on this host "
            f"(once, ~10 s; cached in {path})",
            file=sys.stderr,
            flush=True,
        )
    for shape in todo:
        entries[keys[shape]] = {str(k): v for k, v in tune(shapes[shape], max_rows).items()}
    out = {shape: {int(k): int(v) for k, v in entries[key].items()} for shape, key in keys.items()}
    if use_cache and todo:
        cache["version"] = PLAN_VERSION
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".tmp{os.getpid()}")
            tmp.write_text(json.dumps(cache, indent=1, sort_keys=True))
            os.replace(tmp, path)
        except OSError:
            pass
    return out


def install(
    model: nn.Module,
    plans: dict[tuple[int, int], dict[int, int]] | None = None,
    max_rows: int = MAX_ROWS,
    refresh: bool = False,
) -> int:
    """Give every float32 CPU ``nn.Linear`` of ``model`` its row-count plan; returns how many."""
    if plans is None:
        plans = plans_for(model, max_rows, refresh=refresh)
    count = 0
    for m in model.modules():
        if _eligible(m) and _shape(_weight(m)) in plans:
            setattr(m, _ATTR, dict(plans[_shape(_weight(m))]))
            cast(Any, m).__class__ = PlannedLinear
            count += 1
    return count


def uninstall(model: nn.Module) -> None:
    """Restore PyTorch's own ``nn.Linear`` path on every layer :func:`install` touched."""
    for m in model.modules():
        if hasattr(m, _ATTR):
            delattr(m, _ATTR)
            if type(m) is PlannedLinear:
                cast(Any, m).__class__ = nn.Linear


def installed(model: nn.Module) -> bool:
    return bool(current_plans(model))


def current_plans(model: nn.Module) -> dict[tuple[int, int], dict[int, int]]:
    """The plans installed on ``model`` now, by weight shape (empty with the stock path)."""
    return {_shape(_weight(m)): dict(getattr(m, _ATTR)) for m in model.modules() if hasattr(m, _ATTR)}


def describe(plans: dict[tuple[int, int], dict[int, int]]) -> Iterable[str]:
    for (o, i), p in sorted(plans.items()):
        yield f"{o}x{i}: " + " ".join(f"{n}:{'x@W.T' if c == 0 else f'W@x.T/{c}'}" for n, c in sorted(p.items()))
