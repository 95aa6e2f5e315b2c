"""SpecKV gym: speculative decoding as a Gymnasium environment; gamma is the action.

Importing this package registers ``SpecKV-v0`` (live decoding) and ``SpecKVReplay-v0``
(replay of recorded traces). It does not import torch: replay works without models.
"""

__version__ = "0.1.0"

import gymnasium

gymnasium.register(id="SpecKV-v0", entry_point="speckv_env.env:SpecKVEnv")
gymnasium.register(
    id="SpecKVReplay-v0",
    entry_point="replay.env:SpecKVReplayEnv",
    vector_entry_point="replay.vector:SpecKVReplayVectorEnv",
)
