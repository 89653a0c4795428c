"""Reading the model's residual stream at one position per prompt, and the difference-of-means direction built from
it (the readout, the refusal and harm directions, the prompt gate all read here)."""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
from jaxtyping import Float
from tqdm.auto import tqdm

from trace_circuits.errors import TraceCircuitsError
from trace_circuits.prompts import EncodedPrompts, iter_batches


def read_at(x: Float[torch.Tensor, "batch pos d"], valid: torch.Tensor, last: torch.Tensor, pool: str = "last",
            massive_norm_threshold: Optional[float] = None,
            start: Optional[torch.Tensor] = None) -> Float[torch.Tensor, "batch d"]:
    """What a reader (the prompt gate) sees of each row: ``pool="last"``: ``x[b, last_b]``; ``pool="mean"``: the
    mean of ``x[b, q]`` over ``Q_b = {q valid : first valid < q <= last_b, |x[b, q]| <= massive_norm_threshold}``
    (the first real token and attention sinks left out; ``x[b, last_b]`` where ``Q_b`` is empty); ``pool="turn"``:
    the same mean over the last user turn only, ``q > max(first valid, start_b)`` with ``start_b`` the last position
    of the header that opens that turn (-1 where none was found: then the whole prompt, as ``mean``)."""
    B, T = x.shape[:2]
    at_last = x[torch.arange(B, device=x.device), last].float()
    if pool == "last":
        return at_last
    pos = torch.arange(T, device=x.device)
    first = torch.where(valid, pos, torch.full_like(pos, T)).min(1).values
    if pool == "turn" and start is not None:
        first = torch.maximum(first, start.to(first.device))
    q = valid & (pos > first[:, None]) & (pos <= last[:, None])
    xf = x.float()
    if massive_norm_threshold is not None:
        q = q & (xf.norm(dim=-1) <= massive_norm_threshold)
    n = q.sum(1, keepdim=True)
    mean = (xf * q[..., None]).sum(1) / n.clamp_min(1)
    return torch.where(n > 0, mean, at_last)


@torch.inference_mode()
def residuals_at(model, encoded: EncodedPrompts, layer: Optional[int] = None, positions: Optional[Sequence[int]] = None,
                 batch_size: int = 16, progress: bool = False, desc: str = "residuals", pool: str = "last",
                 massive_norm_threshold: Optional[float] = None,
                 starts: Optional[Sequence[int]] = None) -> Float[torch.Tensor, "n d_model"]:
    """``blocks.{layer}.hook_resid_post`` of every prompt at one position: ``positions[i]`` (an index into prompt
    i's own tokens; negative counts from its end) or, by default, its last token. ``layer`` defaults to the last.
    ``pool="mean"``: the mean up to that position instead; ``pool="turn"``: the mean after ``starts[i]`` (an index
    into prompt i's tokens, -1 for none) up to it (:func:`read_at`)."""
    layer = model.cfg.n_layers - 1 if layer is None else int(layer)
    return residuals_at_layers(model, encoded, [layer], positions, batch_size, progress, desc, pool,
                               {layer: massive_norm_threshold}, starts)[layer]


@torch.inference_mode()
def residuals_at_layers(model, encoded: EncodedPrompts, layers: Sequence[int],
                        positions: Optional[Sequence[int]] = None, batch_size: int = 16, progress: bool = False,
                        desc: str = "residuals", pool: str = "last", massive_norm_thresholds: Optional[dict] = None,
                        starts: Optional[Sequence[int]] = None) -> dict[int, Float[torch.Tensor, "n d_model"]]:
    """:func:`residuals_at` at several layers from one forward pass (stopped after the deepest), ``{layer: [n,
    d_model]}``; ``massive_norm_thresholds`` maps a layer to its limit (absent or None: no limit)."""
    device = next(model.parameters()).device
    layers = sorted({int(l) for l in layers})
    limits = massive_norm_thresholds or {}
    names = {f"blocks.{l}.hook_resid_post": l for l in layers}
    out = {l: torch.zeros(len(encoded), model.cfg.d_model) for l in layers}
    n_batches = math.ceil(len(encoded) / batch_size)
    for b in tqdm(iter_batches(encoded, batch_size, device), total=n_batches, desc=desc, disable=not progress):
        _, cache = model.run_with_cache(b.tokens, attention_mask=b.attention_mask, names_filter=list(names),
                                        stop_at_layer=layers[-1] + 1)
        width = b.tokens.shape[1]
        cols, begin = [], []
        for r, i in enumerate(b.indices):
            n = len(encoded.input_ids[i])
            p = -1 if positions is None else int(positions[i])
            cols.append(width - n + (p % n))
            begin.append(-1 if starts is None or starts[i] < 0 else width - n + int(starts[i]))
        cols, begin = torch.tensor(cols, device=device), torch.tensor(begin, device=device)
        for name, l in names.items():
            out[l][b.indices] = read_at(cache[name], b.attention_mask.bool(), cols, pool, limits.get(l), begin).cpu()
    return out


def mean_difference(a: Float[torch.Tensor, "n d"], b: Float[torch.Tensor, "m d"]) -> tuple[torch.Tensor, float]:
    """Difference-of-means direction and gap: ``u = unit(mean a - mean b)``, ``gap = mean_a <x, u> - mean_b <x, u>
    = ||mean a - mean b||`` (Arditi et al. 2024's refusal direction is this with a = refusals, b = compliances)."""
    diff = a.float().mean(0) - b.float().mean(0)
    norm = float(diff.norm())
    if norm == 0:
        raise TraceCircuitsError("the two sets give identical mean activations; use sets that differ")
    return diff / norm, norm
