"""Segment-attention profiles a_i[l, h, s] of stage 1 (definition in :mod:`trace_circuits.divergence`), collected
from the pattern hooks in batches, with a resumable checkpoint."""

from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from jaxtyping import Float
from tqdm.auto import tqdm

from trace_circuits._io import atomic_path
from trace_circuits.errors import TraceCircuitsError
from trace_circuits.prompts import EncodedPrompts, iter_batches

#: bump when the profile definition changes (checkpoints of another version are not resumed)
PROFILE_VERSION = 1
#: profiles of the fixed reference and control sets computed in this process (``memo=True``; never with hooks
#: attached), by model object and (model, prompts, settings) key: a notebook scanning several file pairs against the
#: same reference pairs and form control scans those once
_MEMO: dict = {}
_MEMO_MAX = 8


def segment_names(n_content_bins: int) -> list[str]:
    return ["sink", "prefix"] + [f"content_{i + 1}" for i in range(n_content_bins)] + ["suffix"]


def segment_ids(encoded: EncodedPrompts, indices: Sequence[int], width: int, n_content_bins: int) -> torch.Tensor:
    """Segment index of every key position of a left-padded batch; padding gets index S (dropped later)."""
    S = n_content_bins + 3
    seg = torch.full((len(indices), width), S, dtype=torch.long)
    for row, i in enumerate(indices):
        n = len(encoded.input_ids[i])
        start, end = encoded.content_spans[i]
        pos = torch.arange(n)
        s = torch.full((n,), S - 1, dtype=torch.long)  # suffix by default
        s[pos < start] = 1
        s[0] = 0
        inside = (pos >= start) & (pos < end)
        rel = (pos[inside] - start).float() / max(end - start, 1)
        s[inside] = 2 + torch.clamp((rel * n_content_bins).long(), max=n_content_bins - 1)
        seg[row, width - n :] = s
    return seg


def collect_attention_profiles(
    model,
    encoded: EncodedPrompts,
    batch_size: int = 16,
    n_content_bins: int = 8,
    query_positions: int = 1,
    progress: bool = True,
    desc: str = "attention scan",
    checkpoint: Optional[str | Path] = None,
    checkpoint_every: int = 4,
    memo: bool = False,
) -> Float[np.ndarray, "n_prompts n_layers n_heads n_segments"]:
    """Segment-attention profiles a_i[l, h, s] (see module docstring), from the pattern hooks only.

    With ``checkpoint`` (a ``.safetensors`` path) finished batches are saved every ``checkpoint_every`` batches
    and a rerun with the same model, prompts and settings resumes from there; the file is removed when done.
    """
    if query_positions < 1:
        raise TraceCircuitsError("query_positions must be at least 1")
    n_layers, n_heads = model.cfg.n_layers, model.cfg.n_heads
    S = n_content_bins + 3
    out = torch.zeros((len(encoded), n_layers, n_heads, S), dtype=torch.float32)
    device = next(model.parameters()).device
    current: dict = {}

    def make_hook(layer: int):
        def hook(pattern, hook):  # pattern: [batch, head, query, key]
            p = pattern[:, :, -query_positions:, :].float().mean(dim=2)
            seg = current["seg"]
            binned = torch.zeros((p.shape[0], p.shape[1], S + 1), dtype=p.dtype, device=p.device)
            binned.scatter_add_(2, seg[:, None, :].expand(-1, p.shape[1], -1), p)
            current["acc"][:, layer] = binned[:, :, :S].cpu()
            return None

        return hook

    memo_key = _checkpoint_key(model, encoded, n_content_bins, query_positions)
    hooked = any(getattr(hp, "fwd_hooks", None) for hp in getattr(model, "hook_dict", {}).values())
    memo = memo and not hooked
    if memo and (id(model), memo_key) in _MEMO:
        return _MEMO[(id(model), memo_key)].copy()
    hooks = [(f"blocks.{l}.attn.hook_pattern", make_hook(l)) for l in range(n_layers)]
    n_batches = (len(encoded) + batch_size - 1) // batch_size
    done = torch.zeros(len(encoded), dtype=torch.bool)
    key = None
    if checkpoint is not None:
        checkpoint = Path(checkpoint)
        key = memo_key
        resumed = _read_checkpoint(checkpoint, key, out.shape)
        if resumed is not None:
            out, done = resumed
    since_save = 0
    with torch.inference_mode():
        bar = tqdm(iter_batches(encoded, batch_size, device), total=n_batches, desc=desc, disable=not progress)
        for batch in bar:
            if bool(done[batch.indices].all()):
                continue
            if min(len(encoded.input_ids[i]) for i in batch.indices) < query_positions:
                raise TraceCircuitsError(f"a prompt is shorter than query_positions={query_positions}")
            current["seg"] = segment_ids(encoded, batch.indices, batch.tokens.shape[1], n_content_bins).to(device)
            current["acc"] = torch.zeros((len(batch.indices), n_layers, n_heads, S))
            model.run_with_hooks(batch.tokens, attention_mask=batch.attention_mask, return_type=None, fwd_hooks=hooks)
            out[batch.indices] = current["acc"]
            done[batch.indices] = True
            since_save += 1
            if checkpoint is not None and since_save >= checkpoint_every:
                _write_checkpoint(checkpoint, key, out, done)
                since_save = 0
    if checkpoint is not None and checkpoint.exists():
        checkpoint.unlink()
    if memo:
        if len(_MEMO) >= _MEMO_MAX:
            _MEMO.pop(next(iter(_MEMO)))
        _MEMO[(id(model), memo_key)] = out.numpy().copy()
    return out.numpy()


def _checkpoint_key(model, encoded: EncodedPrompts, n_content_bins: int, query_positions: int) -> str:
    from trace_circuits.models import model_fingerprint

    h = hashlib.sha256(json.dumps([model_fingerprint(model), encoded.input_ids, encoded.content_spans,
                                   n_content_bins, query_positions, PROFILE_VERSION]).encode())
    return h.hexdigest()


def _write_checkpoint(path: Path, key: str, out: torch.Tensor, done: torch.Tensor) -> None:
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        save_file({"profiles": out.contiguous(), "done": done.to(torch.uint8)}, str(tmp), metadata={"key": key})


def _read_checkpoint(path: Path, key: str, shape) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
    if not path.exists():
        return None
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            if (f.metadata() or {}).get("key") != key:
                warnings.warn(f"{path} was written for other prompts or settings; starting over", stacklevel=3)
                return None
            out, done = f.get_tensor("profiles"), f.get_tensor("done").bool()
    except Exception as err:  # a torn or foreign file: never trust it, never crash on it
        warnings.warn(f"ignoring unreadable checkpoint {path} ({type(err).__name__}); starting over", stacklevel=3)
        return None
    if tuple(out.shape) != tuple(shape):
        return None
    return out, done
