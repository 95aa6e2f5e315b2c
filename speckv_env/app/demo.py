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
import time
from pathlib import Path


def _print_head_of_report(report: Path, max_lines: int = 40) -> None:
    lines = report.read_text().splitlines()
    out, in_table, tables = [], False, 0
    for ln in lines:
        if ln.startswith("|"):
            in_table = True
            out.append(ln)
        elif in_table:
            tables += 1
            in_table = False
            if tables >= 1:
                break
        elif ln.startswith("#") or ln.strip().startswith("**"):
            out.append(ln)
    print("\n".join(out[:max_lines]))


def run_demo(out: str = "out/demo", quick: bool = True, live: bool = True, threads: int | None = None) -> int:
    import torch

    from replay.env import default_logs
    from speckv_env.models import default_target_path

    from .compare import compare_main

    t0 = time.time()
    outp = Path(out)
    outp.mkdir(parents=True, exist_ok=True)
    try:
        traces = default_logs()
    except FileNotFoundError as e:
        raise SystemExit(str(e)) from e
    torch.set_num_threads(threads or 1)
    print(f"[demo] 1/2 comparing controllers on the shipped traces ({traces})", flush=True)
    compare_main(str(traces), str(outp / "compare"), quick=quick)
    report = outp / "compare" / "report.md"
    if live:
        from .livecheck import format_live_check, live_check

        # the cost models were calibrated with 2 threads: measure under the same setting
        torch.set_num_threads(threads or 2)
        print("[demo] 2/2 live check on the real models (held-out prompts)", flush=True)
        default_target_path()
        r = live_check(traces, prompts_per_task=1, train_steps=10_000)
        (outp / "live_check.json").write_text(json.dumps(r, indent=2, default=str))
        txt = format_live_check(r)
        with report.open("a") as f:
            f.write("\n\n## Live check\n\n```\n" + txt + "\n```\n")
            bad = [row["policy"] for row in r["rows"] if not row["agree"]]
            if bad:
                f.write(
                    "\nMeasured and predicted intervals do not overlap for: " + ", ".join(bad) + ". "
                    "The cost model is calibrated once per (pair, compression, device); measured times move with "
                    "machine load (other processes on the 2 cores), which shifts every policy alike.\n"
                )
    print()
    _print_head_of_report(report)
    if live:
        print()
        print(txt)
    print(f"\n[demo] done in {time.time() - t0:.0f} s: report {report}, plots in {outp / 'compare'}")
    return 0
