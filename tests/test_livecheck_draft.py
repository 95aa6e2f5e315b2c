"""#12: the live check reads its traces through the replay loader and refuses traces recorded with
another draft, or without both splits, before any training or decoding."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from replay.env import default_logs
from speckv_env.app import livecheck
from speckv_env.core import CostModel


def test_live_check_refuses_a_foreign_draft_before_training(monkeypatch):
    def tripwire(*args, **kwargs):
        raise AssertionError("trained or decoded before checking the draft")

    monkeypatch.setattr(livecheck, "_policies", tripwire)
    monkeypatch.setattr("agents.training.train_agent", tripwire)
    foreign = SimpleNamespace(draft_fingerprint="000000000000", name="x|y", compression="fp32")
    with pytest.raises(ValueError, match="recorded with draft") as e:
        livecheck.live_check(
            default_logs(),
            compressions=("fp32",),
            pairs={"fp32": foreign},
            cost_models={"fp32": CostModel.unit()},
            progress=False,
        )
    assert "000000000000" in str(e.value) and str(default_logs()) in str(e.value)


def _folder(tmp_path):
    from replay.trace import synthetic_dataset, write_traces

    ds = synthetic_dataset(30, compressions=("fp32", "nf4"), modes=("greedy", "sample"))
    write_traces(tmp_path / "traces.parquet", ds)
    return tmp_path, ds


def test_the_check_reads_the_greedy_train_and_test_traces_of_its_compression(tmp_path):
    folder, ds = _folder(tmp_path)
    pair = SimpleNamespace(draft_fingerprint="abc", compression="nf4")
    train, test = livecheck._traces(folder, "nf4", pair)  # synthetic traces record no draft: accepted
    want = {
        s: sorted(t.trace_id for t in ds if (t.split, t.compression, t.mode) == (s, "nf4", "greedy"))
        for s in ("train", "test")
    }
    assert want["train"] and want["test"]
    assert sorted(t.trace_id for t in train) == want["train"] and sorted(t.trace_id for t in test) == want["test"]


def test_the_check_refuses_traces_without_a_test_split_or_of_another_compression(tmp_path):
    from replay.trace import synthetic_dataset, write_traces

    ds = [t for t in synthetic_dataset(20, compressions=("fp32",)) if t.split != "test"]
    write_traces(tmp_path / "traces.parquet", ds)
    pair = SimpleNamespace(draft_fingerprint="abc", compression="fp32")
    with pytest.raises(ValueError, match="needs fp32 greedy traces of both the train and the test split"):
        livecheck._traces(tmp_path, "fp32", pair)
    with pytest.raises(ValueError, match="int8"):  # no trace of it at all: the replay loader says so
        livecheck._traces(tmp_path, "int8", pair)
