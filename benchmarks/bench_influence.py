"""Benchmark stage 3: feature influence scores and attribution, ratios from one run.

  * exact FIS, ablations stacked along the batch from the cached onset residual, sharing the clean prefix (ours), vs
    one full forward pass per ablated feature (naive): speed ratio, and the largest difference between their numbers
  * attribution patching (one forward + backward, estimates for every downstream node) vs exact zero-out of the
    top 50 nodes: speed ratio per node, and Spearman correlation of the two on those 50 nodes

    python benchmarks/bench_influence.py [--n 16] [--sources 13]
"""

from __future__ import annotations

import argparse
import time

import torch
from _timing import best_of


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=16, help="harmful prompts the interventions run on")
    ap.add_argument("--sources", type=int, default=13, help="source features ablated")
    ap.add_argument("--top", type=int, default=50, help="nodes compared between attribution and exact")
    ap.add_argument("--onset", type=int, default=21, help="onset layer (an SAE must be shipped there)")
    args = ap.parse_args()

    from naive import measure_one_at_a_time
    from scipy.stats import spearmanr

    from trace_circuits import builtin_prompts, encode_prompts, find_harmful_features, load_model, shipped_saes
    from trace_circuits.attribution import attribution_scores
    from trace_circuits.influence import TraceContext, fit_readout, measure_ablations, prepare_batches
    from trace_circuits.names import NodeRef, parse_node_id

    print(f"# bench_influence  torch {torch.__version__}  threads {torch.get_num_threads()}")
    model = load_model(device="cpu", progress=False)
    onset = args.onset
    saes = shipped_saes(model, onset)
    H, B = builtin_prompts("harmful", "train"), builtin_prompts("benign", "train")
    feats = find_harmful_features(model, saes[onset], H, B, progress=False)
    sources = [NodeRef("feature", onset, f) for f in feats.harmful_features[: args.sources]]
    readout = fit_readout(model, encode_prompts(model, H), encode_prompts(model, B))
    ctx = TraceContext(model, onset, saes, readout)
    enc = encode_prompts(model, H[: args.n])
    n_tok = sum(enc.lengths)

    result = {}

    def ours():
        result["ours"] = measure_ablations(ctx, prepare_batches(ctx, enc, 8), sources, copies_per_pass=16)

    def naive():
        result["naive"] = measure_one_at_a_time(ctx, enc, sources, batch_size=8)

    t_ours, t_naive = best_of(ours, 2), best_of(naive, 1)
    a, b = result["ours"], result["naive"]
    diff = max([float((a.readout_drop - b.readout_drop).abs().max()), float((a.head_rel - b.head_rel).abs().max()),
                float((a.mlp_rel - b.mlp_rel).abs().max())]
               + [float((a.feat_drop[l] - b.feat_drop[l]).abs().max()) for l in ctx.sae_layers])
    print(f"exact FIS, {len(sources)} source features x {args.n} prompts ({n_tok} tokens), every downstream node read")
    print(f"  batched from the onset residual, shared clean prefix (ours): {t_ours:7.2f} s")
    print(f"  one full forward per ablation (naive):  {t_naive:7.2f} s   ratio naive/ours {t_naive / t_ours:.2f}x   "
          f"max |difference| {diff:.2e}")

    batches = prepare_batches(ctx, enc, 8)
    t0 = time.perf_counter()
    attr = attribution_scores(ctx, batches)
    t_attr = time.perf_counter() - t0
    down = [k for k in attr if parse_node_id(k).layer > onset]
    top = sorted(down, key=lambda k: -abs(attr[k]))[: args.top]
    t0 = time.perf_counter()
    exact = measure_ablations(ctx, batches, [parse_node_id(k) for k in top], copies_per_pass=16).readout_drop / len(enc)
    t_exact = time.perf_counter() - t0
    rho = spearmanr([attr[k] for k in top], exact.numpy()).statistic
    per_attr, per_exact = t_attr / len(down), t_exact / len(top)
    print(f"attribution patching: {len(down)} downstream nodes in {t_attr:.2f} s (one forward + backward); exact "
          f"zero-out of the top {len(top)}: {t_exact:.2f} s")
    print(f"  per node: attribution {per_attr * 1e3:.3f} ms vs exact {per_exact * 1e3:.1f} ms   ratio "
          f"{per_exact / per_attr:.0f}x;  all {len(down)} nodes exactly would take ~{per_exact * len(down):.0f} s")
    print(f"  Spearman(attribution, exact) on the top {len(top)} nodes: {rho:.3f}")


if __name__ == "__main__":
    main()
