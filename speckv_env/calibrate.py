"""Calibrating the cost model of a pair on a device by measurement.

The cost model (:class:`speckv_env.core.CostModel`) is fitted from what the engine itself
does, so that modelled and measured times agree:

- ``t_verify[g]``: median measured verify time of engine steps at gamma g (one target
  forward over g + 1 tokens, the acceptance test and the cache roll-back);
- ``t_draft``: median measured draft time per draft forward (the observation forward and
  the drafting forwards, with the draft signals of each drafted token);
- ``t_target``: median time per token of plain target-only decoding (one target forward of
  one token and an argmax, KV cache), the baseline for speedups.

Results are cached per (pair, draft fingerprint, compression, device, kernels) under ``cache_dir()/calibration``.
"""

from __future__ import annotations

import json
import os
import statistics
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from .core import CostModel
from .engine import SpeculativeEngine, cache_kwarg
from .models import cache_dir

CALIBRATION_PROMPTS = (
    "Write a Python function that returns the n-th Fibonacci number.",
    "Explain in two sentences why the sky is blue.",
)


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize()


@torch.inference_mode()
def measure_target_only(pair, prompt_ids: list[int], n_tokens: int = 24, device=None) -> float:
    """Median seconds per token of plain greedy target decoding with a KV cache."""
    from transformers import DynamicCache

    tgt = pair.target
    dev = pair.device
    kv = cache_kwarg(tgt)
    cache = DynamicCache(config=tgt.config)
    out = tgt(input_ids=torch.tensor([prompt_ids], device=dev), use_cache=True, **{kv: cache})
    tok = int(torch.argmax(out.logits[0, -1]))
    times = []
    for _ in range(n_tokens):
        _sync(dev)
        t0 = time.perf_counter()
        out = tgt(input_ids=torch.tensor([[tok]], device=dev), use_cache=True, **{kv: cache})
        tok = int(torch.argmax(out.logits[0, -1]))
        _sync(dev)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def calibrate(
    pair,
    gamma_max: int = 8,
    prompts: Sequence[str] = CALIBRATION_PROMPTS,
    tokens_per_gamma: int = 24,
    temperature: float = 0.0,
    progress: bool = False,
) -> CostModel:
    """Measure a :class:`CostModel` for ``pair`` (a :class:`speckv_env.pair.ModelPair`).

    Raises ValueError for arguments that measure nothing, and when no gamma-0 step was measured
    (the cost model is anchored at ``t_verify[0]``)."""
    if not prompts:
        raise ValueError("calibrate: no calibration prompts given")
    if tokens_per_gamma < 1 or gamma_max < 0:
        raise ValueError(
            f"calibrate: need tokens_per_gamma >= 1 and gamma_max >= 0, got {tokens_per_gamma}, {gamma_max}"
        )
    engine = SpeculativeEngine(pair.target, pair.draft, temperature=temperature, eos_token_id=pair.eos_token_id)
    verify: dict[int, list[float]] = {g: [] for g in range(gamma_max + 1)}
    draft_per_fwd: list[float] = []
    encoded = [pair.encode_chat(p) for p in prompts]
    # warm-up (allocator, kernels)
    engine.generate(encoded[0], 8, gamma=2)
    it = range(gamma_max + 1)
    if progress:
        from tqdm import tqdm

        it = tqdm(it, desc=f"calibrating {pair.compression}", unit="gamma")
    for g in it:
        for ids in encoded:
            res = engine.generate(ids, tokens_per_gamma, gamma=g, seed=0)
            # skip the last step of a run: it may be clipped to fewer tokens
            for s in res.steps[:-1] if len(res.steps) > 1 else res.steps:
                verify[s.gamma].append(s.verify_s)
                draft_per_fwd.append(s.draft_s / s.draft_forwards)
    t_verify = fit_t_verify(verify, gamma_max, where=f"calibrating {pair.name} ({pair.compression})")
    t_target = statistics.median(measure_target_only(pair, ids) for ids in encoded)
    return CostModel(
        t_draft=statistics.median(draft_per_fwd),
        t_verify=t_verify,
        t_target=t_target,
        t_overhead=0.0,
        pair=pair.name,
        compression=pair.compression,
        device=str(pair.device.type),
        meta={
            "method": "engine steps at gamma 0..gamma_max, medians",
            "tokens_per_gamma": tokens_per_gamma,
            "prompts": len(encoded),
            "samples_per_gamma": {g: len(v) for g, v in verify.items()},
            "torch_threads": torch.get_num_threads(),
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "(unset)"),
            "draft_fingerprint": getattr(pair, "draft_fingerprint", None),
            "cpu_kernels": bool(getattr(pair, "cpu_kernels", False)),
            "kernels": getattr(pair, "kernels", "stock"),
            "exact": bool(getattr(pair, "exact", False)),
            "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
        },
    )


def fit_t_verify(verify: dict[int, list[float]], gamma_max: int, where: str = "calibration") -> list[float]:
    """Median verify time per gamma 0..gamma_max; a gamma with no sample (clipped everywhere:
    very short runs) is extrapolated from the two before it. Without a gamma-0 sample there is
    nothing to extrapolate from: ValueError."""
    if not verify.get(0):
        raise ValueError(
            f"{where}: no gamma-0 step was measured, and the cost model is anchored at t_verify[0] "
            "(give calibration prompts and tokens_per_gamma >= 1)"
        )
    t_verify: list[float] = []
    for g in range(gamma_max + 1):
        if verify.get(g):
            t_verify.append(statistics.median(verify[g]))
        else:
            t_verify.append(t_verify[-1] + (t_verify[-1] - t_verify[-2] if len(t_verify) > 1 else 0.0))
    return t_verify


def calibration_path(pair) -> Path:
    # the draft's fingerprint is part of the key: a retrained draft (same name) is re-measured
    # and so is the kernel choice (row-count plans change every step time)
    kernels = getattr(pair, "kernels", None) or ("cpulinear" if getattr(pair, "cpu_kernels", False) else "stock")
    kernels = kernels.replace(":", "_")
    key = f"{pair.name}-{pair.draft_fingerprint}-{pair.compression}-{pair.device.type}-{kernels}"
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in key)
    return cache_dir() / "calibration" / f"{safe}.json"


def cached_calibration(pair, gamma_max: int = 8, refresh: bool = False, progress: bool = False) -> CostModel:
    """The pair's cost model from the cache, measuring it once if absent."""
    p = calibration_path(pair)
    if p.exists() and not refresh:
        try:
            cm = CostModel.load(p)
            if len(cm.t_verify) >= gamma_max + 1:
                return cm
        except (ValueError, json.JSONDecodeError):
            pass  # a damaged cache entry is re-measured
    cm = calibrate(pair, gamma_max=gamma_max, progress=progress)
    p.parent.mkdir(parents=True, exist_ok=True)
    cm.save(p)  # atomic: a crash leaves the old entry or none
    return cm
