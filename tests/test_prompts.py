"""Prompt suites, the distillation pool and the loader API (fast; no model is loaded)."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from speckv_env.prompts import (
    SPLITS,
    TASKS,
    Prompt,
    PromptFileError,
    format_prompt,
    load_prompt_file,
    load_prompts,
)

ROOT = Path(__file__).resolve().parents[1]
POOL = ROOT / "experiments" / "data" / "distill_prompts.jsonl"


def _pool() -> list[dict]:
    if not POOL.exists():
        pytest.skip("distillation pool not present (it is not shipped in the package)")
    return [json.loads(line) for line in POOL.read_text(encoding="utf-8").splitlines()]


def test_counts_per_task_and_split():
    assert TASKS == ("chat", "code", "math", "summarization")
    assert SPLITS == ("train", "validation", "test")
    for task in TASKS:
        prompts = load_prompts(task)
        assert len(prompts) == 64
        assert Counter(p.split for p in prompts) == {"train": 40, "validation": 8, "test": 16}
        assert all(p.task == task for p in prompts)
    assert len(load_prompts()) == 256
    assert len(load_prompts(split="test")) == 64
    assert len(load_prompts(["code", "math"], ["train", "validation"])) == 96


def test_ids_text_source_license():
    prompts = load_prompts()
    assert all(isinstance(p, Prompt) for p in prompts)
    assert len({p.id for p in prompts}) == len(prompts)
    assert len({p.text for p in prompts}) == len(prompts)
    for p in prompts:
        assert p.id.startswith(p.task + "-")
        assert p.text.strip() and p.source and p.license
        assert "<|im_start|>" not in p.text  # raw user messages, not chat-formatted
        assert len(p.text) < 2000


def test_deterministic_order_and_filters():
    a = load_prompts()
    assert a == load_prompts()
    assert [p.task for p in a] == sorted((p.task for p in a), key=TASKS.index)
    # order of arguments does not matter; repeats are ignored
    assert load_prompts(["math", "chat"]) == load_prompts(["chat", "math", "chat"])
    assert load_prompts("code", "test") == [p for p in load_prompts("code") if p.split == "test"]


def test_humaneval_split_is_by_problem():
    code = load_prompts("code")
    he = [p for p in code if p.source.startswith("humaneval:")]
    assert len(he) == 32 and all(p.license == "MIT" for p in he)
    assert len({p.source for p in he}) == len(he)


def test_suites_and_pool_disjoint():
    pool = _pool()
    assert len(pool) == 2400
    assert Counter(r["task"] for r in pool) == dict.fromkeys(TASKS, 600)
    for r in pool:
        assert set(r) == {"id", "task", "split", "text", "source", "license"}
        assert r["split"] == "distill" and r["text"].strip() and r["source"] and r["license"]
    assert len({r["id"] for r in pool}) == len(pool)
    assert len({r["text"] for r in pool}) == len(pool)
    suite = load_prompts()
    assert not {p.text for p in suite} & {r["text"] for r in pool}

    def items(sources, prefix, cut):
        return {cut(s) for s in sources if s.startswith(prefix)}

    s_src = [p.source for p in suite]
    p_src = [r["source"] for r in pool]
    # no HumanEval problem, KJV chapter, documentation page or code spec in both
    for prefix, cut in [
        ("humaneval:", lambda s: s),
        ("bible-kjv:", lambda s: s.rsplit(":", 1)[0]),
        ("python3-doc:", lambda s: s.split("#", 1)[0]),
        ("generated:code-spec-", lambda s: s),
    ]:
        shared = items(s_src, prefix, cut) & items(p_src, prefix, cut)
        assert not shared, (prefix, sorted(shared)[:3])
    assert items(s_src, "humaneval:", str) and items(p_src, "humaneval:", str)


def test_unknown_task_or_split():
    with pytest.raises(ValueError, match="'poetry'"):
        load_prompts("poetry")
    with pytest.raises(ValueError, match="'dev'"):
        load_prompts("chat", "dev")
    with pytest.raises(ValueError, match="'nope'"):
        load_prompts(["chat", "nope"])
    with pytest.raises(ValueError, match="no task given; choose from chat, code, math, summarization"):
        load_prompts([])
    with pytest.raises(ValueError, match="no split given"):
        load_prompts("chat", [])


def test_load_prompt_file_jsonl_defaults(tmp_path):
    f = tmp_path / "mine.jsonl"
    f.write_text(
        '{"text": "Hello there"}\n\n'
        '{"id": "x1", "task": "math", "split": "test", "text": "What is 2 + 2?", '
        '"source": "me", "license": "CC0-1.0"}\n',
        encoding="utf-8",
    )
    a, b = load_prompt_file(f)
    assert (a.task, a.split, a.source, a.license, a.text) == ("custom", "custom", "user", "unknown", "Hello there")
    assert b == Prompt("x1", "math", "test", "What is 2 + 2?", "me", "CC0-1.0")


def test_load_prompt_file_txt(tmp_path):
    f = tmp_path / "mine.txt"
    f.write_text("first prompt\n\n   \nsecond prompt\n", encoding="utf-8")
    ps = load_prompt_file(str(f))
    assert [p.text for p in ps] == ["first prompt", "second prompt"]
    assert len({p.id for p in ps}) == 2 and all(p.task == "custom" for p in ps)


@pytest.mark.parametrize(
    "bad, what",
    [
        ("{not json", "invalid JSON"),
        ('["a list"]', "JSON object"),
        ('{"id": "y"}', "text"),
        ('{"text": "   "}', "text"),
        ('{"text": "ok", "task": 3}', "task"),
    ],
)
def test_malformed_jsonl_names_file_and_line(tmp_path, bad, what):
    f = tmp_path / "broken.jsonl"
    f.write_text('{"text": "fine"}\n\n' + bad + "\n", encoding="utf-8")
    with pytest.raises(PromptFileError, match=r"broken\.jsonl, line 3") as info:
        load_prompt_file(f)
    assert what in str(info.value)
    assert isinstance(info.value, ValueError)


def test_prompt_file_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        load_prompt_file(tmp_path / "missing.txt")
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n", encoding="utf-8")
    with pytest.raises(PromptFileError, match="empty.txt"):
        load_prompt_file(empty)
    dup = tmp_path / "dup.jsonl"
    dup.write_text('{"id": "a", "text": "x"}\n{"id": "a", "text": "y"}\n', encoding="utf-8")
    with pytest.raises(PromptFileError, match=r"dup\.jsonl, line 2.*duplicate id"):
        load_prompt_file(dup)


class _FakeTokenizer:
    chat_template = "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}"

    def __init__(self):
        self.calls = []

    def apply_chat_template(self, messages, tokenize=True, add_generation_prompt=False):
        self.calls.append((messages, tokenize, add_generation_prompt))
        body = "".join(f"<{m['role']}>{m['content']}</{m['role']}>" for m in messages)
        return body + ("<assistant>" if add_generation_prompt else "")


class _PlainTokenizer:
    chat_template = None


def test_format_prompt_uses_chat_template():
    tok = _FakeTokenizer()
    assert format_prompt(tok, "Hi") == "<user>Hi</user><assistant>"
    assert tok.calls[-1] == ([{"role": "user", "content": "Hi"}], False, True)
    out = format_prompt(tok, "Hi", system="Be brief.")
    assert out == "<system>Be brief.</system><user>Hi</user><assistant>"


def test_format_prompt_without_template():
    assert format_prompt(_PlainTokenizer(), "Hi") == "Hi"
    assert format_prompt(_PlainTokenizer(), "Hi", system="S") == "S\n\nHi"


def test_no_torch_at_import():
    code = "import sys, speckv_env.prompts as p; p.load_prompts(); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
