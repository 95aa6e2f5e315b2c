"""Cost models are matched to episodes by pair, compression, device and draft fingerprint;
conflicts and episodes without a model are errors; explicit models win, mismatches only when
allowed."""

from __future__ import annotations

from pathlib import Path

import pytest

from replay.backend import TraceBackend
from replay.costs import CostModelConflictError, CostModelSet, load_cost_models
from replay.env import SpecKVReplayEnv
from replay.trace import synthetic_dataset, write_traces
from replay.vector import SpecKVReplayVectorEnv
from speckv_env.core import CostModel


def _traces(device: str, fp: str = "", n: int = 4, seed: int = 0):
    ds = synthetic_dataset(n, seed=seed, compressions=("fp32",))
    for i, t in enumerate(ds):
        t.trace_id = f"{device}-{seed}-{i}"
        t.pair, t.device, t.meta = "target|draft", device, ({"draft_fingerprint": fp} if fp else {})
    return ds


def _cm(device: str, t_draft: float, fp: str = "") -> CostModel:
    meta = {"draft_fingerprint": fp} if fp else {}
    return CostModel(t_draft, [1.0 + 0.1 * g for g in range(9)], 1.0, pair="target|draft", device=device, meta=meta)


def _folder(root: Path, name: str, traces, cms) -> Path:
    d = root / name
    d.mkdir()
    write_traces(d / "traces.parquet", traces)
    for i, cm in enumerate(cms):
        cm.save(d / (f"cost-{cm.compression}.json" if i == 0 else f"cost-{cm.compression}-{i}.json"))
    return d


def test_two_folders_each_trace_priced_by_its_own_machine(tmp_path: Path) -> None:
    cpu, gpu = _cm("cpu", 0.1), _cm("cuda", 0.01)
    a = _folder(tmp_path, "a", _traces("cpu"), [cpu])
    b = _folder(tmp_path, "b", _traces("cuda", seed=1), [gpu])  # the same file name, cost-fp32.json
    single, vector = SpecKVReplayEnv(logs=[a, b]), SpecKVReplayVectorEnv(2, logs=[a, b])
    assert isinstance(single.backend, TraceBackend)
    for traces, cms in ((single.backend.traces, single.backend.cost_models), (vector.traces, vector._cms)):
        assert [cm.device for cm in cms] == [t.device for t in traces] and {cm.t_draft for cm in cms} == {0.1, 0.01}


def test_conflicting_models_for_one_key_are_an_error_naming_both_files(tmp_path: Path) -> None:
    a = _folder(tmp_path, "a", _traces("cpu"), [_cm("cpu", 0.1)])
    b = _folder(tmp_path, "b", _traces("cpu", seed=1), [_cm("cpu", 0.2)])
    with pytest.raises(CostModelConflictError, match=r"b/cost-fp32\.json and .*a/cost-fp32\.json hold two different"):
        SpecKVReplayEnv(logs=[a, b])
    same = _folder(tmp_path, "c", _traces("cpu", seed=2), [_cm("cpu", 0.1)])  # the same model twice: fine
    assert SpecKVReplayEnv(logs=[a, same]).backend.num_episodes() == 8
    within = _folder(tmp_path, "d", _traces("cpu", seed=3), [_cm("cpu", 0.1), _cm("cpu", 0.3)])
    with pytest.raises(CostModelConflictError, match="two different cost models"):
        load_cost_models(within)


def test_no_matching_model_is_an_error(tmp_path: Path) -> None:
    d = _folder(tmp_path, "a", _traces("cpu"), [_cm("cuda", 0.1)])
    with pytest.raises(ValueError, match=r"no cost model for trace 'cpu-0-0' \(pair 'target\|draft', .*device 'cpu'\)"):
        SpecKVReplayEnv(logs=d)
    with pytest.raises(ValueError, match=r"no cost model for trace"):
        SpecKVReplayVectorEnv(2, logs=d)


def test_draft_fingerprint_is_matched_when_both_sides_record_it(tmp_path: Path) -> None:
    d = _folder(tmp_path, "a", _traces("cpu", fp="aaaa"), [_cm("cpu", 0.1, fp="bbbb")])
    with pytest.raises(ValueError, match=r"no cost model .*draft aaaa"):
        SpecKVReplayEnv(logs=d)
    e = _folder(tmp_path, "b", _traces("cpu", fp="aaaa", seed=1), [_cm("cpu", 0.1)])  # the model records none
    assert SpecKVReplayEnv(logs=e).cost_model.t_draft == 0.1
    f = _folder(tmp_path, "c", _traces("cpu", fp="aaaa", seed=2), [_cm("cpu", 0.1, fp="aaaa"), _cm("cpu", 0.2, "bbbb")])
    backend = SpecKVReplayEnv(logs=f).backend
    assert isinstance(backend, TraceBackend) and {cm.t_draft for cm in backend.cost_models} == {0.1}


def test_explicit_models_win_and_mismatches_need_the_flag(tmp_path: Path) -> None:
    d = _folder(tmp_path, "a", _traces("cpu"), [_cm("cpu", 0.1)])
    assert SpecKVReplayEnv(logs=d, cost_model=_cm("cpu", 0.5)).cost_model.t_draft == 0.5
    assert SpecKVReplayEnv(logs=d, cost_models={"fp32": _cm("cpu", 0.4)}).cost_model.t_draft == 0.4
    gpu = _cm("cuda", 0.01)
    for kw in ({"cost_model": gpu}, {"cost_models": {"fp32": gpu}}):
        with pytest.raises(
            ValueError, match=r"measured for device 'cuda' \(episode: 'cpu'\).*allow_cost_model_mismatch"
        ):
            SpecKVReplayEnv(logs=d, **kw)
        with pytest.raises(ValueError, match="allow_cost_model_mismatch"):
            SpecKVReplayVectorEnv(2, logs=d, **kw)
        assert SpecKVReplayEnv(logs=d, allow_cost_model_mismatch=True, **kw).cost_model is gpu
        assert SpecKVReplayVectorEnv(2, logs=d, allow_cost_model_mismatch=True, **kw)._cms[0] is gpu
    # models loaded from files and passed explicitly are matched by key
    both = CostModelSet()
    both.add(_cm("cpu", 0.1), "x")
    both.add(gpu, "y")
    assert SpecKVReplayEnv(logs=d, cost_models=both).cost_model.t_draft == 0.1


def test_shipped_traces_and_cost_models_match() -> None:
    env = SpecKVReplayEnv()
    b = env.backend
    assert isinstance(b, TraceBackend)
    for t, cm in zip(b.traces, b.cost_models):
        assert (cm.pair, cm.compression, cm.device) == (t.pair, t.compression, t.device)
        assert cm.meta["draft_fingerprint"] == t.meta["draft_fingerprint"]
    assert len({id(cm) for cm in b.cost_models}) == 3
    assert {t.split for t in b.traces} == {"train", "validation", "test"}
    val = SpecKVReplayEnv(split="val", compression="int8", mode="greedy").backend
    assert isinstance(val, TraceBackend) and len(val.traces) == 32
