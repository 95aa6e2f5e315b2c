"""CostModel.load error matrix: every malformed file raises FileNotFoundError or ValueError
naming the file (never AttributeError, UnicodeDecodeError, IsADirectoryError or a bare
KeyError), and a saved model loads back equal."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from speckv_env.core import CostModel

GOOD = CostModel.unit().to_dict()


def _with(**changes):
    d = dict(GOOD)
    for k, v in changes.items():
        if v is _DROP:
            d.pop(k)
        else:
            d[k] = v
    return json.dumps(d)


_DROP = object()

CASES = [
    ("empty", b"", "not valid JSON"),
    ("truncated", json.dumps(GOOD)[:40].encode(), "not valid JSON"),
    ("garbage", b"\xff\xfe\x00\x01garbage", "not UTF-8"),
    ("text", b"t_draft = 0.1", "not valid JSON"),
    ("array", b"[1, 2, 3]", "a JSON object expected, got list"),
    ("number", b"3.5", "a JSON object expected, got float"),
    ("null", b"null", "a JSON object expected, got NoneType"),
    ("schema", _with(schema="speckv-cost/9").encode(), "unsupported cost model schema"),
    ("no t_draft", _with(t_draft=_DROP).encode(), "malformed cost model.*t_draft"),
    ("no t_verify", _with(t_verify=_DROP).encode(), "malformed cost model.*t_verify"),
    ("no t_target", _with(t_target=_DROP).encode(), "malformed cost model.*t_target"),
    ("t_verify empty", _with(t_verify=[]).encode(), "at least one entry"),
    ("t_verify number", _with(t_verify=1.0).encode(), "malformed cost model"),
    ("t_draft text", _with(t_draft="fast").encode(), "malformed cost model"),
    ("t_draft negative", _with(t_draft=-0.1).encode(), "finite and non-negative"),
    ("t_verify nan", _with(t_verify=[1.0, float("nan")]).encode(), "finite and non-negative"),
    ("t_target infinite", _with(t_target=float("inf")).encode(), "finite and non-negative"),
    ("t_target zero", _with(t_target=0.0).encode(), "t_target must be positive"),
    ("meta list", _with(meta=[1, 2]).encode(), "malformed cost model"),
]


@pytest.mark.parametrize(("name", "data", "msg"), CASES, ids=[c[0] for c in CASES])
def test_malformed_file_names_the_file(tmp_path: Path, name: str, data: bytes, msg: str) -> None:
    p = tmp_path / "cost-fp32.json"
    p.write_bytes(data)
    with pytest.raises(ValueError, match=msg) as err:
        CostModel.load(p)
    assert str(p) in str(err.value)


def test_missing_file_and_folder(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist") as err:
        CostModel.load(tmp_path / "nope.json")
    assert str(tmp_path / "nope.json") in str(err.value)
    with pytest.raises(ValueError, match="is a folder") as err2:
        CostModel.load(tmp_path)
    assert str(tmp_path) in str(err2.value)


def test_round_trip(tmp_path: Path) -> None:
    cm = CostModel(t_draft=0.01, t_verify=[0.1, 0.12], t_target=0.1, pair="p", compression="int8", meta={"a": 1})
    cm.save(tmp_path / "cost-int8.json")
    assert CostModel.load(tmp_path / "cost-int8.json") == cm
