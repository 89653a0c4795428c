"""Benchmark stage 2: activation collection for SAE training and SAE encode overhead, ratios from one run.

  * activation collection, all hooks in one pass (ours) vs one pass per hook (naive), tokens/s
  * SAE encode overhead: per-prompt feature activations (forward to the SAE layer + encode) vs a plain forward
  * SAE spliced into the full forward (reconstruction + error term) vs a plain forward

    python benchmarks/bench_saes.py [--tokens 20000] [--n 96]
"""

from __future__ import annotations

import argparse
import tempfile

import torch
from _timing import best_of


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=20_000, help="corpus tokens for the collection benchmark")
    ap.add_argument("--n", type=int, default=96, help="prompts for the encode benchmark")
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()

    from trace_circuits import builtin_prompts, encode_prompts, list_saes, load_model, load_sae
    from trace_circuits.corpus import corpus_path, read_corpus
    from trace_circuits.features import collect_prompt_features
    from trace_circuits.prompts import iter_batches
    from trace_circuits.saes import collect_activations, corpus_chunks

    print(f"# bench_saes  torch {torch.__version__}  threads {torch.get_num_threads()}")
    model = load_model(device="cpu", progress=False)
    saes = sorted(list_saes("smollm2-135m-instruct"), key=lambda s: int(s["hook_name"].split(".")[1]))
    hooks = [s["hook_name"] for s in saes] or ["blocks.21.hook_resid_post"]
    chunks = corpus_chunks(model, read_corpus(corpus_path("smollm2-135m-instruct"), "train"), 128, args.tokens)
    n_tok = sum(len(c) - 1 for c in chunks)

    def ours():
        with tempfile.TemporaryDirectory() as d:
            collect_activations(model, chunks, hooks, d, progress=False)

    def naive():
        for h in hooks:
            with tempfile.TemporaryDirectory() as d:
                collect_activations(model, chunks, [h], d, progress=False)

    t_ours, t_naive = best_of(ours, 1), best_of(naive, 1)
    print(f"activation collection, {len(hooks)} hooks, {n_tok} tokens: one pass {n_tok / t_ours:.0f} tok/s, "
          f"one pass per hook {n_tok / t_naive:.0f} tok/s, ratio {t_naive / t_ours:.2f}x")

    if not saes:
        print("no shipped SAEs: skipping the encode benchmarks")
        return
    hook = hooks[0]
    sae = load_sae(hook, model=model)
    enc = encode_prompts(model, builtin_prompts("harmful", "all")[: args.n])

    def plain():
        with torch.inference_mode():
            for b in iter_batches(enc, 16):
                model(b.tokens, attention_mask=b.attention_mask)

    def features():
        collect_prompt_features(model, sae, enc, progress=False)

    def spliced():
        def splice(act, hook):
            x = act.float()
            recon = sae.decode(sae.encode(x))
            return (recon + (x - recon)).to(act.dtype)  # error term kept: same output, full SAE cost

        with torch.inference_mode():
            for b in iter_batches(enc, 16):
                model.run_with_hooks(b.tokens, attention_mask=b.attention_mask, fwd_hooks=[(hook, splice)])

    features()
    t_plain, t_feat, t_splice = best_of(plain, args.repeats), best_of(features, args.repeats), best_of(spliced, args.repeats)
    print(f"{len(enc)} prompts, SAE at {hook} (d_sae {sae.cfg.d_sae})")
    print(f"plain forward            {t_plain:6.2f} s  1.00x")
    print(f"feature activations      {t_feat:6.2f} s  {t_feat / t_plain:.2f}x of plain (stops after layer "
          f"{hook.split('.')[1]})")
    print(f"SAE spliced, full model  {t_splice:6.2f} s  {t_splice / t_plain:.2f}x of plain")


if __name__ == "__main__":
    main()
