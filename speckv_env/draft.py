"""The shipped SpecKV draft model for the embedded default target (SmolLM2-135M-Instruct).

Architecture (:class:`SpecKVDraftForCausalLM`, a :class:`~transformers.LlamaForCausalLM`):

* the target's hidden size (576) and attention shape (9 heads, 3 kv heads), so its body layers can
  be initialised from the target's own layers (which ones is recorded in the config);
* input embedding = the target's embedding matrix, frozen and *not shipped*: it is read at load
  time from the target's safetensors file (only that tensor);
* an output head restricted to the K most frequent tokens of the target's generations
  (``head_ids``, a buffer saved with the weights): a ``Linear(hidden, K)``. ``forward`` still returns
  logits over the full vocabulary, with every token outside the head set to ``finfo(dtype).min``
  (finite, so softmax and entropy stay finite), so the draft is a drop-in Hugging Face causal LM
  for this project's engine and for ``target.generate(..., assistant_model=draft)``.

The target verifies every drafted token, so speculative decoding with this draft stays lossless.

Public API: :func:`load_default_draft`, :func:`load_draft`, :func:`build_draft_from_target`,
:func:`save_draft`, :func:`default_draft_path`.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.modeling_outputs import CausalLMOutputWithPast

from .lookup import ContextLookup
from .models import ModelLoadError

DRAFT_FORMAT = "speckv-draft-v1"
WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
EMBED_KEY = "model.embed_tokens.weight"
HEAD_IDS_KEY = "head_ids"
SPECIAL_IDS = (0, 1, 2)


class DraftLoadError(ModelLoadError):
    """The draft's shipped files are missing or malformed; the message names the file."""


def default_draft_path() -> Path:
    """Folder of the draft shipped inside the package (``speckv_env/assets/draft``)."""
    return Path(str(resources.files("speckv_env").joinpath("assets").joinpath("draft")))


class SpecKVDraftForCausalLM(LlamaForCausalLM):
    """A small Llama whose head covers only ``config.speckv_draft['head_size']`` tokens.

    ``forward`` returns full-vocabulary logits (non-head tokens at ``finfo(dtype).min``);
    :meth:`forward_head` returns the head logits ``[..., K]`` (what training uses).
    """

    _tied_weights_keys = None  # type: ignore[assignment]  # no tied weights; transformers types it as a dict
    _keys_to_ignore_on_load_missing = [EMBED_KEY]

    head_ids: torch.Tensor  # a buffer (registered in __init__)

    def __init__(self, config: LlamaConfig):
        config.tie_word_embeddings = False
        meta = getattr(config, "speckv_draft", None) or {}
        k = int(meta.get("head_size", config.vocab_size))
        super().__init__(config)
        self.lm_head = nn.Linear(config.hidden_size, k, bias=False)
        self.register_buffer("head_ids", torch.arange(k, dtype=torch.long), persistent=True)
        self.model.embed_tokens.weight.requires_grad_(False)

    # -- heads ----------------------------------------------------------------------------
    @property
    def head_size(self) -> int:
        return int(self.head_ids.numel())

    def expand_logits(self, small: torch.Tensor) -> torch.Tensor:
        """Scatter head logits ``[..., K]`` into full-vocabulary logits ``[..., V]``."""
        full = small.new_full((*small.shape[:-1], self.config.vocab_size), torch.finfo(small.dtype).min)
        full.index_copy_(-1, self.head_ids, small)
        return full

    def forward_head(self, *args, **kwargs) -> CausalLMOutputWithPast:
        """Like ``forward`` but the logits are over the head tokens only (``[..., K]``)."""
        kwargs.pop("labels", None)
        return super().forward(*args, **kwargs)

    # -- context lookup -----------------------------------------------------------------------
    @property
    def lookup(self) -> ContextLookup | None:
        """The context n-gram lookup mixed into :meth:`forward`'s distribution (None: pure neural)."""
        w = (getattr(self.config, "speckv_draft", None) or {}).get("lookup_weights")
        if not w:
            return None
        lk = getattr(self, "_lookup", None)
        if lk is None or lk.weights != [float(x) for x in w]:
            lk = self._lookup = ContextLookup(w)
        return lk

    def _context_rows(self, input_ids: torch.Tensor, cache) -> np.ndarray:
        """Token ids of the whole context per row (cached prefix + ``input_ids``).

        The prefix is kept on the cache object itself and cut to the cache's length on every
        call, so a cache cropped after a rejection (this project's engine, HF assisted
        generation) keeps the history in step. Prefix tokens the draft never saw are -1.
        """
        new = input_ids.detach().cpu().numpy().astype(np.int64)
        if cache is None:
            return new
        past = int(cache.get_seq_length())
        hist = getattr(cache, "_speckv_ids", None)
        if hist is None or hist.shape[0] != new.shape[0]:
            hist = np.full((new.shape[0], 0), -1, dtype=np.int64)
        hist = hist[:, :past]
        if hist.shape[1] < past:
            hist = np.concatenate([np.full((new.shape[0], past - hist.shape[1]), -1, dtype=np.int64), hist], axis=1)
        rows = np.concatenate([hist, new], axis=1)
        cache._speckv_ids = rows
        return rows

    def forward(self, *args, labels: torch.LongTensor | None = None, **kwargs) -> CausalLMOutputWithPast:
        lk = self.lookup
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        rows: np.ndarray | None = None
        if lk is not None and input_ids is not None:
            cache = kwargs.get("cache", kwargs.get("past_key_values"))
            rows = self._context_rows(input_ids, cache)
        out = super().forward(*args, **kwargs)
        out.logits = self.expand_logits(out.logits)
        if lk is not None and rows is not None:
            keep = out.logits.shape[1]
            pos = range(rows.shape[1] - keep, rows.shape[1])
            mixed = []
            for b in range(rows.shape[0]):
                props, ns = lk.proposals(rows[b], pos)
                mixed.append(lk.mix(out.logits[b], props, ns))
            out.logits = torch.stack(mixed)
        if labels is not None:
            shift = out.logits[..., :-1, :].float()
            tgt = labels[..., 1:].to(shift.device)
            out.loss = nn.functional.cross_entropy(
                shift.reshape(-1, shift.shape[-1]), tgt.reshape(-1), ignore_index=-100
            )
        return out

    # -- parameters -------------------------------------------------------------------------
    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """Everything but the (frozen, not shipped) input embedding."""
        return {k: v for k, v in self.state_dict().items() if k != EMBED_KEY}


# --------------------------------------------------------------------------------------------
# Building, saving, loading


def _llama_config(target_cfg: dict[str, Any], n_layers: int, meta: dict[str, Any]) -> LlamaConfig:
    keep = (
        "hidden_size",
        "intermediate_size",
        "num_attention_heads",
        "num_key_value_heads",
        "head_dim",
        "hidden_act",
        "max_position_embeddings",
        "rms_norm_eps",
        "rope_parameters",
        "rope_theta",
        "rope_scaling",
        "attention_bias",
        "mlp_bias",
        "vocab_size",
        "bos_token_id",
        "eos_token_id",
        "pad_token_id",
        "attention_dropout",
    )
    kw = {k: target_cfg[k] for k in keep if k in target_cfg and target_cfg[k] is not None}
    cfg = LlamaConfig(**kw, num_hidden_layers=n_layers, tie_word_embeddings=False, use_cache=True)
    cfg.speckv_draft = dict(meta)
    cfg.architectures = ["LlamaForCausalLM"]
    return cfg


def _read_embedding(target_path: str | Path, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    from safetensors import safe_open

    f = Path(target_path) / WEIGHTS_NAME
    if not f.exists():
        raise DraftLoadError(f"the draft needs the target's embedding from {f}, which does not exist")
    with safe_open(str(f), framework="pt") as st:
        names = set(st.keys())  # a safetensors handle has keys() but no `in`
        key = EMBED_KEY if EMBED_KEY in names else "lm_head.weight"
        if key not in names:
            raise DraftLoadError(f"{f} has no {EMBED_KEY} tensor to take the draft's input embedding from")
        return st.get_tensor(key).to(dtype)


def build_draft_from_target(
    target_path: str | Path,
    layers: Sequence[int],
    head_ids: Sequence[int] | torch.Tensor,
    target_name: str = "SmolLM2-135M-Instruct",
) -> SpecKVDraftForCausalLM:
    """A fresh draft (fp32) whose body copies the target's ``layers`` and final norm, whose head rows
    are the target's (tied) embedding rows of ``head_ids`` and whose input embedding is the target's."""
    from safetensors import safe_open

    target_path = Path(target_path)
    tcfg = json.loads((target_path / CONFIG_NAME).read_text())
    head = torch.as_tensor(list(head_ids) if not torch.is_tensor(head_ids) else head_ids, dtype=torch.long)
    missing = [i for i in SPECIAL_IDS if i not in set(head.tolist())]
    if missing:
        head = torch.cat([torch.tensor(missing, dtype=torch.long), head])
    layers = [int(i) for i in layers]
    meta = {
        "format": DRAFT_FORMAT,
        "init_layers": layers,
        "head_size": int(head.numel()),
        "target": {
            "name": target_name,
            "vocab_size": tcfg["vocab_size"],
            "hidden_size": tcfg["hidden_size"],
            "num_hidden_layers": tcfg["num_hidden_layers"],
        },
    }
    cfg = _llama_config(tcfg, len(layers), meta)
    model = SpecKVDraftForCausalLM(cfg)
    sd = {}
    with safe_open(str(target_path / WEIGHTS_NAME), framework="pt") as st:
        keys = set(st.keys())
        for j, i in enumerate(layers):
            pre = f"model.layers.{i}."
            for k in keys:
                if k.startswith(pre):
                    sd[f"model.layers.{j}." + k[len(pre) :]] = st.get_tensor(k).float()
        sd["model.norm.weight"] = st.get_tensor("model.norm.weight").float()
        emb = st.get_tensor(EMBED_KEY if EMBED_KEY in keys else "lm_head.weight").float()
        out_w = st.get_tensor("lm_head.weight").float() if "lm_head.weight" in keys else emb
    sd[EMBED_KEY] = emb
    sd["lm_head.weight"] = out_w[head].clone()
    sd["head_ids"] = head
    missing_keys, unexpected = model.load_state_dict(sd, strict=False)
    bad = [k for k in missing_keys if "rotary" not in k]
    if bad or unexpected:
        raise DraftLoadError(f"building the draft from {target_path}: missing {bad}, unexpected {list(unexpected)}")
    model.model.embed_tokens.weight.requires_grad_(False)
    return model


def save_draft(
    model: SpecKVDraftForCausalLM,
    folder: str | Path,
    dtype: torch.dtype = torch.float16,
    extra_config: dict[str, Any] | None = None,
) -> Path:
    """Write ``model.safetensors`` (float weights as ``dtype``, head ids int32, no embedding) and
    ``config.json`` (the Llama config plus the draft's metadata) into ``folder``."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for k, v in model.trainable_state_dict().items():
        if k == HEAD_IDS_KEY:
            tensors[k] = v.detach().to(torch.int32).contiguous().cpu()
        elif "rotary" in k:
            continue
        else:
            tensors[k] = v.detach().to(dtype).contiguous().cpu()
    meta = dict(model.config.speckv_draft)
    meta["weights_dtype"] = str(dtype).replace("torch.", "")
    if extra_config:
        meta.update(extra_config)
    cfg = model.config.to_dict()
    cfg.pop("speckv_draft", None)
    for k in ("dtype", "torch_dtype", "transformers_version", "_name_or_path"):
        cfg.pop(k, None)
    tmp = folder / (WEIGHTS_NAME + ".tmp")
    save_file(tensors, str(tmp), metadata={"format": "pt", "speckv": DRAFT_FORMAT})
    tmp.replace(folder / WEIGHTS_NAME)
    (folder / CONFIG_NAME).write_text(json.dumps({"speckv_draft": meta, "llama_config": cfg}, indent=1) + "\n")
    return folder / WEIGHTS_NAME


def load_draft(
    folder: str | Path,
    target_path: str | Path | None = None,
    device: str | torch.device = "auto",
    dtype: torch.dtype | None = None,
) -> SpecKVDraftForCausalLM:
    """Load a draft saved by :func:`save_draft`; the input embedding comes from ``target_path``
    (default: the embedded default target)."""
    from safetensors import SafetensorError, safe_open

    from .models import default_target_path, resolve_device

    folder = Path(folder)
    cfg_file, w_file = folder / CONFIG_NAME, folder / WEIGHTS_NAME
    for f in (cfg_file, w_file):
        if not f.exists():
            raise DraftLoadError(f"draft file {f} is missing (train one with experiments/train_draft.py)")
    try:
        raw = json.loads(cfg_file.read_text())
        meta, lcfg = raw["speckv_draft"], raw["llama_config"]
        if meta.get("format") != DRAFT_FORMAT:
            raise KeyError(f"format {meta.get('format')!r} is not {DRAFT_FORMAT!r}")
        lcfg = dict(lcfg)
        lcfg.pop("speckv_draft", None)
        cfg = LlamaConfig(**lcfg)
        cfg.speckv_draft = meta
        cfg.tie_word_embeddings = False
    except (ValueError, KeyError, TypeError) as e:
        raise DraftLoadError(f"draft config {cfg_file} is malformed: {e}") from None
    try:
        with safe_open(str(w_file), framework="pt") as st:
            sd = {k: st.get_tensor(k) for k in st.keys()}  # noqa: SIM118 (a safetensors handle is not a dict)
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise DraftLoadError(f"draft weights {w_file} are malformed: {e}") from None
    dev = resolve_device(device)
    if dtype is None:
        dtype = torch.float16 if dev.type == "cuda" else torch.float32
    model = SpecKVDraftForCausalLM(cfg)
    if target_path is None:
        target_path = default_target_path()
    emb = _read_embedding(target_path)
    if tuple(emb.shape) != (cfg.vocab_size, cfg.hidden_size):
        raise DraftLoadError(
            f"target embedding in {target_path} has shape {tuple(emb.shape)}, the draft in {folder} "
            f"expects {(cfg.vocab_size, cfg.hidden_size)}"
        )
    sd = {k: (v.long() if k == HEAD_IDS_KEY else v.float()) for k, v in sd.items()}
    sd[EMBED_KEY] = emb
    if HEAD_IDS_KEY not in sd or sd[HEAD_IDS_KEY].numel() != model.head_size:
        raise DraftLoadError(f"draft weights {w_file} lack a {HEAD_IDS_KEY!r} tensor of {model.head_size} ids")
    try:
        missing, unexpected = model.load_state_dict(sd, strict=False)
    except RuntimeError as e:
        raise DraftLoadError(f"draft weights {w_file} do not match {cfg_file}: {e}") from None
    missing = [k for k in missing if "rotary" not in k]
    if missing or unexpected:
        raise DraftLoadError(
            f"draft weights {w_file} do not match {cfg_file}: missing {missing}, unexpected {unexpected}"
        )
    model.model.embed_tokens.weight.requires_grad_(False)
    model.to(device=dev, dtype=dtype)  # type: ignore[call-arg]  # transformers wraps to() in a decorator mypy misreads
    model.eval()
    return model


def load_default_draft(device: str | torch.device = "auto", dtype: torch.dtype | None = None) -> SpecKVDraftForCausalLM:
    """The draft shipped in ``speckv_env/assets/draft`` for the embedded default target."""
    return load_draft(default_draft_path(), None, device=device, dtype=dtype)


__all__ = [
    "SpecKVDraftForCausalLM",
    "DraftLoadError",
    "build_draft_from_target",
    "save_draft",
    "load_draft",
    "load_default_draft",
    "default_draft_path",
]
