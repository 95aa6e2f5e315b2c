"""A pre-allocated KV cache whose rollback moves a position (gpt-fast style), for the engine.

Each layer holds key and value buffers of a fixed capacity, allocated once (and reused by the
next sequence while it fits). A forward writes its new rows in place at the current position,
and a crop moves the position back: nothing is copied or freed on rejection.

Attention sees only the valid prefix. ``update`` returns *views* of the buffers up to the end of
the rows just written (``[:, :, :length]``), never the unused tail, and the mask sizes are the
dynamic cache's (valid length + query length). So every attention implementation receives keys
and values of exactly the shapes and values a :class:`transformers.DynamicCache` would give it:
stock SDPA and eager attention, and the row-invariant attention of :mod:`speckv_env.invariant`,
which takes the key length as the query's prefix and would otherwise attend to the tail. The
engine's tokens are therefore the dynamic path's, bit for bit (``tests/test_static_cache.py``).

What this is not (yet): a CUDA-graph cache. The views change shape with the position, so a
captured graph would need the whole buffer with a mask instead (as transformers'
``StaticCache``), which gives the attention kernels other shapes than the dynamic path, and
would give the row-invariant attention (which takes every key it is handed as the prefix) the
unused tail. Full-attention models only: a sliding-window layer keeps only its window in the
dynamic path, so its rows would differ.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, CacheLayerMixin, get_layer_types_and_kwargs


class PrefixStaticLayer(CacheLayerMixin):
    """One layer's static buffers; ``length`` (a host int) is the number of valid positions."""

    is_compileable = False  # keeps transformers' mask creation identical to the dynamic cache's
    is_croppable = True
    is_sliding = False

    def __init__(self, capacity: int) -> None:
        super().__init__()
        self.capacity = int(capacity)
        self.length = 0

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        b, h = key_states.shape[:2]
        dtype, device = key_states.dtype, key_states.device
        self.keys = torch.empty((b, h, self.capacity, key_states.shape[-1]), dtype=dtype, device=device)
        self.values = torch.empty((b, h, self.capacity, value_states.shape[-1]), dtype=dtype, device=device)
        self.is_initialized = True

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write the new rows at the position; return the valid prefix (views, no copy)."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        assert self.keys is not None and self.values is not None
        start, end = self.length, self.length + key_states.shape[-2]
        if end > self.capacity:
            raise RuntimeError(f"static KV cache overflow: {end} positions, capacity {self.capacity}")
        self.keys[:, :, start:end].copy_(key_states)
        self.values[:, :, start:end].copy_(value_states)
        self.length = end
        return self.keys[:, :, :end], self.values[:, :, :end]

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.length + query_length, 0

    def get_seq_length(self) -> int:
        return self.length

    def get_max_length(self) -> int:
        return self.capacity

    def crop(self, tokens_to_remove: int) -> None:
        """``tokens_to_remove`` < 0 removes that many from the end; >= 0 keeps that many (as
        transformers' dynamic layers). Only the position moves."""
        new = self.length + tokens_to_remove if tokens_to_remove < 0 else min(tokens_to_remove, self.length)
        self.length = max(new, 0)

    def reset(self) -> None:
        self.length = 0


def uses_full_attention_only(config) -> bool:
    """Whether every attention layer of ``config``'s decoder is full (no sliding window, chunks)."""
    types, _ = get_layer_types_and_kwargs(config.get_text_config(decoder=True))
    return all(t == "full_attention" for t in types)


class PrefixStaticCache(Cache):
    """A cache of :class:`PrefixStaticLayer`, one per decoder layer of ``config``."""

    def __init__(self, config, capacity: int) -> None:
        if not uses_full_attention_only(config):
            raise ValueError(
                "cache='static' supports full-attention models only (this model has sliding-window or "
                "chunked layers): use cache='dynamic'"
            )
        n = config.get_text_config(decoder=True).num_hidden_layers
        super().__init__(layers=[PrefixStaticLayer(capacity) for _ in range(n)])
        self.capacity = int(capacity)

    def restart(self, capacity: int) -> bool:
        """Empty the cache for a new sequence if its buffers hold ``capacity`` positions (the
        buffers are kept); False if they are too small (make a new cache)."""
        if capacity > self.capacity:
            return False
        for layer in self.layers:
            layer.reset()
        return True
