"""Does more calibration data make the prompt gate read intent better? (one run folder, the gate refitted)

The gate of a ``make run`` folder is refitted at its own layer with the run's settings (``fit_prompt_gate``, as
``trace_circuits.run_gate`` calls it, ``prompt_gate_options``) on the run's calibration requests plus one of:

* ``none``: nothing more (reproduces the run's gate);
* ``donotanswer``: Do-Not-Answer's training questions as harmful, with no benign twins;
* ``rephrased``: the 45 training pairs of the AdvBench-style rephrased set, harmful and benign twin sharing a
  request id (one fold);
* ``rephrased+everyday``: those pairs plus the 180 everyday training instructions as benign.

Each gate replaces the hook set's and decides as at inference (``gate_decisions``) on the held-out test split (harmful,
benign and hard negatives, direct and under each attack template but the prefill, which the gate does not read) and
on HarmBench and Do-Not-Answer's test questions, asked directly. Printed: the fraction opened per set.

    python benchmarks/gate_training_data.py runs/latest --variants none,donotanswer,rephrased,rephrased+everyday
"""

from __future__ import annotations

import argparse
import copy
import time

VARIANTS = ("none", "donotanswer", "rephrased", "rephrased+everyday")


def calibration(run, variant: str):
    """``(harmful, benign, groups, request ids)`` encoded: the run's own sets plus ``variant``'s prompts; every
    added request gets an id of its own (a rephrased pair shares one)."""
    import trace_circuits as tc
    from trace_circuits.gate import calibration_sets

    gc = run.config.gate
    harmful = list(run.prompts("harmful"))
    benign = list(run.prompts("benign")) + (list(run.prompts("hard_negative_train")) if gc.hard_negatives else [])
    ids_h = list(range(len(harmful)))  # the built-in twins: harmful i and benign i share id i
    ids_b = list(range(len(benign)))
    extra_h, extra_b = [], []
    if variant == "donotanswer":
        extra_h = list(tc.builtin_prompts("donotanswer", "train"))
    elif variant.startswith("rephrased"):
        extra_h, extra_b = (list(tc.builtin_prompts(k, "train")) for k in ("rephrased_harmful", "rephrased_benign"))
    first = 100_000
    ids_h += [first + i for i in range(len(extra_h))]
    ids_b += [first + i for i in range(len(extra_b))]
    if variant == "rephrased+everyday":
        everyday = list(tc.builtin_prompts("everyday", "train"))
        extra_b += everyday
        ids_b += [2 * first + i for i in range(len(everyday))]
    return calibration_sets(run.model, harmful + extra_h, benign + extra_b, gc.templates, gc.passes, run.config.chat,
                            request_ids=(ids_h, ids_b))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", help="a make run folder (its config, hook set and prompts)")
    ap.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, of {', '.join(VARIANTS)}")
    args = ap.parse_args()
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    bad = [v for v in variants if v not in VARIANTS]
    if bad:
        raise SystemExit(f"unknown variants {bad}; choose among {', '.join(VARIANTS)}")

    import trace_circuits as tc
    from trace_circuits.evaluate import ATTACKS, attack_texts
    from trace_circuits.gate import fit_prompt_gate, gate_decisions
    from trace_circuits.prompts import encode_prompts
    from trace_circuits.run_gate import prompt_gate_options

    run = tc.Run.load(args.run, progress=False)
    model, gc = run.model, run.config.gate
    hs0 = tc.load_hookset(f"{args.run}/hookset")
    g0 = hs0.gate_operation
    layer = g0.layer
    tok = model.tokenizer
    templates = [t for t in ATTACKS if t != "prefill"]
    tests = {k: list(tc.builtin_prompts(k, "test")) for k in ("harmful", "benign", "hard_negative")}
    sets = {f"{k} {t}": encode_prompts(model, attack_texts(tok, p, t), chat=False)
            for t in templates for k, p in tests.items() if t == "direct" or k == "harmful"}
    for k in ("harmbench", "donotanswer"):
        sets[f"{k} direct"] = encode_prompts(model, attack_texts(tok, list(tc.builtin_prompts(k, "test")), "direct"),
                                             chat=False)
    print(f"# gate of {args.run} refitted at layer {layer} (threshold {g0.gate_threshold:.3f} in the run)")
    print("| variant | calibration harmful / benign | out-of-fold harmful | " + " | ".join(sets) + " | seconds |")
    print("|---" * (len(sets) + 4) + "|")
    for v in variants:
        t0 = time.perf_counter()
        h, b, groups, requests = calibration(run, v)
        op, calib = fit_prompt_gate(model, h, b, [layer], gc.benign_rate, groups=groups, requests=requests,
                                    **prompt_gate_options(run, [layer]))
        hs = copy.deepcopy(hs0)
        i = next(i for i, o in enumerate(hs.operations) if o.gate_source)
        for f in ("perplexity_window", "perplexity_threshold", "perplexity_tokens"):
            setattr(op, f, getattr(g0, f))
        hs.operations[i] = op
        rates = [float(gate_decisions(model, hs, enc)[1].mean()) for enc in sets.values()]
        print(f"| {v} | {len(h)} / {len(b)} | {calib['gate_rate_harmful']:.3f} | "
              + " | ".join(f"{r:.3f}" for r in rates) + f" | {time.perf_counter() - t0:.0f} |", flush=True)


if __name__ == "__main__":
    main()
