"""The prompt gate's fluency reading: optimised attack strings read as gibberish to the model itself.

A GCG-style suffix or preamble (Zou et al. 2023) is a run of tokens the model finds very unlikely; natural requests,
jailbreak framings included, are not (perplexity filters, Jain et al. 2023, Alon & Kamfonas 2023). The reading is the
model's own surprisal of its user's message, at its worst stretch of ``w`` tokens::

    u = max_{a} 1/w sum_{q = a+1}^{a+w} -log p(t_q | t_<q)      over windows of w tokens of the message M
    u = 1/w sum_{q in M} -log p(t_q | t_<q)                       if |M| < w (the missing tokens count 0)

With ``perplexity_tokens = "novel"`` (the default of new runs; hook set format 13) the windows run over the message's
*novel* positions only, ``q_1 < q_2 < ...`` whose token does not occur earlier in the message (the model still reads
the whole message; only the scoring skips repeats)::

    u = max_{a} 1/w sum_{i = a+1}^{a+w} -log p(t_{q_i} | t_<q_i)

An attacker who knows the reading keeps most of GCG's initial " !" tokens, which the model predicts easily after the
first few, and so stays under a threshold on every token (``"all"``); repeats buy nothing under ``"novel"``
(``benchmarks/fluency_repeats.py``).

with ``p`` the model's next-token distribution (its final norm, then the unembedding, at ``q - 1``) and ``M`` the
user turn's message tokens (after the turn's ``opener``, before the ``anchor`` that ends it: the positions the
probe's message reading uses). The gate also opens if ``u > perplexity_threshold``, the highest ``u`` of the benign
calibration requests (every framing, hard negatives included; ``GateConfig.perplexity_rate`` 0) or their
``1 - rate`` quantile.

It needs the model's last layer, so it is decided at the end of the prompt's forward pass: the gated operations act
from the next pass on (the second answer token of a generation), where the probe's readings act from the end of the
user's turn. A deployer sees a refusal that starts after one token ("Sure I'm sorry, ...").
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from jaxtyping import Float, Int

from trace_circuits.errors import TraceCircuitsError


def unembedding(model) -> tuple[torch.Tensor, Optional[torch.Tensor], float]:
    """``(W [d_model, vocab], b [vocab] or None, logit soft cap or 0)`` of a HookedTransformer or transformers model."""
    if hasattr(model, "W_U") and hasattr(model, "cfg"):
        cap = float(getattr(model.cfg, "output_logits_soft_cap", 0.0) or 0.0)
        return model.W_U, getattr(model, "b_U", None), cap
    head = model.get_output_embeddings()
    cap = float(getattr(model.config, "final_logit_softcapping", 0.0) or 0.0)
    return head.weight.T, head.bias, cap


def final_norm(model) -> torch.nn.Module:
    """The module whose output the unembedding reads: ``ln_final`` (TransformerLens) or the decoder's ``norm``."""
    module = getattr(model, "ln_final", None) if hasattr(model, "cfg") and hasattr(model, "blocks") else None
    if module is None and hasattr(model, "get_decoder"):
        module = getattr(model.get_decoder(), "norm", None)
    if module is None:
        raise TraceCircuitsError("the fluency reading needs the model's final norm (ln_final / model.norm); set "
                                 "--gate-perplexity-window 0 for this model")
    return module


def message_bounds(ids: torch.Tensor, valid: torch.Tensor, anchor: Sequence[int], opener: Sequence[int]
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(start, last)`` [batch]: the user's message ``start < q <= last`` by the runtime's rule
    (:func:`~trace_circuits.hookset.runtime.user_turn`), from the first valid position where no opener matches."""
    from trace_circuits.hookset.runtime import user_turn

    T = valid.shape[1]
    pos = torch.arange(T, device=valid.device)
    first = torch.where(valid, pos, torch.full_like(pos, T)).min(1).values
    _, start, last = user_turn(ids, valid, anchor, opener)
    return torch.where(start >= 0, start, first), last


SCORED_TOKENS = ("all", "novel")  # the positions the fluency reading scores: every message token, or first occurrences


def check_scored_tokens(tokens: str, fix: str) -> None:
    """One line naming ``fix`` unless ``tokens`` is one of :data:`SCORED_TOKENS`."""
    if tokens not in SCORED_TOKENS:
        raise TraceCircuitsError(f"the fluency reading scores {' or '.join(map(repr, SCORED_TOKENS))} message tokens, "
                                 f"not {tokens!r}; {fix}")


def novel_positions(toks: Int[torch.Tensor, "n"]) -> torch.Tensor:
    """``[n]`` bool: ``toks[i]`` does not occur in ``toks[:i]``."""
    i = torch.arange(len(toks), device=toks.device)
    return ~((toks[:, None] == toks[None, :]) & (i[None, :] < i[:, None])).any(1)


def window_surprisal(normed: Float[torch.Tensor, "batch pos d_model"], ids: Int[torch.Tensor, "batch pos"],
                     start: torch.Tensor, last: torch.Tensor, unembed: tuple, window: int, tokens: str = "novel"
                     ) -> Float[torch.Tensor, "batch"]:
    """``u`` per row (module docstring) from the final norm's output; differentiable in ``normed``; ``tokens``
    ``"novel"`` scores first occurrences only. A message shorter than the window is divided by the window all the
    same, so ``u`` never falls as a message grows and a few plain first words ("The capital of France is") do not read
    as an attack string; an empty message scores 0."""
    check_scored_tokens(tokens, "re-export the hook set")
    W, b, cap = unembed
    out = []
    for row in range(normed.shape[0]):
        a, z = int(start[row]), int(last[row])
        if z <= a:
            out.append(normed.new_zeros(()))
            continue
        logits = normed[row, a:z].to(W.dtype) @ W
        if b is not None:
            logits = logits + b
        logits = logits.float()
        if cap > 0:
            logits = cap * torch.tanh(logits / cap)
        target = ids[row, a + 1:z + 1].to(logits.device)
        nll = -logits.log_softmax(-1).gather(1, target[:, None])[:, 0]
        out.append(worst_window(nll[novel_positions(target)] if tokens == "novel" else nll, window))
    return torch.stack(out)


def worst_window(nll: Float[torch.Tensor, "n"], window: int) -> Float[torch.Tensor, ""]:
    """``max_a 1/w sum_{i = a+1}^{a+w} nll_i``, over all of ``nll`` (still divided by ``w``) if it is shorter; 0 if
    empty."""
    if len(nll) == 0:
        return nll.new_zeros(())
    w = min(window, len(nll))
    c = torch.cat([nll.new_zeros(1), nll.cumsum(0)])
    return (c[w:] - c[:-w]).max() / window


@torch.no_grad()
def surprisal_scores(model, encoded, window: int, anchor: Sequence[int], opener: Sequence[int],
                     batch_size: int = 16, progress: bool = False, desc: str = "fluency reading",
                     prefix_labels: Optional[Sequence] = None, tokens: str = "novel") -> torch.Tensor:
    """``u`` of each encoded prompt, as the runtime computes it: the last block's residual through the model's own
    final norm (a HookedTransformer), read over the whole sequence. The token prefix the prompts of one
    ``prefix_labels`` label share (default: all prompts; e.g. one label per attack template) runs once
    (:func:`~trace_circuits.activations.residuals_at_layers`). [n]"""
    from trace_circuits.activations import residuals_at_layers

    if window < 1:
        raise TraceCircuitsError(f"the fluency reading's window must be >= 1 token, got {window}")
    unembed, norm = unembedding(model), final_norm(model)

    def reader(x, valid, last, start, layer, ids):  # padding may sit between a shared prefix and the tails
        n = valid.sum(1)
        width = int(n.max())
        cols = torch.arange(width, device=x.device)
        order = torch.sort((~valid).long(), dim=1, stable=True).indices[:, :width]  # each row's real columns first
        shift = (cols[None, :] - (width - n)[:, None]).clamp(min=0)  # left-pad the real columns
        take = order.gather(1, shift)
        real = cols[None, :] >= (width - n)[:, None]
        xs = x.gather(1, take[..., None].expand(-1, -1, x.shape[-1]))
        ids_ = torch.where(real, ids.to(x.device).gather(1, take), torch.zeros_like(take))
        begin, end = message_bounds(ids_, real, anchor, opener)
        return window_surprisal(norm(xs), ids_, begin, end, unembed, window, tokens)[:, None]

    top = model.cfg.n_layers - 1
    return residuals_at_layers(model, encoded, [top], batch_size=batch_size, progress=progress, desc=desc,
                               prefix_labels=prefix_labels, reader=reader)[top][:, 0]


def calibrate_surprisal(model, gate, benign, window: int, rate: float, harmful=None, groups=None,
                        batch_size: int = 16, progress: bool = False, tokens: str = "novel") -> dict:
    """Set ``gate.perplexity_window`` / ``perplexity_tokens`` / ``perplexity_threshold`` (the ``1 - rate`` quantile of
    the benign requests' ``u``; rate 0: their maximum) and return the calibration record: the threshold, the benign
    maximum and median, and with ``harmful`` (a full forward pass more; the run leaves it out,
    ``benchmarks/fluency_reading.py`` measures the test split) the share of harmful requests it alone opens on, per
    template where ``groups`` labels them."""
    from trace_circuits.gate import benign_threshold, rates_by_group

    if not 0 <= rate < 1:
        raise TraceCircuitsError(f"the fluency reading's benign rate must be in [0, 1), got {rate}; set "
                                 "--gate-perplexity-rate")
    check_scored_tokens(tokens, "set --gate-perplexity-tokens")
    b = surprisal_scores(model, benign, window, gate.anchor, gate.opener, batch_size, progress, "fluency: benign",
                         None if groups is None else groups[1], tokens)
    threshold = float(benign_threshold(b, rate))
    gate.perplexity_window, gate.perplexity_tokens, gate.perplexity_threshold = int(window), tokens, threshold
    record = {"window": int(window), "tokens": tokens, "rate": rate, "threshold": threshold,
              "benign_max": float(b.max()), "benign_median": float(b.median()),
              "benign_open_rate": float((b > threshold).float().mean())}
    if harmful is not None:
        h = surprisal_scores(model, harmful, window, gate.anchor, gate.opener, batch_size, progress,
                             "fluency: harmful", None if groups is None else groups[0], tokens)
        record.update(harmful_median=float(h.median()), harmful_open_rate=float((h > threshold).float().mean()))
        if groups is not None:
            record["harmful_open_by_template"] = rates_by_group(h, list(groups[0]), threshold)
    return record
