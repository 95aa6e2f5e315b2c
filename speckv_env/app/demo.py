"""`speckv demo`: the main job on the embedded default pair.

1. Train and compare every gamma controller on the shipped profiling traces of the default
   pair (SmolLM2-135M-Instruct target, shipped draft; fp32/int8/nf4; greedy and T = 0.7),
   held out by prompt: writes report.md, results.json and plots.
2. Live check: the best fixed gamma, the HF heuristic and learned controllers run on the real
   models on held-out prompts; measured tokens/s beside the replay's prediction.
3. Prints the table.
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


def _live_part(outp: Path, traces: Path, report: Path, threads: int | None, progress: bool) -> dict[str, Any]:
    import torch

    from speckv_env.models import default_target_path

    from .livecheck import format_live_check, live_check

    # the cost models were calibrated with 2 threads: measure under the same setting
    torch.set_num_threads(threads or 2)
    log.info("[demo] 2/2 live check on the real models (held-out prompts)")
    default_target_path()
    r = live_check(traces, prompts_per_task=1, train_steps=10_000, progress=progress)
    path = outp / "live_check.json"
    path.write_text(json.dumps(r, indent=2, default=str))
    txt = format_live_check(r)
    bad = [row["policy"] for row in r["rows"] if not row["agree"]]
    with report.open("a") as f:
        f.write("\n\n## Live check\n\n```\n" + txt + "\n```\n")
        if bad:
            f.write(
                "\nMeasured and predicted intervals do not overlap for: " + ", ".join(bad) + ". "
                "The cost model is calibrated once per (pair, compression, device); measured times move with "
                "machine load (other processes on the 2 cores), which shifts every policy alike.\n"
            )
    return {"live_check": str(path), "live_disagree": bad, "live_text": txt}


def run_demo(
    out: str = "out/demo", quick: bool = True, live: bool = True, threads: int | None = None, progress: bool = True
) -> dict[str, Any]:
    """Run the demo; progress goes to the ``speckv.demo`` logger. Returns a summary: the paths
    written (``out``, ``report``, ``plots``, ``live_check``), the live-check policies whose
    intervals disagree, the live check's table (``live_text``) and ``runtime_s``."""
    import torch

    from replay.env import default_logs

    from .compare import compare_main

    t0 = time.time()
    outp = Path(out)
    traces = default_logs()  # FileNotFoundError (with what to do) when no traces are shipped
    outp.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(threads or 1)
    log.info(f"[demo] 1/2 comparing controllers on the shipped traces ({traces})")
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
        summary.update(_live_part(outp, traces, report, threads, progress))
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
