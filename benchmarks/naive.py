"""The naive ways, kept only as references for the benchmarks and the tests that check our fast paths against them.

``measure_one_at_a_time``: exact zero-out FIS with one full forward pass from the embeddings per ablation (the ablation
applied by a ``run_with_hooks`` hook) and a clean pass for reference; the same readings as
:func:`trace_circuits.influence.run_copies`, so the numbers must agree.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Sequence

import torch
from tqdm.auto import tqdm

from trace_circuits.influence import Measure, TraceContext, value_mask
from trace_circuits.names import NodeRef, hook_name
from trace_circuits.prompts import EncodedPrompts, iter_batches


def measure_one_at_a_time(ctx: TraceContext, encoded: EncodedPrompts, edits: Sequence[NodeRef], batch_size: int = 8,
                          progress: bool = False) -> Measure:
    model = ctx.model
    device = next(model.parameters()).device
    batches = list(iter_batches(encoded, batch_size, device))
    drops = defaultdict(list)
    clean_cache = {}
    for node in tqdm([None] + list(edits), desc="one pass per ablation", disable=not progress):
        sums = {"feat": defaultdict(float), "head": 0, "mlp": 0, "r": 0.0}
        for bi, b in enumerate(batches):
            store = {}
            mask = b.attention_mask.bool()
            V = value_mask(encoded, b).float()
            fwd = []
            if node is not None:
                if node.kind == "feature":
                    fwd.append((node.hook_name, lambda a, hook, n=node: ctx.feature_edit(n.layer, a, mask, n.index)))
                elif node.kind == "head":
                    def zero_head(a, hook, h=node.index):
                        a = a.clone()
                        a[:, :, h] = 0
                        return a
                    fwd.append((node.hook_name, zero_head))
                else:
                    fwd.append((node.hook_name, lambda a, hook: torch.zeros_like(a)))
            for layer in ctx.sae_layers:
                def read(a, hook, layer=layer):
                    x = a.float()
                    ok = mask & (x.norm(dim=-1) <= ctx.limit[layer])
                    store[("f", layer)] = (ctx.saes[layer].encode(x) * (ok.float() * V)[..., None]).max(1).values
                fwd.append((hook_name("resid_post", layer), read))
            for layer in ctx.down_layers:
                fwd.append((hook_name("z", layer), lambda a, hook, layer=layer: store.__setitem__(("z", layer),
                                                                                                  a.float())))
                fwd.append((hook_name("mlp_out", layer), lambda a, hook, layer=layer: store.__setitem__(("m", layer),
                                                                                                        a.float())))
            fwd.append((ctx.readout.hook_name, lambda a, hook: store.__setitem__("r", ctx.readout.score(a[:, -1]))))
            with torch.inference_mode():
                model.run_with_hooks(b.tokens, attention_mask=b.attention_mask, return_type=None, fwd_hooks=fwd)
            if node is None:
                clean_cache[bi] = store
                continue
            clean = clean_cache[bi]
            for layer in ctx.sae_layers:
                sums["feat"][layer] = sums["feat"][layer] + (clean[("f", layer)] - store[("f", layer)]).sum(0)
            head_rows, mlp_rows = [], []
            for layer in ctx.down_layers:
                z0, z1 = clean[("z", layer)], store[("z", layer)]
                head_rows.append(((z0 - z1).norm(dim=-1) * V[..., None]).sum(1) /
                                 (z0.norm(dim=-1) * V[..., None]).sum(1).clamp_min(1e-12))
                m0, m1 = clean[("m", layer)], store[("m", layer)]
                mlp_rows.append(((m0 - m1).norm(dim=-1) * V).sum(1) / (m0.norm(dim=-1) * V).sum(1).clamp_min(1e-12))
            sums["head"] = sums["head"] + torch.stack(head_rows, 1).sum(0)
            sums["mlp"] = sums["mlp"] + torch.stack(mlp_rows, 1).sum(0)
            sums["r"] += float((clean["r"] - store["r"]).sum())
        if node is not None:
            for layer in ctx.sae_layers:
                drops[("f", layer)].append(sums["feat"][layer].cpu())
            drops["head"].append(sums["head"].cpu())
            drops["mlp"].append(sums["mlp"].cpu())
            drops["r"].append(sums["r"])
    out = Measure(n=len(encoded))
    out.feat_clean = {layer: sum(clean_cache[bi][("f", layer)].sum(0).cpu() for bi in clean_cache)
                      for layer in ctx.sae_layers}
    out.feat_drop = {layer: torch.stack(drops[("f", layer)]) for layer in ctx.sae_layers}
    out.head_rel = torch.stack(drops["head"])
    out.mlp_rel = torch.stack(drops["mlp"])
    out.readout_drop = torch.tensor(drops["r"])
    out.readout_clean = float(sum(clean_cache[bi]["r"].sum() for bi in clean_cache))
    return out
