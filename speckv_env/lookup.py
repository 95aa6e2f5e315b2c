"""Context n-gram lookup ("prompt lookup") mixed into a draft's distribution.

At every position the longest suffix of the context (prompt + tokens so far), up to
``max_ngram`` tokens, that also occurs earlier in the context is found; the token that
followed its most recent earlier occurrence is the *copy proposal* ``c`` and the suffix
length is the match length ``n``. The draft's distribution becomes the mixture

    q'(x) = (1 - w_n) q(x) + w_n [x = c],

with one weight per match length (``weights[n - 1]``; no match means w = 0, q' = q). The
proposal depends only on the prefix, never on where a speculation step started, so a draft
with lookup is still a function of the true prefix: full-information traces and exact
counterfactual replay (replay/SCHEMA.md) hold for it unchanged, and the target still
verifies every token (losslessness does not depend on q').

Greedy drafting picks c exactly when w_n / (1 - w_n) >= max q - q(c). The weights are fitted
on the training prompts by ``experiments/fit_lookup.py``; how they were chosen is recorded in
the shipped draft's TRAINING.md.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from .ngram import lookup_one as _lookup_one
from .ngram import lookup_table

__all__ = ["ContextLookup", "lookup_table"]


class ContextLookup:
    """Mix the copy proposal into draft logits; see the module docstring.

    ``weights[n - 1]`` is w_n for match length n (1 <= n <= len(weights) = max n-gram length).
    """

    def __init__(self, weights: Sequence[float]):
        w = [float(x) for x in weights]
        if not w or any(not (0.0 <= x < 1.0) or not math.isfinite(x) for x in w):
            raise ValueError(f"lookup weights must be a non-empty list of numbers in [0, 1), got {list(weights)}")
        self.weights = w
        self.max_ngram = len(w)

    def proposals(self, row: np.ndarray, positions: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        """(proposal, match length) for the token after ``row[:i + 1]`` for each i in ``positions``."""
        positions = list(positions)
        if len(positions) > 8:
            props, ns = lookup_table(row[: positions[-1] + 1], positions[0] + 1, self.max_ngram)
            idx = np.asarray(positions) - positions[0]
            return props[idx], ns[idx]
        out = [_lookup_one(row[: i + 1], self.max_ngram) for i in positions]
        return np.array([o[0] for o in out], dtype=np.int64), np.array([o[1] for o in out], dtype=np.int64)

    def mix(self, logits: torch.Tensor, props: np.ndarray, ns: np.ndarray) -> torch.Tensor:
        """log q' for logits ``[P, V]`` (float32 out; rows without a match are log_softmax(logits))."""
        logq = torch.log_softmax(logits.float(), dim=-1)
        for r in range(logq.shape[0]):
            n, c = int(ns[r]), int(props[r])
            if n <= 0 or c < 0 or c >= logq.shape[-1]:
                continue
            w = self.weights[n - 1]
            if w <= 0.0:
                continue
            row = logq[r]
            at_c = float(torch.logaddexp(row[c] + math.log1p(-w), torch.tensor(math.log(w))))
            row.add_(math.log1p(-w))
            row[c] = at_c
        return logq
