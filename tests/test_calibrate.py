"""Calibration: the monotone fit and its outlier flag, the interleaved order, the spread and the
host in meta, ``--check`` drift on a perturbed saved model, the cache key."""

from __future__ import annotations

import dataclasses
import json
import random
from types import SimpleNamespace

import pytest
import torch
from tiny_models import make_tiny_pair

from speckv_env import calibrate as cal
from speckv_env.core import CostModel


def test_isotonic_is_pool_adjacent_violators():
    assert cal.isotonic([1.0, 3.0, 2.0, 4.0]) == [1.0, 2.5, 2.5, 4.0]
    assert cal.isotonic([1.0, 3.0, 2.0], [1.0, 1.0, 3.0]) == pytest.approx([1.0, 2.25, 2.25])
    assert cal.isotonic([5.0, 4.0, 3.0]) == [4.0, 4.0, 4.0]
    assert cal.isotonic([1.0, 2.0, 2.0, 7.0]) == [1.0, 2.0, 2.0, 7.0]  # already monotone: unchanged


def test_monotone_fit_removes_the_dip_and_flags_it():
    # the shipped nf4 model's shape: a 2-token verification dearer than a 3-token one
    rng = random.Random(0)
    true = [28.8, 34.0, 34.2, 35.6, 39.8, 42.0, 44.7, 44.9, 50.0]
    samples = {g: [t * (1 + 0.01 * rng.uniform(-1, 1)) for _ in range(40)] for g, t in enumerate(true)}
    samples[1] = [46.8 * (1 + 0.01 * rng.uniform(-1, 1)) for _ in range(40)]  # the kink
    stats = {g: cal.spread(v) for g, v in samples.items()}
    fit = cal.monotone_fit(stats, 8)
    tv = fit["t_verify"]
    assert all(b >= a for a, b in zip(tv, tv[1:], strict=False)), tv
    assert fit["outliers"] == [1]  # the kink, and only the kink
    assert fit["raw"][1] == pytest.approx(stats[1]["median"])
    assert cal.fit_t_verify(samples, 8) == pytest.approx(tv)
    # noise alone (a monotone truth) is not flagged
    clean = {g: cal.spread(v) for g, v in samples.items() if g != 1} | {1: cal.spread([34.0] * 40)}
    assert cal.monotone_fit(clean, 8)["outliers"] == []


def test_monotone_fit_extrapolates_unmeasured_gammas_and_needs_gamma0():
    tv = cal.fit_t_verify({0: [1.0], 1: [2.0], 2: []}, 3)
    assert tv == pytest.approx([1.0, 2.0, 3.0, 4.0])
    with pytest.raises(ValueError, match="no gamma-0 step"):
        cal.fit_t_verify({1: [2.0]}, 2)


def test_spread_reports_quartiles_mad_and_far_outliers():
    s = cal.spread([1.0, 2.0, 3.0, 4.0, 5.0, 100.0])
    assert s["n"] == 6 and s["median"] == 3.5 and s["mad"] == 1.5
    assert s["iqr"] == pytest.approx(s["q3"] - s["q1"]) and s["far_out"] == 1
    assert cal.spread([2.0])["iqr"] == 0.0 and cal.spread([])["n"] == 0


class _Recorder:
    """A fake engine whose verify time grows with gamma; it logs the order gammas run in."""

    log: list[int] = []

    def __init__(self, *a, **k):
        pass

    def generate(self, ids, n, gamma=0, seed=0):
        _Recorder.log.append(gamma)
        step = SimpleNamespace(
            gamma=gamma, verify_s=0.01 * (1 + gamma), draft_s=0.002 * max(gamma, 1), draft_forwards=max(gamma, 1)
        )
        return SimpleNamespace(steps=[step] * 4)


@pytest.fixture
def fake_pair(monkeypatch):
    monkeypatch.setattr(cal, "SpeculativeEngine", _Recorder)
    monkeypatch.setattr(cal, "target_only_times", lambda pair, ids, n=24: [0.02] * n)
    _Recorder.log = []
    return SimpleNamespace(
        target=None,
        draft=None,
        eos_token_id=0,
        encode_chat=lambda text: [1, 2, 3],
        name="fake",
        compression="fp32",
        device=torch.device("cpu"),
        draft_fingerprint="f",
        kernels="row-invariant:test",
        exact=True,
    )


def test_every_gamma_in_every_round_in_an_unsorted_order(fake_pair):
    cm = cal.calibrate(fake_pair, gamma_max=8, prompts=("a",), repeats=5, tokens_per_gamma=4)
    order = cm.meta["order"]
    points = [f"g{g}" for g in range(9)] + ["target"]
    assert len(order) == 5
    for rnd in order:
        assert sorted(rnd) == sorted(points)  # every point once per round
        assert rnd != points  # not in sorted order
    assert len({tuple(r) for r in order}) > 1  # a fresh order each round
    timed = _Recorder.log[-45:]  # the warm-up runs come first
    assert [f"g{g}" for g in timed] == [p for rnd in order for p in rnd if p != "target"]
    assert cm.meta["repeats"] == 5 and len(cm.meta["per_round"]) == 5


def test_meta_holds_spread_fit_and_host(fake_pair):
    cm = cal.calibrate(fake_pair, gamma_max=3, prompts=("a", "b"), repeats=5, tokens_per_gamma=4)
    assert cm.t_verify == pytest.approx([0.01, 0.02, 0.03, 0.04])
    assert cm.t_target == pytest.approx(0.02) and cm.t_draft == pytest.approx(0.002)
    m = cm.meta
    assert set(m["verify_stats"]) == {"0", "1", "2", "3"} and m["verify_stats"]["2"]["iqr"] == 0.0
    assert m["verify_stats"]["1"]["n"] == 5 * 2 * 4
    assert m["outliers"] == [] and m["t_verify_raw"] == pytest.approx(cm.t_verify)
    for key in ("cpu_model", "cpu_count", "torch_threads", "torch", "kernels"):
        assert m["host"][key] is not None, key
    assert m["kernels"] == "row-invariant:test" and m["exact"] is True and m["method"] == cal.METHOD
    # the file format is unchanged: the model round-trips, and an old file (no new meta) loads
    again = CostModel.from_dict(json.loads(json.dumps(cm.to_dict())))
    assert again.t_verify == cm.t_verify and again.meta["verify_stats"]["1"]["n"] == 40


def test_shipped_cost_models_still_load():
    from pathlib import Path

    for p in sorted((Path(cal.__file__).parent / "data" / "traces").glob("cost-*.json")):
        cm = CostModel.load(p)
        assert len(cm.t_verify) == 9 and cm.t_target > 0


def _tiny(monkeypatch, tmp_path):
    monkeypatch.setenv("SPECKV_CACHE", str(tmp_path / "cache"))
    t, d = make_tiny_pair(vocab=64, hidden=32, seed=3)
    return SimpleNamespace(
        target=t,
        draft=d,
        eos_token_id=[],
        encode_chat=lambda text: [1, 5, 9, 11, 20, 7][: 3 + len(text) % 3],
        name="tiny",
        compression="fp32",
        device=torch.device("cpu"),
        draft_fingerprint="t1",
        kernels="stock",
        exact=False,
    )


def test_check_reports_drift_on_a_perturbed_saved_model(monkeypatch, tmp_path):
    pair = _tiny(monkeypatch, tmp_path)
    cm = cal.calibrate(pair, gamma_max=4, repeats=2, tokens_per_gamma=6)
    bad = dataclasses.replace(
        cm, t_verify=[cm.t_verify[0], cm.t_verify[1] * 4, *cm.t_verify[2:]], t_target=cm.t_target / 4
    )
    r = cal.check_calibration(pair, bad, repeats=1, tokens_per_gamma=6, tolerance=0.5)
    by = {p["point"]: p for p in r["points"]}
    assert set(by) == {"t_verify[0]", "t_verify[1]", "t_verify[4]", "t_draft", "t_target"}
    assert by["t_verify[1]"]["rel_diff"] < -0.5 and not by["t_verify[1]"]["ok"]
    assert by["t_target"]["rel_diff"] > 1.0 and not by["t_target"]["ok"]
    assert r["verdict"] == "drift" and r["max_abs_rel_diff"] > 1.0
    assert "verdict: drift" in cal.format_check(r)
    # the saved model of another kernel is not comparable at all
    other = dataclasses.replace(cm, meta={**cm.meta, "kernels": "row-invariant:rowdot-c"})
    r2 = cal.check_calibration(pair, other, gammas=(0,), repeats=1, tokens_per_gamma=6, tolerance=10.0)
    assert r2["verdict"] == "mismatch" and "kernels" in r2["mismatch"][0]


@pytest.fixture
def small_budgets(monkeypatch):
    """Full and quick budgets small enough for the tiny pair (the real ones keep their ratio)."""
    full, quick = cal.Budget("full", repeats=2, tokens_per_gamma=6), cal.Budget("quick", repeats=1, tokens_per_gamma=4)
    monkeypatch.setattr(cal, "FULL", full)
    monkeypatch.setattr(cal, "QUICK", quick)
    monkeypatch.setattr(cal, "BUDGETS", {"full": full, "quick": quick})
    return full, quick


def _counting(monkeypatch) -> list[dict]:
    """Record the keyword arguments of every real calibration."""
    calls: list[dict] = []
    real = cal.calibrate

    def counted(*a, **k):
        calls.append(k)
        return real(*a, **k)

    monkeypatch.setattr(cal, "calibrate", counted)
    return calls


def test_cached_calibration_is_keyed_by_kernels_and_host(monkeypatch, tmp_path, small_budgets):
    pair = _tiny(monkeypatch, tmp_path)
    p = cal.calibration_path(pair)
    assert cal.host_key() in p.name and "stock" in p.name
    assert cal.calibration_path(SimpleNamespace(**{**vars(pair), "kernels": "x"})) != p
    calls = _counting(monkeypatch)
    cm = cal.cached_calibration(pair, gamma_max=2)
    assert cal.cached_calibration_exists(pair, gamma_max=2) and len(calls) == 1
    assert cal.cached_calibration(pair, gamma_max=2).t_verify == cm.t_verify and len(calls) == 1  # reused
    # an entry from another host (or an older method) is measured again
    CostModel.from_dict({**cm.to_dict(), "meta": {**cm.meta, "host": {"cpu_model": "elsewhere"}}}).save(p)
    assert not cal.cached_calibration_exists(pair, gamma_max=2)
    cal.cached_calibration(pair, gamma_max=2)
    assert len(calls) == 2


def test_full_budget_is_calibrates_defaults_and_quick_measures_less():
    import inspect

    defaults = inspect.signature(cal.calibrate).parameters
    assert cal.FULL.repeats == defaults["repeats"].default == 5
    assert cal.FULL.tokens_per_gamma == defaults["tokens_per_gamma"].default
    assert cal.FULL.prompts == defaults["prompts"].default == cal.QUICK.prompts
    assert cal.QUICK.repeats >= 3 and cal.QUICK.repeats < cal.FULL.repeats  # still several interleaved rounds
    assert 1 <= cal.QUICK.tokens_per_gamma < cal.FULL.tokens_per_gamma
    assert "3 interleaved rounds" in cal.QUICK.describe()
    with pytest.raises(ValueError, match="unknown calibration budget"):
        cal.calibration_path(SimpleNamespace(), budget="tiny")


def test_quick_calibration_never_passes_for_a_full_one(monkeypatch, tmp_path, small_budgets):
    full, quick = small_budgets
    pair = _tiny(monkeypatch, tmp_path)
    calls = _counting(monkeypatch)
    qpath, fpath = cal.calibration_path(pair, "quick"), cal.calibration_path(pair)
    assert qpath != fpath and qpath.name.endswith("-quick.json")
    # a first quick request measures with the quick budget, into its own entry
    q = cal.cached_calibration(pair, gamma_max=2, budget="quick")
    assert (calls[-1]["repeats"], calls[-1]["tokens_per_gamma"]) == (quick.repeats, quick.tokens_per_gamma)
    assert q.meta["budget"] == "quick" and cal.calibration_budget(q) == "quick"
    assert len(q.meta["order"]) == quick.repeats and q.meta["verify_stats"]["0"]["n"] > 1  # interleaved, a spread
    assert qpath.exists() and not fpath.exists()
    assert cal.cached_calibration_exists(pair, gamma_max=2, budget="quick")
    assert not cal.cached_calibration_exists(pair, gamma_max=2)  # a full request is not served by it
    assert cal.cached_calibration(pair, gamma_max=2, budget="quick").t_verify == q.t_verify and len(calls) == 1
    # a full request measures the full budget; from then on it serves quick requests too
    f = cal.cached_calibration(pair, gamma_max=2)
    assert len(calls) == 2 and calls[-1]["repeats"] == full.repeats and f.meta["budget"] == "full"
    assert cal.calibration_budget(f) == "full" and fpath.exists()
    again = cal.cached_calibration(pair, gamma_max=2, budget="quick")
    assert len(calls) == 2 and again.meta["budget"] == "full" and again.t_verify == f.t_verify
    # a quick model put where the full one lives is still not taken for a full one
    q.save(fpath)
    assert not cal.cached_calibration_exists(pair, gamma_max=2)
    assert cal.cached_calibration_exists(pair, gamma_max=2, budget="quick")
    # entries cached before budgets existed (the full defaults, no "budget" in meta) still count as full
    legacy = {k: v for k, v in f.meta.items() if k not in ("budget", "budget_note")}
    CostModel.from_dict({**f.to_dict(), "meta": legacy}).save(fpath)
    assert cal.cached_calibration_exists(pair, gamma_max=2) and len(calls) == 2


def test_demo_calibrates_quick_and_says_where_the_full_one_comes_from(monkeypatch, tmp_path, small_budgets, caplog):
    import logging

    from speckv_env.app import demo

    pair = _tiny(monkeypatch, tmp_path)
    monkeypatch.setattr("speckv_env.models.default_target_path", lambda: None)
    monkeypatch.setattr(
        "speckv_env.pair.load_pair",
        lambda *a, compression, **k: SimpleNamespace(**{**vars(pair), "compression": compression}),
    )
    calls = _counting(monkeypatch)
    with caplog.at_level(logging.INFO, logger="speckv.demo"):
        pairs, cms, skipped = demo._calibrate_host(False)
    assert set(cms) == set(demo.LIVE_COMPRESSIONS) and not skipped
    assert [k["repeats"] for k in calls] == [small_budgets[1].repeats] * len(cms)
    assert all(cm.meta["budget"] == "quick" for cm in cms.values())
    assert "measuring this host's quick calibration" in caplog.text
    note = demo.calibration_note(cms)
    assert "fp32 quick" in note and "speckv calibrate" in note and "SpecKV-v0" in note
    # the live part says it, in the table, the report and live_check.json
    from speckv_env.app import livecheck

    real_host = demo._calibrate_host
    monkeypatch.setattr(demo, "_calibrate_host", lambda progress: (pairs, cms, {}))
    monkeypatch.setattr(
        livecheck, "live_check", lambda traces, **kw: {"compressions": {}, "skipped": {}, "prompts_per_task": 1}
    )
    report = tmp_path / "report.md"
    report.write_text("# report\n")
    s = demo._live_part(tmp_path, tmp_path, report, None, True, False)
    assert "quick calibration" in s["live_text"] and "quick calibration" in report.read_text()
    saved = json.loads((tmp_path / "live_check.json").read_text())
    assert saved["calibration"]["nf4"]["budget"] == "quick"
    # once a full calibration of this host is cached, the demo takes it and says so
    for p in pairs.values():
        cal.cached_calibration(p)
    n = len(calls)
    _, cms2, _ = real_host(False)
    assert len(calls) == n and all(cm.meta["budget"] == "full" for cm in cms2.values())
    note2 = demo.calibration_note(cms2)
    assert "fp32 full" in note2 and "quick calibration:" not in note2


def test_cli_check_wiring(monkeypatch, tmp_path, capsys):
    from speckv_env.app import cli

    out = tmp_path / "models"
    out.mkdir()
    assert cli.main(["calibrate", "--out", str(out), "--check", "--quiet"]) == 2  # nothing saved to check
    assert "--check: no saved cost model" in capsys.readouterr().err
    CostModel.unit().save(out / "cost-fp32.json")
    seen = {}

    def fake_check(pair, saved, **kw):
        seen.update(kw, saved=saved)
        return {"verdict": "drift", "tolerance": kw["tolerance"], "points": [], "mismatch": [], "max_abs_rel_diff": 0.3}

    monkeypatch.setattr(cal, "check_calibration", fake_check)
    monkeypatch.setattr("speckv_env.pair.load_pair", lambda *a, **k: None)
    assert cli.main(["calibrate", "--out", str(out), "--check", "--tolerance", "0.2", "--json", "--quiet"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["verdict"] == "drift" and seen["tolerance"] == 0.2 and seen["saved"].t_target == 1.0
