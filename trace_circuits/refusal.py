"""The model's own refusal, as a direction to steer toward once the gate opens (the ``reroute`` and ``steer``
actions: with and without the circuit's cut).

Refusal direction at layer l, a difference of means (Arditi et al. 2024) on teacher-forced answers: for training
requests P (harmful and benign), the residual stream ``h_l`` averaged over the last prompt position and the first
``k`` answer positions, with the answer being the model's refusal R or the model's own compliant answer C (requests it
refused are left out of C):

    r_l = unit(mean_{p, R} h_l - mean_{p, C} h_l),      g_l = || mean_{p, R} h_l - mean_{p, C} h_l ||

R is the model's own refusal: the first sentence of its most frequent refusal opening among its answers to the harmful
training requests (substring judge), or "I'm sorry, but I can't help with that." for a model that never refuses.

Steering (a gated ``direction`` operation per layer): ``x_l <- x_l + c g_l r_l`` at every gate-open position (from
the end of the user's turn on, generated tokens included), at the steering layers: every other layer from the onset
layer to the last (the circuit's downstream layers), ``c`` = ``steer_strength``. Where the gate stays shut nothing
changes.
"""

from __future__ import annotations

from collections import Counter
from typing import Optional, Sequence

import torch

from trace_circuits.errors import TraceCircuitsError
from trace_circuits.hookset.operations import Operation

GENERIC_REFUSAL = "I'm sorry, but I can't help with that."


def own_refusal(answers: Sequence[str]) -> str:
    """The model's most frequent refusal (first sentence) among ``answers``, else :data:`GENERIC_REFUSAL`."""
    from trace_circuits.evaluate.judges import is_refusal

    firsts = []
    for a in answers:
        if is_refusal(a):
            s = a.strip().replace("\n", " ")
            cut = min((s.find(c) + 1 for c in ".!" if s.find(c) >= 0), default=len(s))
            firsts.append(s[:cut].strip())
    return Counter(firsts).most_common(1)[0][0] if firsts else GENERIC_REFUSAL


def answer_residuals(model, prompt_texts: Sequence[str], answers: Sequence[str], layers: Sequence[int],
                     k: int = 6, batch_size: int = 16) -> dict[int, torch.Tensor]:
    """``h_l`` per (templated prompt, answer), averaged over the last prompt position and the first ``k`` answer
    positions (teacher forcing; the answer's later tokens are not run). ``prompt_texts`` are already templated."""
    import dataclasses

    from trace_circuits.activations import residuals_at_layers
    from trace_circuits.prompts import encode_prompts

    tok = model.tokenizer
    base = [len(tok(t, add_special_tokens=False)["input_ids"]) for t in prompt_texts]
    enc = encode_prompts(model, [t + a for t, a in zip(prompt_texts, answers)], chat=False)
    enc = dataclasses.replace(enc, input_ids=[ids[:min(n + k, len(ids))] for ids, n in zip(enc.input_ids, base)])
    # pool "turn" from just before the last prompt position: the mean over positions base-1 .. base+k-1
    return residuals_at_layers(model, enc, layers, None, batch_size, pool="turn", starts=[n - 2 for n in base])


def refusal_directions(model, hf, tokenizer, harmful: Sequence[str], benign: Sequence[str], layers: Sequence[int],
                       n: int = 64, k: int = 6, max_new_tokens: int = 24, progress: bool = False
                       ) -> tuple[dict[int, tuple[torch.Tensor, float]], dict]:
    """``{layer: (r_l, g_l)}`` (module docstring) and a record of how they were measured."""
    from trace_circuits.activations import mean_difference
    from trace_circuits.evaluate.attacks import attack_texts
    from trace_circuits.evaluate.judges import is_refusal
    from trace_circuits.generation import generate_responses

    prompts = list(harmful)[:n] + list(benign)[:n]
    if len(prompts) < 4:
        raise TraceCircuitsError("the refusal direction needs at least a few training prompts")
    rows = generate_responses(hf, tokenizer, prompts, None, max_new_tokens, batch_size=32, progress=progress,
                              desc="refusal direction: the model's own answers")
    answers = [r["response"] for r in rows]
    refusal = own_refusal(answers[:min(n, len(harmful))])
    texts = attack_texts(tokenizer, prompts, "direct")
    comply = [i for i, a in enumerate(answers) if not is_refusal(a) and a.strip()]
    if len(comply) < 4:
        raise TraceCircuitsError("the model refused (almost) every training request, so there is no compliance to "
                                 "contrast its refusals with; use action 'zero'")
    R = answer_residuals(model, texts, [refusal] * len(texts), layers, k)
    C = answer_residuals(model, [texts[i] for i in comply], [answers[i] for i in comply], layers, k)
    dirs = {layer: mean_difference(R[layer], C[layer]) for layer in layers}
    record = {"refusal_text": refusal, "n_prompts": len(prompts), "n_compliant": len(comply),
              "own_refusals_on_harmful": int(sum(is_refusal(a) for a in answers[:min(n, len(harmful))])),
              "positions": f"last prompt position + first {k} answer positions",
              "definition": "r_l = unit(mean_R h_l - mean_C h_l), g_l = |mean_R h_l - mean_C h_l| (teacher-forced "
                            "refusal R vs the model's own compliant answers C, same requests)"}
    return dirs, record


def steering_layers(onset: int, n_layers: int) -> list[int]:
    """Every other layer from the onset layer to the last."""
    last = n_layers - 1
    layers = list(range(onset, last + 1, 2))
    return layers if last in layers else layers + [last]


def steering_operations(run, circuit, strength: Optional[float] = None) -> tuple[list[Operation], dict]:
    """The gated steering operations of a ``reroute`` or ``steer`` hook set for ``run``'s model, and their record."""
    model = run.model
    onset = int(circuit.meta["onset_layer"])
    layers = steering_layers(onset, model.cfg.n_layers)
    c = run.config.hookset.steer_strength if strength is None else strength
    hf, tok = run.hf
    dirs, record = refusal_directions(model, hf, tok, run.prompts("harmful"), run.prompts("benign"), layers,
                                      progress=run.progress)
    ops = [Operation(kind="direction", layer=layer, mode="add", gated=True, alpha=float(c * dirs[layer][1]),
                     tensors={"r": dirs[layer][0].float().contiguous()}) for layer in layers]
    record.update(layers=layers, strength=c, gaps={str(layer): dirs[layer][1] for layer in layers},
                  rule="x_l <- x_l + c g_l r_l at gate-open positions")
    return ops, record
