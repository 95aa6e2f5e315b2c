"""`speckv demo`: the main job on the embedded default pair.

1. Train and compare every gamma controller on the shipped profiling traces of the default
   pair (SmolLM2-135M-Instruct target, shipped draft; fp32/int8/nf4; greedy and T = 0.7),
   held out by prompt: writes report.md, results.json and plots.
2. This host's cost models (fp32 and nf4, the kernels the engine runs): calibrated here with
   the demo's quick budget (:data:`DEMO_CALIBRATION`: 3 interleaved rounds x 12 tokens per
   point, minutes on a 2-core CPU, against 5 x 24 for the full one), or reused from the cache
   of this host and these kernels (a full calibration of this host first, when there is one).
   The demo says which it used.
3. Live check (:mod:`.livecheck`): the best fixed gamma, the HF heuristic and learned
   controllers run on the real models on held-out prompts, interleaved ABBA per prompt;
   measured tokens/s beside the replay's prediction under the host's cost model, and the
   paired per-prompt differences between policies, measured against predicted. The quick demo
   uses 4 prompts per compression and says so; ``--full`` uses 16.
4. Prints the table.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

log = logging.getLogger("speckv.demo")


def report_head(report: Path, max_lines: int = 40) -> str:
    """The report's headings and its first table."""
    out, in_table = [], False
    for ln in report.read_text().splitlines():
        if ln.startswith("|"):
            in_table = True
            out.append(ln)
        elif in_table:
            break
        elif ln.startswith("#") or ln.strip().startswith("**"):
            out.append(ln)
    return "\n".join(out[:max_lines])


#: the live check's held-out prompts per task: the quick demo, the full run
LIVE_PROMPTS_PER_TASK = {True: 1, False: 4}
LIVE_COMPRESSIONS = ("fp32", "nf4")
#: the demo's calibration budget (:data:`speckv_env.calibrate.BUDGETS`): quick, so that a first
#: run on a new host calibrates in minutes; a full calibration of this host is used when cached
DEMO_CALIBRATION = "quick"


def calibration_note(cms: dict[str, Any]) -> str:
    """Which budget each host cost model was measured with, and where the full one comes from."""
    from speckv_env.calibrate import FULL, QUICK, calibration_budget
    from speckv_env.core import CostModel

    got = {comp: calibration_budget(cm) for comp, cm in cms.items() if isinstance(cm, CostModel)}
    if not got:
        return ""
    text = "cost models: this host's own calibration, " + ", ".join(
        f"{comp} {b or 'below the quick budget'}" for comp, b in got.items()
    )
    if any(b != "full" for b in got.values()):
        text += (
            f"\n(quick calibration: {QUICK.describe()}, noisier than the full one, {FULL.describe()}. "
            "The full one is what `speckv calibrate` measures and what the cost models shipped beside the "
            "traces come from; the demo uses it instead once this host has one cached: the first "
            '`gym.make("SpecKV-v0")` without a cost model, or `speckv generate --gamma auto`, at the same '
            "thread count measures and caches it)"
        )
    return text


def _calibration_summary(cms: dict[str, Any]) -> dict[str, Any]:
    """Per compression: the budget its host cost model was measured with, rounds, tokens, when."""
    from speckv_env.calibrate import calibration_budget
    from speckv_env.core import CostModel

    return {
        comp: {
            "budget": calibration_budget(cm),
            "repeats": cm.meta.get("repeats"),
            "tokens_per_gamma": cm.meta.get("tokens_per_gamma"),
            "measured_at": cm.meta.get("measured_at"),
        }
        for comp, cm in cms.items()
        if isinstance(cm, CostModel)
    }


def _calibrate_host(
    progress: bool, budget: str = DEMO_CALIBRATION
) -> tuple[dict[str, Any], dict[str, Any], dict[str, str]]:
    """Load the default pair per compression and take this host's own cost model for it (the
    cached calibration of this host and these kernels, or a new one measured with ``budget``):
    the live check predicts under it, not under the model shipped beside the traces."""
    from speckv_env.calibrate import BUDGETS, cached_calibration, cached_calibration_exists, calibration_budget
    from speckv_env.models import ModelLoadError, default_target_path
    from speckv_env.pair import load_pair

    default_target_path()
    pairs: dict[str, Any] = {}
    cms: dict[str, Any] = {}
    skipped: dict[str, str] = {}
    for comp in LIVE_COMPRESSIONS:
        try:
            pairs[comp] = load_pair(None, None, compression=comp, device="cpu")
        except (ModelLoadError, ImportError, RuntimeError) as e:
            skipped[comp] = str(e)
            continue
        if not cached_calibration_exists(pairs[comp], budget=budget):
            log.info(
                f"[demo]   {comp} ({pairs[comp].kernels}): measuring this host's {budget} calibration "
                f"({BUDGETS[budget].describe()})"
            )
        cms[comp] = cached_calibration(pairs[comp], progress=progress, budget=budget)
        log.info(f"[demo]   {comp}: this host's {calibration_budget(cms[comp])} calibration")
    return pairs, cms, skipped


def _live_part(
    outp: Path, traces: Path, report: Path, threads: int | None, quick: bool, progress: bool
) -> dict[str, Any]:
    import torch

    from .livecheck import disagreements, format_live_check, live_check

    # one thread count for the calibration and the live runs (the calibration cache is keyed by it)
    torch.set_num_threads(threads or 2)
    log.info(
        f"[demo] 2/3 the host's cost models (this host's cached calibration, or a {DEMO_CALIBRATION} one "
        "measured now; the full one is `speckv calibrate`'s)"
    )
    pairs, cms, skipped = _calibrate_host(progress)
    per_task = LIVE_PROMPTS_PER_TASK[quick]
    log.info(f"[demo] 3/3 live check on the real models ({4 * per_task} held-out prompts per compression, ABBA)")
    r = live_check(
        traces,
        compressions=list(pairs),
        prompts_per_task=per_task,
        train_steps=10_000 if quick else 20_000,
        pairs=pairs,
        cost_models=cms,
        progress=progress,
    )
    r["skipped"].update(skipped)
    r["quick"] = quick
    r["calibration"] = _calibration_summary(cms)
    path = outp / "live_check.json"
    path.write_text(json.dumps(r, indent=2, default=str))
    note = calibration_note(cms)
    txt = format_live_check(r) + (f"\n{note}" if note else "")
    if quick:
        txt += (
            f"\n(quick demo: {4 * per_task} held-out prompts per compression; "
            f"`speckv demo --full` runs {4 * LIVE_PROMPTS_PER_TASK[False]})"
        )
    bad = disagreements(r)
    with report.open("a") as f:
        f.write("\n\n## Live check\n\n```\n" + txt + "\n```\n")
        if bad:
            f.write(
                "\nPrediction and measurement disagree for: " + ", ".join(bad) + ". Predictions use this host's "
                "own cost model; measured times still move with machine load (other processes on the cores).\n"
            )
    return {"live_check": str(path), "live_disagree": bad, "live_text": txt}


def run_demo(
    out: str = "out/demo", quick: bool = True, live: bool = True, threads: int | None = None, progress: bool = True
) -> dict[str, Any]:
    """Run the demo; progress goes to the ``speckv.demo`` logger. Returns a summary: the paths
    written (``out``, ``report``, ``plots``, ``live_check``), the live-check results that
    disagree with the prediction, the live check's table (``live_text``) and ``runtime_s``."""
    import torch

    from replay.env import default_logs

    from .compare import compare_main

    t0 = time.time()
    outp = Path(out)
    traces = default_logs()  # FileNotFoundError (with what to do) when no traces are shipped
    outp.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(threads or 1)
    log.info(f"[demo] 1/3 comparing controllers on the shipped traces ({traces})")
    compare_main(str(traces), str(outp / "compare"), quick=quick, progress=progress)
    report = outp / "compare" / "report.md"
    summary: dict[str, Any] = {
        "out": str(outp),
        "report": str(report),
        "plots": str(outp / "compare"),
        "live_check": None,
        "live_disagree": None,
        "live_text": None,
    }
    if live:
        summary.update(_live_part(outp, traces, report, threads, quick, progress))
    summary["runtime_s"] = time.time() - t0
    return summary


def format_demo(summary: dict[str, Any]) -> str:
    """What ``speckv demo`` prints: the report's head, the live check, where everything is."""
    parts = [report_head(Path(summary["report"]))]
    if summary.get("live_text"):
        parts.append(summary["live_text"])
    parts.append(
        f"[demo] done in {summary['runtime_s']:.0f} s: report {summary['report']}, plots in {summary['plots']}"
    )
    return "\n\n".join(parts)
