"""The ``speckv`` command line.

speckv generate   speculative decoding of one prompt; prints the text and its statistics
speckv profile    record full-information traces of a pair (tasks x compressions x prompts)
speckv train      train one gamma controller on recorded traces
speckv compare    train and compare every controller; report.md, results.json, plots
speckv bench      engine | env | agents: speed figures as JSON
speckv demo       the main job on the embedded default pair (compare + live check)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

DEFAULT_TRACES = "speckv_env/data/traces"


def _threads(n: int | None) -> None:
    import torch

    if n:
        torch.set_num_threads(n)


def _add_pair_args(p: argparse.ArgumentParser, compression_default: str = "fp32") -> None:
    p.add_argument(
        "--target", default=None, help="target model: hub id, folder or .gguf (default: embedded SmolLM2-135M-Instruct)"
    )
    p.add_argument(
        "--draft",
        default=None,
        help="draft model: hub id, folder or .gguf (default: the draft shipped for the default target)",
    )
    p.add_argument("--compression", default=compression_default, help="target compression: fp32, bf16, fp16, int8, nf4")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 or auto")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")


# ---- generate ---------------------------------------------------------------------------


def cmd_generate(a: argparse.Namespace) -> int:
    from speckv_env.engine import SpeculativeEngine
    from speckv_env.pair import load_pair

    _threads(a.threads)
    t0 = time.perf_counter()
    pair = load_pair(a.target, a.draft, compression=a.compression, device=a.device)
    load_s = time.perf_counter() - t0
    eng = SpeculativeEngine(
        pair.target, pair.draft, temperature=a.temperature, top_p=a.top_p, eos_token_id=pair.eos_token_id
    )
    ids = pair.encode_chat(a.prompt)
    if a.gamma == "auto":
        from speckv_env.calibrate import cached_calibration

        cm = cached_calibration(pair, progress=True)

        # online estimate of the acceptance rate, gamma maximising expected tokens/s
        hits, tests = [1.0], [2.0]

        def policy(i, sig):
            alpha = hits[0] / tests[0]
            return max(range(9), key=lambda g: cm.expected_tokens_per_second(alpha, g, eng.sampling))

        eng.start(ids, a.max_new_tokens, seed=a.seed)
        steps = []
        t1 = time.perf_counter()
        while not eng.done:
            r = eng.step(policy(len(steps), eng.observe()))
            hits[0] += sum(r.events)
            tests[0] += len(r.events)
            steps.append(r)
        wall = time.perf_counter() - t1
        tokens = list(eng.out)
        gamma_desc = "auto (cost-aware, online acceptance estimate)"
    else:
        g = int(a.gamma)
        res = eng.generate(ids, a.max_new_tokens, gamma=g, seed=a.seed)
        steps, tokens, wall = res.steps, res.tokens, res.wall_s
        gamma_desc = str(g)
    text = pair.tokenizer.decode(tokens, skip_special_tokens=True)
    drafted = sum(s.gamma for s in steps)
    acc = sum(s.accepted for s in steps)
    hist: dict[int, int] = {}
    for s in steps:
        hist[s.accepted] = hist.get(s.accepted, 0) + 1
    stats = {
        "target": pair.target_name,
        "draft": pair.draft_name,
        "compression": pair.compression,
        "device": str(pair.device),
        "gamma": gamma_desc,
        "temperature": a.temperature,
        "new_tokens": len(tokens),
        "steps": len(steps),
        "tokens_per_step": len(tokens) / max(len(steps), 1),
        "acceptance_rate": acc / drafted if drafted else None,
        "accepted_histogram": dict(sorted(hist.items())),
        "wall_s": wall,
        "tokens_per_s": len(tokens) / wall if wall else None,
        "draft_s": sum(s.draft_s for s in steps),
        "verify_s": sum(s.verify_s for s in steps),
        "load_s": load_s,
    }
    if a.json:
        print(json.dumps({"text": text, **stats}, indent=2))
    else:
        print(text)
        print("-" * 60)
        for k, v in stats.items():
            print(f"{k:>18}: {v:.4g}" if isinstance(v, float) else f"{k:>18}: {v}")
    return 0


# ---- profile --------------------------------------------------------------------------


def cmd_profile(a: argparse.Namespace) -> int:
    from .profile import profile

    _threads(a.threads)
    summary = profile(
        a.out,
        target=a.target,
        draft=a.draft,
        compressions=a.compressions.split(","),
        tasks=a.tasks.split(","),
        splits=a.splits.split(","),
        n_train=a.n_train,
        modes=a.modes.split(","),
        max_new_tokens=a.max_new_tokens,
        gamma_max=a.gamma_max,
        device=a.device,
        resume=a.resume,
        time_budget_s=a.time_budget,
        behaviour=a.behaviour,
        calibrate=not a.no_calibrate,
        per_task=a.per_task,
    )
    print(json.dumps(summary, indent=2))
    return 0


def cmd_calibrate(a: argparse.Namespace) -> int:
    from speckv_env.calibrate import calibrate
    from speckv_env.pair import load_pair

    _threads(a.threads)
    # calibration runs on a quiet machine: time the CPU row-count plans again too
    pair = load_pair(a.target, a.draft, compression=a.compression, device=a.device, retime_cpu_plans=True)
    cm = calibrate(pair, gamma_max=a.gamma_max, tokens_per_gamma=a.tokens_per_gamma, progress=True)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"cost-{cm.compression}.json"
    cm.save(path)
    print(json.dumps(cm.to_dict(), indent=2))
    print(f"wrote {path}")
    return 0


# ---- train / compare ----------------------------------------------------------------------


def _logs_arg(logs: str | None) -> str:
    if logs in (None, "default"):
        from replay.env import default_logs

        try:
            return str(default_logs())
        except FileNotFoundError as e:
            raise SystemExit(f"{e}; record traces with `speckv profile` and pass --logs FOLDER") from e
    return logs


def cmd_train(a: argparse.Namespace) -> int:
    from .compare import train_main

    _threads(a.threads or 1)
    train_main(a.agent, _logs_arg(a.logs), a.out, **_kv(a.set))
    return 0


def cmd_compare(a: argparse.Namespace) -> int:
    from .compare import compare_main

    _threads(a.threads or 1)
    if a.logs == "speckv-paper":
        compare_main(None, a.out, source="speckv-paper", quick=a.quick, **_kv(a.set))
    else:
        compare_main(_logs_arg(a.logs), a.out, quick=a.quick, **_kv(a.set))
    print(f"report: {Path(a.out) / 'report.md'}")
    return 0


def _kv(items: Sequence[str] | None) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for it in items or []:
        if "=" not in it:
            raise SystemExit(f"--set expects KEY=VALUE, got {it!r}")
        k, v = it.split("=", 1)
        try:
            out[k] = json.loads(v)
        except json.JSONDecodeError:
            out[k] = v
    return out


# ---- bench ------------------------------------------------------------------------------


def cmd_bench(a: argparse.Namespace) -> int:
    from .bench_engine import write_json

    if a.what == "engine":
        from speckv_env.pair import load_pair

        from .bench_engine import bench_prompts, format_engine_table, run_engine_bench

        _threads(a.threads)
        pair = load_pair(a.target, a.draft, compression=a.compression, device=a.device)
        r = run_engine_bench(
            pair, bench_prompts(a.prompts_per_task), max_new_tokens=a.max_new_tokens, repeats=a.repeats
        )
        print(format_engine_table(r))
    elif a.what == "env":
        from .bench_env import bench_env

        r = bench_env(None, seconds=a.seconds)
        if not a.skip_live:
            from .livebench import bench_live_overhead

            _threads(a.threads)
            r["live"] = bench_live_overhead(max_new_tokens=a.max_new_tokens)
        print(json.dumps(r, indent=2, default=str))
    elif a.what == "agents":
        from .bench_agents import bench_agents

        r = bench_agents(None)
        print(json.dumps(r, indent=2, default=str))
    else:  # pragma: no cover - argparse restricts choices
        raise SystemExit(f"unknown bench {a.what!r}")
    if a.json:
        write_json(r, a.json)
        print(f"wrote {a.json}")
    return 0


# ---- demo -----------------------------------------------------------------------------


def cmd_demo(a: argparse.Namespace) -> int:
    from .demo import run_demo

    return run_demo(out=a.out, quick=not a.full, live=not a.no_live, threads=a.threads)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="speckv", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = ap.add_subparsers(dest="cmd", required=True)

    g = sub.add_parser("generate", help="speculative decoding of one prompt")
    _add_pair_args(g)
    g.add_argument("--prompt", default="Write a Python function that checks whether a number is prime.")
    g.add_argument("--gamma", default="4", help="fixed gamma (0 = target only) or 'auto'")
    g.add_argument("--max-new-tokens", type=int, default=128)
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--json", action="store_true", help="print JSON")
    g.set_defaults(fn=cmd_generate)

    p = sub.add_parser("profile", help="record full-information traces")
    _add_pair_args(p)
    p.add_argument("--out", required=True)
    p.add_argument("--compressions", default="fp32,int8,nf4")
    p.add_argument("--tasks", default="chat,code,math,summarization")
    p.add_argument("--splits", default="test,validation,train")
    p.add_argument("--n-train", type=int, default=40, help="training prompts per task")
    p.add_argument("--per-task", type=int, default=None, help="cap on prompts per task in every split")
    p.add_argument("--modes", default="greedy,sample", help="greedy and/or sample (temperature 0.7)")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--gamma-max", type=int, default=8)
    p.add_argument("--resume", action="store_true", help="continue an interrupted recording")
    p.add_argument("--time-budget", type=float, default=None, help="stop cleanly after this many seconds")
    p.add_argument(
        "--behaviour",
        default="uniform",
        help="gamma policy of the recorded path: uniform (0..gamma-max), uniform:A-B or fixed:G",
    )
    p.add_argument(
        "--no-calibrate",
        action="store_true",
        help="do not measure the cost model here (write it later with `speckv calibrate --out` on a quiet machine)",
    )
    p.set_defaults(fn=cmd_profile)

    cal = sub.add_parser("calibrate", help="measure a pair's cost model (draft/verify/target step times)")
    _add_pair_args(cal)
    cal.add_argument("--out", required=True, help="folder: writes cost-<compression>.json (beside traces)")
    cal.add_argument("--gamma-max", type=int, default=8)
    cal.add_argument("--tokens-per-gamma", type=int, default=24)
    cal.set_defaults(fn=cmd_calibrate)

    t = sub.add_parser("train", help="train one controller on traces")
    t.add_argument("agent")
    t.add_argument("--logs", default="default")
    t.add_argument("--out", required=True)
    t.add_argument("--set", nargs="*", help="KEY=VALUE options (JSON values)")
    t.add_argument("--threads", type=int, default=None)
    t.set_defaults(fn=cmd_train)

    c = sub.add_parser("compare", help="train and compare controllers")
    c.add_argument("--logs", default="default", help="trace folder, 'default' (shipped) or 'speckv-paper'")
    c.add_argument("--out", required=True)
    c.add_argument("--quick", action="store_true")
    c.add_argument("--set", nargs="*", help="KEY=VALUE options (JSON values)")
    c.add_argument("--threads", type=int, default=None)
    c.set_defaults(fn=cmd_compare)

    b = sub.add_parser("bench", help="speed benchmarks (JSON)")
    b.add_argument("what", choices=["engine", "env", "agents"])
    _add_pair_args(b)
    b.add_argument("--json", default=None, help="write the results here")
    b.add_argument("--max-new-tokens", type=int, default=64)
    b.add_argument("--prompts-per-task", type=int, default=1)
    b.add_argument("--repeats", type=int, default=1)
    b.add_argument("--seconds", type=float, default=2.0, help="env bench: seconds per measurement")
    b.add_argument("--skip-live", action="store_true", help="env bench: skip the live-env overhead part")
    b.set_defaults(fn=cmd_bench)

    d = sub.add_parser("demo", help="the main job on the embedded default")
    d.add_argument("--out", default="out/demo")
    d.add_argument("--full", action="store_true", help="full comparison instead of the quick one")
    d.add_argument("--no-live", action="store_true", help="skip the live check")
    d.add_argument("--threads", type=int, default=None)
    d.set_defaults(fn=cmd_demo)
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    a = build_parser().parse_args(argv)
    if a.cmd == "profile":
        # recordings run as parallel processes: idle OpenMP threads sleep instead of spinning,
        # or one process's spinning threads starve the others (measured: batched generation
        # 6.5 -> 64 tok/s). A single decoding process is faster with the runtime's default
        # (spin-then-sleep): multi-token verification, 4 prompts x 64 tokens, same run,
        # default vs PASSIVE: target-only 16.66 vs 14.99 tok/s, engine gamma 4 18.45 vs 14.66.
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    try:
        return int(a.fn(a) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError, FileExistsError, RuntimeError, OSError) as e:
        # bad input (models, compression, logs, agent files): one clear line, no traceback
        # (set SPECKV_DEBUG=1 for the traceback)
        if os.environ.get("SPECKV_DEBUG"):
            raise
        print(f"speckv {a.cmd}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
