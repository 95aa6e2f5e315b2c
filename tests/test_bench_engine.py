"""`speckv bench engine`: HF's constant gamma really applied (observed = label), every method
emits the target's greedy text on row-invariant kernels, methods interleaved per prompt, the
engine's gamma chosen on validation prompts only."""

from __future__ import annotations

import copy
import inspect
import time

import pytest
import torch
from conftest import requires_default
from tiny_models import make_tiny_llama

from speckv_env.app import bench_engine as be

VOCAB = 49152


@pytest.fixture(scope="module")
def agreeing_pair():
    """A tiny target with the real tokenizer and a draft that is its exact copy (always agrees),
    both row-invariant."""
    from speckv_env import invariant
    from speckv_env.models import load_tokenizer
    from speckv_env.pair import ModelPair

    tok = load_tokenizer(None)
    target = make_tiny_llama(vocab=VOCAB, hidden=32, seed=4)
    target.config.eos_token_id = target.generation_config.eos_token_id = tok.eos_token_id
    draft = copy.deepcopy(target)
    for m in (target, draft):
        invariant.make_row_invariant(m)
    return ModelPair(target, draft, tok, "tiny-target", "tiny-draft", "fp32", torch.device("cpu"), exact=True)


def _prompts(split, n):
    return be.bench_prompts(split=split)[:n]


@requires_default
def test_constant_gamma_is_applied_and_outputs_agree(agreeing_pair):
    from speckv_env import invariant

    before = agreeing_pair.draft.generation_config.to_dict()
    r = be.run_engine_bench(
        agreeing_pair,
        prompts=_prompts("test", 2),
        val_prompts=_prompts("validation", 1),
        max_new_tokens=12,  # a multiple of gamma + 1 for gamma 1, 2, 3: no round is clipped at the end
        gammas_engine=(0, 2),
        gammas_hf=(1, 2, 3),
        repeats=1,
        progress=False,
    )
    for g in (1, 2, 3):
        assert r["hf_assisted_observed_gamma"][f"constant-{g}"] == pytest.approx(g), r["hf_assisted_observed_gamma"]
        assert r["hf_assisted_candidates_per_round"][f"constant-{g}"] == pytest.approx(g)
        assert r["hf_assisted_observed_gamma_unclipped"][f"constant-{g}"] == pytest.approx(g)
    assert set(r["hf_assisted_tps"]) == {"constant-1", "constant-2", "constant-3", "default", "prompt_lookup-10"}
    # HF's default as shipped: up to 20 tokens, drafting stops below confidence 0.4 (a random tiny
    # model is never that confident: one token per round)
    assert r["hf_assisted_observed_gamma"]["default"] == pytest.approx(1.0)
    # on row-invariant kernels every method emits the target's greedy text, HF's too
    assert r["exact"] and r["outputs_expected_identical"] and r["outputs_identical"], r["output_mismatches"]
    assert r["kernels"].startswith("row-invariant")
    # the held-out gamma is the fastest on the validation prompts (ties: the smaller)
    val = r["engine_validation_tps"]
    assert set(r["engine_tps"]) == set(val) == {"0", "2"}
    assert r["engine_heldout_gamma"] == min((0, 2), key=lambda g: (-val[str(g)], g))
    assert r["engine_heldout_tps"] == r["engine_tps"][str(r["engine_heldout_gamma"])]
    assert "hf_target_stock_tps" in r  # stock kernels measured, and put back after
    assert invariant.is_row_invariant(agreeing_pair.target) and invariant.is_row_invariant(agreeing_pair.draft)
    assert agreeing_pair.draft.generation_config.to_dict() == before  # the shipped config restored
    for key in ("hf_target_tps", "lean_target_tps", "engine_heldout_vs_lean", "spread", "validation_prompts"):
        assert key in r
    assert set(r["validation_prompts"]).isdisjoint(r["prompts"])
    assert "held-out gamma" in be.format_engine_table(r)


@requires_default
def test_rounds_clipped_by_the_budget_are_told_apart(agreeing_pair):
    """11 tokens at constant 3: rounds of 4 tokens, the last round asks for 2 (11 - 8 - 1)."""
    shipped = copy.deepcopy(agreeing_pair.draft.generation_config)
    m = be._hf_method(agreeing_pair, "constant-3", 11, shipped)
    out = m.run(agreeing_pair.encode_chat("Count to ten."))
    assert len(out) == 11
    assert m.rounds == [(3, 3), (3, 3), (2, 2)]
    c = be._hf_counts([m])
    assert c["unclipped"]["constant-3"] == 3 and c["observed"]["constant-3"] == pytest.approx(8 / 3)
    assert agreeing_pair.draft.generation_config.num_assistant_tokens == shipped.num_assistant_tokens


@requires_default
def test_heldout_gamma_ignores_the_test_prompts(agreeing_pair, monkeypatch):
    """Make gamma 2 the fastest on validation prompts and the slowest on test prompts: the
    held-out choice stays 2 whatever the test timings say."""
    val_ids = {tuple(agreeing_pair.encode_chat(p.text)) for p in _prompts("validation", 2)}

    def run(test_penalty: float) -> dict:
        class Slowed(be.SpeculativeEngine):
            def generate(self, ids, n, gamma=4, seed=0):
                on_val = tuple(ids) in val_ids
                if on_val:
                    time.sleep(0.0 if gamma == 2 else 0.05)
                else:
                    time.sleep(test_penalty if gamma == 2 else 0.0)
                return super().generate(ids, n, gamma=gamma, seed=seed)

        monkeypatch.setattr(be, "SpeculativeEngine", Slowed)
        return be.run_engine_bench(
            agreeing_pair,
            prompts=_prompts("test", 2),
            val_prompts=_prompts("validation", 2),
            max_new_tokens=6,
            gammas_engine=(0, 1, 2),
            gammas_hf=(1,),
            prompt_lookup=(),
            repeats=1,
            progress=False,
            stock=False,
        )

    calm, perturbed = run(0.0), run(0.2)
    assert calm["engine_heldout_gamma"] == perturbed["engine_heldout_gamma"] == 2
    assert perturbed["best_engine_gamma"] != 2  # the test prompts now favour another gamma
    assert perturbed["engine_heldout_tps"] < max(perturbed["engine_tps"].values())


@requires_default
def test_validation_and_test_prompts_must_differ(agreeing_pair):
    p = _prompts("test", 1)
    with pytest.raises(ValueError, match="validation prompts"):
        be.run_engine_bench(agreeing_pair, prompts=p, val_prompts=p, progress=False)


def test_methods_interleave_round_robin_per_prompt():
    calls: list[tuple[str, int]] = []
    methods = [be.Method(name, lambda ids, name=name: calls.append((name, ids[0])) or [1]) for name in "abcde"]
    tm = be.run_interleaved(methods, [[0], [1], [2]], repeats=3, seed=0)
    assert len(calls) == 3 * 3 * 5
    blocks = [calls[i : i + 5] for i in range(0, len(calls), 5)]
    orders = set()
    for b, block in enumerate(blocks):
        assert {p for _, p in block} == {b % 3}  # one prompt at a time, every method on it
        assert sorted(n for n, _ in block) == list("abcde")
        orders.add(tuple(n for n, _ in block))
    assert len(orders) > 3  # a fresh order per prompt and repeat
    assert all(len(tm.seconds[n]) == 3 and len(tm.seconds[n][0]) == 3 for n in "abcde")
    s = be.summarize(tm, "a")
    assert len(s["per_repeat"]) == 3 and s["min"] <= s["median"] <= s["max"]


def test_select_gamma_and_paired_ratio():
    assert be.select_gamma({"0": 10.0, "1": 12.0, "2": 12.0}) == 1  # the smaller on a tie
    tm = be.Timings(
        seconds={"a": [[1.0], [2.0], [1.0]], "b": [[2.0], [2.0], [4.0]]}, tokens={"a": [[1] * 4], "b": [[1] * 4]}
    )
    r = be.paired_ratio(tm, "a", "b")
    assert r["per_repeat"] == [2.0, 1.0, 4.0] and r["median"] == 2.0


def test_call_counter_keeps_the_signature_transformers_inspects():
    m = make_tiny_llama(vocab=64, hidden=32)
    with be.CallCounter(m) as c:
        assert "logits_to_keep" in inspect.signature(m.forward).parameters
        m(input_ids=torch.tensor([[1, 2, 3]]))
        m(torch.tensor([[4]]))
    assert c.lengths == [3, 1]
    assert "forward" not in vars(m)  # the wrapper is gone


def test_the_drafts_hidden_logits_to_keep_is_named_for_hf():
    from tiny_models import make_tiny_lookup_draft

    draft = make_tiny_lookup_draft(make_tiny_llama(vocab=64, hidden=32))
    assert not draft._supports_logits_to_keep()  # the shipped draft's forward(*args, **kwargs)
    with be.CallCounter(draft):
        assert draft._supports_logits_to_keep()
        out = draft(input_ids=torch.tensor([[1, 2, 3, 4]]), logits_to_keep=1)
        assert out.logits.shape[1] == 1  # and it honours it
    assert not draft._supports_logits_to_keep()


def test_lean_loop_is_the_greedy_target():
    m = make_tiny_llama(vocab=64, hidden=32, eos=-1)
    ids = [1, 5, 9]
    out = be.lean_target_loop(m, ids, 7, [])
    ref = m.generate(torch.tensor([ids]), max_new_tokens=7, do_sample=False, pad_token_id=0)[0, 3:].tolist()
    assert out == ref and len(out) == 7
