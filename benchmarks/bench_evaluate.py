"""Benchmark the evaluation's generation: several defenses answering the same prompts with the prompt's layers below
each defense computed once (``generate_shared``) vs one ordinary generation per defense, the next-token KL of those
defenses reusing the plain run's lower layers vs a full defended pass, and the gate pass stopped after the gate's
layer vs a full forward, and the shared generation on a bfloat16 copy vs float32. One run; the answers / KL figures of
both ways are compared.

    python benchmarks/bench_evaluate.py [--model smollm2-135m-instruct] [--layer 21] [--n 50] [--tokens 24]

Defenses: none, and three without a gate at ``--layer`` (a direction ablation, two heads zeroed, the MLP zeroed),
as the evaluation's baselines are; prompts: ``--n`` held-out harmful requests in the role-play template.
"""

from __future__ import annotations

import argparse
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--layer", type=int, default=21, help="the layer the defenses act at (SmolLM2's onset: 21)")
    ap.add_argument("--n", type=int, default=50, help="prompts")
    ap.add_argument("--tokens", type=int, default=24, help="new tokens per answer")
    ap.add_argument("--batch", type=int, default=50)
    args = ap.parse_args()

    from trace_circuits import Operation, load_model
    from trace_circuits.datasets import builtin_prompts
    from trace_circuits.evaluate.attacks import attack_texts
    from trace_circuits.gate import user_turn_end
    from trace_circuits.generation import gate_opens, generate_batch
    from trace_circuits.hookset import hookset_for
    from trace_circuits.models import load_hf_model
    from trace_circuits.shared_generation import generate_shared

    torch.set_grad_enabled(False)
    tl = load_model(args.model, device="cpu", progress=False)
    hf, tok = load_hf_model(args.model)
    d, L = tl.cfg.d_model, args.layer
    torch.manual_seed(0)
    r = torch.randn(d)
    r = r / r.norm()
    defenses = {"none": None,
                "direction": hookset_for(tl, [Operation(kind="direction", layer=L, mode="ablate", tensors={"r": r})]),
                "heads": hookset_for(tl, [Operation(kind="heads", layer=L, heads=[0, 1], scale=0.0)]),
                "mlp": hookset_for(tl, [Operation(kind="mlp", layer=L, scale=0.0)])}
    texts = attack_texts(tok, builtin_prompts("harmful", "test")[:args.n], "role_play", True)
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))

    t0 = time.perf_counter()
    shared = generate_shared(hf, tok, texts, defenses, args.tokens, args.batch, progress=False)
    t_shared = time.perf_counter() - t0
    t0 = time.perf_counter()
    naive = {}
    for name, hs in defenses.items():
        naive[name] = [None] * len(texts)
        for s in range(0, len(order), args.batch):
            idx = order[s:s + args.batch]
            for i, a in zip(idx, generate_batch(hf, tok, [texts[i] for i in idx], args.tokens, hs)[0]):
                naive[name][i] = a
    t_naive = time.perf_counter() - t0
    same = sum(a == b for name in defenses for a, b in zip(shared[name][0], naive[name]))
    total = len(texts) * len(defenses)
    print(f"{args.model}: {len(defenses)} defenses (none + 3 at layer {L} of {tl.cfg.n_layers}) x {len(texts)} "
          f"prompts x {args.tokens} tokens")
    print(f"  shared prompt layers: {t_shared:.1f} s   one generation per defense: {t_naive:.1f} s   "
          f"ratio {t_naive / t_shared:.2f}x   identical answers {same}/{total}")

    # the KL on held-out benign text: context = first half, continuation = second half (as the evaluation measures it)
    from trace_circuits.corpus import benign_documents
    from trace_circuits.evaluate.utility import next_token_kl, plain_logprobs, split_text

    ctx, cont = split_text(tok, benign_documents(tok, args.model, args.n))
    plain = plain_logprobs(hf, tok, ctx, cont)
    recorded = plain_logprobs(hf, tok, ctx, cont, record=[L])
    t_kl_shared = t_kl_full = 0.0
    worst = 0.0
    for name, hs in defenses.items():
        if hs is None:
            continue
        t0 = time.perf_counter()
        a = next_token_kl(hf, tok, ctx, cont, hs, plain=recorded)
        t_kl_shared += time.perf_counter() - t0
        t0 = time.perf_counter()
        b = next_token_kl(hf, tok, ctx, cont, hs, plain=plain)
        t_kl_full += time.perf_counter() - t0
        worst = max(worst, abs(a["kl_per_token"] - b["kl_per_token"]))
    print(f"  KL of the 3 defenses on {len(ctx)} documents, plain lower layers reused: {t_kl_shared:.1f} s   full "
          f"defended passes: {t_kl_full:.1f} s   ratio {t_kl_full / t_kl_shared:.2f}x   largest KL difference "
          f"{worst:.1e}")

    # the same shared generation on a bfloat16 copy (the evaluation's default where the CPU has native bf16)
    from trace_circuits.models import hf_in_dtype, native_bf16

    half = hf_in_dtype(hf, torch.bfloat16)
    t0 = time.perf_counter()
    low = generate_shared(half, tok, texts, defenses, args.tokens, args.batch, progress=False)
    t_low = time.perf_counter() - t0
    same_low = sum(a == b for name in defenses for a, b in zip(shared[name][0], low[name][0]))
    print(f"  shared generation in bfloat16 (native bf16 on this CPU: {native_bf16('cpu')}): {t_low:.1f} s   float32: "
          f"{t_shared:.1f} s   ratio {t_shared / t_low:.2f}x   answers identical to float32 {same_low}/{total}")

    gate = hookset_for(tl, [Operation(kind="prompt_probe", layer=L, gap=1.0, anchor=user_turn_end(tl),
                                      gate_threshold=0.0, tensors={"r": r, "mu": torch.zeros(d)})])
    t0 = time.perf_counter()
    stopped = gate_opens(hf, tok, texts, gate, args.batch)
    t_stop = time.perf_counter() - t0
    t0 = time.perf_counter()
    full = []
    for s in range(0, len(texts), args.batch):
        enc = tok(texts[s:s + args.batch], return_tensors="pt", padding=True, add_special_tokens=False)
        with gate.attach(hf) as rt:
            hf(**enc, logits_to_keep=1)
        full += rt.gate_open.tolist()
    t_full = time.perf_counter() - t0
    print(f"  gate pass stopped after layer {L}: {t_stop:.1f} s   full forward: {t_full:.1f} s   ratio "
          f"{t_full / t_stop:.2f}x   same decisions {sum(a == b for a, b in zip(stopped, full))}/{len(texts)}")


if __name__ == "__main__":
    from trace_circuits.errors import TraceCircuitsError

    try:
        main()
    except TraceCircuitsError as e:  # bad input: one line, no traceback
        raise SystemExit(f"error: {e}")
