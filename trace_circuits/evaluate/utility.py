"""Utility kept on benign inputs: next-token KL to the undefended model and CE change, measured as generation sees it.

    KL = mean over continuation tokens of KL(p_plain(. | context, continuation[:t]) || p_defended(. | ...))

over the predictions generation samples from: the undefended answers given the benign prompts, and the second half of
held-out benign documents given their first half. The context runs as a prefill and the continuation on its KV cache,
exactly as in generation, so a gate that decides at the end of the prompt acts as deployed. Sequences where a prompt
gate stays shut are exactly the plain model (KL 0), so only the sequences it opens on are run under the hook set.
A defense without a gate whose operations all sit at layer ``L`` or above reuses the plain run's keys / values below
``L`` and its residual entering ``L`` (:func:`plain_logprobs` with ``record``), as
:mod:`~trace_circuits.shared_generation` does for answers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from tqdm.auto import tqdm

from trace_circuits.errors import TraceCircuitsError
from trace_circuits.prompts import encode_padded
from trace_circuits.shared_generation import can_share, first_layer, lower_layers_from, new_cache, residuals_entering


@dataclass
class PlainBatch:
    """One batch of the plain run: its continuation log-probs and, per pass (context, continuation), the keys /
    values of the layers below the deepest recorded layer and the residual entering each recorded layer."""

    logprobs: torch.Tensor
    kv: tuple = ()  # (context pass, continuation pass): [(keys, values) per layer]
    resid: tuple = ()  # (context pass, continuation pass): {layer: residual entering it}


def continuation_logprobs(model, ctx_ids, ctx_mask, cont_ids, cont_mask, *, record: Sequence[int] = (),
                          reuse: Optional[tuple[int, PlainBatch]] = None):
    """Log-probs of the next-token predictions for each continuation token, as generation computes them: the context
    is one forward pass (the prefill), the continuation a second one on its KV cache. [B, T_cont, vocab]
    ``record`` (layers): return a :class:`PlainBatch` holding the lower-layer state too. ``reuse=(L, plain)``: take
    layers ``< L`` of both passes from ``plain`` (exact when nothing attached acts below ``L``)."""
    pos_c = (ctx_mask.cumsum(-1) - 1).clamp(min=0)
    full_mask = torch.cat([ctx_mask, cont_mask], 1)
    pos_n = (full_mask.cumsum(-1) - 1).clamp(min=0)[:, ctx_ids.shape[1]:]
    cache, wanted = new_cache(model), sorted({l for l in record if l > 0})
    passes = ((ctx_ids, ctx_mask, pos_c), (cont_ids, full_mask, pos_n))
    if reuse is not None:
        L, plain = reuse
        out = []
        for p, (_, mask, pos) in enumerate(passes):
            with lower_layers_from(model, plain.kv[p], plain.resid[p][L], L):
                out.append(model(inputs_embeds=plain.resid[p][L], attention_mask=mask, position_ids=pos, cache=cache,
                                 use_cache=True))
    else:
        with residuals_entering(model, wanted) as seen:
            out = [model(ids, attention_mask=mask, position_ids=pos, cache=cache, use_cache=True)
                   for ids, mask, pos in passes]
    logprobs = torch.cat([out[0].logits[:, -1:], out[1].logits[:, :-1]], 1).float().log_softmax(-1)
    if not wanted:
        return PlainBatch(logprobs) if record else logprobs
    n_ctx, layers = ctx_ids.shape[1], cache.layers[:max(wanted)]
    if any(l.keys.shape[-2] != n_ctx + cont_ids.shape[1] for l in layers):  # a sliding-window cache dropped some
        return PlainBatch(logprobs)
    kv = tuple([(l.keys[..., a:b, :], l.values[..., a:b, :]) for l in layers]
               for a, b in ((0, n_ctx), (n_ctx, None)))
    return PlainBatch(logprobs, kv, tuple({l: v[p] for l, v in seen.items()} for p in (0, 1)))


def _batches(tokenizer, contexts, continuations, batch_size: int, device):
    for s in range(0, len(contexts), batch_size):
        yield (*encode_padded(tokenizer, contexts[s:s + batch_size], "left", device),
               *encode_padded(tokenizer, continuations[s:s + batch_size], "right", device))


@torch.inference_mode()
def plain_logprobs(model, tokenizer, contexts: Sequence[str], continuations: Sequence[str], batch_size: int = 16,
                   record: Sequence[int] = ()) -> list:
    """The undefended model's continuation log-probs per batch (computed once, shared by every defense's KL); with
    ``record`` (layers) each batch is a :class:`PlainBatch` that defenses starting at those layers reuse."""
    device = next(model.parameters()).device
    return [continuation_logprobs(model, *b, record=record)
            for b in _batches(tokenizer, contexts, continuations, batch_size, device)]


@torch.inference_mode()
def next_token_kl(model, tokenizer, contexts: Sequence[str], continuations: Sequence[str], hookset,
                  batch_size: int = 16, progress: bool = False, desc: str = "KL", plain: Optional[list] = None,
                  only: Optional[Sequence[bool]] = None) -> dict:
    """Mean per-token KL(p_plain || p_defended) and CE of both over each continuation given its context (module
    docstring). ``plain`` reuses :func:`plain_logprobs` of the same texts and batch size (and, where it recorded the
    hook set's first layer, its lower layers). ``only`` (per sequence): run the hook set only where True; elsewhere
    the defended model is known to equal the plain one (a shut gate)."""
    if len(contexts) != len(continuations):
        raise TraceCircuitsError("next_token_kl needs one continuation per context")
    device = next(model.parameters()).device
    kl_sum, ce_plain, ce_hook, n_tok = 0.0, 0.0, 0.0, 0
    batches = _batches(tokenizer, contexts, continuations, batch_size, device)
    total = math.ceil(len(contexts) / batch_size)
    start = first_layer(hookset) if can_share(hookset) and only is None else 0
    for i, (ctx_ids, ctx_mask, cont_ids, cont_mask) in enumerate(tqdm(batches, total=total, desc=desc,
                                                                      disable=not progress)):
        given = plain[i] if plain is not None else None
        p = given.logprobs if isinstance(given, PlainBatch) else given
        if p is None:
            p = continuation_logprobs(model, ctx_ids, ctx_mask, cont_ids, cont_mask)
        reuse = (start, given) if isinstance(given, PlainBatch) and given.resid and start in given.resid[0] else None
        rows = list(range(i * batch_size, i * batch_size + ctx_ids.shape[0]))
        run = torch.tensor([True] * len(rows) if only is None else [bool(only[r]) for r in rows], device=device)
        if reuse is not None:  # no gate (only is None): every row runs, from the plain lower layers
            with hookset.attach(model):
                q = continuation_logprobs(model, ctx_ids, ctx_mask, cont_ids, cont_mask, reuse=reuse)
        else:
            q = p.clone()
            if run.any():
                with hookset.attach(model):
                    q[run] = continuation_logprobs(model, ctx_ids[run], ctx_mask[run], cont_ids[run], cont_mask[run])
        real = cont_mask.bool()
        kl = (p.exp() * (p - q)).sum(-1)
        kl_sum += float(kl[real].sum())
        n_tok += int(real.sum())
        ce_plain += float(-p.gather(-1, cont_ids[..., None])[..., 0][real].sum())
        ce_hook += float(-q.gather(-1, cont_ids[..., None])[..., 0][real].sum())
    n = max(1, n_tok)
    return {"kl_per_token": kl_sum / n, "ce_plain": ce_plain / n, "ce_defended": ce_hook / n,
            "ce_change": (ce_hook - ce_plain) / n, "tokens": n_tok}


def split_text(tokenizer, texts: Sequence[str]) -> tuple[list[str], list[str]]:
    """Each text cut at its middle token into a context and a continuation (for :func:`next_token_kl`)."""
    ctx, cont = [], []
    for t in texts:
        ids = tokenizer(t, add_special_tokens=False)["input_ids"]
        h = len(ids) // 2
        ctx.append(tokenizer.decode(ids[:h]))
        cont.append(tokenizer.decode(ids[h:]))
    return ctx, cont
