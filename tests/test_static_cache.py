"""The static KV cache path (``cache="static"``, #15) and one host transfer per verification.

A static cache pre-allocates its buffers and rolls back by moving a position; it must give the
dynamic path's tokens and per-position trace records exactly, greedy and sampling, step and
token mode, with stock and row-invariant ("exact") attention, and attention must never see the
buffers' unused tail. The acceptance rules decide every drafted position at once with one
device-to-host transfer, with the same emitted tokens as the per-position loop they replaced
(a copy of which is the reference below)."""

from __future__ import annotations

import copy
import random
from contextlib import contextmanager

import numpy as np
import pytest
import torch
from conftest import requires_default
from tiny_models import make_tiny_pair, make_tiny_smol_pair

from speckv_env import invariant
from speckv_env.engine import SpeculativeEngine, _Clock, _Drafted, _sample_from
from speckv_env.static_cache import PrefixStaticCache, PrefixStaticLayer

MODES = [(0.0, 1.0), (0.8, 1.0), (0.8, 0.9)]  # (temperature, top_p)


def _schedules(seed: int):
    rng = random.Random(seed)
    return [0, 1, 3, 8, [1, 4, 0, 2, 7, 0, 5], lambda i, s: rng.randint(0, 8)]


def _run(eng: SpeculativeEngine, prompt, n, gamma, seed=3):
    eng.record_signals = True
    res = eng.generate(prompt, n, gamma=gamma, seed=seed)
    eng.finalize_record()
    steps = [(s.gamma, s.accepted, s.tokens, s.events, s.draft_forwards, s.done) for s in res.steps]
    return res.tokens, res.finish_reason, steps, eng.pos_accept, eng.pos_signals, eng.pos_target, eng.pos_argmax


def _pair_engines(target, draft, temperature, top_p, **kw):
    """A dynamic-cache engine with the CPU's acceptance (row by row up to the first rejection)
    and a static-cache one with CUDA's (every drafted position at once, one transfer): equal
    outputs show both changes at once."""
    dyn, sta = (
        SpeculativeEngine(target, draft, temperature=temperature, top_p=top_p, max_gamma=8, cache=c, **kw)
        for c in ("dynamic", "static")
    )
    assert not dyn.batch_accept
    sta.batch_accept = True
    return dyn, sta


@pytest.mark.parametrize("temperature,top_p", MODES)
def test_static_equals_dynamic_tiny(tiny_pair, temperature, top_p):
    """Tokens, steps and the per-position records (pos_accept, pos_signals, pos_target) of the
    static path equal the dynamic path's, for several gamma schedules, with EOS possible."""
    target, draft = tiny_pair
    dyn, sta = _pair_engines(target, draft, temperature, top_p, eos_token_id=3)
    for prompt in ([5, 6, 7, 8], [9]):
        for i, (g_dyn, g_sta) in enumerate(zip(_schedules(1), _schedules(1))):
            a, b = _run(dyn, prompt, 40, g_dyn), _run(sta, prompt, 40, g_sta)
            assert a == b, (prompt, i)
    assert sta._t_cache.get_seq_length() > 0 and isinstance(sta._t_cache, PrefixStaticCache)


@pytest.mark.parametrize("temperature,top_p", MODES)
def test_static_equals_dynamic_smol_vocab(temperature, top_p):
    """The same over the real tokenizer's 49152-token vocabulary (float64 residual sums matter)."""
    pair = make_tiny_smol_pair()
    dyn, sta = _pair_engines(pair.target, pair.draft, temperature, top_p, eos_token_id=pair.eos_token_id)
    prompt = pair.tokenizer.encode("The quick brown fox")
    for g_dyn, g_sta in zip(_schedules(2), _schedules(2)):
        assert _run(dyn, prompt, 24, g_dyn) == _run(sta, prompt, 24, g_sta)


def _token_mode(eng: SpeculativeEngine, prompt, n, seed):
    """Draft token by token with random continue/stop and lookahead choices (a token drafted
    without lookahead is sometimes followed by another: draft-then-decide's deferred forward); verify."""
    rng = random.Random(seed)
    eng.record_signals = True
    eng.start(prompt, n, seed=seed)
    out = []
    while not eng.done:
        probs = []
        while eng.drafted() < eng.draft_limit() and rng.random() < 0.7:
            look = rng.random() < 0.6
            probs.append(eng.draft_token(lookahead=look))
            if look:
                eng.observe()
            else:
                eng.drafted_signals()
                if rng.random() < 0.3:
                    break
        r = eng.verify()
        out.append((probs, r.gamma, r.accepted, r.tokens, r.events, r.draft_forwards, r.lookahead))
    eng.finalize_record()
    return eng.out, out, eng.pos_accept, eng.pos_signals, eng.pos_target


@pytest.mark.parametrize("temperature,top_p", MODES)
def test_static_equals_dynamic_token_mode(tiny_pair, temperature, top_p):
    target, draft = tiny_pair
    dyn, sta = _pair_engines(target, draft, temperature, top_p, eos_token_id=3)
    for seed in range(3):
        assert _token_mode(dyn, [5, 6, 7], 30, seed) == _token_mode(sta, [5, 6, 7], 30, seed)


@pytest.fixture(scope="module")
def exact_smol_pair():
    pair = make_tiny_smol_pair()
    for m in (pair.target, pair.draft):
        invariant.make_row_invariant(m)
    return pair


@pytest.mark.parametrize("temperature,top_p", [(0.0, 1.0), (0.7, 0.9)])
def test_static_with_row_invariant_attention(exact_smol_pair, temperature, top_p):
    """The exact kernels run on the static cache (they see the valid prefix only): the same
    tokens as the dynamic path, and the static path is gamma-invariant as the dynamic one is."""
    pair = exact_smol_pair
    dyn, sta = _pair_engines(pair.target, pair.draft, temperature, top_p, eos_token_id=pair.eos_token_id)
    assert sta.exact
    prompt = pair.tokenizer.encode("Once upon a time")
    runs = [_run(sta, prompt, 24, g) for g in _schedules(5)]
    assert all(r[0] == runs[0][0] for r in runs)  # gamma-invariant
    for g_dyn, got in zip(_schedules(5), runs):
        assert _run(dyn, prompt, 24, g_dyn) == got


@torch.inference_mode()  # the engine allocates its buffers in inference mode
def _poison_tail(cache: PrefixStaticCache) -> None:
    for layer in cache.layers:
        assert isinstance(layer, PrefixStaticLayer) and layer.keys is not None and layer.values is not None
        layer.keys[:, :, layer.length :] = float("nan")
        layer.values[:, :, layer.length :] = float("nan")


@pytest.mark.parametrize("exact", [False, True])
def test_attention_never_sees_the_unused_tail(monkeypatch, exact):
    """Everything past the valid position (never written, or rolled back) is NaN: a model that
    read any of it would emit NaN logits; the tokens stay the dynamic path's."""
    target, draft = make_tiny_pair(seed=7)
    if exact:
        for m in (target, draft):
            invariant.make_row_invariant(m)
    dyn, sta = _pair_engines(target, draft, 0.8, 1.0, eos_token_id=[])
    ref = _run(dyn, [4, 5, 6], 32, [3, 5, 1])
    _run(sta, [4, 5, 6], 32, 2)  # allocates the buffers
    for c in sta._static.values():
        c.restart(0)
        _poison_tail(c)
    crop = PrefixStaticLayer.crop

    def crop_and_poison(self, n):  # called by the engine, in inference mode
        crop(self, n)
        self.keys[:, :, self.length :] = float("nan")
        self.values[:, :, self.length :] = float("nan")

    monkeypatch.setattr(PrefixStaticLayer, "crop", crop_and_poison)
    assert _run(sta, [4, 5, 6], 32, [3, 5, 1]) == ref


def test_buffers_are_reused_and_rollback_moves_the_position_only(tiny_pair):
    target, draft = tiny_pair
    eng = SpeculativeEngine(target, draft, eos_token_id=[], max_gamma=8, cache="static")
    eng.start([5, 6, 7], 20)
    layer = eng._t_cache.layers[0]
    ptr, cap = layer.keys.data_ptr(), layer.capacity
    assert cap == 3 + 20 + 8 + 1
    while not eng.done:
        before = eng._t_cache.get_seq_length()
        r = eng.step(6)
        assert eng._t_cache.get_seq_length() == before + r.accepted + 1
        assert layer.keys.data_ptr() == ptr
    t_cache = eng._t_cache
    eng.generate([9, 10], 10, gamma=2)  # fits: the same cache and buffers
    assert eng._t_cache is t_cache and layer.keys.data_ptr() == ptr
    eng.generate(list(range(4, 40)), 30, gamma=2)  # does not fit: new buffers
    assert eng._t_cache is not t_cache and eng._t_cache.capacity == 36 + 30 + 8 + 1


def test_static_cache_refuses_sliding_window_models_and_bad_values(tiny_pair):
    from tiny_models import make_tiny_mistral

    mistral = make_tiny_mistral(window=8)
    with pytest.raises(ValueError, match="full-attention"):
        SpeculativeEngine(mistral, copy.deepcopy(mistral), cache="static")
    with pytest.raises(ValueError, match="cache must be"):
        SpeculativeEngine(*tiny_pair, cache="paged")
    layer = PrefixStaticLayer(4)
    k = torch.zeros(1, 2, 3, 8)
    layer.update(k, k)
    with pytest.raises(RuntimeError, match="overflow"):
        layer.update(k, k)


def test_live_env_accepts_the_static_cache():
    import gymnasium as gym

    import speckv_env  # noqa: F401  (registers the envs)
    from speckv_env.core import CostModel

    pair = make_tiny_smol_pair()
    runs = []
    for cache in ("dynamic", "static"):
        env = gym.make(
            "SpecKV-v0", pair=pair, cost_model=CostModel.unit(), split="test", max_new_tokens=16, cache=cache
        )
        assert env.unwrapped.engine.cache == cache
        env.reset(seed=0, options={"episode": 0})
        rng, done, rewards = random.Random(0), False, []
        while not done:
            _, r, term, trunc, _ = env.step(rng.randrange(9))
            rewards.append(r)
            done = term or trunc
        runs.append((list(env.unwrapped.emitted_tokens), rewards))
        env.close()
    assert runs[0] == runs[1]


# ---- one device-to-host transfer per verification ----------------------------------------------


@contextmanager
def count_host_reads():
    """Counts tensor-to-Python reads (tolist, item, int, float, bool, index) while active."""
    n = [0]
    with pytest.MonkeyPatch.context() as mp:
        for name in ("tolist", "item", "__int__", "__float__", "__bool__", "__index__"):
            orig = getattr(torch.Tensor, name)

            def wrapped(self, *a, _orig=orig, **kw):
                n[0] += 1
                return _orig(self, *a, **kw)

            mp.setattr(torch.Tensor, name, wrapped)
        yield n


def _ref_probs(logits, temperature, top_p):
    """The engine's per-row distribution before this change (1-D)."""
    p = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sp, idx = torch.sort(p, descending=True)
        cum = torch.cumsum(sp, dim=-1)
        keep = (cum - sp) < top_p
        sp = torch.where(keep, sp, torch.zeros_like(sp))
        p = torch.zeros_like(p).scatter_(-1, idx, sp)
        p = p / p.sum()
    return p


def _ref_sample_from(probs, u, fallback=None):
    """The engine's inverse-CDF sample before this change (a read per step of its loops)."""
    c = torch.cumsum(probs.double(), dim=-1)
    total = float(c[-1])
    if total <= 0.0:
        return _ref_sample_from(fallback, u)
    i = int(torch.searchsorted(c, torch.tensor([u * total], dtype=c.dtype), right=True)[0])
    i = min(i, probs.shape[-1] - 1)
    while float(probs[i]) <= 0.0 and i > 0:
        i -= 1
    return i


def _ref_reject(logits, q_rows, tokens, u, t, temperature, top_p):
    """The per-position acceptance loop before this change: (accepted, residual token or None)."""
    for i, (q, d) in enumerate(zip(q_rows, tokens)):
        p = _ref_probs(logits[i], temperature, top_p)
        if float(u[t + i, 1]) * float(q[d]) < float(p[d]):
            continue
        return i, _ref_sample_from(torch.clamp(p - q, min=0.0), float(u[t + i, 2]), fallback=p)
    return len(tokens), None


@pytest.mark.parametrize("top_p", [1.0, 0.9])
def test_probs_and_samples_equal_the_per_row_reference(top_p):
    # (with 2 threads, a 2-D sum over rows adds in another order than 1-D sums: the engine sums
    # row by row)
    eng = SpeculativeEngine(*make_tiny_pair(), temperature=0.7, top_p=top_p)
    g = torch.Generator().manual_seed(0)
    for n in (1, 2, 5, 9):
        logits = torch.randn(n, 49152, generator=g) * 4
        logits[:, :7] = logits[:, 7:8]  # ties
        rows = eng._probs_rows(logits)
        for i in range(n):
            ref = _ref_probs(logits[i], 0.7, top_p)
            assert torch.equal(rows[i], ref) and torch.equal(eng._probs(logits[i]), ref)
            for u in (0.0, 0.3, 0.999999999, float(np.nextafter(1.0, 0.0))):
                assert _sample_from(ref, u) == _ref_sample_from(ref, u)
    spiky = torch.zeros(100)
    spiky[[3, 50]] = torch.tensor([0.25, 0.75])
    for u in np.linspace(0, 1, 41, endpoint=False):
        assert _sample_from(spiky, float(u)) == _ref_sample_from(spiky, float(u))
    assert _sample_from(torch.zeros(10), 0.5, fallback=spiky) == _ref_sample_from(torch.zeros(10), 0.5, spiky)


@pytest.mark.parametrize("top_p", [1.0, 0.9])
def test_sampling_acceptance_equals_the_loop_with_one_transfer(top_p):
    """Random drafts over a 49152-token vocabulary, rejections at every position: the accepted
    count and the residual token equal the old loop's, and the decision reads the device once."""
    eng = SpeculativeEngine(*make_tiny_pair(), temperature=0.9, top_p=top_p)
    rng, gen = np.random.default_rng(0), torch.Generator().manual_seed(1)
    eng._u = rng.random((64, 3))
    seen = set()
    for _ in range(60):
        g, t = int(rng.integers(1, 9)), int(rng.integers(0, 40))
        tl = torch.randn(g + 1, 49152, generator=gen) * 3
        ql = tl[:g] + torch.randn(g, 49152, generator=gen) * float(rng.uniform(0.1, 3))
        q_rows = [eng._probs(r) for r in ql]
        tokens = [_ref_sample_from(q, float(eng._u[t + i, 0])) for i, q in enumerate(q_rows)]
        dr = _Drafted(t=t, d_len0=0, obs_spans=[], tokens=tokens, q_rows=q_rows, sigs=list(ql))
        ref_k, ref_tok = _ref_reject(tl, q_rows, tokens, eng._u, t, 0.9, top_p)
        with count_host_reads() as reads:
            k = eng._first_rejection(eng._probs_rows(tl[:g]), dr, t)
        assert k == ref_k and reads[0] == 1
        if k < g:
            for batch in (True, False):
                eng.batch_accept = batch
                v = eng._accept_sampling(tl, dr, t)
                assert (v.accepted, v.emitted[-1]) == (ref_k, ref_tok)
        seen.add(k)
    assert len(seen) >= 4, seen  # rejections at several positions, and full acceptance


def test_greedy_verification_reads_the_device_once(tiny_pair):
    target, draft = tiny_pair
    eng = SpeculativeEngine(target, draft, eos_token_id=[], max_gamma=8)
    eng.start([5, 6, 7], 30)
    for gamma in (0, 3, 5):
        dr = eng._begin_draft()
        for _ in range(gamma):
            eng._draft_one(dr, lookahead=True)  # looked ahead: the bonus proposal rides along
        logits = torch.randn(gamma + 1, 64)
        with count_host_reads() as reads:
            eng._accept_greedy(logits, dr)
        assert reads[0] == 1
        eng._verify(dr)


def test_draft_signals_read_the_device_once_with_the_same_values():
    """The observation's signals (top-1, entropy, margin) in one transfer, equal to the three
    reads they replaced."""
    from speckv_env.engine import _signals_from_logits

    def three_reads(logits):
        lf = logits.float()
        top = torch.topk(lf, 2).values
        z = lf - top[0]
        e = torch.exp(z)
        S = e.sum()
        ent = torch.log(S) - torch.dot(e, z) / S
        t1, t2 = float(1.0 / S), float(torch.exp(top[1] - top[0]) / S)
        return t1, max(float(ent), 0.0), t1 - t2

    g = torch.Generator().manual_seed(0)
    for i in range(60):
        x = torch.randn(49152 if i % 2 else 64, generator=g) * (0.1 + i / 6)
        with count_host_reads() as reads:
            s = _signals_from_logits(x)
        assert reads[0] == 1 and (s.top1, s.entropy, s.margin) == three_reads(x)


# ---- timing ---------------------------------------------------------------------------------------


def test_clock_on_cpu_never_touches_cuda(tiny_pair, monkeypatch):
    def boom(*a, **k):
        raise AssertionError("CUDA called on CPU")

    monkeypatch.setattr(torch.cuda, "synchronize", boom)
    monkeypatch.setattr(torch.cuda, "Event", boom)
    clock = _Clock(False)
    a = clock.mark()
    b = clock.mark()
    assert isinstance(a, float) and clock.seconds([(a, b), (a, b)]) == 2 * (b - a) and clock.elapsed(a) >= 0
    eng = SpeculativeEngine(*tiny_pair, eos_token_id=[])
    assert eng._clock.cuda is False
    res = eng.generate([5, 6], 12, gamma=3)
    assert all(s.draft_s > 0 and s.verify_s > 0 for s in res.steps) and eng.prefill_s > 0


def test_cuda_clock_branch_synchronises_once_per_step(tiny_pair, monkeypatch):
    """The CUDA branch with stand-in events (this host has no GPU): a step marks its phases with
    events and synchronises once, at the end of the verification."""
    import time

    syncs = [0]

    class FakeEvent:
        def __init__(self, enable_timing=False):
            assert enable_timing

        def record(self):
            self.t = time.perf_counter()

        def elapsed_time(self, other):  # milliseconds, like CUDA events
            return (other.t - self.t) * 1000.0

    monkeypatch.setattr(torch.cuda, "Event", FakeEvent)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: syncs.__setitem__(0, syncs[0] + 1))
    eng = SpeculativeEngine(*tiny_pair, eos_token_id=[], max_gamma=8)
    eng._clock = _Clock(True)
    eng.start([5, 6, 7], 20)
    for gamma in (0, 2, 5):
        eng.observe()
        before = syncs[0]
        r = eng.step(gamma)
        assert syncs[0] == before + 1
        assert r.draft_s > 0 and r.verify_s > 0


# ---- the real default pair -------------------------------------------------------------------------


@pytest.mark.slow
@requires_default
def test_real_pair_static_equals_dynamic():
    """fp32 on CPU, exact kernels (the default): a short prompt x 32 tokens, greedy and T = 0.7,
    gamma 0, 4 and a random schedule, step mode and token mode."""
    from speckv_env.pair import load_pair

    pair = load_pair(compression="fp32", device="cpu")
    prompt = pair.encode_chat("Name three primary colours.")
    for temperature in (0.0, 0.7):
        dyn, sta = _pair_engines(pair.target, pair.draft, temperature, 1.0, eos_token_id=pair.eos_token_id)
        assert sta.exact
        for g_dyn, g_sta in zip([0, 4, [2, 6, 1, 3]], [0, 4, [2, 6, 1, 3]]):
            assert _run(dyn, prompt, 32, g_dyn) == _run(sta, prompt, 32, g_sta)
        assert _token_mode(dyn, prompt, 32, 1) == _token_mode(sta, prompt, 32, 1)


def test_bench_engine_takes_the_cache(exact_smol_pair, monkeypatch):
    """``speckv bench engine --cache static``: the engines decode with static caches, the outputs
    agree with every other method's (exact kernels), and the result records the cache."""
    from speckv_env.app import bench_engine as be
    from speckv_env.app.cli import build_parser

    a = build_parser().parse_args(["bench", "engine", "--cache", "static"])
    assert a.cache == "static"
    assert build_parser().parse_args(["bench", "engine"]).cache == "dynamic"
    made = []
    init = PrefixStaticCache.__init__
    monkeypatch.setattr(PrefixStaticCache, "__init__", lambda self, *a: made.append(1) or init(self, *a))
    r = be.run_engine_bench(
        exact_smol_pair,
        prompts=be.bench_prompts(split="test")[:1],
        val_prompts=be.bench_prompts(split="validation")[:1],
        max_new_tokens=6,
        gammas_engine=(0, 2),
        gammas_hf=(1,),
        prompt_lookup=(),
        repeats=1,
        progress=False,
        stock=False,
        cache="static",
    )
    assert made and r["cache"] == "static" and r["outputs_identical"], r["output_mismatches"]
