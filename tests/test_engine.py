"""The engine is lossless: greedy output equals the target's own greedy generate, for any
gamma schedule; sampling output does not depend on gammas and is distributed as the target."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch
from tiny_models import make_tiny_pair

from speckv_env.engine import SpeculativeEngine

SCHEDULES = [*range(9), "random"]


def hf_greedy(model, prompt, n, eos=3):
    out = model.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False, eos_token_id=eos, pad_token_id=0)
    return out[0, len(prompt) :].tolist()


def schedule(kind, rng):
    return (lambda i, s: rng.randint(0, 8)) if kind == "random" else kind


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_greedy_equals_target_generate_for_every_schedule(tiny_pair, seed):
    target, draft = tiny_pair
    rng = random.Random(seed)
    prompt = [rng.randrange(4, 64) for _ in range(rng.randint(1, 12))]
    ref = hf_greedy(target, prompt, 40)
    eng = SpeculativeEngine(target, draft, eos_token_id=3)
    accepted_any = False
    for kind in SCHEDULES:
        res = eng.generate(prompt, 40, schedule(kind, rng))
        assert res.tokens == ref, f"schedule {kind}: {res.tokens} != {ref}"
        accepted_any |= any(s.accepted > 0 for s in res.steps)
        assert all(s.gamma <= 8 and 0 <= s.accepted <= s.gamma for s in res.steps)
        assert sum(len(s.tokens) for s in res.steps) == len(ref)
    assert accepted_any, "the noisy-copy draft should get some tokens accepted"


def test_eos_and_max_new_tokens_end_cleanly(tiny_pair):
    target, draft = tiny_pair
    eng = SpeculativeEngine(target, draft, eos_token_id=3)
    for n in (1, 2, 5):
        res = eng.generate([5, 6, 7], n, gamma=8)
        assert len(res.tokens) <= n
        assert res.finish_reason in ("eos", "length")
    # make every token EOS-able: treat the first emitted token as EOS
    first = eng.generate([5, 6, 7], 4, gamma=0).tokens[0]
    eng2 = SpeculativeEngine(target, draft, eos_token_id=[first])
    res = eng2.generate([5, 6, 7], 30, gamma=6)
    assert res.tokens == [first] and res.finish_reason == "eos"
    with pytest.raises(RuntimeError, match="finished"):
        eng2.step(2)


def test_step_reports_signals_times_and_clips_gamma(tiny_pair):
    target, draft = tiny_pair
    eng = SpeculativeEngine(target, draft, eos_token_id=[])
    eng.start([4, 5, 6], max_new_tokens=3)
    r = eng.step(8)
    assert r.gamma == 2  # clipped: at most 3 tokens may be emitted
    assert len(r.draft_signals) == 2
    for s in r.draft_signals:
        assert 0 < s.top1 <= 1 and 0 <= s.margin <= s.top1 and 0 <= s.entropy <= math.log(64) + 1e-4
    assert r.draft_s > 0 and r.verify_s > 0 and r.draft_forwards == 2
    with pytest.raises(ValueError, match="gamma"):
        eng.step(-1)


def test_full_information_record_matches_the_steps(tiny_pair):
    """pos_accept: a run of accepted drafts from t has exactly the accepted length the engine saw."""
    target, draft = tiny_pair
    eng = SpeculativeEngine(target, draft, eos_token_id=3)
    rng = random.Random(5)
    res = eng.generate([9, 10, 11], 48, schedule("random", rng))
    eng.finalize_record()
    acc = eng.pos_accept
    assert len(acc) == len(res.tokens) and None not in acc
    t = 0
    for s in res.steps:
        run = 0
        while t + run < len(acc) and acc[t + run] and run < s.gamma:
            run += 1
        assert min(run, s.gamma) == s.accepted or s.finish_reason == "eos"
        t += len(s.tokens)


@pytest.mark.parametrize("top_p", [1.0, 0.8])
def test_sampling_is_independent_of_gamma(tiny_pair, top_p):
    target, draft = tiny_pair
    eng = SpeculativeEngine(target, draft, eos_token_id=3, temperature=0.9, top_p=top_p)
    rng = random.Random(1)
    outs = {tuple(eng.generate([5, 6, 7], 40, schedule(k, rng), seed=77).tokens) for k in SCHEDULES}
    assert len(outs) == 1
    # a different seed gives a different sample (the tiny pair's 40-token samples at T=0.9
    # differ for these seeds: checked, not assumed, so an engine ignoring the seed fails here)
    others = {tuple(eng.generate([5, 6, 7], 40, 3, seed=s).tokens) for s in (78, 79, 80)}
    assert others.isdisjoint(outs) and len(others) == 3


def _exact_two_token_dist(target, prompt, temperature, top_p, vocab):
    """Target's exact distribution of the first two tokens (temperature + top-p)."""
    eng = SpeculativeEngine(target, target, temperature=temperature, top_p=top_p, eos_token_id=[])
    with torch.no_grad():
        l1 = target(torch.tensor([prompt])).logits[0, -1]
        p1 = eng._probs(l1)
        seqs = torch.tensor([prompt + [a] for a in range(vocab)])
        l2 = target(seqs).logits[:, -1]
        p2 = torch.stack([eng._probs(l2[a]) for a in range(vocab)])
    return (p1[:, None] * p2).numpy()


def _chi2_critical(k: int, z: float = 3.29) -> float:
    """Wilson-Hilferty approximation of the chi-square quantile (z = 3.29: p = 0.0005)."""
    return k * (1 - 2 / (9 * k) + z * math.sqrt(2 / (9 * k))) ** 3


@pytest.mark.parametrize("top_p", [1.0, 0.7])
def test_sampling_distribution_equals_target(top_p):
    vocab = 6
    target, draft = make_tiny_pair(vocab=vocab, noise=0.5, seed=3, hidden=32)
    prompt = [1, 4, 2]
    exact = _exact_two_token_dist(target, prompt, 1.0, top_p, vocab)
    eng = SpeculativeEngine(target, draft, temperature=1.0, top_p=top_p, eos_token_id=[])
    n = 3000
    counts = np.zeros((vocab, vocab))
    rng = random.Random(0)
    for seed in range(n):
        toks = eng.generate(prompt, 2, gamma=rng.choice([0, 1, 2]), seed=seed).tokens
        counts[toks[0], toks[1]] += 1
    expected = exact * n
    mask = expected > 5
    chi2 = float((((counts - expected) ** 2)[mask] / expected[mask]).sum())
    assert counts[~mask].sum() <= max(30, 3 * expected[~mask].sum())
    k = int(mask.sum()) - 1
    assert chi2 < _chi2_critical(k), f"chi2={chi2:.1f} with {k} dof"
    # the test has power: the draft's own distribution is rejected
    q = _exact_two_token_dist(draft, prompt, 1.0, top_p, vocab) * n
    qm = q > 5
    chi2_q = float((((counts - q) ** 2)[qm] / q[qm]).sum())
    assert chi2_q > _chi2_critical(int(qm.sum()) - 1)


@pytest.mark.parametrize("compression", ["bf16", "fp16", "int8", "nf4"])
def test_greedy_lossless_against_the_same_compressed_target(tmp_path, tiny_pair, compression):
    """A compressed target (bitsandbytes INT8/NF4 or a half dtype) verified by the engine emits
    exactly that compressed target's own greedy output."""
    from speckv_env.models import load_model

    target, draft = tiny_pair
    target.save_pretrained(tmp_path / "t")
    ct = load_model(str(tmp_path / "t"), compression=compression, device="cpu")
    rng = random.Random(11)
    eng = SpeculativeEngine(ct, draft, eos_token_id=3)
    for _trial in range(2):
        prompt = [rng.randrange(4, 64) for _ in range(rng.randint(2, 8))]
        ref = hf_greedy(ct, prompt, 24)
        for kind in (0, 1, 3, 8, "random"):
            assert eng.generate(prompt, 24, schedule(kind, rng)).tokens == ref, (compression, kind)
