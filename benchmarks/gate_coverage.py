"""How often a hook set's prompt gate opens, per jailbreak template, on the held-out test split (one run).

The gate decides as at inference (``trace_circuits.gate.gate_decisions``: the hook set attached, the decision at the
end of the user turn). Printed per template: the fraction of harmful test prompts on which it opens and the fraction
of benign test prompts wrapped in the same template; then held-out benign corpus documents and chat transcripts.
For comparison, the stage-2 source features as a gate (open at the first position where sum_f a_f / s_f passes the
threshold), calibrated the same way (2% of benign train prompts + 200 benign train documents).

    python benchmarks/gate_coverage.py --hookset runs/latest/hookset
"""

from __future__ import annotations

import argparse

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hookset", required=True, help="hook set folder (with a prompt gate)")
    args = ap.parse_args()

    from trace_circuits import builtin_prompts, load_hookset, load_model
    from trace_circuits.evaluate import JAILBREAKS, attack_texts, benign_text
    from trace_circuits.gate import gate_decisions
    from trace_circuits.hooks import Operation, calibrate_gate, gate_scores, prompt_feature_acts

    model = load_model(device="cpu", progress=False)
    tok = model.tokenizer
    hs = load_hookset(args.hookset)
    g = hs.gate_operation
    H, B = builtin_prompts("harmful", "test"), builtin_prompts("benign", "test")
    docs, chat = benign_text(tok, 48, split="heldout"), benign_text(tok, 60, split="heldout", chat_only=True)
    print(f"# prompt gate of {args.hookset}: layer {g.layer}, threshold {g.gate_threshold:.3f}")
    for t in JAILBREAKS:
        h = gate_decisions(model, hs, attack_texts(tok, H, t), chat=False)[1].float().mean()
        b = gate_decisions(model, hs, attack_texts(tok, B, t), chat=False)[1].float().mean()
        print(f"{t:20s} opens on harmful test {h:.2f}, benign test {b:.2f}")
    print(f"held-out benign documents {gate_decisions(model, hs, docs, chat=False)[1].float().mean():.2f}, "
          f"held-out chat transcripts {gate_decisions(model, hs, chat, chat=False)[1].float().mean():.2f}")

    src = hs.source_operation
    op = Operation(**{**vars(src), "gate_source": True})
    calibrate_gate(model, op, builtin_prompts("harmful", "train"), builtin_prompts("benign", "train"), 0.02,
                   benign_text=benign_text(tok, 200, split="train"))

    def rate(texts, c):
        return float(np.mean(gate_scores(prompt_feature_acts(model, op, texts, chat=c), op.gate_scales).numpy()
                             > op.gate_threshold))

    print(f"# feature gate ({len(op.features)} source features at layer {op.layer}), same calibration")
    for t in ("direct", "prefill"):
        print(f"{t:20s} opens on harmful test {rate(attack_texts(tok, H, t), False):.2f}, "
              f"benign test {rate(attack_texts(tok, B, t), False):.2f}")
    print(f"held-out benign documents {rate(docs, False):.2f}, held-out chat transcripts {rate(chat, False):.2f}")


if __name__ == "__main__":
    main()
