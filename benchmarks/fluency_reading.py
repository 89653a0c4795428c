"""What does the gate's fluency reading separate? The model's own surprisal ``u`` of the user's message
(:mod:`trace_circuits.perplexity`, the hook set's window and threshold) on the built-in test split under every attack
template (harmful, benign, hard negatives: how often natural text opens it) and on the attack strings saved by
``trace-circuits attack`` folders (``gcg_undefended.jsonl``, ``gcg_adaptive.jsonl``: how often an optimised string
does). One run, one table.

    python benchmarks/fluency_reading.py --hookset runs/ppl/hookset [ATTACK_FOLDER ...]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch


def setup(doc: str):
    """``(args, hook set, its gate, model)`` from ``--hookset`` and the attack folders on the command line; bad input
    is one line."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hookset", required=True, help="a hook set folder whose gate has a fluency reading")
    ap.add_argument("attacks", nargs="*", help="`trace-circuits attack` output folders")
    args = ap.parse_args()

    from trace_circuits import TraceCircuitsError, load_hookset, load_model

    try:
        hs = load_hookset(args.hookset)
        g = hs.gate_operation
        if g is None or g.kind != "prompt_probe" or not g.perplexity_window:
            raise TraceCircuitsError(f"{args.hookset}: its gate has no fluency reading; export one with "
                                     "--gate-perplexity-window 8")
        missing = [a for a in args.attacks if not (Path(a) / "gcg_adaptive.jsonl").is_file()]
        if missing:
            raise TraceCircuitsError(f"{', '.join(missing)}: no gcg_adaptive.jsonl; give `trace-circuits attack` "
                                     "output folders")
    except TraceCircuitsError as err:
        sys.exit(f"error: {err}")
    torch.set_grad_enabled(False)
    return args, hs, g, load_model(hs.model, device="cpu", progress=False)


def main() -> None:
    from trace_circuits import builtin_prompts, encode_prompts
    from trace_circuits.evaluate.attacks import ATTACKS, attack_texts
    from trace_circuits.perplexity import surprisal_scores

    args, hs, g, model = setup(__doc__)
    tok, theta = model.tokenizer, g.perplexity_threshold

    def u_of(texts, desc):
        return surprisal_scores(model, encode_prompts(model, texts, chat=False), g.perplexity_window, g.anchor,
                                g.opener, progress=True, desc=desc, tokens=g.perplexity_tokens)

    print(f"{hs.model}: window {g.perplexity_window} {g.perplexity_tokens} tokens, threshold {theta:.2f} nats")
    print("| text | n | median u | max u | above the threshold |\n|---|---|---|---|---|")
    for kind in ("harmful", "benign", "hard_negative"):
        raw = list(builtin_prompts(kind, "test"))
        for t in (a for a in ATTACKS if a != "prefill"):
            u = u_of(attack_texts(tok, raw, t), f"{kind}, {t}")
            print(f"| {kind} test, {t} | {len(u)} | {float(u.median()):.2f} | {float(u.max()):.2f} | "
                  f"{int((u > theta).sum())} |")
    for folder in args.attacks:
        for name in ("gcg_undefended", "gcg_adaptive"):
            path = Path(folder) / f"{name}.jsonl"
            if not path.is_file():
                continue
            u = u_of([json.loads(line)["text"] for line in path.read_text().splitlines() if line.strip()], name)
            print(f"| {folder}: {name} | {len(u)} | {float(u.median()):.2f} | {float(u.max()):.2f} | "
                  f"{int((u > theta).sum())} (min {float(u.min()):.2f}) |")


if __name__ == "__main__":
    main()
