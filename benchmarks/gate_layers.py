"""Which layer (or layers) should the prompt gate read? Out-of-fold harmful coverage at the benign target (one run).

On a run folder's own gate calibration sets (``Run.gate_calibration_sets``: harmful and benign training requests,
directly and under the attack templates, plus the gate's benign documents), the residual at the end of the user's
turn (documents: their last token) is read at every layer from the onset to the last in one pass. For each single
layer and a few layer combinations (features concatenated), the gate's own rule is fitted out of fold (5 interleaved
folds, :func:`trace_circuits.gate.out_of_fold_scores`, threshold = the ``1 - rate`` quantile of the benign scores):
printed are the harmful coverage overall and per template, and the benign prompts' opening rate.

    python benchmarks/gate_layers.py runs/latest [--rate 0.02] [--l2 0.002]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", help="a run folder (`make run` writes runs/latest)")
    ap.add_argument("--rate", type=float, default=0.02, help="benign target rate")
    ap.add_argument("--l2", type=float, default=0.002, help="the probe's L2 strength")
    args = ap.parse_args()
    from trace_circuits.errors import TraceCircuitsError

    if not (Path(args.run) / "config.json").is_file():
        raise TraceCircuitsError(f"{args.run} is not a run folder (no config.json); run `make run` first")
    if not 0 < args.rate < 1:
        raise TraceCircuitsError("--rate must lie between 0 and 1, e.g. 0.02")

    from tqdm.auto import tqdm

    import trace_circuits as tc
    from trace_circuits.gate import (anchor_positions, benign_threshold, out_of_fold_scores, rates_by_group,
                                     user_turn_end)
    from trace_circuits.prompts import iter_batches

    torch.set_grad_enabled(False)
    run = tc.Run.load(args.run)
    model = run.model
    onset = run.trace().meta["onset_layer"]
    layers = list(range(onset, model.cfg.n_layers))
    names = [f"blocks.{l}.hook_resid_post" for l in layers]
    h, b, (h_groups, _) = run.gate_calibration_sets()
    text = run.encoded("gate_text")
    anchor = user_turn_end(model)

    def read(enc, pos, desc):
        out = torch.zeros(len(enc), len(layers), model.cfg.d_model)
        for bt in tqdm(iter_batches(enc, 16, "cpu"), total=(len(enc) + 15) // 16, desc=desc):
            _, cache = model.run_with_cache(bt.tokens, attention_mask=bt.attention_mask, names_filter=names)
            width = bt.tokens.shape[1]
            for r, i in enumerate(bt.indices):
                n = len(enc.input_ids[i])
                col = width - n + ((-1 if pos is None else pos[i]) % n)
                for j, name in enumerate(names):
                    out[i, j] = cache[name][r, col].float()
        return out

    H = read(h, anchor_positions(h, anchor), "harmful")
    B = read(b, anchor_positions(b, anchor), "benign")
    T = read(text, None, "benign documents") if len(text) else B[:0]

    def oof(cols):  # the gate's own rule, as fit_prompt_gate fits it
        X = torch.cat([H[:, cols].flatten(1), B[:, cols].flatten(1), T[:, cols].flatten(1)])
        y = torch.cat([torch.ones(len(H)), torch.zeros(len(B) + len(T))])
        score = out_of_fold_scores(X, y, args.l2)
        q = benign_threshold(score[len(H):], args.rate)
        return (float((score[:len(H)] > q).float().mean()), float((score[len(H):len(H) + len(B)] > q).float().mean()),
                rates_by_group(score[:len(H)], h_groups, q))

    print(f"# {args.run}: onset {onset}; {len(H)} harmful, {len(B)} benign requests, {len(T)} documents; "
          f"benign target {args.rate}, L2 {args.l2}")
    print("| layers | harmful opened | benign prompts opened | per template |\n|---|---|---|---|")
    last = len(layers) - 1
    combos = [[j] for j in range(len(layers))] + [[0, last], [0, last // 2, last], [last // 2, last]]
    for cols in combos:
        cols = sorted(set(cols))
        harm, ben, by = oof(cols)
        per = ", ".join(f"{g} {v:.2f}" for g, v in by.items())
        print(f"| {'+'.join(str(layers[c]) for c in cols)} | {harm:.3f} | {ben:.3f} | {per} |", flush=True)


if __name__ == "__main__":
    from trace_circuits.errors import TraceCircuitsError

    try:
        main()
    except TraceCircuitsError as e:  # bad input: one line, no traceback
        raise SystemExit(f"error: {e}")
