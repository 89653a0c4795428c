"""Which message reading, at which rate, serves the worst attack template? The prompt gate's coverage per template,
out of fold and on the held-out test split (one run).

At the layer of a hook set's prompt gate, with its calibration settings (``provenance.config.gate``): the gate's
calibration sequences (training requests asked directly and under the templates, ``gate.calibration_sets``, plus its
benign documents) and every test request (harmful, benign twins, hard negatives) under every template the gate
calibrates on. Pass 1 reads the last user turn's mean (the end-of-turn reading) and fits the probe per fold (5 folds by
request, :func:`trace_circuits.gate.out_of_fold_fits`) and on everything; pass 2 scores every stretch and every run of
whole sentences of each message with those probes (:func:`trace_circuits.activations.message_span_max`). Then the
gate's own rule per reading and message rate (message threshold at that benign rate, end-of-turn threshold the lowest
keeping both within ``benign_rate``): harmful coverage per template out of fold and on the test split, and the test
split's benign and hard-negative opening rates. The calibration keeps, per reading, the rate whose worst template is
highest out of fold (``fit_prompt_gate``); the test columns show what that choice does to held-out requests.

    python benchmarks/gate_readings.py --hookset runs/sent/hookset [--rates 0.005,0.01,0.02]
"""

from __future__ import annotations

import argparse


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hookset", required=True, help="hook set folder with a turn prompt gate (`make run` writes one)")
    ap.add_argument("--rates", default="0.005,0.01,0.02", help="message-reading rates to compare")
    args = ap.parse_args()

    import torch

    from trace_circuits import builtin_prompts, encode_prompts, load_hookset, load_model
    from trace_circuits.activations import message_span_max, pooled_positions, residuals_at_layers, \
        sentence_boundary_ids
    from trace_circuits.config import RunConfig
    from trace_circuits.corpus import benign_documents
    from trace_circuits.errors import TraceCircuitsError
    from trace_circuits.evaluate import attack_texts
    from trace_circuits.gate import (anchor_positions, benign_threshold, calibration_sets, fit_logistic,
                                     message_thresholds, out_of_fold_fits, request_fold_groups, turn_start_positions)

    hs = load_hookset(args.hookset)
    g = hs.gate_operation
    if g is None or g.kind != "prompt_probe" or g.pool != "turn":
        raise TraceCircuitsError(f"{args.hookset} has no turn prompt gate; export one with `trace-circuits run`")
    gc = RunConfig.from_json(hs.provenance["config"]).gate
    try:
        rates = [float(r) for r in args.rates.split(",")]
    except ValueError:
        raise TraceCircuitsError(f"--rates takes rates separated by commas, e.g. 0.005,0.01,0.02, not {args.rates!r}") \
            from None
    if not all(0 < r <= gc.benign_rate for r in rates):
        raise TraceCircuitsError(f"--rates must lie in (0, the gate's benign rate {gc.benign_rate}], got {args.rates!r}")
    model = load_model(hs.model, device="cpu", progress=False)
    tok, L, anchor = model.tokenizer, g.layer, g.anchor

    benign = list(builtin_prompts("benign", "train")) + (list(builtin_prompts("hard_negative", "train"))
                                                          if gc.hard_negatives else [])
    h, b, (hn, bn), (hr, br) = calibration_sets(model, list(builtin_prompts("harmful", "train")), benign,
                                                gc.templates, gc.passes)
    docs = encode_prompts(model, benign_documents(tok, hs.model, gc.text_docs, split="train"), chat=False)
    frames = list(dict.fromkeys(hn))
    test, test_rows = [], []  # (kind, template) per test sequence
    for kind in ("harmful", "benign", "hard_negative"):
        prompts = list(builtin_prompts(kind, "test"))
        for t in frames:
            test += attack_texts(tok, prompts, t)
            test_rows += [(kind, t)] * len(prompts)
    sets = [h, b, docs, encode_prompts(model, test, chat=False)]
    n_h, n_b, n_t = len(h), len(b), len(docs)

    def where(enc, is_doc):
        if is_doc:
            return None, None, None
        pos = anchor_positions(enc, anchor)
        return pos, turn_start_positions(enc, g.opener, pos), [p - len(anchor) for p in pos]

    X = []  # pass 1: the end-of-turn reading
    for i, enc in enumerate(sets):
        pos, starts, _ = where(enc, i == 2)
        X.append(residuals_at_layers(model, enc, [L], pos, 16, True, "turn means", "turn",
                                     {L: g.massive_norm_threshold}, starts)[L])
    Xc, y = torch.cat(X[:3]), torch.cat([torch.ones(n_h), torch.zeros(n_b + n_t)])
    l2 = hs.provenance.get("gate_calibration", {}).get("l2", gc.l2)  # the strength the gate kept
    fits = out_of_fold_fits(Xc, y, l2, 5, request_fold_groups(hr, br, n_t))
    probes = [f for _, f in fits] + [fit_logistic(Xc, y, l2)]
    V = torch.stack([w / sd for w, _, _, sd in probes], 1)
    c = torch.tensor([bb - float((m / sd) @ w) for w, bb, m, sd in probes])
    marks = torch.tensor(sentence_boundary_ids(tok), dtype=torch.long)

    def reader(x, valid, last, start, l, ids):
        q, bound = pooled_positions(x, valid, last, g.massive_norm_threshold, start), torch.isin(ids, marks)
        return torch.cat([message_span_max(x, q, V, gc.message_min_tokens, r, bound) for r in ("span", "sentence")], 1)

    M = []  # pass 2: [rows, 2 readings x (5 folds + full)]
    for i, enc in enumerate(sets):
        pos, starts, last = where(enc, i == 2)
        M.append(residuals_at_layers(model, enc, [L], last, 16, True, "message spans", "turn", None, starts,
                                     reader=reader)[L])
    Mc, Mt = torch.cat(M[:3]), M[3]
    k = len(probes)
    fold = torch.zeros(len(Xc), dtype=torch.long)
    for f, (rows, _) in enumerate(fits):
        fold[rows] = f
    score = lambda Z, cols: ((Z.double() @ V[:, cols].double()) + c[cols].double()).float()  # noqa: E731
    oof_s = torch.stack([score(Xc, f) for f in range(k - 1)], 1).gather(1, fold[:, None])[:, 0]
    test_s = score(X[3], k - 1)
    neg = slice(n_h, None)
    print(f"# gate readings at layer {L} of {args.hookset} ({hs.model}); benign rate {gc.benign_rate}, "
          f"{n_h} harmful / {n_b + n_t} benign calibration sequences, {len(test)} test sequences")
    print("| reading | rate | out of fold, harmful per template (" + ", ".join(frames) + ") | worst | test, harmful "
          "per template | test benign | test hard negatives |\n|---|---|---|---|---|---|---|")
    for reading, off in (("end of turn only", None), ("span", 0), ("sentence", k)):
        for rate in ([0.0] if off is None else rates):
            if off is None:
                q_s, q_m = benign_threshold(oof_s[neg], gc.benign_rate), float("inf")
                oof_m = test_m = torch.full((1,), -float("inf"))
            else:
                oof_m = (Mc[:, off:off + k - 1] + c[:k - 1]).gather(1, fold[:, None])[:, 0]
                test_m = Mt[:, off + k - 1] + c[k - 1]
                q_m, q_s = message_thresholds(oof_s[neg], oof_m[neg], rate, gc.benign_rate)
            open_oof = (oof_s > q_s) | (oof_m > q_m)
            open_test = (test_s > q_s) | (test_m > q_m)
            per = [float(open_oof[:n_h][[i for i, t in enumerate(hn) if t == f]].float().mean()) for f in frames]
            tst = {key: [] for key in set(test_rows)}
            for i, key in enumerate(test_rows):
                tst[key].append(bool(open_test[i]))
            rate_of = lambda kind: (sum(sum(tst[(kind, f)]) for f in frames)  # noqa: E731
                                    / sum(len(tst[(kind, f)]) for f in frames))
            print(f"| {reading} | {rate if off is not None else '-'} | " + ", ".join(f"{p:.2f}" for p in per)
                  + f" | {min(per):.2f} | " + ", ".join(f"{sum(tst[('harmful', f)]) / len(tst[('harmful', f)]):.2f}"
                                                       for f in frames)
                  + f" | {rate_of('benign'):.3f} | {rate_of('hard_negative'):.3f} |")


if __name__ == "__main__":
    from trace_circuits.errors import TraceCircuitsError

    try:
        main()
    except TraceCircuitsError as e:  # bad input: one line, no traceback
        raise SystemExit(f"error: {e}")
