"""Row-count plans for CPU linear layers: same products as nn.Linear (up to rounding), every
padding, layout and fallback path; the engine stays lossless with them; plans are cached."""

from __future__ import annotations

import random

import pytest
import torch
from tiny_models import make_tiny_pair
from torch import nn

from speckv_env import cpu_linear
from speckv_env.engine import SpeculativeEngine

ALL_WX = {n: max(n, 2) + (n % 3) for n in range(1, cpu_linear.MAX_ROWS + 1)}  # padded, some by 1-2 rows


def _layer(bias: bool = True, seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(48, 80, bias=bias)


@pytest.mark.parametrize("bias", [True, False])
def test_planned_products_equal_nn_linear(bias):
    lin = _layer(bias)
    w, b = lin.weight.detach().clone(), None if lin.bias is None else lin.bias.detach().clone()
    assert cpu_linear.install(lin, {(80, 48): ALL_WX}) == 1 and cpu_linear.installed(lin)
    with torch.inference_mode():
        for n in range(1, cpu_linear.MAX_ROWS + 3):  # the last two rows counts fall back to the stock path
            x = torch.randn(1, n, 48)
            y = lin(x)
            ref = nn.functional.linear(x, w, b)
            assert y.shape == (1, n, 80) and y.is_contiguous()
            torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
            if n > cpu_linear.MAX_ROWS:
                assert torch.equal(y, ref)
        # a column-major (transposed) input and a 2-D input give the same products
        xt = torch.randn(48, 4).t()
        torch.testing.assert_close(lin(xt), nn.functional.linear(xt, w, b), rtol=1e-5, atol=1e-5)


def test_uninstall_restores_the_stock_path_and_training_is_untouched():
    lin = _layer()
    cpu_linear.install(lin, {(80, 48): ALL_WX})
    x = torch.randn(3, 48, requires_grad=True)
    lin(x).sum().backward()  # grad mode uses nn.functional.linear: gradients flow as usual
    assert x.grad is not None and lin.weight.grad is not None
    cpu_linear.uninstall(lin)
    assert type(lin) is nn.Linear and not cpu_linear.installed(lin)
    with torch.inference_mode():
        assert torch.equal(lin(x.detach()), nn.functional.linear(x.detach(), lin.weight, lin.bias))


def test_only_float32_cpu_linear_layers_are_planned():
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8).to(torch.bfloat16), nn.Embedding(10, 8))
    n = cpu_linear.install(model, {(8, 8): ALL_WX})
    assert n == 1 and type(model[0]) is cpu_linear.PlannedLinear and type(model[1]) is not cpu_linear.PlannedLinear


def test_tuned_plans_are_cached_per_host(tmp_path, monkeypatch):
    monkeypatch.setenv("SPECKV_CACHE", str(tmp_path))
    model = nn.Sequential(nn.Linear(32, 96), nn.Linear(96, 32))
    plans = cpu_linear.plans_for(model, max_rows=4)
    assert set(plans) == {(96, 32), (32, 96)}
    for p in plans.values():
        assert set(p) == {1, 2, 3, 4} and all(c == 0 or c >= n for n, c in p.items())
    assert (tmp_path / "cpu_linear_plans.json").exists()

    def boom(*a, **k):
        raise AssertionError("plans should come from the cache")

    monkeypatch.setattr(cpu_linear, "tune", boom)
    assert cpu_linear.plans_for(model, max_rows=4) == plans
    (tmp_path / "cpu_linear_plans.json").write_text("{not json")  # a damaged cache is re-timed
    monkeypatch.undo()
    monkeypatch.setenv("SPECKV_CACHE", str(tmp_path))
    assert set(cpu_linear.plans_for(model, max_rows=4)) == set(plans)


@pytest.mark.parametrize("seed", [0, 1])
def test_engine_is_lossless_with_planned_kernels(seed):
    target, draft = make_tiny_pair(seed=seed)
    rng = random.Random(seed)
    prompt = [rng.randrange(4, 64) for _ in range(6)]
    ids = torch.tensor([prompt])
    ref = target.generate(ids, max_new_tokens=40, do_sample=False, eos_token_id=3, pad_token_id=0)[0, 6:].tolist()
    for m in (target, draft):
        shapes = {tuple(layer.weight.shape) for layer in m.modules() if type(layer) is nn.Linear}
        assert cpu_linear.install(m, dict.fromkeys(shapes, ALL_WX)) > 0
    try:
        eng = SpeculativeEngine(target, draft, eos_token_id=3)
        for gamma in (0, 1, 3, 5, 8):
            assert eng.generate(prompt, 40, gamma=gamma).tokens == ref, f"gamma {gamma}"
        a = SpeculativeEngine(target, draft, eos_token_id=3, temperature=0.7)
        s1 = a.generate(prompt, 40, gamma=2, seed=5).tokens
        s2 = a.generate(prompt, 40, gamma=6, seed=5).tokens
        assert s1 == s2  # sampling output does not depend on gamma, planned or not
    finally:
        cpu_linear.uninstall(target)
        cpu_linear.uninstall(draft)


def test_refresh_times_the_plans_again(tmp_path, monkeypatch):
    monkeypatch.setenv("SPECKV_CACHE", str(tmp_path))
    model = nn.Sequential(nn.Linear(32, 96))
    cpu_linear.plans_for(model, max_rows=3)
    calls = []

    def fake_tune(weights, max_rows):
        calls.append(tuple(weights[0].shape))
        return dict.fromkeys(range(1, max_rows + 1), 0)

    monkeypatch.setattr(cpu_linear, "tune", fake_tune)
    assert cpu_linear.plans_for(model, max_rows=3, refresh=True) == {(96, 32): {1: 0, 2: 0, 3: 0}}
    assert calls == [(96, 32)]
    assert cpu_linear.plans_for(model, max_rows=3) == {(96, 32): {1: 0, 2: 0, 3: 0}}  # the new plans were saved
    assert calls == [(96, 32)]


def test_weights_reassigned_after_install_are_used():
    lin = _layer()
    cpu_linear.install(lin, {(80, 48): ALL_WX})
    lin.weight = nn.Parameter(torch.randn(80, 48))
    x = torch.randn(3, 48)
    with torch.inference_mode():
        torch.testing.assert_close(lin(x), nn.functional.linear(x, lin.weight, lin.bias), rtol=1e-5, atol=1e-5)
