"""SpecKV gym: speculative decoding as a Gymnasium environment; gamma is the action.

Importing this package registers ``SpecKV-v0`` (live decoding) and ``SpecKVReplay-v0``
(replay of recorded traces). It does not import torch: replay works without models.
"""

__version__ = "0.1.0"
