"""How often a hook set's prompt gate opens, per attack template, on the held-out test split (one run).

The gate decides as at inference (``trace_circuits.gate.gate_decisions``: the hook set attached, the decision at the
end of the user's turn). Printed per template: the fraction of harmful test prompts it opens on, and of benign test
prompts and hard negatives asked in the same template; then held-out benign corpus documents and chat transcripts.

    python benchmarks/gate_coverage.py --hookset runs/latest/hookset
"""

from __future__ import annotations

import argparse


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hookset", required=True, help="hook set folder (with a prompt gate)")
    args = ap.parse_args()

    from trace_circuits import builtin_prompts, encode_prompts, load_hookset, load_model
    from trace_circuits.corpus import benign_documents
    from trace_circuits.evaluate import ATTACKS, attack_texts
    from trace_circuits.gate import gate_decisions

    hs = load_hookset(args.hookset)
    model = load_model(hs.model, device="cpu", progress=False)
    tok = model.tokenizer
    g = hs.gate_operation

    def rate(texts):
        return float(gate_decisions(model, hs, encode_prompts(model, texts, chat=False))[1].mean())

    sets = {k: list(builtin_prompts(k, "test")) for k in ("harmful", "benign", "hard_negative")}
    print(f"# prompt gate of {args.hookset} ({hs.model}): layer {g.layer}, threshold {g.gate_threshold:.3f}")
    print("| template | harmful test | benign test | hard negatives |\n|---|---|---|---|")
    for t in ATTACKS:
        row = [rate(attack_texts(tok, sets[k], t)) for k in ("harmful", "benign", "hard_negative")]
        print(f"| {t} | {row[0]:.2f} | {row[1]:.2f} | {row[2]:.2f} |")
    docs = benign_documents(tok, hs.model, 48, split="heldout")
    chat = benign_documents(tok, hs.model, 60, split="heldout", chat_only=True)
    print(f"held-out benign documents {rate(docs):.2f} ({len(docs)}), held-out chat transcripts {rate(chat):.2f} "
          f"({len(chat)})")


if __name__ == "__main__":
    main()
