"""Loading a draft/target pair: models, shared tokenizer check, the embedded default pair."""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import torch

from .models import (
    DEFAULT_TARGET_NAME,
    ModelLoadError,
    check_compression,
    check_tokenizers_match,
    load_model,
    load_tokenizer,
    resolve_device,
)

DEFAULT_DRAFT_NAME = "speckv-draft-smollm2"


@dataclass
class ModelPair:
    """A target, a draft and their (shared) tokenizer."""

    target: Any
    draft: Any
    tokenizer: Any
    target_name: str
    draft_name: str
    compression: str
    device: torch.device
    #: float32 linear layers use row-count plans (:mod:`speckv_env.cpu_linear`; only with exact=False)
    cpu_kernels: bool = False
    #: both models compute row-invariant forwards (:mod:`speckv_env.invariant`): the emitted
    #: sequence does not depend on the gammas chosen
    exact: bool = False

    @property
    def kernels(self) -> str:
        """Which products the pair computes with (recorded in traces, cost models and benches)."""
        from . import invariant

        if self.exact:
            return invariant.kernel_name(self.target)
        return "cpu-row-plans" if self.cpu_kernels else "stock"

    @property
    def name(self) -> str:
        return f"{self.target_name}|{self.draft_name}"

    @cached_property
    def draft_fingerprint(self) -> str:
        """Short hash of the draft's config and weights (see :func:`model_fingerprint`)."""
        return model_fingerprint(self.draft)

    @property
    def eos_token_id(self) -> list[int]:
        eos = getattr(self.target.generation_config, "eos_token_id", None)
        if eos is None:
            eos = self.tokenizer.eos_token_id
        return [eos] if isinstance(eos, int) else list(eos or [])

    def encode_chat(self, text: str) -> list[int]:
        """Token ids of ``text`` as a user turn in the target's chat template (generation prompt added)."""
        from .prompts import format_prompt

        return self.tokenizer(format_prompt(self.tokenizer, text), add_special_tokens=False)["input_ids"]


def model_fingerprint(model) -> str:
    """12 hex digits identifying a model's config and weights, independent of device and dtype
    (float16 weights loaded as float32 hash the same) and of metadata that saving adds
    (``architectures``). Traces store their draft's fingerprint:
    a trace answers exactly only for the draft that recorded it."""
    import hashlib
    import json

    cfg = {
        k: v
        for k, v in model.config.to_dict().items()
        if k not in ("_name_or_path", "dtype", "torch_dtype", "transformers_version", "_commit_hash", "architectures")
    }
    h = hashlib.sha256(json.dumps(cfg, sort_keys=True, default=str).encode())
    with torch.no_grad():
        for name, t in sorted(model.state_dict().items()):
            x = t.detach().to("cpu", torch.float64)
            h.update(f"{name}{tuple(x.shape)}{float(x.sum()):.9g}{float(x.abs().sum()):.9g}".encode())
    return h.hexdigest()[:12]


def _default_draft(device: torch.device):
    try:
        from .draft import load_default_draft
    except ImportError as e:  # pragma: no cover - the shipped draft module is part of the package
        raise ModelLoadError(f"the shipped draft could not be imported: {e}") from e
    return load_default_draft(device=device)


def load_pair(
    target: str | os.PathLike | None = None,
    draft: str | os.PathLike | None = None,
    *,
    compression: str = "fp32",
    device: str | torch.device | None = "auto",
    trust_remote_code: bool = False,
    draft_dtype: torch.dtype | None = None,
    cpu_kernels: bool | None = None,
    retime_cpu_plans: bool = False,
    exact: bool = True,
) -> ModelPair:
    """Load a draft/target pair, checking that they share a vocabulary.

    ``target=None`` is the embedded SmolLM2-135M-Instruct; ``draft=None`` is the draft shipped
    for it (only valid with the default target). ``compression`` applies to the target only;
    the draft runs uncompressed (fp32 on CPU, fp16 on GPU unless ``draft_dtype``).

    ``exact`` (default): both models compute row-invariant forwards (:mod:`speckv_env.invariant`),
    so a position's logits do not depend on how many tokens share its forward and the emitted
    sequence does not depend on the gammas chosen, for every compression. ``exact=False`` is the
    faster-where-it-differs path for users who need speed and not exact replay: stock kernels,
    plus on CPU ``cpu_kernels``, row-count plans for the float32 linear layers
    (:mod:`speckv_env.cpu_linear`; timed once per host, a few seconds, then cached; default on
    unless ``SPECKV_CPU_LINEAR=0``). ``retime_cpu_plans`` times the plans again instead of reading
    the cache (``speckv calibrate`` does: it runs on a quiet machine).
    """
    comp = check_compression(compression)
    dev = resolve_device(device)
    default_target = target is None or str(target) == "default"
    if draft is None and not default_target:
        raise ModelLoadError(
            "a draft model is required with a non-default target: pass draft= (hub id, folder or .gguf); "
            "the shipped draft only fits the embedded SmolLM2-135M-Instruct target"
        )
    tgt_tok = load_tokenizer(None if default_target else target, trust_remote_code=trust_remote_code, role="target")
    tgt = load_model(
        None if default_target else target,
        compression=comp,
        device=dev,
        trust_remote_code=trust_remote_code,
        role="target",
    )
    if draft is None or str(draft) == "default":
        if not default_target:
            raise ModelLoadError("draft='default' only fits the embedded default target")
        drf = _default_draft(dev)
        drf_name = DEFAULT_DRAFT_NAME
    else:
        drf_tok = load_tokenizer(draft, trust_remote_code=trust_remote_code, role="draft")
        check_tokenizers_match(drf_tok, tgt_tok, str(draft), str(target or DEFAULT_TARGET_NAME))
        dd = draft_dtype or (torch.float16 if dev.type == "cuda" else torch.float32)
        drf = load_model(
            draft,
            compression={torch.float16: "fp16", torch.bfloat16: "bf16"}.get(dd, "fp32"),
            device=dev,
            trust_remote_code=trust_remote_code,
            role="draft",
        )
        drf_name = str(draft)
    t_vocab = tgt.get_output_embeddings().weight.shape[0] if tgt.get_output_embeddings() is not None else None
    d_vocab = drf.config.vocab_size
    if t_vocab is not None and d_vocab != tgt.config.vocab_size:
        raise ModelLoadError(
            f"draft vocabulary size {d_vocab} differs from the target's {tgt.config.vocab_size}: "
            "their logits cannot be compared"
        )
    if exact:
        from . import invariant

        invariant.make_row_invariant(tgt)
        invariant.make_row_invariant(drf)
        cpu_kernels = False
    elif cpu_kernels is None:
        cpu_kernels = os.environ.get("SPECKV_CPU_LINEAR", "1") != "0"
    planned = False
    if cpu_kernels and dev.type == "cpu":
        from . import cpu_linear

        planned = (
            cpu_linear.install(tgt, refresh=retime_cpu_plans) + cpu_linear.install(drf, refresh=retime_cpu_plans)
        ) > 0
    return ModelPair(
        target=tgt,
        draft=drf,
        tokenizer=tgt_tok,
        target_name=DEFAULT_TARGET_NAME if default_target else str(target),
        draft_name=drf_name,
        compression=comp,
        device=dev,
        cpu_kernels=planned,
        exact=exact,
    )
