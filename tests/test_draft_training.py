"""The shipped draft and the draft-training pipeline (experiments/train_draft.py --budget tiny)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from speckv_env.draft import DraftLoadError, default_draft_path, load_default_draft, load_draft

REPO = Path(__file__).resolve().parents[1]


def test_tiny_pipeline_trains_a_loadable_draft(tmp_path):
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE")
    r = subprocess.run(
        [sys.executable, str(REPO / "experiments" / "train_draft.py"), "--budget", "tiny", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    res = json.loads((tmp_path / "tiny_result.json").read_text())
    assert res["last_loss"] < res["first_loss"]
    draft = load_draft(tmp_path / "best", device="cpu")
    ids = torch.tensor([[1, 504, 4234, 1230]])
    with torch.no_grad():
        logits = draft(input_ids=ids).logits
    assert logits.shape == (1, 4, 49152)
    assert torch.isfinite(logits).all()
    # the evaluation scored the draft on real target tokens of every task it was given
    test = res["eval"]["splits"]["test"]
    tasks = test["tasks"]
    assert tasks and all(v["n_prompts"] > 0 and v["n_tokens"] > 0 for v in tasks.values()), tasks
    assert test["mean_alpha"] == pytest.approx(sum(v["alpha"] for v in tasks.values()) / len(tasks))
    assert all(0.0 <= v["alpha"] <= 1.0 for v in tasks.values())


@pytest.fixture(scope="module")
def shipped():
    if not (default_draft_path() / "model.safetensors").exists():
        pytest.skip("no shipped draft in speckv_env/assets/draft")
    return load_default_draft(device="cpu")


def test_default_draft_loads_and_gives_full_vocab_logits(shipped):
    from speckv_env.models import load_tokenizer

    tok = load_tokenizer(None)
    assert shipped.config.vocab_size == len(tok)
    assert shipped.config.eos_token_id == tok.eos_token_id
    assert int(shipped.head_ids.max()) < len(tok)
    assert {0, 1, 2} <= set(shipped.head_ids.tolist())
    text = tok.apply_chat_template(
        [{"role": "user", "content": "Say hello."}], add_generation_prompt=True, tokenize=False
    )
    ids = tok(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logits = shipped(input_ids=ids).logits
    assert logits.shape == (1, ids.shape[1], len(tok))
    assert torch.isfinite(logits).all()
    assert set(logits[0, -1].argmax(-1).view(-1).tolist()) <= set(shipped.head_ids.tolist())


def test_missing_draft_file_names_the_file(tmp_path):
    with pytest.raises(DraftLoadError, match="config.json"):
        load_draft(tmp_path, device="cpu")


def test_malformed_draft_files_name_the_file(tmp_path):
    from speckv_env.draft import build_draft_from_target, save_draft
    from speckv_env.models import default_target_path

    save_draft(build_draft_from_target(default_target_path(), [0], list(range(16))), tmp_path)
    assert load_draft(tmp_path, device="cpu").head_size == 16
    (tmp_path / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(DraftLoadError, match="model.safetensors"):
        load_draft(tmp_path, device="cpu")
    (tmp_path / "config.json").write_text("{ nope")
    with pytest.raises(DraftLoadError, match="config.json"):
        load_draft(tmp_path, device="cpu")
