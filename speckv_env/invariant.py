"""Row-invariant forwards: a position's logits do not depend on how many positions share the forward.

Why. Speculative decoding computes the target's distribution at a position in forwards of
different sizes: one row at gamma 0, g + 1 rows in a verification of g drafted tokens, and the
draft's distribution in a 1- or 2-row catch-up forward. Matrix kernels pick their blocking,
vector width and summation order by shape (MKL's gemv for one row, a small-M gemm for a few,
bitsandbytes' 4-bit gemv for one row and dequantise-then-matmul for more), so the same position
gets logits that differ in the last bits with the row count. At a near-tie the argmax (or a
sample's inverse-CDF bucket) flips, and the emitted sequence depends on the gammas chosen:
measured on the real default pair, 3 of 8 bf16, 6 of 8 int8 and 1 of 8 nf4 greedy outputs
changed between gamma 0 and gamma 8 (fp32 happened to show none).

How. :func:`make_row_invariant` changes two things in a model, so that the computation of one
row is the same sequence of floating-point operations whatever else shares the forward:

* every linear layer (``nn.Linear`` in any dtype and device, and bitsandbytes' ``Linear8bitLt``
  and ``Linear4bit``) computes its rows in blocks of exactly :data:`WIDTH` rows, the last block
  padded by repeating its last row: one fixed-shape product per block, so one kernel, one
  blocking and one summation order for every row. A product's row depends only on its own
  input row (no kernel here mixes rows: bitsandbytes' int8 quantises row-wise; LLM.int8's
  outlier decomposition, which picks columns from all rows, is off, see ``models.py``);
* attention runs one query row at a time, each against exactly the keys it may see (its own
  prefix), with the query heads packed by key/value head as Hugging Face does for a one-token
  step; a one-token step makes the identical call. Masks are not used: batch size 1, no padding
  (the engine's case). Batches larger than one fall back to PyTorch's SDPA with the model's mask.

Everything else in a decoder (embedding look-up, RMSNorm over the hidden dimension, rotary
embeddings, activations, residual sums, the engine's per-row softmax and argmax) is elementwise
or reduces within one row with a fixed length, so it is row-invariant already. The result is
tested bitwise: logits at a position from forwards of 1..WIDTH rows are identical, for fp32,
bf16, fp16, int8 and nf4 targets on the real default pair (``tests/test_invariance.py``).

Prefill (more than :data:`WIDTH` rows in one forward) also goes through fixed-width blocks for
the linear layers, and through one masked SDPA call for attention: a prompt's rows are always
computed in the same forward, so their values do not depend on gamma either way.

Cost: a one-token step pays for a :data:`WIDTH`-row product. On CPU, float32 products are
written ``W @ x.T`` (the weight as the tall left operand), which streams the weights at the
speed of memory for a few columns (see ``cpu_linear.py``), so a 16-column block costs about
what MKL's one-row gemv costs. ``speckv bench engine`` measures the exact path against the
row-count plans (``exact=False``).

The changed modules keep working after ``copy.deepcopy`` and ``pickle`` (the change is a class
swap to a subclass defined here, reading its own weights), and :func:`undo` restores them.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import contextmanager
from typing import Any, cast

import torch
from torch import nn

#: rows per block of every linear layer; a verification of g drafted tokens needs g + 1 <= WIDTH
#: rows in one block (larger ones are split into blocks, still invariant, just slower)
WIDTH = 16
#: name under which the attention function is registered with transformers
ATTENTION = "speckv_row_invariant"
_ORIG_ATTN = "_speckv_orig_attn_implementation"


def _blocks(x2: torch.Tensor, width: int) -> list[torch.Tensor]:
    """``x2`` ([n, in]) as blocks of exactly ``width`` rows, the last padded with copies of its last row."""
    n = x2.shape[0]
    out = []
    for s in range(0, n, width):
        b = x2[s : s + width]
        if b.shape[0] < width:
            b = torch.cat([b, b[-1:].expand(width - b.shape[0], -1)])
        out.append(b.contiguous())
    return out


def _fixed_width_rows(x: torch.Tensor, width: int, fn) -> torch.Tensor:
    """Apply ``fn`` (a row-wise map [width, in] -> [width, out]) to every row of ``x`` in fixed-width blocks."""
    n = x.numel() // x.shape[-1] if x.shape[-1] else 0
    if n == 0:
        return fn(x.reshape(0, x.shape[-1])).reshape(*x.shape[:-1], -1)
    ys = [fn(b) for b in _blocks(x.reshape(n, x.shape[-1]), width)]
    y = ys[0] if len(ys) == 1 else torch.cat(ys)
    return y[:n].reshape(*x.shape[:-1], y.shape[-1])


class RowInvariantLinear(nn.Linear):
    """``nn.Linear`` computed in fixed-width row blocks (see the module docstring)."""

    speckv_width = WIDTH

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w, b = self.weight, self.bias
        if torch.is_grad_enabled() and (x.requires_grad or w.requires_grad):
            return nn.functional.linear(x, w, b)  # training: autograd's path (no invariance needed)
        if w.device.type == "cpu" and w.dtype == torch.float32 and x.dtype == torch.float32:
            from . import rowdot

            if rowdot.available():
                return rowdot.linear(x, w, b)

            def fn(xb: torch.Tensor) -> torch.Tensor:
                # W @ x.T, operands and result row-major (MKL picks a slower kernel for views)
                y = (w @ xb.t()).t().contiguous()
                return y if b is None else y + b

        else:

            def fn(xb: torch.Tensor) -> torch.Tensor:
                return nn.functional.linear(xb, w, b)

        return _fixed_width_rows(x, self.speckv_width, fn)


_BNB_CLASSES: dict[type, type] = {}


def _bnb_invariant_class(base: type) -> type:
    """A subclass of a bitsandbytes linear class whose forward runs fixed-width row blocks."""
    cls = _BNB_CLASSES.get(base)
    if cls is None:

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return _fixed_width_rows(x, self.speckv_width, lambda xb: cast(Any, base).forward(self, xb))

        cls = type(f"RowInvariant{base.__name__}", (base,), {"forward": forward, "speckv_width": WIDTH})
        cls.__module__ = __name__
        globals()[cls.__name__] = cls  # importable by name, so pickling finds it
        _BNB_CLASSES[base] = cls
    return cls


def _bnb_linear_types() -> tuple[type, ...]:
    try:
        import bitsandbytes as bnb
    except Exception:  # bitsandbytes missing or unusable: no such layers can exist
        return ()
    return (bnb.nn.Linear8bitLt, bnb.nn.Linear4bit)


def _packed_query(q: torch.Tensor, n_rep: int) -> torch.Tensor:
    """One query row [b, heads, 1, d] -> [b, kv_heads, n_rep, d] (Hugging Face's ``pack_gqa``)."""
    b, h, _, d = q.shape
    return q.reshape(b, h // n_rep, n_rep, d) if n_rep > 1 else q


_ROW_PADS: list[int] | None = None
"""Set by :func:`padded_rows`: left padding of each batch row (one query row each)."""


@contextmanager
def padded_rows(pads: Sequence[int]):
    """Within this context, a batched one-token forward attends each batch row ``r`` to its keys
    ``pads[r]:`` only (its own prefix, left-padded into a common cache): the very call a
    one-sequence, one-token step makes, so each row's result is bit-identical to it. Used by
    the traces' rollouts (:mod:`speckv_env.rollout`) to run many positions in one forward."""
    global _ROW_PADS
    prev, _ROW_PADS = _ROW_PADS, [int(p) for p in pads]
    try:
        yield
    finally:
        _ROW_PADS = prev


def _padded_rows_attention(query, key, value, n_rep: int, scaling) -> torch.Tensor:
    """One query row per batch row, each against its own unpadded keys ([b, q=1, heads, d] out)."""
    assert _ROW_PADS is not None
    h = query.shape[1]
    outs = []
    for r, pad in enumerate(_ROW_PADS):
        o = nn.functional.scaled_dot_product_attention(
            _packed_query(query[r : r + 1, :, 0:1], n_rep),
            key[r : r + 1, :, pad:].contiguous(),
            value[r : r + 1, :, pad:].contiguous(),
            scale=scaling,
        )
        outs.append(o.reshape(1, h, 1, value.shape[-1]))
    return torch.cat(outs, dim=0).transpose(1, 2).contiguous()


def row_invariant_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """Attention with each query row computed alone against its own prefix (transformers' interface).

    ``query`` is [b, heads, q, d]; ``key``/``value`` [b, kv_heads, kv, d] hold the cache and the
    new rows, so query row i sits at position kv - q + i and sees keys 0 .. kv - q + i. Returns
    [b, q, heads, d] like transformers' SDPA function.
    """
    b, h, q_len, d = query.shape
    kv_len = key.shape[2]
    n_rep = getattr(module, "num_key_value_groups", 1)
    window = kwargs.get("sliding_window")
    if window is not None and kv_len >= window:
        # a sliding-window cache keeps only the window, so key index != position from here on
        raise RuntimeError(
            f"row-invariant attention supports sliding-window models only within their window "
            f"({window} tokens; this forward sees {kv_len}): load the pair with exact=False for longer contexts"
        )
    if _ROW_PADS is not None and q_len == 1 and b == len(_ROW_PADS):
        return _padded_rows_attention(query, key, value, n_rep, scaling), None
    if b != 1 or q_len > WIDTH:
        return _masked_sdpa(module, query, key, value, attention_mask, dropout, scaling)
    outs = []
    for i in range(q_len):
        end = kv_len - q_len + i + 1
        o = nn.functional.scaled_dot_product_attention(
            _packed_query(query[:, :, i : i + 1], n_rep), key[:, :, :end], value[:, :, :end], scale=scaling
        )
        outs.append(o.reshape(b, h, 1, value.shape[-1]))
    out = outs[0] if q_len == 1 else torch.cat(outs, dim=2)
    return out.transpose(1, 2).contiguous(), None


def _masked_sdpa(module, query, key, value, attention_mask, dropout, scaling) -> tuple[torch.Tensor, None]:
    """Causal SDPA for many rows (prefill) or batches: bottom-right aligned, with the model's mask if any."""
    q_len, kv_len = query.shape[2], key.shape[2]
    n_rep = getattr(module, "num_key_value_groups", 1)
    if n_rep > 1:
        key = key.repeat_interleave(n_rep, dim=1)
        value = value.repeat_interleave(n_rep, dim=1)
    mask = attention_mask
    if mask is None and q_len > 1:
        mask = torch.ones(q_len, kv_len, dtype=torch.bool, device=query.device).tril(kv_len - q_len)
    elif mask is not None and mask.dtype != torch.bool:
        mask = mask[:, :, :, :kv_len]
    out = nn.functional.scaled_dot_product_attention(
        query, key, value, attn_mask=mask, dropout_p=dropout, scale=scaling
    )
    return out.transpose(1, 2).contiguous(), None


def _register_attention() -> None:
    from transformers import AttentionInterface

    if ATTENTION not in AttentionInterface._global_mapping:
        AttentionInterface.register(ATTENTION, row_invariant_attention)


def make_row_invariant(model: nn.Module) -> int:
    """Make ``model``'s forwards row-invariant (in place); returns the number of linear layers changed.

    Idempotent. Undo with :func:`undo`. Linear layers must not be replaced afterwards (a
    replaced layer computes with its own kernels again): call this after loading and quantising.
    """
    from . import cpu_linear

    cpu_linear.uninstall(model)  # row-count plans choose kernels by row count: the opposite of this
    _register_attention()
    bnb_types = _bnb_linear_types()
    n = 0
    for m in model.modules():
        if isinstance(m, RowInvariantLinear) or type(m) in _BNB_CLASSES.values():
            n += 1
        elif type(m) is nn.Linear:
            cast(Any, m).__class__ = RowInvariantLinear
            n += 1
        elif type(m) in bnb_types:
            cast(Any, m).__class__ = _bnb_invariant_class(type(m))
            n += 1
    cfg = getattr(model, "config", None)
    if cfg is not None and getattr(cfg, "_attn_implementation", None) != ATTENTION:
        setattr(model, _ORIG_ATTN, cfg._attn_implementation)
        _set_attention(model, ATTENTION)
    return n


def _set_attention(model: nn.Module, name: str) -> None:
    # every sub-config (and sub-model) reads its own _attn_implementation
    for m in model.modules():
        cfg = getattr(m, "config", None)
        if cfg is not None and hasattr(cfg, "_attn_implementation"):
            cfg._attn_implementation = name


def undo(model: nn.Module) -> None:
    """Restore the stock linear classes and attention that :func:`make_row_invariant` replaced."""
    inv = {v: k for k, v in _BNB_CLASSES.items()}
    for m in model.modules():
        if type(m) is RowInvariantLinear:
            cast(Any, m).__class__ = nn.Linear
        elif type(m) in inv:
            cast(Any, m).__class__ = inv[type(m)]
    orig = getattr(model, _ORIG_ATTN, None)
    if orig is not None:
        _set_attention(model, orig)
        delattr(model, _ORIG_ATTN)


def is_row_invariant(model: nn.Module) -> bool:
    """True when every linear layer of ``model`` and its attention are the row-invariant forms."""
    cfg = getattr(model, "config", None)
    if cfg is None or getattr(cfg, "_attn_implementation", None) != ATTENTION:
        return False
    plain = (nn.Linear, *_bnb_linear_types())
    return not any(type(m) in plain for m in model.modules())


def kernel_name(model: nn.Module) -> str:
    """What computes ``model``'s row-invariant products here, e.g. ``row-invariant:rowdot-c`` (CPU
    float32 with the compiled kernel) or ``row-invariant:fixed-width-16``; ``stock`` if not invariant.

    Two hosts or two kernels round differently, so traces and cost models record this name."""
    if not is_row_invariant(model):
        return "stock"
    from . import rowdot

    p = next(model.parameters(), None)
    cpu_fp32 = p is not None and p.device.type == "cpu" and p.dtype == torch.float32
    quantised = any(type(m) in _BNB_CLASSES.values() for m in model.modules())
    if cpu_fp32 and rowdot.available():
        return "row-invariant:rowdot-c" + (f"+fixed-width-{WIDTH}" if quantised else "")
    return f"row-invariant:fixed-width-{WIDTH}"
