"""Reading the model's residual stream at one position per prompt, and the difference-of-means direction built from
it (the readout, the refusal and harm directions, the prompt gate all read here)."""

from __future__ import annotations

import dataclasses
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
    q = pooled_positions(x, valid, last, massive_norm_threshold, start if pool == "turn" else None)
    n = q.sum(1, keepdim=True)
    mean = (x.float() * q[..., None]).sum(1) / n.clamp_min(1)
    return torch.where(n > 0, mean, at_last)


def pooled_positions(x: Float[torch.Tensor, "batch pos d"], valid: torch.Tensor, last: torch.Tensor,
                     massive_norm_threshold: Optional[float] = None,
                     start: Optional[torch.Tensor] = None) -> torch.Tensor:
    """[batch, pos] bool: the positions a ``mean`` reader averages, ``q`` valid with ``max(first valid, start_b) < q
    <= last_b`` and ``|x[b, q]| <= massive_norm_threshold`` (``start`` None: the first valid position only)."""
    T = x.shape[1]
    pos = torch.arange(T, device=x.device)
    first = torch.where(valid, pos, torch.full_like(pos, T)).min(1).values
    if start is not None:
        first = torch.maximum(first, start.to(first.device))
    q = valid & (pos > first[:, None]) & (pos <= last.to(x.device)[:, None])
    if massive_norm_threshold is not None:
        q = q & (x.float().norm(dim=-1) <= massive_norm_threshold)
    return q


MESSAGE_READINGS = ("span", "prefix", "sentence")  # how the gate reads the user's message (message_span_max)
SENTENCE_MARKS = ".?!:\n"  # a token whose text holds one of these ends a sentence (the ``sentence`` reading)


def sentence_boundary_ids(tokenizer) -> list[int]:
    """The vocabulary ids whose text holds a sentence mark (:data:`SENTENCE_MARKS`): where the ``sentence`` reading
    lets a stretch of the message end, and the next one start."""
    n = len(tokenizer)
    texts = tokenizer.batch_decode([[i] for i in range(n)])
    return [i for i, t in enumerate(texts) if any(c in t for c in SENTENCE_MARKS)]


def message_span_max(x: Float[torch.Tensor, "batch pos d"], q: torch.Tensor, V: Float[torch.Tensor, "d k"],
                     min_tokens: int = 1, reading: str = "span",
                     boundary: Optional[torch.Tensor] = None) -> Float[torch.Tensor, "batch k"]:
    """The highest projection of a mean over a stretch of ``Q`` (``q``, [batch, pos] bool): ``reading="span"``:
    ``max_{a < t} <mean_{q' in Q, a < q' <= t} x[q'], V>`` over ``t in Q`` and spans holding at least ``min_tokens``
    positions of ``Q``; ``reading="prefix"``: the same with ``a`` before ``Q`` (running means only);
    ``reading="sentence"``: whole sentences only, ``a`` before ``Q`` or at a ``boundary`` token ([batch, pos] bool,
    e.g. ids in :func:`sentence_boundary_ids`) and ``t`` at one or at the last position of ``Q``, at least
    ``min(min_tokens, |Q|)`` positions (a handful of candidates per message, so a benign message's best one reaches
    less high than its best of all spans); -inf where there is none. With cumulative sums ``P, C`` of the
    projections and counts it is ``(P[t] - P[a]) / (C[t] - C[a])``, [batch, pos + 1, pos] per column of ``V``. Tokens
    appended after ``Q`` cannot lower the ``span``/``prefix`` readings (causal attention leaves ``x[q']`` for ``q' <=
    t`` as it was, and every earlier span stays a candidate), nor the ``sentence`` reading when ``Q`` ends a
    sentence."""
    if reading not in MESSAGE_READINGS:
        raise TraceCircuitsError(f"message reading {reading!r} is not one of {', '.join(MESSAGE_READINGS)}")
    proj = (x.float() @ V.float().to(x.device)) * q[..., None]  # [B, T, k]
    P = torch.cat([torch.zeros_like(proj[:, :1]), proj.cumsum(1)], 1)  # [B, T+1, k]: P[t+1] sums to t
    C = torch.cat([q.new_zeros(q.shape[0], 1, dtype=torch.long), q.long().cumsum(1)], 1)  # [B, T+1]
    Pa, Ca = (P[:, :1], C[:, :1]) if reading == "prefix" else (P, C)  # span starts a (prefix: the start only)
    n = C[:, None, 1:] - Ca[:, :, None]  # [B, a, t]: positions of Q in (a, t]
    if reading == "sentence":
        b = torch.zeros_like(q) if boundary is None else boundary.to(q.device).bool()
        total = C[:, -1:]
        ends = q & (b | (C[:, 1:] == total))  # [B, t]: a sentence mark, or the last position of Q
        starts = torch.cat([torch.ones_like(q[:, :1]), b], 1) | (C == 0)  # [B, a]: after a mark, or before Q
        need = torch.clamp(total, max=max(1, int(min_tokens)))[:, :, None]  # short messages: whole
        ok = ends[:, None, :] & starts[:, :, None] & (n >= need)
    else:
        ok = q[:, None, :] & (n >= max(1, int(min_tokens)))
    mean = (P[:, None, 1:] - Pa[:, :, None]) / n.clamp_min(1)[..., None]  # [B, a, t, k]
    return torch.where(ok[..., None], mean, torch.full_like(mean, -math.inf)).flatten(1, 2).max(1).values


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


MIN_SHARED_PREFIX = 8  # tokens: shorter common prefixes are recomputed per prompt


def shared_prefix_groups(encoded: EncodedPrompts, labels: Optional[Sequence] = None) -> list[tuple[int, list[int]]]:
    """``[(P, indices)]``: the prompts of one label (default: all one label) and the length ``P`` of the token prefix
    they all share, kept below each one's length (0 when under :data:`MIN_SHARED_PREFIX` tokens or a lone prompt)."""
    if labels is not None and len(labels) != len(encoded):
        raise TraceCircuitsError(f"{len(labels)} prefix labels for {len(encoded)} prompts; give one label per prompt")
    groups: dict = {}
    for i in range(len(encoded)):
        groups.setdefault(None if labels is None else labels[i], []).append(i)
    out = []
    for idx in groups.values():
        seqs = [encoded.input_ids[i] for i in idx]
        p, limit = 0, min(len(q) for q in seqs) - 1
        while p < limit and all(q[p] == seqs[0][p] for q in seqs):
            p += 1
        out.append((p if p >= MIN_SHARED_PREFIX and len(idx) > 1 else 0, idx))
    return out


@torch.no_grad()
def frozen_prefix_cache(model, prefix: Sequence[int] | torch.Tensor, stop_at_layer: Optional[int] = None,
                        names: Sequence[str] = ()):
    """One token prefix run once: its frozen TransformerLens key/value cache (one row; :func:`expand_cache` for a
    batch) and ``{name: activation}`` of the hook points ``names``."""
    from transformer_lens.cache.key_value_cache import TransformerLensKeyValueCache

    device = next(model.parameters()).device
    ids = torch.as_tensor(prefix, device=device).reshape(1, -1)
    kv = TransformerLensKeyValueCache.init_cache(model.cfg, device, 1)
    _, cache = model.run_with_cache(ids, attention_mask=torch.ones_like(ids), names_filter=list(names),
                                    stop_at_layer=stop_at_layer, past_kv_cache=kv)
    kv.freeze()
    return kv, {n: cache[n] for n in names}


def expand_cache(kv, batch: int):
    """A frozen copy of a one-row key/value cache for ``batch`` rows (views, no copy)."""
    from transformer_lens.cache.key_value_cache import TransformerLensKeyValueCache
    from transformer_lens.cache.key_value_cache_entry import TransformerLensKeyValueCacheEntry

    entries = [TransformerLensKeyValueCacheEntry(past_keys=e.past_keys.expand(batch, -1, -1, -1),
                                                 past_values=e.past_values.expand(batch, -1, -1, -1), frozen=True)
               for e in kv.entries]
    return TransformerLensKeyValueCache(entries=entries, previous_attention_mask=kv.previous_attention_mask.expand(
        batch, -1), frozen=True)


@torch.inference_mode()
def residuals_at_layers(model, encoded: EncodedPrompts, layers: Sequence[int],
                        positions: Optional[Sequence[int]] = None, batch_size: int = 16, progress: bool = False,
                        desc: str = "residuals", pool: str = "last", massive_norm_thresholds: Optional[dict] = None,
                        starts: Optional[Sequence[int]] = None,
                        prefix_labels: Optional[Sequence] = None,
                        share_prefix: bool = True, reader=None) -> dict[int, Float[torch.Tensor, "n d_model"]]:
    """:func:`residuals_at` at several layers from one forward pass (stopped after the deepest), ``{layer: [n,
    d_model]}``; ``massive_norm_thresholds`` maps a layer to its limit (absent or None: no limit). The token prefix
    that the prompts of one ``prefix_labels`` label (default: all prompts) share is run once and its keys and values
    reused (:func:`shared_prefix_groups`; ``share_prefix=False``: every prompt whole): the same residuals as a forward
    pass per prompt, up to float rounding. ``reader(x, valid, last, start, layer, ids) -> [rows, k]`` replaces
    :func:`read_at` (``last``/``start``: the read position and turn start per row, as columns of ``x``; ``ids``: the
    token ids at those columns)."""
    device = next(model.parameters()).device
    layers = sorted({int(l) for l in layers})
    limits = massive_norm_thresholds or {}
    names = {f"blocks.{l}.hook_resid_post": l for l in layers}
    stop = layers[-1] + 1
    out: dict = {}
    plan = shared_prefix_groups(encoded, prefix_labels) if share_prefix else [(0, list(range(len(encoded))))]
    bar = tqdm(total=sum(math.ceil(len(idx) / batch_size) for _, idx in plan), desc=desc, disable=not progress)
    for P, idx in plan:
        kv, head = frozen_prefix_cache(model, encoded.input_ids[idx[0]][:P], stop, names) if P else (None, {})
        tails = encoded.select(idx)
        tails = dataclasses.replace(tails, input_ids=[ids[P:] for ids in tails.input_ids])
        for b in iter_batches(tails, batch_size, device):
            rows = [idx[k] for k in b.indices]
            past = expand_cache(kv, len(rows)) if P else None
            ids = b.tokens if not P else torch.cat([torch.as_tensor(encoded.input_ids[idx[0]][:P], device=device)
                                                    .expand(len(rows), -1), b.tokens], 1)
            _, cache = model.run_with_cache(b.tokens, attention_mask=b.attention_mask, names_filter=list(names),
                                            stop_at_layer=stop, past_kv_cache=past)
            valid = torch.cat([torch.ones(len(rows), P, dtype=torch.bool, device=device), b.attention_mask.bool()], 1)
            cols, begin = [], []
            for i, pad in zip(rows, b.n_pad):  # token j of prompt i sits at column j (in the prefix), else j + pad
                n = len(encoded.input_ids[i])
                col = lambda j, pad=pad: j if j < P else j + pad  # noqa: E731
                p = -1 if positions is None else int(positions[i])
                cols.append(col(p % n))
                begin.append(-1 if starts is None or starts[i] < 0 else col(int(starts[i])))
            cols, begin = torch.tensor(cols, device=device), torch.tensor(begin, device=device)
            for name, l in names.items():
                x = cache[name] if not P else torch.cat([head[name].expand(len(rows), -1, -1), cache[name]], 1)
                got = read_at(x, valid, cols, pool, limits.get(l), begin) if reader is None else reader(
                    x, valid, cols, begin, l, ids)
                out.setdefault(l, torch.zeros(len(encoded), got.shape[1]))[rows] = got.float().cpu()
            bar.update()
    bar.close()
    return {l: out.get(l, torch.zeros(0, model.cfg.d_model)) for l in layers}


def mean_difference(a: Float[torch.Tensor, "n d"], b: Float[torch.Tensor, "m d"]) -> tuple[torch.Tensor, float]:
    """Difference-of-means direction and gap: ``u = unit(mean a - mean b)``, ``gap = mean_a <x, u> - mean_b <x, u>
    = ||mean a - mean b||`` (Arditi et al. 2024's refusal direction is this with a = refusals, b = compliances)."""
    diff = a.float().mean(0) - b.float().mean(0)
    norm = float(diff.norm())
    if norm == 0:
        raise TraceCircuitsError("the two sets give identical mean activations; use sets that differ")
    return diff / norm, norm
