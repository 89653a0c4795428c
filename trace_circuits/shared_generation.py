"""Several defenses answering the same prompts, with the prompt's layers below every defense computed once.

A hook set whose operations all sit at layer ``L`` or above leaves layers ``0 .. L-1`` of the prompt exactly as in
the plain model, so per batch the plain prompt is run once (all but its last token) and each defense reuses its key /
value cache at layers ``< L`` and its residual entering layer ``L``::

    prefill_d(x) = layers_{L..N-1}^{d}( h_L(x) ),   cache_d[l] = cache_plain[l]  for l < L

then ``generate`` continues from that cache (the last prompt token and the new tokens run through every layer, with
the defense attached). For SmolLM2 (onset 21 of 30 layers) this skips 70% of each defense's prompt computation.
Only hook sets without a gate take this road (a gate decides on the prompt's tokens, which a reused residual does
not carry); others, and models whose cache is not a plain per-layer cache, are generated the ordinary way.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Optional, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from trace_circuits.names import parse_hook


def first_layer(hookset) -> int:
    """The lowest layer any of the hook set's operations reads or writes (0 for none or an embedding hook)."""
    layers = [parse_hook(op.hook_name)[1] for op in hookset.operations]
    return 0 if not layers or None in layers else min(layers)


def can_share(hookset) -> bool:
    """Whether ``hookset`` takes the shared road: no gate of either kind, and every operation above layer 0."""
    return hookset is None or (hookset.gate_operation is None and first_layer(hookset) > 0)


class _CachedLayer(nn.Module):
    """Stands in for decoder layer ``i < L`` during a defense's prefill: writes the plain run's keys and values into
    the cache and passes the residual on (the last one returns the plain residual entering layer ``L``)."""

    def __init__(self, layer_idx: int, keys, values, out: Optional[torch.Tensor]):
        super().__init__()
        self.layer_idx, self.keys, self.values, self.out = layer_idx, keys, values, out

    def forward(self, hidden_states, *args, cache=None, past_key_values=None, **kwargs):
        cache = cache if cache is not None else past_key_values
        if cache is not None:
            cache.update(self.keys, self.values, self.layer_idx)
        return self.out if self.out is not None else hidden_states


def new_cache(model):
    from transformers import DynamicCache

    return DynamicCache(config=model.config)


@contextmanager
def lower_layers_from(model, kv: Sequence, resid: torch.Tensor, start: int):
    """Within the block, decoder layers ``0 .. start-1`` of ``model`` stand in for the plain run: each writes the
    plain keys / values ``kv[l]`` into the cache, and the model's input (pass ``inputs_embeds=resid``) reaches layer
    ``start`` as ``resid``, the plain residual entering it."""
    from trace_circuits.architectures import decoder_layers

    layers = decoder_layers(model)
    saved = [layers[l] for l in range(start)]
    try:
        for l in range(start):
            layers[l] = _CachedLayer(l, *kv[l], resid if l == start - 1 else None)
        yield
    finally:
        for l, layer in enumerate(saved):
            layers[l] = layer


@contextmanager
def residuals_entering(model, wanted: Sequence[int]):
    """Within the block, every forward pass appends the residual entering decoder layer ``l`` (for ``l`` in
    ``wanted``) to the yielded ``{l: [tensor per pass]}``."""
    from trace_circuits.architectures import decoder_layers

    layers = decoder_layers(model)
    seen: dict[int, list] = {l: [] for l in wanted}
    hooks = [layers[l].register_forward_pre_hook(
        lambda m, a, kw, l=l: seen[l].append((a[0] if a else kw["hidden_states"]).clone()), with_kwargs=True)
        for l in wanted]
    try:
        yield seen
    finally:
        for h in hooks:
            h.remove()


@torch.inference_mode()
def generate_shared(model, tokenizer, texts: Sequence[str], hooksets: dict, max_new_tokens: int = 24,
                    batch_size: int = 32, first_token_ids: Optional[Sequence[int]] = None, progress: bool = True,
                    desc: str = "answers") -> dict[str, tuple[list[str], list[float]]]:
    """``{name: (responses, first-token log-odds)}`` for every hook set in ``hooksets`` (``None`` = no defense) on
    the same already-templated ``texts``, greedy; hook sets that :func:`can_share` reuse the plain prompt's lower
    layers (module docstring), the others are generated as :func:`~trace_circuits.generation.generate_batch` does."""
    from trace_circuits.prompts import encode_padded
    from trace_circuits.generation import generate_encoded

    device = next(model.parameters()).device
    starts = {name: first_layer(hs) if hs is not None and can_share(hs) else None for name, hs in hooksets.items()}
    wanted = sorted({s for s in starts.values() if s})
    out = {name: ([None] * len(texts), [None] * len(texts)) for name in hooksets}
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    bar = tqdm(total=len(texts) * len(hooksets), desc=desc, unit="answer", disable=not progress)
    for s in range(0, len(order), batch_size):
        idx = order[s:s + batch_size]
        ids, mask = encode_padded(tokenizer, [texts[i] for i in idx], "left", device)
        pos = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)  # as generate derives them
        head, head_mask, head_pos = ids[:, :-1], mask[:, :-1], pos[:, :-1]
        kv, resid = None, {}
        if wanted and ids.shape[1] > 1:  # the plain prompt but its last token, once: its cache and residuals
            plain_cache = new_cache(model)
            with residuals_entering(model, wanted) as seen:
                model(head, attention_mask=head_mask, position_ids=head_pos, cache=plain_cache, use_cache=True,
                      logits_to_keep=1)
            resid = {l: v[0] for l, v in seen.items()}
            if plain_cache.get_seq_length() == head.shape[1]:  # else a sliding-window cache that dropped positions
                kv = [(l.keys, l.values) for l in plain_cache.layers]
        for name, hs in hooksets.items():
            L, cache = starts[name], None
            if kv is not None and hs is None:
                cache = new_cache(model)
                for l, (k, v) in enumerate(kv):
                    cache.update(k, v, l)
            elif kv is not None and L:
                cache = new_cache(model)
                with lower_layers_from(model, kv, resid[L], L), hs.attach(model):
                    model(inputs_embeds=resid[L], attention_mask=head_mask, position_ids=head_pos, cache=cache,
                          use_cache=True, logits_to_keep=1)
            got = generate_encoded(model, tokenizer, ids, mask, max_new_tokens, hs, first_token_ids=first_token_ids,
                                   cache=cache)
            odds = got[2] if first_token_ids else [None] * len(idx)
            for i, r, o in zip(idx, got[0], odds):
                out[name][0][i], out[name][1][i] = r, o
            bar.update(len(idx))
    bar.close()
    return out
