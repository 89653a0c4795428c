"""Stage 3's pre-filter: attribution patching, a first-order estimate of every node's zero-out effect on the readout.

Attribution patching (the gradient pre-filter)
----------------------------------------------
A first-order estimate of every node's zero-out effect on the readout from ONE forward and backward pass:

    r(x) - r(x | do(s = 0)) ~= mean_i sum_p  a_s(x_i)[p] <D_s s(x_i[p]), dr/dx_l[p]>     (SAE feature s at layer l)
                             ~= mean_i sum_p <o_s(x_i)[p], dr/do_s[p]>                    (head or MLP output o_s)
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from tqdm.auto import tqdm

from trace_circuits.influence import PreparedBatch, TraceContext
from trace_circuits.names import hook_name, node_id
from trace_circuits.saes.encoding import out_scale


def attribution_scores(ctx: TraceContext, batches: Sequence[PreparedBatch], progress: bool = False
                       ) -> dict[str, float]:
    """First-order estimate of every node's zero-out effect on the readout (module docstring), one forward and one
    backward pass per batch. Keys are node ids; onset-layer features included."""
    model = ctx.model
    sums: dict[Any, torch.Tensor] = {}
    n = 0
    for batch in tqdm(batches, desc="attribution patching", disable=not progress):
        store: dict[Any, torch.Tensor] = {}

        def keep(key):
            def hook(act, hook):
                store[key] = act
                return None

            return hook

        x0 = batch.x0.detach().clone().requires_grad_(True)
        fwd = [(hook_name("resid_post", layer), keep(("f", layer))) for layer in ctx.sae_layers]
        fwd += [(hook_name("z", layer), keep(("z", layer))) for layer in ctx.down_layers]
        fwd += [(hook_name("mlp_out", layer), keep(("m", layer))) for layer in ctx.down_layers]
        fwd += [(ctx.readout.hook_name, keep("final"))]
        with torch.enable_grad():
            model.run_with_hooks(x0, start_at_layer=ctx.onset + 1, attention_mask=batch.mask.long(),
                                 return_type=None, fwd_hooks=fwd)
            keys = [k for k in store if k != "final"]
            # autograd.grad computes only these gradients (no weight gradients)
            grads = torch.autograd.grad(ctx.readout.score(store["final"][:, -1]).sum(), [x0] + [store[k] for k in keys])
        grad = dict(zip(keys, grads[1:]))
        with torch.no_grad():
            mask = batch.mask
            for layer, x, g in [(ctx.onset, x0, grads[0])] + [(layer, store[("f", layer)], grad[("f", layer)])
                                                              for layer in ctx.sae_layers]:
                xf = x.detach().float()
                ok = (mask & (xf.norm(dim=-1) <= ctx.limit[layer])).float()
                a = ctx.saes[layer].encode(xf) * ok[..., None]
                gs = g.float() * out_scale(ctx.norm[layer], xf)
                sums[("f", layer)] = sums.get(("f", layer), 0) + (a * (gs @ ctx.D[layer].T)).sum((0, 1)).cpu()
            for layer in ctx.down_layers:
                z, m = store[("z", layer)].detach(), store[("m", layer)].detach()
                sz = ((z * grad[("z", layer)]).sum(-1) * mask[..., None]).sum((0, 1))
                sm = ((m * grad[("m", layer)]).sum(-1) * mask).sum()
                sums[("z", layer)] = sums.get(("z", layer), 0) + sz.cpu()
                sums[("m", layer)] = sums.get(("m", layer), 0) + sm.cpu()
        n += batch.x0.shape[0]
    out: dict[str, float] = {}
    for (kind, layer), v in sums.items():
        v = (v / n).tolist() if torch.is_tensor(v) else v / n
        if kind == "f":
            out.update({node_id("feature", layer, j): float(x) for j, x in enumerate(v)})
        elif kind == "z":
            out.update({node_id("head", layer, h): float(x) for h, x in enumerate(v)})
        else:
            out[node_id("mlp", layer)] = float(v)
    return out
