"""Benchmark generation latency with the hook set attached vs without (goal: at most 1.10x), one run.

Greedy generation on the Hugging Face transformers model (the hook set as plain PyTorch forward hooks), a batch of
test prompts, best of --repeats for each. Both gate states are timed: benign prompts (the gate mostly stays shut:
only the prompt gate's probe runs, once per prompt) and harmful prompts (the gate opens and every cut runs, SAE
encoders included, at every generated token).

    python benchmarks/bench_generate.py [--hookset runs/latest/hookset] [--tokens 64] [--batch 16]

Without --hookset it traces a small circuit first (about a minute).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from _timing import best_of


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hookset", default=None, help="hook set folder (default: trace one)")
    ap.add_argument("--tokens", type=int, default=64, help="new tokens per prompt")
    ap.add_argument("--batch", type=int, default=16, help="prompts per generate call")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()

    from trace_circuits import builtin_prompts, load_hf_model, load_hookset
    from trace_circuits.generation import generate_batch
    from trace_circuits.prompts import format_prompts

    print(f"# bench_generate  torch {torch.__version__}  threads {torch.get_num_threads()}")
    path = args.hookset
    if path is None:
        from trace_circuits.cli import main as cli

        path = Path(tempfile.mkdtemp()) / "trace"
        cli(["trace", "--n-prompts", "16", "--n-candidates", "30", "--out", str(path), "--device", "cpu"])
        path = path / "hookset"
    hookset = load_hookset(path)
    model, tok = load_hf_model()
    print(hookset.summary())
    for kind in ("benign", "harmful"):
        texts = format_prompts(tok, list(builtin_prompts(kind, "test"))[: args.batch], chat=True)
        n = len(texts) * args.tokens

        def plain():
            generate_batch(model, tok, texts, args.tokens, min_new_tokens=args.tokens)

        gates = {}

        def hooked():
            gates["open"] = sum(generate_batch(model, tok, texts, args.tokens, hookset=hookset,
                                               min_new_tokens=args.tokens)[1])

        # every prompt generates exactly --tokens tokens (min_new_tokens), so both do the same work; warm up once
        # each, then alternate the two so drift on the machine hits both alike
        plain(), hooked()
        t_plain = t_hooked = float("inf")
        for _ in range(args.repeats):
            t_plain = min(t_plain, best_of(plain, 1))
            t_hooked = min(t_hooked, best_of(hooked, 1))
        print(f"{kind:8s} {len(texts)} prompts x {args.tokens} new tokens (gate opened on {gates['open']}): "
              f"plain {t_plain:6.2f} s ({n / t_plain:5.0f} tok/s), with hook set {t_hooked:6.2f} s "
              f"({n / t_hooked:5.0f} tok/s)   ratio {t_hooked / t_plain:.3f}x")


if __name__ == "__main__":
    main()
