"""Utility kept on benign inputs: next-token KL to the undefended model and CE change, measured as generation sees it.

    KL = mean over continuation tokens of KL(p_plain(. | context, continuation[:t]) || p_defended(. | ...))

over the predictions generation samples from: the undefended answers given the benign prompts, and the second half of
held-out benign documents given their first half. The context runs as a prefill and the continuation on its KV cache,
exactly as in generation, so a gate that decides at the end of the prompt acts as deployed. Sequences where a prompt
gate stays shut are exactly the plain model (KL 0), so only the sequences it opens on are run under the hook set.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
from tqdm.auto import tqdm

from trace_circuits.errors import TraceCircuitsError
from trace_circuits.prompts import pad_id_of, pad_sequences


def encode_padded(tokenizer, texts: Sequence[str], side: str, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids (no special tokens added) and attention mask, padded on ``side``."""
    return pad_sequences([tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts], pad_id_of(tokenizer),
                         side, device)


def continuation_logprobs(model, ctx_ids, ctx_mask, cont_ids, cont_mask) -> torch.Tensor:
    """Log-probs of the next-token predictions for each continuation token, as generation computes them: the context
    is one forward pass (the prefill), the continuation a second one on its KV cache. [B, T_cont, vocab]"""
    pos_c = (ctx_mask.cumsum(-1) - 1).clamp(min=0)
    full_mask = torch.cat([ctx_mask, cont_mask], 1)
    pos_n = (full_mask.cumsum(-1) - 1).clamp(min=0)[:, ctx_ids.shape[1]:]
    first = model(ctx_ids, attention_mask=ctx_mask, position_ids=pos_c, use_cache=True)
    rest = model(cont_ids, attention_mask=full_mask, position_ids=pos_n, past_key_values=first.past_key_values,
                 use_cache=True)
    logits = torch.cat([first.logits[:, -1:], rest.logits[:, :-1]], 1)
    return logits.float().log_softmax(-1)


def _batches(tokenizer, contexts, continuations, batch_size: int, device):
    for s in range(0, len(contexts), batch_size):
        yield (*encode_padded(tokenizer, contexts[s:s + batch_size], "left", device),
               *encode_padded(tokenizer, continuations[s:s + batch_size], "right", device))


@torch.inference_mode()
def plain_logprobs(model, tokenizer, contexts: Sequence[str], continuations: Sequence[str], batch_size: int = 16
                   ) -> list[torch.Tensor]:
    """The undefended model's continuation log-probs per batch (computed once, shared by every defense's KL)."""
    device = next(model.parameters()).device
    return [continuation_logprobs(model, *b) for b in _batches(tokenizer, contexts, continuations, batch_size, device)]


@torch.inference_mode()
def next_token_kl(model, tokenizer, contexts: Sequence[str], continuations: Sequence[str], hookset,
                  batch_size: int = 16, progress: bool = False, desc: str = "KL", plain: Optional[list] = None,
                  only: Optional[Sequence[bool]] = None) -> dict:
    """Mean per-token KL(p_plain || p_defended) and CE of both over each continuation given its context (module
    docstring). ``plain`` reuses :func:`plain_logprobs` of the same texts and batch size. ``only`` (per sequence):
    run the hook set only where True; elsewhere the defended model is known to equal the plain one (a shut gate)."""
    if len(contexts) != len(continuations):
        raise TraceCircuitsError("next_token_kl needs one continuation per context")
    device = next(model.parameters()).device
    kl_sum, ce_plain, ce_hook, n_tok = 0.0, 0.0, 0.0, 0
    batches = _batches(tokenizer, contexts, continuations, batch_size, device)
    total = math.ceil(len(contexts) / batch_size)
    for i, (ctx_ids, ctx_mask, cont_ids, cont_mask) in enumerate(tqdm(batches, total=total, desc=desc,
                                                                      disable=not progress)):
        p = plain[i] if plain is not None else continuation_logprobs(model, ctx_ids, ctx_mask, cont_ids, cont_mask)
        rows = list(range(i * batch_size, i * batch_size + ctx_ids.shape[0]))
        run = torch.tensor([True] * len(rows) if only is None else [bool(only[r]) for r in rows], device=device)
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
