"""Step-log files (``speckv-steps/2``, reading ``speckv-steps/1`` too): a durable writer and a
strict reader (columns, types, nulls, versions, value ranges, run structure; every error names
the file), as for traces (:mod:`replay.trace`).

Version 1 files carry no clip convention, finish reason or draft fingerprint; the reader fills
them in: the clip convention is the paper's for ``source == "speckv-paper"`` (the importer's)
and the live engine's otherwise (the only other writer of version 1 was ``RecordSteps``, which
logged the engine's clipped gamma); the finish reason is ``length`` when the run reaches its
budget and ``eos`` when it stops before; the fingerprint is unknown (``''``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa

from speckv_env.core import CostModel

from .schema import (
    COMPRESSIONS,
    GAMMA_CLIPS,
    MODES,
    STEP_FINISH_REASONS,
    STEPS_ARROW_SCHEMA,
    STEPS_COLUMNS,
    STEPS_COLUMNS_V1,
    STEPS_SCHEMA_V1,
    STEPS_SCHEMA_VERSION,
    STEPS_SCHEMA_VERSIONS_READ,
    TraceFormatError,
    canonical_split,
)
from .steprule import CLIP_ENGINE, CLIP_PAPER, CLIP_RESERVE
from .trace import PathLike, atomic_write_bytes, read_table_checked, write_parquet_atomic

RUN_COLUMNS = (
    "source",
    "pair",
    "compression",
    "device",
    "task",
    "split",
    "prompt_id",
    "prompt",
    "mode",
    "max_new_tokens",
    "gamma_clip",
    "finish_reason",
    "draft_fingerprint",
)
"""Columns that describe the run: equal on every row of a run."""


def write_step_log(
    steps: pd.DataFrame,
    folder: PathLike,
    cost_models: Mapping[str, CostModel] | None = None,
    name: str = "steps.parquet",
    overwrite: bool = True,
) -> Path:
    """Write ``folder/<name>`` (``speckv-steps/2``) and ``cost-<compression>.json`` beside it.

    Every file is written atomically and durably (tmp file in the same folder, flush + fsync,
    rename, fsync of the folder). The rows are validated first, as the reader would.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    table = pa.Table.from_pandas(steps[list(STEPS_COLUMNS)], schema=STEPS_ARROW_SCHEMA, preserve_index=False)
    validate_steps(table.to_pandas(), f"{path} (being written)")
    write_parquet_atomic(table, path, overwrite=overwrite)
    for c, cm in (cost_models or {}).items():
        atomic_write_bytes(folder / f"cost-{c}.json", json.dumps(cm.to_dict(), indent=2).encode())
    return path


def read_step_log(src: PathLike | Sequence[PathLike]) -> pd.DataFrame:
    """Read step-log files (a file, a folder of them, or a list); every row comes back in the
    ``speckv-steps/2`` form. Raises :class:`TraceFormatError` naming the file for anything
    malformed, and for a run_id found in two files."""
    items: list[PathLike] = [src] if isinstance(src, (str, os.PathLike)) else list(src)
    frames = []
    seen: dict[str, str] = {}
    for it in items:
        p = Path(it)
        if not p.exists():
            raise FileNotFoundError(f"step log {p} does not exist")
        files = sorted(q for q in p.glob("*.parquet") if not q.name.startswith(".")) if p.is_dir() else [p]
        for f in files:
            df = _read_one(f)
            for run in df["run_id"].unique().tolist():
                if run in seen:
                    raise TraceFormatError(f"{f}: duplicate run_id {run!r} (also in {seen[run]})")
                seen[run] = str(f)
            frames.append(df)
    if not frames:
        raise FileNotFoundError(f"no step-log files under {src}")
    return pd.concat(frames, ignore_index=True)


def _read_one(f: Path) -> pd.DataFrame:
    t = read_table_checked(f)
    if "schema" not in t.column_names:
        raise TraceFormatError(f"{f}: not a step log: no 'schema' column")
    if t.column("schema").null_count:
        raise TraceFormatError(f"{f}: column 'schema' has null values")
    versions = set(t.column("schema").to_pylist())
    if len(versions) > 1 or not versions <= set(STEPS_SCHEMA_VERSIONS_READ):
        reads = ", ".join(STEPS_SCHEMA_VERSIONS_READ)
        raise TraceFormatError(f"{f}: schema version {sorted(versions)} not supported (this reader reads {reads})")
    version = versions.pop() if versions else STEPS_SCHEMA_VERSION
    columns = STEPS_COLUMNS_V1 if version == STEPS_SCHEMA_V1 else STEPS_COLUMNS
    missing = [c for c in columns if c not in t.column_names]
    if missing:
        raise TraceFormatError(f"{f}: not a {version} file: missing column(s) {', '.join(missing)}")
    for name, (typ, _) in columns.items():
        got = t.schema.field(name).type
        if got != typ:
            raise TraceFormatError(f"{f}: column {name!r} has type {got}, expected {typ}")
        if t.column(name).null_count:
            raise TraceFormatError(f"{f}: column {name!r} has null values")
    df = t.select(list(columns)).to_pandas()
    if version == STEPS_SCHEMA_V1:
        df = _upgrade_v1(df)
    df["split"] = df["split"].map(canonical_split)
    validate_steps(df, str(f))
    return df


def _upgrade_v1(df: pd.DataFrame) -> pd.DataFrame:
    """Version 1 rows in the version 2 form (see the module docstring for what is filled in)."""
    df = df.copy()
    df["schema"] = STEPS_SCHEMA_VERSION
    df["gamma_clip"] = np.where(df["source"].to_numpy() == "speckv-paper", CLIP_PAPER, CLIP_ENGINE)
    end = (df["position"].astype(np.int64) + df["tokens_produced"].astype(np.int64)).to_numpy()
    last_end = pd.Series(end).groupby(df["run_id"].to_numpy()).transform("max").to_numpy()
    df["finish_reason"] = np.where(last_end >= df["max_new_tokens"].to_numpy(), "length", "eos")
    df["draft_fingerprint"] = ""
    return df


def _fail(where: str, df: pd.DataFrame, bad: np.ndarray, what: str) -> None:
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise TraceFormatError(f"{where}: run {df['run_id'].iloc[i]!r} step {df['step'].iloc[i]}: {what}")


def validate_steps(df: pd.DataFrame, where: str) -> None:
    """Check ``speckv-steps/2`` rows: categorical values, ranges, the clip rule, accepted <=
    drafted, censoring, finite signals, and per run: constant run columns, steps 0, 1, ...,
    positions that follow the emitted tokens, a finish reason that fits the budget.
    Raises :class:`TraceFormatError` naming ``where`` (the file), the run and the step."""
    for col, allowed in (
        ("compression", COMPRESSIONS),
        ("mode", MODES),
        ("gamma_clip", GAMMA_CLIPS),
        ("finish_reason", STEP_FINISH_REASONS),
    ):
        bad = ~df[col].isin(allowed).to_numpy()
        if bad.any():
            _fail(where, df, bad, f"{col} {df[col].to_numpy()[bad][0]!r} not in {allowed}")
    i64 = {c: df[c].to_numpy(np.int64) for c in ("max_new_tokens", "position", "gamma", "drafted", "accepted")}
    mnt, pos, gam, d, k = (i64[c] for c in ("max_new_tokens", "position", "gamma", "drafted", "accepted"))
    _fail(where, df, mnt < 1, "max_new_tokens must be >= 1")
    _fail(where, df, (pos < 0) | (pos >= mnt), "position outside 0..max_new_tokens - 1")
    _fail(where, df, gam < 0, "negative gamma")
    reserve = df["gamma_clip"].map(CLIP_RESERVE).to_numpy(np.int64)
    _fail(where, df, d != np.minimum(gam, mnt - reserve - pos), "drafted != min(gamma, limit of its gamma_clip)")
    _fail(where, df, (k < 0) | (k > d), "accepted outside 0..drafted")
    _fail(where, df, df["tokens_produced"].to_numpy(np.int64) != k + 1, "tokens_produced != accepted + 1")
    _fail(where, df, df["censored"].to_numpy(bool) != (k == d), "censored != (accepted == drafted)")
    for c in ("post_mean_entropy_bits", "post_max_entropy_bits", "post_mean_confidence", "post_min_confidence"):
        v = df[c].to_numpy(np.float64)
        hi = 1.0 + 1e-6 if "confidence" in c else np.inf
        _fail(where, df, ~np.isfinite(v) | (v < 0) | (v > hi), f"{c} not finite or out of range")
    _validate_runs(df, where, pos, k)


def _validate_runs(df: pd.DataFrame, where: str, pos: np.ndarray, k: np.ndarray) -> None:
    codes, _ = pd.factorize(df["run_id"], sort=False)
    order = np.lexsort((df["step"].to_numpy(np.int64), codes))
    c, step, p, kk = codes[order], df["step"].to_numpy(np.int64)[order], pos[order], k[order]
    first = np.r_[True, c[1:] != c[:-1]]
    start = np.maximum.accumulate(np.where(first, np.arange(len(c)), 0))
    rows = df.iloc[order].reset_index(drop=True)
    _fail(where, rows, step != np.arange(len(c)) - start, "step indices within a run must be 0, 1, 2, ...")
    expect = np.where(first, 0, np.r_[0, p[:-1] + kk[:-1] + 1])
    _fail(where, rows, p != expect, "position does not follow the recorded steps (sum of earlier tokens_produced)")
    for col in RUN_COLUMNS:
        v = rows[col].to_numpy()
        _fail(where, rows, ~first & (v != np.r_[v[:1], v[:-1]]), f"{col} changes within the run")
    last = np.r_[c[1:] != c[:-1], True]
    end, mnt = (p + kk + 1)[last], rows["max_new_tokens"].to_numpy(np.int64)[last]
    fr = rows["finish_reason"].to_numpy()[last]
    # the most tokens a run can emit: the budget (engine clip), one more under the paper's clip
    over = mnt + 1 - rows["gamma_clip"].map(CLIP_RESERVE).to_numpy(np.int64)[last]
    ok = np.where(fr == "length", (end >= mnt) & (end <= over), np.where(fr == "eos", end <= over, end < mnt))
    _fail(where, rows[last].reset_index(drop=True), ~ok, "finish_reason does not fit the tokens emitted and the budget")
