"""The step rule of replay: one definition, a scalar form and a vectorised form side by side.

Every replay path (the trace backend, the replay env's fast path, the vector env, the oracle's
dynamic programme and its fixed-gamma baseline, the step-log backend) computes a step with
this module, so there is one rule to read, test and change.

The rule. A step starts at output position ``t``; the controller requests gamma ``g`` >= 0.
Known before the step:

- ``limit`` = the most tokens the step may draft: ``max_new_tokens - 1 - t`` under the live
  engine's convention (the last emitted token is always the target's, so a step never emits
  past ``max_new_tokens``; :data:`CLIP_ENGINE`), or ``max_new_tokens - t`` under the SpecKV
  paper's convention (:data:`CLIP_PAPER`, step logs imported from the paper only);
- ``L_t`` = the run of consecutive accepted proposals starting at ``t`` (capped at the
  trace's ``gamma_max`` and at ``N - 1 - t``, see :func:`replay.trace.run_lengths`);
- ``a_t`` = whether the draft's proposal at ``t`` would be accepted (None: not known).

Then

- ``g_eff = min(g, limit)``: the gamma actually drafted;
- ``k = min(L_t, g_eff)``: accepted draft tokens;
- the step emits ``k + 1`` tokens (``tokens[t : t + k + 1]``) and moves to ``t + k + 1``;
- the acceptance events it reveals (:func:`speckv_env.core.acceptance_events`) are ``ones``
  ones followed by a zero iff ``rejected``:
  ``g_eff == 0`` -> ``[a_t]`` (``ones = a_t``, ``rejected = not a_t``; no event if ``a_t`` is
  unknown); ``k < g_eff`` -> ``k`` ones then a zero; else ``g_eff`` ones.
  Equivalently, with ``m = max(g_eff, 1)``: ``ones = min(L_t, m)`` (``a_t`` when
  ``g_eff == 0``, since ``L_t`` is also capped by the trace's end) and ``rejected = ones < m``.

:func:`step` is the scalar form (python ints, one step), :func:`step_arrays` the vectorised
form (numpy arrays, many steps at once); tests/test_steprule.py checks that they agree.
"""

from __future__ import annotations

import numpy as np

CLIP_ENGINE = "engine"
"""g_eff = min(g, max_new_tokens - 1 - t): the live engine's clip (traces, RecordSteps logs)."""
CLIP_PAPER = "paper"
"""g_eff = min(g, max_new_tokens - t): the SpecKV paper's clip (its imported step logs only)."""
CLIP_RESERVE: dict[str, int] = {CLIP_ENGINE: 1, CLIP_PAPER: 0}
"""Tokens of the budget a step may not draft into, per clip convention."""


def draft_limit(max_new_tokens: int, t: int, clip: str = CLIP_ENGINE) -> int:
    """The most tokens a step at position ``t`` may draft under the convention ``clip``."""
    try:
        return max_new_tokens - CLIP_RESERVE[clip] - t
    except KeyError:
        raise ValueError(f"unknown clip convention {clip!r}: expected one of {tuple(CLIP_RESERVE)}") from None


def step(L_t: int, a_t: bool | None, gamma: int, limit: int) -> tuple[int, int, int, bool]:
    """One step (scalar form): ``(g_eff, k, ones, rejected)``.

    ``L_t``: acceptance run at the step's position; ``a_t``: acceptance of the proposal there
    (None: unknown, then a gamma-0 step reveals no event); ``gamma``: requested gamma;
    ``limit``: :func:`draft_limit`. The step emits ``k + 1`` tokens and the next position is
    ``t + k + 1``; its events are ``ones`` ones then a zero iff ``rejected``.
    """
    g = gamma if gamma < limit else limit
    if g == 0:
        if a_t is None:
            return 0, 0, 0, False
        return 0, 0, (1 if a_t else 0), not a_t
    k = L_t if L_t < g else g
    return g, k, k, k < g


def step_arrays(
    L_t: np.ndarray, a_t: np.ndarray, gamma: np.ndarray | int, limit: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Many steps at once (vectorised form of :func:`step`, broadcasting): ``(g_eff, k, ones, rejected)``.

    ``L_t``, ``gamma`` and ``limit`` are integer arrays (or scalars) and ``a_t`` a bool or 0/1
    array (every ``a_t`` known), broadcasting together; ``g_eff``, ``k`` and ``ones`` come back
    as integer arrays, ``rejected`` as a bool array.
    """
    geff = np.minimum(gamma, limit)
    k = np.minimum(L_t, geff)
    m = np.maximum(geff, 1)
    ones = np.minimum(L_t, m)
    np.copyto(ones, a_t, where=geff == 0, casting="unsafe")  # g_eff == 0: the event is a_t itself
    return geff, k, ones, ones < m


def events(ones: int, rejected: bool) -> list[int]:
    """The acceptance events as a list: ``ones`` ones, then a zero iff ``rejected``."""
    return [1] * ones + [0] if rejected else [1] * ones
