"""Stage 3 of TraceRouter: feature influence scores (FIS) by zero-out interventions, and the circuit they draw.

Nodes
-----
Sources: the malicious SAE features at the onset layer ``l0`` (stage 2). Downstream nodes: every SAE feature of
the shipped SAEs at layers ``> l0`` (``blocks.{l}.hook_resid_post``), every attention head (``blocks.{l}.attn.
hook_z``, per head) and every MLP output (``blocks.{l}.hook_mlp_out``) in layers ``l0+1 .. L-1``, and the readout.

Readout
-------
A harmful-vs-benign probe on the last layer's residual stream at the last prompt position (where the answer
starts), normalised so the benign mean is 0 and the harmful mean is 1:

    r(x) = (<h_{L-1}(x)[-1], u> - m_B) / (m_H - m_B),   u = (mu_H - mu_B) / ||mu_H - mu_B||

with ``mu_H, mu_B`` the mean last-position residuals over the harmful / benign prompts, and ``m_H, m_B`` their
projections on ``u``.

Zero-out interventions (exact, batched)
---------------------------------------
Zeroing SAE feature ``f`` at layer ``l`` keeps the SAE's error term, so the only change is that feature's decoder
contribution: ``x' = x - a_f(x) D_f`` at every real position (padding and massive-norm sink positions excluded),
``D_f`` its unit decoder row (SAE-Lens TopK with decoder-norm rescaling). Zeroing a head sets its ``hook_z`` to 0;
zeroing an MLP sets ``hook_mlp_out`` to 0 (all positions). Many ablations run in one forward pass: copy ``c`` of
the batch carries ablation ``c`` (copy 0 is clean), stacked along the batch axis, and the pass starts from the
cached clean residual after layer ``l0`` (``start_at_layer = l0 + 1``), so layers ``<= l0`` run once.

Influence of node ``s`` on node ``t`` (the link weight), averaged over the harmful prompts ``i``:

    SAE feature t:   FIS(s -> t) = sum_i [v_t(x_i) - v_t(x_i | do(s = 0))] / sum_i v_t(x_i)
                     v_t = max of the feature's activation over the prompt's own tokens and generation prompt
                     (as in stage 2; massive positions skipped). Signed: > 0 when s drives t.
    head / MLP t:    FIS(s -> t) = mean_i  sum_p ||o_t(x_i)[p] - o_t(x_i | do(s = 0))[p]|| / sum_p ||o_t(x_i)[p]||
                     (o_t the head's z or the MLP output; p over the same positions). Unsigned, in [0, inf).
    readout:         FIS(s -> readout) = mean_i [r(x_i) - r(x_i | do(s = 0))]
                     the fraction of the harmful-benign readout gap that s carries. Signed.

Attribution patching (the gradient pre-filter)
----------------------------------------------
A first-order estimate of every node's zero-out effect on the readout from ONE forward and backward pass:

    r(x) - r(x | do(s = 0)) ~= mean_i sum_p  a_s(x_i)[p] <D_s, dr/dx_l[p]>        (SAE feature s at layer l)
                             ~= mean_i sum_p <o_s(x_i)[p], dr/do_s[p]>             (head or MLP output o_s)

It ranks all downstream nodes; the top ``n_candidates`` (plus the nodes the sources drive most) are then
measured exactly, and their Spearman rank correlation with the exact effects is reported.
"""

from __future__ import annotations

import math
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import numpy as np
import torch
from jaxtyping import Float
from tqdm.auto import tqdm

from trace_circuits.circuit import READOUT_ID, Circuit, Link, Node, node_depth, node_id
from trace_circuits.errors import TraceCircuitsError
from trace_circuits.models import model_info
from trace_circuits.prompts import EncodedPrompts, as_prompt_list, encode_prompts, iter_batches


# ----------------------------------------------------------------------------------------------------------
# Nodes, readout and the traced context


@dataclass(frozen=True)
class NodeRef:
    """A node to ablate or read: ``kind`` is "feature" (an SAE latent), "head", "mlp" or "readout"."""

    kind: str
    layer: int
    index: int = 0

    @property
    def id(self) -> str:
        return node_id(self.kind, self.layer, self.index)

    @property
    def depth(self) -> float:
        return node_depth(self.kind, self.layer)


@dataclass
class Readout:
    """``r(x) = (<h, u> - m_B) / (m_H - m_B)`` on ``hook_name`` at the last position (see the module docstring)."""

    hook_name: str
    direction: torch.Tensor  # unit vector [d_model]
    benign_mean: float
    harmful_mean: float

    def score(self, h_last: Float[torch.Tensor, "... d_model"]) -> Float[torch.Tensor, "..."]:
        return ((h_last.float() @ self.direction.to(h_last.device)) - self.benign_mean) / (
            self.harmful_mean - self.benign_mean)

    def to_json(self) -> dict:
        return {"hook_name": self.hook_name, "benign_mean": self.benign_mean, "harmful_mean": self.harmful_mean,
                "definition": "r(x) = (<h[-1], u> - m_B) / (m_H - m_B), u = unit(mean_H h[-1] - mean_B h[-1]) on "
                              f"{self.hook_name}; 0 = benign mean, 1 = harmful mean"}


def _final_hook(model) -> str:
    return f"blocks.{model.cfg.n_layers - 1}.hook_resid_post"


@torch.inference_mode()
def last_position_residuals(model, encoded: EncodedPrompts, batch_size: int = 16, progress: bool = False,
                            desc: str = "readout", layer: Optional[int] = None) -> torch.Tensor:
    """``h_l(x)[-1]`` for every prompt: ``blocks.{l}.hook_resid_post`` at the last prompt position, [n, d_model]
    (default ``l`` = the last layer)."""
    device = next(model.parameters()).device
    stop = model.cfg.n_layers if layer is None else layer + 1
    out = torch.zeros(len(encoded), model.cfg.d_model)
    n_batches = math.ceil(len(encoded) / batch_size)
    for b in tqdm(iter_batches(encoded, batch_size, device), total=n_batches, desc=desc, disable=not progress):
        h = model(b.tokens, attention_mask=b.attention_mask, stop_at_layer=stop)
        out[b.indices] = h[:, -1].float().cpu()
    return out


def fit_readout(model, harmful: EncodedPrompts, benign: EncodedPrompts, batch_size: int = 16,
                progress: bool = False) -> Readout:
    """The difference-of-means probe on the last layer (see :class:`Readout`)."""
    H = last_position_residuals(model, harmful, batch_size, progress, "readout (harmful)")
    B = last_position_residuals(model, benign, batch_size, progress, "readout (benign)")
    diff = H.mean(0) - B.mean(0)
    if diff.norm() == 0:
        raise TraceCircuitsError("harmful and benign prompts give identical final activations; use different sets")
    u = diff / diff.norm()
    return Readout(_final_hook(model), u, float((B @ u).mean()), float((H @ u).mean()))


def decoder_directions(sae) -> torch.Tensor:
    """``D`` [d_sae, d_model]: what one unit of each latent adds to the residual (SAE-Lens decode convention)."""
    W = sae.W_dec.detach().float()
    if getattr(sae.cfg, "rescale_acts_by_decoder_norm", False):
        W = W / W.norm(dim=-1, keepdim=True)
    return W


def _massive_limit(sae) -> float:
    t = (getattr(sae, "trace_circuits_meta", None) or {}).get("massive_norm_threshold")
    return float("inf") if t is None else float(t)


@dataclass
class _Context:
    """What every traced forward pass needs: the model, the onset layer, the SAEs, the readout."""

    model: Any
    onset: int
    saes: dict  # layer -> SAE (the onset SAE and the downstream ones)
    readout: Readout
    D: dict = field(default_factory=dict)  # layer -> decoder directions
    limit: dict = field(default_factory=dict)  # layer -> massive norm threshold

    def __post_init__(self):
        for layer, sae in self.saes.items():
            self.D[layer] = decoder_directions(sae).to(next(self.model.parameters()).device)
            self.limit[layer] = _massive_limit(sae)

    @property
    def n_layers(self) -> int:
        return self.model.cfg.n_layers

    @property
    def down_layers(self) -> list[int]:
        return list(range(self.onset + 1, self.n_layers))

    @property
    def sae_layers(self) -> list[int]:
        return sorted(layer for layer in self.saes if layer > self.onset)

    @property
    def n_heads(self) -> int:
        return self.model.cfg.n_heads


@dataclass
class _Batch:
    tokens: torch.Tensor
    mask: torch.Tensor  # [B, T] real tokens
    value: torch.Tensor  # [B, T] the prompt's own text and generation prompt
    x0: torch.Tensor  # clean residual after the onset layer [B, T, d]


def _value_mask(encoded: EncodedPrompts, b) -> torch.Tensor:
    """[batch, pos] True at the prompt's own text and the generation prompt (where stage 2 reads features)."""
    value = torch.zeros_like(b.attention_mask, dtype=torch.bool)
    for r, i in enumerate(b.indices):
        value[r, b.n_pad[r] + encoded.content_spans[i][0]:] = True
    return value


def _prepare(ctx: _Context, encoded: EncodedPrompts, batch_size: int) -> list[_Batch]:
    model = ctx.model
    device = next(model.parameters()).device
    out = []
    with torch.inference_mode():
        for b in iter_batches(encoded, batch_size, device):
            x0 = model(b.tokens, attention_mask=b.attention_mask, stop_at_layer=ctx.onset + 1)
            out.append(_Batch(b.tokens, b.attention_mask.bool(), _value_mask(encoded, b), x0.clone()))
    return out


def _feature_edit(ctx: _Context, layer: int, x: torch.Tensor, mask: torch.Tensor, feature: int) -> torch.Tensor:
    """``x - a_f(x) D_f`` at real, non-massive positions."""
    sae = ctx.saes[layer]
    a = sae.encode(x.float())[..., feature]
    ok = mask & (x.float().norm(dim=-1) <= ctx.limit[layer])
    return x - (a * ok)[..., None].to(x.dtype) * ctx.D[layer][feature].to(x.dtype)


def _hook_of(node: NodeRef) -> str:
    return {"feature": f"blocks.{node.layer}.hook_resid_post", "head": f"blocks.{node.layer}.attn.hook_z",
            "mlp": f"blocks.{node.layer}.hook_mlp_out"}[node.kind]


# ----------------------------------------------------------------------------------------------------------
# Exact zero-out measurements: many ablations stacked along the batch


@dataclass
class _Measure:
    """Per-copy sums over prompts (copy 0 clean). Feature tensors are per SAE layer."""

    feat_clean: dict = field(default_factory=dict)  # layer -> [F] sum_i v_t(x_i)
    feat_drop: dict = field(default_factory=dict)  # layer -> [C, F] sum_i (v_clean - v_c)
    head_rel: Optional[torch.Tensor] = None  # [C, n_down, H] sum_i rel change
    mlp_rel: Optional[torch.Tensor] = None  # [C, n_down]
    readout_drop: Optional[torch.Tensor] = None  # [C] sum_i (r_clean - r_c)
    readout_clean: float = 0.0
    n: int = 0

    def add(self, other: "_Measure") -> None:
        for layer, v in other.feat_clean.items():
            self.feat_clean[layer] = self.feat_clean.get(layer, 0) + v
            self.feat_drop[layer] = self.feat_drop.get(layer, 0) + other.feat_drop[layer]
        for name in ("head_rel", "mlp_rel", "readout_drop"):
            mine, theirs = getattr(self, name), getattr(other, name)
            setattr(self, name, theirs.clone() if mine is None else mine + theirs)
        self.readout_clean += other.readout_clean
        self.n += other.n


@torch.inference_mode()
def _run_copies(ctx: _Context, batch: _Batch, edits: Sequence[NodeRef], top_tokens: Optional[dict] = None
                ) -> _Measure:
    """One forward pass over ``len(edits) + 1`` stacked copies of ``batch`` (copy 0 clean, copy c ablates
    ``edits[c-1]``), reading every downstream node."""
    model = ctx.model
    C = len(edits) + 1
    B, T, _ = batch.x0.shape
    X = batch.x0.repeat(C, 1, 1)
    M = batch.mask.repeat(C, 1)
    V = batch.value.float()
    by_hook: dict[str, list[tuple[int, NodeRef]]] = defaultdict(list)
    for c, node in enumerate(edits, start=1):
        rows = slice(c * B, (c + 1) * B)
        if node.kind == "feature" and node.layer == ctx.onset:
            X[rows] = _feature_edit(ctx, ctx.onset, X[rows], batch.mask, node.index)
        elif node.kind in ("feature", "head", "mlp") and node.layer > ctx.onset:
            by_hook[_hook_of(node)].append((c, node))
        else:
            raise TraceCircuitsError(f"cannot ablate {node.id}: only nodes at or after the onset layer {ctx.onset}")

    def edit_hook(items):
        def hook(act, hook):
            act = act.clone()
            for c, node in items:
                rows = slice(c * B, (c + 1) * B)
                if node.kind == "feature":
                    act[rows] = _feature_edit(ctx, node.layer, act[rows], batch.mask, node.index)
                elif node.kind == "head":
                    act[rows, :, node.index] = 0
                else:
                    act[rows] = 0
            return act

        return hook

    out = _Measure(n=B)
    down = ctx.down_layers
    H = ctx.n_heads
    out.head_rel = torch.zeros(C, len(down), H)
    out.mlp_rel = torch.zeros(C, len(down))

    def read_features(layer):
        def hook(act, hook):
            x = act.float()
            ok = M & (x.norm(dim=-1) <= ctx.limit[layer])
            a = ctx.saes[layer].encode(x) * (ok.float() * V.repeat(C, 1))[..., None]
            v, where = a.view(C, B, T, -1).max(dim=2)  # [C, B, F]
            out.feat_clean[layer] = v[0].sum(0).cpu()
            out.feat_drop[layer] = (v[0:1] - v).sum(1).cpu()
            if top_tokens is not None:
                top_tokens.setdefault(layer, []).append((v[0].cpu(), where[0].cpu(), batch.tokens.cpu()))
            return None

        return hook

    def read_heads(j):
        def hook(z, hook):
            z = z.float().view(C, B, T, H, -1)
            num = ((z - z[0:1]).norm(dim=-1) * V[None, :, :, None]).sum(2)  # [C, B, H]
            den = (z[0].norm(dim=-1) * V[:, :, None]).sum(1).clamp_min(1e-12)  # [B, H]
            out.head_rel[:, j] = (num / den).sum(1).cpu()
            return None

        return hook

    def read_mlp(j):
        def hook(m, hook):
            m = m.float().view(C, B, T, -1)
            num = ((m - m[0:1]).norm(dim=-1) * V[None]).sum(2)  # [C, B]
            den = (m[0].norm(dim=-1) * V).sum(1).clamp_min(1e-12)
            out.mlp_rel[:, j] = (num / den).sum(1).cpu()
            return None

        return hook

    def read_final(act, hook):
        r = ctx.readout.score(act[:, -1]).view(C, B)
        out.readout_drop = (r[0:1] - r).sum(1).cpu()
        out.readout_clean = float(r[0].sum())
        return None

    fwd = [(name, edit_hook(items)) for name, items in by_hook.items()]
    fwd += [(f"blocks.{layer}.hook_resid_post", read_features(layer)) for layer in ctx.sae_layers]
    fwd += [(f"blocks.{layer}.attn.hook_z", read_heads(j)) for j, layer in enumerate(down)]
    fwd += [(f"blocks.{layer}.hook_mlp_out", read_mlp(j)) for j, layer in enumerate(down)]
    fwd += [(ctx.readout.hook_name, read_final)]
    model.run_with_hooks(X, start_at_layer=ctx.onset + 1, attention_mask=M.long(), return_type=None, fwd_hooks=fwd)
    return out


def measure_ablations(ctx: _Context, batches: Sequence[_Batch], edits: Sequence[NodeRef], copies_per_pass: int = 16,
                      progress: bool = False, desc: str = "zero-out", top_tokens: Optional[dict] = None) -> _Measure:
    """Exact zero-out effects of ``edits`` on every downstream node, summed over all prompts in ``batches``.

    Ablations are stacked ``copies_per_pass`` at a time (plus the clean copy) along the batch axis.
    """
    total = _Measure()
    groups = [list(edits[i:i + copies_per_pass]) for i in range(0, len(edits), copies_per_pass)] or [[]]
    bar = tqdm(total=len(groups) * len(batches), desc=desc, disable=not progress)
    parts: list[_Measure] = []
    for g, group in enumerate(groups):
        acc = _Measure()
        for batch in batches:
            acc.add(_run_copies(ctx, batch, group, top_tokens if g == 0 else None))
            bar.update(1)
        parts.append(acc)
    bar.close()
    # stitch the groups: copy 0 of each group is the same clean pass
    total.n = parts[0].n
    total.readout_clean = parts[0].readout_clean
    total.feat_clean = parts[0].feat_clean
    total.feat_drop = {layer: torch.cat([p.feat_drop[layer][1:] for p in parts]) for layer in ctx.sae_layers}
    total.head_rel = torch.cat([p.head_rel[1:] for p in parts])
    total.mlp_rel = torch.cat([p.mlp_rel[1:] for p in parts])
    total.readout_drop = torch.cat([p.readout_drop[1:] for p in parts])
    return total


def measure_one_at_a_time(ctx: _Context, encoded: EncodedPrompts, edits: Sequence[NodeRef], batch_size: int = 8,
                          progress: bool = False) -> _Measure:
    """The naive way (for benchmarks and tests): one full forward pass from the embeddings per ablation, with
    the ablation applied by a ``run_with_hooks`` hook, and a clean pass for reference."""
    model = ctx.model
    device = next(model.parameters()).device
    batches = list(iter_batches(encoded, batch_size, device))
    drops = defaultdict(list)
    clean_cache = {}
    todo = [None] + list(edits)
    for node in tqdm(todo, desc="one pass per ablation", disable=not progress):
        sums = {"feat": defaultdict(float), "head": 0, "mlp": 0, "r": 0.0}
        for bi, b in enumerate(batches):
            store = {}
            mask = b.attention_mask.bool()
            V = _value_mask(encoded, b).float()
            fwd = []
            if node is not None:
                if node.kind == "feature":
                    fwd.append((_hook_of(node), lambda a, hook, n=node: _feature_edit(ctx, n.layer, a, mask, n.index)))
                elif node.kind == "head":
                    def zh(a, hook, h=node.index):
                        a = a.clone()
                        a[:, :, h] = 0
                        return a
                    fwd.append((_hook_of(node), zh))
                else:
                    fwd.append((_hook_of(node), lambda a, hook: torch.zeros_like(a)))
            for layer in ctx.sae_layers:
                def rf(a, hook, layer=layer):
                    x = a.float()
                    ok = mask & (x.norm(dim=-1) <= ctx.limit[layer])
                    store[("f", layer)] = (ctx.saes[layer].encode(x) * (ok.float() * V)[..., None]).max(1).values
                fwd.append((f"blocks.{layer}.hook_resid_post", rf))
            for layer in ctx.down_layers:
                fwd.append((f"blocks.{layer}.attn.hook_z", lambda a, hook, layer=layer: store.__setitem__(("z", layer), a.float())))
                fwd.append((f"blocks.{layer}.hook_mlp_out", lambda a, hook, layer=layer: store.__setitem__(("m", layer), a.float())))
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
    out = _Measure(n=len(encoded))
    out.feat_clean = {layer: sum(clean_cache[bi][("f", layer)].sum(0).cpu() for bi in clean_cache)
                      for layer in ctx.sae_layers}
    out.feat_drop = {layer: torch.stack(drops[("f", layer)]) for layer in ctx.sae_layers}
    out.head_rel = torch.stack(drops["head"])
    out.mlp_rel = torch.stack(drops["mlp"])
    out.readout_drop = torch.tensor(drops["r"])
    out.readout_clean = float(sum(clean_cache[bi]["r"].sum() for bi in clean_cache))
    return out


# ----------------------------------------------------------------------------------------------------------
# Attribution patching


def attribution_scores(ctx: _Context, batches: Sequence[_Batch], progress: bool = False) -> dict[str, float]:
    """First-order estimate of every node's zero-out effect on the readout (module docstring), one forward
    and one backward pass per batch. Keys are node ids; onset-layer features included."""
    model = ctx.model
    sums: dict[str, torch.Tensor] = {}
    n = 0
    for batch in tqdm(batches, desc="attribution patching", disable=not progress):
        store: dict[Any, torch.Tensor] = {}

        def keep(key):
            def hook(act, hook):
                store[key] = act
                return None

            return hook

        x0 = batch.x0.detach().clone().requires_grad_(True)
        fwd = [(f"blocks.{layer}.hook_resid_post", keep(("f", layer))) for layer in ctx.sae_layers]
        fwd += [(f"blocks.{layer}.attn.hook_z", keep(("z", layer))) for layer in ctx.down_layers]
        fwd += [(f"blocks.{layer}.hook_mlp_out", keep(("m", layer))) for layer in ctx.down_layers]
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
                s = (a * (g.float() @ ctx.D[layer].T)).sum((0, 1))
                key = ("f", layer)
                sums[key] = sums.get(key, 0) + s.cpu()
            for layer in ctx.down_layers:
                z = store[("z", layer)]
                s = ((z.detach() * grad[("z", layer)]).sum(-1) * mask[..., None]).sum((0, 1))
                sums[("z", layer)] = sums.get(("z", layer), 0) + s.cpu()
                m = store[("m", layer)]
                s = ((m.detach() * grad[("m", layer)]).sum(-1) * mask).sum()
                sums[("m", layer)] = sums.get(("m", layer), 0) + s.cpu()
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


def _parse(nid: str) -> NodeRef:
    if nid == READOUT_ID:
        return NodeRef("readout", -1)
    layer_s, rest = nid.split(".", 1)
    layer = int(layer_s[1:])
    if rest == "MLP":
        return NodeRef("mlp", layer)
    if rest.startswith("H"):
        return NodeRef("head", layer, int(rest[1:]))
    return NodeRef("feature", layer, int(rest[1:]))


# ----------------------------------------------------------------------------------------------------------
# The whole stage


def _spearman(a: Sequence[float], b: Sequence[float]) -> Optional[float]:
    from scipy.stats import spearmanr

    if len(a) < 3:
        return None
    rho = spearmanr(a, b).statistic
    return None if not np.isfinite(rho) else float(rho)


def load_downstream_saes(model, onset_layer: int, model_name: Optional[str] = None) -> dict:
    """The shipped SAEs at the onset layer and every later layer, ``{layer: SAE}``."""
    from trace_circuits.names import layer_of as _layer_of
    from trace_circuits.saes import list_saes, load_sae

    name = model_name or model_info(model).name
    out = {}
    for s in list_saes(name):
        layer = _layer_of(s["hook_name"])
        if layer >= onset_layer:
            out[layer] = load_sae(name, s["hook_name"], model=model)
    if onset_layer not in out:
        raise TraceCircuitsError(f"no shipped SAE for {name} at the onset layer {onset_layer}; train one with "
                                 f"`trace-circuits train-sae --layers {onset_layer}`")
    return out


def _top_tokens_for(model, records: list, feature: int, k: int = 5) -> list[list]:
    vals = torch.cat([v[:, feature] for v, _, _ in records])
    order = torch.argsort(vals, descending=True)[:k]
    rows = []
    offsets = np.cumsum([0] + [v.shape[0] for v, _, _ in records])
    for j in order.tolist():
        if vals[j] <= 0:
            break
        r = int(np.searchsorted(offsets, j, side="right") - 1)
        v, where, tokens = records[r]
        row = j - offsets[r]
        tok = int(tokens[row, int(where[row, feature])])
        rows.append([model.tokenizer.decode([tok]), float(vals[j])])
    return rows


def trace_circuit(model, features, harmful, benign, *, onset_layer: Optional[int] = None, saes: Optional[dict] = None,
                  sources: Optional[Sequence[int]] = None, max_sources: int = 16, n_prompts: int = 48,
                  n_candidates: int = 50, min_relative_activation: float = 0.05, batch_size: int = 8,
                  copies_per_pass: int = 16, chat: Optional[bool] = None, progress: bool = True) -> Circuit:
    """Stage 3: exact batched FIS from the malicious features, attribution pre-filter, chain links, the circuit.

    ``features``: a :class:`~trace_circuits.features.FeatureResult` (its harmful features are the sources) or a
    list of feature ids at ``onset_layer``. ``harmful`` / ``benign``: prompt sets; the readout is fitted on all of
    them, the interventions run on the first ``n_prompts`` harmful prompts. Returns the full (unpruned) circuit;
    prune it with :meth:`Circuit.prune`.
    """
    from trace_circuits.models import model_fingerprint
    from trace_circuits.names import layer_of as _layer_of

    t_start = time.time()
    if hasattr(features, "harmful_features"):
        src = list(features.harmful_features) if sources is None else list(sources)
        if onset_layer is None:
            onset_layer = _layer_of(features.hook_name)
        top_examples = getattr(features, "examples", {}) or {}
        src_stats = features.table
    else:
        src = list(sources if sources is not None else features)
        top_examples, src_stats = {}, None
    if onset_layer is None:
        raise TraceCircuitsError("pass onset_layer=... (the layer of the malicious features)")
    src = [int(f) for f in src][:max_sources]
    if not src:
        raise TraceCircuitsError("no malicious features to trace; stage 2 selected none (lower its thresholds or "
                                 "pass sources=[...])")
    if onset_layer >= model.cfg.n_layers - 1:
        raise TraceCircuitsError(f"onset layer {onset_layer} leaves no downstream layers to trace")
    saes = dict(saes) if saes is not None else load_downstream_saes(model, onset_layer)
    if onset_layer not in saes:
        raise TraceCircuitsError(f"pass the SAE of the onset layer {onset_layer} in saes={{layer: SAE}}")
    device = next(model.parameters()).device
    saes = {layer: sae.to(device) for layer, sae in saes.items()}
    d_sae = saes[onset_layer].cfg.d_sae
    bad = [f for f in src if not 0 <= f < d_sae]
    if bad:
        raise TraceCircuitsError(f"source features {bad} are outside the onset SAE (0..{d_sae - 1})")

    hp, bp = as_prompt_list(harmful), as_prompt_list(benign)
    enc_h, enc_b = encode_prompts(model, hp, chat=chat), encode_prompts(model, bp, chat=chat)
    readout = fit_readout(model, enc_h, enc_b, batch_size=16, progress=progress)
    ctx = _Context(model, onset_layer, saes, readout)
    fis_prompts = hp[:n_prompts]
    enc_fis = encode_prompts(model, fis_prompts, chat=chat)
    batches = _prepare(ctx, enc_fis, batch_size)
    n = len(enc_fis)

    # 1. exact FIS from every source to every downstream node
    t0 = time.time()
    records: dict = {}
    src_nodes = [NodeRef("feature", onset_layer, f) for f in src]
    m_src = measure_ablations(ctx, batches, src_nodes, copies_per_pass, progress, "FIS: zero-out sources", records)
    t_fis = time.time() - t0
    clean_mean = {layer: m_src.feat_clean[layer] / n for layer in ctx.sae_layers}
    live = {layer: torch.nonzero(clean_mean[layer] >= min_relative_activation * clean_mean[layer].max()).flatten()
            for layer in ctx.sae_layers}

    def weights_to(m: _Measure) -> dict[str, torch.Tensor]:
        """Link weights to every downstream node: {target id: [n_ablations]}."""
        out = {}
        for layer in ctx.sae_layers:
            rel = m.feat_drop[layer] / m_src.feat_clean[layer].clamp_min(1e-12)
            for j in live[layer].tolist():
                out[node_id("feature", layer, j)] = rel[:, j]
        for jl, layer in enumerate(ctx.down_layers):
            for h in range(ctx.n_heads):
                out[node_id("head", layer, h)] = m.head_rel[:, jl, h] / m.n
            out[node_id("mlp", layer)] = m.mlp_rel[:, jl] / m.n
        out[READOUT_ID] = m.readout_drop / m.n
        return out

    w_src = weights_to(m_src)

    # 2. attribution patching: estimated readout effect of every node
    t0 = time.time()
    attr = attribution_scores(ctx, batches, progress)
    t_attr = time.time() - t0
    down_ids = [k for k in w_src if k != READOUT_ID]
    by_attr = sorted(down_ids, key=lambda k: -abs(attr.get(k, 0.0)))[:n_candidates]
    fis_max = {k: float(w_src[k].abs().max()) for k in down_ids}
    by_fis = sorted(down_ids, key=lambda k: -fis_max[k])[: max(8, n_candidates // 2)]
    candidates = sorted(set(by_attr) | set(by_fis), key=lambda k: (_parse(k).depth, k))
    cand_nodes = [_parse(k) for k in candidates]

    # 3. exact zero-out of every candidate: chain links and exact readout effects
    t0 = time.time()
    m_cand = measure_ablations(ctx, batches, cand_nodes, copies_per_pass, progress, "FIS: zero-out candidates")
    t_chain = time.time() - t0
    w_cand = weights_to(m_cand)
    exact_readout = {k: float(w_cand[READOUT_ID][c]) for c, k in enumerate(candidates)}
    exact_readout.update({node_id("feature", onset_layer, f): float(w_src[READOUT_ID][s]) for s, f in enumerate(src)})
    top50 = [k for k in by_attr[:50]]
    agreement = {
        "attribution_spearman_top": _spearman([attr[k] for k in top50], [exact_readout[k] for k in top50]),
        "attribution_spearman_top_n": len(top50),
        "attribution_spearman_candidates": _spearman([attr.get(k, 0.0) for k in candidates],
                                                     [exact_readout[k] for k in candidates]),
        "attribution_spearman_sources": _spearman([attr[node_id("feature", onset_layer, f)] for f in src],
                                                  [exact_readout[node_id("feature", onset_layer, f)] for f in src]),
    }

    # 4. the graph
    nodes: list[Node] = []
    for s, f in enumerate(src):
        nid = node_id("source", onset_layer, f)
        scores = {"readout_effect": exact_readout[nid], "attribution": attr.get(nid)}
        if src_stats is not None and f in src_stats.index:
            row = src_stats.loc[f]
            scores.update(effect_size=float(row["effect_size"]), mean_harmful=float(row["mean_harmful"]),
                          mean_benign=float(row["mean_benign"]), q_value=float(row["q_value"]))
        ex = top_examples.get(f, top_examples.get(str(f), {})) or {}
        toks = ex.get("top_tokens") or _top_tokens_for_onset(model, ctx, batches, f)
        nodes.append(Node(nid, "source", onset_layer, f, f"L{onset_layer} F{f}", scores=scores, top_tokens=toks))
    for k, ref in zip(candidates, cand_nodes):
        scores = {"readout_effect": exact_readout[k], "attribution": attr.get(k), "max_fis_from_sources": fis_max[k]}
        toks = []
        if ref.kind == "feature":
            scores["mean_activation_harmful"] = float(clean_mean[ref.layer][ref.index])
            toks = _top_tokens_for(model, records[ref.layer], ref.index)
            label = f"L{ref.layer} F{ref.index}"
        elif ref.kind == "head":
            label = f"L{ref.layer} head {ref.index}"
        else:
            label = f"L{ref.layer} MLP"
        nodes.append(Node(k, ref.kind, ref.layer, ref.index, label, scores=scores, top_tokens=toks))
    nodes.append(Node(READOUT_ID, "readout", model.cfg.n_layers, 0, "harmfulness readout",
                      scores={"clean_mean": m_src.readout_clean / n}))

    links: list[Link] = []
    cand_set = set(candidates)
    for s, f in enumerate(src):
        sid = node_id("source", onset_layer, f)
        for k in candidates + [READOUT_ID]:
            w = float(w_src[k][s])
            if abs(w) > 1e-6:
                links.append(Link(sid, k, w, "fis"))
    for c, (k, ref) in enumerate(zip(candidates, cand_nodes)):
        for t in candidates + [READOUT_ID]:
            if t == k or (t != READOUT_ID and _parse(t).depth <= ref.depth) or t not in w_cand:
                continue
            w = float(w_cand[t][c])
            if abs(w) > 1e-6:
                links.append(Link(k, t, w, "chain"))
    assert cand_set <= {n.id for n in nodes}

    meta = {
        "model": model_info(model).name,
        "model_fingerprint": model_fingerprint(model),
        "onset_layer": onset_layer,
        "sae_layers": sorted(saes),
        "sources": src,
        "n_prompts": n,
        "n_readout_prompts": {"harmful": len(hp), "benign": len(bp)},
        "readout": readout.to_json(),
        "readout_definition": readout.to_json()["definition"],
        "fis_definition": "FIS(s->t) = drop at t when s is zeroed (error term kept), averaged over harmful prompts: "
                          "relative drop of the target feature's max activation; relative L2 change of a head's z "
                          "or MLP output; drop of the readout as a fraction of the harmful-benign gap",
        "attribution_definition": "estimated readout drop = mean_i sum_p act . grad (attribution patching)",
        **agreement,
        "n_candidates": len(candidates),
        "min_relative_activation": min_relative_activation,
        "seconds": {"fis_sources": round(t_fis, 2), "attribution": round(t_attr, 2),
                    "chain": round(t_chain, 2), "total": round(time.time() - t_start, 2)},
    }
    circuit = Circuit(nodes, links, meta)
    circuit.readout = readout
    circuit.attribution = attr
    return circuit


def _top_tokens_for_onset(model, ctx: _Context, batches: Sequence[_Batch], feature: int, k: int = 5) -> list[list]:
    records = []
    with torch.inference_mode():
        for b in batches:
            x = b.x0.float()
            ok = b.mask & b.value & (x.norm(dim=-1) <= ctx.limit[ctx.onset])
            a = ctx.saes[ctx.onset].encode(x)[..., feature] * ok
            v, where = a.max(dim=1)
            records.append((v[:, None].cpu(), where[:, None].cpu(), b.tokens.cpu()))
    return _top_tokens_for(model, records, 0, k)
