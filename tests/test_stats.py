"""agents.stats: the cluster (prompt) bootstrap, Holm's adjustment, p-values at the resampling
floor, and the comparison's gap captured in tokens/s."""

from __future__ import annotations

import math

import numpy as np
import pytest

from agents import stats
from speckv_env.app.metrics import _gap_captured_tps
from speckv_env.app.report import _p_cell


def test_cluster_weights_keep_a_prompts_episodes_together():
    prompts = np.repeat([f"p{i}" for i in range(7)], 3)[np.random.default_rng(0).permutation(21)]
    W = stats.cluster_weights(prompts, 500, 1)
    assert W.shape == (500, 21)
    for p in set(prompts):
        cols = W[:, prompts == p]
        assert (cols == cols[:, :1]).all()  # every episode of a prompt drawn as often as the prompt
    # each resample draws as many prompts as there are: 7 prompts x 3 episodes
    np.testing.assert_array_equal(W.sum(axis=1), np.full(500, 21.0))
    # one episode per cluster is the episode bootstrap
    ids = np.arange(9)
    np.testing.assert_array_equal(stats.cluster_weights(ids, 50, 3), stats.resample_weights(9, 50, 3))


def test_cluster_bootstrap_is_wider_when_a_prompts_traces_are_correlated():
    rng = np.random.default_rng(4)
    n_prompts, per = 40, 6  # e.g. 3 compressions x 2 modes per prompt
    speed = rng.lognormal(0.0, 0.4, n_prompts)
    prompts = np.repeat(np.arange(n_prompts), per)
    N = np.full(n_prompts * per, 100.0)
    T = N / np.repeat(speed, per)  # the traces of one prompt are perfectly correlated
    Wt = stats.resample_weights(N.size, 2000, 5)  # by trace (the old, wrong unit)
    Wc = stats.cluster_weights(prompts, 2000, 5)  # by prompt
    a, b = stats.ratio_ci(N, T, Wt), stats.ratio_ci(N, T, Wc)
    assert a["value"] == b["value"]
    width_t, width_c = a["hi"] - a["lo"], b["hi"] - b["lo"]
    # 6 identical copies per prompt: the trace bootstrap acts as if there were 240 independent
    # prompts, so its interval is about sqrt(6) ~ 2.4 times too narrow
    assert width_c > 1.8 * width_t
    assert width_c == pytest.approx(math.sqrt(per) * width_t, rel=0.25)


def test_holm_against_hand_computed_example():
    p = [0.01, 0.04, 0.03, 0.005]
    # sorted: 0.005 x 4 = 0.02; 0.01 x 3 = 0.03; 0.03 x 2 = 0.06; 0.04 x 1 = 0.04 -> max(0.06, 0.04)
    adj, bound = stats.holm(p)
    np.testing.assert_allclose(adj, [0.03, 0.06, 0.06, 0.02])
    assert not bound.any()
    adj, _ = stats.holm([0.5, 0.4, 0.3])  # capped at 1 and monotone
    np.testing.assert_allclose(adj, [0.9, 0.9, 0.9])
    adj, _ = stats.holm([0.2, 0.9])
    np.testing.assert_allclose(adj, [0.4, 0.9])
    adj, _ = stats.holm([0.01, math.nan, 0.02])  # NaN is outside the family (m = 2)
    np.testing.assert_allclose(adj[[0, 2]], [0.02, 0.02])
    assert math.isnan(adj[1])
    # an adjusted value that comes from a p-value at the floor is an upper bound
    adj, bound = stats.holm([0.001, 0.3], [True, False])
    np.testing.assert_allclose(adj, [0.002, 0.3])
    assert bound.tolist() == [True, False]


def test_p_at_the_floor_is_a_bound():
    B = 1999
    t = stats.p_test(np.linspace(0.1, 1.0, B))  # no resample crosses zero
    assert t["p_at_floor"] and t["p"] == pytest.approx(2 / (B + 1)) and t["n_boot"] == B
    assert t["p_text"] == "< 2/(B+1) = 0.001 (B = 1999)"
    reps = np.linspace(-0.1, 1.0, B)  # some resamples on the other side
    u = stats.p_test(reps)
    assert not u["p_at_floor"] and u["p"] > 2 / (B + 1) and not u["p_text"].startswith("<")
    assert stats.format_p(0.0123, 2000, False) == "0.012"
    same = stats.p_test(np.zeros(100))
    assert same["p"] == 1.0 and not same["p_at_floor"]
    # the paired test and the report's cell carry the bound, never "p = 0.001"
    n = 50
    rng = np.random.default_rng(2)
    Nn = rng.integers(60, 160, n).astype(float)
    T = Nn / rng.uniform(1.2, 2.5, n)
    v = stats.paired_ratio_test(Nn, T / 1.05, Nn, T, stats.resample_weights(n, 2000, 1))
    assert v["p_at_floor"] and v["p"] == pytest.approx(2 / 2001)
    assert v["rel_lo"] <= v["rel"] <= v["rel_hi"] and v["rel"] == pytest.approx(0.05)
    assert _p_cell(v).startswith("< 0.001")
    assert _p_cell({**v, "p_holm": 0.02, "p_holm_bound": True}) == "< 0.001 / ≤ 0.020"


def test_gap_captured_in_tokens_per_second():
    N = np.array([100.0, 200.0])
    T_fixed = np.array([4.0, 6.0])  # 30 tokens/s
    T_oracle = np.array([2.0, 3.0])  # 60 tokens/s
    T = np.array([3.0, 4.0])
    tps = N.sum() / T.sum()
    W = stats.resample_weights(2, 200, 0)
    g = _gap_captured_tps(N, T, T_oracle, T_fixed, W, 0.95)
    assert g["value"] == pytest.approx((tps - 30.0) / (60.0 - 30.0))
    # half-way in tokens/s (45 tokens/s) is not half-way in time
    T_half = T_fixed * 30.0 / 45.0
    assert _gap_captured_tps(N, T_half, T_oracle, T_fixed, W, 0.95)["value"] == pytest.approx(0.5)
    assert (T_fixed.sum() - T_half.sum()) / (T_fixed.sum() - T_oracle.sum()) == pytest.approx(2 / 3)
