"""Benchmark stage 1: scan throughput vs a plain forward pass, vs a naive full cache, and model-load times.

Every ratio is measured in this one run, on the same batches:
  * plain forward   : ``model(tokens, attention_mask=mask)`` (logits), the baseline
  * ours            : pattern hooks only, binned to segment profiles inside the hook
  * naive           : ``run_with_cache`` of every activation, then the same binning from the cache
Model load: first load (GGUF dequantization + conversion, into an empty cache) vs second load (safetensors cache).

    python benchmarks/bench_scan.py [--n 96] [--batch-size 16] [--repeats 2]
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time

import torch
from _timing import best_of


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=96, help="prompts (harmful train split). Default: 96")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=2, help="best of N timings. Default: 2")
    ap.add_argument("--skip-load", action="store_true", help="skip the model-load timings")
    args = ap.parse_args()

    from trace_circuits import builtin_prompts, encode_prompts, load_model
    from trace_circuits.attention_profiles import collect_attention_profiles, segment_ids
    from trace_circuits.prompts import iter_batches

    print(f"# bench_scan  torch {torch.__version__}  threads {torch.get_num_threads()}  {platform.processor() or platform.machine()}")
    if not args.skip_load:
        with tempfile.TemporaryDirectory() as tmp:
            old = os.environ.get("TRACE_CIRCUITS_CACHE")
            os.environ["TRACE_CIRCUITS_CACHE"] = tmp
            t0 = time.perf_counter()
            load_model(device="cpu", progress=False)
            first = time.perf_counter() - t0
            t0 = time.perf_counter()
            load_model(device="cpu", progress=False)
            second = time.perf_counter() - t0
            if old is None:
                del os.environ["TRACE_CIRCUITS_CACHE"]
            else:
                os.environ["TRACE_CIRCUITS_CACHE"] = old
        print(f"model load: first (GGUF -> TransformerLens) {first:.1f} s, second (cache) {second:.2f} s, "
              f"ratio {first / second:.0f}x")

    model = load_model(device="cpu", progress=False)
    prompts = builtin_prompts("harmful", "all")[: args.n]
    enc = encode_prompts(model, prompts)
    n_tokens = sum(enc.lengths)

    def plain():
        with torch.inference_mode():
            for b in iter_batches(enc, args.batch_size):
                model(b.tokens, attention_mask=b.attention_mask)

    def ours():
        collect_attention_profiles(model, enc, batch_size=args.batch_size, progress=False)

    def naive():
        S = 11
        with torch.inference_mode():
            for b in iter_batches(enc, args.batch_size):
                _, cache = model.run_with_cache(b.tokens, attention_mask=b.attention_mask)
                seg = segment_ids(enc, b.indices, b.tokens.shape[1], 8)
                for l in range(model.cfg.n_layers):
                    p = cache[f"blocks.{l}.attn.hook_pattern"][:, :, -1:, :].mean(2)
                    out = torch.zeros(p.shape[0], p.shape[1], S + 1)
                    out.scatter_add_(2, seg[:, None, :].expand(-1, p.shape[1], -1), p)

    ours()  # warm-up
    t_plain = best_of(plain, args.repeats)
    t_ours = best_of(ours, args.repeats)
    t_naive = best_of(naive, args.repeats)
    print(f"prompts {len(enc)}  tokens {n_tokens}  batch {args.batch_size}")
    print(f"plain forward : {t_plain:6.2f} s  {len(enc) / t_plain:6.1f} prompts/s")
    print(f"scan (ours)   : {t_ours:6.2f} s  {len(enc) / t_ours:6.1f} prompts/s  ratio to plain {t_ours / t_plain:.2f}x")
    print(f"naive cache   : {t_naive:6.2f} s  {len(enc) / t_naive:6.1f} prompts/s  ratio to plain {t_naive / t_plain:.2f}x")
    print(f"ours vs naive : {t_naive / t_ours:.2f}x faster")


if __name__ == "__main__":
    main()
