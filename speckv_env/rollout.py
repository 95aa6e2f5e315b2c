"""The draft's own rollouts from every position of a decoded sequence (``speckv-trace/2``).

Token mode (``control="token"``) decides per drafted token, and its decisions after a rejected
token see the draft continuing from its own (wrong) tokens. To replay any stop policy exactly,
a trace stores, for every output position t, the draft's rollout from the true prefix
``y[:t]`` for ``gamma_max`` tokens: token i is drafted from the draft's distribution after
``y[:t] + d_0 .. d_{i-1}`` by the engine's own rule (:meth:`SpeculativeEngine._pick`: greedy
argmax, or a sample with the uniform keyed by output position t + i), and with it are stored
that distribution's signals (top-1 probability, entropy, margin) and the drafted token's own
probability. The first entry of position t is the trace's pre-choice signal at t.

Cost. Rollouts share work: when the rollout from t proposed the emitted token (``d_0 ==
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


def _entry(engine: Any, logits: torch.Tensor, pos: int) -> tuple[int, float, float, float, float]:
    """(token, top1, entropy, margin, own probability) of drafting at output position ``pos``."""
    d, _ = engine._pick(logits, pos)
    s = _signals_from_logits(logits)
    p = _token_prob(logits, d)
    return d, s.top1, s.entropy, s.margin, p


@torch.inference_mode()
def draft_rollouts(engine: Any, prompt_ids: list[int], tokens: list[int], gamma_max: int) -> Rollouts:
    """The draft's rollouts from every position of ``tokens`` (the sequence ``engine`` decoded
    from ``prompt_ids``; call after :meth:`SpeculativeEngine.generate`, whose seed keys the
    sampling uniforms). Uses its own draft cache; the engine's state is left as it was."""
    from transformers import DynamicCache

    from .engine import _crop, _rollback_cache

    n, G = len(tokens), int(gamma_max)
    if n < 1 or G < 1:
        raise ValueError(f"rollouts need at least one token and gamma_max >= 1 (got {n}, {G})")
    # the engine's uniforms, extended (numpy fills row by row: the first rows are the engine's)
    engine_u = engine._u
    engine._u = np.random.default_rng(engine.seed).random((engine.max_new_tokens + G + 1, 3))
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
    return Rollouts(
        tokens=out[:, :, 0].astype(np.int32),
        top1=out[:, :, 1].astype(np.float32),
        entropy=out[:, :, 2].astype(np.float32),
        margin=out[:, :, 3].astype(np.float32),
        p=out[:, :, 4].astype(np.float32),
        forwards=forwards,
    )
