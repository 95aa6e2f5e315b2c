"""How the comparison loads its data (``speckv_env.app.compare_data.load_traces``): traces and
the cost models beside them through the replay library, and an explicit ``cost_models=`` that
wins over the files (re-scoring, no matching checks)."""

from __future__ import annotations

from pathlib import Path

import pytest

from replay.costs import CostModelSet
from replay.trace import TraceWriter, synthetic_trace
from speckv_env.app.compare_data import load_traces
from speckv_env.core import CostModel


def _cm(device: str, ratio: float, compression: str = "fp16") -> CostModel:
    cm = CostModel.unit(8, draft_ratio=ratio)
    cm.pair, cm.device, cm.meta, cm.compression = "p|d", device, {}, compression
    return cm


def _folder(root: Path, name: str, device: str, models: list[CostModel], comps=("fp16",), seed: int = 0) -> Path:
    """A folder of real-like (not synthetic) traces recorded on ``device``, one per compression."""
    with TraceWriter(root / name, batch_size=10) as w:
        for i, comp in enumerate(comps):
            t = synthetic_trace(30, 8, 0.7, seed=seed + i, compression=comp, trace_id=f"{name}-{comp}")
            t.meta, t.pair, t.device = {}, "p|d", device
            w.write(t)
        for cm in models:
            w.save_cost_model(cm)
    return root / name


def test_without_cost_models_each_trace_gets_its_folders_model(tmp_path):
    cpu, gpu = _cm("cpu", 0.1), _cm("gpu", 0.5)
    a, b = _folder(tmp_path, "a", "cpu", [cpu]), _folder(tmp_path, "b", "gpu", [gpu], seed=5)
    trs, cms = load_traces([a, b], None, None)
    assert isinstance(cms, CostModelSet) and sorted(t.trace_id for t in trs) == ["a-fp16", "b-fp16"]
    from replay.costs import Episode

    assert {t.trace_id: cms.match(Episode.of_trace(t)).t_draft for t in trs} == {"a-fp16": 0.1, "b-fp16": 0.5}
    # one folder given as a str path reads the same traces
    assert [t.trace_id for t in load_traces(str(a), None, None)[0]] == ["a-fp16"]


def test_an_explicit_model_by_compression_wins_over_the_files_without_checks(tmp_path):
    a = _folder(tmp_path, "a", "cpu", [_cm("cpu", 0.1), _cm("cpu", 0.2, "int8")], comps=("fp16", "int8"))
    other = _cm("cuda", 0.9)  # another device: re-scoring is explicit, so it is not checked
    trs, cms = load_traces(a, None, {"fp16": other})
    assert len(trs) == 2 and isinstance(cms, dict) and not isinstance(cms, CostModelSet)
    assert cms["fp16"] is other  # the explicit one, not the file's
    assert cms["int8"].t_draft == 0.2  # a compression it does not name: the file's model


@pytest.mark.parametrize("key", ["none", "*"])
def test_an_explicit_model_by_level_or_star_applies_to_its_compressions(tmp_path, key):
    a = _folder(tmp_path, "a", "cpu", [_cm("cpu", 0.1), _cm("cpu", 0.2, "fp32")], comps=("fp16", "fp32"))
    mine = _cm("cpu", 0.7)
    _, cms = load_traces(a, None, {key: mine})
    assert cms == {"fp16": mine, "fp32": mine}


def test_one_explicit_model_prices_every_trace(tmp_path):
    a = _folder(tmp_path, "a", "cpu", [_cm("cpu", 0.1), _cm("cpu", 0.2, "int8")], comps=("fp16", "int8"))
    mine = _cm("gpu", 0.7)
    _, cms = load_traces(a, None, mine)
    assert cms == {"fp16": mine, "int8": mine}


def test_a_compression_with_two_found_models_needs_an_explicit_one(tmp_path):
    a = _folder(tmp_path, "a", "cpu", [_cm("cpu", 0.1), _cm("cpu", 0.2, "int8")], comps=("fp16", "int8"))
    b = _folder(tmp_path, "b", "gpu", [_cm("gpu", 0.5)], seed=5)
    # fp16 has a model per device: a mapping by compression would be ambiguous
    with pytest.raises(ValueError, match="compression 'fp16' has several cost models in these logs"):
        load_traces([a, b], None, {"int8": _cm("cpu", 0.3, "int8")})
    mine = _cm("cpu", 0.6)
    trs, cms = load_traces([a, b], None, {"fp16": mine})  # naming it resolves the ambiguity
    assert len(trs) == 3 and cms["fp16"] is mine and cms["int8"].t_draft == 0.2


def test_in_memory_traces_need_cost_models_and_are_kept_as_given():
    trs = [synthetic_trace(20, 8, 0.7, seed=s, compression=c, trace_id=f"t{s}") for s, c in ((0, "fp16"), (1, "int8"))]
    with pytest.raises(ValueError, match="traces= needs cost_models="):
        load_traces(None, trs, None)
    one = CostModel.unit()
    got, cms = load_traces(None, trs, one)
    assert got == trs and cms == {"fp16": one, "int8": one}
    found = CostModelSet()
    found.add(one, "x")
    assert load_traces(None, trs, found)[1] is found  # a set of found models is matched later, kept as is
    by_comp = {"fp16": one}
    assert load_traces(None, trs, by_comp)[1] == by_comp


def test_logs_without_traces_are_an_error_when_loaded(tmp_path):
    """The replay loader refuses logs that hold no traces (before, the comparison found out
    later, in _Data)."""
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no traces left"):
        load_traces(tmp_path / "empty", None, None)
