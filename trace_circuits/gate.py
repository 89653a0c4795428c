"""The prompt gate: when a hook set's cuts act.

A hook set cuts the traced circuit only on requests its gate calls harmful. The prompt gate is a linear probe on the
residual stream ``x = blocks.{l}.hook_resid_post`` at the last prompt position (by default the sensitive onset layer
from stage 1), read once per prompt:

    s(x) = <(x - m) / sd, w> + b        (an L2-regularised logistic regression, features standardised)

trained on harmful prompts (label 1) against benign prompts and benign documents (label 0; a document is scored at
its last token, as if it were a prompt), classes weighted equally. The threshold is set on *out-of-fold* scores
(k-fold cross-fitting), so that the gate opens on at most ``benign_gate_rate`` of benign sequences it has not been
trained on; the probe used at inference is then refitted on all of them. In the hook set it is a ``prompt_probe``
operation with ``r = unit(w / sd)``, ``gap = 1 / |w / sd|``, ``mu = m - b r gap``, so ``s = <x - mu, r> / gap``.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from jaxtyping import Float

from trace_circuits.errors import TraceCircuitsError
from trace_circuits.hooks import Operation


def user_turn_end(model_or_tokenizer) -> list[int]:
    """Token ids that close a user turn in the chat template (what the template puts after the user's message, up
    to where the assistant's answer begins), or [] if the tokenizer has no chat template."""
    from trace_circuits.prompts import format_prompts, uses_chat_template

    tokenizer = getattr(model_or_tokenizer, "tokenizer", model_or_tokenizer)
    if tokenizer is None or not uses_chat_template(model_or_tokenizer):
        return []
    marker = "\x00TRACE\x00"
    text = format_prompts(tokenizer, [marker], chat=True)[0]
    tail = text[text.index(marker) + len(marker):]
    return list(tokenizer(tail, add_special_tokens=False)["input_ids"]) if tail else []


def fit_logistic(X: Float[torch.Tensor, "n d"], y: Float[torch.Tensor, "n"], l2: float = 0.2,
                 max_iter: int = 500) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Class-balanced logistic regression on standardised features: minimises
    ``mean_i c_i BCE(<z_i, w> + b, y_i) + l2 / 2 |w|^2`` with ``z = (x - m) / sd`` (L-BFGS). Returns ``(w, b, m, sd)``."""
    X, y = X.double(), y.double()
    m, sd = X.mean(0), X.std(0).clamp_min(1e-6)
    Z = (X - m) / sd
    pos = y.mean().clamp(1e-6, 1 - 1e-6)
    c = torch.where(y > 0.5, 0.5 / pos, 0.5 / (1 - pos))
    w = torch.zeros(X.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=max_iter, tolerance_grad=1e-9, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = (c * torch.nn.functional.binary_cross_entropy_with_logits(Z @ w + b, y, reduction="none")).mean()
        loss = loss + 0.5 * l2 * (w * w).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return w.detach(), b.detach(), m, sd


def _score(X: torch.Tensor, w, b, m, sd) -> torch.Tensor:
    return (((X.double() - m) / sd) @ w + b).float()


def _auroc(pos: torch.Tensor, neg: torch.Tensor) -> float:
    return float((pos[:, None] > neg[None, :]).float().mean() + 0.5 * (pos[:, None] == neg[None, :]).float().mean())


def _residuals(model, texts, layer: int, chat: Optional[bool], batch_size: int, progress: bool, desc: str):
    from trace_circuits.influence import last_position_residuals
    from trace_circuits.prompts import encode_prompts

    return last_position_residuals(model, encode_prompts(model, list(texts), chat=chat), batch_size, progress, desc,
                                   layer=layer)


def fit_prompt_gate(model, harmful, benign, layer: int, benign_gate_rate: float = 0.02, *,
                    chat: Optional[bool] = None, benign_text: Optional[Sequence[str]] = None, l2: float = 0.2,
                    folds: int = 5, batch_size: int = 16, progress: bool = False) -> tuple[Operation, dict]:
    """The ``prompt_probe`` operation at ``blocks.{layer}.hook_resid_post`` and its calibration record (see the module
    docstring). ``benign_text`` (raw text, no chat template) joins the benign class."""
    if not 0 <= benign_gate_rate < 1:
        raise TraceCircuitsError(f"benign_gate_rate must be in [0, 1), got {benign_gate_rate!r}")
    if not 0 <= layer < model.cfg.n_layers:
        raise TraceCircuitsError(f"gate layer {layer} is outside the model (0..{model.cfg.n_layers - 1})")
    if folds < 2:
        raise TraceCircuitsError("the prompt gate needs at least 2 folds")
    H = _residuals(model, harmful, layer, chat, batch_size, progress, "prompt gate (harmful)")
    B = _residuals(model, benign, layer, chat, batch_size, progress, "prompt gate (benign)")
    T = (_residuals(model, benign_text, layer, False, batch_size, progress, "prompt gate (benign text)")
         if benign_text else H[:0])
    if len(H) < folds or len(B) + len(T) < folds:
        raise TraceCircuitsError(f"the prompt gate needs at least {folds} harmful and {folds} benign prompts")
    X = torch.cat([H, B, T])
    y = torch.cat([torch.ones(len(H)), torch.zeros(len(B) + len(T))])
    oof = torch.zeros(len(X))
    idx = torch.arange(len(X))
    for k in range(folds):  # interleaved folds keep each class's share in every fold
        test = idx % folds == k
        oof[test] = _score(X[test], *fit_logistic(X[~test], y[~test], l2))
    neg = oof[len(H):]
    q = torch.quantile(neg, 1.0 - benign_gate_rate, interpolation="higher") if benign_gate_rate > 0 else neg.max()
    w, b, m, sd = fit_logistic(X, y, l2)
    v = (w / sd)
    gap = 1.0 / float(v.norm())
    r = v / v.norm()
    mu = m - float(b) * r * gap
    op = Operation(kind="prompt_probe", layer=int(layer), gated=False, gate_source=True, gap=gap,
                   gate_threshold=float(q), anchor=user_turn_end(model) if chat is not False else [],
                   tensors={"r": r.float().contiguous(), "mu": mu.float().contiguous()})
    h_oof, b_oof, t_oof = oof[:len(H)], oof[len(H):len(H) + len(B)], oof[len(H) + len(B):]
    calib = {"gate": "prompt", "layer": int(layer), "probe": "logistic regression", "l2": l2, "folds": folds,
             "benign_gate_rate_target": benign_gate_rate, "gate_threshold": float(q),
             "gate_rate_harmful": float((h_oof > q).float().mean()), "gate_rate_benign": float((neg > q).float().mean()),
             "gate_rate_benign_prompts": float((b_oof > q).float().mean()),
             "gate_rate_benign_text": float((t_oof > q).float().mean()) if len(t_oof) else None,
             "gate_score_auroc": _auroc(h_oof, neg), "n_harmful": len(H), "n_benign": len(B), "n_benign_text": len(T),
             "rates_are": "out-of-fold (each sequence scored by a probe not trained on it)",
             "rule": "at the last prompt position of layer l: s = <(x - m)/sd, w> + b, a class-balanced L2 logistic "
                     "regression (harmful prompts vs benign prompts and texts); the gate opens for the rest of the "
                     "sequence if s > gate_threshold, the (1 - rate) quantile of the benign out-of-fold scores"}
    return op, calib


@torch.inference_mode()
def gate_decisions(model, hookset, texts, chat: Optional[bool] = None, batch_size: int = 16,
                   progress: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """What a hook set's prompt gate decides on each text, exactly as at inference (the anchor included): runs the
    HookedTransformer with the hook set attached up to the gate's layer. Returns ``(scores, opened)``."""
    from tqdm.auto import tqdm

    from trace_circuits.prompts import encode_prompts, iter_batches

    op = hookset.gate_operation
    if op is None or op.kind != "prompt_probe":
        raise TraceCircuitsError("this hook set has no prompt gate; export one with `trace-circuits trace --gate prompt`")
    enc = encode_prompts(model, list(texts), chat=chat)
    device = next(model.parameters()).device
    scores = torch.zeros(len(enc))
    n_batches = (len(enc) + batch_size - 1) // batch_size
    with hookset.attach(model) as rt:
        for b in tqdm(iter_batches(enc, batch_size, device), total=n_batches, desc="gate", disable=not progress):
            model(b.tokens, attention_mask=b.attention_mask, stop_at_layer=op.layer + 1)
            scores[b.indices] = rt.prompt_scores
    return scores, scores > op.gate_threshold
