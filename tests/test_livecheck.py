"""The live check: the paired-difference statistic on constructed numbers, ABBA order, and a
whole check on a tiny pair (host cost model, traces recorded exact: tokens compared)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from conftest import requires_default

from speckv_env.app import livecheck as lc


def test_t_interval_of_a_mean():
    r = lc.mean_ci([0.0, 0.0, 0.5, 0.0])
    # mean 0.125, sd 0.25, se 0.125, t(3) = 3.182
    assert r["mean"] == pytest.approx(0.125)
    assert r["lo"] == pytest.approx(0.125 - 3.182 * 0.125) and r["hi"] == pytest.approx(0.125 + 3.182 * 0.125)
    assert lc.mean_ci([1.0])["lo"] == -math.inf
    assert lc.t975(1) == 12.706 and lc.t975(14) == 2.179 and lc.t975(1000) == 1.980


def test_paired_differences_on_constructed_numbers():
    measured = {
        "base": [10.0, 12.0, 11.0, 13.0],
        "good": [12.0, 14.0, 13.5, 15.0],  # +2, +2, +2.5, +2 measured
        "wrong_sign": [8.0, 10.0, 9.0, 11.0],  # -2 everywhere
        "biased": [10.5, 12.5, 11.5, 13.5],  # +0.5 measured, +0.4 predicted: off, but within the margin
    }
    predicted = {
        "base": [10.0, 10.0, 10.0, 10.0],
        "good": [12.0, 12.0, 12.0, 12.0],
        "wrong_sign": [12.0, 12.0, 12.0, 12.0],
        "biased": [10.4, 10.4, 10.4, 10.4],
    }
    rows = {r["policy"]: r for r in lc.paired_differences(measured, predicted, "base", margin_rel=0.05)}
    assert set(rows) == {"good", "wrong_sign", "biased"}
    g = rows["good"]
    assert g["measured_diff"]["mean"] == pytest.approx(2.125) and g["predicted_diff"]["mean"] == pytest.approx(2.0)
    assert g["discrepancy"]["mean"] == pytest.approx(0.125)
    assert g["consistent"] and g["agree"] and g["sign_agrees"]
    assert g["per_prompt_measured"] == [2.0, 2.0, 2.5, 2.0]
    w = rows["wrong_sign"]
    assert w["discrepancy"]["mean"] == pytest.approx(-4.0) and not w["agree"] and not w["sign_agrees"]
    b = rows["biased"]  # zero-spread discrepancy of +0.1: not consistent with 0, but inside 5% of 11.5
    assert not b["consistent"] and b["within_margin"] and b["agree"]
    assert b["margin"] == pytest.approx(0.05 * 11.5)


def test_paired_differences_are_per_prompt_not_interval_overlap():
    # a policy that is better on every prompt by the predicted amount, on prompts of very
    # different speeds: overlapping per-policy intervals would say nothing, the paired test agrees
    base = np.array([5.0, 20.0, 40.0, 10.0, 30.0])
    rows = lc.paired_differences({"b": base, "p": base + 1.0}, {"b": base * 0 + 20, "p": base * 0 + 21}, "b")
    assert rows[0]["discrepancy"]["mean"] == pytest.approx(0.0) and rows[0]["agree"]
    assert rows[0]["measured_diff"]["lo"] == pytest.approx(1.0)  # no spread in the paired differences


def test_disagreements_name_each_failed_check():
    def row(policy, ratio):
        return {"policy": policy, "ratio": ratio, "within_tolerance": abs(ratio - 1.0) <= lc.RATIO_TOL}

    r = {
        "compressions": {
            "fp32": {
                "paired": [{"policy": "a", "agree": True}, {"policy": "b", "agree": False}],
                "rows": [row("fixed-2", 1.0), row("a", 0.8), row("b", 1.149)],
            },
            "nf4": {"paired": [{"policy": "a", "agree": False}], "rows": [row("fixed-3", 1.2), row("a", 0.9)]},
        }
    }
    assert lc.disagreements(r) == [
        "fp32/b (paired difference)",
        "fp32/a (ratio 0.80)",
        "nf4/a (paired difference)",
        "nf4/fixed-3 (ratio 1.20)",
    ]
    for c in r["compressions"].values():
        for p in c["paired"]:
            p["agree"] = True
        for x in c["rows"]:
            x["within_tolerance"] = True
    assert lc.disagreements(r) == []


def test_abba_order():
    assert lc.abba_order(["A", "B"], 0) == ["A", "B", "B", "A"]
    assert lc.abba_order(["A", "B"], 1) == ["B", "A", "A", "B"]
    o = lc.abba_order(["A", "B", "C"], 0)
    assert o == ["A", "B", "C", "C", "B", "A"]
    for name in "ABC":  # every policy twice, at positions averaging to the same
        pos = [i for i, x in enumerate(o) if x == name]
        assert len(pos) == 2 and sum(pos) == len(o) - 1


class _FakeEnv:
    """Two steps per episode; logs which policy ran which episode."""

    def __init__(self, log, live):
        self.log, self.live, self.agent = log, live, None

    def reset(self, options=None):
        self.ep, self.t = options["episode"], 0
        self.log.append((self.agent, self.ep, self.live))
        return 0, {}

    def step(self, action):
        self.t += 1
        info = {"tokens": [self.ep, self.t], "emitted": 2, "measured_time": 0.1 if self.live else None}
        info["modelled_time"] = 0.1
        return 0, 0.0, self.t >= 2, False, info


class _FakeAgent:
    def __init__(self, name):
        self.name = name

    def bind(self, env):
        env.agent = self.name

    def begin_episode(self, env, info):
        pass

    def act(self, obs):
        return 0


def test_run_abba_interleaves_live_runs_per_prompt():
    log: list = []
    live, replay = _FakeEnv(log, True), _FakeEnv(log, False)
    agents = {n: _FakeAgent(n) for n in ("A", "B", "C")}
    runs = lc.run_abba(live, replay, agents, n_prompts=3)
    live_log = [(a, e) for a, e, is_live in log if is_live]
    assert [a for a, e in live_log if e == 0] == ["A", "B", "C", "C", "B", "A"]
    assert [a for a, e in live_log if e == 1] == ["C", "B", "A", "A", "B", "C"]
    assert [e for _, e in live_log] == [0] * 6 + [1] * 6 + [2] * 6  # one prompt at a time
    assert sorted((a, e) for a, e, is_live in log if not is_live) == [(a, e) for a in "ABC" for e in range(3)]
    for pr in runs.values():
        assert len(pr.live) == 3 and all(len(rs) == 2 for rs in pr.live)
        assert pr.measured_tps().tolist() == pytest.approx([20.0] * 3)  # 4 tokens / 0.2 s, both runs


@requires_default
def test_live_check_on_a_tiny_pair(tmp_path, monkeypatch):
    """Traces recorded exact on a tiny pair; the check calibrates nothing (a host model given),
    runs ABBA live, replays, compares tokens (traces exact) and reports paired differences."""
    from test_cli_contract import _save_tiny_pair

    from speckv_env import calibrate
    from speckv_env.app.profile import profile
    from speckv_env.pair import load_pair

    monkeypatch.setenv("SPECKV_CACHE", str(tmp_path / "cache"))
    t, d = _save_tiny_pair(tmp_path, seed=2)
    out = tmp_path / "traces"
    kw = {"target": t, "draft": d, "compressions": ["fp32"], "modes": ["greedy"], "device": "cpu", "progress": False}
    profile(out, tasks=["math", "code"], splits=["train", "test"], per_task=1, max_new_tokens=10, calibrate=False, **kw)
    pair = load_pair(t, d, device="cpu")
    cm = calibrate.calibrate(pair, repeats=1, tokens_per_gamma=4)
    r = lc.live_check(
        out,
        compressions=["fp32"],
        learned=("cost_aware",),
        prompts_per_task=1,
        train_steps=200,
        pairs={"fp32": pair},
        cost_models={"fp32": cm},
        progress=False,
    )
    c = r["compressions"]["fp32"]
    assert len(c["prompts"]) == 2 and c["tokens_compared"] and c["trace_exact"] and c["pair_exact"]
    assert {row["policy"] for row in c["rows"]} == {c["baseline"], "hf_heuristic", "cost_aware"}
    assert all(row["same_tokens"] for row in c["rows"])  # exact traces: live = replay, token for token
    assert {p["policy"] for p in c["paired"]} == {"hf_heuristic", "cost_aware"}
    assert c["cost_model"]["t_target"] == cm.t_target and c["cost_model_source"] == "given"
    text = lc.format_live_check(r)
    assert "ABBA" in text and "measured - predicted" in text and "tokens not compared" not in text
    want = [f"fp32/{p['policy']} (paired difference)" for p in c["paired"] if not p["agree"]]
    want += [f"fp32/{row['policy']} (ratio {row['ratio']:.2f})" for row in c["rows"] if not row["within_tolerance"]]
    assert lc.disagreements(r) == want


@pytest.mark.parametrize("quick", [True, False])
def test_demo_live_part_predicts_under_the_host_cost_models(tmp_path, monkeypatch, quick):
    from speckv_env.app import demo

    seen: dict = {}
    monkeypatch.setattr(
        demo, "_calibrate_host", lambda progress: ({"fp32": "PAIR"}, {"fp32": "HOST-CM"}, {"nf4": "no bnb"})
    )

    def fake_live_check(traces, **kw):
        seen.update(kw)
        return {"compressions": {}, "skipped": {}, "prompts_per_task": kw["prompts_per_task"]}

    monkeypatch.setattr(lc, "live_check", fake_live_check)
    report = tmp_path / "report.md"
    report.write_text("# report\n")
    s = demo._live_part(tmp_path, tmp_path, report, None, quick, False)
    assert seen["cost_models"] == {"fp32": "HOST-CM"} and seen["pairs"] == {"fp32": "PAIR"}
    assert seen["compressions"] == ["fp32"] and seen["prompts_per_task"] == (1 if quick else 4)
    assert ("quick demo: 4 held-out prompts" in s["live_text"]) == quick
    assert "nf4 skipped: no bnb" in s["live_text"] and "## Live check" in report.read_text()
