"""Engine details of #11: an EOS id of 0 is a real id, sliding-window caches roll back, and the
row-invariant attention refuses contexts past a sliding window instead of computing wrongly."""

from __future__ import annotations

import torch
from tiny_models import make_tiny_mistral, make_tiny_pair

from speckv_env import invariant
from speckv_env.engine import SpeculativeEngine


def test_eos_id_zero_is_kept():
    target, draft = make_tiny_pair(seed=3)
    for m in (target, draft):
        m.generation_config.eos_token_id = 0
        m.config.eos_token_id = 7  # must not win over the generation config's 0
    eng = SpeculativeEngine(target, draft)
    assert eng.eos == frozenset([0])


def test_sliding_window_caches_roll_back_past_the_window():
    """Rejections after the window is full used to raise in transformers' crop; now every gamma
    gives the target's own greedy output."""
    import copy

    target = make_tiny_mistral(window=8)
    draft = copy.deepcopy(target)
    with torch.no_grad():
        for p in draft.parameters():
            p.add_(0.05 * torch.randn_like(p) * p.std())
    eng = SpeculativeEngine(target, draft, eos_token_id=[])
    prompt = list(range(5, 11))
    ref = eng.generate(prompt, 24, gamma=0).tokens
    for gamma in (1, 3, 5):
        assert eng.generate(prompt, 24, gamma=gamma).tokens == ref
    assert len(ref) == 24


def test_row_invariant_attention_refuses_past_the_window():
    import pytest

    target = make_tiny_mistral(window=8)
    invariant.make_row_invariant(target)
    with torch.inference_mode():
        target(input_ids=torch.tensor([[5, 6, 7]]))  # within the window: fine
        with pytest.raises(RuntimeError, match="sliding-window"):
            target(input_ids=torch.tensor([list(range(5, 17))]))
