"""experiments/trace_invariance.py: a recorded trace decoded again at gamma 0 matches, a changed
token is found where it is, and the summary counts per compression and mode."""

from __future__ import annotations

import dataclasses
import importlib.util
import sys
from pathlib import Path

import pytest
from tiny_models import make_tiny_smol_pair

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def ti():
    spec = importlib.util.spec_from_file_location("trace_invariance", REPO / "experiments" / "trace_invariance.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules["trace_invariance"] = mod
    spec.loader.exec_module(mod)
    return mod


def test_first_difference(ti):
    assert ti.first_difference([1, 2, 3], [1, 2, 3]) is None
    assert ti.first_difference([1, 2, 3], [1, 5, 3]) == 1
    assert ti.first_difference([1, 2], [1, 2, 3]) == 2  # a length difference counts


@pytest.mark.parametrize("mode", ["greedy", "sample"])
def test_recorded_trace_equals_gamma0_and_a_change_is_found(ti, mode):
    from speckv_env.app.profile import make_engines, record_episode
    from speckv_env.prompts import load_prompts

    pair = make_tiny_smol_pair()
    engines = make_engines(pair, [mode], 8)
    prompt = load_prompts(task="math", split="test")[0]
    # recorded under random gammas 1..6 (the shipped data's behaviour), checked at gamma 0
    tr = record_episode(
        engines[mode], pair, prompt, max_new_tokens=24, gamma_max=8, mode=mode, seed=7, behaviour="uniform:1-6"
    )
    assert max(int(g) for g in tr.step_gamma) > 0
    r = ti.check_trace(make_engines(pair, [mode], 8), tr)
    assert r["first_difference"] is None and r["tokens"] == tr.n and r["exact"] == pair.exact
    bad = dataclasses.replace(tr, tokens=tr.tokens.copy())
    bad.tokens[5] = (int(bad.tokens[5]) + 1) % 64
    assert ti.check_trace(engines, bad)["first_difference"] == 5
    s = ti.summarise([r, {**r, "trace_id": "x", "first_difference": 5}])
    assert s[f"fp32/{mode}"]["outputs"] == 2 and s[f"fp32/{mode}"]["changed"] == 1
    assert s[f"fp32/{mode}"]["first_difference_at"] == [5]
    assert s[f"fp32/{mode}"]["tokens_compared"] == 2 * tr.n


def test_v1_trace_is_refused(ti):
    from replay.trace import synthetic_trace

    tr = synthetic_trace(16)  # speckv-trace/1: no prompt tokens
    with pytest.raises(ValueError, match="no prompt_tokens"):
        ti.check_trace({tr.mode: None}, tr)
