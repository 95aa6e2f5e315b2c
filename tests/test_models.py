"""Model loading: every bad input is a clear error that says what was wrong and where."""

from __future__ import annotations

import logging
import os
import subprocess
import sys

import pytest
import torch
from tiny_models import make_tiny_llama, make_word_tokenizer

from speckv_env.models import (
    ModelLoadError,
    TokenizerMismatchError,
    UnknownCompressionError,
    check_compression,
    check_tokenizers_match,
    load_model,
    resolve_source,
)

WORDS = ["<pad>", "<unk>", "</s>", *[f"w{i}" for i in range(61)]]


def _save_model(tmp_path, name, words, seed=0):
    d = tmp_path / name
    m = make_tiny_llama(vocab=len(words), seed=seed, eos=2)
    m.save_pretrained(d)
    make_word_tokenizer(words).save_pretrained(d)
    return d


def test_missing_paths_are_named(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        resolve_source(str(tmp_path / "nope"), "target")
    with pytest.raises(ModelLoadError, match=r"GGUF file .*missing\.gguf does not exist"):
        resolve_source(str(tmp_path / "missing.gguf"), "draft")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="no config.json"):
        resolve_source(str(tmp_path / "empty"), "target")
    f = tmp_path / "weights.bin"
    f.write_bytes(b"x")
    with pytest.raises(ModelLoadError, match="not a .gguf file"):
        resolve_source(str(f), "target")


def test_hub_id_without_network_says_weights_must_be_local():
    code = (
        "from speckv_env.models import load_tokenizer, ModelLoadError\n"
        "try:\n    load_tokenizer('someorg/some-model', role='target')\n"
        "except ModelLoadError as e:\n    print('ERR', e)\n"
    )
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120).stdout
    assert "ERR target" in out and "someorg/some-model" in out and "must be local" in out


def test_unknown_compression():
    with pytest.raises(UnknownCompressionError, match="unknown compression 'int3'.*fp32, bf16, fp16, int8, nf4"):
        check_compression("int3")
    assert check_compression("NF4") == "nf4" and check_compression("none") == "fp32"


def test_tokenizer_mismatch_compares_vocabularies_not_names(tmp_path):
    a = make_word_tokenizer(WORDS)
    b = make_word_tokenizer(WORDS)
    check_tokenizers_match(a, b)  # same vocabulary: fine, whatever the names
    swapped = WORDS[:3] + [WORDS[4], WORDS[3]] + WORDS[5:]
    with pytest.raises(TokenizerMismatchError, match="same token, different id"):
        check_tokenizers_match(make_word_tokenizer(swapped), a, "d", "t")
    other = WORDS[:-1] + ["zzz"]
    with pytest.raises(TokenizerMismatchError, match="only in d"):
        check_tokenizers_match(make_word_tokenizer(other), a, "d", "t")


def test_load_pair_rejects_mismatched_tokenizers(tmp_path):
    from speckv_env.pair import load_pair

    t = _save_model(tmp_path, "target", WORDS)
    d = _save_model(tmp_path, "draft", WORDS[:3] + [WORDS[4], WORDS[3]] + WORDS[5:], seed=1)
    with pytest.raises(TokenizerMismatchError, match="do not share a vocabulary"):
        load_pair(str(t), str(d), device="cpu")
    d2 = _save_model(tmp_path, "draft2", WORDS, seed=1)
    pair = load_pair(str(t), str(d2), device="cpu")
    assert pair.compression == "fp32" and pair.draft.config.vocab_size == len(WORDS)
    with pytest.raises(ModelLoadError, match="draft model is required"):
        load_pair(str(t), None, device="cpu")


@pytest.mark.parametrize("compression", ["fp32", "bf16", "int8", "nf4"])
def test_compressed_loading(tmp_path, compression):
    """The loaded target's layers are what the compression says: every linear layer of the
    decoder is bitsandbytes' int8 / 4-bit layer with int8 / packed-uint8 nf4 weights (the
    output head stays a float layer), and an uncompressed target has every parameter in its dtype."""
    import bitsandbytes as bnb

    t = _save_model(tmp_path, "target", WORDS)
    m = load_model(str(t), compression=compression, device="cpu")
    assert m.speckv_compression == compression
    body = [mod for name, mod in m.named_modules() if isinstance(mod, torch.nn.Linear) and name != "lm_head"]
    assert body, "no linear layers found"
    float_dtype = torch.bfloat16 if compression == "bf16" else torch.float32
    if compression == "int8":
        assert all(type(x) is bnb.nn.Linear8bitLt and x.weight.dtype == torch.int8 for x in body)
    elif compression == "nf4":
        assert all(type(x) is bnb.nn.Linear4bit for x in body)
        assert all(x.weight.dtype == torch.uint8 and x.weight.quant_type == "nf4" for x in body)
    else:
        assert all(type(x) is torch.nn.Linear for x in body)
        assert {p.dtype for p in m.parameters()} == {float_dtype}
    assert type(m.lm_head) is torch.nn.Linear and m.lm_head.weight.dtype == float_dtype


def test_int8_cast_warning_is_logged_once(tmp_path, caplog, monkeypatch):
    # bitsandbytes warns on every int8 matmul with fp32 inputs (the CPU path); a recording
    # would print tens of thousands of identical lines. The first one still shows.
    from speckv_env.models import _OncePerMessage

    # the filter lets each message through once per process: start from a fresh one, so that an
    # int8 forward of an earlier test cannot have used up this test's one warning
    log = logging.getLogger("bitsandbytes.autograd._functions")
    for f in [f for f in log.filters if isinstance(f, _OncePerMessage)]:
        monkeypatch.setattr(f, "seen", set())
    t = _save_model(tmp_path, "target", WORDS)
    m = load_model(str(t), compression="int8", device="cpu")
    ids = torch.tensor([[1, 2, 3]])
    with caplog.at_level(logging.WARNING, logger="bitsandbytes"):
        for _ in range(5):
            m(ids)
    casts = [r for r in caplog.records if "will be cast" in r.getMessage()]
    assert len(casts) == 1


def test_load_pair_is_exact_by_default_and_plans_only_on_the_fast_path(tmp_path, monkeypatch):
    from speckv_env import cpu_linear, invariant
    from speckv_env.pair import load_pair

    monkeypatch.setenv("SPECKV_CACHE", str(tmp_path / "cache"))
    t = _save_model(tmp_path, "target", WORDS)
    d = _save_model(tmp_path, "draft", WORDS, seed=1)
    exact = load_pair(str(t), str(d), device="cpu")
    assert exact.exact and not exact.cpu_kernels
    assert invariant.is_row_invariant(exact.target) and invariant.is_row_invariant(exact.draft)
    assert exact.kernels.startswith("row-invariant:") and not cpu_linear.current_plans(exact.target)
    # exact=False: the row-count plans unless SPECKV_CPU_LINEAR=0; the argument wins over the variable
    pair = load_pair(str(t), str(d), device="cpu", exact=False)
    assert not pair.exact and not invariant.is_row_invariant(pair.target)
    assert pair.cpu_kernels and cpu_linear.current_plans(pair.target) and cpu_linear.current_plans(pair.draft)
    assert pair.kernels == "cpu-row-plans"
    monkeypatch.setenv("SPECKV_CPU_LINEAR", "0")
    stock = load_pair(str(t), str(d), device="cpu", exact=False)
    assert not stock.cpu_kernels and not cpu_linear.current_plans(stock.target) and stock.kernels == "stock"
    assert load_pair(str(t), str(d), device="cpu", exact=False, cpu_kernels=True).cpu_kernels
