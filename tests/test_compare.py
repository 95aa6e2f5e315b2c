"""speckv_env.app.compare / agents.stats: the comparison pipeline on SYNTHETIC traces."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from agents import make_agent, stats
from replay.oracle import fixed_gamma_time
from replay.trace import synthetic_dataset
from speckv_env.app.compare import _Data, eval_online, eval_vector, make_folds, oracle_result, run_comparison
from speckv_env.core import DEFAULT_GAMMAS, CostModel

TASKS = ("code", "chat", "math")
COMPRESSIONS = ("fp16", "nf4")


def _cost_models() -> dict[str, CostModel]:
    out = {}
    for c, r in (("fp16", 0.08), ("nf4", 0.3)):
        cm = CostModel.unit(8, draft_ratio=r, verify_slope=0.04)
        cm.compression = c
        out[c] = cm
    return out


def _traces(n: int = 60, seed: int = 0):
    # synthetic_dataset cycles task = tasks[i % 3], compression = compressions[(i // 3) % 2],
    # mode = modes[i % 2], split = train/val/test by i % 5: every combination occurs
    return synthetic_dataset(
        n, n_range=(30, 70), seed=seed, compressions=COMPRESSIONS, tasks=TASKS, modes=("greedy", "sample")
    )


@pytest.fixture(scope="module")
def comparison(tmp_path_factory):
    out = tmp_path_factory.mktemp("compare")
    trs = _traces()
    res = run_comparison(
        traces=trs,
        cost_models=_cost_models(),
        out_dir=out,
        quick=True,
        progress=False,
        policies=("fixed", "hf_heuristic", "cost_aware", "speckv_mlp", "ucb1", "linucb", "ppo", "oracle"),
        bandit_steps=600,
        mlp_rollout_steps=800,
        ppo_steps=512,
    )
    return out, trs, res


def test_outputs_written(comparison):
    out, _, res = comparison
    for f in (
        "report.md",
        "results.json",
        "throughput.png",
        "gamma_choices.png",
        "learning_curves.png",
        "regret_curves.png",
    ):
        assert (out / f).is_file() and (out / f).stat().st_size > 0, f
    doc = json.loads((out / "results.json").read_text())
    assert set(doc["splits"]) == {"heldout", "loto", "loco"}
    report = (out / "report.md").read_text()
    assert "SYNTHETIC" in report and "## Verdict" in report and "best-fixed(train)" in report
    assert any(p.name.startswith("events") for p in (out / "tb").rglob("*"))
    chosen = doc["splits"]["heldout"]["primary"]["policy"]
    for split in ("heldout", "loto", "loco"):
        v = doc["splits"][split]["verdict"]
        pol = doc["splits"][split]["policies"]
        if chosen not in pol:  # a bandit or PPO run on the held-out split only: no verdict elsewhere
            assert split != "heldout" and v["outcome"] == "none" and v["best_learned"] is None, (split, v)
            continue
        # the outcome follows from the chosen controller's interval against best-fixed(train)
        t = pol[chosen]["subsets"]["all"]["vs_best_fixed"]
        want = "beats" if t["lo"] > 0 else "worse" if t["hi"] < 0 else "inconclusive"
        assert (v["outcome"], v["best_learned"], v["lo"], v["hi"]) == (want, chosen, t["lo"], t["hi"]), (split, v)
        word = {"beats": "BEATS", "worse": "is SLOWER than", "inconclusive": "does NOT beat"}[want]
        assert chosen in v["sentence"] and word in v["sentence"], v["sentence"]


def test_oracle_never_beaten(comparison):
    _, _, res = comparison
    for split, s in res["splits"].items():
        pol = s["policies"]
        for sub in pol["oracle"]["subsets"]:
            o = pol["oracle"]["subsets"][sub]["tokens_per_s"]["value"]
            for name, m in pol.items():
                assert m["subsets"][sub]["tokens_per_s"]["value"] <= o * (1 + 1e-12), (split, sub, name)
                assert m["subsets"][sub]["regret_time"]["value"] >= -1e-12


def test_oracle_never_beaten_per_episode():
    trs = _traces(30, seed=3)
    data = _Data(trs, _cost_models(), DEFAULT_GAMMAS)
    idx = np.arange(len(trs))
    o = oracle_result(data, idx, {}).time[0]
    for agent in [make_agent("fixed", g=g) for g in DEFAULT_GAMMAS] + [
        make_agent("hf_heuristic"),
        make_agent("cost_aware"),
    ]:
        t = eval_vector(agent, data, idx, "all").time[0]
        assert (o <= t + 1e-9).all(), agent.name


def test_fixed_gamma_matches_replay_oracle_module(comparison):
    _, trs, res = comparison
    cms = _cost_models()
    data = _Data(trs, cms, DEFAULT_GAMMAS)
    idx = np.arange(len(trs))
    for g in DEFAULT_GAMMAS:
        r = eval_vector(make_agent("fixed", g=g), data, idx, "all")
        ref = np.array([fixed_gamma_time(t, cms[t.compression], g) for t in trs])
        np.testing.assert_allclose(r.time[0], ref, rtol=1e-12)
    # the reported tokens/s of each fixed gamma on the held-out test set
    test = [t for t in trs if t.split == "test"]
    pol = res["splits"]["heldout"]["policies"]
    for g in DEFAULT_GAMMAS:
        want = sum(t.n for t in test) / sum(fixed_gamma_time(t, cms[t.compression], g) for t in test)
        assert pol[f"fixed-{g}"]["subsets"]["all"]["tokens_per_s"]["value"] == pytest.approx(want, rel=1e-12)
    # best-fixed(train) is one of the fixed gammas per compression, chosen on training episodes only
    fold = res["splits"]["heldout"]["folds"][0]
    train = [t for t in trs if t.split in ("train", "val", "validation")]
    for c, g in fold["best_fixed_gamma"].items():
        sel = [t for t in train if c == "*" or t.compression == c]
        times = {h: sum(fixed_gamma_time(t, cms[t.compression], h) for t in sel) for h in DEFAULT_GAMMAS}
        assert g == min(DEFAULT_GAMMAS, key=lambda h: (times[h], h))


def test_leave_one_out_never_trains_on_held_out(comparison):
    _, trs, res = comparison
    by_id = {t.trace_id: t for t in trs}
    for split, attr in (("loto", "task"), ("loco", "compression")):
        folds = res["splits"][split]["folds"]
        assert len(folds) == len({getattr(t, attr) for t in trs})
        tested = []
        for f in folds:
            held = f["held_out"].split("=", 1)[1]
            assert all(getattr(by_id[i], attr) != held for i in f["train_trace_ids"]), (split, f["fold"])
            assert all(getattr(by_id[i], attr) == held for i in f["test_trace_ids"])
            assert not set(f["train_trace_ids"]) & set(f["test_trace_ids"])
            tested += f["test_trace_ids"]
        assert sorted(tested) == sorted(by_id)  # every episode evaluated exactly once per split
    f = res["splits"]["heldout"]["folds"][0]
    assert all(by_id[i].split == "test" for i in f["test_trace_ids"])
    assert all(by_id[i].split != "test" for i in f["train_trace_ids"])


def test_seeds_recorded(comparison):
    _, _, res = comparison
    pol = res["splits"]["heldout"]["policies"]
    for name in ("mlp-time", "ucb1", "linucb", "ppo"):
        assert pol[name]["subsets"]["all"]["seeds"] == 2
        assert len(pol[name]["subsets"]["all"]["seed_tokens_per_s"]) == 2


def test_online_eval_is_order_independent():
    trs = _traces(20, seed=5)
    data = _Data(trs, _cost_models(), DEFAULT_GAMMAS)
    from replay.env import SpecKVReplayEnv

    env = SpecKVReplayEnv(traces=trs, cost_models=data.cms)
    agent = make_agent("thompson", seed=1)
    a = eval_online(agent, env, np.arange(20), seed=7)
    b = eval_online(agent, env, np.arange(20), seed=7)
    np.testing.assert_array_equal(a.time, b.time)
    assert agent.stats.sum() == 0  # the trained agent itself is not changed by evaluation


def test_folds_skip_single_valued_attribute():
    trs = synthetic_dataset(10, compressions=("fp16",), tasks=("code", "chat"))
    data = _Data(trs, _cost_models(), DEFAULT_GAMMAS)
    assert make_folds(data, "loco") == []
    assert len(make_folds(data, "loto")) == 2


# ---- statistics --------------------------------------------------------------------------------


def test_bootstrap_ci_contains_point_and_shrinks():
    rng = np.random.default_rng(0)
    small = rng.exponential(2.0, 40)
    big = rng.exponential(2.0, 4000)
    a = stats.bootstrap_ci(small, n_boot=2000, seed=1)
    b = stats.bootstrap_ci(big, n_boot=2000, seed=1)
    for m in (a, b):
        assert m["lo"] <= m["value"] <= m["hi"]
    assert (b["hi"] - b["lo"]) < 0.3 * (a["hi"] - a["lo"])
    num, den = rng.integers(50, 150, 300).astype(float), rng.uniform(20, 80, 300)
    r = stats.ratio_ci(num, den, stats.resample_weights(300, 1000, 2))
    assert r["value"] == pytest.approx(num.sum() / den.sum())
    assert r["lo"] <= r["value"] <= r["hi"]


def test_paired_test_detects_known_difference_and_not_zero():
    rng = np.random.default_rng(1)
    n = 200
    N = rng.integers(60, 160, n).astype(float)
    T = N / rng.uniform(1.2, 2.5, n)  # very heterogeneous episodes
    W = stats.resample_weights(n, 2000, 3)
    faster = T / 1.03  # 3% faster on every episode: tiny vs the spread between episodes
    t = stats.paired_ratio_test(N, faster, N, T, W)
    assert t["lo"] > 0 and t["p"] < 0.01 and t["rel"] == pytest.approx(0.03, rel=1e-9)
    same = stats.paired_ratio_test(N, T.copy(), N, T, W)
    assert same["diff"] == 0 and same["p"] == 1.0 and same["lo"] <= 0 <= same["hi"]
    noisy = T * rng.choice([0.98, 1 / 0.98], n)  # no systematic difference
    z = stats.paired_ratio_test(N, noisy, N, T, W)
    assert z["lo"] <= 0 <= z["hi"] and z["p"] > 0.05
    # unpaired intervals overlap heavily although the paired test is decisive
    a, b = stats.ratio_ci(N, faster, W), stats.ratio_ci(N, T, W)
    assert a["lo"] < b["hi"]


# ---- the SpecKV paper's step logs and the CLI entry points -------------------------------------


def test_paper_comparison(tmp_path):
    res = run_comparison(
        source="speckv-paper",
        out_dir=tmp_path,
        quick=True,
        progress=False,
        seeds=1,
        splits=("heldout",),
        policies=("fixed", "hf_heuristic", "speckv_mlp", "ucb1"),
        bandit_steps=300,
        mlp_rollout_steps=300,
    )
    assert (tmp_path / "report.md").is_file() and (tmp_path / "paper_tokens_vs_speed.png").is_file()
    report = (tmp_path / "report.md").read_text()
    assert "Tokens per step is not tokens per second" in report
    tab = res["paper_table"]
    for c in {r["compression"] for r in tab}:
        rows = sorted((r for r in tab if r["compression"] == c), key=lambda r: r["gamma"])
        tps = [r["paper_tokens_per_step"] for r in rows]
        assert tps == sorted(tps)  # tokens/step grows with gamma in the paper's runs
        # modelled from every recorded run at that gamma, not only those the replay env holds
        assert all(r["modelled_tokens_per_s"] is not None and math.isfinite(r["modelled_tokens_per_s"]) for r in rows)
    pol = res["splits"]["heldout"]["policies"]
    # the paper's rule picks the largest gamma and maximises tokens/step among the learned policies
    assert pol["mlp-tokens"]["subsets"]["all"]["mean_gamma"] == 8
    assert pol["fixed-8"]["subsets"]["all"]["tokens_per_step"] >= pol["fixed-2"]["subsets"]["all"]["tokens_per_step"]
    assert "oracle" not in pol
    # only the runs recorded at gamma 8 are evaluated (paper_recorded_gammas): there every gamma
    # <= 8 is determined at every step, so no policy's choice is ever clipped
    assert {name: m["subsets"]["all"]["clipped_fraction"] for name, m in pol.items()} == dict.fromkeys(pol, 0.0)


def test_train_main_and_compare_main(tmp_path):
    from agents import load_agent
    from replay.trace import TraceWriter
    from speckv_env.app.compare import compare_main, train_main

    with TraceWriter(tmp_path / "logs", batch_size=100) as w:
        for t in _traces(40, seed=9):
            w.write(t)
        for cm in _cost_models().values():
            w.save_cost_model(cm)
    r = train_main("ucb1", tmp_path / "logs", tmp_path / "agents", steps=300, progress=False)
    assert load_agent(r["path"]).kind == "ucb1" and r["test"]["episodes"] == 8
    res = compare_main(
        tmp_path / "logs",
        tmp_path / "cmp",
        quick=True,
        progress=False,
        seeds=1,
        splits=["heldout"],
        policies=["fixed", "cost_aware", "oracle"],
    )
    assert (tmp_path / "cmp" / "report.md").is_file()
    assert res["splits"]["heldout"]["verdict"]["best_learned"] is None


# ---- the primary contrast, the fixed baseline's information, cost models across folders ----------


def test_primary_contrast_recorded_and_chosen_on_validation(comparison):
    out, _, res = comparison
    doc = json.loads((out / "results.json").read_text())
    pr = doc["splits"]["heldout"]["primary"]
    assert {"policy", "baseline", "rel", "lo", "hi", "p", "selected_on"} <= set(pr)
    assert pr["selected_on"] == "validation" and pr["baseline"] == "best-fixed(train)"
    assert pr["lo"] <= pr["rel"] <= pr["hi"]
    val = doc["splits"]["heldout"]["validation"]["tokens_per_s"]
    learned = list(pr["validation_tokens_per_s"])
    assert pr["policy"] == max(learned, key=lambda p: val[p]["value"])
    v = doc["splits"]["heldout"]["policies"][pr["policy"]]["subsets"]["all"]["vs_best_fixed"]
    assert v["primary"] and v["p"] == pr["p"] and v["rel"] == pr["rel"]
    # every other contrast is secondary, with a Holm-adjusted p-value no smaller than its own
    for name, m in doc["splits"]["heldout"]["policies"].items():
        t = m["subsets"]["all"]["vs_best_fixed"]
        if name not in (pr["policy"], "best-fixed(train)", "oracle"):
            assert t["p_holm"] >= t["p"] - 1e-12 and t["family"] >= 1
    assert pr["policy"] in doc["splits"]["heldout"]["verdict"]["sentence"]
    assert "primary contrast" in doc["splits"]["heldout"]["verdict"]["sentence"]
    # learners are trained on the train prompts; validation and test prompts are held out
    fold = doc["splits"]["heldout"]["folds"][0]
    assert fold["n_validation"] > 0
    assert not set(fold["validation_trace_ids"]) & set(fold["test_trace_ids"])


def _fake_split(data, idx, times):
    """Metrics of a split whose policies have the given per-episode times on episodes ``idx``."""
    from speckv_env.app.compare import CompareConfig
    from speckv_env.app.metrics import split_metrics
    from speckv_env.app.results import EvalResult

    def res(t):
        return EvalResult(idx, t[None], np.ones((1, idx.size)), np.ones((1, idx.size)), np.ones((idx.size, 9)))

    return split_metrics(data, {k: res(v) for k, v in times.items()}, CompareConfig.quick(n_boot=200))


def test_selection_never_looks_at_test_results():
    from speckv_env.app.metrics import judge

    trs = _traces(40, seed=11)
    data = _Data(trs, _cost_models(), DEFAULT_GAMMAS)
    val = np.flatnonzero(data.split == "validation")
    test = np.flatnonzero(data.split == "test")
    base_v, base_t = data.N[val] / 2.0, data.N[test] / 2.0  # 2 tokens/s
    val_times = {"best-fixed(train)": base_v, "oracle": base_v / 2, "mlp-time": base_v / 1.1, "ucb1": base_v / 1.05}

    def run(test_speed):
        tt = {"best-fixed(train)": base_t, "oracle": base_t / 3}
        tt.update({k: base_t / s for k, s in test_speed.items()})
        splits = {
            "heldout": {"policies": _fake_split(data, test, tt), "_val_metrics": _fake_split(data, val, val_times)}
        }
        judge(splits)
        return splits["heldout"]["primary"]

    a = run({"mlp-time": 1.1, "ucb1": 1.05})
    assert a["policy"] == "mlp-time" and a["selected_on"] == "validation"
    # on the test prompts ucb1 now looks far better, and mlp-time far worse: the choice stays
    b = run({"mlp-time": 0.7, "ucb1": 1.5})
    assert b["policy"] == "mlp-time" and b["rel"] < 0
    # changing the validation results does change it
    val_times["ucb1"] = base_v / 1.2
    assert run({"mlp-time": 1.1, "ucb1": 1.05})["policy"] == "ucb1"


def test_loco_baseline_uses_the_held_out_cost_model(comparison):
    _, trs, res = comparison
    cms = _cost_models()
    by_id = {t.trace_id: t for t in trs}
    for f in res["splits"]["loco"]["folds"]:
        held = f["held_out"].split("=", 1)[1]
        train = [by_id[i] for i in f["train_trace_ids"]]
        # the training episodes (other compressions' acceptance) priced under the held-out model
        times = {g: sum(fixed_gamma_time(t, cms[held], g) for t in train) for g in DEFAULT_GAMMAS}
        assert f["best_fixed_gamma"][held] == min(DEFAULT_GAMMAS, key=lambda g: (times[g], g))
    # the two cost models differ enough that the choice differs from the global training-best
    assert any(
        f["best_fixed_gamma"][f["held_out"].split("=")[1]] != f["best_fixed_gamma"]["*"]
        for f in res["splits"]["loco"]["folds"]
    )
    # pricing the fixed gammas' steps under any model agrees with the replay
    data = _Data(trs, cms, DEFAULT_GAMMAS)
    idx = np.arange(len(trs))
    for g in (0, 1, 3, 8):
        for c in COMPRESSIONS:
            want = [fixed_gamma_time(t, cms[c], g) for t in trs]
            np.testing.assert_allclose(data.fixed_time_under(g, idx, cms[c]), want, rtol=1e-12)


def _real_like(cm: CostModel, device: str) -> CostModel:
    cm.pair, cm.device, cm.meta = "p|d", device, {}
    return cm


def test_cost_models_of_several_folders_are_matched_not_overwritten(tmp_path):
    from replay.costs import CostModelConflictError
    from replay.trace import TraceWriter, synthetic_trace
    from speckv_env.app.compare_data import load_traces

    fast = _real_like(CostModel.unit(8, draft_ratio=0.05), "cpu")
    slow = _real_like(CostModel.unit(8, draft_ratio=0.5), "gpu")
    for cm in (fast, slow):
        cm.compression = "fp16"
    for name, dev, cm in (("a", "cpu", fast), ("b", "gpu", slow)):
        t = synthetic_trace(40, 8, 0.7, seed=1, compression="fp16", trace_id=f"{name}-0")
        t.meta, t.pair, t.device = {}, "p|d", dev
        with TraceWriter(tmp_path / name, batch_size=10) as w:
            w.write(t)
            w.save_cost_model(cm)
    trs, cms = load_traces([tmp_path / "a", tmp_path / "b"], None, None)
    data = _Data(trs, cms, DEFAULT_GAMMAS)
    got = {t.trace_id: cm.t_draft for t, cm in zip(data.traces, data.cm)}
    assert got == {"a-0": fast.t_draft, "b-0": slow.t_draft}  # each folder's model for its own trace
    assert len(set(data.cost_group())) == 2
    # the same key with other times is an error, never a silent replacement
    other = _real_like(CostModel.unit(8, draft_ratio=0.3), "cpu")
    other.compression = "fp16"
    with TraceWriter(tmp_path / "c", batch_size=10) as w:
        t = synthetic_trace(40, 8, 0.7, seed=2, compression="fp16", trace_id="c-0")
        t.meta, t.pair, t.device = {}, "p|d", "cpu"
        w.write(t)
        w.save_cost_model(other)
    with pytest.raises(CostModelConflictError):
        load_traces([tmp_path / "a", tmp_path / "c"], None, None)
