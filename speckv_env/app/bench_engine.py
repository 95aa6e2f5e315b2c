"""`speckv bench engine`: this engine against Hugging Face's own decoding, same prompts, same run.

Measured, in one process, on the same prompts (greedy, so every method emits the same text):
(a) target-only greedy decoding with HF ``generate``;
(b) HF assisted generation (``assistant_model=draft``) with ``num_assistant_tokens_schedule=
    "constant"`` at each gamma in 1..8 (``assistant_confidence_threshold=0``: really constant),
    with ``"heuristic"``, and with HF's defaults (20 tokens, dynamic confidence threshold 0.4);
(c) this engine at each fixed gamma in 0..8.
Tokens/s = new tokens / wall seconds summed over prompts (prefill included for all methods).

All of these run on the pair as loaded: on CPU that means with row-count plans for the linear
layers (:mod:`speckv_env.cpu_linear`), which speed up target-only decoding as well, so
``engine_speedup_vs_target`` compares like with like. When the plans are installed, (a) is also
measured with PyTorch's stock kernels (``hf_target_stock_tps``): what a user of plain
``generate`` gets.
"""

from __future__ import annotations

import copy
import json
import platform
import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from speckv_env.engine import SpeculativeEngine


def machine_info() -> dict[str, Any]:
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    try:
        import os

        from speckv_env.cpu_linear import cpu_model

        info["cpu_count"] = os.cpu_count()
        info["cpu_model"] = cpu_model()
        info["loadavg_at_start"] = os.getloadavg()
        info["omp_wait_policy"] = os.environ.get("OMP_WAIT_POLICY", "(unset)")
    except OSError:
        pass
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:
        pass
    return info


def bench_prompts(per_task: int = 1, split: str = "test") -> list:
    from speckv_env.prompts import TASKS, load_prompts

    out = []
    for task in TASKS:
        out.extend(load_prompts(task=task, split=split)[:per_task])
    return out


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize()


def _hf_generate(pair, ids: list[int], max_new_tokens: int, **kw) -> list[int]:
    x = torch.tensor([ids], device=pair.device)
    out = pair.target.generate(
        x,
        attention_mask=torch.ones_like(x),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        eos_token_id=pair.eos_token_id,
        pad_token_id=pair.eos_token_id[0],
        **kw,
    )
    return out[0, len(ids) :].tolist()


def run_engine_bench(
    pair,
    prompts: Sequence[Any] | None = None,
    max_new_tokens: int = 64,
    gammas_engine: Sequence[int] = range(9),
    gammas_hf: Sequence[int] = range(1, 9),
    repeats: int = 1,
    progress: bool = True,
) -> dict[str, Any]:
    """Run the comparison; returns the JSON-able result (see module docstring)."""
    from tqdm import tqdm

    prompts = list(prompts) if prompts is not None else bench_prompts()
    encoded = [pair.encode_chat(p.text) for p in prompts]
    dev = pair.device
    eng = SpeculativeEngine(pair.target, pair.draft, eos_token_id=pair.eos_token_id)
    draft_gc0 = copy.deepcopy(pair.draft.generation_config)

    def timed(fn) -> tuple[float, list[list[int]]]:
        best = None
        outs: list[list[int]] = []
        for _ in range(repeats):
            outs = []
            _sync(dev)
            t0 = time.perf_counter()
            for ids in encoded:
                outs.append(fn(ids))
            _sync(dev)
            el = time.perf_counter() - t0
            best = el if best is None else min(best, el)
        return float(best), outs

    configs: list[tuple[str, Any, Any]] = [("hf_target", None, None)]
    if getattr(pair, "cpu_kernels", False):
        configs.append(("hf_target_stock", None, None))
    configs += [("hf_assisted", g, None) for g in gammas_hf]
    configs += [("hf_heuristic", None, None), ("hf_default", None, None)]
    configs += [("engine", g, None) for g in gammas_engine]

    # warm-up: one short run of each code path
    with torch.inference_mode():
        _hf_generate(pair, encoded[0], 4)
        _hf_generate(
            pair,
            encoded[0],
            4,
            assistant_model=pair.draft,
            num_assistant_tokens=2,
            num_assistant_tokens_schedule="constant",
            assistant_confidence_threshold=0.0,
        )
        eng.generate(encoded[0], 4, gamma=2)

    results: dict[str, Any] = {"hf_assisted_tps": {}, "engine_tps": {}, "acceptance": {}, "engine_tokens_per_step": {}}
    reference: list[list[int]] | None = None
    mismatches: list[str] = []
    it = tqdm(configs, desc="bench engine", unit="config", disable=not progress)
    for kind, g, _ in it:
        it.set_postfix_str(f"{kind}{'' if g is None else f' gamma={g}'}")
        pair.draft.generation_config = copy.deepcopy(draft_gc0)  # HF mutates it (persistent schedules)
        with torch.inference_mode():
            if kind == "hf_target":
                el, outs = timed(lambda ids: _hf_generate(pair, ids, max_new_tokens))
            elif kind == "hf_target_stock":
                from speckv_env import cpu_linear

                plans = {m: cpu_linear.current_plans(m) for m in (pair.target, pair.draft)}
                for m in plans:
                    cpu_linear.uninstall(m)
                try:
                    _hf_generate(pair, encoded[0], 4)  # warm the stock path
                    el, outs = timed(lambda ids: _hf_generate(pair, ids, max_new_tokens))
                finally:
                    for m, p in plans.items():
                        cpu_linear.install(m, p)
            elif kind == "hf_assisted":
                el, outs = timed(
                    lambda ids: _hf_generate(
                        pair,
                        ids,
                        max_new_tokens,
                        assistant_model=pair.draft,
                        num_assistant_tokens=g,
                        num_assistant_tokens_schedule="constant",
                        assistant_confidence_threshold=0.0,
                    )
                )
            elif kind == "hf_heuristic":
                el, outs = timed(
                    lambda ids: _hf_generate(
                        pair, ids, max_new_tokens, assistant_model=pair.draft, num_assistant_tokens_schedule="heuristic"
                    )
                )
            elif kind == "hf_default":
                el, outs = timed(lambda ids: _hf_generate(pair, ids, max_new_tokens, assistant_model=pair.draft))
            else:
                steps_acc: list[tuple[int, int]] = []

                def run(ids, g=g):
                    r = eng.generate(ids, max_new_tokens, gamma=g)
                    steps_acc.extend((s.gamma, s.accepted) for s in r.steps)
                    return r.tokens

                el, outs = timed(run)
                drafted = sum(a for a, _ in steps_acc)
                results["acceptance"][str(g)] = (sum(k for _, k in steps_acc) / drafted) if drafted else None
                results["engine_tokens_per_step"][str(g)] = sum(k + 1 for _, k in steps_acc) / max(len(steps_acc), 1)
        n_tok = sum(len(o) for o in outs)
        tps = n_tok / el
        if reference is None:
            reference = outs
        elif outs != reference:
            mismatches.append(f"{kind}{'' if g is None else g}")
        if kind == "hf_target":
            results["hf_target_tps"] = tps
        elif kind == "hf_target_stock":
            results["hf_target_stock_tps"] = tps
        elif kind == "hf_assisted":
            results["hf_assisted_tps"][str(g)] = tps
        elif kind == "hf_heuristic":
            results["hf_heuristic_tps"] = tps
        elif kind == "hf_default":
            results["hf_default_tps"] = tps
        else:
            results["engine_tps"][str(g)] = tps
    best_engine_g = max(results["engine_tps"], key=results["engine_tps"].get)
    hf_all = {f"constant-{k}": v for k, v in results["hf_assisted_tps"].items()}
    hf_all["heuristic"] = results["hf_heuristic_tps"]
    hf_all["default"] = results["hf_default_tps"]
    best_hf = max(hf_all, key=hf_all.get)
    # latency ratio: one draft forward vs one target forward (medians, KV cache, 1 token)
    from speckv_env.calibrate import measure_target_only

    t_target = statistics.median(measure_target_only(pair, ids, n_tokens=16) for ids in encoded[:2])
    t_draft = _measure_draft_step(pair, encoded[0])
    results.update(
        best_engine_gamma=int(best_engine_g),
        best_engine_tps=results["engine_tps"][best_engine_g],
        best_hf_setting=best_hf,
        best_hf_tps=hf_all[best_hf],
        engine_vs_best_hf=results["engine_tps"][best_engine_g] / hf_all[best_hf],
        engine_speedup_vs_target=results["engine_tps"][best_engine_g] / results["hf_target_tps"],
        engine_speedup_vs_stock_target=(
            results["engine_tps"][best_engine_g] / results["hf_target_stock_tps"]
            if "hf_target_stock_tps" in results
            else None
        ),
        cpu_kernels=bool(getattr(pair, "cpu_kernels", False)),
        cpu_linear_plans=_plans_text(pair),
        latency_ratio=t_draft / t_target,
        draft_step_s=t_draft,
        target_step_s=t_target,
        outputs_identical=not mismatches,
        output_mismatches=mismatches,
        prompts=[p.id for p in prompts],
        max_new_tokens=max_new_tokens,
        tokens_per_config=sum(len(o) for o in reference or []),
        repeats=repeats,
        target=pair.target_name,
        draft=pair.draft_name,
        compression=pair.compression,
        device=str(pair.device),
        machine=machine_info(),
    )
    return results


def _plans_text(pair) -> list[str] | None:
    """The row-count plans in use (``shape: rows:kernel ...``), or None with stock kernels."""
    if not getattr(pair, "cpu_kernels", False):
        return None
    from speckv_env import cpu_linear

    return list(cpu_linear.describe({**cpu_linear.current_plans(pair.target), **cpu_linear.current_plans(pair.draft)}))


@torch.inference_mode()
def _measure_draft_step(pair, ids: list[int], n: int = 32) -> float:
    from transformers import DynamicCache

    from speckv_env.engine import cache_kwarg

    d = pair.draft
    kv = cache_kwarg(d)
    cache = DynamicCache(config=d.config)
    out = d(input_ids=torch.tensor([ids], device=pair.device), use_cache=True, **{kv: cache})
    tok = int(torch.argmax(out.logits[0, -1]))
    ts = []
    for _ in range(n):
        _sync(pair.device)
        t0 = time.perf_counter()
        out = d(input_ids=torch.tensor([[tok]], device=pair.device), use_cache=True, logits_to_keep=1, **{kv: cache})
        tok = int(torch.argmax(out.logits[0, -1]))
        _sync(pair.device)
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def format_engine_table(r: dict[str, Any]) -> str:
    lines = [
        f"target {r['target']} ({r['compression']}), draft {r['draft']}, device {r['device']}, "
        f"{len(r['prompts'])} prompts x {r['max_new_tokens']} new tokens (greedy)",
        f"{'method':<28}{'tokens/s':>10}{'accept':>9}{'tok/step':>10}",
        f"{'HF generate (target only)':<28}{r['hf_target_tps']:>10.2f}",
    ]
    if r.get("hf_target_stock_tps") is not None:
        lines.append(f"{'  same, stock CPU kernels':<28}{r['hf_target_stock_tps']:>10.2f}")
    for g, v in r["hf_assisted_tps"].items():
        lines.append(f"{'HF assisted constant ' + g:<28}{v:>10.2f}")
    lines.append(f"{'HF assisted heuristic':<28}{r['hf_heuristic_tps']:>10.2f}")
    lines.append(f"{'HF assisted defaults':<28}{r['hf_default_tps']:>10.2f}")
    for g, v in r["engine_tps"].items():
        a = r["acceptance"].get(g)
        lines.append(
            f"{'this engine gamma=' + g:<28}{v:>10.2f}{'' if a is None else f'{a:>9.3f}'}"
            f"{'' if a is not None else ' ' * 9}{r['engine_tokens_per_step'][g]:>10.2f}"
        )
    lines.append(
        f"best engine gamma={r['best_engine_gamma']}: {r['best_engine_tps']:.2f} tok/s = "
        f"{r['engine_vs_best_hf']:.3f}x best HF ({r['best_hf_setting']}), "
        f"{r['engine_speedup_vs_target']:.3f}x target-only"
        + (
            f" ({r['engine_speedup_vs_stock_target']:.3f}x with stock kernels)"
            if r.get("engine_speedup_vs_stock_target")
            else ""
        )
        + f"; draft/target step latency {r['latency_ratio']:.3f}; "
        f"outputs identical across methods: {r['outputs_identical']}"
    )
    return "\n".join(lines)


def write_json(obj: Any, path: str | Path) -> None:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps(obj, indent=2, default=str))
