"""The baselines a TraceRouter hook set is compared with, as hook sets on the same footing:

* ``top_feature``: zero only the single strongest harmful SAE feature at the onset layer, wherever it is active (the
  "locality" baseline of single-feature clamping);
* ``onset_features``: zero all of the hook set's source features at the onset layer, no downstream paths, no gate;
* ``gated_onset_features``: the same behind the hook set's own gate (isolates what the downstream paths add);
* ``direction_ablation``: project the harmful-minus-benign mean direction (onset layer, end of the prompt) out of the
  residual stream at every layer, ``x <- x - <x, r> r`` (Arditi et al. 2024; on a model that refuses this is its
  refusal direction);
* ``direction_addition``: add that direction at the onset layer, ``x <- x + g r`` with ``g`` the harmful-benign gap;
* ``layer_ablation``: zero every head and the MLP of the onset layer.
"""

from __future__ import annotations

from typing import Optional, Sequence

from trace_circuits.errors import TraceCircuitsError
from trace_circuits.hookset.build import hookset_for
from trace_circuits.hookset.build import sae_operation
from trace_circuits.hookset.operations import Operation
from trace_circuits.prompts import EncodedPrompts

BASELINE_NAMES = ("top_feature", "onset_features", "gated_onset_features", "direction_ablation", "direction_addition",
                  "layer_ablation")


def check_baseline_names(names: Sequence[str]) -> list[str]:
    bad = [n for n in names if n not in BASELINE_NAMES]
    if bad:
        raise TraceCircuitsError(f"unknown baselines {bad}; choose from {', '.join(BASELINE_NAMES)}")
    return list(names)


def build_baselines(model, hookset, harmful: EncodedPrompts, benign: EncodedPrompts, saes: dict,
                    names: Optional[Sequence[str]] = None, batch_size: int = 16) -> dict:
    """The baselines (module docstring) for a traced TraceRouter ``hookset``; ``saes`` maps layer -> SAE (the onset
    layer's is used), ``harmful`` / ``benign`` are the training prompts the directions are measured on."""
    from trace_circuits.activations import mean_difference, residuals_at

    names = check_baseline_names(names if names is not None else BASELINE_NAMES)
    src = hookset.source_operation
    if src is None:
        raise TraceCircuitsError("the hook set has no SAE operation on source features; export one with "
                                 "`trace-circuits trace`")
    onset = src.layer
    if onset not in saes:
        raise TraceCircuitsError(f"the baselines need the onset layer's SAE (layer {onset}) in saes")
    sae = saes[onset]
    out = {}

    def add(name, ops, description):
        out[name] = hookset_for(model, ops, description=description, provenance={"baseline": description})

    if "top_feature" in names:
        add("top_feature", [sae_operation(sae, src.features[:1], gated=False)],
            f"zero SAE feature {src.features[0]} at layer {onset}")
    if "onset_features" in names:
        add("onset_features", [sae_operation(sae, src.features, gated=False)],
            f"zero {len(src.features)} SAE features at layer {onset}, no downstream paths")
    if "gated_onset_features" in names:
        gate = hookset.gate_operation
        if gate is None or gate is src:
            raise TraceCircuitsError("gated_onset_features needs a hook set with a prompt gate")
        add("gated_onset_features", [gate, sae_operation(sae, src.features, gated=True)],
            f"zero {len(src.features)} SAE features at layer {onset} behind the same prompt gate, no downstream paths")
    if {"direction_ablation", "direction_addition"} & set(names):
        r, gap = mean_difference(residuals_at(model, harmful, onset, None, batch_size),
                                 residuals_at(model, benign, onset, None, batch_size))
        if "direction_ablation" in names:
            add("direction_ablation", [Operation(kind="direction", layer=layer, mode="ablate", tensors={"r": r.clone()})
                                       for layer in range(model.cfg.n_layers)],
                f"ablate the layer-{onset} mean-difference direction at every layer")
        if "direction_addition" in names:
            add("direction_addition", [Operation(kind="direction", layer=onset, mode="add", alpha=gap,
                                                 tensors={"r": r.clone()})],
                f"add the layer-{onset} mean-difference direction (x {gap:.1f}) at layer {onset}")
    if "layer_ablation" in names:
        add("layer_ablation", [Operation(kind="heads", layer=onset, heads=list(range(model.cfg.n_heads))),
                               Operation(kind="mlp", layer=onset)], f"zero all heads and the MLP of layer {onset}")
    return {n: out[n] for n in names}
