"""The feature gate (kept as an option beside the prompt gate of :mod:`trace_circuits.gate`): it opens at the first
position where the source SAE features' normalised activations sum past a threshold: ``g(x) = sum_f a_f(x) / s_f``
(``s_f`` the feature's mean per-prompt maximum on harmful prompts), threshold the ``(1 - rate)`` quantile of benign
prompts' ``max_p g``.
"""

from __future__ import annotations

from typing import Optional

import torch
from tqdm.auto import tqdm

from trace_circuits.errors import TraceCircuitsError
from trace_circuits.hookset.operations import Operation
from trace_circuits.prompts import EncodedPrompts, iter_batches
from trace_circuits.stats import auroc


@torch.inference_mode()
def feature_gate_scores(model, op: Operation, encoded: EncodedPrompts, batch_size: int = 16,
                        progress: bool = False) -> list[torch.Tensor]:
    """``a_f(x[p])`` of a ``sae_features`` operation's features at every real position of each prompt (what the feature
    gate sees at inference; massive-norm positions are 0). One [n_positions, n_features] per prompt."""
    device = next(model.parameters()).device
    enc_op = op.encoder.to(device)
    limit = op.massive_norm_threshold if op.massive_norm_threshold is not None else float("inf")
    out: list = [None] * len(encoded)
    n_batches = (len(encoded) + batch_size - 1) // batch_size
    for b in tqdm(iter_batches(encoded, batch_size, device), total=n_batches, desc="feature gate",
                  disable=not progress):
        x = model(b.tokens, attention_mask=b.attention_mask, stop_at_layer=op.layer + 1).float()
        ok = b.attention_mask.bool() & (x.norm(dim=-1) <= limit)
        acts = (enc_op.encode(x) * ok[..., None]).cpu()
        for r, i in enumerate(b.indices):
            out[i] = acts[r, b.n_pad[r]:]
    return out


def calibrate_feature_gate(model, op: Operation, harmful: EncodedPrompts, benign: EncodedPrompts,
                           benign_gate_rate: float = 0.02, benign_text: Optional[EncodedPrompts] = None,
                           batch_size: int = 16, progress: bool = False) -> tuple[Operation, dict]:
    """A copy of a gate-source ``sae_features`` operation with ``gate_scales`` and ``gate_threshold`` set from the
    prompts (module docstring), and the rates measured on them."""
    if not 0 <= benign_gate_rate < 1:
        raise TraceCircuitsError(f"benign_gate_rate must be in [0, 1), got {benign_gate_rate!r}")
    Ha = feature_gate_scores(model, op, harmful, batch_size, progress)
    Ba = feature_gate_scores(model, op, benign, batch_size, progress)
    n_text = 0
    if benign_text is not None and len(benign_text):
        Ta = feature_gate_scores(model, op, benign_text, batch_size, progress)
        n_text, Ba = len(Ta), Ba + Ta
    Hm = torch.stack([a.max(0).values for a in Ha])
    Bm = torch.stack([a.max(0).values for a in Ba])
    s = Hm.mean(0)
    s = torch.where(s > 0, s, torch.maximum(Hm.max(0).values, Bm.max(0).values).clamp_min(1e-6))
    scales = [float(v) for v in s]

    def scores(acts):
        return torch.stack([(a / torch.tensor(scales)).sum(-1).max() for a in acts])

    h_score, b_score = scores(Ha), scores(Ba)
    q = torch.quantile(b_score, 1.0 - benign_gate_rate, interpolation="higher") if benign_gate_rate > 0 \
        else b_score.max()
    gated = Operation(**{**vars(op), "gate_source": True, "gate_scales": scales,
                         "gate_threshold": float(max(q.item(), 1e-6))})
    t = gated.gate_threshold
    return gated, {"gate": "features", "layer": op.layer, "benign_gate_rate_target": benign_gate_rate,
                   "gate_threshold": t, "gate_rate_harmful": float((h_score > t).float().mean()),
                   "gate_rate_benign": float((b_score > t).float().mean()),
                   "gate_score_auroc": auroc(h_score.numpy(), b_score.numpy()), "n_harmful": len(Ha),
                   "n_benign": len(Ba) - n_text, "n_benign_text": n_text, "rates_are": "in-sample",
                   "rule": "the gate opens at the first position p with sum_f a_f(x[p]) / s_f > gate_threshold"}
