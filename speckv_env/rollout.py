"""The draft's own rollouts from every position of a decoded sequence (``speckv-trace/2``).

Token mode (``control="token"``) decides per drafted token, and its decisions after a rejected
token see the draft continuing from its own (wrong) tokens. To replay any stop policy exactly,
a trace stores, for every output position t, the draft's rollout from the true prefix
``y[:t]`` for ``gamma_max`` tokens: token i is drafted from the draft's distribution after
``y[:t] + d_0 .. d_{i-1}`` by the engine's own rule (:meth:`SpeculativeEngine._pick`: greedy
argmax, or a sample with the uniform keyed by output position t + i), and with it are stored
that distribution's signals (top-1 probability, entropy, margin) and the drafted token's own
probability. The first entry of position t is the trace's pre-choice signal at t.

Cost. With a row-invariant draft (``exact``) the rollouts run level by level: token i of every
position's rollout in one batched forward, each row attending to exactly its own prefix
(:func:`batched_rollouts`; about 3-5x faster than one position at a time on the CPU, and
bit-identical to it, tested). Otherwise (:func:`sequential_rollouts`) rollouts share work: when
the rollout from t proposed the emitted token (``d_0 ==
y[t]``), the rollout from t + 1 is the same tokens shifted by one (same prefix, same
position-keyed uniforms), so it needs one draft forward; otherwise ``gamma_max``. With
row-invariant kernels (``exact``) every row is bit-identical to the one live decoding
computes, however the forwards were grouped, which is what makes the replay exact.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .engine import _signals_from_logits, _token_prob


@dataclass
class Rollouts:
    """Rollouts of one sequence: arrays of shape ``(N, gamma_max)`` (row t = the rollout from t)."""

    tokens: np.ndarray
    top1: np.ndarray
    entropy: np.ndarray
    margin: np.ndarray
    p: np.ndarray
    forwards: int  # draft forwards run (the cost)

    @classmethod
    def of_entries(cls, out: np.ndarray, forwards: int) -> Rollouts:
        """From an ``(N, gamma_max, 5)`` array of :func:`_entry` tuples (token, top1, entropy,
        margin, own probability), in the trace's dtypes."""
        f32 = np.float32
        return cls(
            tokens=out[:, :, 0].astype(np.int32),
            top1=out[:, :, 1].astype(f32),
            entropy=out[:, :, 2].astype(f32),
            margin=out[:, :, 3].astype(f32),
            p=out[:, :, 4].astype(f32),
            forwards=forwards,
        )


def _entry(engine: Any, logits: torch.Tensor, pos: int) -> tuple[int, float, float, float, float]:
    """(token, top1, entropy, margin, own probability) of drafting at output position ``pos``."""
    d, _ = engine._pick(logits, pos)
    s = _signals_from_logits(logits)
    p = _token_prob(logits, d)
    return d, s.top1, s.entropy, s.margin, p


CHUNK = 8
"""Emitted tokens fed per prefix forward in the batched rollouts (within the row counts whose
row-invariance the tests check)."""


@torch.inference_mode()
def draft_rollouts(engine: Any, prompt_ids: list[int], tokens: list[int], gamma_max: int) -> Rollouts:
    """The draft's rollouts from every position of ``tokens``: batched over positions when the
    draft is row-invariant (:func:`batched_rollouts`, bit-identical to the one-position-at-a-time
    computation, tested), else one position at a time (:func:`sequential_rollouts`)."""
    from .invariant import is_row_invariant

    if is_row_invariant(engine.draft) and len(tokens) > 1:
        return batched_rollouts(engine, prompt_ids, tokens, gamma_max)
    return sequential_rollouts(engine, prompt_ids, tokens, gamma_max)


@torch.inference_mode()
def sequential_rollouts(engine: Any, prompt_ids: list[int], tokens: list[int], gamma_max: int) -> Rollouts:
    """The draft's rollouts from every position of ``tokens`` (the sequence ``engine`` decoded
    from ``prompt_ids``; call after :meth:`SpeculativeEngine.generate`, whose seed keys the
    sampling uniforms). Uses its own draft cache; the engine's state is left as it was."""
    from transformers import DynamicCache

    from .engine import _crop, _rollback_cache

    n, G = len(tokens), int(gamma_max)
    if n < 1 or G < 1:
        raise ValueError(f"rollouts need at least one token and gamma_max >= 1 (got {n}, {G})")
    engine_u, engine._u = engine._u, _extended_uniforms(engine, G)
    cache = _rollback_cache(DynamicCache(config=engine.draft.config))
    P = len(prompt_ids)
    out = np.zeros((n, G, 5))
    forwards = 0

    def forward(ids: list[int]) -> torch.Tensor:
        nonlocal forwards
        forwards += 1
        o = engine.draft(
            input_ids=torch.tensor([ids], device=engine.draft_device), use_cache=True, **{engine._d_kv: cache}
        )
        return o.logits[0, -1]

    try:
        cur: list[tuple] = []  # the rollout from the current position: G entries
        for t in range(n):
            if t > 0 and cur[0][0] == tokens[t - 1]:  # shift: the rollout from t-1 proposed y[t-1]
                logits = forward([cur[-1][0]])  # the cache holds y[:t] + cur[1:-1]
                cur = [*cur[1:], _entry(engine, logits, t + G - 1)]
            else:
                if t > 0:
                    _crop(cache, P + t - 1)
                logits = forward(list(prompt_ids) if t == 0 else [tokens[t - 1]])
                cur = [_entry(engine, logits, t)]
                for i in range(1, G):
                    logits = forward([cur[-1][0]])
                    cur.append(_entry(engine, logits, t + i))
            out[t] = np.asarray(cur, dtype=np.float64)
    finally:
        engine._u = engine_u
    return Rollouts.of_entries(out, forwards)


def _extended_uniforms(engine: Any, G: int) -> np.ndarray:
    """The engine's uniforms extended past its budget (numpy fills row by row: the first rows are
    the engine's own)."""
    return np.random.default_rng(engine.seed).random((engine.max_new_tokens + G + 1, 3))


def _prefix_rows(engine: Any, prompt_ids: list[int], tokens: list[int], cache: Any) -> list[torch.Tensor]:
    """Feed the prompt (one forward, as the engine's draft prefill) and ``tokens[:-1]`` (chunks of
    :data:`CHUNK`) into ``cache``; the logits row at every position t (the draft's distribution
    after ``prompt + tokens[:t]``)."""
    kv = {engine._d_kv: cache}
    dev = engine.draft_device
    rows = [engine.draft(input_ids=torch.tensor([prompt_ids], device=dev), use_cache=True, **kv).logits[0, -1]]
    for i in range(0, len(tokens) - 1, CHUNK):
        chunk = tokens[i : min(i + CHUNK, len(tokens) - 1)]
        out = engine.draft(input_ids=torch.tensor([chunk], device=dev), use_cache=True, logits_to_keep=len(chunk), **kv)
        rows.extend(out.logits[0, -len(chunk) :])
    return rows


def _batched_cache(engine: Any, prefix: Any, P: int, n: int, context: list[int]) -> tuple[Any, list[int]]:
    """A batch cache of ``n`` rows, row t holding the prefix cache's first P + t positions,
    left-padded to a common length; returns it and each row's padding."""
    from transformers import DynamicCache

    L = P + n - 1
    pads = [L - (P + t) for t in range(n)]
    cache = DynamicCache(config=engine.draft.config)
    for layer, (k, v) in enumerate(zip(*_layer_kv(prefix))):
        kb = k.new_zeros((n, *k.shape[1:2], L, k.shape[-1]))
        vb = v.new_zeros((n, *v.shape[1:2], L, v.shape[-1]))
        for t in range(n):
            kb[t, :, pads[t] :] = k[0, :, : P + t]
            vb[t, :, pads[t] :] = v[0, :, : P + t]
        cache.update(kb, vb, layer)
    hist = np.full((n, L), -1, dtype=np.int64)  # the draft's context lookup reads each row's tokens
    for t in range(n):
        hist[t, pads[t] :] = context[: P + t]
    cache._speckv_ids = hist  # type: ignore[attr-defined]  # the draft's lookup history (draft._context_rows)
    return cache, pads


def _layer_kv(cache: Any) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per-layer key and value tensors of a one-row DynamicCache."""
    layers = getattr(cache, "layers", None)
    if layers is not None:
        return [lay.keys for lay in layers], [lay.values for lay in layers]
    return list(cache.key_cache), list(cache.value_cache)


@torch.inference_mode()
def batched_rollouts(engine: Any, prompt_ids: list[int], tokens: list[int], gamma_max: int) -> Rollouts:
    """:func:`sequential_rollouts` computed level by level: the rollouts' token i at every
    position in one batched forward, each row attending to exactly its own prefix
    (:func:`speckv_env.invariant.padded_rows`). Needs a row-invariant draft."""
    from transformers import DynamicCache

    from .invariant import padded_rows

    n, G, P = len(tokens), int(gamma_max), len(prompt_ids)
    engine_u, engine._u = engine._u, _extended_uniforms(engine, G)
    try:
        prefix = DynamicCache(config=engine.draft.config)
        rows = _prefix_rows(engine, list(prompt_ids), list(tokens), prefix)
        forwards = 1 + -(-(n - 1) // CHUNK)
        cur = [_entry(engine, rows[t], t) for t in range(n)]
        out = np.zeros((n, G, 5))
        out[:, 0] = np.asarray(cur, dtype=np.float64)
        cache, pads = _batched_cache(engine, prefix, P, n, list(prompt_ids) + list(tokens))
        dev = engine.draft_device
        for i in range(1, G):
            ids = torch.tensor([[int(e[0])] for e in cur], device=dev)
            pos = torch.tensor([[P + t + i - 1] for t in range(n)], device=dev)
            with padded_rows(pads):
                logits = engine.draft(
                    input_ids=ids, position_ids=pos, use_cache=True, logits_to_keep=1, **{engine._d_kv: cache}
                ).logits[:, -1]
            forwards += 1
            cur = [_entry(engine, logits[t], t + i) for t in range(n)]
            out[:, i] = np.asarray(cur, dtype=np.float64)
    finally:
        engine._u = engine_u
    return Rollouts.of_entries(out, forwards)
