"""SpecKV gym: speculative decoding as a Gymnasium environment; gamma is the action.

Importing this package registers ``SpecKV-v0`` (live decoding) and ``SpecKVReplay-v0``
(replay of recorded traces). It does not import torch: replay works without models.
"""

__version__ = "0.1.0"

import gymnasium

# nondeterministic=True because each step's info carries wall-clock measurements (draft and
# verify seconds), which differ between runs; observations, rewards (modelled time) and the
# emitted tokens are reproducible for a given seed and action sequence on CPU (tested).
gymnasium.register(id="SpecKV-v0", entry_point="speckv_env.env:SpecKVEnv", nondeterministic=True)
gymnasium.register(
    id="SpecKVReplay-v0",
    entry_point="replay.env:SpecKVReplayEnv",
    vector_entry_point="replay.vector:SpecKVReplayVectorEnv",
)
