"""Replay files are written atomically and durably: tmp file in the same folder, flush + fsync,
rename into place, fsync of the folder; a failed write leaves the old file and no debris."""

from __future__ import annotations

import os
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from replay.importers import import_speckv_paper, read_step_log, write_step_log
from replay.trace import TraceWriter, read_traces, synthetic_dataset, write_traces


@pytest.fixture
def fs_log(monkeypatch):
    """Record fsync (by resolved path), replace and link calls, in order."""
    log: list[tuple[str, ...]] = []
    real_fsync, real_replace, real_link = os.fsync, os.replace, os.link

    def fsync(fd):
        log.append(("fsync", os.path.realpath(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    def replace(src, dst, *a, **kw):
        log.append(("rename", os.path.realpath(src), os.path.realpath(dst)))
        return real_replace(src, dst, *a, **kw)

    def link(src, dst, *a, **kw):
        log.append(("rename", os.path.realpath(src), os.path.realpath(dst)))
        return real_link(src, dst, *a, **kw)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    monkeypatch.setattr(os, "link", link)
    return log


def _assert_durable(log: list[tuple[str, ...]], final: Path) -> None:
    final_s = os.path.realpath(final)
    renames = [i for i, e in enumerate(log) if e[0] == "rename" and e[2] == final_s]
    assert renames, f"{final} was not renamed into place: {log}"
    i = renames[-1]
    tmp = log[i][1]
    assert os.path.dirname(tmp) == os.path.dirname(final_s) and tmp.endswith(".tmp")
    assert ("fsync", tmp) in log[:i], f"tmp file not fsynced before the rename: {log}"
    assert ("fsync", os.path.dirname(final_s)) in log[i + 1 :], f"folder not fsynced after the rename: {log}"
    assert not [p for p in final.parent.iterdir() if p.name.endswith(".tmp")]


def test_write_traces_is_atomic_and_fsynced(tmp_path: Path, fs_log) -> None:
    ds = synthetic_dataset(3)
    write_traces(tmp_path / "t.parquet", ds)
    _assert_durable(fs_log, tmp_path / "t.parquet")
    assert len(read_traces(tmp_path / "t.parquet")) == 3


def test_trace_writer_parts_are_atomic_and_fsynced(tmp_path: Path, fs_log) -> None:
    with TraceWriter(tmp_path) as w:
        w.write(synthetic_dataset(1)[0])
    (part,) = tmp_path.glob("*.parquet")
    _assert_durable(fs_log, part)


def test_write_step_log_is_atomic_and_fsynced(tmp_path: Path, fs_log) -> None:
    steps, _ = import_speckv_paper()
    sub = steps[steps["run_id"].isin(steps["run_id"].unique()[:10])]
    path = write_step_log(sub, tmp_path)
    _assert_durable(fs_log, path)
    assert read_step_log(path)["accepted"].tolist() == sub["accepted"].tolist()


def test_failed_write_keeps_the_old_file_and_leaves_no_debris(tmp_path: Path, monkeypatch) -> None:
    p = tmp_path / "t.parquet"
    write_traces(p, synthetic_dataset(2))
    before = p.read_bytes()

    def boom(*a, **kw):
        raise OSError("disk full")

    monkeypatch.setattr(pq, "write_table", boom)
    with pytest.raises(OSError, match="disk full"):
        write_traces(p, synthetic_dataset(5))
    assert p.read_bytes() == before
    assert sorted(x.name for x in tmp_path.iterdir()) == ["t.parquet"]
