"""Which layer (or layers), and which reading, should the prompt gate use? Out-of-fold harmful coverage at the
benign target (one run).

On a run folder's own gate calibration sets (``Run.gate_calibration_sets``: harmful and benign training requests,
directly and under the attack templates, plus the gate's benign documents), each prompt is read at every layer from
``--first`` to the last in one pass, every way the probe can read (``pool``,
:func:`trace_circuits.activations.read_at`): the residual at the end of the user's turn (documents: their last
token), the prompt's mean residual up to there, and the mean over the last user turn only (after the header that
opens it: no system prompt, no earlier turns). For each single layer and a few layer combinations (features
concatenated), the gate's own rule is fitted out of fold (5 folds, :func:`trace_circuits.gate.out_of_fold_scores`;
all framings of one request, and its benign twin, share a fold, so every rate is that of unseen requests; threshold =
the ``1 - rate`` quantile of the benign scores): printed are the harmful coverage overall and per template, and the
benign prompts' opening rate.

With several ``--l2`` values (comma-separated) each row is printed per L2 strength (the probe's regularisation,
``--gate-l2``).

    python benchmarks/gate_layers.py runs/latest [--rate 0.02] [--l2 0.02,0.1] [--first 13] [--last 21] [--pools turn]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", help="a run folder (`make run` writes runs/latest)")
    ap.add_argument("--rate", type=float, default=0.02, help="benign target rate")
    ap.add_argument("--l2", default=None, help="the probe's L2 strength, or several separated by commas (default: "
                                               "the strengths a gate searches, --gate-l2 and --gate-l2-search)")
    ap.add_argument("--pools", default="last,mean,turn", help="the readings compared, of last, mean, turn")
    ap.add_argument("--first", type=int, default=None, help="the first layer read (default: the onset layer)")
    ap.add_argument("--last", type=int, default=None, help="the last layer read (default: the model's last)")
    args = ap.parse_args()
    from trace_circuits.errors import TraceCircuitsError

    if not (Path(args.run) / "config.json").is_file():
        raise TraceCircuitsError(f"{args.run} is not a run folder (no config.json); run `make run` first")
    if not 0 < args.rate < 1:
        raise TraceCircuitsError("--rate must lie between 0 and 1, e.g. 0.02")
    from trace_circuits.config import GateConfig

    args.l2 = ",".join(map(str, GateConfig().l2_values())) if args.l2 is None else args.l2
    try:
        l2s = [float(x) for x in args.l2.split(",") if x.strip()]
    except ValueError:
        l2s = []
    if not l2s or min(l2s) <= 0:
        raise TraceCircuitsError(f"--l2 must be positive numbers separated by commas, e.g. 0.02,0.1; got {args.l2!r}")
    pools = tuple(p.strip() for p in args.pools.split(",") if p.strip())
    if not pools or set(pools) - {"last", "mean", "turn"}:
        raise TraceCircuitsError(f"--pools must name readings of last, mean, turn, e.g. turn; got {args.pools!r}")

    from tqdm.auto import tqdm

    import trace_circuits as tc
    from trace_circuits.activations import read_at
    from trace_circuits.gate import (anchor_positions, benign_threshold, out_of_fold_scores, rates_by_group,
                                     request_fold_groups, turn_start_positions, user_turn_end, user_turn_start)
    from trace_circuits.saes.encoding import massive_limit
    from trace_circuits.prompts import iter_batches

    torch.set_grad_enabled(False)
    run = tc.Run.load(args.run)
    model = run.model
    onset = run.trace().meta["onset_layer"]
    first = onset if args.first is None else args.first
    if not 0 <= first < model.cfg.n_layers:
        raise TraceCircuitsError(f"--first must be a layer of the model (0..{model.cfg.n_layers - 1})")
    last_layer = model.cfg.n_layers - 1 if args.last is None else args.last
    if not first <= last_layer < model.cfg.n_layers:
        raise TraceCircuitsError(f"--last must be a layer from --first to {model.cfg.n_layers - 1}")
    layers = list(range(first, last_layer + 1))
    names = [f"blocks.{l}.hook_resid_post" for l in layers]
    h, b, (h_groups, _), (h_req, b_req) = run.gate_calibration_sets()
    text = run.encoded("gate_text")
    anchor, opener = user_turn_end(model), user_turn_start(model)
    limits = [massive_limit(run.saes[l]) if l in run.saes else None for l in layers]  # as the export does

    def read(enc, pos, desc):  # [n, layers, pools, d]
        out = torch.zeros(len(enc), len(layers), len(pools), model.cfg.d_model)
        starts = turn_start_positions(enc, opener, pos) if pos is not None else [-1] * len(enc)
        for bt in tqdm(iter_batches(enc, 16, "cpu"), total=(len(enc) + 15) // 16, desc=desc):
            _, cache = model.run_with_cache(bt.tokens, attention_mask=bt.attention_mask, names_filter=names,
                                            stop_at_layer=layers[-1] + 1)
            width = bt.tokens.shape[1]
            cols = torch.tensor([width - len(enc.input_ids[i]) + ((-1 if pos is None else pos[i]) %
                                                                    len(enc.input_ids[i])) for i in bt.indices])
            begin = torch.tensor([-1 if starts[i] < 0 else width - len(enc.input_ids[i]) + starts[i]
                                  for i in bt.indices])
            for j, name in enumerate(names):
                for k, pool in enumerate(pools):
                    out[bt.indices, j, k] = read_at(cache[name], bt.attention_mask.bool(), cols, pool, limits[j],
                                                    begin)
        return out

    H = read(h, anchor_positions(h, anchor), "harmful")
    B = read(b, anchor_positions(b, anchor), "benign")
    T = read(text, None, "benign documents") if len(text) else B[:0]
    groups = request_fold_groups(h_req, b_req, len(T))  # as fit_prompt_gate's: a request's framings and its twin

    def oof(cols, k, l2):  # the gate's own rule, as fit_prompt_gate fits it
        X = torch.cat([H[:, cols, k].flatten(1), B[:, cols, k].flatten(1), T[:, cols, k].flatten(1)])
        y = torch.cat([torch.ones(len(H)), torch.zeros(len(B) + len(T))])
        score = out_of_fold_scores(X, y, l2, groups=groups)
        q = benign_threshold(score[len(H):], args.rate)
        return (float((score[:len(H)] > q).float().mean()), float((score[len(H):len(H) + len(B)] > q).float().mean()),
                rates_by_group(score[:len(H)], h_groups, q))

    print(f"# {args.run}: onset {onset}; {len(H)} harmful, {len(B)} benign requests, {len(T)} documents; "
          f"benign target {args.rate}")
    print("| reads | layers | L2 | harmful opened | benign prompts opened | per template |\n|---|---|---|---|---|---|")
    last = len(layers) - 1
    combos = [[j] for j in range(len(layers))] + [[0, last], [0, last // 2, last], [last // 2, last]]
    combos = list(dict.fromkeys(tuple(sorted(set(c))) for c in combos))  # one row each (one layer: no pairs)
    for k, pool in enumerate(pools):
        for cols in map(list, combos):
            for l2 in l2s:
                harm, ben, by = oof(cols, k, l2)
                per = ", ".join(f"{g} {v:.2f}" for g, v in by.items())
                layer_names = "+".join(str(layers[c]) for c in cols)
                print(f"| {pool} | {layer_names} | {l2:g} | {harm:.3f} | {ben:.3f} | {per} |", flush=True)


if __name__ == "__main__":
    from trace_circuits.errors import TraceCircuitsError

    try:
        main()
    except TraceCircuitsError as e:  # bad input: one line, no traceback
        raise SystemExit(f"error: {e}")
