"""Full-information traces (schema ``speckv-trace/1``): the in-memory form, a crash-safe
writer, a strict reader, and clearly synthetic traces for tests and examples.

The trace model (DESIGN.md, "Full-information traces and exact replay"). Greedy decoding, and
sampling with position-keyed randomness, make the emitted sequence ``y`` independent of the
gammas chosen. For every output position ``s`` a trace stores

- ``tokens[s]`` = y_s, the emitted token;
- ``accept[s]`` = a_s: would the draft's proposal at ``s``, made from the true prefix y[:s], be
  accepted (greedy: argmax q_s == y_s; sampling: the draft-then-accept rule with the
  randomness of position s);
- the draft's signals at ``s`` (top-1 probability, entropy in nats, top-1 minus top-2), i.e.
  the draft's distribution computed from the true prefix, which a controller sees *before*
  choosing gamma at a step starting at ``s``.

``L[t]`` = length of the run of consecutive ``accept == True`` starting at ``t``, capped at
``gamma_max`` and at ``N - 1 - t`` (the last emitted token is always the target's: EOS, or the
max_new_tokens-th token). A step at ``t`` with requested gamma ``g`` uses
g_eff = min(g, max_new_tokens - 1 - t) (known before the step, as in the live engine), accepts
k = min(L[t], g_eff), emits ``tokens[t : t + k + 1]`` and moves to ``t + k + 1``.

Signals of draft tokens *beyond the first rejection* of a draft run are off the true path and
are not recorded: the only features they could feed are post-draft ones, which are leakage
for a controller that chooses gamma before drafting.

Each trace also keeps the path that was actually recorded (``step_*``: start position, gamma,
accepted, measured draft and verify seconds), so measured times of the chosen path survive.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from speckv_env.core import GAMMA_MAX, CostModel, fsync_dir

from . import steprule
from .costs import load_cost_models  # noqa: F401  (re-exported: replay.trace.load_cost_models)
from .schema import (
    COMPRESSIONS,
    FINISH_REASONS,
    MODES,
    TRACE_COLUMNS_BY_VERSION,
    TRACE_SCHEMA_V1,
    TRACE_SCHEMA_VERSION,
    TRACE_SCHEMA_VERSIONS_READ,
    TraceFormatError,
    canonical_split,
    canonical_splits,
    trace_arrow_schema,
)

PathLike = str | os.PathLike

_SCALAR_FIELDS = (
    "trace_id",
    "pair",
    "target",
    "draft",
    "compression",
    "device",
    "task",
    "split",
    "prompt_id",
    "mode",
    "temperature",
    "top_p",
    "seed",
    "max_new_tokens",
    "gamma_max",
    "prompt_len",
    "finish_reason",
)
_LIST_FIELDS: dict[str, np.dtype] = {
    "tokens": np.dtype(np.int32),
    "accept": np.dtype(np.bool_),
    "sig_top1": np.dtype(np.float32),
    "sig_entropy": np.dtype(np.float32),
    "sig_margin": np.dtype(np.float32),
    "step_pos": np.dtype(np.int32),
    "step_gamma": np.dtype(np.int16),
    "step_accepted": np.dtype(np.int16),
    "step_draft_s": np.dtype(np.float64),
    "step_verify_s": np.dtype(np.float64),
}
_ROLL_FIELDS: dict[str, np.dtype] = {
    "roll_tokens": np.dtype(np.int32),
    "roll_top1": np.dtype(np.float32),
    "roll_entropy": np.dtype(np.float32),
    "roll_margin": np.dtype(np.float32),
    "roll_p": np.dtype(np.float32),
}
"""``speckv-trace/2``'s rollout columns: ``(N, gamma_max)`` arrays in memory, flat on disk."""
_V2_FIELDS: dict[str, np.dtype] = {
    "draft_argmax": np.dtype(np.int32),
    "tgt_top1": np.dtype(np.float32),
    "tgt_entropy": np.dtype(np.float32),
    "prompt_tokens": np.dtype(np.int32),
}
"""``speckv-trace/2``'s other new columns (one-dimensional: N values, or the prompt's tokens)."""
_POSITION_FIELDS = ("tokens", "accept", "sig_top1", "sig_entropy", "sig_margin")
_STEP_FIELDS = ("step_pos", "step_gamma", "step_accepted", "step_draft_s", "step_verify_s")


def run_lengths(accept: np.ndarray, cap: int) -> np.ndarray:
    """``L[t]`` = number of consecutive True values in ``accept`` starting at ``t``, capped at
    ``cap`` and at ``N - 1 - t``.

    Vectorised: the distance from ``t`` to the next False (or to the end), clipped.
    """
    a = np.asarray(accept, dtype=bool)
    n = a.shape[0]
    pos = np.arange(n, dtype=np.int64)
    z = np.where(a, n, pos)  # index of each False, n elsewhere
    next_false = np.minimum.accumulate(z[::-1])[::-1]
    # a step at t can accept at most N - 1 - t drafts: the last token is always the target's
    run = np.minimum(next_false - pos, n - 1 - pos)
    return np.minimum(run, cap).astype(np.int8 if cap <= 127 else np.int16)


@dataclass
class Trace:
    """One full-information episode (see the module docstring for the model).

    Per-position arrays have length N = len(tokens); ``step_*`` arrays describe the recorded
    path (may be empty when no path was recorded). Construct with numpy arrays or lists; they
    are converted to the schema dtypes and validated (:class:`TraceFormatError` on problems).
    """

    trace_id: str
    tokens: np.ndarray
    accept: np.ndarray
    sig_top1: np.ndarray
    sig_entropy: np.ndarray
    sig_margin: np.ndarray
    gamma_max: int = GAMMA_MAX
    max_new_tokens: int = 0  # 0 (or None): len(tokens)
    finish_reason: str = "length"
    pair: str = ""
    target: str = ""
    draft: str = ""
    compression: str = "fp16"
    device: str = "cpu"
    task: str = ""
    split: str = "train"
    prompt_id: str = ""
    mode: str = "greedy"
    temperature: float = 0.0  # greedy (the default mode) stores 0.0
    top_p: float = 1.0
    seed: int = 0
    prompt_len: int = 0
    step_pos: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int32))
    step_gamma: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int16))
    step_accepted: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int16))
    step_draft_s: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float64))
    step_verify_s: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float64))
    meta: dict[str, Any] = field(default_factory=dict)
    source: str = "<memory>"  # where the trace was read from (not stored)
    # speckv-trace/2: the draft's rollouts, (N, gamma_max) each, or empty (a version 1 trace)
    roll_tokens: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), np.int32))
    roll_top1: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), np.float32))
    roll_entropy: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), np.float32))
    roll_margin: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), np.float32))
    roll_p: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), np.float32))
    draft_argmax: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int32))
    tgt_top1: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))
    tgt_entropy: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))
    prompt_tokens: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int32))

    def __post_init__(self) -> None:
        for name, dt in {**_LIST_FIELDS, **_V2_FIELDS}.items():
            setattr(self, name, np.ascontiguousarray(np.asarray(getattr(self, name)), dtype=dt))
        for name, dt in _ROLL_FIELDS.items():
            a = np.ascontiguousarray(np.asarray(getattr(self, name)), dtype=dt)
            if a.ndim == 1 and a.size:  # flat, as stored: N x gamma_max row-major
                a = a.reshape(-1, int(self.gamma_max)) if a.size % int(self.gamma_max) == 0 else a
            setattr(self, name, a)
        if not self.max_new_tokens:  # 0 or None
            self.max_new_tokens = int(self.tokens.shape[0])
        self.gamma_max = int(self.gamma_max)
        self.max_new_tokens = int(self.max_new_tokens)
        self.seed = int(self.seed)
        self.prompt_len = int(self.prompt_len)
        self.temperature = float(self.temperature)
        self.split = canonical_split(self.split)
        self.top_p = float(self.top_p)
        self.validate()
        self.L = run_lengths(self.accept, self.gamma_max)

    # ---- derived ------------------------------------------------------------------
    @property
    def n(self) -> int:
        """N, the number of emitted tokens."""
        return int(self.tokens.shape[0])

    @property
    def sampling(self) -> bool:
        return self.mode == "sample"

    @property
    def has_rollouts(self) -> bool:
        """True for a ``speckv-trace/2`` trace (the draft's rollouts recorded: token mode works)."""
        return self.roll_tokens.size > 0

    @property
    def schema_version(self) -> str:
        return TRACE_SCHEMA_VERSION if self.has_rollouts else TRACE_SCHEMA_V1

    @property
    def recorded_tokens_per_s(self) -> float | None:
        """Measured tokens/s of the recorded path (None without recorded times)."""
        t = float(self.step_draft_s.sum() + self.step_verify_s.sum())
        return self.n / t if self.step_pos.size and t > 0 else None

    def _err(self, msg: str) -> TraceFormatError:
        return TraceFormatError(f"{self.source}: trace {self.trace_id!r}: {msg}")

    def validate(self) -> None:
        """Check lengths, dtypes, ranges and the recorded path; raise :class:`TraceFormatError`."""
        n = self.tokens.shape[0]
        if n < 1:
            raise self._err("has no tokens (N must be >= 1)")
        for name in _LIST_FIELDS:
            if getattr(self, name).ndim != 1:
                raise self._err(f"{name} must be one-dimensional")
        for name in _POSITION_FIELDS[1:]:
            if getattr(self, name).shape[0] != n:
                raise self._err(
                    f"inconsistent lengths: len(tokens) = {n} but len({name}) = {getattr(self, name).shape[0]}"
                )
        if not 1 <= self.gamma_max <= 127:
            raise self._err(f"gamma_max = {self.gamma_max} out of range 1..127")
        if self.max_new_tokens < n:
            raise self._err(f"max_new_tokens = {self.max_new_tokens} < len(tokens) = {n}")
        if self.finish_reason not in FINISH_REASONS:
            raise self._err(f"finish_reason {self.finish_reason!r} not in {FINISH_REASONS}")
        if self.finish_reason == "length" and n != self.max_new_tokens:
            raise self._err(f"finish_reason 'length' but len(tokens) = {n} != max_new_tokens = {self.max_new_tokens}")
        if self.mode not in MODES:
            raise self._err(f"mode {self.mode!r} not in {MODES}")
        if self.compression not in COMPRESSIONS:
            raise self._err(f"compression {self.compression!r} not in {COMPRESSIONS}")
        if (self.tokens < 0).any():
            raise self._err("negative token ids")
        for name, hi in (("sig_top1", 1.0), ("sig_entropy", np.inf), ("sig_margin", 1.0)):
            v = getattr(self, name)
            if not np.isfinite(v).all():
                raise self._err(f"{name} has non-finite values")
            if (v < 0).any() or (v > hi + 1e-6).any():
                raise self._err(f"{name} has values outside [0, {hi}]")
        if (self.sig_margin > self.sig_top1 + 1e-6).any():
            raise self._err("sig_margin exceeds sig_top1 (margin = top1 - top2 <= top1)")
        m = self.step_pos.shape[0]
        for name in _STEP_FIELDS[1:]:
            if getattr(self, name).shape[0] != m:
                raise self._err(
                    f"inconsistent lengths: len(step_pos) = {m} but len({name}) = {getattr(self, name).shape[0]}"
                )
        if m:
            pos, g, k = (
                self.step_pos.astype(np.int64),
                self.step_gamma.astype(np.int64),
                self.step_accepted.astype(np.int64),
            )
            if pos[0] != 0:
                raise self._err(f"recorded path starts at position {pos[0]}, not 0")
            nxt = pos + k + 1
            if (nxt[:-1] != pos[1:]).any():
                i = int(np.nonzero(nxt[:-1] != pos[1:])[0][0])
                raise self._err(f"recorded path step {i + 1} starts at {pos[i + 1]} but step {i} ends at {nxt[i]}")
            if nxt[-1] != n:
                raise self._err(f"recorded path ends at position {nxt[-1]}, not at N = {n}")
            if (g < 0).any() or (g > self.gamma_max).any() or (k < 0).any() or (k > g).any():
                raise self._err("recorded path has gamma outside 0..gamma_max or accepted outside 0..gamma")
            lim = self.max_new_tokens - 1 - pos
            if (g > lim).any():
                i = int(np.nonzero(g > lim)[0][0])
                raise self._err(
                    f"recorded step {i} at position {pos[i]} drafts {g[i]} tokens, "
                    f"past max_new_tokens = {self.max_new_tokens}"
                )
            L = run_lengths(self.accept, self.gamma_max)
            expect = np.minimum(L[pos], g)
            if (expect != k).any():
                i = int(np.nonzero(expect != k)[0][0])
                raise self._err(
                    f"recorded step {i} (position {pos[i]}, gamma {g[i]}) accepted {k[i]} but the accept "
                    f"column implies {expect[i]}"
                )
            for name in ("step_draft_s", "step_verify_s"):
                v = getattr(self, name)
                if not np.isfinite(v).all() or (v < 0).any():
                    raise self._err(f"{name} must be finite and non-negative")
        self._validate_rollouts()

    def _validate_v2_positions(self) -> None:
        """Version 2's per-position columns and prompt tokens: lengths, ranges, greedy consistency."""
        n = self.tokens.shape[0]
        for name in ("draft_argmax", "tgt_top1", "tgt_entropy"):
            if getattr(self, name).shape != (n,):
                raise self._err(f"inconsistent lengths: len(tokens) = {n} but len({name}) = {getattr(self, name).size}")
        if self.prompt_tokens.shape != (self.prompt_len,):
            raise self._err(f"prompt_tokens holds {self.prompt_tokens.size} ids but prompt_len = {self.prompt_len}")
        if (self.draft_argmax < 0).any() or (self.prompt_tokens < 0).any():
            raise self._err("draft_argmax or prompt_tokens has negative token ids")
        for name, hi in (("tgt_top1", 1.0), ("tgt_entropy", np.inf)):
            v = getattr(self, name)
            if not np.isfinite(v).all() or (v < 0).any() or (v > hi + 1e-6).any():
                raise self._err(f"{name} has values outside [0, {hi}]")
        if self.mode == "greedy":
            bad = np.nonzero((self.draft_argmax == self.tokens) != self.accept)[0]
            if bad.size:
                raise self._err(f"greedy: accept[{bad[0]}] disagrees with draft_argmax[{bad[0]}] == tokens[{bad[0]}]")
            if not np.array_equal(self.roll_tokens[:, 0], self.draft_argmax):
                raise self._err("greedy: the rollouts do not start with the draft's top-1 tokens (draft_argmax)")

    def _validate_rollouts(self) -> None:
        """Check the rollouts of a version 2 trace: shapes, ranges, and (exact traces) that they
        start at the trace's own signals and follow the emitted tokens while those are accepted."""
        present = [getattr(self, name).size > 0 for name in (*_ROLL_FIELDS, *_V2_FIELDS)]
        if not any(present):
            return
        n, G = self.tokens.shape[0], self.gamma_max
        for name in _ROLL_FIELDS:
            if getattr(self, name).shape != (n, G):
                raise self._err(
                    f"{name} must hold N x gamma_max = {n} x {G} values, got shape {getattr(self, name).shape}"
                )
        self._validate_v2_positions()
        if (self.roll_tokens < 0).any():
            raise self._err("roll_tokens has negative token ids")
        for name, hi in (("roll_top1", 1.0), ("roll_entropy", np.inf), ("roll_margin", 1.0), ("roll_p", 1.0)):
            v = getattr(self, name)
            if not np.isfinite(v).all() or (v < 0).any() or (v > hi + 1e-6).any():
                raise self._err(f"{name} has values outside [0, {hi}]")
        if (self.roll_margin > self.roll_top1 + 1e-6).any() or (self.roll_p > self.roll_top1 + 1e-6).any():
            raise self._err("roll_margin or roll_p exceeds roll_top1 (neither can exceed the top-1 probability)")
        if not (self.meta or {}).get("exact", False):
            return  # rows of a non-exact recording may differ from the trace's own in the last bits
        if not np.array_equal(self.roll_top1[:, 0], self.sig_top1):
            t = int(np.nonzero(self.roll_top1[:, 0] != self.sig_top1)[0][0])
            raise self._err(f"rollout from position {t} does not start at the trace's signals there (sig_top1)")
        L = run_lengths(self.accept, G)
        for i in range(G):
            on = np.nonzero(i < L)[0]  # the rollout's token i was accepted, so it is the emitted one
            if (self.roll_tokens[on, i] != self.tokens[on + i]).any():
                t = int(on[self.roll_tokens[on, i] != self.tokens[on + i]][0])
                raise self._err(
                    f"rollout from position {t} leaves the emitted tokens at token {i} inside an accepted run"
                )

    # ---- replay of one step (the rule is replay.steprule's) ---------------------------
    def step(self, t: int, gamma: int) -> tuple[int, int]:
        """(g_eff, k) of a step starting at position ``t`` with requested ``gamma``."""
        g_eff, k, _, _ = steprule.step(int(self.L[t]), bool(self.accept[t]), int(gamma), self.max_new_tokens - 1 - t)
        return g_eff, k

    def equals(self, other: Trace) -> bool:
        """Field-by-field equality (arrays compared exactly)."""
        for f in fields(self):
            if f.name == "source":
                continue
            a, b = getattr(self, f.name), getattr(other, f.name)
            if isinstance(a, np.ndarray):
                if a.dtype != b.dtype or not np.array_equal(a, b):
                    return False
            elif a != b:
                return False
        return True


# ---- Arrow conversion ---------------------------------------------------------------------


def traces_to_table(traces: Sequence[Trace]) -> pa.Table:
    """Build a trace table (one row per trace): ``speckv-trace/2`` when the traces carry
    rollouts, ``speckv-trace/1`` when none does (a mix is an error)."""
    kinds = {t.has_rollouts for t in traces}
    if len(kinds) > 1:
        raise ValueError("cannot write traces with and without rollouts to one table (speckv-trace/2 vs /1)")
    version = TRACE_SCHEMA_VERSION if kinds == {True} else TRACE_SCHEMA_V1
    columns = TRACE_COLUMNS_BY_VERSION[version]
    cols: dict[str, pa.Array] = {}
    for name, (typ, _) in columns.items():
        if name == "schema":
            cols[name] = pa.array([version] * len(traces), type=typ)
        elif name == "meta":
            cols[name] = pa.array([json.dumps(t.meta, sort_keys=True) for t in traces], type=typ)
        elif name in _LIST_FIELDS or name in _ROLL_FIELDS or name in _V2_FIELDS:
            dt = {**_LIST_FIELDS, **_ROLL_FIELDS, **_V2_FIELDS}[name]
            arrs = [getattr(t, name).reshape(-1) for t in traces]
            offsets = np.zeros(len(arrs) + 1, dtype=np.int32)
            np.cumsum([a.shape[0] for a in arrs], out=offsets[1:])
            values = np.concatenate(arrs) if arrs else np.zeros(0, dt)
            cols[name] = pa.ListArray.from_arrays(pa.array(offsets), pa.array(values, type=typ.value_type))
        else:
            cols[name] = pa.array([getattr(t, name) for t in traces], type=typ)
    return pa.Table.from_arrays(list(cols.values()), schema=trace_arrow_schema(version))


def _table_version(table: pa.Table, source: str) -> str:
    """The trace schema version of ``table`` (its ``schema`` column, else its metadata)."""
    versions = set(table.column("schema").to_pylist()) if "schema" in table.column_names else set()
    if not versions:
        meta = table.schema.metadata or {}
        versions = {meta.get(b"speckv_schema", TRACE_SCHEMA_V1.encode()).decode()}
    if len(versions) > 1 or not versions <= set(TRACE_SCHEMA_VERSIONS_READ):
        raise TraceFormatError(
            f"{source}: schema version {sorted(versions)} not supported (this reader reads "
            f"{', '.join(TRACE_SCHEMA_VERSIONS_READ)})"
        )
    return versions.pop()


def table_to_traces(table: pa.Table, source: str) -> list[Trace]:
    """Validate a table against its trace schema version and convert it (errors name ``source``)."""
    names = set(table.column_names)
    if "schema" not in names:
        raise TraceFormatError(f"{source}: not a speckv trace file: missing column(s) schema")
    version = _table_version(table, source)
    columns = TRACE_COLUMNS_BY_VERSION[version]
    missing = [c for c in columns if c not in names]
    if missing:
        raise TraceFormatError(f"{source}: not a {version} file: missing column(s) {', '.join(missing)}")
    for name, (typ, _) in columns.items():
        got = table.schema.field(name).type
        if got != typ:
            raise TraceFormatError(f"{source}: column {name!r} has type {got}, expected {typ}")
        if table.column(name).null_count:
            raise TraceFormatError(f"{source}: column {name!r} has null values")
    rows = table.num_rows
    scalars = {name: table.column(name).to_pylist() for name in _SCALAR_FIELDS}
    metas = table.column("meta").to_pylist()
    lists: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    list_fields = {**_LIST_FIELDS, **({**_ROLL_FIELDS, **_V2_FIELDS} if version == TRACE_SCHEMA_VERSION else {})}
    for name, dt in list_fields.items():
        arr = table.column(name).combine_chunks()
        if isinstance(arr, pa.ChunkedArray):  # empty table
            arr = pa.array([], type=columns[name][0])
        if arr.values.null_count:
            raise TraceFormatError(f"{source}: column {name!r} has null list elements")
        lists[name] = (arr.offsets.to_numpy(), arr.values.to_numpy(zero_copy_only=False).astype(dt, copy=False))
    out = []
    for i in range(rows):
        kw: dict[str, Any] = {name: scalars[name][i] for name in _SCALAR_FIELDS}
        for name, (off, vals) in lists.items():
            kw[name] = vals[off[i] : off[i + 1]]
        try:
            kw["meta"] = json.loads(metas[i]) if metas[i] else {}
        except json.JSONDecodeError as e:
            raise TraceFormatError(f"{source}: row {i}: meta is not valid JSON ({e})") from None
        kw["source"] = source
        try:
            out.append(Trace(**kw))
        except TraceFormatError:
            raise
        except (TypeError, ValueError) as e:
            raise TraceFormatError(f"{source}: row {i}: {e}") from None
    return out


# ---- reading ------------------------------------------------------------------------------


def _part_files(folder: Path) -> list[Path]:
    # tmp files of a killed writer end in .tmp and are ignored
    return sorted(p for p in folder.glob("*.parquet") if p.is_file() and not p.name.startswith("."))


def _expand(src: PathLike | Sequence[PathLike]) -> list[Path]:
    items = [src] if isinstance(src, (str, os.PathLike)) else list(src)
    files: list[Path] = []
    for it in items:
        p = Path(it)
        if p.is_dir():
            files.extend(_part_files(p))
        elif p.is_file():
            files.append(p)
        else:
            raise FileNotFoundError(f"trace path {p} does not exist")
    return files


def read_table_checked(path: Path, columns: list[str] | None = None) -> pa.Table:
    """Read a Parquet file; any failure is a :class:`TraceFormatError` naming the file."""
    try:
        return pq.read_table(path, columns=columns)
    except (pa.ArrowException, OSError, ValueError) as e:
        raise TraceFormatError(f"{path}: unreadable or truncated Parquet file ({type(e).__name__}: {e})") from None


def _match(value: str, want: None | str | Sequence[str]) -> bool:
    if want is None:
        return True
    if isinstance(want, str):
        want = (want,)
    return value in want


def read_traces(
    src: PathLike | Sequence[PathLike],
    task: None | str | Sequence[str] = None,
    split: None | str | Sequence[str] = None,
    compression: None | str | Sequence[str] = None,
    mode: None | str | Sequence[str] = None,
) -> list[Trace]:
    """Read ``speckv-trace/1`` traces from a file, a folder of part files, or a list of either.

    Filters keep traces whose field equals (one of) the given value(s) (split aliases such as
    ``val`` are read as the canonical ``validation``). Raises
    :class:`TraceFormatError` naming the file for malformed, truncated or schema-mismatched
    input, and for a trace_id that occurs twice. Stray ``*.tmp`` files are ignored.
    """
    files = _expand(src)
    split = canonical_splits(split)
    seen: dict[str, str] = {}
    out: list[Trace] = []
    for f in files:
        for tr in table_to_traces(read_table_checked(f), str(f)):
            if tr.trace_id in seen:
                raise TraceFormatError(f"{f}: duplicate trace_id {tr.trace_id!r} (also in {seen[tr.trace_id]})")
            seen[tr.trace_id] = str(f)
            if (
                _match(tr.task, task)
                and _match(tr.split, split)
                and _match(tr.compression, compression)
                and _match(tr.mode, mode)
            ):
                out.append(tr)
    return out


def make_trace_id(pair: str, compression: str, prompt_id: str, mode: str, seed: int, extra: str = "") -> str:
    """A readable, deterministic trace id (the resume key): ``pair|compression|prompt|mode|seed``."""
    parts = [pair, compression, prompt_id, mode, str(int(seed))] + ([extra] if extra else [])
    return "|".join(p.replace("|", "/") for p in parts)


# ---- writing ------------------------------------------------------------------------------


def atomic_write(path: PathLike, write: Callable[[BinaryIO], object], overwrite: bool = True) -> Path:
    """Write a file so that readers see either nothing (or the old file) or all of it.

    ``write(fh)`` fills a tmp file in the same folder (``.<name>.<pid>.<random>.tmp``, ignored by
    the readers), which is flushed and fsynced, then renamed into place (``os.replace``; with
    ``overwrite=False`` linked into place, so that an existing file is never replaced:
    :class:`FileExistsError`), and the folder is fsynced. On any error the tmp file is removed.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        with open(tmp, "xb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        if overwrite:
            os.replace(tmp, path)
        else:
            os.link(tmp, path)  # fails if path exists: never overwrites
            os.unlink(tmp)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    return path


def atomic_write_bytes(path: PathLike, data: bytes, overwrite: bool = True) -> Path:
    """Write ``data`` to ``path`` atomically and durably (see :func:`atomic_write`)."""
    return atomic_write(path, lambda fh: fh.write(data), overwrite)


def write_parquet_atomic(table: pa.Table, path: PathLike, overwrite: bool = True) -> Path:
    """Write an Arrow table as Parquet atomically and durably (see :func:`atomic_write`)."""
    return atomic_write(path, lambda fh: pq.write_table(table, fh), overwrite)


class TraceWriter:
    """Crash-safe writer of a trace folder.

    Every flushed batch (default: every finished episode) becomes its own part file, written
    to ``<name>.tmp`` and renamed into place, so a ``kill -9`` leaves every finished part
    readable and at most a stray tmp file (ignored by readers). :meth:`completed_keys` gives
    the trace ids already on disk, for ``--resume``; writing an id twice is an error.

    >>> with TraceWriter("logs/") as w:           # doctest: +SKIP
    ...     for trace in episodes: w.write(trace)
    ...     w.save_cost_model(cost_model)
    """

    def __init__(self, folder: PathLike, batch_size: int = 1) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.batch_size = int(batch_size)
        self._pending: list[Trace] = []
        self._done = self.completed_keys()
        self._counter = 0

    def completed_keys(self) -> set[str]:
        """trace_ids of all finished part files in the folder."""
        keys: set[str] = set()
        for f in _part_files(self.folder):
            t = read_table_checked(f, columns=["trace_id"])
            for k in t.column("trace_id").to_pylist():
                if k in keys:
                    raise TraceFormatError(f"{f}: duplicate trace_id {k!r} in the folder")
                keys.add(k)
        return keys

    def write(self, trace: Trace) -> None:
        """Queue a finished episode; written when ``batch_size`` episodes are queued."""
        trace.validate()
        if trace.trace_id in self._done or any(t.trace_id == trace.trace_id for t in self._pending):
            raise ValueError(f"trace_id {trace.trace_id!r} already written to {self.folder}")
        self._pending.append(trace)
        if len(self._pending) >= self.batch_size:
            self.flush()

    def flush(self) -> Path | None:
        """Write the queued traces as one part file (atomically); return its path."""
        if not self._pending:
            return None
        table = traces_to_table(self._pending)
        stamp = f"{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}-{self._counter:06d}-{time.time_ns() % 10**9:09d}"
        name = f"part-{stamp}.parquet"
        self._counter += 1
        path = write_parquet_atomic(table, self.folder / name, overwrite=False)
        self._done.update(t.trace_id for t in self._pending)
        self._pending.clear()
        return path

    def save_cost_model(self, cost_model: CostModel) -> Path:
        """Save ``cost-<compression>.json`` beside the logs (atomically)."""
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", cost_model.compression):
            raise ValueError(f"cost model compression {cost_model.compression!r} is not a valid file name part")
        path = self.folder / f"cost-{cost_model.compression}.json"
        atomic_write_bytes(path, json.dumps(cost_model.to_dict(), indent=2).encode())
        return path

    def close(self) -> None:
        self.flush()

    def __enter__(self) -> TraceWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def write_traces(path: PathLike, traces: Sequence[Trace]) -> Path:
    """Write traces to one Parquet file, atomically and durably (tmp file in the same folder,
    flush + fsync, ``os.replace``, fsync of the folder): a crash leaves the old file or the new
    one, never a torn one."""
    return write_parquet_atomic(traces_to_table(traces), path)


# ---- synthetic traces (tests, examples) ---------------------------------------------------


def synthetic_trace(
    n: int,
    gamma_max: int = GAMMA_MAX,
    p_accept: float = 0.7,
    seed: int = 0,
    compression: str = "fp16",
    task: str = "synthetic",
    split: str = "train",
    mode: str = "greedy",
    record_gamma: int = 4,
    finish_reason: str = "length",
    cost_model: CostModel | None = None,
    trace_id: str | None = None,
    rollouts: bool = False,
) -> Trace:
    """A SYNTHETIC trace of ``n`` tokens (random, not from any model), for tests and examples.

    Acceptance follows a latent, autocorrelated per-position probability around ``p_accept``;
    the signals are noisy functions of it (so they are informative, as real ones are). A
    recorded path at fixed gamma ``record_gamma`` is included, timed by ``cost_model``
    (default :meth:`CostModel.unit`).
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    rng = np.random.default_rng(seed)
    p = min(max(p_accept, 1e-3), 1 - 1e-3)
    z = np.empty(n)
    z0 = np.log(p / (1 - p))
    e = rng.normal(0.0, 1.5, n)
    z[0] = z0 + e[0]
    for i in range(1, n):
        z[i] = z0 + 0.6 * (z[i - 1] - z0) + 0.8 * e[i]
    prob = 1 / (1 + np.exp(-z))
    accept = rng.random(n) < prob
    top1 = np.clip(prob + rng.normal(0, 0.08, n), 0.02, 1.0)
    top2 = np.minimum((1 - top1) * rng.uniform(0.2, 0.9, n), top1)
    margin = top1 - top2
    entropy = np.clip(-(top1 * np.log(top1)) + (1 - top1) * np.log(2000.0), 0.0, 11.0)
    tokens = rng.integers(3, 49152, n).astype(np.int32)
    cm = cost_model or CostModel.unit(gamma_max)
    L = run_lengths(accept, gamma_max)
    mnt = n if finish_reason == "length" else n + 8
    path = _fixed_gamma_path(L, mnt, min(record_gamma, gamma_max), cm, mode == "sample")
    roll: dict[str, Any] = (
        synthetic_rollouts(tokens, accept, L, top1, entropy, margin, gamma_max, mode, seed) if rollouts else {}
    )
    return Trace(
        trace_id=trace_id or f"synthetic-{compression}-{task}-{mode}-{seed}",
        tokens=tokens,
        accept=accept,
        sig_top1=top1.astype(np.float32),
        sig_entropy=entropy.astype(np.float32),
        sig_margin=np.minimum(margin, top1).astype(np.float32),
        gamma_max=gamma_max,
        max_new_tokens=mnt,
        finish_reason=finish_reason,
        pair="synthetic",
        target="synthetic-target",
        draft="synthetic-draft",
        compression=compression,
        device="synthetic",
        task=task,
        split=split,
        prompt_id=f"synthetic-{seed}",
        mode=mode,
        temperature=1.0 if mode == "sample" else 0.0,
        seed=seed,
        prompt_len=16,
        **path,
        **roll,
        meta={"synthetic": True},
    )


def synthetic_rollouts(
    tokens: np.ndarray,
    accept: np.ndarray,
    L: np.ndarray,
    top1: np.ndarray,
    entropy: np.ndarray,
    margin: np.ndarray,
    gamma_max: int,
    mode: str,
    seed: int,
    prompt_len: int = 16,
) -> dict[str, np.ndarray]:
    """SYNTHETIC rollouts consistent with a trace: from t, token i is the emitted ``tokens[t + i]``
    while the run ``L[t]`` lasts and random after; signals start at the trace's own and drift;
    the drafted token's own probability is the top-1 (greedy) or at most it (sampling)."""
    rng = np.random.default_rng(seed + 7919)
    n, G = tokens.shape[0], int(gamma_max)
    idx = np.minimum(np.arange(n)[:, None] + np.arange(G)[None, :], n - 1)
    on = np.arange(G)[None, :] < L[:, None]
    rt = np.where(on, tokens[idx], rng.integers(3, 49152, (n, G))).astype(np.int32)
    decay = np.where(on, 1.0, rng.uniform(0.5, 0.95, (n, G)))
    t1 = np.clip(top1[idx] * decay, 0.02, 1.0)
    t1[:, 0] = top1
    ent = np.clip(entropy[idx] / decay, 0.0, 11.0)
    ent[:, 0] = entropy
    mg = np.minimum(margin[idx] * decay, t1)
    mg[:, 0] = np.minimum(margin, top1)
    p = t1 if mode == "greedy" else t1 * rng.uniform(0.3, 1.0, (n, G))
    f32 = np.float32
    # the draft's top-1 is the emitted token exactly where accepted (greedy), and starts the rollout
    argmax = np.where(accept, tokens, (tokens + rng.integers(1, 1000, n)) % 49152)
    if mode == "greedy":
        rt[:, 0] = argmax
    tgt_top1 = np.clip(top1 + rng.normal(0.05, 0.1, n), 0.05, 1.0)
    return {
        "roll_tokens": rt,
        "roll_top1": t1.astype(f32),
        "roll_entropy": ent.astype(f32),
        "roll_margin": mg.astype(f32),
        "roll_p": p.astype(f32),
        "draft_argmax": argmax.astype(np.int32),
        "tgt_top1": tgt_top1.astype(f32),
        "tgt_entropy": np.clip(entropy * rng.uniform(0.5, 1.0, n), 0.0, 11.0).astype(f32),
        "prompt_tokens": rng.integers(3, 49152, prompt_len).astype(np.int32),
    }


def _fixed_gamma_path(L: np.ndarray, max_new_tokens: int, gamma: int, cm: CostModel, sampling: bool) -> dict:
    """The recorded-path fields (``step_*``) of playing a trace with runs ``L`` at a fixed gamma,
    timed by ``cm`` (engine clip)."""
    pos, gs, ks, ds, vs = [], [], [], [], []
    t = 0
    while t < L.shape[0]:
        g = min(gamma, max_new_tokens - 1 - t)
        k = min(int(L[t]), g)
        pos.append(t)
        gs.append(g)
        ks.append(k)
        ds.append(cm.draft_forwards(g, k, sampling) * cm.t_draft)
        vs.append(cm.verify_time(g) + cm.t_overhead)
        t += k + 1
    cols = {"step_pos": pos, "step_gamma": gs, "step_accepted": ks, "step_draft_s": ds, "step_verify_s": vs}
    return {name: np.asarray(v, dtype=_LIST_FIELDS[name]) for name, v in cols.items()}


def synthetic_dataset(
    num_traces: int = 16,
    n_range: tuple[int, int] = (40, 160),
    gamma_max: int = GAMMA_MAX,
    seed: int = 0,
    compressions: Sequence[str] = ("fp16",),
    tasks: Sequence[str] = ("code", "chat"),
    modes: Sequence[str] = ("greedy",),
    rollouts: bool = False,
) -> list[Trace]:
    """A SYNTHETIC data set: ``num_traces`` traces cycling over compressions, tasks and modes,
    with per-task acceptance levels, lengths in ``n_range``, splits train/validation/test 60/20/20."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(num_traces):
        task = tasks[i % len(tasks)]
        comp = compressions[(i // len(tasks)) % len(compressions)]
        mode = modes[i % len(modes)]
        p = 0.45 + 0.4 * ((sum(map(ord, task)) % 7) / 6)
        split = "train" if i % 5 < 3 else ("validation" if i % 5 == 3 else "test")
        n = int(rng.integers(n_range[0], n_range[1] + 1))
        fr = "eos" if i % 3 == 2 else "length"
        out.append(
            synthetic_trace(
                n,
                gamma_max,
                p,
                seed=seed * 100003 + i,
                compression=comp,
                task=task,
                split=split,
                mode=mode,
                finish_reason=fr,
                trace_id=f"synthetic-{seed}-{i:04d}",
                rollouts=rollouts,
            )
        )
    return out
