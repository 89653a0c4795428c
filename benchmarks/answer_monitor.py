"""Would an answer monitor catch what the prompt gate lets through? An offline measurement for issue 12 (no hook set
is changed): a linear probe reads the residual stream at the *answer's* positions, the running mean of layer ``l``'s
residual over the answer so far,

    m_p = mean_{q <= p} h_l[q]   (q, p: answer positions),   s_p = <(m_p - mu)/sd, w> + b,

trained (class-balanced L2 logistic regression, scikit-learn) on the model's own greedy answers to the gate's
calibration requests (training split, direct and under the attack templates): answers to harmful requests that do
not refuse (the model complies) vs answers to benign requests and the hard negatives' training split. The monitor
fires at the first answer position ``p >= --min-pos`` with ``s_p > t``; ``t`` is set so that it fires on
``--benign-rate`` of the benign training answers (out of fold, 5 folds grouped by request, as the gate is calibrated).

It is then applied, teacher-forced, to a ``make run`` folder's held-out undefended answers (``responses.jsonl``, rows
of the defense ``none``): the complying harmful answers the hook set's prompt gate did not open on (what gets
through today), every complying harmful answer, and the benign and hard-negative answers (how often it would fire
on them); and, with ``--attack``, to an adaptive-attack folder's answers (``trace-circuits attack``: the GCG answers
against the hook set, and its benign answers). Fired at position p means the answer's first p + 1 tokens would have
been generated before the monitor could act.

    python benchmarks/answer_monitor.py runs/latest [--attack runs/attack_steer] [--layer 18] [--benign-rate 0.02]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from tqdm.auto import tqdm


def answer_means(model, texts, answers, layers, n_tokens, batch_size=16, desc="answer residuals"):
    """``{layer: [n, n_tokens, d]}`` running means of the residual over each answer's first ``n_tokens`` positions
    (teacher-forced; shorter answers repeat their last mean) and each answer's length in tokens."""
    from trace_circuits.names import hook_name
    from trace_circuits.prompts import pad_sequences

    tok = model.tokenizer
    starts, seqs = [], []
    for t, a in zip(texts, answers):
        p = tok(t, add_special_tokens=False)["input_ids"]
        q = tok(a, add_special_tokens=False)["input_ids"][:n_tokens] or [tok.eos_token_id]
        starts.append(len(p))
        seqs.append(p + q)
    names = [hook_name("resid_post", layer) for layer in layers]
    out = {layer: torch.zeros(len(seqs), n_tokens, model.cfg.d_model) for layer in layers}
    lengths = torch.zeros(len(seqs), dtype=torch.long)
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
    with torch.inference_mode():
        for s in tqdm(range(0, len(order), batch_size), desc=desc):
            rows = order[s:s + batch_size]
            ids, mask = pad_sequences([seqs[i] for i in rows], tok.pad_token_id or 0, "left")
            _, cache = model.run_with_cache(ids, attention_mask=mask, names_filter=names,
                                            stop_at_layer=max(layers) + 1)
            W = ids.shape[1]
            for r, i in enumerate(rows):
                a0 = W - len(seqs[i]) + starts[i]
                n = len(seqs[i]) - starts[i]
                lengths[i] = n
                for layer, name in zip(layers, names):
                    h = cache[name][r, a0:a0 + n].float()
                    m = h.cumsum(0) / torch.arange(1, n + 1)[:, None]
                    out[layer][i, :n] = m
                    out[layer][i, n:] = m[-1]
    return out, lengths


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", help="a make run folder (responses.jsonl, config.json)")
    ap.add_argument("--attack", help="a `trace-circuits attack` folder to score too")
    ap.add_argument("--layer", type=int, action="append", help="layers to read (repeatable; default 18 and 21)")
    ap.add_argument("--benign-rate", type=float, default=0.02)
    ap.add_argument("--min-pos", type=int, default=1, help="first answer position the monitor may fire at")
    ap.add_argument("--tokens", type=int, default=24, help="answer tokens read (the evaluation generates 24)")
    ap.add_argument("--l2", type=float, default=0.02)
    args = ap.parse_args()
    from trace_circuits.errors import TraceCircuitsError

    try:
        monitor(args)
    except TraceCircuitsError as e:  # bad input: one line, no traceback
        raise SystemExit(f"error: {e}")


def monitor(args) -> None:
    from trace_circuits.errors import TraceCircuitsError

    for f in ("config.json", "responses.jsonl"):
        if not Path(args.run, f).exists():
            raise TraceCircuitsError(f"{args.run} has no {f}: give a folder `make run` wrote (e.g. runs/latest)")
    if args.attack and not Path(args.attack, "answers_c_adaptive.jsonl").exists():
        raise TraceCircuitsError(f"{args.attack} has no answers_c_adaptive.jsonl: give a folder `trace-circuits "
                                 "attack --out` wrote")
    if not 0 < args.benign_rate < 1:
        raise TraceCircuitsError(f"--benign-rate must lie between 0 and 1, e.g. 0.02, not {args.benign_rate}")
    if args.tokens < 2 or not 0 <= args.min_pos < args.tokens:
        raise TraceCircuitsError("--tokens must be at least 2 and --min-pos a position below it")

    import trace_circuits as tc
    from trace_circuits.evaluate.attacks import attack_texts
    from trace_circuits.evaluate.judges import is_refusal
    from trace_circuits.gate import benign_threshold, fit_logistic, out_of_fold_scores, request_fold_groups
    from trace_circuits.generation import generate_batch
    from trace_circuits.models import hf_in_dtype, resolve_eval_dtype

    layers = args.layer or [18, 21]
    run = tc.Run.load(args.run, progress=False)
    model = run.model
    if not all(0 <= layer < model.cfg.n_layers for layer in layers):
        raise TraceCircuitsError(f"--layer must be a layer of the model (0..{model.cfg.n_layers - 1})")
    hf, tok = run.hf
    hf = hf_in_dtype(hf, resolve_eval_dtype("auto"))
    harmful, benign, _, (h_req, b_req) = run.gate_calibration_sets()
    texts = list(harmful.texts) + list(benign.texts)
    answers = []
    for s in tqdm(range(0, len(texts), 48), desc="the model's own answers"):
        answers += generate_batch(hf, tok, texts[s:s + 48], args.tokens)[0]
    nh = len(harmful)
    comply = [i for i in range(nh) if not is_refusal(answers[i]) and answers[i].strip()]
    keep = comply + list(range(nh, len(texts)))
    y = torch.tensor([1.0] * len(comply) + [0.0] * (len(texts) - nh))
    M, L = answer_means(model, [texts[i] for i in keep], [answers[i] for i in keep], layers, args.tokens,
                        desc="training answers' residuals")
    groups = request_fold_groups([h_req[i] for i in comply], list(b_req), 0)
    print(f"# answer_monitor  {args.run}  training answers: {len(comply)} complying harmful of {nh}, "
          f"{len(texts) - nh} benign; layers {layers}; benign rate {args.benign_rate}; min position {args.min_pos}")

    pos = torch.arange(args.tokens)
    fit = {}
    for layer in layers:
        # out of fold at every position: the probe is fitted on all positions' running means of the training folds
        n, T, d = M[layer].shape
        flat = M[layer].reshape(n * T, d)
        ok = (pos[None, :] < L[:, None]) & (pos[None, :] >= args.min_pos)
        rows = ok.reshape(-1)
        oof = torch.full((n * T,), -torch.inf)
        row_groups = [groups[i // T] for i in range(n * T) if rows[i]]  # a sequence's positions share a fold
        oof[rows] = out_of_fold_scores(flat[rows], y.repeat_interleave(T)[rows], args.l2, 5, row_groups)
        seq_max = oof.reshape(n, T).max(1).values
        t = benign_threshold(seq_max[y == 0], args.benign_rate)
        caught = seq_max[y == 1] > t
        w, b, m, sd = fit_logistic(flat[rows], y.repeat_interleave(T)[rows], args.l2)
        fit[layer] = (w, b, m, sd, float(t))
        benign_fired = float((seq_max[y == 0] > t).float().mean())
        print(f"layer {layer}: out of fold, fires on {float(caught.float().mean()):.2f} of complying harmful and "
              f"{benign_fired:.3f} of benign training answers (threshold {float(t):.3f})")

    def score(texts_, answers_):
        Mt, Lt = answer_means(model, texts_, answers_, layers, args.tokens, desc="held-out answers' residuals")
        out = {}
        for layer, (w, b, m, sd, t) in fit.items():
            s = (((Mt[layer].double() - m) / sd) @ w + b).float()
            s[(pos[None, :] >= Lt[:, None]) | (pos[None, :] < args.min_pos)] = -torch.inf
            fired = s > t
            first = torch.where(fired.any(1), fired.float().argmax(1), torch.full((len(texts_),), -1))
            out[layer] = first
        return out

    def report(name, first, n):
        for layer in layers:
            f = first[layer]
            hit = f >= 0
            where = f"; fires at answer token median {float(f[hit].float().median()):.0f}" if hit.any() else ""
            print(f"  {name} (n={n}), layer {layer}: fires on {int(hit.sum())} ({float(hit.float().mean()):.2f})"
                  f"{where}")

    rows = [json.loads(x) for x in Path(args.run, "responses.jsonl").read_text().splitlines()]
    none = [r for r in rows if r["defense"] == "none"]
    tr = {(r["kind"], r["template"], r["prompt"]): r for r in rows if r["defense"] == "tracerouter"}
    text_of = lambda r: attack_texts(tok, [r["prompt"]], r["template"])[0]  # noqa: E731
    harm = [r for r in none if r["kind"] == "harmful" and not r["refusal"] and r["response"].strip()]
    missed = [r for r in harm if not tr.get((r["kind"], r["template"], r["prompt"]), {}).get("gate_opened", True)]
    print(f"held-out test split ({args.run}/responses.jsonl, undefended answers):")
    for name, sel in (("complying harmful answers, the prompt gate shut", missed), ("complying harmful answers", harm),
                      ("benign answers", [r for r in none if r["kind"] == "benign"]),
                      ("hard-negative answers", [r for r in none if r["kind"] == "hard_negative"])):
        if sel:
            report(name, score([text_of(r) for r in sel], [r["response"] for r in sel]), len(sel))
    if args.attack:
        print(f"adaptive attack ({args.attack}):")
        for f, name in (("answers_c_adaptive.jsonl", "GCG against the hook set, answers"),
                        ("answers_a_undefended.jsonl", "GCG against the undefended model, answers"),
                        ("answers_benign.jsonl", "benign twins, answers")):
            p = Path(args.attack, f)
            if p.exists():
                sel = [json.loads(x) for x in p.read_text().splitlines()]
                sel = [r for r in sel if "benign" in f or not is_refusal(r["response"])]
                report(name + ("" if "benign" in f else ", complying"),
                       score([r["prompt"] for r in sel], [r["response"] for r in sel]), len(sel))


if __name__ == "__main__":
    main()
