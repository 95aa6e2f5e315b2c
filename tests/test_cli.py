"""The `speckv` command line end to end on small inputs."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace

import pytest
from conftest import requires_default

from replay.trace import synthetic_dataset, write_traces
from speckv_env.app.bench_agents import TOKEN_AGENTS
from speckv_env.app.compare_data import POLICY_GROUPS
from speckv_env.core import CostModel


def run_speckv(*args, timeout=600, env=None):
    r = subprocess.run(
        [sys.executable, "-m", "speckv_env.app.cli", *args], capture_output=True, text=True, timeout=timeout, env=env
    )
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def speckv(*args, timeout=600, env=None):
    return run_speckv(*args, timeout=timeout, env=env).stdout


@pytest.fixture(scope="module")
def trace_folder(tmp_path_factory):
    d = tmp_path_factory.mktemp("traces")
    ds = synthetic_dataset(48, compressions=("fp32", "nf4"), tasks=("code", "chat"), modes=("greedy",))
    write_traces(d / "traces.parquet", ds)
    CostModel.unit(draft_ratio=0.1).save(d / "cost-fp32.json")
    replace(CostModel.unit(draft_ratio=0.05, verify_slope=0.02), compression="nf4").save(d / "cost-nf4.json")
    return d


def test_train_saves_a_loadable_agent(trace_folder, tmp_path):
    from agents import load_agent

    out = tmp_path / "ucb1.json"
    speckv("train", "ucb1", "--logs", str(trace_folder), "--out", str(out), "--set", "steps=2000")
    agent = load_agent(out)
    assert agent.kind == "ucb1"


def test_train_quiet_prints_only_the_result(trace_folder, tmp_path):
    r = run_speckv("train", "ucb1", "--logs", str(trace_folder), "--out", str(tmp_path / "u.json"), "--quiet")
    assert r.stderr == "" and r.stdout.startswith(f"saved {tmp_path / 'u.json'}")


def test_train_on_the_paper_logs_like_compare(tmp_path):
    from agents import load_agent

    out = json.loads(
        speckv(
            "train", "ucb1", "--logs", "speckv-paper", "--out", str(tmp_path / "u.json"), "--set", "steps=500", "--json"
        )
    )
    assert out["path"] == str(tmp_path / "u.json") and out["test"]["episodes"] > 0
    assert load_agent(out["path"]).kind == "ucb1"


def test_compare_quick_writes_report(trace_folder, tmp_path):
    r = run_speckv(
        "compare",
        "--logs",
        str(trace_folder),
        "--out",
        str(tmp_path / "cmp"),
        "--quick",
        "--set",
        'splits=["heldout"]',
        "mlp_epochs=2",
        "--set",
        "policies=fixed,speckv_mlp,oracle",
        "--json",
    )
    out = json.loads(r.stdout)  # the whole of stdout: progress and library messages went to stderr
    assert out["report"] == str(tmp_path / "cmp" / "report.md") and "heldout" in out["verdicts"]
    rep = (tmp_path / "cmp" / "report.md").read_text()
    assert "best fixed" in rep.lower()
    res = json.loads((tmp_path / "cmp" / "results.json").read_text())
    assert "heldout" in res["splits"]
    assert res["config"]["mlp_epochs"] == 2 and res["config"]["policies"] == ["fixed", "speckv_mlp", "oracle"]


def test_bench_agents_writes_json(tmp_path):
    out = json.loads(speckv("bench", "agents", "--out", str(tmp_path / "a.json"), "--json"))
    r = json.loads((tmp_path / "a.json").read_text())
    assert out == r
    # every policy of the comparison (its token group: each stopping rule), the MLP's torch path beside it, each timed
    # token rules in both variants: look-ahead (name) and draft-then-decide (name/dtd)
    token = set(TOKEN_AGENTS) | {a + "/dtd" for a in TOKEN_AGENTS}
    want = (set(POLICY_GROUPS) - {"token"}) | token | {"speckv_mlp[torch]"}
    assert set(r["agents"]) == want
    assert all(r["agents"][a]["lookahead"] is (not a.endswith("/dtd")) for a in token)
    assert all(a["n"] > 0 and 0 < a["median_us"] <= a["p99_us"] for a in r["agents"].values()), r["agents"]


def test_bench_json_path_is_the_old_spelling_of_out(tmp_path):
    r = run_speckv("bench", "agents", "--json", str(tmp_path / "a.json"), "--quiet")
    token = set(TOKEN_AGENTS) | {a + "/dtd" for a in TOKEN_AGENTS}
    want = (set(POLICY_GROUPS) - {"token"}) | token | {"speckv_mlp[torch]"}
    assert set(json.loads((tmp_path / "a.json").read_text())["agents"]) == want
    assert "wrote" in r.stdout


def test_unknown_compression_is_a_clear_cli_error():
    r = subprocess.run(
        [sys.executable, "-m", "speckv_env.app.cli", "generate", "--compression", "int3"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert (
        r.returncode == 2
        and r.stderr.startswith("speckv generate: error:")
        and "unknown compression 'int3'" in r.stderr
    )


@requires_default
def test_generate_on_a_tiny_pair(tmp_path):

    from tiny_models import make_tiny_pair

    from speckv_env.models import load_tokenizer

    tok = load_tokenizer(None)
    t, d = make_tiny_pair(vocab=49152, hidden=32, seed=2)
    for m, name in ((t, "t"), (d, "d")):
        m.config.eos_token_id = tok.eos_token_id
        m.generation_config.eos_token_id = tok.eos_token_id
        m.save_pretrained(tmp_path / name)
        tok.save_pretrained(tmp_path / name)
    out = speckv(
        "generate",
        "--target",
        str(tmp_path / "t"),
        "--draft",
        str(tmp_path / "d"),
        "--device",
        "cpu",
        "--max-new-tokens",
        "12",
        "--gamma",
        "3",
        "--json",
    )
    r = json.loads(out)
    # random tiny models never reach EOS in 12 tokens: the whole budget, in steps of at most gamma + 1 tokens
    assert r["new_tokens"] == 12 and 3 <= r["steps"] <= 12 and r["text"] and r["tokens_per_s"] > 0
    hist = {int(k): n for k, n in r["accepted_histogram"].items()}
    assert sum(hist.values()) == r["steps"] and set(hist) <= {0, 1, 2, 3}
    assert sum((k + 1) * n for k, n in hist.items()) == r["new_tokens"]  # a step emits its accepted drafts + 1
    assert r["tokens_per_step"] == pytest.approx(12 / r["steps"])
