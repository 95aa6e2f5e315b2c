"""Tiny random Llama models for tests (nothing downloaded)."""

from __future__ import annotations

import copy

import torch


def make_tiny_llama(vocab: int = 64, hidden: int = 64, layers: int = 2, seed: int = 0, eos: int = 3, std: float = 0.3):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        eos_token_id=eos,
        bos_token_id=1,
        pad_token_id=0,
        tie_word_embeddings=False,
        initializer_range=std,
    )
    return LlamaForCausalLM(cfg).eval()


def make_tiny_pair(vocab: int = 64, noise: float = 0.05, seed: int = 0, hidden: int = 64):
    """A random target and a draft that is a noisy copy of it (so acceptance is partial)."""
    target = make_tiny_llama(vocab=vocab, hidden=hidden, seed=seed)
    draft = copy.deepcopy(target)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in draft.parameters():
            p.add_(noise * torch.randn(p.shape, generator=g) * p.std())
    return target, draft


def make_tiny_lookup_draft(target, weights=(0.3, 0.5, 0.6, 0.7), noise: float = 0.3, seed: int = 5):
    """A :class:`~speckv_env.draft.SpecKVDraftForCausalLM` (full head) from a noisy copy of
    ``target``'s weights, with context lookup ``weights`` (empty: lookup off)."""
    from speckv_env.draft import SpecKVDraftForCausalLM

    cfg = copy.deepcopy(target.config)
    cfg.speckv_draft = {"head_size": cfg.vocab_size, "lookup_weights": list(weights)}
    draft = SpecKVDraftForCausalLM(cfg)
    sd = dict(target.state_dict())
    draft.load_state_dict(sd, strict=False)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in draft.parameters():
            p.add_(noise * torch.randn(p.shape, generator=g) * p.std())
    return draft.eval()


def make_word_tokenizer(words):
    """A word-level fast tokenizer over ``words`` (one id per word, in order); saveable."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(words)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="</s>", pad_token="<pad>")


def make_tiny_smol_pair():
    """A tiny random target/draft pair over the real SmolLM2 tokenizer (vocabulary 49152), as a
    :class:`~speckv_env.pair.ModelPair`: live env tests without loading the embedded models."""
    from speckv_env.models import load_tokenizer
    from speckv_env.pair import ModelPair

    tok = load_tokenizer(None)
    target, draft = make_tiny_pair(vocab=49152, hidden=32, noise=0.03, seed=4)
    for m in (target, draft):
        m.config.eos_token_id = tok.eos_token_id
        m.generation_config.eos_token_id = tok.eos_token_id
    return ModelPair(target, draft, tok, "tiny-target", "tiny-draft", "fp32", torch.device("cpu"))


def make_tiny_mistral(window: int, seed: int = 0):
    """A tiny random Mistral with a sliding attention window of ``window`` tokens."""
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(seed)
    cfg = MistralConfig(
        vocab_size=64,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        sliding_window=window,
        eos_token_id=3,
        tie_word_embeddings=False,
        initializer_range=0.3,
    )
    return MistralForCausalLM(cfg).eval()
