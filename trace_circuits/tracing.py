"""Stage 3 of TraceRouter: from the malicious features to the circuit they drive.

1. exact FIS from every source feature (the stage-2 features at the onset layer) to every downstream node (all
   features of the downstream SAEs, all heads and MLPs after the onset layer, the readout);
2. attribution patching ranks every downstream node by its estimated effect on the readout;
3. the top ``n_candidates`` (plus the nodes the sources drive most) are zeroed exactly too, giving the chain links
   between downstream nodes and the exact readout effects (and the attribution-vs-exact rank agreement);
4. the graph: nodes with their scores, top tokens and top-activating prompts, links weighted by FIS.

Formulas are in :mod:`trace_circuits.influence`; pruning and severing are steps on the returned
:class:`~trace_circuits.circuit.Circuit`.
"""

from __future__ import annotations

import time
from typing import Optional, Sequence

import numpy as np
import torch

from trace_circuits.attribution import attribution_scores
from trace_circuits.circuit import Circuit, Link, Node
from trace_circuits.errors import TraceCircuitsError
from trace_circuits.influence import Measure, TraceContext, fit_readout, measure_ablations, prepare_batches
from trace_circuits.names import READOUT_ID, NodeRef, hook_name, layer_of, node_id, parse_node_id
from trace_circuits.prompts import EncodedPrompts, iter_batches
from trace_circuits.stats import spearman


def _link_weights(ctx: TraceContext, m: Measure, base: Measure, live: dict) -> dict[str, torch.Tensor]:
    """Link weights of each ablation in ``m`` to every downstream node: ``{target id: [n_ablations]}``."""
    out = {}
    for layer in ctx.sae_layers:
        rel = m.feat_drop[layer] / base.feat_clean[layer].clamp_min(1e-12)
        for j in live[layer].tolist():
            out[node_id("feature", layer, j)] = rel[:, j]
    for jl, layer in enumerate(ctx.down_layers):
        for h in range(ctx.model.cfg.n_heads):
            out[node_id("head", layer, h)] = m.head_rel[:, jl, h] / m.n
        out[node_id("mlp", layer)] = m.mlp_rel[:, jl] / m.n
    out[READOUT_ID] = m.readout_drop / m.n
    return out


@torch.inference_mode()
def feature_node_examples(ctx: TraceContext, encoded: EncodedPrompts, features: Sequence[tuple[int, int]],
                          k: int = 5, batch_size: int = 8) -> dict[tuple[int, int], list[dict]]:
    """For each (layer, feature): its ``k`` top-activating prompts, each with the feature's activation at every token
    of the user's text and the generation prompt (what the circuit viewer highlights)."""
    model, tok = ctx.model, ctx.model.tokenizer
    device = next(model.parameters()).device
    layers = sorted({layer for layer, _ in features})
    by_layer = {layer: [f for lay, f in features if lay == layer] for layer in layers}
    per: dict[tuple[int, int], list] = {key: [] for key in features}
    for b in iter_batches(encoded, batch_size, device):
        names = [hook_name("resid_post", layer) for layer in layers]
        _, cache = model.run_with_cache(b.tokens, attention_mask=b.attention_mask, names_filter=names,
                                        stop_at_layer=max(layers) + 1)
        for layer in layers:
            x = cache[hook_name("resid_post", layer)].float()
            a = ctx.saes[layer].encode(x)[..., by_layer[layer]] * (x.norm(dim=-1) <= ctx.limit[layer])[..., None]
            for r, i in enumerate(b.indices):
                start = b.n_pad[r] + encoded.content_spans[i][0]
                acts = a[r, start:].cpu()
                for j, f in enumerate(by_layer[layer]):
                    per[(layer, f)].append((float(acts[:, j].max()), i, acts[:, j].tolist()))
    out = {}
    for key, rows in per.items():
        rows.sort(key=lambda t: -t[0])
        out[key] = [{"prompt": encoded.prompt(i), "acts": acts,
                     "tokens": [tok.decode([t]) for t in encoded.input_ids[i][encoded.content_spans[i][0]:]]}
                    for peak, i, acts in rows[:k] if peak > 0]
    return out


def _top_tokens(model, records: list, feature: int, k: int = 5) -> list[list]:
    vals = torch.cat([v[:, feature] for v, _, _ in records])
    offsets = np.cumsum([0] + [v.shape[0] for v, _, _ in records])
    rows = []
    for j in torch.argsort(vals, descending=True)[:k].tolist():
        if vals[j] <= 0:
            break
        r = int(np.searchsorted(offsets, j, side="right") - 1)
        _, where, tokens = records[r]
        row = j - offsets[r]
        rows.append([model.tokenizer.decode([int(tokens[row, int(where[row, feature])])]), float(vals[j])])
    return rows


def trace_circuit(model, features, harmful: EncodedPrompts, benign: EncodedPrompts, *, saes: dict,
                  onset_layer: Optional[int] = None, sources: Optional[Sequence[int]] = None, max_sources: int = 16,
                  n_prompts: int = 48, n_candidates: int = 50, min_relative_activation: float = 0.05,
                  batch_size: int = 8, copies_per_pass: int = 16, n_examples: int = 5, progress: bool = True
                  ) -> Circuit:
    """Stage 3 (module docstring) on encoded prompt sets; returns the full (unpruned) circuit.

    ``features``: a :class:`~trace_circuits.features.FeatureResult` (its harmful features are the sources) or a list
    of feature ids at ``onset_layer``. ``saes``: ``{layer: SAE}`` holding the onset layer's SAE and the downstream
    ones (any SAE-Lens architecture). The readout is fitted on all of ``harmful`` and ``benign``; the interventions
    run on the first ``n_prompts`` harmful prompts."""
    from trace_circuits.models import model_fingerprint, model_info

    t_start = time.time()
    if hasattr(features, "harmful_features"):
        src = list(features.harmful_features) if sources is None else list(sources)
        onset_layer = layer_of(features.hook_name) if onset_layer is None else onset_layer
        examples, stats = getattr(features, "examples", {}) or {}, features.table
    else:
        src, examples, stats = list(sources if sources is not None else features), {}, None
    if onset_layer is None:
        raise TraceCircuitsError("pass onset_layer=... (the layer of the malicious features)")
    src = [int(f) for f in src][:max_sources]
    if not src:
        raise TraceCircuitsError("no malicious features to trace; stage 2 selected none (lower its thresholds or pass "
                                 "sources=[...])")
    if onset_layer >= model.cfg.n_layers - 1:
        raise TraceCircuitsError(f"onset layer {onset_layer} leaves no downstream layers to trace")
    if onset_layer not in saes:
        raise TraceCircuitsError(f"pass the SAE of the onset layer {onset_layer} in saes={{layer: SAE}}")
    d_sae = saes[onset_layer].cfg.d_sae
    if any(not 0 <= f < d_sae for f in src):
        raise TraceCircuitsError(f"source features {src} must be inside the onset SAE (0..{d_sae - 1})")

    readout = fit_readout(model, harmful, benign, progress=progress)
    ctx = TraceContext(model, onset_layer, dict(saes), readout)
    enc_fis = harmful.select(range(min(n_prompts, len(harmful))))
    batches = prepare_batches(ctx, enc_fis, batch_size)
    n = len(enc_fis)

    t0 = time.time()
    records: dict = {}
    m_src = measure_ablations(ctx, batches, [NodeRef("feature", onset_layer, f) for f in src], copies_per_pass,
                              progress, "FIS: zero-out sources", records)
    t_fis = time.time() - t0
    clean_mean = {layer: m_src.feat_clean[layer] / n for layer in ctx.sae_layers}
    live = {layer: torch.nonzero(clean_mean[layer] >= min_relative_activation * clean_mean[layer].max()).flatten()
            for layer in ctx.sae_layers}
    w_src = _link_weights(ctx, m_src, m_src, live)

    t0 = time.time()
    attr = attribution_scores(ctx, batches, progress)
    t_attr = time.time() - t0
    down_ids = [k for k in w_src if k != READOUT_ID]
    by_attr = sorted(down_ids, key=lambda k: -abs(attr.get(k, 0.0)))[:n_candidates]
    fis_max = {k: float(w_src[k].abs().max()) for k in down_ids}
    by_fis = sorted(down_ids, key=lambda k: -fis_max[k])[: max(8, n_candidates // 2)]
    candidates = sorted(set(by_attr) | set(by_fis), key=lambda k: (parse_node_id(k).depth, k))
    cand_nodes = [parse_node_id(k) for k in candidates]

    t0 = time.time()
    m_cand = measure_ablations(ctx, batches, cand_nodes, copies_per_pass, progress, "FIS: zero-out candidates")
    t_chain = time.time() - t0
    w_cand = _link_weights(ctx, m_cand, m_src, live)
    exact = {k: float(w_cand[READOUT_ID][c]) for c, k in enumerate(candidates)}
    exact.update({node_id("feature", onset_layer, f): float(w_src[READOUT_ID][s]) for s, f in enumerate(src)})
    top = by_attr[:50]
    src_ids = [node_id("feature", onset_layer, f) for f in src]
    agreement = {"attribution_spearman_top": spearman([attr[k] for k in top], [exact[k] for k in top]),
                 "attribution_spearman_top_n": len(top),
                 "attribution_spearman_candidates": spearman([attr.get(k, 0.0) for k in candidates],
                                                             [exact[k] for k in candidates]),
                 "attribution_spearman_sources": spearman([attr[k] for k in src_ids], [exact[k] for k in src_ids])}

    feats = [(onset_layer, f) for f in src] + [(r.layer, r.index) for r in cand_nodes if r.kind == "feature"]
    node_examples = feature_node_examples(ctx, enc_fis, feats, k=n_examples) if n_examples else {}
    nodes: list[Node] = []
    for f in src:
        nid = node_id("source", onset_layer, f)
        scores = {"readout_effect": exact[nid], "attribution": attr.get(nid)}
        if stats is not None and f in stats.index:
            row = stats.loc[f]
            scores.update(effect_size=float(row["effect_size"]), mean_harmful=float(row["mean_harmful"]),
                          mean_benign=float(row["mean_benign"]), q_value=float(row["q_value"]))
        toks = (examples.get(f, examples.get(str(f), {})) or {}).get("top_tokens") or []
        nodes.append(Node(nid, "source", onset_layer, f, f"L{onset_layer} F{f}", scores=scores, top_tokens=toks,
                          examples=node_examples.get((onset_layer, f), [])))
    for k, ref in zip(candidates, cand_nodes):
        scores = {"readout_effect": exact[k], "attribution": attr.get(k), "max_fis_from_sources": fis_max[k]}
        toks, ex = [], []
        if ref.kind == "feature":
            scores["mean_activation_harmful"] = float(clean_mean[ref.layer][ref.index])
            toks, ex = _top_tokens(model, records[ref.layer], ref.index), node_examples.get((ref.layer, ref.index), [])
        label = {"feature": f"L{ref.layer} F{ref.index}", "head": f"L{ref.layer} head {ref.index}"}.get(
            ref.kind, f"L{ref.layer} MLP")
        nodes.append(Node(k, ref.kind, ref.layer, ref.index, label, scores=scores, top_tokens=toks, examples=ex))
    nodes.append(Node(READOUT_ID, "readout", model.cfg.n_layers, 0, "harmfulness readout",
                      scores={"clean_mean": m_src.readout_clean / n}))

    links: list[Link] = []
    for s, f in enumerate(src):
        for k in candidates + [READOUT_ID]:
            if abs(w := float(w_src[k][s])) > 1e-6:
                links.append(Link(node_id("source", onset_layer, f), k, w, "fis"))
    for c, (k, ref) in enumerate(zip(candidates, cand_nodes)):
        for t in candidates + [READOUT_ID]:
            if t == k or t not in w_cand or (t != READOUT_ID and parse_node_id(t).depth <= ref.depth):
                continue
            if abs(w := float(w_cand[t][c])) > 1e-6:
                links.append(Link(k, t, w, "chain"))

    meta = {"model": model_info(model).name, "model_fingerprint": model_fingerprint(model), "onset_layer": onset_layer,
            "sae_layers": sorted(saes), "saes": {str(layer): str(sae.cfg.metadata.get("source") or "")
                                                 for layer, sae in sorted(saes.items())},
            "sources": src, "n_prompts": n, "n_readout_prompts": {"harmful": len(harmful), "benign": len(benign)},
            "readout": readout.to_json(), "readout_definition": readout.to_json()["definition"],
            "fis_definition": "FIS(s->t) = drop at t when s is zeroed (error term kept), averaged over harmful prompts: "
                              "relative drop of the target feature's max activation; relative L2 change of a head's "
                              "z or MLP output; drop of the readout as a fraction of the harmful-benign gap",
            "attribution_definition": "estimated readout drop = mean_i sum_p act . grad (attribution patching)",
            **agreement, "n_candidates": len(candidates), "min_relative_activation": min_relative_activation,
            "seconds": {"fis_sources": round(t_fis, 2), "attribution": round(t_attr, 2), "chain": round(t_chain, 2),
                        "total": round(time.time() - t_start, 2)}}
    return Circuit(nodes, links, meta)

