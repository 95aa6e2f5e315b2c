"""Token mode (``control="token"``): one decision per drafted token, exact from speckv-trace/2.

The central check: live token-mode episodes under random continue/stop choices replay from a
recorded ``/2`` trace identically, decision by decision (tokens, drafted and accepted counts,
modelled times, rewards, observations), greedy and under sampling."""

from __future__ import annotations

import random

import gymnasium as gym
import numpy as np
import pytest
import torch
from conftest import requires_default
from tiny_models import make_tiny_pair

import speckv_env  # noqa: F401  (registers the envs)
from replay.env import SpecKVReplayEnv
from replay.oracle import oracle
from replay.schema import TraceFormatError
from replay.trace import read_traces, synthetic_dataset, synthetic_trace, write_traces
from speckv_env.core import TOKEN_OBS_DIM, CostModel


@pytest.fixture(scope="module")
def exact_pair():
    """A tiny random pair over the real tokenizer, with row-invariant forwards (exact)."""
    from speckv_env import invariant
    from speckv_env.models import load_tokenizer
    from speckv_env.pair import ModelPair

    tok = load_tokenizer(None)
    target, draft = make_tiny_pair(vocab=49152, hidden=32, noise=0.03, seed=4)
    for m in (target, draft):
        m.config.eos_token_id = tok.eos_token_id
        m.generation_config.eos_token_id = tok.eos_token_id
        invariant.make_row_invariant(m)
    return ModelPair(target, draft, tok, "tiny-target", "tiny-draft", "fp32", torch.device("cpu"), exact=True)


def _live(pair, temperature, max_new_tokens=24, lookahead=True, control="token"):
    kw = {"control": control} if control == "step" else {"control": control, "lookahead": lookahead}
    return gym.make(
        "SpecKV-v0",
        pair=pair,
        cost_model=CostModel.unit(),
        split="test",
        task="math",
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        **kw,
    )


def _record(pair, prompt, temperature, seed, max_new_tokens=24):
    from speckv_env.app.profile import record_episode
    from speckv_env.engine import SpeculativeEngine

    eng = SpeculativeEngine(pair.target, pair.draft, temperature=temperature, eos_token_id=pair.eos_token_id)
    mode = "sample" if temperature else "greedy"
    return record_episode(eng, pair, prompt, max_new_tokens=max_new_tokens, gamma_max=8, mode=mode, seed=seed)


def _play_both(live, rep, seed, p_draft):
    """Play both envs with the same random decisions; compare everything, decision by decision."""
    rng = random.Random(seed)
    done, decisions, steps = False, 0, 0
    while not done:
        a = int(rng.random() < p_draft)
        o_l, r_l, te_l, tu_l, i_l = live.step(a)
        o_r, r_r, te_r, tu_r, i_r = rep.step(a)
        assert i_l["decision"] == i_r["decision"] and i_l.get("drafted") == i_r.get("drafted")
        assert list(i_l["tokens"]) == list(i_r["tokens"])
        assert i_l.get("accepted") == i_r.get("accepted") and i_l.get("gamma") == i_r.get("gamma")
        assert i_l["modelled_time"] == pytest.approx(i_r["modelled_time"], rel=1e-12)
        assert r_l == pytest.approx(r_r, rel=1e-12) and (te_l, tu_l) == (te_r, tu_r)
        np.testing.assert_array_equal(o_l, o_r)
        if "lookahead" in i_l:  # a verification: the engine's own account of its draft forwards
            steps += 1
            assert i_l["lookahead"] == i_r["lookahead"]
            if not live.unwrapped.lookahead:  # draft-then-decide never looks past a drafted token
                assert i_l["lookahead"] is False
                assert i_l["step_time"] == live.unwrapped.cost_model.step_time(
                    i_l["gamma"], i_l["accepted"], bool(live.unwrapped.backend.sampling)
                )
            want = CostModel.draft_forwards(
                i_l["gamma"], i_l["accepted"], bool(live.unwrapped.backend.sampling), i_l["lookahead"]
            )
            assert i_l["draft_forwards"] == want
        decisions += 1
        done = te_l or tu_l
    return decisions, steps


@pytest.mark.parametrize("lookahead", [True, False], ids=["lookahead", "dtd"])
@pytest.mark.parametrize("temperature", [0.0, 0.7])
def test_live_token_mode_replays_exactly_from_a_v2_trace(exact_pair, temperature, lookahead):
    """Both variants: look-ahead and draft-then-decide (``lookahead=False``)."""
    live = _live(exact_pair, temperature, lookahead=lookahead)
    prompts = live.unwrapped.backend.prompts
    total_steps = 0
    for ep in range(3):
        seed = 500 + ep
        tr = _record(exact_pair, prompts[ep], temperature, seed)
        assert tr.has_rollouts and tr.meta["exact"] is True and tr.meta["rollout_forwards"] > 0
        rep = SpecKVReplayEnv(traces=[tr], cost_model=CostModel.unit(), control="token", lookahead=lookahead)
        o_l, i_l = live.reset(options={"episode": ep, "episode_seed": seed})
        o_r, _ = rep.reset(options={"episode": 0})
        np.testing.assert_array_equal(o_l, o_r)
        assert o_l.shape == (TOKEN_OBS_DIM,)
        for p_draft in (0.8,):
            decisions, steps = _play_both(live, rep, seed, p_draft)
            total_steps += steps
            assert decisions > steps  # some decisions drafted
        assert live.unwrapped.emitted_tokens == tr.tokens.tolist()
    assert total_steps > 10


def test_rollouts_with_shared_work_equal_naive_rollouts(exact_pair):
    """The rollout recorder's shortcut (shift the previous rollout when it proposed the emitted
    token) gives exactly the rollouts computed from scratch at every position."""
    from speckv_env.engine import SpeculativeEngine, _signals_from_logits, _token_prob
    from speckv_env.rollout import draft_rollouts

    pair = exact_pair
    for temperature in (0.0, 0.7):
        eng = SpeculativeEngine(pair.target, pair.draft, temperature=temperature, eos_token_id=pair.eos_token_id)
        ids = pair.encode_chat("What is 12 times 7?")
        res = eng.generate(ids, 20, gamma=3, seed=9)
        G = 4
        ro = draft_rollouts(eng, ids, res.tokens, G)
        u = np.random.default_rng(9).random((20 + G + 1, 3))
        eng._u = u
        for t in range(len(res.tokens)):
            seq = list(ids) + res.tokens[:t]
            for i in range(G):
                with torch.inference_mode():
                    logits = pair.draft(input_ids=torch.tensor([seq])).logits[0, -1]
                d, _ = eng._pick(logits, t + i)
                s = _signals_from_logits(logits)
                assert ro.tokens[t, i] == d, (temperature, t, i)
                assert ro.top1[t, i] == pytest.approx(s.top1, abs=1e-6)
                assert ro.p[t, i] == pytest.approx(_token_prob(logits, d), abs=1e-6)
                seq.append(d)
        # sharing saved forwards: fewer than one full rollout per position
        assert ro.forwards < len(res.tokens) * G


@pytest.mark.parametrize("lookahead", [True, False], ids=["lookahead", "dtd"])
def test_token_return_is_n_minus_time_and_oracle_is_the_ceiling(lookahead):
    cm = CostModel.unit()
    trs = synthetic_dataset(12, rollouts=True, modes=("greedy", "sample"), seed=3)
    env = SpecKVReplayEnv(traces=trs, cost_model=cm, control="token", lookahead=lookahead)
    rng = np.random.default_rng(0)
    for ep, tr in enumerate(trs):
        best = oracle(tr, cm).total_time
        for p_draft in (0.0, 0.5, 0.9, 1.0):
            env.reset(options={"episode": ep})
            ret, done = 0.0, False
            while not done:
                _, r, te, tu, info = env.step(int(rng.random() < p_draft))
                ret += r
                done = te or tu
            s = info["episode_summary"]
            assert s["tokens"] == tr.n
            assert ret == pytest.approx(tr.n - s["modelled_s"] / cm.t_target, abs=1e-9)
            assert s["modelled_s"] >= best - 1e-9


def test_always_draft_is_fixed_gamma_max_and_never_draft_is_gamma_zero():
    """Drafting to the cap every step is the step mode's gamma_max (same time: a forced stop pays
    no lookahead); never drafting is gamma 0."""
    cm = CostModel.unit()
    trs = synthetic_dataset(6, rollouts=True, modes=("greedy", "sample"), seed=5)
    for a, g in ((1, 8), (0, 0)):
        tok = SpecKVReplayEnv(traces=trs, cost_model=cm, control="token")
        step = SpecKVReplayEnv(traces=trs, cost_model=cm)
        for ep in range(len(trs)):
            for env, act in ((tok, a), (step, g)):
                env.reset(options={"episode": ep})
                done = False
                while not done:
                    _, _, te, tu, info = env.step(act)
                    done = te or tu
                if env is tok:
                    t_tok = info["episode_summary"]["modelled_s"]
                else:
                    assert info["episode_summary"]["modelled_s"] == pytest.approx(t_tok, rel=1e-12)


def _run_fixed(env, ep, actions_of, options=None):
    """Play episode ``ep``; ``actions_of(info)`` gives the next action. Per-step (tokens, time,
    return so far) at every verification, and the episode's summary."""
    env.reset(options={"episode": ep, **(options or {})})
    out, ret, done, info = [], 0.0, False, {"drafted": 0}
    while not done:
        _, r, te, tu, info = env.step(actions_of(info))
        ret += r
        done = te or tu
        if "gamma" in info:
            out.append((list(info["tokens"]), info["gamma"], info["accepted"], ret))
    return out, info["episode_summary"]


def _draft_exactly(g):
    """Token-mode policy: draft g tokens, then stop (0 drafted after a verification)."""
    return lambda info: int((0 if "gamma" in info else info["drafted"]) < g)


def _step_vs_dtd(step_env, dtd_env, ep, g, options=None):
    """Draft-then-decide drafting exactly g tokens then stopping equals step mode at gamma g:
    same tokens, gammas and accepted counts step by step, the same return after every step and
    the same total modelled time."""
    gi = list(step_env.unwrapped.gammas).index(g)
    steps_s, sum_s = _run_fixed(step_env, ep, lambda info: gi, options)
    steps_t, sum_t = _run_fixed(dtd_env, ep, _draft_exactly(g), options)
    assert [x[:3] for x in steps_t] == [x[:3] for x in steps_s]
    np.testing.assert_allclose([x[3] for x in steps_t], [x[3] for x in steps_s], rtol=0, atol=1e-9)
    assert sum_t["modelled_s"] == pytest.approx(sum_s["modelled_s"], rel=1e-12)
    assert sum_t["tokens"] == sum_s["tokens"]
    return len(steps_s)


def test_dtd_draft_g_then_stop_is_step_mode_at_gamma_g_in_replay():
    cm = CostModel.unit(draft_ratio=0.2)
    trs = synthetic_dataset(6, rollouts=True, modes=("greedy", "sample"), seed=7)
    step = SpecKVReplayEnv(traces=trs, cost_model=cm)
    dtd = SpecKVReplayEnv(traces=trs, cost_model=cm, control="token", lookahead=False)
    look = SpecKVReplayEnv(traces=trs, cost_model=cm, control="token")
    for g in (0, 1, 3, 8):
        for ep in range(len(trs)):
            assert _step_vs_dtd(step, dtd, ep, g) > 0
    # look-ahead pays one more forward per chosen stop: strictly slower at 1 <= g < gamma_max
    _, s_look = _run_fixed(look, 0, _draft_exactly(3))
    _, s_dtd = _run_fixed(dtd, 0, _draft_exactly(3))
    assert s_look["modelled_s"] > s_dtd["modelled_s"]


@pytest.mark.parametrize("temperature", [0.0, 0.7])
def test_dtd_draft_g_then_stop_is_step_mode_at_gamma_g_live(exact_pair, temperature):
    step = _live(exact_pair, temperature, max_new_tokens=16, control="step")
    dtd = _live(exact_pair, temperature, max_new_tokens=16, lookahead=False)
    for g in (1, 3):
        assert _step_vs_dtd(step, dtd, 0, g, {"episode_seed": 11}) > 1


def test_token_mode_errors():
    cm = CostModel.unit()
    with pytest.raises(ValueError, match="speckv-trace/2"):
        SpecKVReplayEnv(traces=synthetic_dataset(2), cost_model=cm, control="token")
    with pytest.raises(ValueError, match="control must be one of"):
        SpecKVReplayEnv(traces=synthetic_dataset(2), cost_model=cm, control="tokens")
    env = SpecKVReplayEnv(traces=synthetic_dataset(2, rollouts=True), cost_model=cm, control="token")
    env.reset(options={"episode": 0})
    for bad in (2, -1, 0.5, np.array([0, 1])):
        with pytest.raises(ValueError, match="invalid action"):
            env.step(bad)
    assert env.action_space.n == 2 and env.observation_space.shape == (TOKEN_OBS_DIM,)
    with pytest.raises(ValueError, match="applies to control='token' only"):
        SpecKVReplayEnv(traces=synthetic_dataset(2, rollouts=True), cost_model=cm, lookahead=False)
    with pytest.raises(ValueError, match="lookahead must be True or False"):
        SpecKVReplayEnv(traces=synthetic_dataset(2, rollouts=True), cost_model=cm, control="token", lookahead="no")


def test_v2_traces_round_trip_and_v1_still_reads(tmp_path):
    a = synthetic_trace(40, seed=1, rollouts=True, mode="sample", trace_id="a")
    b = synthetic_trace(30, seed=2, trace_id="b")
    write_traces(tmp_path / "a.parquet", [a])
    write_traces(tmp_path / "b.parquet", [b])
    got = {t.trace_id: t for t in read_traces(tmp_path)}
    assert got["a"].equals(a) and got["a"].schema_version == "speckv-trace/2"
    assert got["b"].equals(b) and got["b"].schema_version == "speckv-trace/1"
    with pytest.raises(ValueError, match="with and without rollouts"):
        write_traces(tmp_path / "mix.parquet", [a, b])


def test_v2_trace_inconsistent_rollout_is_refused():
    tr = synthetic_trace(40, seed=1, rollouts=True)
    tr.meta = {"exact": True}
    tr.validate()
    bad = tr.roll_tokens.copy()
    t = int(np.nonzero(tr.L > 1)[0][0])
    bad[t, 1] = (bad[t, 1] + 1) % 49152
    tr.roll_tokens = bad
    with pytest.raises(TraceFormatError, match=f"rollout from position {t} leaves the emitted tokens"):
        tr.validate()
    tr.roll_tokens = bad[:, :3]
    with pytest.raises(TraceFormatError, match="roll_tokens must hold N x gamma_max"):
        tr.validate()


@pytest.mark.slow
@requires_default
@pytest.mark.parametrize("lookahead", [True, False], ids=["lookahead", "dtd"])
@pytest.mark.parametrize("compression", ["fp32", "int8"])
def test_real_pair_token_mode_replays_exactly(compression, lookahead):
    """On the real default pair: live token-mode episodes (both variants) with random continue/stop
    choices (greedy and T = 0.7) replay identically, decision by decision, from a freshly recorded
    speckv-trace/2 trace of another (step-mode, random-gamma) behaviour."""
    from speckv_env.pair import load_pair
    from speckv_env.prompts import load_prompts

    pair = load_pair(compression=compression, device="cpu")
    prompt = min(load_prompts(split="test", task="code"), key=lambda p: len(p.text))
    for temperature in (0.0, 0.7):
        seed = 21
        tr = _record(pair, prompt, temperature, seed, max_new_tokens=32)
        assert tr.meta["exact"] is True and tr.has_rollouts
        live = gym.make(
            "SpecKV-v0",
            pair=pair,
            prompts=[prompt],
            cost_model=CostModel.unit(),
            max_new_tokens=32,
            temperature=temperature,
            control="token",
            lookahead=lookahead,
        )
        rep = SpecKVReplayEnv(traces=[tr], cost_model=CostModel.unit(), control="token", lookahead=lookahead)
        live.reset(options={"episode": 0, "episode_seed": seed})
        rep.reset(options={"episode": 0})
        decisions, steps = _play_both(live, rep, seed=5, p_draft=0.75)
        assert decisions > steps > 3
        assert live.unwrapped.emitted_tokens == tr.tokens.tolist()


@pytest.mark.parametrize("lookahead", [True, False], ids=["lookahead", "dtd"])
def test_token_mode_passes_both_checkers_with_zero_warnings(exact_pair, lookahead):
    """Gymnasium's and stable-baselines3's env checkers, replay and live, in token mode (both variants)."""
    import warnings

    from gymnasium.utils.env_checker import check_env as gym_check_env
    from stable_baselines3.common.env_checker import check_env as sb3_check_env

    replay = gym.make(
        "SpecKVReplay-v0",
        traces=synthetic_dataset(6, rollouts=True, compressions=("fp16", "int8"), modes=("greedy", "sample")),
        cost_models={"fp16": CostModel.unit(), "int8": CostModel.unit(draft_ratio=0.3)},
        control="token",
        lookahead=lookahead,
    )
    live = _live(exact_pair, 0.7, max_new_tokens=12, lookahead=lookahead)
    for env in (replay, live):
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            gym_check_env(env.unwrapped, skip_render_check=True)
            sb3_check_env(env)
        assert not w, [str(x.message) for x in w]


@pytest.mark.parametrize("lookup", [False, True])
def test_batched_rollouts_are_bit_identical_to_sequential(exact_pair, lookup):
    """The recorder's batched rollouts (every position's token i in one forward, each row against
    its own prefix) equal the one-position-at-a-time rollouts bit for bit, greedy and sampled,
    with the plain draft and with a context-lookup draft (whose per-row history is padded)."""
    from tiny_models import make_tiny_lookup_draft

    from speckv_env import invariant
    from speckv_env.engine import SpeculativeEngine
    from speckv_env.rollout import batched_rollouts, sequential_rollouts

    draft = exact_pair.draft
    if lookup:
        draft = make_tiny_lookup_draft(exact_pair.target, noise=0.03)
        draft.generation_config.eos_token_id = exact_pair.tokenizer.eos_token_id
        invariant.make_row_invariant(draft)
    ids = exact_pair.encode_chat("List three prime numbers and add them: 2, 3, 5, then 2 + 3 + 5.")
    for temperature in (0.0, 0.7):
        eng = SpeculativeEngine(exact_pair.target, draft, temperature=temperature, eos_token_id=exact_pair.eos_token_id)
        res = eng.generate(ids, 28, gamma=2, seed=3)
        a = sequential_rollouts(eng, ids, res.tokens, 8)
        b = batched_rollouts(eng, ids, res.tokens, 8)
        for k in ("tokens", "top1", "entropy", "margin", "p"):
            assert np.array_equal(getattr(a, k), getattr(b, k)), (lookup, temperature, k)
        assert b.forwards < a.forwards
