"""The context n-gram search behind the draft's lookup and the observation's lookup features.

Pure numpy (no torch), so the replay environments and :mod:`speckv_env.core` can use it. At a
position ``i`` of a token sequence ``ids`` (predicting the token after ``ids[:i]``), the longest
suffix of ``ids[:i]``, up to ``max_ngram`` tokens, that also occurs earlier is found; the token
that followed its most recent earlier occurrence is the *copy proposal* and the suffix length
the *match length* (proposal -1 and length 0 when nothing matches). :func:`lookup_table` answers
a range of positions in one pass, :func:`lookup_one` one position with a vectorised search; they
give the same answers (tests/test_lookup.py checks both against a brute force).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["lookup_one", "lookup_table"]


def lookup_table(ids: Sequence[int] | np.ndarray, start: int, max_ngram: int) -> tuple[np.ndarray, np.ndarray]:
    """Copy proposals for every position ``i`` in ``start .. len(ids)``: the token predicted to
    follow ``ids[:i]`` and the match length (0 and proposal -1 when nothing matches).

    One left-to-right pass with a dict per n-gram length: O(len(ids) * max_ngram).
    """
    ids = [int(x) for x in ids]
    L = len(ids)
    start = max(int(start), 0)
    props = np.full(max(L + 1 - start, 0), -1, dtype=np.int64)
    ns = np.zeros_like(props)
    last: list[dict] = [{} for _ in range(max_ngram + 1)]
    for i in range(1, L + 1):
        if i >= start:
            for n in range(min(max_ngram, i), 0, -1):
                j = last[n].get(tuple(ids[i - n : i]))
                if j is not None:
                    props[i - start], ns[i - start] = ids[j], n
                    break
        if i < L:
            for n in range(1, min(max_ngram, i) + 1):
                last[n][tuple(ids[i - n : i])] = i
    return props, ns


def lookup_one(a: np.ndarray, max_ngram: int) -> tuple[int, int]:
    """Copy proposal and match length for the position right after ``a`` (vectorised search, for
    a few positions)."""
    L = a.shape[0]
    for n in range(min(max_ngram, L - 1), 0, -1):
        suf = a[L - n :]
        # windows a[j:j+n] with j + n <= L - 1, so that a[j + n] exists and lies before the suffix
        m = a[: L - n] == suf[0]
        for k in range(1, n):
            m &= a[k : L - n + k] == suf[k]
        hits = np.flatnonzero(m)
        if hits.size:
            return int(a[hits[-1] + n]), n
    return -1, 0
