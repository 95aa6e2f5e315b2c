"""The step-log reader: speckv-steps/2 (and /1) files are checked for types, nulls, versions,
ranges and run structure, with the file named in every error."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from replay.importers import import_speckv_paper, read_step_log, write_step_log
from replay.schema import STEPS_ARROW_SCHEMA, STEPS_COLUMNS, STEPS_COLUMNS_V1, TraceFormatError


@pytest.fixture(scope="module")
def two_runs() -> pd.DataFrame:
    steps, _ = import_speckv_paper()
    runs = steps["run_id"].unique()[:2]
    return steps[steps["run_id"].isin(runs)].reset_index(drop=True)


def _write(df: pd.DataFrame, path: Path, version: int) -> Path:
    cols = STEPS_COLUMNS if version == 2 else STEPS_COLUMNS_V1
    df = df.copy()
    df["schema"] = f"speckv-steps/{version}"
    schema = pa.schema([pa.field(c, t, nullable=False) for c, (t, _) in cols.items()])
    pq.write_table(pa.Table.from_pandas(df[list(cols)], schema=schema, preserve_index=False), path)
    return path


def _set(col: str, row: int, value):
    def f(df: pd.DataFrame) -> pd.DataFrame:
        df = df.copy()
        df.loc[row, col] = value
        return df

    return f


BAD_VALUES = [
    ("accepted > drafted", _set("accepted", 3, 9), r"step 3: accepted outside 0\.\.drafted"),
    ("negative position", _set("position", 2, -4), r"step 2: position outside 0\.\.max_new_tokens - 1"),
    ("drafted past the clip", _set("drafted", 0, 1), r"step 0: drafted != min\(gamma, limit of its gamma_clip\)"),
    ("tokens_produced", _set("tokens_produced", 1, 7), r"step 1: tokens_produced != accepted \+ 1"),
    ("censored flag", lambda d: d.assign(censored=~d["censored"]), r"censored != \(accepted == drafted\)"),
    ("unknown compression", _set("compression", 0, "int4"), r"compression 'int4' not in"),
    (
        "non-finite signal",
        _set("post_mean_entropy_bits", 4, np.inf),
        r"post_mean_entropy_bits not finite or out of range",
    ),
    ("confidence above 1", _set("post_min_confidence", 4, 1.5), r"post_min_confidence not finite or out of range"),
    ("steps out of order", _set("step", 1, 5), r"step indices within a run must be 0, 1, 2"),
    ("a run column changes", _set("task", 5, "chat"), r"task changes within the run"),
]


@pytest.mark.parametrize("version", [1, 2])
@pytest.mark.parametrize(("what", "corrupt", "msg"), BAD_VALUES, ids=[b[0] for b in BAD_VALUES])
def test_bad_values_are_reported_with_the_file(two_runs, tmp_path: Path, version: int, what, corrupt, msg) -> None:
    path = _write(corrupt(two_runs), tmp_path / f"bad-v{version}.parquet", version)
    with pytest.raises(TraceFormatError, match=rf"bad-v{version}\.parquet: .*{msg}"):
        read_step_log(path)


def test_finish_reason_must_fit_the_run(two_runs, tmp_path: Path) -> None:
    cut = two_runs.drop(index=two_runs.index[-1])  # version 2 says "length", but the run stops short
    with pytest.raises(TraceFormatError, match=r"cut\.parquet: run .*: finish_reason does not fit"):
        read_step_log(_write(cut, tmp_path / "cut.parquet", 2))
    with pytest.raises(TraceFormatError, match=r"full\.parquet: run .*: finish_reason does not fit"):
        read_step_log(_write(two_runs.assign(finish_reason="truncated"), tmp_path / "full.parquet", 2))
    cut.loc[cut["run_id"] == cut["run_id"].iloc[-1], "finish_reason"] = "truncated"  # cut by a wrapper: valid
    assert len(read_step_log(_write(cut, tmp_path / "ok.parquet", 2))) == len(cut)


def test_types_nulls_versions_and_duplicates(two_runs, tmp_path: Path) -> None:
    table = pa.Table.from_pandas(two_runs[list(STEPS_COLUMNS)], schema=STEPS_ARROW_SCHEMA, preserve_index=False)
    i = table.column_names.index("accepted")
    wide = table.set_column(i, pa.field("accepted", pa.int64()), table.column("accepted").cast(pa.int64()))
    pq.write_table(wide, tmp_path / "type.parquet")
    with pytest.raises(TraceFormatError, match=r"type\.parquet: column 'accepted' has type int64, expected int16"):
        read_step_log(tmp_path / "type.parquet")
    pos = table.column("position").to_pylist()
    pos[3] = None
    nulls = table.set_column(table.column_names.index("position"), "position", pa.array(pos, pa.int32()))
    pq.write_table(nulls, tmp_path / "nulls.parquet")
    with pytest.raises(TraceFormatError, match=r"nulls\.parquet: column 'position' has null values"):
        read_step_log(tmp_path / "nulls.parquet")
    _write(two_runs, tmp_path / "v9.parquet", 2)
    t = pq.read_table(tmp_path / "v9.parquet")
    t = t.set_column(0, "schema", pa.array(["speckv-steps/9"] * t.num_rows))
    pq.write_table(t, tmp_path / "v9.parquet")
    with pytest.raises(TraceFormatError, match=r"v9\.parquet: schema version \['speckv-steps/9'\] not supported"):
        read_step_log(tmp_path / "v9.parquet")
    d = tmp_path / "dup"
    d.mkdir()
    _write(two_runs, d / "a.parquet", 2)
    _write(two_runs, d / "b.parquet", 2)
    with pytest.raises(TraceFormatError, match=r"b\.parquet: duplicate run_id .* \(also in .*a\.parquet\)"):
        read_step_log(d)


def test_version_1_is_read_with_its_conventions(two_runs, tmp_path: Path) -> None:
    _write(two_runs, tmp_path / "v1.parquet", 1)
    back = read_step_log(tmp_path / "v1.parquet")
    assert set(back["schema"]) == {"speckv-steps/2"} and set(back["gamma_clip"]) == {"paper"}
    assert set(back["finish_reason"]) == {"length"} and set(back["draft_fingerprint"]) == {""}
    assert back[list(STEPS_COLUMNS_V1)[1:]].equals(two_runs[list(STEPS_COLUMNS_V1)[1:]])
    # a RecordSteps log of version 1 (engine clip; a run that stops before its budget ended at EOS)
    live = two_runs[two_runs["run_id"] == two_runs["run_id"].iloc[0]].copy()
    live["source"] = "speckv-live"
    live["max_new_tokens"] = int((live["position"] + live["tokens_produced"]).max()) + 3
    live["drafted"] = np.minimum(live["gamma"], live["max_new_tokens"] - 1 - live["position"])
    live["censored"] = live["accepted"] == live["drafted"]
    _write(live, tmp_path / "live-v1.parquet", 1)
    back = read_step_log(tmp_path / "live-v1.parquet")
    assert set(back["gamma_clip"]) == {"engine"} and set(back["finish_reason"]) == {"eos"}


def test_writer_validates_and_splits_are_canonical(two_runs, tmp_path: Path) -> None:
    with pytest.raises(TraceFormatError, match=r"steps\.parquet \(being written\): .*accepted outside"):
        write_step_log(_set("accepted", 3, 9)(two_runs), tmp_path)
    assert not list(tmp_path.glob("*.parquet"))
    old = two_runs.assign(split="val")
    _write(old, tmp_path / "alias.parquet", 1)
    assert set(read_step_log(tmp_path / "alias.parquet")["split"]) == {"validation"}
