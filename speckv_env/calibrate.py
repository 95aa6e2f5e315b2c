"""Calibrating the cost model of a pair on a device by measurement.

The cost model (:class:`speckv_env.core.CostModel`) is fitted from what the engine itself
does, so that modelled and measured times agree:

- ``t_verify[g]``: measured verify time of engine steps at gamma g (one target forward over
  g + 1 tokens, the acceptance test and the cache roll-back);
- ``t_draft``: measured draft time per draft forward (the observation forward and the drafting
  forwards, with the draft signals of each drafted token);
- ``t_target``: time per token of plain target-only decoding (one target forward of one token
  and an argmax, KV cache), the baseline for speedups.

How it is measured, so that the numbers can be relied on:

- a warm-up (every code path once) before anything is timed;
- ``repeats`` (default 5) rounds; in each round every gamma 0..gamma_max and the target-only
  loop are measured once per prompt, in a random order drawn per round (never sorted), so that
  drift of the machine spreads over all gammas instead of tilting the curve;
- per gamma the median of all step times, with its spread (quartiles, IQR, MAD, the per-round
  medians) and the count of samples outside Tukey's far fences, saved in ``meta``;
- ``t_verify`` is the monotone fit of the medians (verifying more tokens never costs less:
  weighted isotonic regression, pool-adjacent-violators), and a gamma whose median does not
  fit the monotone curve of the others (by more than ``OUTLIER_REL`` and ``OUTLIER_SE``
  standard errors) is flagged in ``meta["outliers"]``;
- the host (CPU model, cores, threads, torch and transformers versions, kernels, load) is
  recorded.

:func:`check_calibration` re-measures a few points and reports drift against a saved model.
Results are cached per (pair, draft fingerprint, compression, device, kernels, host) under
``cache_dir()/calibration``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import platform
import random
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .core import CostModel
from .engine import SpeculativeEngine, cache_kwarg
from .models import cache_dir

CALIBRATION_PROMPTS = (
    "Write a Python function that returns the n-th Fibonacci number.",
    "Explain in two sentences why the sky is blue.",
)
#: the calibration's method, recorded in ``meta["method"]``
METHOD = (
    "calibrate/2: warm-up; gammas 0..gamma_max and target-only in a random order per round, every point "
    "once per prompt and round; medians with spread; t_verify = weighted isotonic (non-decreasing) fit"
)
#: a gamma is an outlier when its median breaks the monotone order of the others by this much (relative) ...
OUTLIER_REL = 0.05
#: ... and more than this many standard errors of the median
OUTLIER_SE = 3.0
#: Tukey's far fence, in IQRs beyond the quartiles, for counting extreme samples
FENCE_IQR = 3.0
#: the points :func:`check_calibration` re-measures by default (clipped to the model's range)
CHECK_GAMMAS = (0, 1, 4, 8)
#: default drift tolerance of :func:`check_calibration` (relative, per point)
CHECK_TOLERANCE = 0.10


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize()


# ---- the host ------------------------------------------------------------------------------------


def host_info(pair: Any = None) -> dict[str, Any]:
    """What the measurement ran on: CPU model, cores, threads, versions, kernels, load."""
    from .cpu_linear import cpu_model

    info: dict[str, Any] = {
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "(unset)"),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:  # pragma: no cover - a dependency
        pass
    with contextlib.suppress(OSError):  # not on every platform
        info["loadavg"] = list(os.getloadavg())
    if pair is not None:
        info["kernels"] = pair_kernels(pair)
        info["exact"] = bool(getattr(pair, "exact", False))
    return info


def host_key() -> str:
    """Identifies a host for the calibration cache: CPU model, cores, threads, torch."""
    from .cpu_linear import cpu_model

    text = f"{cpu_model()}|cpus={os.cpu_count()}|threads={torch.get_num_threads()}|torch={torch.__version__}"
    return hashlib.sha256(text.encode()).hexdigest()[:10]


def pair_kernels(pair: Any) -> str:
    return getattr(pair, "kernels", None) or ("cpu-row-plans" if getattr(pair, "cpu_kernels", False) else "stock")


# ---- statistics ----------------------------------------------------------------------------------


def spread(samples: Sequence[float]) -> dict[str, Any]:
    """Median, quartiles, IQR, MAD, count and the samples beyond Tukey's far fences."""
    xs = sorted(float(x) for x in samples)
    n = len(xs)
    if not n:
        return {"n": 0}
    med = statistics.median(xs)
    q1, q3 = (xs[0], xs[0]) if n == 1 else tuple(statistics.quantiles(xs, n=4, method="inclusive")[::2])
    iqr = q3 - q1
    mad = statistics.median(abs(x - med) for x in xs)
    lo, hi = q1 - FENCE_IQR * iqr, q3 + FENCE_IQR * iqr
    return {
        "n": n,
        "median": med,
        "q1": q1,
        "q3": q3,
        "iqr": iqr,
        "mad": mad,
        "min": xs[0],
        "max": xs[-1],
        "far_out": sum(1 for x in xs if x < lo or x > hi),
    }


def isotonic(values: Sequence[float], weights: Sequence[float] | None = None) -> list[float]:
    """Weighted least-squares non-decreasing fit (pool-adjacent-violators)."""
    w = [1.0] * len(values) if weights is None else [max(float(x), 1e-12) for x in weights]
    blocks: list[list[float]] = []  # [mean, weight, count]
    for v, wi in zip(values, w, strict=True):
        blocks.append([float(v), wi, 1])
        while len(blocks) > 1 and blocks[-2][0] > blocks[-1][0]:
            m2, w2, c2 = blocks.pop()
            m1, w1, c1 = blocks.pop()
            blocks.append([(m1 * w1 + m2 * w2) / (w1 + w2), w1 + w2, c1 + c2])
    out: list[float] = []
    for m, _, c in blocks:
        out.extend([m] * int(c))
    return out


def _se_median(s: dict[str, Any]) -> float:
    """Standard error of a median: 1.2533 sigma / sqrt(n), sigma estimated as IQR / 1.349."""
    return 1.2533 * (s["iqr"] / 1.349) / math.sqrt(s["n"])


def _violation(fit: dict[int, float], g: int, median: float) -> float:
    """How far (seconds) ``median`` at g breaks the order of the fitted others: above the fit at
    the next larger gamma, or below the fit at the next smaller one (0 when in order)."""
    lo = max((h for h in fit if h < g), default=None)
    hi = min((h for h in fit if h > g), default=None)
    if hi is not None and median > fit[hi]:
        return median - fit[hi]
    if lo is not None and median < fit[lo]:
        return fit[lo] - median
    return 0.0


def flag_outliers(stats: dict[int, dict[str, Any]]) -> list[int]:
    """Gammas whose median breaks the monotone order of the others.

    Iteratively: each remaining gamma's median is compared with the isotonic fit of the other
    remaining gammas; one that is dearer than a larger gamma or cheaper than a smaller one by
    more than ``OUTLIER_REL`` (relative) and more than ``OUTLIER_SE`` standard errors of its
    median is a candidate; the worst candidate is flagged and removed, until none is left."""
    left = sorted(g for g, s in stats.items() if s.get("n"))
    flagged: list[int] = []
    while len(left) > 1:
        worst, worst_rel = None, 0.0
        for g in left:
            others = [h for h in left if h != g]
            fit = dict(zip(others, isotonic([stats[h]["median"] for h in others]), strict=True))
            med = stats[g]["median"]
            dev = _violation(fit, g, med)
            rel = dev / med if med > 0 else 0.0
            if rel > OUTLIER_REL and dev > OUTLIER_SE * _se_median(stats[g]) and rel > worst_rel:
                worst, worst_rel = g, rel
        if worst is None:
            break
        flagged.append(worst)
        left.remove(worst)
    return sorted(flagged)


def monotone_fit(stats: dict[int, dict[str, Any]], gamma_max: int) -> dict[str, Any]:
    """The monotone fit of per-gamma medians (weighted by sample count) and its outliers.

    ``stats[g]`` is :func:`spread` of gamma g's samples; a gamma without samples is left out of
    the fit and then extrapolated from the two fitted points before it. Returns ``t_verify``
    (the fit, gamma 0..gamma_max), ``raw`` (the medians, None where unmeasured), ``outliers``
    (:func:`flag_outliers`: flagged, still in the fit) and ``residual_rel`` (median / fit - 1)."""
    have = [g for g in range(gamma_max + 1) if stats.get(g, {}).get("n")]
    fit = dict(zip(have, isotonic([stats[g]["median"] for g in have], [stats[g]["n"] for g in have]), strict=True))
    t_verify: list[float] = []
    for g in range(gamma_max + 1):
        if g in fit:
            t_verify.append(fit[g])
        else:
            t_verify.append(t_verify[-1] + (t_verify[-1] - t_verify[-2] if len(t_verify) > 1 else 0.0))
    residual = {g: (stats[g]["median"] / fit[g] - 1.0) if fit[g] else 0.0 for g in have}
    raw = [stats[g]["median"] if g in fit else None for g in range(gamma_max + 1)]
    outliers = flag_outliers({g: stats[g] for g in have})
    return {"t_verify": t_verify, "raw": raw, "outliers": outliers, "residual_rel": residual}


def fit_t_verify(verify: dict[int, list[float]], gamma_max: int, where: str = "calibration") -> list[float]:
    """Monotone fit of the verify times per gamma 0..gamma_max (see :func:`monotone_fit`); a
    gamma with no sample (clipped everywhere: very short runs) is extrapolated from the two
    before it. Without a gamma-0 sample there is nothing to anchor on: ValueError."""
    if not verify.get(0):
        raise ValueError(
            f"{where}: no gamma-0 step was measured, and the cost model is anchored at t_verify[0] "
            "(give calibration prompts and tokens_per_gamma >= 1)"
        )
    return monotone_fit({g: spread(v) for g, v in verify.items()}, gamma_max)["t_verify"]


# ---- measuring -----------------------------------------------------------------------------------


@torch.inference_mode()
def target_only_times(pair, prompt_ids: list[int], n_tokens: int = 24) -> list[float]:
    """Seconds per token of plain greedy target decoding with a KV cache (prefill not counted)."""
    from transformers import DynamicCache

    tgt = pair.target
    dev = pair.device
    kv = cache_kwarg(tgt)
    cache = DynamicCache(config=tgt.config)
    out = tgt(input_ids=torch.tensor([prompt_ids], device=dev), use_cache=True, logits_to_keep=1, **{kv: cache})
    tok = int(torch.argmax(out.logits[0, -1]))
    times = []
    for _ in range(n_tokens):
        _sync(dev)
        t0 = time.perf_counter()
        out = tgt(input_ids=torch.tensor([[tok]], device=dev), use_cache=True, **{kv: cache})
        tok = int(torch.argmax(out.logits[0, -1]))
        _sync(dev)
        times.append(time.perf_counter() - t0)
    return times


def measure_target_only(pair, prompt_ids: list[int], n_tokens: int = 24, device=None) -> float:
    """Median seconds per token of plain greedy target decoding with a KV cache."""
    return statistics.median(target_only_times(pair, prompt_ids, n_tokens))


def round_order(points: Sequence[str], rng: random.Random) -> list[str]:
    """The points in a random order, never the sorted one (when there are three or more)."""
    order = list(points)
    for _ in range(100):
        rng.shuffle(order)
        if len(order) < 3 or order != list(points):
            break
    return order


@dataclass
class Samples:
    """Raw measurements of one calibration (or check)."""

    verify: dict[int, list[float]]
    draft: list[float] = field(default_factory=list)
    target: list[float] = field(default_factory=list)
    #: per round, per point label ("g3", "target"): the median of that round's samples
    per_round: list[dict[str, float]] = field(default_factory=list)
    #: per round, the order the points were measured in
    order: list[list[str]] = field(default_factory=list)


def _engine_run(engine, ids: list[int], n: int, g: int, verify: list[float], draft: list[float]) -> None:
    res = engine.generate(ids, n, gamma=g, seed=0)
    steps = list(res.steps)
    # a step clipped at the end of the budget drafted fewer tokens: not a gamma-g sample
    verify.extend(s.verify_s for s in steps if s.gamma == g)
    # the first step's observation forward is the draft's prefill: not a one-token forward
    for s in steps[1:]:
        if s.draft_forwards:
            draft.append(s.draft_s / s.draft_forwards)


def measure(
    pair,
    engine,
    encoded: Sequence[list[int]],
    gammas: Sequence[int],
    repeats: int,
    tokens_per_gamma: int,
    seed: int = 0,
    progress: bool = False,
) -> Samples:
    """``repeats`` rounds over ``gammas`` and the target-only loop, each round in its own random
    order, every point once per prompt."""
    rng = random.Random(seed)
    smp = Samples(verify={g: [] for g in gammas})
    points = [f"g{g}" for g in gammas] + ["target"]
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=repeats * len(points), desc=f"calibrating {pair.compression}", unit="point")
    for _ in range(repeats):
        order = round_order(points, rng)
        smp.order.append(order)
        medians: dict[str, float] = {}
        for label in order:
            got: list[float] = []
            for ids in encoded:
                if label == "target":
                    got.extend(target_only_times(pair, ids, tokens_per_gamma))
                else:
                    _engine_run(engine, ids, tokens_per_gamma, int(label[1:]), got, smp.draft)
            if label == "target":
                smp.target.extend(got)
            else:
                smp.verify[int(label[1:])].extend(got)
            if got:
                medians[label] = statistics.median(got)
            if bar is not None:
                bar.update(1)
        smp.per_round.append(medians)
    if bar is not None:
        bar.close()
    return smp


def _warm_up(pair, engine, ids: list[int], gamma_max: int, where: str) -> None:
    """Every code path once before anything is timed (allocator, kernels, caches)."""
    res = engine.generate(ids, 8, gamma=0, seed=0)
    if not res.steps:
        raise ValueError(
            f"{where}: no gamma-0 step was measured, and the cost model is anchored at t_verify[0] "
            "(give calibration prompts and tokens_per_gamma >= 1)"
        )
    for g in sorted({1, max(gamma_max // 2, 1), max(gamma_max, 1)}):
        engine.generate(ids, 8, gamma=g, seed=0)
    target_only_times(pair, ids, 4)


def _check_args(prompts: Sequence[str], tokens_per_gamma: int, gamma_max: int, repeats: int) -> None:
    if not prompts:
        raise ValueError("calibrate: no calibration prompts given")
    if tokens_per_gamma < 1 or gamma_max < 0 or repeats < 1:
        raise ValueError(
            "calibrate: need tokens_per_gamma >= 1, gamma_max >= 0 and repeats >= 1, "
            f"got {tokens_per_gamma}, {gamma_max}, {repeats}"
        )


def calibrate(
    pair,
    gamma_max: int = 8,
    prompts: Sequence[str] = CALIBRATION_PROMPTS,
    tokens_per_gamma: int = 24,
    temperature: float = 0.0,
    progress: bool = False,
    repeats: int = 5,
    seed: int = 0,
) -> CostModel:
    """Measure a :class:`CostModel` for ``pair`` (a :class:`speckv_env.pair.ModelPair`).

    Raises ValueError for arguments that measure nothing, and when no gamma-0 step was measured
    (the cost model is anchored at ``t_verify[0]``)."""
    _check_args(prompts, tokens_per_gamma, gamma_max, repeats)
    where = f"calibrating {pair.name} ({pair.compression})"
    engine = SpeculativeEngine(pair.target, pair.draft, temperature=temperature, eos_token_id=pair.eos_token_id)
    encoded = [pair.encode_chat(p) for p in prompts]
    host_start = host_info(pair)
    t0 = time.time()
    _warm_up(pair, engine, encoded[0], gamma_max, where)
    smp = measure(pair, engine, encoded, range(gamma_max + 1), repeats, tokens_per_gamma, seed, progress)
    if not smp.verify.get(0):
        fit_t_verify(smp.verify, gamma_max, where)  # raises the clear error
    stats = {g: spread(v) for g, v in smp.verify.items()}
    fit = monotone_fit(stats, gamma_max)
    draft, target = spread(smp.draft), spread(smp.target)
    meta = {
        "method": METHOD,
        "tokens_per_gamma": tokens_per_gamma,
        "prompts": len(encoded),
        "repeats": repeats,
        "seed": seed,
        "samples_per_gamma": {g: len(v) for g, v in smp.verify.items()},
        "verify_stats": {str(g): s for g, s in stats.items()},
        "t_verify_raw": fit["raw"],
        "t_verify_fit": "isotonic (pool-adjacent-violators), weights = samples per gamma",
        "outliers": fit["outliers"],
        "outlier_rule": (
            f"median breaks the order of the isotonic fit of the other gammas by > {OUTLIER_REL:g} relative "
            f"and > {OUTLIER_SE:g} standard errors (flagged, kept in the fit)"
        ),
        "residual_rel": {str(g): r for g, r in fit["residual_rel"].items()},
        "draft_stats": draft,
        "target_stats": target,
        "per_round": smp.per_round,
        "order": smp.order,
        "host": host_start,
        "loadavg_end": host_info().get("loadavg"),
        "seconds": time.time() - t0,
        "torch_threads": torch.get_num_threads(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "(unset)"),
        "draft_fingerprint": getattr(pair, "draft_fingerprint", None),
        "cpu_kernels": bool(getattr(pair, "cpu_kernels", False)),
        "kernels": pair_kernels(pair),
        "exact": bool(getattr(pair, "exact", False)),
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    if not smp.draft or not smp.target:
        raise ValueError(f"{where}: no draft forward or target-only token was measured")
    return CostModel(
        t_draft=draft["median"],
        t_verify=fit["t_verify"],
        t_target=target["median"],
        t_overhead=0.0,
        pair=pair.name,
        compression=pair.compression,
        device=str(pair.device.type),
        meta=meta,
    )


# ---- checking a saved model against this host ----------------------------------------------------


def _identity_notes(pair, saved: CostModel) -> list[str]:
    """Where the saved model was measured for something else than ``pair`` on this device."""
    mine = {
        "pair": pair.name,
        "compression": pair.compression,
        "device": str(pair.device.type),
        "kernels": pair_kernels(pair),
        "draft_fingerprint": getattr(pair, "draft_fingerprint", None),
    }
    theirs = {
        "pair": saved.pair,
        "compression": saved.compression,
        "device": saved.device,
        "kernels": saved.meta.get("kernels"),
        "draft_fingerprint": saved.meta.get("draft_fingerprint"),
    }
    return [
        f"{k}: saved {theirs[k]!r}, here {mine[k]!r}" for k in mine if theirs[k] and mine[k] and theirs[k] != mine[k]
    ]


def check_calibration(
    pair,
    saved: CostModel,
    gammas: Sequence[int] | None = None,
    repeats: int = 3,
    tokens_per_gamma: int = 24,
    tolerance: float = CHECK_TOLERANCE,
    prompts: Sequence[str] = CALIBRATION_PROMPTS,
    progress: bool = False,
    seed: int = 1,
) -> dict[str, Any]:
    """Re-measure a few points (``t_verify`` at ``gammas``, ``t_draft``, ``t_target``) and
    compare them with ``saved``: per point the relative difference (measured / saved - 1) and
    whether it is within ``tolerance``; the verdict is ``ok`` (every point within it), ``drift``
    (some point outside) or ``mismatch`` (the saved model was measured for another pair,
    compression, device, kernels or draft: its times are not comparable)."""
    _check_args(prompts, tokens_per_gamma, 0, repeats)
    gmax = len(saved.t_verify) - 1
    gammas = sorted({min(g, gmax) for g in (gammas if gammas is not None else CHECK_GAMMAS)})
    engine = SpeculativeEngine(pair.target, pair.draft, eos_token_id=pair.eos_token_id)
    encoded = [pair.encode_chat(p) for p in prompts]
    _warm_up(pair, engine, encoded[0], max(gammas), f"checking {pair.name} ({pair.compression})")
    smp = measure(pair, engine, encoded, gammas, repeats, tokens_per_gamma, seed, progress)
    measured = {f"t_verify[{g}]": statistics.median(smp.verify[g]) for g in gammas if smp.verify[g]}
    measured["t_draft"] = statistics.median(smp.draft) if smp.draft else math.nan
    measured["t_target"] = statistics.median(smp.target)
    expected = {f"t_verify[{g}]": saved.t_verify[g] for g in gammas}
    expected.update(t_draft=saved.t_draft, t_target=saved.t_target)
    points: list[dict[str, Any]] = []
    for name, m in measured.items():
        e = expected[name]
        rel = m / e - 1.0 if e > 0 else math.inf
        points.append({"point": name, "saved": e, "measured": m, "rel_diff": rel, "ok": abs(rel) <= tolerance})
    notes = _identity_notes(pair, saved)
    verdict = "mismatch" if notes else ("ok" if all(p["ok"] for p in points) else "drift")
    return {
        "verdict": verdict,
        "tolerance": tolerance,
        "points": points,
        "max_abs_rel_diff": max(abs(p["rel_diff"]) for p in points),
        "mismatch": notes,
        "repeats": repeats,
        "host": host_info(pair),
        "saved_host": saved.meta.get("host"),
        "saved_measured_at": saved.meta.get("measured_at"),
    }


def format_check(r: dict[str, Any]) -> str:
    lines = [f"{'point':<14}{'saved ms':>10}{'measured ms':>13}{'rel diff':>10}  within {r['tolerance']:.0%}"]
    for p in r["points"]:
        lines.append(
            f"{p['point']:<14}{p['saved'] * 1e3:>10.3f}{p['measured'] * 1e3:>13.3f}{p['rel_diff']:>+10.1%}  "
            f"{'yes' if p['ok'] else 'NO'}"
        )
    lines.extend(f"not comparable: {n}" for n in r["mismatch"])
    lines.append(f"verdict: {r['verdict']} (largest drift {r['max_abs_rel_diff']:.1%})")
    return "\n".join(lines)


# ---- the cache -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Budget:
    """How much a calibration measures: interleaved rounds over every point, tokens decoded per
    point and prompt, and the prompts."""

    name: str
    repeats: int
    tokens_per_gamma: int
    prompts: tuple[str, ...] = CALIBRATION_PROMPTS

    def describe(self) -> str:
        return f"{self.repeats} interleaved rounds x {self.tokens_per_gamma} tokens per point and prompt"


#: the full calibration: :func:`calibrate`'s defaults, what ``speckv calibrate`` measures
FULL = Budget("full", repeats=5, tokens_per_gamma=24)
#: the quick one (the demo's first run on a new host): fewer rounds and tokens, still every point
#: in every round in a random order, still medians with a spread and the monotone fit; about a
#: third of the full one's time, and noisier
QUICK = Budget("quick", repeats=3, tokens_per_gamma=12)
BUDGETS = {b.name: b for b in (FULL, QUICK)}


def _budget(name: str) -> Budget:
    if name not in BUDGETS:
        raise ValueError(f"unknown calibration budget {name!r}: choose one of {', '.join(BUDGETS)}")
    return BUDGETS[name]


def _covers(cm: CostModel, b: Budget) -> bool:
    """Whether ``cm`` was measured with at least ``b``'s rounds, tokens and prompts."""
    m = cm.meta
    return (
        int(m.get("repeats") or 0) >= b.repeats
        and int(m.get("tokens_per_gamma") or 0) >= b.tokens_per_gamma
        and int(m.get("prompts") or 0) >= len(b.prompts)
    )


def calibration_budget(cm: CostModel) -> str | None:
    """The most thorough budget ``cm`` was measured with (``"full"``, ``"quick"``), from what its
    meta records (rounds, tokens, prompts), or None (a model measured with less than either)."""
    return next((b.name for b in (FULL, QUICK) if _covers(cm, b)), None)


def calibration_path(pair, budget: str = "full") -> Path:
    # the draft's fingerprint is part of the key: a retrained draft (same name) is re-measured,
    # and so are the kernels (row-invariant, row-count plans, stock: other step times) and the host;
    # a quick calibration has its own entry ("-quick"), so it can never be taken for a full one
    # (the full entry keeps the name it had before budgets existed: those were all full)
    b = _budget(budget)
    kernels = pair_kernels(pair).replace(":", "_")
    key = f"{pair.name}-{pair.draft_fingerprint}-{pair.compression}-{pair.device.type}-{kernels}-{host_key()}"
    if b is not FULL:
        key += f"-{budget}"
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in key)
    return cache_dir() / "calibration" / f"{safe}.json"


def _usable(cm: CostModel, pair, gamma_max: int, b: Budget = FULL) -> bool:
    """A cached model of this method, these kernels and this host, covering gamma_max, measured
    with at least budget ``b``."""
    host = cm.meta.get("host") or {}
    return (
        len(cm.t_verify) >= gamma_max + 1
        and cm.meta.get("method") == METHOD
        and cm.meta.get("kernels") == pair_kernels(pair)
        and host.get("cpu_model") == host_info().get("cpu_model")
        and host.get("torch_threads") == torch.get_num_threads()
        and _covers(cm, b)
    )


def _cached(pair, gamma_max: int, b: Budget) -> CostModel | None:
    """The cached model that serves a request for budget ``b``: this host's full calibration when
    there is one (it measured the same points, more), else one of ``b`` itself; None if neither."""
    for entry in dict.fromkeys((FULL, b)):
        p = calibration_path(pair, entry.name)
        if not p.exists():
            continue
        try:
            cm = CostModel.load(p)
        except (ValueError, json.JSONDecodeError):
            continue  # a damaged cache entry is re-measured
        if _usable(cm, pair, gamma_max, b):
            return cm
    return None


def cached_calibration(
    pair, gamma_max: int = 8, refresh: bool = False, progress: bool = False, budget: str = "full"
) -> CostModel:
    """The pair's cost model on this host from the cache, measuring it once if absent.

    ``budget`` (:data:`BUDGETS`): ``"full"`` (:data:`FULL`, the default) or ``"quick"``
    (:data:`QUICK`, the demo's). A quick request is served by a cached full calibration of this
    host when there is one; a full request is never served by a quick one (each budget has its
    own entry, and the model's rounds, tokens and prompts are checked too). ``refresh`` measures
    again at ``budget``. The model's ``meta["budget"]`` names the budget it was measured with."""
    b = _budget(budget)
    if not refresh:
        cm = _cached(pair, gamma_max, b)
        if cm is not None:
            return cm
    cm = calibrate(
        pair,
        gamma_max=gamma_max,
        prompts=b.prompts,
        tokens_per_gamma=b.tokens_per_gamma,
        repeats=b.repeats,
        progress=progress,
    )
    cm.meta.update(budget=b.name, budget_note=f"{b.name} calibration: {b.describe()}, {len(b.prompts)} prompts")
    p = calibration_path(pair, b.name)
    p.parent.mkdir(parents=True, exist_ok=True)
    cm.save(p)  # atomic: a crash leaves the old entry or none
    return cm


def cached_calibration_exists(pair, gamma_max: int = 8, budget: str = "full") -> bool:
    """Whether :func:`cached_calibration` would reuse a cached model (no measuring)."""
    return _cached(pair, gamma_max, _budget(budget)) is not None
