"""speckv-trace/1: Trace validation, derived L, crash-safe writer, strict reader."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from replay.schema import TRACE_SCHEMA_VERSION, TraceFormatError
from replay.trace import (
    Trace,
    TraceWriter,
    load_cost_models,
    read_traces,
    run_lengths,
    synthetic_dataset,
    synthetic_trace,
    traces_to_table,
    write_traces,
)
from speckv_env.core import CostModel


def _brute_L(a: np.ndarray, cap: int) -> list[int]:
    out = []
    for t in range(len(a)):
        k = 0
        while t + k < len(a) - 1 and a[t + k] and k < cap:  # the last token is always the target's
            k += 1
        out.append(k)
    return out


@pytest.mark.parametrize("seed", range(5))
def test_run_lengths_match_brute_force(seed: int) -> None:
    rng = np.random.default_rng(seed)
    a = rng.random(200) < rng.uniform(0.2, 0.95)
    for cap in (1, 3, 8):
        assert run_lengths(a, cap).tolist() == _brute_L(a, cap)
    tr = synthetic_trace(50, seed=seed)
    assert tr.L.dtype == np.int8 and tr.L.tolist() == _brute_L(tr.accept, tr.gamma_max)


def test_roundtrip_file_and_folder(tmp_path: Path) -> None:
    ds = synthetic_dataset(12, compressions=("fp16", "nf4"), modes=("greedy", "sample"))
    write_traces(tmp_path / "one.parquet", ds)
    back = read_traces(tmp_path / "one.parquet")
    assert len(back) == len(ds) and all(a.equals(b) for a, b in zip(ds, back))
    with TraceWriter(tmp_path / "folder", batch_size=5) as w:
        for t in ds:
            w.write(t)
    back2 = sorted(read_traces(tmp_path / "folder"), key=lambda t: t.trace_id)
    assert all(a.equals(b) for a, b in zip(sorted(ds, key=lambda t: t.trace_id), back2))
    assert len(list((tmp_path / "folder").glob("*.parquet"))) == 3  # 5 + 5 + 2
    nf4 = read_traces([tmp_path / "folder"], compression="nf4", mode="sample")
    assert nf4 and all(t.compression == "nf4" and t.mode == "sample" for t in nf4)
    assert read_traces(tmp_path / "folder", task=["code", "chat"], split="train")


def test_writer_resume_keys_and_duplicates(tmp_path: Path) -> None:
    ds = synthetic_dataset(6)
    w = TraceWriter(tmp_path)
    for t in ds[:4]:
        w.write(t)
    w.close()
    w2 = TraceWriter(tmp_path)
    assert w2.completed_keys() == {t.trace_id for t in ds[:4]}
    with pytest.raises(ValueError, match="already written"):
        w2.write(ds[0])
    todo = [t for t in ds if t.trace_id not in w2.completed_keys()]
    for t in todo:
        w2.write(t)
    assert sorted(t.trace_id for t in read_traces(tmp_path)) == sorted(t.trace_id for t in ds)


def test_cost_models_beside_logs(tmp_path: Path) -> None:
    w = TraceWriter(tmp_path)
    cm = CostModel(t_draft=0.002, t_verify=[0.02, 0.021, 0.023], t_target=0.019, compression="int8", pair="p")
    w.save_cost_model(cm)
    assert (tmp_path / "cost-int8.json").exists()
    got = load_cost_models(tmp_path)
    assert got["int8"] == cm


_KILL_SCRIPT = """
import sys, time
from replay.trace import TraceWriter, synthetic_trace
w = TraceWriter(sys.argv[1])
i = 0
while True:
    w.write(synthetic_trace(400, seed=i, trace_id=f"t{i:05d}"))
    i += 1
"""


def test_kill_9_leaves_finished_parts_readable(tmp_path: Path) -> None:
    proc = subprocess.Popen([sys.executable, "-c", _KILL_SCRIPT, str(tmp_path)])
    deadline = time.time() + 30
    while time.time() < deadline and len(list(tmp_path.glob("*.parquet"))) < 5:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    (tmp_path / "part-x.parquet.tmp").write_bytes(b"PAR1 half written")  # a killed writer's leftover
    traces = read_traces(tmp_path)
    keys = TraceWriter(tmp_path).completed_keys()
    ids = sorted(t.trace_id for t in traces)
    assert len(ids) >= 5 and ids == sorted(keys)
    assert ids == [f"t{i:05d}" for i in range(len(ids))]  # no gaps, no duplicates


def test_truncated_file_named_in_error(tmp_path: Path) -> None:
    p = tmp_path / "cut.parquet"
    write_traces(p, synthetic_dataset(3))
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])
    with pytest.raises(TraceFormatError, match="cut.parquet"):
        read_traces(tmp_path)


def test_schema_mismatch_errors(tmp_path: Path) -> None:
    table = traces_to_table(synthetic_dataset(2))
    pq.write_table(table.drop_columns(["sig_margin"]), tmp_path / "missing.parquet")
    with pytest.raises(TraceFormatError, match=r"missing\.parquet.*missing column.*sig_margin"):
        read_traces(tmp_path / "missing.parquet")
    idx = table.column_names.index("schema")
    bad = table.set_column(idx, table.schema.field("schema"), pa.array(["speckv-trace/9"] * 2))
    pq.write_table(bad, tmp_path / "version.parquet")
    with pytest.raises(TraceFormatError, match=r"version\.parquet.*speckv-trace/9"):
        read_traces(tmp_path / "version.parquet")
    # inconsistent lengths: drop the last accept value of row 0
    acc = table.column("accept").to_pylist()
    acc[0] = acc[0][:-1]
    i = table.column_names.index("accept")
    pq.write_table(
        table.set_column(i, table.schema.field("accept"), pa.array(acc, type=pa.list_(pa.bool_()))),
        tmp_path / "len.parquet",
    )
    with pytest.raises(TraceFormatError, match=r"len\.parquet.*inconsistent lengths.*accept"):
        read_traces(tmp_path / "len.parquet")
    i = table.column_names.index("tokens")
    wrong = pa.array(table.column("tokens").to_pylist(), type=pa.list_(pa.int64()))
    pq.write_table(table.set_column(i, pa.field("tokens", wrong.type), wrong), tmp_path / "type.parquet")
    with pytest.raises(TraceFormatError, match=r"type\.parquet.*'tokens'.*int64"):
        read_traces(tmp_path / "type.parquet")
    assert TRACE_SCHEMA_VERSION == "speckv-trace/2"
    # a /2 file that lost a rollout column is refused by name
    t2 = traces_to_table(synthetic_dataset(2, rollouts=True))
    pq.write_table(t2.drop_columns(["roll_p"]), tmp_path / "noroll.parquet")
    with pytest.raises(TraceFormatError, match=r"noroll\.parquet.*speckv-trace/2.*missing column.*roll_p"):
        read_traces(tmp_path / "noroll.parquet")


def test_duplicate_ids_across_files(tmp_path: Path) -> None:
    t = synthetic_trace(20, seed=1)
    write_traces(tmp_path / "a.parquet", [t])
    write_traces(tmp_path / "b.parquet", [t])
    with pytest.raises(TraceFormatError, match="duplicate trace_id"):
        read_traces(tmp_path)


def test_validation_of_values_and_recorded_path() -> None:
    t = synthetic_trace(30, seed=3)
    kw = {f: getattr(t, f) for f in ("trace_id", "tokens", "accept", "sig_top1", "sig_entropy", "sig_margin")}
    with pytest.raises(TraceFormatError, match="sig_top1"):
        Trace(**{**kw, "sig_top1": np.full(30, 1.5, np.float32)})
    with pytest.raises(TraceFormatError, match="finish_reason"):
        Trace(**kw, finish_reason="stop")
    with pytest.raises(TraceFormatError, match="compression"):
        Trace(**kw, compression="int4")
    # a recorded step claiming more acceptances than the accept column allows
    pos, g, k = t.step_pos.copy(), t.step_gamma.copy(), t.step_accepted.copy()
    j = int(np.nonzero(k < g)[0][0])
    k2 = k.copy()
    k2[j] += 1
    with pytest.raises(TraceFormatError, match=f"recorded step {j}|starts at"):
        Trace(
            **kw,
            step_pos=pos,
            step_gamma=g,
            step_accepted=k2,
            step_draft_s=t.step_draft_s,
            step_verify_s=t.step_verify_s,
        )
    with pytest.raises(TraceFormatError, match="inconsistent lengths"):
        Trace(
            **kw,
            step_pos=pos,
            step_gamma=g[:-1],
            step_accepted=k,
            step_draft_s=t.step_draft_s,
            step_verify_s=t.step_verify_s,
        )


def test_meta_roundtrip(tmp_path: Path) -> None:
    t = synthetic_trace(10, seed=2)
    t.meta = {"transformers": "5.0", "note": "x"}
    write_traces(tmp_path / "m.parquet", [t])
    assert read_traces(tmp_path / "m.parquet")[0].meta == t.meta
    assert json.loads(pq.read_table(tmp_path / "m.parquet").column("meta")[0].as_py())["note"] == "x"


def test_schema_doc_lists_every_column() -> None:
    from replay.schema import STEPS_COLUMNS
    from replay.schema import TRACE_COLUMNS_V2 as TRACE_COLUMNS

    doc = (Path(__file__).resolve().parent.parent / "replay" / "SCHEMA.md").read_text()
    for name in list(TRACE_COLUMNS) + list(STEPS_COLUMNS):
        assert f"| `{name}` |" in doc, name


def test_make_trace_id_is_stable() -> None:
    from replay.trace import make_trace_id

    a = make_trace_id("smol", "int8", "code-3", "sample", 7)
    assert a == make_trace_id("smol", "int8", "code-3", "sample", 7) and a != make_trace_id(
        "smol", "int8", "code-3", "sample", 8
    )


def test_schema_doc_states_the_code_rules() -> None:
    doc = (Path(__file__).resolve().parent.parent / "replay" / "SCHEMA.md").read_text()
    flat = " ".join(doc.split())
    # the clip is by the budget (known before the step), never by N (would leak a future EOS)
    assert "g_eff = min(g, `max_new_tokens` - 1 - t)" in flat and "g_eff = min(g, N - 1 - t)" not in flat
    assert "| `temperature` | `double` | sampling temperature (0.0 for greedy) |" in doc
    assert "`train`, `validation` and `test`" in flat and "3 validation, 4 test" in flat
    assert "| `gamma_clip` |" in doc and "speckv-steps/2" in doc


def test_split_names_are_canonical_and_val_is_an_alias(tmp_path: Path) -> None:
    ds = synthetic_dataset(10)
    assert {t.split for t in ds} == {"train", "validation", "test"}
    t = synthetic_trace(10, seed=1, split="val")
    assert t.split == "validation"
    write_traces(tmp_path / "s.parquet", ds)
    table = pq.read_table(tmp_path / "s.parquet")
    i = table.column_names.index("split")
    old = [("val" if s == "validation" else s) for s in table.column("split").to_pylist()]
    pq.write_table(table.set_column(i, table.schema.field("split"), pa.array(old)), tmp_path / "old.parquet")
    back = read_traces(tmp_path / "old.parquet", split="val")
    assert back and {t.split for t in back} == {"validation"}
    assert [t.trace_id for t in back] == [t.trace_id for t in read_traces(tmp_path / "s.parquet", split="validation")]
