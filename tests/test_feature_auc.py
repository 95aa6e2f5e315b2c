"""experiments/feature_auc.py: per-feature acceptance AUCs on synthetic speckv-trace/2 traces."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from agents.stopping import auc
from replay.trace import synthetic_dataset, write_traces

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def fa():
    spec = importlib.util.spec_from_file_location("feature_auc", REPO / "experiments" / "feature_auc.py")
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    sys.modules["feature_auc"] = mod
    spec.loader.exec_module(mod)
    return mod


def _aucs(groups: dict):
    for g in groups.values():
        yield from g["features"].values()


def test_main_on_synthetic_traces(fa, tmp_path, capsys):
    traces = synthetic_dataset(12, rollouts=True, modes=("greedy", "sample"))
    (tmp_path / "traces").mkdir()
    write_traces(tmp_path / "traces" / "part-0.parquet", traces)
    out = tmp_path / "fa.json"
    result = fa.main([str(tmp_path / "traces"), "--out", str(out)])
    on_disk = json.loads(out.read_text())
    assert on_disk == json.loads(json.dumps(result))
    assert on_disk["n_traces"] == 12 and on_disk["commit"]
    assert on_disk["trace_folders"] == [str(tmp_path / "traces")]
    assert on_disk["traces_by_split"]["train"] > 0
    for decision, feats in (("step", fa.STEP_FEATURES), ("token", fa.TOKEN_FEATURES)):
        for split in ("train", "heldout"):
            groups = on_disk[decision][split]
            assert "all/all" in groups and "fp16/greedy" in groups and "fp16/sample" in groups
            for g in groups.values():
                assert g["n_positions"] > 0 and g["n_prompts"] > 0 and g["n_traces"] > 0
                assert set(g["features"]) <= set(feats)
            assert set(groups["all/all"]["features"]) == set(feats)  # 'greedy' only where both modes
            assert "greedy" not in groups["fp16/greedy"]["features"]
            for r in _aucs(groups):
                assert r["auc"] is None or 0.0 <= r["auc"] <= 1.0
                if r["lo"] is not None:
                    assert 0.0 <= r["lo"] <= r["hi"] <= 1.0
    train = on_disk["step"]["train"]["all/all"]["features"]
    for name in ("sig_top1", "sig_entropy", "sig_margin", "tgt_top1_prev"):  # informative by construction
        assert train[name]["auc"] > 0.5 and train[name]["lo"] is not None, name
    assert on_disk["token"]["train"]["all/all"]["features"]["roll_top1"]["auc"] > 0.5
    for decision in ("step", "token"):
        lg = on_disk["logistic"][decision]
        assert 0.0 <= lg["heldout_auc"]["auc"] <= 1.0 and lg["best_single_on_train"] in lg["features"]
    printed = capsys.readouterr().out
    assert "TRAINING split" in printed and "CHECK ONLY: validation + test" in printed


def test_cluster_form_equals_auc_and_resamples(fa):
    rng = np.random.default_rng(3)
    score = np.round(rng.normal(size=300), 1)  # ties
    y = rng.random(300) < 0.4 + 0.2 * (score > 0)
    cl = rng.integers(0, 7, 300)
    one = fa.boot_aucs(score, y, cl, np.ones((1, 7)))[0]
    assert one == pytest.approx(auc(score, y), abs=1e-12)
    w = np.array([[2.0, 0, 1, 0, 3, 1, 0]])  # a resample = the data with clusters repeated
    idx = np.concatenate([np.flatnonzero(cl == c) for c in range(7) for _ in range(int(w[0, c]))])
    assert fa.boot_aucs(score, y, cl, w)[0] == pytest.approx(auc(score[idx], y[idx]), abs=1e-12)


def test_lookup_features(fa):
    tr = SimpleNamespace(
        n=4,
        prompt_tokens=np.array([1, 2, 3]),
        tokens=np.array([1, 2, 3, 9]),
        draft_argmax=np.array([0, 2, 3, 7]),
        accept=np.array([False, True, True, False]),
        sig_top1=np.ones(4),
        sig_entropy=np.zeros(4),
        sig_margin=np.ones(4),
        tgt_top1=np.array([0.1, 0.2, 0.3, 0.4]),
        tgt_entropy=np.zeros(4),
        sampling=False,
    )
    rows = fa.step_rows(tr)
    assert rows["lookup_match_len"].tolist() == [0, 1, 2, 3]
    assert rows["lookup_agrees"].tolist() == [0, 1, 1, 0]
    assert np.isnan(rows["tgt_top1_prev"][0]) and rows["tgt_top1_prev"][1:].tolist() == pytest.approx([0.1, 0.2, 0.3])
