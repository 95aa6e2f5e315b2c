"""Versioned on-disk schemas of the replay side (Parquet; documented in replay/SCHEMA.md).

- ``speckv-trace/2``: full-information traces, one row per episode, list columns per position,
  with the draft's own rollout from every position (token mode). ``speckv-trace/1`` (the same
  columns without the rollouts) is still read and written for traces without rollouts.
- ``speckv-steps/2``: censored step logs (only the chosen gamma's outcome per step), one row
  per recorded step, e.g. imported from the SpecKV paper's CSV or written by
  :class:`replay.recorder.RecordSteps`. Version 2 adds the clip convention, the run's finish
  reason and the draft's fingerprint; version 1 files are still read (see
  :func:`replay.steplog.read_step_log`).

No torch here: replay must work on machines without it.
"""

from __future__ import annotations

from collections.abc import Sequence

import pyarrow as pa

TRACE_SCHEMA_V1 = "speckv-trace/1"
TRACE_SCHEMA_VERSION = "speckv-trace/2"
TRACE_SCHEMA_VERSIONS_READ: tuple[str, ...] = (TRACE_SCHEMA_V1, TRACE_SCHEMA_VERSION)
STEPS_SCHEMA_VERSION = "speckv-steps/2"
STEPS_SCHEMA_V1 = "speckv-steps/1"
STEPS_SCHEMA_VERSIONS_READ: tuple[str, ...] = (STEPS_SCHEMA_V1, STEPS_SCHEMA_VERSION)

COMPRESSIONS: tuple[str, ...] = ("fp32", "bf16", "fp16", "int8", "nf4")
MODES: tuple[str, ...] = ("greedy", "sample")
FINISH_REASONS: tuple[str, ...] = ("eos", "length")
STEP_FINISH_REASONS: tuple[str, ...] = ("eos", "length", "truncated")
"""Finish reasons of a step-log run: ``truncated`` = cut by a wrapper before generation ended."""
GAMMA_CLIPS: tuple[str, ...] = ("engine", "paper")
"""Clip conventions of step logs (:mod:`replay.steprule`): engine g_eff = min(g, max_new_tokens - 1 -
position), paper g_eff = min(g, max_new_tokens - position)."""

SPLITS: tuple[str, ...] = ("train", "validation", "test")
"""The data splits' canonical names (those of :data:`speckv_env.prompts.SPLITS`)."""
SPLIT_ALIASES: dict[str, str] = {"val": "validation"}
"""Accepted on input (files, filters) and stored under the canonical name."""


def canonical_split(name: str) -> str:
    """The canonical name of a split (``val`` -> ``validation``; other names unchanged)."""
    return SPLIT_ALIASES.get(name, name)


def canonical_splits(want: None | str | Sequence[str]) -> None | str | list[str]:
    """A split filter (None, a name or a list of names) with every alias made canonical."""
    if want is None or isinstance(want, str):
        return want if want is None else canonical_split(want)
    return [canonical_split(w) for w in want]


class TraceFormatError(ValueError):
    """A trace or step-log file is malformed, truncated, or has the wrong schema.

    The message always names the file and the problem.
    """


# column name -> (arrow type, description). Order is the on-disk column order.
TRACE_COLUMNS: dict[str, tuple[pa.DataType, str]] = {
    "trace_id": (pa.string(), "unique id of the episode (the resume key)"),
    "schema": (pa.string(), f"schema version, always {TRACE_SCHEMA_VERSION!r}"),
    "pair": (pa.string(), "name of the draft/target pair"),
    "target": (pa.string(), "target model (hub id, folder or GGUF file)"),
    "draft": (pa.string(), "draft model (hub id, folder or GGUF file)"),
    "compression": (pa.string(), "target compression: fp32, bf16, fp16, int8 or nf4"),
    "device": (pa.string(), "device the trace was recorded on (e.g. cpu, cuda:0 / H200)"),
    "task": (pa.string(), "prompt task (code, math, chat, summarization, ...)"),
    "split": (pa.string(), "data split: train, validation or test ('val' is read as 'validation')"),
    "prompt_id": (pa.string(), "id of the prompt within its suite"),
    "mode": (pa.string(), "decoding mode: greedy or sample"),
    "temperature": (pa.float64(), "sampling temperature (0.0 for greedy)"),
    "top_p": (pa.float64(), "nucleus top-p (1.0 = off)"),
    "seed": (pa.int64(), "episode seed keying the per-position randomness (sampling)"),
    "max_new_tokens": (pa.int32(), "generation budget"),
    "gamma_max": (pa.int16(), "acceptance runs are recorded up to this gamma"),
    "prompt_len": (pa.int32(), "prompt length in tokens"),
    "finish_reason": (pa.string(), "eos (last token is EOS) or length (max_new_tokens reached)"),
    "tokens": (pa.list_(pa.int32()), "y_s: emitted token ids, N = len(tokens)"),
    "accept": (pa.list_(pa.bool_()), "a_s: would the draft's proposal at s (from the true prefix) be accepted"),
    "sig_top1": (pa.list_(pa.float32()), "draft top-1 probability at s (pre-choice)"),
    "sig_entropy": (pa.list_(pa.float32()), "draft entropy (nats) at s (pre-choice)"),
    "sig_margin": (pa.list_(pa.float32()), "draft top-1 minus top-2 probability at s (pre-choice)"),
    "step_pos": (pa.list_(pa.int32()), "recorded path: start position of each step"),
    "step_gamma": (pa.list_(pa.int16()), "recorded path: gamma used (clipped) at each step"),
    "step_accepted": (pa.list_(pa.int16()), "recorded path: accepted draft tokens at each step"),
    "step_draft_s": (pa.list_(pa.float64()), "recorded path: measured draft time (s) per step"),
    "step_verify_s": (pa.list_(pa.float64()), "recorded path: measured verify time (s) per step"),
    "meta": (pa.string(), "free-form JSON object (versions, prompt text hash, ...); '{}' if none"),
}

TRACE_COLUMNS["schema"] = (
    pa.string(),
    f"schema version: {TRACE_SCHEMA_VERSION!r} ({TRACE_SCHEMA_V1!r} without rollouts)",
)

ROLLOUT_COLUMNS: dict[str, tuple[pa.DataType, str]] = {
    "roll_tokens": (
        pa.list_(pa.int32()),
        "rollouts, N x gamma_max row-major: [t * gamma_max + i] = the draft's i-th token drafted from the true prefix "
        "tokens[:t] (then its own tokens)",
    ),
    "roll_top1": (pa.list_(pa.float32()), "rollouts: top-1 probability of the distribution token i was drafted from"),
    "roll_entropy": (pa.list_(pa.float32()), "rollouts: entropy (nats) of that distribution"),
    "roll_margin": (pa.list_(pa.float32()), "rollouts: top-1 minus top-2 probability of that distribution"),
    "roll_p": (pa.list_(pa.float32()), "rollouts: the drafted token's own probability in that distribution"),
    "draft_argmax": (pa.list_(pa.int32()), "the draft's top-1 token at s (from the true prefix)"),
    "tgt_top1": (pa.list_(pa.float32()), "the target's top-1 probability at s (its distribution y_s was chosen from)"),
    "tgt_entropy": (pa.list_(pa.float32()), "the target's entropy (nats) at s"),
    "prompt_tokens": (pa.list_(pa.int32()), "the prompt's token ids (len = prompt_len), as the models saw them"),
}
"""The columns ``speckv-trace/2`` adds to version 1 (before ``meta``)."""

TRACE_COLUMNS_V1: dict[str, tuple[pa.DataType, str]] = dict(TRACE_COLUMNS)
TRACE_COLUMNS_V2: dict[str, tuple[pa.DataType, str]] = {
    **{k: v for k, v in TRACE_COLUMNS.items() if k != "meta"},
    **ROLLOUT_COLUMNS,
    "meta": TRACE_COLUMNS["meta"],
}
TRACE_COLUMNS_BY_VERSION: dict[str, dict[str, tuple[pa.DataType, str]]] = {
    TRACE_SCHEMA_V1: TRACE_COLUMNS_V1,
    TRACE_SCHEMA_VERSION: TRACE_COLUMNS_V2,
}


def trace_arrow_schema(version: str = TRACE_SCHEMA_VERSION) -> pa.Schema:
    """The Arrow schema of a trace file of ``version``."""
    return pa.schema(
        [pa.field(name, typ, nullable=False) for name, (typ, _) in TRACE_COLUMNS_BY_VERSION[version].items()],
        metadata={b"speckv_schema": version.encode()},
    )


TRACE_ARROW_SCHEMA = trace_arrow_schema(TRACE_SCHEMA_VERSION)

STEPS_COLUMNS_V1: dict[str, tuple[pa.DataType, str]] = {
    "schema": (pa.string(), f"schema version, {STEPS_SCHEMA_VERSION!r} ({STEPS_SCHEMA_V1!r} is still read)"),
    "source": (pa.string(), "where the log came from (e.g. speckv-paper, speckv-live)"),
    "run_id": (pa.string(), "one recorded run = one episode (unique across files)"),
    "pair": (pa.string(), "name of the draft/target pair"),
    "compression": (pa.string(), "target compression: fp32, bf16, fp16, int8 or nf4"),
    "device": (pa.string(), "device of the recording"),
    "task": (pa.string(), "prompt task"),
    "split": (pa.string(), "data split: train, validation or test ('val' is read as 'validation')"),
    "prompt_id": (pa.string(), "id of the prompt"),
    "prompt": (pa.string(), "prompt text ('' if unknown)"),
    "mode": (pa.string(), "greedy or sample"),
    "max_new_tokens": (pa.int32(), "generation budget of the run"),
    "step": (pa.int32(), "0-based step index within the run"),
    "position": (pa.int32(), "tokens emitted before this step (sum of earlier tokens_produced)"),
    "gamma": (pa.int16(), "recorded (requested) gamma of the step"),
    "drafted": (pa.int16(), "tokens actually drafted: min(gamma, limit), limit by gamma_clip"),
    "accepted": (pa.int16(), "accepted draft tokens k"),
    "tokens_produced": (pa.int16(), "tokens emitted by the step (k + 1)"),
    "censored": (pa.bool_(), "accepted == drafted: outcomes of gammas above drafted are unknown"),
    "post_mean_entropy_bits": (pa.float32(), "POST-DRAFT: mean draft entropy (bits) over this step's drafted tokens"),
    "post_mean_confidence": (pa.float32(), "POST-DRAFT: mean draft top-1 probability over this step's drafted tokens"),
    "post_max_entropy_bits": (pa.float32(), "POST-DRAFT: max draft entropy (bits) over this step's drafted tokens"),
    "post_min_confidence": (pa.float32(), "POST-DRAFT: min draft top-1 probability over this step's drafted tokens"),
}

STEPS_COLUMNS: dict[str, tuple[pa.DataType, str]] = {
    **STEPS_COLUMNS_V1,
    "gamma_clip": (
        pa.string(),
        "clip convention of the run: engine (limit = max_new_tokens - 1 - position) or paper "
        "(limit = max_new_tokens - position)",
    ),
    "finish_reason": (
        pa.string(),
        "how the run ended: eos, length (budget reached) or truncated (cut by a wrapper)",
    ),
    "draft_fingerprint": (pa.string(), "short hash of the draft's config and weights ('' if unknown)"),
}
"""Columns of ``speckv-steps/2`` (those of version 1 plus three; run-level ones repeat per row)."""

STEPS_ARROW_SCHEMA = pa.schema(
    [pa.field(name, typ, nullable=False) for name, (typ, _) in STEPS_COLUMNS.items()],
    metadata={b"speckv_schema": STEPS_SCHEMA_VERSION.encode()},
)
