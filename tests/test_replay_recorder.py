"""RecordSteps logs replay as live play: the engine's clip at the budget end, no invented event
at gamma 0, the recorded finish reason; file names unique across sessions, nothing overwritten.

The "live" env here is the trace replay env: its step rule is the live engine's
(replay/steprule.py), so a step log of it must replay step for step like it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from replay.env import SpecKVReplayEnv
from replay.importers import StepLogBackend, read_step_log
from replay.recorder import RecordSteps
from replay.trace import Trace, synthetic_dataset
from speckv_env.core import CostModel

CM = CostModel(t_draft=0.1, t_verify=[1.0 + 0.05 * g for g in range(9)], t_target=1.0, pair="p", device="cpu")


def _trace(accept: list[bool], finish: str, mnt: int = 0, tid: str = "t") -> Trace:
    n = len(accept)
    return Trace(
        trace_id=tid,
        tokens=np.arange(3, 3 + n),
        accept=np.array(accept),
        sig_top1=np.full(n, 0.5, np.float32),
        sig_entropy=np.full(n, 1.0, np.float32),
        sig_margin=np.full(n, 0.2, np.float32),
        max_new_tokens=mnt,
        finish_reason=finish,
        pair="p",
        device="cpu",
        compression="fp32",
        prompt_id=tid,
    )


def _record(traces: list[Trace], folder: Path, actions: list[list[int]]) -> list[list[tuple]]:
    """Play each episode with its actions under RecordSteps; the live outcomes per step."""
    env = RecordSteps(SpecKVReplayEnv(traces=traces, cost_model=CM), folder)
    out = []
    for ep, acts in enumerate(actions):
        env.reset(seed=0, options={"episode": ep})
        steps = []
        for a in acts:
            _, r, te, tr, info = env.step(a)
            steps.append((info["gamma"], info["accepted"], r, info["modelled_time"], te, tr))
            if te or tr:
                break
        assert te or tr, "the actions must finish the episode"
        out.append(steps)
    return out


def _replay(folder: Path, actions: list[list[int]], **kw) -> list[list[tuple]]:
    env = SpecKVReplayEnv(logs=folder, **kw)
    backend = env.backend
    assert isinstance(backend, StepLogBackend)
    assert backend.num_episodes() == len(actions)
    out = []
    for ep, acts in enumerate(actions):
        env.reset(seed=0, options={"episode": ep})
        steps = []
        for a in acts[: len(backend.run["gamma"])]:
            _, r, te, tr, info = env.step(a)
            steps.append((info["gamma"], info["accepted"], r, info["modelled_time"], te, tr))
        out.append(steps)
    return out


def test_logged_episode_replays_like_live_play_at_the_budget_end(tmp_path: Path) -> None:
    # N = budget = 5, every proposal accepted: at gamma 2 the steps are (0: d 2, k 2) and
    # (3: limit 5 - 1 - 3 = 1, so d 1, k 1, censored). Asking gamma 2 again at position 3 is
    # live play's own step; the paper's clip (limit 2 > d) called it undetermined and raised.
    # Second episode: the last step drafts 1 and is rejected; the paper's clip priced it at gamma 2.
    traces = [_trace([True] * 5, "length", tid="a"), _trace([True, True, True, False, True], "length", tid="b")]
    actions = [[2, 2, 2], [2, 2, 2, 2]]
    live = _record(traces, tmp_path, actions)
    assert [s[:2] + s[4:] for s in live[0]] == [(2, 2, False, False), (1, 1, False, True)]
    assert [s[3] for s in live[0]] == [pytest.approx(1.3), pytest.approx(1.15)]
    assert _replay(tmp_path, actions, gammas=(0, 1, 2)) == live
    df = read_step_log(tmp_path)
    assert set(df["gamma_clip"]) == {"engine"} and set(df["finish_reason"]) == {"length"}


def test_random_policy_replays_exactly_and_eos_terminates(tmp_path: Path) -> None:
    ds = synthetic_dataset(6, n_range=(5, 40), seed=3)
    for t in ds:  # a real-looking identity, as a live recording has
        t.pair, t.device, t.compression, t.meta = "p", "cpu", "fp32", {}
    assert {t.finish_reason for t in ds} == {"eos", "length"}
    rng = np.random.default_rng(0)
    actions = [rng.integers(0, 9, size=200).tolist() for _ in ds]
    live = _record(ds, tmp_path, actions)
    replayed = _replay(tmp_path, actions)
    assert replayed == live
    for t, steps in zip(ds, replayed):
        assert steps[-1][4:] == ((True, False) if t.finish_reason == "eos" else (False, True))


def test_gamma_zero_step_reveals_no_invented_event(tmp_path: Path) -> None:
    tr = _trace([True] * 6, "length", tid="z")
    _record([tr], tmp_path, [[0] * 6])
    env = SpecKVReplayEnv(logs=tmp_path, gammas=(0,))
    obs0, _ = env.reset(seed=0, options={"episode": 0})
    obs, *_ = env.step(0)
    # nothing was tested at gamma 0: the acceptance EMA and the hit rate stay at their priors
    assert obs[3] == obs0[3] and obs[4] == obs0[4] == np.float32(0.5)


def test_file_names_are_unique_across_sessions_and_never_overwritten(tmp_path: Path) -> None:
    tr = _trace([True, False] * 4, "length", tid="s")
    _record([tr], tmp_path, [[3] * 8])
    (first,) = tmp_path.glob("steps-*.parquet")
    before = first.read_bytes()
    _record([tr], tmp_path, [[3] * 8])  # a new session: same env, same episode, same seed
    files = sorted(tmp_path.glob("steps-*.parquet"))
    assert len(files) == 2 and first in files and first.read_bytes() == before
    df = read_step_log(tmp_path)
    assert df["run_id"].nunique() == 2
    assert [p.name for p in tmp_path.glob("cost-*.json")] == ["cost-fp32.json"]  # the same model, once
    a, b = _replay(tmp_path, [[3] * 8, [3] * 8], gammas=(0, 1, 2, 3))
    assert a == b and len(a) == 4


def test_a_different_cost_model_is_kept_beside_and_reported_on_read(tmp_path: Path) -> None:
    tr = _trace([True, False] * 4, "length", tid="c")
    _record([tr], tmp_path, [[3] * 8])
    other = CostModel(t_draft=0.3, t_verify=[1.0] * 9, t_target=1.0, pair="p", device="cpu")
    env = RecordSteps(SpecKVReplayEnv(traces=[tr], cost_model=other), tmp_path)
    env.reset(seed=0)
    done = False
    while not done:
        *_, te, trc, _ = env.step(3)
        done = te or trc
    assert len(list(tmp_path.glob("cost-fp32*.json"))) == 2
    assert CostModel.load(tmp_path / "cost-fp32.json") == CM  # never overwritten
    with pytest.raises(ValueError, match=r"cost-fp32.*cost-fp32.*two different cost models"):
        SpecKVReplayEnv(logs=tmp_path, gammas=(0, 3))
