"""Budget and EOS edge cases of the engine under sampling, on the tiny pair.

Each EOS case is made to happen deterministically: a reference run without EOS (same seed,
same gammas) shows where a token is emitted for the first time, and that token is then
declared EOS. Until that position the run with EOS computes exactly what the reference did
(the EOS set only acts on emitted tokens), so the step where the EOS appears, and how it
appears (inside the accepted drafts, as the last accepted draft, as the bonus token after a
fully accepted draft, as the target's correction after a rejection), are known in advance.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pytest

from speckv_env.engine import GenerationResult, SpeculativeEngine, StepResult

PROMPT = [5, 6, 7]
TEMPERATURE = 0.9
N = 40  # tokens of the reference runs
GAMMA = 8


@dataclass
class Case:
    seed: int
    ref: GenerationResult  # the run without EOS
    step: int  # index of the step in which the EOS appears
    pos: int  # output position of that step's first token
    j: int  # index of the EOS within that step's emitted tokens

    @property
    def s(self) -> StepResult:
        return self.ref.steps[self.step]

    @property
    def eos(self) -> int:
        return self.s.tokens[self.j]


def _engine(pair, eos: int | list[int], top_p: float = 1.0) -> SpeculativeEngine:
    target, draft = pair
    return SpeculativeEngine(target, draft, temperature=TEMPERATURE, top_p=top_p, eos_token_id=eos)


def _find(pair, where: Callable[[StepResult], list[int]], top_p: float = 1.0) -> Case:
    """The first (seed, step, j) of the reference runs where ``where(step)`` lists j and the
    token there is emitted for the first time in the run."""
    eng = _engine(pair, [], top_p)
    for seed in range(30):
        ref = eng.generate(PROMPT, N, gamma=GAMMA, seed=seed)
        assert ref.finish_reason == "length" and len(ref.tokens) == N
        pos = 0
        for i, s in enumerate(ref.steps):
            for j in where(s):
                if s.tokens[j] not in ref.tokens[: pos + j]:
                    return Case(seed, ref, i, pos, j)
            pos += len(s.tokens)
    raise AssertionError("no reference run has the situation: the test cannot check anything")


def _run_with_eos(pair, case: Case, top_p: float = 1.0) -> tuple[SpeculativeEngine, GenerationResult]:
    eng = _engine(pair, case.eos, top_p)
    return eng, eng.generate(PROMPT, N, gamma=GAMMA, seed=case.seed)


def _check_prefix(case: Case, res: GenerationResult) -> StepResult:
    """Steps before the EOS step are the reference's; generation stops right after the EOS."""
    assert res.finish_reason == "eos"
    assert res.tokens == case.ref.tokens[: case.pos + case.j + 1], "nothing may be emitted after the EOS"
    assert res.tokens[-1] == case.eos and case.eos not in res.tokens[:-1]
    assert len(res.steps) == case.step + 1
    for a, b in zip(res.steps[:-1], case.ref.steps):
        assert (a.gamma, a.accepted, a.tokens, a.events) == (b.gamma, b.accepted, b.tokens, b.events)
    last = res.steps[-1]
    assert last.done and last.finish_reason == "eos" and last.gamma == case.s.gamma
    return last


@pytest.mark.parametrize("top_p", [1.0, 0.8])
@pytest.mark.parametrize("where", ["first draft", "inside", "last of all drafts"])
def test_eos_inside_accepted_drafts(tiny_pair, where: str, top_p: float) -> None:
    """An accepted draft that is EOS ends generation right after it; accepted = drafts before it."""
    pick = {
        "first draft": lambda s: [0] if s.accepted >= 1 else [],
        "inside": lambda s: list(range(1, s.accepted)),  # an accepted draft with accepted drafts after it
        "last of all drafts": lambda s: [s.gamma - 1] if s.gamma >= 2 and s.accepted == s.gamma else [],
    }[where]
    case = _find(tiny_pair, pick, top_p)
    assert case.j < case.s.accepted  # the EOS is one of the accepted drafts in the reference
    eng, res = _run_with_eos(tiny_pair, case, top_p)
    last = _check_prefix(case, res)
    assert last.accepted == case.j, "accepted counts the drafts before the EOS, not the EOS"
    assert last.tokens == case.s.tokens[: case.j + 1]
    assert last.events == [1] * case.j + [0]
    with pytest.raises(RuntimeError, match="finished"):
        eng.step(1)


@pytest.mark.parametrize("top_p", [1.0, 0.8])
@pytest.mark.parametrize("where", ["bonus after all accepted", "correction after a rejection"])
def test_eos_as_the_target_token(tiny_pair, where: str, top_p: float) -> None:
    """EOS as the token the target adds (the bonus after g accepted drafts, or the resampled
    token after a rejection): every accepted draft counts, the EOS is the last token."""
    pick = {
        "bonus after all accepted": lambda s: [s.gamma] if s.gamma >= 1 and s.accepted == s.gamma else [],
        "correction after a rejection": lambda s: [s.accepted] if s.accepted < s.gamma else [],
    }[where]
    case = _find(tiny_pair, pick, top_p)
    assert case.j == case.s.accepted == len(case.s.tokens) - 1
    _, res = _run_with_eos(tiny_pair, case, top_p)
    last = _check_prefix(case, res)
    assert last.accepted == case.s.accepted and last.tokens == case.s.tokens
    assert last.events == case.s.events
    expected_events = [1] * last.gamma if where.startswith("bonus") else [1] * last.accepted + [0]
    assert last.events == expected_events


def test_max_new_tokens_one_with_gamma_8(tiny_pair) -> None:
    """One token may be emitted: gamma 8 is clipped to 0, and that one token is the one a
    plain target step (gamma 0) emits first from the same seed."""
    eng = _engine(tiny_pair, [])
    for seed in range(5):
        res = eng.generate(PROMPT, 1, gamma=GAMMA, seed=seed)
        assert len(res.tokens) == 1 and res.finish_reason == "length" and len(res.steps) == 1
        s = res.steps[0]
        assert (s.gamma, s.accepted, s.tokens, s.draft_forwards) == (0, 0, res.tokens, 1)
        assert len(s.events) == 1 and s.done
        plain = eng.generate(PROMPT, 5, gamma=[0, GAMMA], seed=seed)
        assert plain.tokens[0] == res.tokens[0]
        with pytest.raises(RuntimeError, match="finished"):
            eng.step(GAMMA)


def test_max_new_tokens_one_whose_token_is_eos(tiny_pair) -> None:
    """The budget's last token being EOS: the reason is eos, not length."""
    tok = _engine(tiny_pair, []).generate(PROMPT, 1, gamma=GAMMA, seed=3).tokens[0]
    res = _engine(tiny_pair, tok).generate(PROMPT, 1, gamma=GAMMA, seed=3)
    assert res.tokens == [tok] and res.finish_reason == "eos" and res.steps[0].gamma == 0


@pytest.mark.parametrize("budget", [1, 2, 3, 5, 9, 10, 17])
def test_budget_is_met_exactly_with_gamma_clipped(tiny_pair, budget: int) -> None:
    """With gamma 8 every step drafts min(8, budget - 1 - position): exactly ``budget`` tokens."""
    eng = _engine(tiny_pair, [])
    res = eng.generate(PROMPT, budget, gamma=GAMMA, seed=11)
    assert len(res.tokens) == budget and res.finish_reason == "length"
    pos = 0
    for s in res.steps:
        assert s.gamma == min(GAMMA, budget - 1 - pos)
        assert len(s.tokens) == s.accepted + 1 and 0 <= s.accepted <= s.gamma
        pos += len(s.tokens)
    assert [s.done for s in res.steps] == [False] * (len(res.steps) - 1) + [True]
