"""Stage 3 measurements: feature influence scores (FIS) by exact zero-out interventions, and attribution patching.

Readout
-------
A harmful-vs-benign probe on the last layer's residual stream at the last prompt position (where the answer starts),
normalised so the benign mean is 0 and the harmful mean is 1:

    r(x) = (<h_{L-1}(x)[-1], u> - m_B) / (m_H - m_B),   u = unit(mean_H h[-1] - mean_B h[-1])

Zero-out interventions (exact, batched)
---------------------------------------
Zeroing SAE feature ``f`` at layer ``l`` keeps the SAE's error term, so the only change is that feature's decoder
contribution: ``x' = x - a_f(x) D_f s(x)`` at every real position (padding and massive-norm sink positions excluded),
with ``a_f`` the SAE's own ``encode`` and ``D_f s(x)`` its decoder row as SAE-Lens decodes it (any architecture; see
:mod:`trace_circuits.saes.encoding`). Zeroing a head sets its ``hook_z`` to 0; zeroing an MLP sets ``hook_mlp_out``
to 0. Many ablations run in one forward pass: copy ``c`` of the batch carries ablation ``c`` (copy 0 is clean),
stacked along the batch axis, and the pass starts from the cached clean residual after layer ``l0``
(``start_at_layer = l0 + 1``), so layers ``<= l0`` run once. A copy carries only the prompts its ablation can change
(a feature zeroed where it never fires changes nothing: its row would equal the clean one, drop 0), and only the
positions after the first one any copy changes (the clean prefix, from the clean keys and values). Downstream SAEs are
encoded only at the positions the readings use (the prompt's own text and the generation prompt).

Influence of node ``s`` on node ``t`` (the link weight), averaged over the harmful prompts ``i``:

    SAE feature t:   FIS(s -> t) = sum_i [v_t(x_i) - v_t(x_i | do(s = 0))] / sum_i v_t(x_i)
                     v_t = max of the feature's activation over the prompt's own tokens and generation prompt
                     (as in stage 2; massive positions skipped). Signed: > 0 when s drives t.
    head / MLP t:    FIS(s -> t) = mean_i  sum_p ||o_t(x_i)[p] - o_t(x_i | do(s = 0))[p]|| / sum_p ||o_t(x_i)[p]||
                     (o_t the head's z or the MLP output; p over the same positions). Unsigned, in [0, inf).
    readout:         FIS(s -> readout) = mean_i [r(x_i) - r(x_i | do(s = 0))]   (a fraction of the harmful-benign gap)

The gradient pre-filter that picks which nodes to measure exactly is in :mod:`trace_circuits.attribution`.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import torch
from jaxtyping import Float
from tqdm.auto import tqdm

from trace_circuits.activations import mean_difference, residuals_at
from trace_circuits.errors import TraceCircuitsError
from trace_circuits.names import NodeRef, hook_name
from trace_circuits.prompts import EncodedPrompts, iter_batches
from trace_circuits.saes.encoding import decoder_directions, massive_limit, normalization, out_scale


@dataclass
class Readout:
    """``r(x) = (<h, u> - m_B) / (m_H - m_B)`` on ``hook_name`` at the last position (module docstring)."""

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


def fit_readout(model, harmful: EncodedPrompts, benign: EncodedPrompts, batch_size: int = 16,
                progress: bool = False) -> Readout:
    """The difference-of-means probe on the last layer (see :class:`Readout`)."""
    H = residuals_at(model, harmful, None, None, batch_size, progress, "readout (harmful)")
    B = residuals_at(model, benign, None, None, batch_size, progress, "readout (benign)")
    u, _ = mean_difference(H, B)
    return Readout(hook_name("resid_post", model.cfg.n_layers - 1), u, float((B @ u).mean()), float((H @ u).mean()))


@dataclass
class TraceContext:
    """What every traced forward pass needs: the model, the onset layer, the SAEs (layer -> SAE), the readout."""

    model: Any
    onset: int
    saes: dict
    readout: Readout
    D: dict = field(default_factory=dict)  # layer -> decoder directions [d_sae, d_model]
    norm: dict = field(default_factory=dict)  # layer -> the SAE's input normalisation
    limit: dict = field(default_factory=dict)  # layer -> massive norm threshold

    def __post_init__(self):
        device = next(self.model.parameters()).device
        for layer, sae in self.saes.items():
            self.saes[layer] = sae.to(device)
            self.D[layer] = decoder_directions(sae).to(device)
            self.norm[layer] = normalization(sae)
            self.limit[layer] = massive_limit(sae)

    @property
    def down_layers(self) -> list[int]:
        return list(range(self.onset + 1, self.model.cfg.n_layers))

    @property
    def sae_layers(self) -> list[int]:
        return sorted(layer for layer in self.saes if layer > self.onset)

    def feature_edit(self, layer: int, x: torch.Tensor, mask: torch.Tensor, feature: int) -> torch.Tensor:
        """``x - a_f(x) D_f s(x)`` at real, non-massive positions."""
        xf = x.float()
        a = self.saes[layer].encode(xf)[..., feature]
        ok = mask & (xf.norm(dim=-1) <= self.limit[layer])
        removed = (a * ok)[..., None] * self.D[layer][feature] * out_scale(self.norm[layer], xf)
        return (xf - removed).to(x.dtype)


@dataclass
class PreparedBatch:
    """A left-padded batch and what its clean run leaves for the ablated ones: the residual after the onset layer,
    the keys and values of every later layer (the shared clean prefix), and per SAE layer the clean feature
    activations at value positions and the first position each feature is active at."""

    tokens: torch.Tensor
    mask: torch.Tensor  # [B, T] real tokens
    value: torch.Tensor  # [B, T] the prompt's own text and generation prompt
    x0: torch.Tensor  # clean residual after the onset layer [B, T, d]
    kv: dict = field(default_factory=dict)  # layer -> (keys, values) [B, T, n_kv_heads, d_head], before rotary
    feat: dict = field(default_factory=dict)  # layer -> clean feature activations at value positions [B, T, F]
    first_active: dict = field(default_factory=dict)  # layer -> [F] first position any row's feature is active
    active_rows: dict = field(default_factory=dict)  # layer -> [B, F] the feature is active somewhere in the row
    head_den: list = field(default_factory=list)  # per downstream layer: clean sum_p ||z_h[p]|| over value pos [B, H]
    mlp_den: list = field(default_factory=list)  # per downstream layer: clean sum_p ||mlp_out[p]|| [B]


def value_mask(encoded: EncodedPrompts, batch) -> torch.Tensor:
    """[batch, pos] True at the prompt's own text and the generation prompt (where stage 2 reads features)."""
    value = torch.zeros_like(batch.attention_mask, dtype=torch.bool)
    for r, i in enumerate(batch.indices):
        value[r, batch.n_pad[r] + encoded.content_spans[i][0]:] = True
    return value


@torch.inference_mode()
def prepare_batches(ctx: TraceContext, encoded: EncodedPrompts, batch_size: int) -> list[PreparedBatch]:
    """Left-padded batches and their clean run (module docstring), computed once and reused by every pass."""
    from transformer_lens.cache.key_value_cache import TransformerLensKeyValueCache

    model = ctx.model
    device = next(model.parameters()).device
    out = []
    for b in iter_batches(encoded, batch_size, device):
        x0 = model(b.tokens, attention_mask=b.attention_mask, stop_at_layer=ctx.onset + 1).clone()
        pb = PreparedBatch(b.tokens, b.attention_mask.bool(), value_mask(encoded, b), x0)
        cache = TransformerLensKeyValueCache.init_cache(model.cfg, device, len(b.indices))
        T = b.tokens.shape[1]

        def read(layer):
            def hook(act, hook):
                x = act.float()
                ok = pb.mask & (x.norm(dim=-1) <= ctx.limit[layer])
                a = ctx.saes[layer].encode(x) * ok[..., None]
                pos = torch.arange(T, device=x.device)[None, :, None].expand_as(a)
                pb.first_active[layer] = torch.where(a > 0, pos, T).amin(dim=(0, 1))
                pb.active_rows[layer] = (a > 0).any(dim=1)
                pb.feat[layer] = a * pb.value[..., None]
                return None

            return hook

        V = pb.value.float()
        n = len(ctx.down_layers)
        pb.head_den, pb.mlp_den = [None] * n, [None] * n

        def den(j, kind):
            def hook(act, hook):
                norms = act.float().norm(dim=-1)  # [B, T, H] for z, [B, T] for the MLP output
                if kind == "z":
                    pb.head_den[j] = (norms * V[:, :, None]).sum(1).clamp_min(1e-12)
                else:
                    pb.mlp_den[j] = (norms * V).sum(1).clamp_min(1e-12)
                return None

            return hook

        fwd = [(hook_name("resid_post", layer), read(layer)) for layer in ctx.sae_layers]
        fwd += [(hook_name("z", layer), den(j, "z")) for j, layer in enumerate(ctx.down_layers)]
        fwd += [(hook_name("mlp_out", layer), den(j, "m")) for j, layer in enumerate(ctx.down_layers)]
        model.run_with_hooks(x0, start_at_layer=ctx.onset + 1, attention_mask=b.attention_mask, return_type=None,
                             past_kv_cache=cache, fwd_hooks=fwd)
        pb.kv = {layer: (cache[layer].past_keys, cache[layer].past_values) for layer in ctx.down_layers}
        out.append(pb)
    return out


def shared_prefix(ctx: TraceContext, batch: PreparedBatch, X: torch.Tensor, edits: Sequence[NodeRef]) -> int:
    """How many leading positions every copy shares with the clean run (nothing before them changes, by causality):
    the first position an onset-layer edit changed, a downstream feature is active at, or a head / MLP is zeroed."""
    B, T = batch.mask.shape
    first = T - 1  # the last position is always recomputed (the readout reads it)
    changed = (X.view(-1, B, *X.shape[1:]) != batch.x0[None]).any(-1).any(0).any(0)  # [T]
    if changed.any():
        first = min(first, int(changed.nonzero()[0]))
    for node in edits:
        if node.kind == "feature" and node.layer > ctx.onset:
            first = min(first, int(batch.first_active[node.layer][node.index]))
        elif node.kind in ("head", "mlp"):
            first = min(first, int(batch.mask.any(0).nonzero()[0]))
    return max(0, first)


def changed_rows(ctx: TraceContext, batch: PreparedBatch, X: torch.Tensor, edits: Sequence[NodeRef]) -> list:
    """Per copy (0 = clean: every row), the rows of ``batch`` its ablation can change: an onset edit where it changed
    the residual, a downstream feature where it fires in the clean run (its input there is clean), a head or MLP
    everywhere. The other rows equal the clean run exactly (by causality), so they contribute 0 and are not run."""
    B = batch.mask.shape[0]
    rows = [torch.arange(B)]
    for c, node in enumerate(edits, start=1):
        if node.kind == "feature" and node.layer == ctx.onset:
            keep = (X[c * B:(c + 1) * B] != batch.x0).any(-1).any(-1)
        elif node.kind == "feature":
            keep = batch.active_rows[node.layer][:, node.index]
        else:
            keep = torch.ones(B, dtype=torch.bool)
        rows.append(keep.cpu().nonzero()[:, 0])
    return rows


@dataclass
class Measure:
    """Per-copy sums over prompts (copy 0 clean). Feature tensors are per SAE layer."""

    feat_clean: dict = field(default_factory=dict)  # layer -> [F] sum_i v_t(x_i)
    feat_drop: dict = field(default_factory=dict)  # layer -> [C, F] sum_i (v_clean - v_c)
    head_rel: Optional[torch.Tensor] = None  # [C, n_down, H] sum_i rel change
    mlp_rel: Optional[torch.Tensor] = None  # [C, n_down]
    readout_drop: Optional[torch.Tensor] = None  # [C] sum_i (r_clean - r_c)
    readout_clean: float = 0.0
    n: int = 0

    def add(self, other: "Measure") -> None:
        for layer, v in other.feat_clean.items():
            self.feat_clean[layer] = self.feat_clean.get(layer, 0) + v
            self.feat_drop[layer] = self.feat_drop.get(layer, 0) + other.feat_drop[layer]
        for name in ("head_rel", "mlp_rel", "readout_drop"):
            mine, theirs = getattr(self, name), getattr(other, name)
            setattr(self, name, theirs.clone() if mine is None else mine + theirs)
        self.readout_clean += other.readout_clean
        self.n += other.n


@torch.inference_mode()
def run_copies(ctx: TraceContext, batch: PreparedBatch, edits: Sequence[NodeRef],
               top_tokens: Optional[dict] = None) -> Measure:
    """One forward pass over ``len(edits) + 1`` stacked copies of ``batch`` (copy 0 clean, copy c ablates
    ``edits[c-1]``), reading every downstream node. A copy carries only the rows its ablation can change
    (:func:`changed_rows`); positions every copy shares with the clean run (:func:`shared_prefix`) are not recomputed:
    their keys and values come from the clean run."""
    from transformer_lens.cache.key_value_cache import TransformerLensKeyValueCache
    from transformer_lens.cache.key_value_cache_entry import TransformerLensKeyValueCacheEntry

    model = ctx.model
    C = len(edits) + 1
    B, T, _ = batch.x0.shape
    X = batch.x0.repeat(C, 1, 1)
    for c, node in enumerate(edits, start=1):
        if node.kind == "feature" and node.layer == ctx.onset:
            X[c * B:(c + 1) * B] = ctx.feature_edit(ctx.onset, X[c * B:(c + 1) * B], batch.mask, node.index)
        elif node.kind not in ("feature", "head", "mlp") or node.layer <= ctx.onset:
            raise TraceCircuitsError(f"cannot ablate {node.id}: only nodes at or after the onset layer {ctx.onset}")
    P = shared_prefix(ctx, batch, X, edits)
    rows = changed_rows(ctx, batch, X, edits)
    copy_of = torch.cat([torch.full((len(r),), c) for c, r in enumerate(rows)])  # [N] copy of each row run
    row_of = torch.cat(rows)  # [N] the batch row it is
    at = torch.cumsum(torch.tensor([0] + [len(r) for r in rows]), 0).tolist()  # copy c runs rows at[c]:at[c+1]
    N, dev = len(row_of), batch.x0.device
    Xs = X[(copy_of * B + row_of).to(dev)]
    r_dev = row_of.to(dev)
    M, Vs = batch.mask[r_dev], batch.value.float()[r_dev][:, P:]
    read_at = (M & batch.value[r_dev])[:, P:]  # where the feature readings look
    cache = TransformerLensKeyValueCache.init_cache(model.cfg, dev, N)
    for layer, (k, v) in batch.kv.items():
        cache.entries[layer] = TransformerLensKeyValueCacheEntry(k[r_dev, :P], v[r_dev, :P])
    by_hook: dict[str, list[tuple[slice, NodeRef]]] = defaultdict(list)
    for c, node in enumerate(edits, start=1):
        if node.layer > ctx.onset and at[c + 1] > at[c]:
            by_hook[node.hook_name].append((slice(at[c], at[c + 1]), node))

    def edit_hook(items):
        def hook(act, hook):
            act = act.clone()
            for sl, node in items:
                if node.kind == "feature":
                    act[sl] = ctx.feature_edit(node.layer, act[sl], M[sl, P:], node.index)
                elif node.kind == "head":
                    act[sl, :, node.index] = 0
                else:
                    act[sl] = 0
            return act

        return hook

    def per_copy(x: torch.Tensor) -> torch.Tensor:
        """[N, ...] per row run -> [C, ...] summed per copy (rows not run add 0)."""
        return torch.zeros(C, *x.shape[1:], dtype=x.dtype).index_add_(0, copy_of, x.cpu())

    out = Measure(n=B)
    down = ctx.down_layers
    H = model.cfg.n_heads
    out.head_rel = torch.zeros(C, len(down), H)
    out.mlp_rel = torch.zeros(C, len(down))
    Ts = T - P

    def read_features(layer):
        def hook(act, hook):
            x = act.float()
            ok = read_at & (x.norm(dim=-1) <= ctx.limit[layer])
            flat = torch.zeros(N * Ts, ctx.saes[layer].cfg.d_sae, device=x.device)
            sel = ok.flatten()
            flat[sel] = ctx.saes[layer].encode(x.reshape(N * Ts, -1)[sel])  # encode only where it is read
            v, where = flat.view(N, Ts, -1).max(dim=1)  # [N, F] over the computed positions
            if P > 0:  # the shared prefix: clean values
                pre, pre_where = batch.feat[layer][:, :P].max(dim=1)
                pre, pre_where = pre[r_dev], pre_where[r_dev]
                take = pre > v
                v, where = torch.where(take, pre, v), torch.where(take, pre_where, where + P)
            else:
                where = where + P
            out.feat_clean[layer] = v[:B].sum(0).cpu()
            out.feat_drop[layer] = per_copy(v[:B][r_dev] - v)
            if top_tokens is not None:
                top_tokens.setdefault(layer, []).append((v[:B].cpu(), where[:B].cpu(), batch.tokens.cpu()))
            return None

        return hook

    def read_heads(j):
        def hook(z, hook):
            z = z.float()
            num = ((z - z[:B][r_dev]).norm(dim=-1) * Vs[:, :, None]).sum(1)  # [N, H]
            out.head_rel[:, j] = per_copy(num / batch.head_den[j][r_dev])
            return None

        return hook

    def read_mlp(j):
        def hook(m, hook):
            m = m.float()
            num = ((m - m[:B][r_dev]).norm(dim=-1) * Vs).sum(1)  # [N]
            out.mlp_rel[:, j] = per_copy(num / batch.mlp_den[j][r_dev])
            return None

        return hook

    def read_final(act, hook):
        r = ctx.readout.score(act[:, -1])  # [N]
        out.readout_drop = per_copy(r[:B][r_dev] - r)
        out.readout_clean = float(r[:B].sum())
        return None

    fwd = [(name, edit_hook(items)) for name, items in by_hook.items()]
    fwd += [(hook_name("resid_post", layer), read_features(layer)) for layer in ctx.sae_layers]
    fwd += [(hook_name("z", layer), read_heads(j)) for j, layer in enumerate(down)]
    fwd += [(hook_name("mlp_out", layer), read_mlp(j)) for j, layer in enumerate(down)]
    fwd += [(ctx.readout.hook_name, read_final)]
    model.run_with_hooks(Xs[:, P:], start_at_layer=ctx.onset + 1, attention_mask=M.long(), past_kv_cache=cache,
                         return_type=None, fwd_hooks=fwd)
    return out


def measure_ablations(ctx: TraceContext, batches: Sequence[PreparedBatch], edits: Sequence[NodeRef],
                      copies_per_pass: int = 16, progress: bool = False, desc: str = "zero-out",
                      top_tokens: Optional[dict] = None) -> Measure:
    """Exact zero-out effects of ``edits`` on every downstream node, summed over all prompts in ``batches``;
    ablations are stacked ``copies_per_pass`` at a time (plus the clean copy) along the batch axis."""
    groups = [list(edits[i:i + copies_per_pass]) for i in range(0, len(edits), copies_per_pass)] or [[]]
    bar = tqdm(total=len(groups) * len(batches), desc=desc, disable=not progress)
    parts: list[Measure] = []
    for g, group in enumerate(groups):
        acc = Measure()
        for batch in batches:
            acc.add(run_copies(ctx, batch, group, top_tokens if g == 0 else None))
            bar.update(1)
        parts.append(acc)
    bar.close()
    # stitch the groups: copy 0 of each group is the same clean pass
    total = Measure(n=parts[0].n, readout_clean=parts[0].readout_clean, feat_clean=parts[0].feat_clean)
    total.feat_drop = {layer: torch.cat([p.feat_drop[layer][1:] for p in parts]) for layer in ctx.sae_layers}
    total.head_rel = torch.cat([p.head_rel[1:] for p in parts])
    total.mlp_rel = torch.cat([p.mlp_rel[1:] for p in parts])
    total.readout_drop = torch.cat([p.readout_drop[1:] for p in parts])
    return total
