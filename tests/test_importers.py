"""SpecKV paper step logs: import, censoring, cost-model fit, replay over step logs."""

from __future__ import annotations

import math
from pathlib import Path

import gymnasium as gym
import numpy as np
import pandas as pd
import pytest

import speckv_env  # noqa: F401
from replay.env import SpecKVReplayEnv
from replay.importers import (
    PAPER_DIR,
    StepLogBackend,
    UndeterminedOutcomeError,
    fit_cost_model,
    import_speckv_paper,
    read_step_log,
    write_step_log,
)
from replay.schema import STEPS_SCHEMA_VERSION, TraceFormatError


@pytest.fixture(scope="module")
def paper():
    return import_speckv_paper()


def test_import_shape_and_censoring(paper) -> None:
    steps, runs = paper
    assert len(steps) == 5112 and len(runs) == 240 and steps["run_id"].nunique() == 240
    assert (steps["schema"] == STEPS_SCHEMA_VERSION).all()
    assert (steps["censored"] == (steps["accepted"] == steps["drafted"])).all()
    assert (steps["drafted"] <= steps["gamma"]).all() and (steps["drafted"] < steps["gamma"]).any()
    assert (steps["drafted"] == np.minimum(steps["gamma"], 80 - steps["position"])).all()
    assert all(c.startswith("post_") for c in steps.columns if "entropy" in c or "confidence" in c)
    raw = pd.read_csv(PAPER_DIR / "phase2_experiment_results.csv")
    assert (runs["tokens"].to_numpy() == raw["num_tokens"].to_numpy()).all()
    assert set(steps["split"]) == {"train", "validation", "test"}  # the canonical names (speckv_env.prompts)
    # prompts attached in order: the first run's prompt is the experiment file's first prompt
    assert steps["prompt"].iloc[0] == raw["prompt"].iloc[0]


def test_replay_at_recorded_gamma_reproduces_csv(paper) -> None:
    steps, _ = paper
    env = SpecKVReplayEnv(source="speckv-paper")
    backend = env.backend
    assert isinstance(backend, StepLogBackend)
    raw = pd.read_csv(PAPER_DIR / "phase2_step_results.csv")
    got: list[int] = []
    for ep in range(backend.num_episodes()):
        env.reset(seed=0, options={"episode": ep})
        run = backend.run
        for i, g in enumerate(run["gamma"]):
            _, _, term, trunc, info = env.step(env.gammas.index(g))
            assert info["accepted"] == info["recorded_accepted"] and not info["undetermined"]
            got.append(info["emitted"])
            assert (term or trunc) == (i == len(run["gamma"]) - 1)
    assert got == raw["tokens_produced"].tolist()


def test_counterfactual_gammas_only_where_determined(paper) -> None:
    env = SpecKVReplayEnv(source="speckv-paper")
    backend = env.backend
    assert isinstance(backend, StepLogBackend)
    n_checked = {"uncensored": 0, "censored": 0}
    for ep in range(0, backend.num_episodes(), 7):
        env.reset(seed=0, options={"episode": ep})
        run = backend.run
        for i in range(len(run["gamma"])):
            d, k, pos = run["drafted"][i], run["accepted"][i], run["position"][i]
            if k < d:  # every gamma is answered
                a = 8
                _, _, _, _, info = env.step(a)
                assert info["accepted"] == min(k, min(8, 80 - pos)) and info["emitted"] == info["accepted"] + 1
                n_checked["uncensored"] += 1
            else:
                if d < 8 and 80 - pos > d:
                    with pytest.raises(UndeterminedOutcomeError) as ei:
                        env.step(8)
                    msg = str(ei.value)
                    assert run["run_id"] in msg and f"step {run['step'][i]}" in msg
                    assert f"recorded gamma {run['gamma'][i]}" in msg and "requested gamma 8" in msg
                    n_checked["censored"] += 1
                _, _, _, _, info = env.step(d)  # gammas <= d are determined
                assert info["accepted"] == d
    assert n_checked["uncensored"] > 50 and n_checked["censored"] > 50


@pytest.mark.parametrize("policy", ["clip", "skip"])
def test_on_undetermined_clip_and_skip(policy: str) -> None:
    env = SpecKVReplayEnv(source="speckv-paper", on_undetermined=policy, compression="fp16")
    env.reset(seed=0, options={"episode": 0})  # a gamma = 2 run
    assert isinstance(env.backend, StepLogBackend)
    run = env.backend.run
    i = next(j for j, (d, k) in enumerate(zip(run["drafted"], run["accepted"])) if k == d)
    for _ in range(i):
        env.step(run["gamma"][0])
    _, r, _, _, info = env.step(8)
    assert info["undetermined"]
    if policy == "clip":
        assert info["gamma"] == run["drafted"][i] and info["accepted"] == run["drafted"][i] and not info["skipped"]
    else:
        assert info["skipped"] and r == 0.0 and info["emitted"] == 0 and info["modelled_time"] == 0.0
    assert info["position"] == run["position"][i] + run["accepted"][i] + 1
    with pytest.raises(ValueError, match="on_undetermined"):
        SpecKVReplayEnv(source="speckv-paper", on_undetermined="guess")


def test_post_draft_features_only_on_request() -> None:
    plain = SpecKVReplayEnv(source="speckv-paper")
    leaky = SpecKVReplayEnv(source="speckv-paper", paper_features=True)
    o1, _ = plain.reset(seed=0, options={"episode": 3})
    o2, _ = leaky.reset(seed=0, options={"episode": 3})
    assert isinstance(plain.backend, StepLogBackend)
    run = plain.backend.run
    assert o1[:3].tolist() == [0.0, 0.0, 0.0]  # nothing is known before the first step
    assert o2[0] == np.float32(run["conf"][0])  # the current step's post-draft confidence
    g = run["gamma"][0]
    o1, *_ = plain.step(g)
    o2, *_ = leaky.step(g)
    assert o1[0] == np.float32(run["conf"][0]) and o1[1] == np.float32(run["ent"][0])  # previous step's
    assert o2[0] == np.float32(run["conf"][1])
    raw = pd.read_csv(PAPER_DIR / "phase2_step_results.csv")
    first_rows = np.flatnonzero(raw["step"].to_numpy() == 0)
    assert run["ent"][0] == pytest.approx(float(raw["mean_draft_entropy"].iloc[first_rows[3]]) * math.log(2), rel=1e-6)


def test_cost_model_fit(paper) -> None:
    _, runs = paper
    for c in ("fp16", "int8", "nf4"):
        f = fit_cost_model(runs, c)
        assert f.c_step > 0 and f.c_draft >= 0 and f.r2 > 0.9 and f.n_runs == 80
        assert f.cost_model.meta["no_kv_cache"] is True and f.cost_model.compression == c
        pred = (
            runs[runs.compression == c]["n_steps"] * f.c_step
            + runs[runs.compression == c]["drafted_tokens"] * f.c_draft
        )
        assert np.allclose(pred.sum(), runs[runs.compression == c]["elapsed_sec"].sum(), rtol=0.05)


def test_write_read_step_log_and_env_from_logs(paper, tmp_path: Path) -> None:
    steps, runs = paper
    sub = steps[steps["task"] == "math"]
    cms = {c: fit_cost_model(runs, c).cost_model for c in ("fp16", "int8", "nf4")}
    write_step_log(sub, tmp_path, cms)
    back = read_step_log(tmp_path)
    assert len(back) == len(sub) and (back["accepted"].to_numpy() == sub["accepted"].to_numpy()).all()
    env = gym.make("SpecKVReplay-v0", logs=tmp_path, split="train")
    u = env.unwrapped
    assert isinstance(u, SpecKVReplayEnv)
    assert u.backend.num_episodes() == 3 * 4 * 3  # compressions x gammas x train prompts
    # each run is priced by the cost model written beside the logs for its own compression
    seen = set()
    for ep in range(u.backend.num_episodes()):
        _, info = env.reset(seed=0, options={"episode": ep})
        assert u.cost_model.to_dict() == cms[info["compression"]].to_dict(), (ep, info["compression"])
        seen.add(info["compression"])
    assert seen == set(cms)


def test_malformed_paper_files(tmp_path: Path) -> None:
    e = pd.read_csv(PAPER_DIR / "phase2_experiment_results.csv")
    e.iloc[:-1].to_csv(tmp_path / "exp.csv", index=False)
    with pytest.raises(TraceFormatError, match=r"240 runs .*exp\.csv has 239 rows"):
        import_speckv_paper(PAPER_DIR / "phase2_step_results.csv", tmp_path / "exp.csv")
    s = pd.read_csv(PAPER_DIR / "phase2_step_results.csv")
    s.drop(columns=["accepted"]).to_csv(tmp_path / "steps.csv", index=False)
    with pytest.raises(TraceFormatError, match=r"steps\.csv: missing column\(s\) accepted"):
        import_speckv_paper(tmp_path / "steps.csv", PAPER_DIR / "phase2_experiment_results.csv")
