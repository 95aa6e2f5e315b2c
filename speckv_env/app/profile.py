"""`speckv profile`: record full-information traces of a pair over tasks x compressions x prompts.

Each episode is decoded once by the engine with a behaviour policy (default: gamma drawn
uniformly from 0..gamma_max, seeded per episode, so the recorded path's measured times cover
every gamma). Because the emitted sequence does not depend on gamma, the engine's per-position
record (whether the draft's proposal at every position would be accepted, and the draft's
signals there) answers every other policy exactly: see replay/SCHEMA.md.

Crash-safe: each finished episode is its own Parquet part file, written atomically;
``resume=True`` skips the episodes already on disk (no duplicates, no gaps), and refuses to
continue a recording made with other settings (budget, ``gamma_max``, sampling, pair, device,
draft weights): the traces of one folder answer one question.
"""

from __future__ import annotations

import hashlib
import random
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from speckv_env.core import GAMMA_MAX

MODES = {"greedy": 0.0, "sample": 0.7}


def episode_seed(prompt_id: str, mode: str) -> int:
    return int.from_bytes(hashlib.sha1(f"{prompt_id}|{mode}".encode()).digest()[:4], "little") & 0x7FFFFFFF


def parse_behaviour(spec: str, gamma_max: int) -> tuple[int, int]:
    """'uniform' (0..gamma_max), 'uniform:A-B' or 'fixed:G' -> inclusive gamma range."""
    try:
        if spec == "uniform":
            return 0, gamma_max
        kind, arg = spec.split(":", 1)
        if kind == "fixed":
            lo = hi = int(arg)
        elif kind == "uniform":
            lo, hi = (int(x) for x in arg.split("-", 1))
        else:
            raise ValueError
    except ValueError:
        raise ValueError(f"behaviour policy {spec!r}: expected 'uniform', 'uniform:A-B' or 'fixed:G'") from None
    if not 0 <= lo <= hi <= gamma_max:
        raise ValueError(f"behaviour policy {spec!r}: gammas must lie in 0..{gamma_max}")
    return lo, hi


#: the traces' columns that say how they were recorded (read on --resume)
SETTING_COLUMNS = ["max_new_tokens", "gamma_max", "mode", "temperature", "top_p", "pair", "device", "meta"]


def recorded_settings(folder: str | Path) -> dict[str, set]:
    """How the traces already in ``folder`` were recorded: every value seen of the budget,
    ``gamma_max``, (temperature, top_p) per mode, pair, device and draft fingerprint."""
    from replay.trace import read_table_checked

    return settings_of_tables(
        read_table_checked(f, columns=SETTING_COLUMNS) for f in sorted(Path(folder).glob("*.parquet"))
    )


def settings_of_tables(tables: Iterable[Any]) -> dict[str, set]:
    """:func:`recorded_settings` of Arrow tables holding (at least) :data:`SETTING_COLUMNS`,
    wherever they were read from (a folder, or a storage URI: :mod:`.distributed`)."""
    import json

    seen: dict[str, set] = {
        k: set() for k in ("max_new_tokens", "gamma_max", "pair", "device", "draft_fingerprint", "kernels")
    }
    for table in tables:
        t = table.to_pydict()
        for k in ("max_new_tokens", "gamma_max", "pair", "device"):
            seen[k].update(t[k])
        for mode, temp, top_p in zip(t["mode"], t["temperature"], t["top_p"]):
            # greedy decoding ignores temperature and top_p (older traces store 1.0 there)
            seen.setdefault(f"sampling[{mode}]", set()).add(None if mode == "greedy" else (temp, top_p))
        for m in t["meta"]:
            try:
                meta = json.loads(m) if m else {}
            except ValueError:
                meta = {}
            meta = meta if isinstance(meta, dict) else {}
            seen["draft_fingerprint"].add(meta.get("draft_fingerprint"))
            # traces from before exactness was recorded were made with stock or row-count-plan kernels
            seen["kernels"].add(meta.get("kernels", "inexact (not recorded)"))
    return seen


def _refuse(folder: Path, what: str, had: set, want: Any, hint: str) -> None:
    had_s = ", ".join(sorted(map(str, had)))
    raise ValueError(
        f"{folder}: the traces there were recorded with {what} {had_s}, this run asks for {want}: "
        f"resuming would mix recordings; {hint}, or record into another folder"
    )


def check_resume(
    folder: str | Path, *, max_new_tokens: int, gamma_max: int, modes: Sequence[str], seen: dict[str, set] | None = None
) -> dict[str, set]:
    """Refuse (ValueError naming the folder and the setting) to resume a recording whose traces
    were made with another budget, ``gamma_max`` or sampling settings. Returns the settings seen."""
    folder = Path(folder)
    seen = recorded_settings(folder) if seen is None else seen
    for what, want, flag in (
        ("max_new_tokens", max_new_tokens, "--max-new-tokens"),
        ("gamma_max", gamma_max, "--gamma-max"),
    ):
        if seen[what] and seen[what] != {want}:
            _refuse(folder, what, seen[what], want, f"pass {flag} {min(seen[what])}")
    for mode in modes:
        had = seen.get(f"sampling[{mode}]")
        sampling = None if mode == "greedy" else (MODES[mode], 1.0)
        if had and had != {sampling}:
            _refuse(
                folder, f"(temperature, top_p) in mode {mode}", had, sampling, "this version records other settings"
            )
    return seen


def check_resume_pair(folder: str | Path, seen: dict[str, set], pair: Any) -> None:
    """Refuse to resume with another pair, device or draft (weights) than the folder's traces."""
    folder = Path(folder)
    for what, want in (("pair", pair.name), ("device", str(pair.device.type))):
        if seen[what] and seen[what] != {want}:
            _refuse(folder, what, seen[what], want, "pass the same --target, --draft and --device")
    prints = seen["draft_fingerprint"] - {None}  # traces from before fingerprints were recorded: unknown
    if prints and prints != {pair.draft_fingerprint}:
        _refuse(folder, "draft fingerprint", prints, pair.draft_fingerprint, "resume with the draft that recorded them")
    kernels = getattr(pair, "kernels", "stock")
    if seen.get("kernels") and seen["kernels"] != {kernels}:
        # other kernels round differently: mixed traces would not answer counterfactuals consistently
        _refuse(
            folder, "kernels", seen["kernels"], kernels, "resume on the host and path (exact or not) that recorded them"
        )


def check_profile_request(
    out: str | Path,
    *,
    modes: Sequence[str],
    behaviour: str,
    gamma_max: int,
    max_new_tokens: int,
    resume: bool,
) -> dict[str, set]:
    """The checks of :func:`profile` that need no model (the command line runs them first):
    modes, behaviour policy, and a folder that already holds traces (``--resume`` with the same
    settings). Returns the settings of the traces already there."""
    for m in modes:
        if m not in MODES:
            raise ValueError(f"unknown mode {m!r}: choose from {', '.join(MODES)}")
    parse_behaviour(behaviour, gamma_max)
    outp = Path(out)
    if not (outp.is_dir() and any(outp.glob("*.parquet"))):
        return recorded_settings(outp) if outp.is_dir() else {}
    if not resume:
        raise FileExistsError(
            f"{outp} already holds traces: pass --resume to continue that recording, or choose another folder"
        )
    return check_resume(outp, max_new_tokens=max_new_tokens, gamma_max=gamma_max, modes=modes)


def record_episode(
    engine,
    pair,
    prompt,
    *,
    max_new_tokens: int,
    gamma_max: int,
    mode: str,
    seed: int,
    policy: Callable[[int, Any], int] | None = None,
    split: str | None = None,
    behaviour: str = "uniform",
    rollouts: bool = True,
):
    """Decode one prompt with ``engine`` and return its :class:`replay.trace.Trace`.

    The behaviour policy only changes the recorded path's measured times: the per-position
    record (and so every replayed policy's outcome) is the same whatever it is. ``rollouts``:
    also record the draft's rollout from every position (``speckv-trace/2``, token mode;
    :mod:`speckv_env.rollout`), else a ``speckv-trace/1`` trace.
    """
    from replay.trace import Trace, make_trace_id

    engine.record_signals = True  # the trace stores every position's draft signals

    ids = pair.encode_chat(prompt.text)
    rng = random.Random(seed)
    lo, hi = parse_behaviour(behaviour, gamma_max)
    pol = policy or (lambda i, s: rng.randint(lo, hi))
    res = engine.generate(ids, max_new_tokens, gamma=pol, seed=seed)
    engine.finalize_record()
    sigs = engine.pos_signals
    if any(s is None for s in sigs) or any(a is None for a in engine.pos_accept) or len(sigs) != len(res.tokens):
        raise RuntimeError(f"incomplete per-position record for prompt {prompt.id}: engine bug")
    pos, t = [], 0
    for s in res.steps:
        pos.append(t)
        t += len(s.tokens)
    roll_cols, roll_meta = _v2_columns(engine, ids, res.tokens, gamma_max, prompt.id) if rollouts else ({}, {})
    return Trace(
        trace_id=make_trace_id(pair.name, pair.compression, prompt.id, mode, seed),
        tokens=np.asarray(res.tokens, dtype=np.int32),
        accept=np.asarray(engine.pos_accept, dtype=bool),
        sig_top1=np.asarray([s.top1 for s in sigs], dtype=np.float32),
        sig_entropy=np.asarray([s.entropy for s in sigs], dtype=np.float32),
        sig_margin=np.asarray([s.margin for s in sigs], dtype=np.float32),
        gamma_max=gamma_max,
        max_new_tokens=max_new_tokens,
        finish_reason=res.finish_reason or "length",
        pair=pair.name,
        target=pair.target_name,
        draft=pair.draft_name,
        compression=pair.compression,
        device=str(pair.device.type),
        task=prompt.task,
        split=split or prompt.split,
        prompt_id=prompt.id,
        mode=mode,
        temperature=engine.temperature if engine.sampling else 0.0,
        top_p=engine.top_p,
        seed=seed,
        prompt_len=len(ids),
        step_pos=np.asarray(pos, dtype=np.int32),
        step_gamma=np.asarray([s.gamma for s in res.steps], dtype=np.int16),
        step_accepted=np.asarray([s.accepted for s in res.steps], dtype=np.int16),
        step_draft_s=np.asarray([s.draft_s for s in res.steps], dtype=np.float64),
        step_verify_s=np.asarray([s.verify_s for s in res.steps], dtype=np.float64),
        meta={
            "behaviour_policy": f"uniform random gamma in {lo}..{hi}" if policy is None else "custom",
            "draft_fingerprint": pair.draft_fingerprint,
            "prefill_s": engine.prefill_s,
            "exact": bool(engine.exact),
            "kernels": getattr(pair, "kernels", "stock"),
            **roll_meta,
        },
        **roll_cols,
    )


def _v2_columns(engine, ids: list[int], tokens: list[int], gamma_max: int, prompt_id: str) -> tuple[dict, dict]:
    """speckv-trace/2's columns of a decoded episode (the draft's rollouts, the draft's top-1
    tokens, the target's signals, the prompt's tokens) and what the rollouts cost (for meta)."""
    from speckv_env.rollout import draft_rollouts

    t0 = time.perf_counter()
    ro = draft_rollouts(engine, ids, tokens, gamma_max)
    meta = {"rollout_forwards": ro.forwards, "rollout_s": time.perf_counter() - t0}
    cols: dict[str, Any] = {f"roll_{k}": getattr(ro, k) for k in ("tokens", "top1", "entropy", "margin", "p")}
    tgt = engine.pos_target
    argmax = engine.pos_argmax
    if len(tgt) != len(tokens) or any(x is None for x in tgt) or any(a is None for a in argmax):
        raise RuntimeError(f"incomplete target record for prompt {prompt_id}: engine bug")
    cols.update(
        draft_argmax=np.asarray(argmax, dtype=np.int32),
        tgt_top1=np.asarray([x.top1 for x in tgt if x is not None], dtype=np.float32),
        tgt_entropy=np.asarray([x.entropy for x in tgt if x is not None], dtype=np.float32),
        prompt_tokens=np.asarray(ids, dtype=np.int32),
    )
    return cols, meta


def select_profile_prompts(
    tasks: Sequence[str], splits: Sequence[str], n_train: int | None, per_task: int | None = None
) -> list:
    """Prompts in recording order, interleaved round-robin over splits and tasks, so that a
    recording stopped early (time budget) stays balanced over splits and tasks.
    ``n_train`` caps training prompts per task, ``per_task`` caps every split's prompts per task."""
    from speckv_env.prompts import load_prompts

    lists = []
    for split in splits:
        for task in tasks:
            ps = load_prompts(task=task, split=split)
            if split == "train" and n_train is not None:
                ps = ps[:n_train]
            if per_task is not None:
                ps = ps[:per_task]
            lists.append(ps)
    out: list[Any] = []
    for i in range(max((len(ps) for ps in lists), default=0)):
        out.extend(ps[i] for ps in lists if i < len(ps))
    return out


def make_engines(pair: Any, modes: Sequence[str], gamma_max: int) -> dict[str, Any]:
    """One engine per recording mode over a loaded pair."""
    from speckv_env.engine import SpeculativeEngine

    return {
        m: SpeculativeEngine(
            pair.target, pair.draft, temperature=MODES[m], eos_token_id=pair.eos_token_id, max_gamma=gamma_max
        )
        for m in modes
    }


def episode_key(pair_name: str, compression: str, prompt_id: str, mode: str) -> str:
    """The trace id of a prompt's episode in a mode (the resume key)."""
    from replay.trace import make_trace_id

    return make_trace_id(pair_name, compression, prompt_id, mode, episode_seed(prompt_id, mode))


def _record_todo(
    writer: Any,
    pair: Any,
    todo: Sequence[tuple[str, Any]],
    modes: Sequence[str],
    *,
    max_new_tokens: int,
    gamma_max: int,
    behaviour: str,
    deadline: float | None,
    progress: bool,
) -> tuple[int, bool]:
    """Record the (mode, prompt) episodes ``todo`` of one loaded pair; returns (written, stopped early)."""
    from tqdm import tqdm

    engines = make_engines(pair, modes, gamma_max)
    written = 0
    bar = tqdm(todo, desc=f"profile {pair.compression}", unit="ep", disable=not progress)
    for mode, p in bar:
        if deadline is not None and time.time() > deadline:
            return written, True
        tr = record_episode(
            engines[mode],
            pair,
            p,
            max_new_tokens=max_new_tokens,
            gamma_max=gamma_max,
            mode=mode,
            seed=episode_seed(p.id, mode),
            behaviour=behaviour,
        )
        writer.write(tr)
        written += 1
        bar.set_postfix_str(f"{p.id} {mode} {tr.n} tok")
    return written, False


def profile(
    out: str | Path,
    *,
    target: str | None = None,
    draft: str | None = None,
    compressions: Sequence[str] = ("fp32", "int8", "nf4"),
    tasks: Sequence[str] = ("chat", "code", "math", "summarization"),
    splits: Sequence[str] = ("test", "validation", "train"),
    n_train: int | None = 40,
    modes: Sequence[str] = ("greedy", "sample"),
    max_new_tokens: int = 128,
    gamma_max: int = GAMMA_MAX,
    device: str = "auto",
    resume: bool = False,
    progress: bool = True,
    time_budget_s: float | None = None,
    prompts: Sequence[Any] | None = None,
    behaviour: str = "uniform",
    calibrate: bool = True,
    per_task: int | None = None,
) -> dict[str, Any]:
    """Record traces into ``out``; returns a summary (episodes written, skipped, seconds)."""
    from replay.trace import TraceWriter
    from speckv_env.calibrate import cached_calibration
    from speckv_env.pair import load_pair

    outp = Path(out)
    seen = check_profile_request(
        outp, modes=modes, behaviour=behaviour, gamma_max=gamma_max, max_new_tokens=max_new_tokens, resume=resume
    )
    sel = list(prompts) if prompts is not None else select_profile_prompts(tasks, splits, n_train, per_task)
    t_start = time.time()
    written = skipped = 0
    stopped_early = False
    with TraceWriter(outp) as writer:
        done_keys = writer.completed_keys()
        for comp in compressions:
            pair = load_pair(target, draft, compression=comp, device=device)
            if seen:
                check_resume_pair(outp, seen, pair)
            todo = [
                (mode, p)
                for p in sel
                for mode in modes
                if episode_key(pair.name, pair.compression, p.id, mode) not in done_keys
            ]
            skipped += len(sel) * len(modes) - len(todo)
            cm_path = outp / f"cost-{pair.compression}.json"
            if calibrate and not cm_path.exists():
                cm = cached_calibration(pair, gamma_max=gamma_max, progress=progress)
                writer.save_cost_model(cm)
            n, stopped_early = _record_todo(
                writer,
                pair,
                todo,
                modes,
                max_new_tokens=max_new_tokens,
                gamma_max=gamma_max,
                behaviour=behaviour,
                deadline=None if time_budget_s is None else t_start + time_budget_s,
                progress=progress,
            )
            written += n
            del pair
            if stopped_early:
                break
    return {
        "written": written,
        "skipped": skipped,
        "seconds": time.time() - t_start,
        "stopped_early": stopped_early,
        "out": str(outp),
    }
