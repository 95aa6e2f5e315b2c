"""Saved agents are strict JSON: NaN and infinities survive a save/load round trip."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from agents import load_agent, make_agent
from speckv_env.core import CostModel


def _strict(text: str):
    """Parse as any JSON reader would: NaN, Infinity and -Infinity are not JSON."""

    def refuse(token):
        raise ValueError(f"not JSON: {token}")

    return json.loads(text, parse_constant=refuse)


def _same(a, b) -> bool:
    if isinstance(a, float) and isinstance(b, float):
        return (math.isnan(a) and math.isnan(b)) or a == b
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


def test_bandit_tables_with_nan_and_inf_round_trip_as_strict_json(tmp_path):
    agent = make_agent("linucb", seed=3)
    agent.stats[0, 0] = np.nan
    agent.stats[1, 2] = np.inf
    agent.total_t = -math.inf
    agent.b[0, 1, 2] = np.nan
    p = agent.save(tmp_path / "linucb.json")
    _strict(p.read_text())
    back = load_agent(p)
    assert np.array_equal(back.stats, agent.stats, equal_nan=True)
    assert np.array_equal(back.b, agent.b, equal_nan=True)
    assert back.total_t == -math.inf
    assert _same(back.get_state(), agent.get_state()) and _same(back.get_config(), agent.get_config())


def test_config_with_a_nan_cost_model_field_round_trips(tmp_path):
    cm = CostModel.unit()
    cm.meta["measured_spread"] = math.nan
    agent = make_agent("cost_aware", cost_model=cm, decay=0.99)
    p = agent.save(tmp_path / "ca.json")
    doc = _strict(p.read_text())
    assert doc["config"]["cost_model"]["meta"]["measured_spread"] == {"__float__": "nan"}
    back = load_agent(p)
    assert math.isnan(back.cost_model.meta["measured_spread"])
    assert _same(back.get_config(), agent.get_config())


def test_safetensors_metadata_with_a_nan_loss_round_trips(tmp_path):
    from safetensors import safe_open

    agent = make_agent("speckv_mlp", seed=0)
    agent.train_loss = math.nan
    p = agent.save(tmp_path / "mlp.safetensors")
    with safe_open(str(p), "np") as f:
        meta = f.metadata()
    _strict(meta["state"])
    _strict(meta["config"])
    back = load_agent(p)
    assert math.isnan(back.train_loss)
    for k, v in agent.get_tensors().items():
        assert np.array_equal(back.get_tensors()[k], v)


def test_files_with_bare_nan_tokens_still_load(tmp_path):
    agent = make_agent("ucb1", seed=1)
    doc = {"format": "speckv-agent/1", "kind": "ucb1", "config": agent.get_config(), "state": agent.get_state()}
    doc["state"]["total_e"] = math.nan
    p = tmp_path / "old.json"
    p.write_text(json.dumps(doc, allow_nan=True))  # as older versions wrote them
    assert "NaN" in p.read_text()
    assert math.isnan(load_agent(p).total_e)


def test_a_float_tag_is_only_read_as_a_float_when_it_is_exactly_one():
    from agents.base import _decode_floats, _encode_floats

    assert _decode_floats(_encode_floats([math.inf, -math.inf, 1.5])) == [math.inf, -math.inf, 1.5]
    other = {"__float__": "nan", "extra": 1}
    assert _decode_floats(other) == other
    assert _decode_floats({"__float__": "two"}) == {"__float__": "two"}


@pytest.mark.parametrize("kind", ["epsilon_greedy", "thompson", "exp3"])
def test_other_bandits_round_trip_non_finite_state(tmp_path, kind):
    agent = make_agent(kind, seed=0)
    agent.stats[:] = np.nan
    p = agent.save(tmp_path / f"{kind}.json")
    _strict(p.read_text())
    assert _same(load_agent(p).get_state(), agent.get_state())
