"""Context lookup mixed into the draft: proposals, the mixture, cache/crop bookkeeping, and
that the engine stays lossless and gamma-independent with it."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from tiny_models import make_tiny_lookup_draft

from speckv_env.engine import SpeculativeEngine
from speckv_env.lookup import ContextLookup, _lookup_one, lookup_table


def brute(ids, i, nmax):
    """Copy proposal for the token after ids[:i]: longest suffix (<= nmax) seen earlier, most recent."""
    for n in range(min(nmax, i), 0, -1):
        suf = ids[i - n : i]
        for j in range(i - n - 1, -1, -1):
            if ids[j : j + n] == suf:
                return ids[j + n], n
    return -1, 0


@pytest.mark.parametrize("seed", range(5))
def test_lookup_table_and_single_search_match_brute_force(seed):
    rng = random.Random(seed)
    ids = [rng.randrange(6) for _ in range(80)]
    props, ns = lookup_table(ids, 0, 4)
    for i in range(len(ids) + 1):
        assert (props[i], ns[i]) == brute(ids, i, 4), i
        if i >= 1:
            assert _lookup_one(np.array(ids[:i]), 4) == brute(ids, i, 4)
    p5, n5 = lookup_table(ids, 30, 4)
    assert p5.tolist() == props[30:].tolist() and n5.tolist() == ns[30:].tolist()


def test_mixture_is_a_distribution_with_the_copy_weight():
    lk = ContextLookup([0.2, 0.6])
    logits = torch.randn(3, 10)
    out = lk.mix(logits, np.array([4, 7, -1]), np.array([1, 2, 0]))
    p = out.exp()
    assert torch.allclose(p.sum(-1), torch.ones(3), atol=1e-5)
    q = torch.softmax(logits, -1)
    assert float(p[0, 4]) == pytest.approx(0.8 * float(q[0, 4]) + 0.2, abs=1e-6)
    assert float(p[1, 7]) == pytest.approx(0.4 * float(q[1, 7]) + 0.6, abs=1e-6)
    assert torch.allclose(p[2], q[2], atol=1e-6)  # no match: the draft's own distribution
    for bad in ([], [1.0], [-0.1], [float("nan")]):
        with pytest.raises(ValueError, match="lookup weights"):
            ContextLookup(bad)


def test_cached_and_cropped_forward_equals_full_forward(tiny_pair):
    """The history kept on the cache follows crops, so incremental logits equal full-sequence ones."""
    from transformers import DynamicCache

    target, _ = tiny_pair
    draft = make_tiny_lookup_draft(target)
    rng = random.Random(0)
    seq = [rng.randrange(4, 12) for _ in range(40)]  # small alphabet: many matches
    with torch.no_grad():
        full = draft(input_ids=torch.tensor([seq])).logits[0]
        cache = DynamicCache(config=draft.config)
        draft(input_ids=torch.tensor([seq[:10]]), cache=cache, use_cache=True)
        pos = 10
        while pos < len(seq):
            # feed a few true tokens plus junk, then crop the junk away (as after a rejection)
            k = min(rng.randint(1, 4), len(seq) - pos)
            junk = [rng.randrange(4, 12) for _ in range(rng.randint(0, 3))]
            out = draft(input_ids=torch.tensor([seq[pos : pos + k] + junk]), cache=cache, use_cache=True).logits[0]
            assert torch.allclose(out[:k], full[pos : pos + k], atol=1e-4)
            if junk:
                cache.crop(-len(junk))
            pos += k


def test_lookup_changes_the_draft_and_raises_acceptance_on_repetitive_text(tiny_pair):
    target, _ = tiny_pair
    with_lk = make_tiny_lookup_draft(target, noise=0.6)
    without = make_tiny_lookup_draft(target, weights=(), noise=0.6)
    eng_a = SpeculativeEngine(target, with_lk, eos_token_id=[])
    eng_b = SpeculativeEngine(target, without, eos_token_id=[])
    prompt = [5, 6, 7, 8, 9, 10, 11] * 3
    ra, rb = eng_a.generate(prompt, 60, 4), eng_b.generate(prompt, 60, 4)
    assert ra.tokens == rb.tokens  # lossless either way
    assert ra.acceptance_rate > rb.acceptance_rate


@pytest.mark.parametrize("seed", [0, 1, 94])  # 94: the draft proposes the EOS and it is accepted
def test_engine_with_lookup_is_lossless_and_gamma_independent(tiny_pair, seed):
    target, _ = tiny_pair
    draft = make_tiny_lookup_draft(target)
    rng = random.Random(seed)
    prompt = [rng.randrange(4, 16) for _ in range(rng.randint(3, 20))]
    ref = target.generate(torch.tensor([prompt]), max_new_tokens=40, do_sample=False, eos_token_id=3, pad_token_id=0)[
        0, len(prompt) :
    ].tolist()
    eng = SpeculativeEngine(target, draft, eos_token_id=3)
    for g in [0, 1, 3, 8, [1, 5, 2, 0, 7]]:
        res = eng.generate(prompt, 40, g)
        assert res.tokens == ref, g
        # full-information record: the step outcomes follow from the per-position flags
        t = 0
        for s in res.steps:
            run = 0
            while t + run < len(eng.pos_accept) and eng.pos_accept[t + run]:
                run += 1
            if s.finish_reason == "eos":  # cut at the EOS: accepted counts the drafts before it
                assert s is res.steps[-1] and s.tokens[-1] == 3 and 3 not in s.tokens[:-1]
                assert s.accepted == len(s.tokens) - 1 <= min(run, s.gamma), (g, s)
            else:
                assert min(run, s.gamma) == s.accepted, (g, s)
            t += len(s.tokens)
    samp = SpeculativeEngine(target, draft, eos_token_id=3, temperature=0.8, top_p=0.9)
    outs = {tuple(samp.generate(prompt, 30, g, seed=seed).tokens) for g in [0, 1, 2, 5, [3, 0, 6]]}
    assert len(outs) == 1


def test_fit_lookup_weights_follow_which_proposal_is_right():
    """experiments/fit_lookup.py: a match length whose copies are right gets weight, one whose
    copies are wrong gets none; agreement with the fitted weights is never below the neural one."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments"))
    from fit_lookup import agreement, fit

    rng = np.random.default_rng(0)
    n = rng.integers(0, 4, 400)
    tgt = rng.integers(0, 50, 400)
    am = np.where(rng.random(400) < 0.4, tgt, tgt + 1)  # neural right 40% of the time
    prop = np.where(n == 2, tgt, np.where(n == 3, tgt + 2, -1))  # n=2 copies right, n=3 wrong
    stats = [{"tgt": tgt, "am": am, "qmax": np.full(400, 0.5), "qc": np.full(400, 0.1), "prop": prop, "n": n}]
    w, counts = fit(stats, 3)
    assert w[1] > 0 and w[2] == 0
    assert counts[2] == int((n == 2).sum())
    assert agreement(stats, w) > agreement(stats, [0.0] * 3)
