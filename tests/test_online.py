"""The online (live) comparison, speckv_env/app/online.py: policies learn as they decode on
SpecKV-v0 (tiny random models with the real SmolLM2 tokenizer; one slow smoke test on the real
default pair)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import requires_default
from tiny_models import make_tiny_smol_pair

import speckv_env  # noqa: F401
from speckv_env.app.compare_data import LEARNED
from speckv_env.app.online import (
    OnlineConfig,
    Policy,
    interleaved_order,
    make_setup,
    run_interleaved,
    run_live_comparison,
)
from speckv_env.core import CostModel

pytestmark = requires_default

VOCAB = 49152


@pytest.fixture(scope="module")
def tiny_smol_pair():
    return make_tiny_smol_pair()


def _tiny_config(**kw):
    base = {
        "tasks": ("math",),
        "train_prompts": 3,
        "validation_prompts": 1,
        "test_prompts": 2,
        "max_new_tokens": 8,
        "gammas": (0, 1, 3),
        "fixed_gammas": None,
        "learners": ("ucb1", "speckv_mlp"),
        "static": ("hf_heuristic",),
        "replay_bandit_steps": 200,
        "mlp_rollout_steps": 300,
        "mlp_epochs": 1,
        "n_boot": 200,
        "threads": 1,
        "warmup_tokens": 2,
        "progress": False,
    }
    base.update(kw)
    return OnlineConfig.quick(**base)


@pytest.fixture(scope="module")
def live_run(tiny_smol_pair, tmp_path_factory):
    out = tmp_path_factory.mktemp("compare_live")
    cfg = _tiny_config(
        learners=("ucb1", "speckv_mlp", "ppo"),
        ppo_steps=64,
        ppo_n_envs=2,
        ppo_kwargs={"n_steps": 32, "batch_size": 32, "n_epochs": 1},
        ppo_live_steps=16,
    )
    res = run_live_comparison(out, config=cfg, pair=tiny_smol_pair, cost=CostModel.unit())
    return out, res


def test_config_checks_its_gamma_sets():
    assert OnlineConfig.quick().fixed_gammas == (0, 1, 2, 3, 4)
    with pytest.raises(ValueError, match="subset of gammas"):
        OnlineConfig.quick(gammas=(0, 1))
    with pytest.raises(ValueError, match="unknown live learner"):
        OnlineConfig(learners=("fixed",))


def test_interleaved_order_is_abba_and_balanced():
    assert [interleaved_order("AB", i) for i in range(4)] == [["A", "B"], ["B", "A"], ["B", "A"], ["A", "B"]]
    names = ["a", "b", "c"]
    orders = [interleaved_order(names, i) for i in range(2 * len(names))]
    for o in orders:
        assert sorted(o) == names
    # every policy takes every place equally often over a full cycle
    for place in range(len(names)):
        assert sorted(o[place] for o in orders) == sorted(names * 2)


def test_online_comparison_runs_end_to_end(live_run):
    out, res = live_run
    assert {"report.md", "results.json", "throughput.png", "online_learning.png"} <= {p.name for p in out.iterdir()}
    saved = json.loads((out / "results.json").read_text())
    assert saved["source"] == "live" and saved["format"] == "speckv-compare-live/1"
    split = res["splits"]["heldout"]
    pol = split["policies"]
    for name in ("best-fixed(train)", "fixed-0", "fixed-3", "hf-heuristic", "ucb1", "ucb1[replay]", "mlp-time",
                 "mlp-time[replay]", "mlp-tokens", "ppo"):  # fmt: skip
        m = pol[name]["subsets"]["all"]
        assert m["tokens_per_s"]["value"] > 0 and m["modelled_tokens_per_s"]["value"] > 0
        assert m["episodes"] == 2 and m["prompts"] == 2
    # the primary contrast's controller: the learned one fastest on the validation prompts (ties: LEARNED order)
    val = {k: v["value"] for k, v in split["validation"]["tokens_per_s"].items()}
    learned = [p for p in LEARNED if p in val]
    assert set(learned) == {"ucb1", "mlp-time", "ppo"}, sorted(val)
    want = max(learned, key=lambda p: (val[p], -learned.index(p)))
    assert split["primary"]["policy"] == want and split["primary"]["selected_on"] == "validation"
    assert split["primary"]["validation_tokens_per_s"] == {p: val[p] for p in learned}
    assert res["ppo_live"]["live_steps"] == 16 and "fine-tuned live" in res["training"]["ppo"]
    assert "verdict" in split and "ucb1" in split["online_vs_replay"]
    assert split["same_tokens"] is True  # greedy: every policy emits the target's own tokens
    report = (out / "report.md").read_text()
    for text in ("measured tokens/s", "modelled tokens/s", "How online and replay-trained results compare",
                 "Online learning on the train prompts (measured)", "Primary contrast"):  # fmt: skip
        assert text in report
    assert "pretrained on replay" in res["training"]["mlp-time"]


def test_learning_curve_records_measured_times_per_episode(live_run):
    _, res = live_run
    on = res["online"]
    assert on["time"] == "measured"
    for name in ("ucb1", "mlp-time"):
        pts = on["online"][name]
        assert [p["episode"] for p in pts] == [0, 1, 2]
        assert all(p["measured_tps"] > 0 and np.isfinite(p["ratio_measured"]) for p in pts)
    recs = on["records"]
    for name in ("ucb1", "fixed-0", "fixed-1", "fixed-3"):  # baselines decoded on the same prompts
        assert [r["prompt_id"] for r in recs[name]] == [r["prompt_id"] for r in recs["ucb1"]]
        assert all(r["measured_s"] > 0 for r in recs[name])
        # the wall-clock reading is not the cost model's: measured differs from modelled
        assert any(abs(r["measured_s"] - r["modelled_s"]) > 1e-9 for r in recs[name])
    assert on["best_fixed"] in recs and len(on["fixed_measured_tps"]) == 3


def test_policies_are_interleaved_per_prompt(live_run):
    _, res = live_run
    orders = res["online"]["orders"]
    names = ["ucb1", "mlp-time", "fixed-0", "fixed-1", "fixed-3"]
    assert orders == [interleaved_order(names, i) for i in range(3)]
    # each record knows its place in its prompt's order
    for name, rs in res["online"]["records"].items():
        assert [r["place"] for r in rs] == [o.index(name) for o in orders]
    split = res["splits"]["heldout"]
    test_names = [n for n in split["records"] if n != "best-fixed(train)"]
    start = len(orders) + 1  # the rotation continues after the train prompts and the validation prompt
    assert split["orders"] == [interleaved_order(test_names, start + j) for j in range(2)]
    assert split["validation"]["orders"] == [interleaved_order(["ucb1", "mlp-time", "ppo"], len(orders))]


def test_ucb1_choices_concentrate_on_the_best_gamma(tiny_smol_pair):
    """Under a cost model where verification is very expensive, gamma 0 is clearly the fastest;
    UCB1 learning live tries every gamma first, then picks gamma 0 almost always."""
    from agents.base import make_agent

    cfg = _tiny_config(train_prompts=6, max_new_tokens=16, gammas=(0, 1, 2, 3), learners=("ucb1",))
    cm = CostModel.unit(3, draft_ratio=0.05, verify_slope=3.0)  # t_verify[g] = 1 + 3 g
    setup = make_setup(cfg, tiny_smol_pair, cm)
    ucb = Policy("ucb1", make_agent("ucb1", seed=0, gammas=cfg.gammas), "online")
    recs, _ = run_interleaved([ucb], setup.envs["train"], range(6), cfg, training=True)
    hists = [np.array(r["hist"], dtype=float) / sum(r["hist"]) for r in recs["ucb1"]]
    assert min(recs["ucb1"][0]["hist"]) >= 1  # the first episode explores every gamma
    assert hists[-1][0] > 0.8 and hists[-1][0] > hists[0][0] + 0.3  # later choices: gamma 0
    assert np.mean([h[0] for h in hists[3:]]) > np.mean([h[0] for h in hists[:3]])


@pytest.mark.slow
def test_live_comparison_on_the_default_pair(tmp_path):
    """Smoke test on the real default pair: a tiny budget, two bandits, measured curves."""
    cfg = OnlineConfig.quick(
        tasks=("code",), train_prompts=2, validation_prompts=1, test_prompts=1, max_new_tokens=12,
        gammas=(0, 1, 2), fixed_gammas=(0, 1, 2), learners=("ucb1", "thompson"), static=(), replay_twins=False,
        n_boot=200, progress=False,
    )  # fmt: skip
    res = run_live_comparison(tmp_path, config=cfg)
    on = res["online"]["online"]
    assert set(on) == {"ucb1", "thompson"} and all(p["measured_tps"] > 0 for p in on["ucb1"])
    assert res["setup"]["pair"].startswith("SmolLM2-135M-Instruct") and res["setup"]["exact"]
    assert res["splits"]["heldout"]["same_tokens"] is True
    assert (tmp_path / "report.md").is_file()


def test_learning_from_measured_time_prices_the_step_by_the_clock():
    from types import SimpleNamespace

    from speckv_env.app.online import _learning_signal

    env = SimpleNamespace(unwrapped=SimpleNamespace(cost_model=CostModel.unit()))
    info = {"emitted": 3, "modelled_time": 1.2, "measured_time": 2.0}
    assert _learning_signal(0.5, info, "modelled", env) == (0.5, info)
    r, seen = _learning_signal(0.5, info, "measured", env)
    assert seen["modelled_time"] == 2.0 and r == pytest.approx(3 - 2.0 / CostModel.unit().t_target)
    assert info["modelled_time"] == 1.2  # the env's info is not changed


def test_train_live_saves_the_agent_and_its_measured_curve(tiny_smol_pair, tmp_path):
    from agents.base import load_agent
    from speckv_env.app.online import train_live_main

    kw = {k: v for k, v in vars(_tiny_config()).items() if k not in ("learners", "replay_twins")}
    r = train_live_main("ucb1", tmp_path, pair=tiny_smol_pair, cost=CostModel.unit(), **kw)
    assert load_agent(r["path"]).kind == "ucb1"
    assert [p["episode"] for p in r["curve"]] == [0, 1, 2] and all(p["measured_tps"] > 0 for p in r["curve"])
    assert set(r["test"]) == {"ucb1", r["best_fixed"]} and r["test"]["ucb1"]["episodes"] == 2


@pytest.mark.parametrize(
    "args, message",
    [
        (["compare", "--live", "--set", "bogus=1"], "unknown key"),
        (["compare", "--live", "--set", "learn_from=wall"], "learn_from must be one of"),
        (["compare", "--live", "--set", "learners=ucb1,fixed"], "unknown live learner"),
        (["compare", "--live", "--logs", "speckv-paper"], "not on --logs speckv-paper"),
        (["train", "fixed", "--live"], "--live trains a learner"),
        (["train", "ucb1", "--quick"], "--quick applies to --live"),
    ],
)
def test_live_flags_refuse_bad_input_before_loading_models(tmp_path, capsys, args, message):
    from speckv_env.app.cli import main

    assert main([*args, "--out", str(tmp_path / "out")]) == 2
    assert message in capsys.readouterr().err
