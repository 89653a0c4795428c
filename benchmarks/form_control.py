"""Stage 1's form control, validated (issue 15): onsets of the form-controlled and the raw rule on matched pairs,
on unmatched sets of different form, and on two benign sets of different form (one run, one model).

Cases: (a) built-in matched pairs; (b) built-in harmful vs everyday instructions (benign, another form); (c) two
benign sets of different form; (d) rephrased harmful requests (another form) vs built-in benign; (e) the rephrased
twins as their own pairs (--paired); (f) hard negatives vs built-in benign. Prints a markdown table.

    python benchmarks/form_control.py --model smollm2-135m-instruct
"""

from __future__ import annotations

import argparse
import time
import warnings


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--bootstrap", type=int, default=1000)
    ap.add_argument("--permutations", type=int, default=1000)
    args = ap.parse_args()

    from trace_circuits import builtin_prompts as b
    from trace_circuits import load_model, scan_attention_divergence
    from trace_circuits.errors import FormWarning

    warnings.simplefilter("ignore", FormWarning)
    model = load_model(args.model, device="cpu", progress=False)
    cases = [
        ("a", "built-in matched pairs (train)", b("harmful", "train"), b("benign", "train"), {}),
        ("b", "built-in harmful (test) vs everyday instructions (test)", b("harmful", "test"), b("everyday", "test"), {}),
        ("c", "built-in benign (test) vs everyday instructions (test)", b("benign", "test"), b("everyday", "test"), {}),
        ("c", "rephrased benign vs everyday instructions (test)", b("rephrased_benign", "all"), b("everyday", "test"), {}),
        ("d", "rephrased harmful vs built-in benign (test)", b("rephrased_harmful", "all"), b("benign", "test"), {}),
        ("e", "rephrased harmful vs their benign twins, --paired", b("rephrased_harmful", "all"),
         b("rephrased_benign", "all"), {"paired": True}),
        ("f", "hard negatives (test) vs built-in benign (test)", b("hard_negative", "test"), b("benign", "test"), {}),
    ]
    print(f"{args.model}, {args.bootstrap} bootstrap resamples, {args.permutations} permutations\n")
    print("| case | sets (n harmful / n benign) | onset (form-controlled) | D at onset [95% CI] | T [95% CI] vs F | "
          "raw onset | form ratio | time |")
    print("|---|---|---|---|---|---|---|---|")
    for key, desc, h, bb, kw in cases:
        t0 = time.perf_counter()
        r = scan_attention_divergence(model, h, bb, n_bootstrap=args.bootstrap, n_permutations=args.permutations,
                                      progress=False, **kw)
        l, ref, t = r.onset_layer, r.reference, r.transfer
        at = l if l is not None else ref["onset_layer"]
        d = "-" if l is None else f"{ref['per_layer'][l]:.4f} [{ref['per_layer_ci'][l][0]:.4f}, {ref['per_layer_ci'][l][1]:.4f}]"
        tt = "-" if at is None else (f"{t['user'][at]:.2f} [{t['user_ci'][at][0]:.2f}, {t['user_ci'][at][1]:.2f}] vs "
                                     f"{t['form_control'][at]:.2f}" + ("" if l is not None else f" (layer {at})"))
        print(f"| {key} | {desc} ({len(h)} / {len(bb)}) | {'none' if l is None else l} | {d} | {tt} | "
              f"{r.raw_onset_layer} | {r.form_ratio:.1f} | {time.perf_counter() - t0:.0f} s |", flush=True)


if __name__ == "__main__":
    main()
