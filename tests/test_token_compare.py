"""``speckv compare`` with token mode: the stopping rules beside the gamma policies, one report."""

from __future__ import annotations

import json

import pytest

from replay.trace import synthetic_dataset
from speckv_env.app.compare import run_comparison
from speckv_env.app.token_compare import TOKEN_POLICIES
from speckv_env.core import CostModel

CMS = {"fp32": CostModel.unit(draft_ratio=0.1), "int8": CostModel.unit(draft_ratio=0.15, verify_slope=0.08)}


@pytest.fixture(scope="module")
def v2_result(tmp_path_factory):
    trs = synthetic_dataset(40, rollouts=True, modes=("greedy", "sample"), compressions=("fp32", "int8"), seed=4)
    out = tmp_path_factory.mktemp("cmp")
    r = run_comparison(
        traces=trs,
        cost_models=CMS,
        out_dir=out,
        quick=True,
        splits=("heldout",),
        policies=("fixed", "oracle", "token", "survival"),
    )
    return r, out


def test_token_policies_run_beside_the_gamma_policies(v2_result):
    r, out = v2_result
    h = r["splits"]["heldout"]
    assert set(TOKEN_POLICIES) <= set(h["policies"])
    tps = {k: v["subsets"]["all"]["tokens_per_s"]["value"] for k, v in h["policies"].items()}
    # the oracle over gammas bounds token mode too
    assert all(tps[p] <= tps["oracle"] + 1e-9 for p in TOKEN_POLICIES)
    choices = h["folds"][0]["token_choices"]
    names = {
        "hf-confidence(train)",
        "svip(train)",
        "adaedl(train)",
        "specdecpp(train)",
        "rule-bandit(train)",
        "ppo-token(train)",
        "survival-token(train)",
    }
    assert set(choices) == names | {n + "/dtd" for n in names}  # both variants of token mode
    for v in ("", "/dtd"):
        assert (
            sum(choices["rule-bandit(train)" + v]["pulls"]) > 0 and choices["ppo-token(train)" + v]["steps"] >= 16_384
        )
        assert {"fp32", "int8", "*"} <= set(choices["hf-confidence(train)" + v])
        assert choices["specdecpp(train)" + v]["auc"] > 0.6
    # a chosen stop costs one forward less in draft-then-decide: HF's default rule is faster there
    assert tps["hf-confidence/dtd"] > tps["hf-confidence"]
    # the learned token controller is a candidate of the primary contrast, chosen on validation
    # the step mode's survival controller ran beside them, and every learned one is a candidate
    assert "survival(train)" in h["policies"] and h["folds"][0]["survival"]["rho"]["*"] > 0
    assert {
        "specdecpp(train)",
        "rule-bandit(train)",
        "ppo-token(train)",
        "survival-token(train)",
        "specdecpp(train)/dtd",
        "rule-bandit(train)/dtd",
        "ppo-token(train)/dtd",
        "survival-token(train)/dtd",
        "survival(train)",
    } <= set(h["primary"]["validation_tokens_per_s"])
    report = (out / "report.md").read_text()
    assert "specdecpp(train)" in report and "hf-confidence" in report
    assert "svip(train)/dtd" in report and "draft-then-decide" in report
    assert (
        json.loads((out / "results.json").read_text())["splits"]["heldout"]["policies"].keys() == h["policies"].keys()
    )


def test_version_1_traces_compare_without_token_policies(tmp_path):
    trs = synthetic_dataset(20, modes=("greedy",), seed=5)
    r = run_comparison(
        traces=trs,
        cost_models=CostModel.unit(),
        out_dir=tmp_path,
        quick=True,
        splits=("heldout",),
        policies=("fixed", "oracle", "token"),
    )
    assert not set(TOKEN_POLICIES) & set(r["splits"]["heldout"]["policies"])
    assert "skipped" in r["token_mode"] and "speckv-trace/1" in r["token_mode"]
    assert "**Token mode.** token mode's stopping rules skipped" in (tmp_path / "report.md").read_text()


def test_token_histogram_with_a_sparse_gamma_set():
    """With gammas (0, 2, 4), a step that drafted 1 or 3 tokens counts under the largest gamma
    below it (token mode drafts any count up to max(gammas))."""
    import numpy as np

    from agents import HFConfidence
    from speckv_env.app.compare_data import _Data
    from speckv_env.app.token_compare import eval_token

    trs = synthetic_dataset(6, rollouts=True, modes=("greedy", "sample"), seed=2)
    data = _Data(trs, {"fp16": CostModel.unit()}, (0, 2, 4))
    r = eval_token(HFConfidence(0.3, gammas=(0, 2, 4)), data, np.arange(6))
    assert r.hist.sum() == r.steps.sum() and r.hist.shape == (6, 3)
    assert (r.gsum[0] <= 4 * r.steps[0]).all()
