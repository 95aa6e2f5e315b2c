"""replay.steprule: the scalar and vectorised forms of the one step rule agree, and match the
rule as stated (g_eff, k, the acceptance events, the next position) on real trace shapes."""

from __future__ import annotations

import numpy as np
import pytest

from replay import steprule
from replay.trace import run_lengths, synthetic_trace
from speckv_env.core import acceptance_events


def _stated(L_t: int, a_t: bool | None, gamma: int, limit: int) -> tuple[int, int, list[int]]:
    """The rule exactly as the module docstring states it, written independently."""
    g_eff = min(gamma, limit)
    k = min(L_t, g_eff)
    if g_eff == 0:
        return g_eff, k, [] if a_t is None else [int(a_t)]
    return g_eff, k, [1] * k + [0] if k < g_eff else [1] * g_eff


@pytest.mark.parametrize("seed", range(6))
def test_scalar_and_vector_forms_agree_on_random_traces(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 80))
    finish = "eos" if seed % 2 else "length"
    mnt = n if finish == "length" else n + int(rng.integers(0, 5))  # EOS may end exactly at the budget
    accept = rng.random(n) < rng.uniform(0.1, 0.99)
    gmax = int(rng.integers(1, 12))
    L = run_lengths(accept, gmax).astype(np.int64)
    t = np.repeat(np.arange(n), 4)
    gamma = rng.integers(0, gmax + 1, size=t.shape[0])
    gamma[::7] = gmax  # always some of the largest gamma, which the budget end clips
    limit = mnt - 1 - t
    g_v, k_v, ones_v, rej_v = steprule.step_arrays(L[t], accept[t], gamma, limit)
    assert g_v.dtype.kind == k_v.dtype.kind == ones_v.dtype.kind == "i" and rej_v.dtype == bool
    clipped = 0
    for i in range(t.shape[0]):
        ti = int(t[i])
        g, k, ones, rej = steprule.step(int(L[ti]), bool(accept[ti]), int(gamma[i]), int(limit[i]))
        assert (g, k, ones, rej) == (int(g_v[i]), int(k_v[i]), int(ones_v[i]), bool(rej_v[i]))
        ge, ke, ev = _stated(int(L[ti]), bool(accept[ti]), int(gamma[i]), int(limit[i]))
        assert (g, k) == (ge, ke) and steprule.events(ones, rej) == ev
        assert ev == acceptance_events(g, k, bool(accept[ti]) if g == 0 else None)
        assert ti + k + 1 <= n  # never past the trace's end (EOS or budget)
        clipped += g < gamma[i]
    assert clipped == int((gamma > limit).sum())
    if finish == "length":  # the last position's limit is 0, where gamma_max >= 1 is clipped
        assert clipped > 0


def test_budget_end_and_eos_cases() -> None:
    # last position of a length-finished trace: limit 0, so every gamma becomes a target step
    # whose event is a_t, although L_t is 0 there (the run is capped by the trace's end)
    assert steprule.step(0, True, 8, 0) == (0, 0, 1, False)
    assert steprule.step(0, False, 8, 0) == (0, 0, 0, True)
    # two tokens before the budget: gamma 8 drafts 1; all accepted -> no rejection event
    assert steprule.step(3, True, 8, 1) == (1, 1, 1, False)
    # EOS inside a run: L_t stops at the EOS position, k < g_eff -> a rejection event
    assert steprule.step(2, True, 5, 10) == (5, 2, 2, True)
    # an unknown a_t (censored step logs) reveals no event at gamma 0
    assert steprule.step(0, None, 0, 5) == (0, 0, 0, False)
    assert steprule.events(0, False) == []
    g, k, ones, rej = steprule.step_arrays(np.array([0, 3, 2]), np.array([True, True, True]), 8, np.array([0, 1, 10]))
    assert g.tolist() == [0, 1, 8] and k.tolist() == [0, 1, 2] and ones.tolist() == [1, 1, 2]
    assert rej.tolist() == [False, False, True]


def test_clip_conventions() -> None:
    assert steprule.draft_limit(80, 77) == 2 and steprule.draft_limit(80, 77, steprule.CLIP_ENGINE) == 2
    assert steprule.draft_limit(80, 77, steprule.CLIP_PAPER) == 3
    with pytest.raises(ValueError, match="unknown clip convention 'x'"):
        steprule.draft_limit(80, 0, "x")


def test_trace_step_and_oracle_use_the_rule() -> None:
    tr = synthetic_trace(50, seed=3, finish_reason="eos")
    t = np.arange(tr.n)
    for g in range(tr.gamma_max + 1):
        g_v, k_v, _, _ = steprule.step_arrays(tr.L.astype(np.int64), tr.accept, g, tr.max_new_tokens - 1 - t)
        assert [tr.step(int(p), g) for p in t] == list(zip(g_v.tolist(), k_v.tolist()))
