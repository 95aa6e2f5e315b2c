"""`speckv bench engine`: this engine against Hugging Face's own decoding, same prompts, same run.

Measured in one process, greedy, on the same loaded models:

- ``lean_target``: a plain loop of one-token target forwards with a ``DynamicCache`` (the
  fastest target-only decoding there is: no ``generate`` machinery);
- ``hf_target``: target-only ``generate``;
- HF assisted generation with the draft (``assistant_model=draft``): ``constant-g`` for g in
  1..8 and ``default``. Transformers reads ``num_assistant_tokens``, its schedule and
  ``assistant_confidence_threshold`` from the *draft's* ``generation_config``, not from
  ``generate()``'s arguments, so they are set there: ``constant-g`` = g tokens, schedule
  ``constant``, threshold 0 (no early stop); ``default`` = the draft's configuration as shipped
  (transformers' defaults: 20 tokens, constant schedule, confidence threshold 0.4). The draft's
  and the target's forward calls are counted per round, so ``hf_assisted_observed_gamma`` says
  how many tokens HF really drafted per round (over all rounds; ``..._unclipped`` over the
  rounds not cut short by the end of the token budget);
- HF prompt-lookup decoding (``prompt_lookup_num_tokens``): ``prompt_lookup-n``;
- for HF, the draft's ``forward`` names ``logits_to_keep`` (the shipped draft accepts it but its
  signature hides it, and transformers would then compute every prompt position's logits);
- this engine at each fixed gamma; with a second, ``exact=False`` pair also the fast engine
  (and a lean target loop on its kernels);
- ``hf_target_stock``: target-only ``generate`` with PyTorch's stock kernels, what a user of
  plain ``generate`` gets (the pair's row-invariant layers or row-count plans taken off for the
  call and put back).

Methods run round-robin per prompt in a fresh random order per prompt and repeat; tokens/s =
new tokens / wall seconds (prefill included for every method) per repeat over all prompts,
reported as the median over repeats with the spread. The engine's gamma is chosen on the
validation prompts (``engine_heldout_gamma``) and reported on the test prompts
(``engine_heldout_tps``); ``best_engine_*`` are the in-sample best on the test prompts, for
reference only. Every method on a row-invariant pair must emit the target's own greedy text:
the row-invariant layers sit on the model objects, so HF's ``generate`` computes with them too.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import inspect
import json
import platform
import random
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from speckv_env.engine import SpeculativeEngine

#: HF assisted settings measured by default (constant gammas are added from ``gammas_hf``)
HF_EXTRA = ("default",)
#: prompt-lookup lengths measured by default
PROMPT_LOOKUP = (10,)


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


# ---- the methods -------------------------------------------------------------------------------


class CallCounter:
    """Counts a model's forward calls and their input lengths (the instance's ``forward`` is
    wrapped; ``functools.wraps`` keeps its signature, which transformers inspects, and
    :func:`advertised_signature` names ``logits_to_keep`` where the forward hides it). With
    ``rounds``, its ``generate`` is wrapped too: per call (one round of HF's assisted
    generation) the ``max_new_tokens`` HF asked the draft for and the forwards it ran."""

    def __init__(self, model, rounds: bool = False) -> None:
        self.model = model
        self.lengths: list[int] = []
        self.rounds: list[tuple[int, int]] | None = [] if rounds else None

    def __enter__(self) -> CallCounter:
        orig = self.model.forward

        @functools.wraps(orig)
        def counted(*args, **kwargs):
            ids = kwargs.get("input_ids", args[0] if args else None)
            self.lengths.append(int(ids.shape[-1]) if ids is not None else 0)
            return orig(*args, **kwargs)

        sig = advertised_signature(orig)
        if sig is not None:
            counted.__signature__ = sig  # type: ignore[attr-defined]
        self.model.forward = counted
        if self.rounds is not None:
            gen = self.model.generate

            @functools.wraps(gen)
            def generate(*args, **kwargs):
                n0 = len(self.lengths)
                out = gen(*args, **kwargs)
                assert self.rounds is not None
                self.rounds.append((int(kwargs.get("max_new_tokens") or 0), len(self.lengths) - n0))
                return out

            self.model.generate = generate
        return self

    def __exit__(self, *exc) -> None:
        del self.model.forward  # the class's methods again
        if self.rounds is not None:
            del self.model.generate


def advertised_signature(forward) -> inspect.Signature | None:
    """For a ``forward(*args, **kwargs)`` that passes ``logits_to_keep`` on (the shipped draft's)
    but does not name it: its signature with ``logits_to_keep`` named, else None. Transformers
    asks only for the logits it needs (the last position) when the signature names it; without
    it HF's draft would compute full-vocabulary logits (and the draft's context lookup) for every
    prompt position, a cost the draft does not have."""
    sig = inspect.signature(forward)
    params = list(sig.parameters.values())
    if "logits_to_keep" in sig.parameters or not any(p.kind is p.VAR_KEYWORD for p in params):
        return None
    extra = inspect.Parameter("logits_to_keep", inspect.Parameter.KEYWORD_ONLY, default=0)
    return sig.replace(parameters=[p for p in params if p.kind is not p.VAR_KEYWORD] + [extra, params[-1]])


def _hf_generate(model, ids: list[int], max_new_tokens: int, eos: list[int], **kw) -> list[int]:
    x = torch.tensor([ids], device=next(model.parameters()).device)
    out = model.generate(
        x,
        attention_mask=torch.ones_like(x),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        eos_token_id=eos,
        pad_token_id=eos[0] if eos else None,
        **kw,
    )
    return out[0, len(ids) :].tolist()


@torch.inference_mode()
def lean_target_loop(model, ids: list[int], max_new_tokens: int, eos: Sequence[int]) -> list[int]:
    """Greedy target-only decoding as a plain loop: prefill, then one-token forwards with a cache."""
    from transformers import DynamicCache

    from speckv_env.engine import cache_kwarg

    dev = next(model.parameters()).device
    kv = {cache_kwarg(model): DynamicCache(config=model.config)}
    out = model(input_ids=torch.tensor([ids], device=dev), use_cache=True, logits_to_keep=1, **kv)
    tok = int(torch.argmax(out.logits[0, -1]))
    toks = [tok]
    stop = set(eos)
    while len(toks) < max_new_tokens and tok not in stop:
        out = model(input_ids=torch.tensor([[tok]], device=dev), use_cache=True, **kv)
        tok = int(torch.argmax(out.logits[0, -1]))
        toks.append(tok)
    return toks


@contextlib.contextmanager
def stock_kernels(*models) -> Iterator[None]:
    """PyTorch's own kernels for the duration: row-invariant layers and row-count plans taken
    off, and put back after."""
    from speckv_env import cpu_linear, invariant

    saved = [(m, invariant.is_row_invariant(m), cpu_linear.current_plans(m)) for m in models]
    for m, inv, _ in saved:
        if inv:
            invariant.undo(m)
        cpu_linear.uninstall(m)
    try:
        yield
    finally:
        for m, inv, plans in saved:
            if inv:
                invariant.make_row_invariant(m)
            if plans:
                cpu_linear.install(m, plans)


@dataclass
class Method:
    """One way of decoding: ``run(ids) -> tokens``; ``group`` names the models it runs on."""

    name: str
    run: Callable[[list[int]], list[int]]
    group: str = "main"
    #: per call: (draft forward calls, target forward calls, drafted candidates) for HF assisted
    counts: list[tuple[int, int, int]] = field(default_factory=list)
    #: per round of HF assisted generation: (tokens HF asked the draft for, draft forwards run)
    rounds: list[tuple[int, int]] = field(default_factory=list)
    steps: list[tuple[int, int]] = field(default_factory=list)  # engine: (gamma, accepted) per step


def _assisted_config(draft, label: str, shipped) -> Any:
    """The draft's generation config for an HF assisted label (a fresh copy every call: HF may
    mutate it)."""
    cfg = copy.deepcopy(shipped)
    if label.startswith("constant-"):
        cfg.num_assistant_tokens = int(label.split("-")[1])
        cfg.num_assistant_tokens_schedule = "constant"
        cfg.assistant_confidence_threshold = 0.0
    return cfg


def _hf_method(pair, label: str, max_new_tokens: int, shipped) -> Method:
    eos = pair.eos_token_id
    m = Method(f"hf:{label}", lambda ids: [])

    def run(ids: list[int]) -> list[int]:
        if label.startswith("prompt_lookup-"):
            kw: dict[str, Any] = {"prompt_lookup_num_tokens": int(label.split("-")[1])}
        else:
            pair.draft.generation_config = _assisted_config(pair.draft, label, shipped)
            kw = {"assistant_model": pair.draft}
        with CallCounter(pair.draft, rounds=True) as dc, CallCounter(pair.target) as tc:
            out = _hf_generate(pair.target, ids, max_new_tokens, eos, **kw)
        pair.draft.generation_config = copy.deepcopy(shipped)
        m.rounds.extend(dc.rounds or [])
        # candidates per round, from the target's inputs: the first call holds the prompt
        cand = sum(n - (len(ids) if i == 0 else 1) for i, n in enumerate(tc.lengths))
        m.counts.append((len(dc.lengths), len(tc.lengths), cand))
        return out

    m.run = run
    return m


def _engine_method(name: str, eng: SpeculativeEngine, g: int, max_new_tokens: int, group: str) -> Method:
    m = Method(name, lambda ids: [], group=group)

    def run(ids: list[int]) -> list[int]:
        r = eng.generate(ids, max_new_tokens, gamma=g)
        m.steps.extend((s.gamma, s.accepted) for s in r.steps)
        return r.tokens

    m.run = run
    return m


def _stock_method(pair, max_new_tokens: int) -> Method:
    def run(ids: list[int]) -> list[int]:
        with stock_kernels(pair.target, pair.draft):
            return _hf_generate(pair.target, ids, max_new_tokens, pair.eos_token_id)

    return Method("hf_target_stock", run, group="stock")


def build_methods(
    pair,
    fast_pair,
    max_new_tokens: int,
    gammas_engine: Sequence[int],
    gammas_hf: Sequence[int],
    prompt_lookup: Sequence[int] = PROMPT_LOOKUP,
    stock: bool = True,
    cache: str = "dynamic",
) -> list[Method]:
    """Every method of the test split (see the module docstring); ``cache``: the engine's KV cache."""
    eos = pair.eos_token_id
    shipped = copy.deepcopy(pair.draft.generation_config)
    eng = SpeculativeEngine(pair.target, pair.draft, eos_token_id=eos, cache=cache)
    ms = [
        Method("lean_target", lambda ids: lean_target_loop(pair.target, ids, max_new_tokens, eos)),
        Method("hf_target", lambda ids: _hf_generate(pair.target, ids, max_new_tokens, eos)),
    ]
    labels = [f"constant-{g}" for g in gammas_hf] + list(HF_EXTRA) + [f"prompt_lookup-{n}" for n in prompt_lookup]
    ms += [_hf_method(pair, label, max_new_tokens, shipped) for label in labels]
    ms += [_engine_method(f"engine:{g}", eng, g, max_new_tokens, "main") for g in gammas_engine]
    if fast_pair is not None:
        ms += _fast_methods(fast_pair, max_new_tokens, gammas_engine, validation=False, cache=cache)
    if stock:
        ms.append(_stock_method(pair, max_new_tokens))
    return ms


def _fast_methods(
    fast_pair, max_new_tokens: int, gammas: Sequence[int], validation: bool, cache: str = "dynamic"
) -> list[Method]:
    eos = fast_pair.eos_token_id
    eng = SpeculativeEngine(fast_pair.target, fast_pair.draft, eos_token_id=eos, cache=cache)
    ms = [_engine_method(f"engine_fast:{g}", eng, g, max_new_tokens, "fast") for g in gammas]
    if not validation:
        ms.insert(
            0,
            Method(
                "lean_target_fast", lambda ids: lean_target_loop(fast_pair.target, ids, max_new_tokens, eos), "fast"
            ),
        )
    return ms


# ---- running them ------------------------------------------------------------------------------


@dataclass
class Timings:
    """Per method: seconds per (repeat, prompt), and the tokens of each prompt (last repeat)."""

    seconds: dict[str, list[list[float]]]
    tokens: dict[str, list[list[int]]]
    changed: set[str] = field(default_factory=set)  # methods whose output changed between repeats


def run_interleaved(
    methods: Sequence[Method],
    encoded: Sequence[list[int]],
    repeats: int,
    seed: int = 0,
    progress: bool = False,
    desc: str = "bench engine",
) -> Timings:
    """Every method on every prompt, ``repeats`` times: per repeat and prompt all methods back
    to back in a fresh random order (round-robin), so drift of the machine hits all alike."""
    from tqdm import tqdm

    rng = random.Random(seed)
    dev_sync = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    tm = Timings(
        seconds={m.name: [[0.0] * len(encoded) for _ in range(repeats)] for m in methods},
        tokens={m.name: [[] for _ in encoded] for m in methods},
    )
    bar = tqdm(total=repeats * len(encoded) * len(methods), desc=desc, unit="run", disable=not progress)
    for r in range(repeats):
        for i, ids in enumerate(encoded):
            order = list(methods)
            rng.shuffle(order)
            for m in order:
                _sync(dev_sync)
                t0 = time.perf_counter()
                with torch.inference_mode():
                    out = m.run(ids)
                _sync(dev_sync)
                tm.seconds[m.name][r][i] = time.perf_counter() - t0
                if r and out != tm.tokens[m.name][i]:
                    tm.changed.add(m.name)
                tm.tokens[m.name][i] = out
                bar.update(1)
    bar.close()
    return tm


def summarize(tm: Timings, name: str) -> dict[str, Any]:
    """Tokens/s of one method: per repeat (all prompts' tokens over their summed seconds), the
    median over repeats and the spread."""
    n_tok = sum(len(t) for t in tm.tokens[name])
    per = [n_tok / sum(secs) if sum(secs) > 0 else 0.0 for secs in tm.seconds[name]]
    xs = sorted(per)
    q = statistics.quantiles(xs, n=4, method="inclusive") if len(xs) > 1 else [xs[0]] * 3
    return {"median": statistics.median(xs), "min": xs[0], "max": xs[-1], "q1": q[0], "q3": q[2], "per_repeat": per}


def paired_ratio(tm: Timings, a: str, b: str) -> dict[str, Any]:
    """tps(a) / tps(b) per repeat (the same repeat's runs, interleaved): median and range."""
    ra, rb = summarize(tm, a)["per_repeat"], summarize(tm, b)["per_repeat"]
    per = [x / y if y else 0.0 for x, y in zip(ra, rb, strict=True)]
    return {"median": statistics.median(per), "min": min(per), "max": max(per), "per_repeat": per}


def select_gamma(tps_by_gamma: dict[str, float]) -> int:
    """The gamma with the highest tokens/s (the smallest on a tie)."""
    return int(max(sorted(tps_by_gamma, key=int), key=lambda g: tps_by_gamma[g]))


def _engine_stats(methods: Sequence[Method], prefix: str) -> tuple[dict[str, Any], dict[str, Any]]:
    acc: dict[str, Any] = {}
    tps_step: dict[str, Any] = {}
    for m in methods:
        if m.name.startswith(prefix + ":"):
            g = m.name.split(":")[1]
            drafted = sum(a for a, _ in m.steps)
            acc[g] = (sum(k for _, k in m.steps) / drafted) if drafted else None
            tps_step[g] = sum(k + 1 for _, k in m.steps) / max(len(m.steps), 1)
    return acc, tps_step


def _hf_counts(methods: Sequence[Method]) -> dict[str, dict[str, float | None]]:
    """Per HF label: ``observed`` draft forward calls per round over all rounds (for prompt
    lookup, which has no draft, the candidates per round), ``candidates`` drafted tokens per
    round (from the target's inputs), and ``unclipped`` draft forwards per round over the
    rounds where HF asked the draft for its full number of tokens (near the end of the budget
    HF asks for fewer: ``min(num_assistant_tokens, max_length - length - 1)``)."""
    out: dict[str, dict[str, float | None]] = {"observed": {}, "candidates": {}, "unclipped": {}}
    for m in methods:
        if m.name.startswith("hf:") and m.counts:
            label = m.name[3:]
            d, t, c = (sum(x[i] for x in m.counts) for i in range(3))
            lookup = label.startswith("prompt_lookup-")
            out["observed"][label] = (c if lookup else d) / t if t else None
            out["candidates"][label] = c / t if t else None
            full = max((req for req, _ in m.rounds), default=0)
            drafted = [n for req, n in m.rounds if req == full]
            out["unclipped"][label] = statistics.mean(drafted) if drafted else None
    return out


def _mismatches(tm: Timings, names: Sequence[str], reference: str) -> list[str]:
    return [n for n in names if n != reference and tm.tokens[n] != tm.tokens[reference]]


def _tps(tm: Timings, prefix: str) -> dict[str, float]:
    return {n.split(":", 1)[1]: summarize(tm, n)["median"] for n in tm.seconds if n.startswith(prefix + ":")}


def run_engine_bench(
    pair,
    prompts: Sequence[Any] | None = None,
    max_new_tokens: int = 64,
    gammas_engine: Sequence[int] = range(9),
    gammas_hf: Sequence[int] = range(1, 9),
    repeats: int = 3,
    progress: bool = True,
    fast_pair: Any = None,
    val_prompts: Sequence[Any] | None = None,
    prompt_lookup: Sequence[int] = PROMPT_LOOKUP,
    seed: int = 0,
    stock: bool | None = None,
    val_repeats: int | None = None,
    cache: str = "dynamic",
) -> dict[str, Any]:
    """Run the comparison; returns the JSON-able result (see the module docstring).

    ``prompts`` are reported (default: one test prompt per task), ``val_prompts`` choose the
    engine's gamma (default: one validation prompt per task); ``fast_pair`` (an ``exact=False``
    pair of the same models) adds the fast engine; ``stock`` (default: when the pair's kernels
    are not PyTorch's own) adds ``hf_target_stock``; ``val_repeats`` (default ``repeats``) repeats
    the validation runs; ``cache`` is the engines' KV cache ("dynamic" or "static")."""
    prompts = list(prompts) if prompts is not None else bench_prompts()
    val_prompts = list(val_prompts) if val_prompts is not None else bench_prompts(split="validation")
    if {p.id for p in prompts} & {p.id for p in val_prompts}:
        raise ValueError("the validation prompts that choose the engine's gamma must not be reported on")
    encoded = [pair.encode_chat(p.text) for p in prompts]
    val_encoded = [pair.encode_chat(p.text) for p in val_prompts]
    if stock is None:
        stock = bool(getattr(pair, "exact", False) or getattr(pair, "cpu_kernels", False))
    # warm-up: every code path once, short
    warm = build_methods(pair, fast_pair, 4, sorted(set(gammas_engine)), gammas_hf, prompt_lookup, stock, cache)
    run_interleaved(warm, val_encoded[:1], 1, seed=seed)
    # 1. the engine's gamma, chosen on the validation prompts only
    eng = SpeculativeEngine(pair.target, pair.draft, eos_token_id=pair.eos_token_id, cache=cache)
    val_methods = [_engine_method(f"engine:{g}", eng, g, max_new_tokens, "main") for g in gammas_engine]
    if fast_pair is not None:
        val_methods += _fast_methods(fast_pair, max_new_tokens, gammas_engine, validation=True, cache=cache)
    val_repeats = repeats if val_repeats is None else val_repeats
    val = run_interleaved(
        val_methods, val_encoded, val_repeats, seed=seed + 1, progress=progress, desc="bench (validation)"
    )
    # 2. every method on the test prompts
    methods = build_methods(pair, fast_pair, max_new_tokens, gammas_engine, gammas_hf, prompt_lookup, stock, cache)
    test = run_interleaved(methods, encoded, repeats, seed=seed + 2, progress=progress, desc="bench (test)")
    r = _results(pair, fast_pair, methods, test, val)
    r.update(
        prompts=[p.id for p in prompts],
        validation_prompts=[p.id for p in val_prompts],
        max_new_tokens=max_new_tokens,
        tokens_per_config=sum(len(o) for o in test.tokens["lean_target"]),
        repeats=repeats,
        val_repeats=val_repeats,
        seed=seed,
        cache=cache,
        target=pair.target_name,
        draft=pair.draft_name,
        compression=pair.compression,
        device=str(pair.device),
        machine=machine_info(),
    )
    return r


def _results(pair, fast_pair, methods: Sequence[Method], test: Timings, val: Timings) -> dict[str, Any]:
    """The JSON document from the test and validation timings."""
    names = [m.name for m in methods]
    hf = {n[3:]: summarize(test, n)["median"] for n in names if n.startswith("hf:")}
    counts = _hf_counts(methods)
    r: dict[str, Any] = {
        "hf_target_tps": summarize(test, "hf_target")["median"],
        "lean_target_tps": summarize(test, "lean_target")["median"],
        "hf_assisted_tps": hf,
        "hf_assisted_observed_gamma": counts["observed"],
        "hf_assisted_observed_gamma_unclipped": counts["unclipped"],
        "hf_assisted_candidates_per_round": counts["candidates"],
        "engine_tps": _tps(test, "engine"),
        "engine_validation_tps": _tps(val, "engine"),
    }
    r["engine_heldout_gamma"] = g = select_gamma(r["engine_validation_tps"])
    r["engine_heldout_tps"] = r["engine_tps"][str(g)]
    r["acceptance"], r["engine_tokens_per_step"] = _engine_stats(methods, "engine")
    best_hf = max(hf, key=lambda k: hf[k])
    best_g = select_gamma(r["engine_tps"])
    r.update(
        best_hf_setting=best_hf,
        best_hf_tps=hf[best_hf],
        engine_heldout_vs_lean=paired_ratio(test, f"engine:{g}", "lean_target"),
        engine_heldout_vs_hf_target=paired_ratio(test, f"engine:{g}", "hf_target"),
        engine_heldout_vs_best_hf=paired_ratio(test, f"engine:{g}", f"hf:{best_hf}"),
        best_engine_gamma=best_g,
        best_engine_tps=r["engine_tps"][str(best_g)],
        best_engine_note="in-sample best on the reported prompts, for reference; the figure is engine_heldout_*",
        engine_vs_best_hf=r["engine_heldout_tps"] / hf[best_hf],
        engine_speedup_vs_target=r["engine_heldout_tps"] / r["hf_target_tps"],
        exact=bool(getattr(pair, "exact", False)),
        kernels=getattr(pair, "kernels", "stock"),
        cpu_kernels=bool(getattr(pair, "cpu_kernels", False)),
        cpu_linear_plans=_plans_text(pair),
        spread={n: summarize(test, n) for n in names},
        validation_spread={n: summarize(val, n) for n in val.seconds},
    )
    main = [m.name for m in methods if m.group == "main"]
    r["output_mismatches"] = _mismatches(test, main, "lean_target")
    r["outputs_identical"] = not r["output_mismatches"]
    r["outputs_expected_identical"] = r["exact"]
    r["nondeterministic_methods"] = sorted(test.changed | val.changed)
    if "hf_target_stock" in names:
        r["hf_target_stock_tps"] = summarize(test, "hf_target_stock")["median"]
        r["engine_speedup_vs_stock_target"] = r["best_engine_tps"] / r["hf_target_stock_tps"]
        r["engine_heldout_vs_stock_target"] = paired_ratio(test, f"engine:{g}", "hf_target_stock")
        r["stock_output_matches"] = test.tokens["hf_target_stock"] == test.tokens["lean_target"]
    if fast_pair is not None:
        r.update(_fast_results(fast_pair, methods, test, val))
    r.update(_latency(pair, test))
    return r


def _fast_results(fast_pair, methods: Sequence[Method], test: Timings, val: Timings) -> dict[str, Any]:
    out: dict[str, Any] = {
        "engine_fast_tps": _tps(test, "engine_fast"),
        "engine_fast_validation_tps": _tps(val, "engine_fast"),
    }
    g = select_gamma(out["engine_fast_validation_tps"])
    out.update(
        engine_fast_heldout_gamma=g,
        engine_fast_heldout_tps=out["engine_fast_tps"][str(g)],
        lean_target_fast_tps=summarize(test, "lean_target_fast")["median"],
        engine_fast_heldout_vs_lean_fast=paired_ratio(test, f"engine_fast:{g}", "lean_target_fast"),
        engine_fast_exact=bool(getattr(fast_pair, "exact", False)),
        engine_fast_kernels=getattr(fast_pair, "kernels", "stock"),
        fast_output_mismatches=_mismatches(test, [m.name for m in methods if m.group == "fast"], "lean_target_fast"),
        fast_note="not row-invariant: the fast path's outputs may differ from the target's greedy text at near-ties",
    )
    out["fast_acceptance"], out["fast_tokens_per_step"] = _engine_stats(methods, "engine_fast")
    return out


def _latency(pair, test: Timings) -> dict[str, Any]:
    """One draft forward against one target forward (medians, KV cache, one token)."""
    from speckv_env.calibrate import measure_target_only

    ids = test.tokens["lean_target"][0][:8] or [1]
    t_target = measure_target_only(pair, ids, n_tokens=16)
    t_draft = _measure_draft_step(pair, ids)
    return {"latency_ratio": t_draft / t_target, "draft_step_s": t_draft, "target_step_s": t_target}


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


def _row(label: str, tps: float, spread: dict[str, Any] | None, extra: str = "") -> str:
    s = f"  [{spread['min']:.2f}, {spread['max']:.2f}]" if spread else ""
    return f"{label:<34}{tps:>10.2f}{s:<20}{extra}"


def format_engine_table(r: dict[str, Any]) -> str:
    sp = r.get("spread", {})
    lines = [
        f"target {r['target']} ({r['compression']}, kernels {r['kernels']}), draft {r['draft']}, device {r['device']}, "
        f"{len(r['prompts'])} test prompts x {r['max_new_tokens']} new tokens (greedy), "
        f"{r['repeats']} interleaved repeats",
        f"{'method':<34}{'tokens/s':>10}  {'[min, max] repeats':<18}notes",
        _row("lean target-only loop", r["lean_target_tps"], sp.get("lean_target")),
        _row("HF generate (target only)", r["hf_target_tps"], sp.get("hf_target")),
    ]
    if r.get("hf_target_stock_tps") is not None:
        lines.append(_row("  same, stock CPU kernels", r["hf_target_stock_tps"], sp.get("hf_target_stock")))
    for label, v in r["hf_assisted_tps"].items():
        og = r["hf_assisted_observed_gamma"].get(label)
        ou = r.get("hf_assisted_observed_gamma_unclipped", {}).get(label)
        note = "" if og is None else f"observed gamma {og:.2f}" + ("" if ou is None else f" ({ou:.2f} unclipped)")
        lines.append(_row(f"HF {label}", v, sp.get(f"hf:{label}"), note))
    for g, v in r["engine_tps"].items():
        a = r["acceptance"].get(g)
        note = f"tok/step {r['engine_tokens_per_step'][g]:.2f}" + ("" if a is None else f", accept {a:.3f}")
        lines.append(_row(f"this engine gamma={g}", v, sp.get(f"engine:{g}"), note))
    for g, v in r.get("engine_fast_tps", {}).items():
        lines.append(_row(f"fast engine (exact=False) gamma={g}", v, sp.get(f"engine_fast:{g}")))
    if "lean_target_fast_tps" in r:
        lines.append(_row("lean loop, fast-path kernels", r["lean_target_fast_tps"], sp.get("lean_target_fast")))
    g = r["engine_heldout_gamma"]
    lines.append(
        f"engine at its held-out gamma {g} (chosen on {len(r['validation_prompts'])} validation prompts): "
        f"{r['engine_heldout_tps']:.2f} tok/s = {r['engine_heldout_vs_lean']['median']:.3f}x the lean loop, "
        f"{r['engine_heldout_vs_best_hf']['median']:.3f}x HF's best ({r['best_hf_setting']}), "
        f"{r['engine_heldout_vs_hf_target']['median']:.3f}x HF target-only (medians of per-repeat ratios)"
    )
    if "engine_fast_heldout_gamma" in r:
        lines.append(
            f"fast engine at its held-out gamma {r['engine_fast_heldout_gamma']}: "
            f"{r['engine_fast_heldout_tps']:.2f} tok/s "
            f"= {r['engine_fast_heldout_vs_lean_fast']['median']:.3f}x the lean loop on its kernels"
        )
    lines.append(
        f"outputs identical across methods on these kernels: {r['outputs_identical']}"
        + (f" (differ: {', '.join(r['output_mismatches'])})" if r["output_mismatches"] else "")
        + ("" if r["outputs_expected_identical"] else " (not row-invariant kernels: not guaranteed)")
    )
    return "\n".join(lines)


def write_json(obj: Any, path: str | Path) -> None:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps(obj, indent=2, default=str))
