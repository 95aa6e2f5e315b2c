"""#12: the live check refuses traces recorded with another draft, before any training or decoding."""

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
