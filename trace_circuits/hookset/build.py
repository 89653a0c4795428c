"""Building hook sets: for a model from operations (:func:`hookset_for`), and from a traced circuit."""

from __future__ import annotations

import math
from typing import Optional, Sequence

from trace_circuits.errors import TraceCircuitsError
from trace_circuits.hookset.format import HookSet
from trace_circuits.hookset.operations import SAE_HOOK_KINDS, Operation
from trace_circuits.names import parse_hook
from trace_circuits.saes.encoding import FeatureEncoder, massive_limit


def sae_operation(sae, features: Sequence[int], *, layer: Optional[int] = None, gated: bool = True,
                  gate_source: bool = False, zero_thresholds: Optional[Sequence[float]] = None,
                  gate_scales: Optional[Sequence[float]] = None, gate_threshold: float = 1.0, scale: float = 0.0
                  ) -> Operation:
    """A ``sae_features`` operation from any SAE-Lens SAE (standard, JumpReLU, TopK): what it needs to reproduce
    ``sae.encode`` for ``features`` and remove their decoder contributions at the SAE's hook point."""
    from trace_circuits.saes.sources import sae_hook

    hook = sae_hook(sae)
    kind, hook_layer = parse_hook(hook)
    if hook_layer is None or kind not in SAE_HOOK_KINDS:
        raise TraceCircuitsError(f"hook sets cut SAE features on the residual stream or a sublayer output, not at "
                                 f"{hook}; use an SAE at blocks.L.hook_resid_post")
    enc = FeatureEncoder.from_sae(sae, features)
    n = len(enc.features)
    limit = massive_limit(sae)
    return Operation(kind="sae_features", layer=hook_layer if layer is None else int(layer), gated=gated,
                     scale=float(scale), features=enc.features,
                     zero_thresholds=[float(t) for t in (zero_thresholds or [0.0] * n)], gate_source=gate_source,
                     gate_scales=[float(t) for t in (gate_scales or [1.0] * n)] if gate_source else [],
                     gate_threshold=float(gate_threshold), architecture=enc.architecture, k=enc.k,
                     normalize=enc.normalize, massive_norm_threshold=None if math.isinf(limit) else limit,
                     sae=str(sae.cfg.metadata.get("source") or hook),
                     hook="" if kind == "resid_post" else hook, tensors=enc.tensors)


def hookset_from_circuit(circuit, model, saes: dict, *, gate: Optional[Operation] = None,
                         nodes: Optional[Sequence[str]] = None, gated_sources: bool = True,
                         steering: Sequence[Operation] = (), action: str = "zero",
                         provenance: Optional[dict] = None) -> HookSet:
    """The hook set that suppresses ``nodes`` (default: the circuit's severed nodes) of a traced circuit.

    Source features become one ``sae_features`` operation at the onset layer (gated unless ``gated_sources`` is
    False); downstream SAE features, heads and MLPs become gated operations grouped per layer. ``saes`` maps layer ->
    SAE (any SAE-Lens architecture, as used for tracing). ``gate``: a ``prompt_probe`` (see
    :func:`trace_circuits.gate.fit_prompt_gate`) or a gate-source SAE operation; without one every operation acts
    everywhere. ``steering``: gated ``direction`` operations added by ``action="reroute"`` (see
    :mod:`trace_circuits.refusal`). ``action="steer"``: the gate and the steering only, nothing cut: the source
    features' operation stays with scale 1 (it changes nothing, and names the features the baselines read); it needs
    a gate and steering."""
    if action == "steer" and (gate is None or not steering):
        raise TraceCircuitsError("action 'steer' needs a gate and steering operations (steer only where the gate "
                                 "opens); pass gate= and steering=, or use action 'zero'")
    nmap = circuit.node_map
    chosen = list(nodes) if nodes is not None else [n.id for n in circuit.severed_nodes]
    unknown = [k for k in chosen if k not in nmap]
    if unknown:
        raise TraceCircuitsError(f"nodes {unknown[:5]} are not in the circuit")
    picked = [nmap[k] for k in chosen if nmap[k].kind != "readout"]
    srcs = [n for n in picked if n.kind == "source"]
    if not srcs:
        raise TraceCircuitsError("a hook set needs at least one source feature; sever the sources")
    onset = srcs[0].layer

    def sae_for(layer):
        if layer not in saes:
            raise TraceCircuitsError(f"no SAE for layer {layer}; pass saes={{{layer}: SAE, ...}}")
        return saes[layer]

    cut = 1.0 if action == "steer" else 0.0  # the sources' operation: scale 1 keeps it without cutting anything
    ops: list[Operation] = [gate] if gate is not None and gate.kind == "prompt_probe" else []
    if gate is not None and gate.kind == "sae_features":
        ops.append(Operation(**{**vars(gate), "scale": cut}) if action == "steer" else gate)
    else:
        ops.append(sae_operation(sae_for(onset), [n.index for n in srcs], gated=gated_sources, scale=cut))
    by_layer: dict[tuple[str, int], list] = {}
    for n in picked:
        if n.kind != "source" and action != "steer":  # steer: nothing downstream is cut
            by_layer.setdefault((n.kind, n.layer), []).append(n)
    for (kind, layer), group in sorted(by_layer.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        if kind == "feature":
            ops.append(sae_operation(sae_for(layer), [n.index for n in group], gated=True))
        elif kind == "head":
            ops.append(Operation(kind="heads", layer=layer, heads=sorted(n.index for n in group)))
        else:
            ops.append(Operation(kind="mlp", layer=layer))
    ops += list(steering)
    prov = {"circuit_nodes": [n.id for n in picked], "onset_layer": onset,
            **{k: circuit.meta.get(k) for k in ("model", "readout_definition", "n_prompts")}, **(provenance or {})}
    what = (f"steering toward refusal at {len(steering)} layers (the {len(picked)} circuit nodes left alone)"
            if action == "steer" else f"{action} of {len(picked)} circuit nodes")
    return hookset_for(model, ops, description=f"TraceRouter: {what} once the gate opens", action=action,
                       provenance=prov)


def hookset_for(model, operations: list[Operation], *, description: str = "", action: str = "none",
                provenance: Optional[dict] = None) -> HookSet:
    """A hook set for ``model`` (a HookedTransformer): its identity, dimensions and architecture filled in."""
    from trace_circuits.architectures import model_type_of
    from trace_circuits.models import model_fingerprint, model_info, weights_signature

    c = model.cfg
    arch = model_type_of(model)
    return HookSet(model=model_info(model).name, model_fingerprint=model_fingerprint(model),
                   weights_signature=weights_signature(model), d_model=c.d_model, n_layers=c.n_layers,
                   n_heads=c.n_heads, d_head=c.d_head, operations=operations, description=description, action=action,
                   provenance=dict(provenance or {}), architecture=arch)
