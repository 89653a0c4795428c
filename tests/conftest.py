"""Shared fixtures: tiny random HookedTransformers for fast tests, the real default model for slow ones."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def tiny_model(positional: str = "rotary", normalization: str = "RMS", n_layers: int = 4, seed: int = 0):
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    torch.manual_seed(seed)
    cfg = HookedTransformerConfig(
        n_layers=n_layers, d_model=32, n_heads=4, d_head=8, d_mlp=64, d_vocab=40, n_ctx=64, act_fn="gelu",
        normalization_type=normalization, positional_embedding_type=positional,
        rotary_dim=8 if positional == "rotary" else None, default_prepend_bos=False, seed=seed,
        init_weights=True, device="cpu")
    model = HookedTransformer(cfg)
    model.eval()
    return model


@pytest.fixture(scope="session")
def real_model():
    """The default model (SmolLM2-135M-Instruct), loaded once per test session."""
    from trace_circuits import load_model

    return load_model(device="cpu", progress=False)


# the naive reference implementations live with the benchmarks
import sys as _sys  # noqa: E402
from pathlib import Path as _Path  # noqa: E402

_sys.path.insert(0, str(_Path(__file__).resolve().parent.parent / "benchmarks"))
