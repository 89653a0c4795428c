"""Benchmark the residual reads of the prompt gate's calibration and stage 3's readout: the token prefix a group of
prompts shares run once (TransformerLens's frozen key/value cache) vs every prompt run whole. Ratios from one run,
on the same prompts; the largest difference between the two reads is printed beside them.

  * gate calibration: the default run's harmful calibration sequences (every attack template, grouped by template),
    the gate's pool (``turn``) at layers 18-21, as ``trace-circuits run`` reads them
  * readout: the harmful training requests at the last layer (one group: they share the system prompt)

    python benchmarks/bench_residuals.py [--n 450] [--repeats 1]
"""

from __future__ import annotations

import argparse

import torch
from _timing import best_of


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=450, help="harmful calibration sequences (default: all 450)")
    ap.add_argument("--repeats", type=int, default=1, help="best of N timings. Default: 1")
    args = ap.parse_args()

    import trace_circuits as tc
    from trace_circuits.activations import residuals_at_layers, shared_prefix_groups
    from trace_circuits.gate import anchor_positions, turn_start_positions, user_turn_end, user_turn_start

    print(f"# bench_residuals  torch {torch.__version__}  threads {torch.get_num_threads()}")
    run = tc.Run(progress=False)
    model = run.model
    harmful, _, (templates, _), _ = run.gate_calibration_sets()
    harmful, templates = harmful.select(range(min(args.n, len(harmful)))), templates[:args.n]
    ends = anchor_positions(harmful, user_turn_end(model))
    starts = turn_start_positions(harmful, user_turn_start(model), ends)
    layers = [18, 19, 20, 21]

    def read(share: bool, enc=harmful, at=layers, **kw):
        return residuals_at_layers(model, enc, at, share_prefix=share, **kw)

    gate_kw = dict(positions=ends, starts=starts, pool="turn", prefix_labels=templates)
    shared, whole = {}, {}
    t_shared = best_of(lambda: shared.update(read(True, **gate_kw)), args.repeats)
    t_whole = best_of(lambda: whole.update(read(False, **gate_kw)), args.repeats)
    n_tok = sum(map(len, harmful.input_ids))
    saved = sum(p * (len(i) - 1) for p, i in shared_prefix_groups(harmful, templates))
    diff = max(float((shared[l] - whole[l]).abs().max() / whole[l].abs().max()) for l in layers)
    print(f"gate calibration, {len(harmful)} sequences ({n_tok} tokens, {saved} in shared prefixes), layers "
          f"{layers[0]}-{layers[-1]}: shared prefix {t_shared:.1f}s, whole prompts {t_whole:.1f}s, ratio "
          f"{t_whole / t_shared:.2f}x, largest difference {diff:.1e} (relative)")

    direct = run.encoded("harmful")
    last = [model.cfg.n_layers - 1]
    a, b = {}, {}
    t_shared = best_of(lambda: a.update(read(True, direct, last)), args.repeats)
    t_whole = best_of(lambda: b.update(read(False, direct, last)), args.repeats)
    diff = float((a[last[0]] - b[last[0]]).abs().max() / b[last[0]].abs().max())
    print(f"readout, {len(direct)} requests, last layer: shared prefix {t_shared:.1f}s, whole prompts {t_whole:.1f}s, "
          f"ratio {t_whole / t_shared:.2f}x, largest difference {diff:.1e} (relative)")


if __name__ == "__main__":
    main()
