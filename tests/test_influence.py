"""Exact batched FIS on a tiny real model: ablations stacked along the batch, sharing the clean prefix, give the same
numbers as one full forward pass per ablation; attribution patching ranks nodes like the exact zero-out."""

import pytest
import tiny
import torch
from naive import measure_one_at_a_time

from trace_circuits import builtin_prompts, encode_prompts
from trace_circuits.attribution import attribution_scores
from trace_circuits.influence import TraceContext, fit_readout, measure_ablations, prepare_batches
from trace_circuits.names import NodeRef


@pytest.fixture(scope="module")
def ctx():
    tl, _, _ = tiny.pair("llama", n_layers=5, plant=True)
    saes = {1: tiny.sae("topk", "blocks.1.hook_resid_post", plant=True),
            2: tiny.sae("standard", "blocks.2.hook_resid_post"), 3: tiny.sae("jumprelu", "blocks.3.hook_resid_post",
                                                                             normalize="layer_norm")}
    h, b = encode_prompts(tl, builtin_prompts("harmful")[:16]), encode_prompts(tl, builtin_prompts("benign")[:16])
    return TraceContext(tl, 1, saes, fit_readout(tl, h, b))


EDITS = [NodeRef("feature", 1, 0), NodeRef("feature", 1, 5), NodeRef("feature", 2, 7), NodeRef("head", 3, 1),
         NodeRef("mlp", 2), NodeRef("feature", 3, 11)]


def test_batched_exact_fis_equals_one_forward_per_ablation(ctx):
    enc = encode_prompts(ctx.model, builtin_prompts("harmful")[:6])
    fast = measure_ablations(ctx, prepare_batches(ctx, enc, 3), EDITS, copies_per_pass=2)
    slow = measure_one_at_a_time(ctx, enc, EDITS, batch_size=3)
    assert fast.readout_drop.abs().max() > 1e-3  # the ablations do move the readout
    assert torch.allclose(fast.readout_drop, slow.readout_drop, atol=1e-4)
    for layer in ctx.sae_layers:
        assert torch.allclose(fast.feat_clean[layer], slow.feat_clean[layer], atol=1e-3)
        assert torch.allclose(fast.feat_drop[layer], slow.feat_drop[layer], atol=1e-3)
    assert torch.allclose(fast.head_rel, slow.head_rel, atol=1e-4)
    assert torch.allclose(fast.mlp_rel, slow.mlp_rel, atol=1e-4)
    assert fast.head_rel[3, 3 - 2, 1] == pytest.approx(6.0)  # zeroing a head changes it by 100% on 6 prompts


def test_rows_an_ablation_cannot_change_are_not_run_and_the_numbers_stay_exact(ctx):
    """Half harmful, half benign prompts: the planted harmful feature fires on the harmful half only, so its copy runs
    6 of 12 rows; a feature that never fires runs none and moves nothing; heads and MLPs run every row."""
    from trace_circuits.influence import changed_rows

    prompts = list(builtin_prompts("harmful")[:6]) + list(builtin_prompts("benign")[:6])
    enc = encode_prompts(ctx.model, prompts)
    (batch,) = prepare_batches(ctx, enc, 12)
    silent = next(f for f in range(ctx.saes[1].cfg.d_sae)
                  if torch.equal(ctx.feature_edit(1, batch.x0, batch.mask, f), batch.x0))
    edits = [NodeRef("feature", 1, 0), NodeRef("feature", 1, silent), NodeRef("feature", 2, 4),
             NodeRef("head", 3, 1), NodeRef("mlp", 2)]
    X = batch.x0.repeat(len(edits) + 1, 1, 1)
    for c in (1, 2):
        X[c * 12:(c + 1) * 12] = ctx.feature_edit(1, batch.x0, batch.mask, edits[c - 1].index)
    rows = changed_rows(ctx, batch, X, edits)
    assert len(rows[1]) == 6  # the harmful prompts (rows are in length order)
    assert len(rows[2]) == 0 and 0 < len(rows[3]) < 12 and len(rows[4]) == len(rows[5]) == len(rows[0]) == 12
    fast = measure_ablations(ctx, [batch], edits, copies_per_pass=8)
    slow = measure_one_at_a_time(ctx, enc, edits, batch_size=4)
    assert fast.readout_drop[0].abs() > 1e-3 and fast.readout_drop[1] == 0  # per edit (the clean copy is dropped)
    assert torch.allclose(fast.readout_drop, slow.readout_drop, atol=1e-4)
    for layer in ctx.sae_layers:
        assert torch.allclose(fast.feat_drop[layer], slow.feat_drop[layer], atol=1e-3)
        assert not fast.feat_drop[layer][1].any()
    assert torch.allclose(fast.head_rel, slow.head_rel, atol=1e-4)
    assert torch.allclose(fast.mlp_rel, slow.mlp_rel, atol=1e-4)


def test_a_source_that_only_fires_on_the_request_shares_the_template_prefix(ctx):
    from trace_circuits.influence import shared_prefix

    enc = encode_prompts(ctx.model, builtin_prompts("harmful")[:4])
    (batch,) = prepare_batches(ctx, enc, 4)
    X = batch.x0.repeat(2, 1, 1)
    B = batch.x0.shape[0]
    X[B:] = ctx.feature_edit(1, X[B:], batch.mask, 0)
    P = shared_prefix(ctx, batch, X, [NodeRef("feature", 1, 0)])
    assert 0 < P < batch.mask.shape[1]
    assert torch.equal(X[:, :P], batch.x0.repeat(2, 1, 1)[:, :P])  # nothing before P changed
    assert shared_prefix(ctx, batch, X, [NodeRef("head", 2, 0)]) == int(batch.mask.any(0).nonzero()[0])


def test_attribution_ranks_nodes_like_exact_zero_out(ctx):
    from trace_circuits.stats import spearman

    enc = encode_prompts(ctx.model, builtin_prompts("harmful")[:8])
    batches = prepare_batches(ctx, enc, 4)
    attr = attribution_scores(ctx, batches)
    nodes = [NodeRef("head", l, h) for l in (2, 3, 4) for h in range(4)] + [NodeRef("mlp", l) for l in (2, 3, 4)]
    exact = measure_ablations(ctx, batches, nodes, copies_per_pass=8).readout_drop / 8
    assert spearman([attr[n.id] for n in nodes], exact.tolist()) > 0.5
