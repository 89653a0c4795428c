"""The whole pipeline on a tiny real model (transformers Llama + its TransformerLens twin, a planted harm direction,
SAE-Lens SAEs): Run's stages, the hook set, the baselines, the evaluation and the report, save/load, and the config's
JSON round trip. Fast: no real model is loaded."""

import dataclasses
import json

import pytest
import tiny
import torch

from trace_circuits import (
    GateConfig,
    Run,
    RunConfig,
    TraceCircuitsError,
    TraceConfig,
    builtin_prompts,
    encode_prompts,
    fit_prompt_gate,
)
from trace_circuits.config import EvaluationConfig, FeaturesConfig, ScanConfig


@pytest.fixture(scope="module")
def planted():
    tl, hf, tok = tiny.pair("llama", n_layers=4, plant=True)
    saes = {1: tiny.sae("topk", "blocks.1.hook_resid_post", plant=True),
            2: tiny.sae("standard", "blocks.2.hook_resid_post"), 3: tiny.sae("jumprelu", "blocks.3.hook_resid_post")}
    return tl, hf, tok, saes


def small_config() -> RunConfig:
    return RunConfig(model="tiny-llama", limit=40, scan=ScanConfig(n_bootstrap=50, n_permutations=50),
                     features=FeaturesConfig(layer=1),
                     trace=TraceConfig(n_prompts=8, n_candidates=10, max_sources=4, copies_per_pass=4),
                     gate=GateConfig(text_docs=0),
                     evaluation=EvaluationConfig(templates="direct,prefill,multi_turn", limit=6, max_new_tokens=4,
                                                 batch_size=12, text_docs=0,
                                                 baselines="top_feature,direction_ablation,layer_ablation"))


def test_prompt_gate_finds_a_planted_direction(planted):
    """The harm direction planted in the embeddings reaches the end of the user's turn through attention; the gate
    fitted on training prompts separates held-out ones, read at inference exactly as the runtime reads them."""
    from trace_circuits.gate import gate_decisions
    from trace_circuits.hookset import hookset_for

    tl, _, _, _ = planted
    h = encode_prompts(tl, builtin_prompts("harmful", "train")[:80])
    b = encode_prompts(tl, builtin_prompts("benign", "train")[:80])
    op, calib = fit_prompt_gate(tl, h, b, layer=2, benign_gate_rate=0.05)
    assert calib["gate_score_auroc"] > 0.9 and calib["gate_rate_benign"] <= 0.1, calib
    assert op.anchor and op.tensors["r"].shape == (64,)
    hs = hookset_for(tl, [op])
    _, opened_h = gate_decisions(tl, hs, encode_prompts(tl, builtin_prompts("harmful", "test")))
    _, opened_b = gate_decisions(tl, hs, encode_prompts(tl, builtin_prompts("benign", "test")))
    assert opened_h.mean() > 0.6 and opened_b.mean() < 0.15, (opened_h.mean(), opened_b.mean())
    # with nothing planted the same probe separates nothing
    plain, _, _ = tiny.pair("llama", n_layers=4)
    _, calib0 = fit_prompt_gate(plain, encode_prompts(plain, builtin_prompts("harmful", "train")[:80]),
                                encode_prompts(plain, builtin_prompts("benign", "train")[:80]), layer=2)
    assert calib0["gate_score_auroc"] < calib["gate_score_auroc"] - 0.2


def test_read_at_means_the_prompt_up_to_the_anchor_without_the_first_token_and_sinks():
    from trace_circuits.activations import read_at

    x = torch.arange(2 * 5 * 2, dtype=torch.float32).reshape(2, 5, 2)
    x[1, 2] = 1000.0  # a massive-norm position
    valid = torch.tensor([[False, True, True, True, True], [True, True, True, True, True]])  # row 0 left-padded
    last = torch.tensor([3, 4])
    got = read_at(x, valid, last, "mean", massive_norm_threshold=500.0)
    assert torch.equal(got[0], x[0, 2:4].mean(0))  # positions 2..3: after the first real token (1), up to last
    assert torch.equal(got[1], x[1, [1, 3, 4]].mean(0))  # the sink at 2 left out
    assert torch.equal(read_at(x, valid, last, "last"), x[[0, 1], [3, 4]])
    assert torch.equal(read_at(x, valid, torch.tensor([1, 0]), "mean")[0], x[0, 1])  # nothing before: x[last]
    # turn: only after the header that opens the last user turn (row 0's ends at 2; row 1 has none: as mean)
    got = read_at(x, valid, last, "turn", massive_norm_threshold=500.0, start=torch.tensor([2, -1]))
    assert torch.equal(got[0], x[0, 3]) and torch.equal(got[1], x[1, [1, 3, 4]].mean(0))


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_shared_prefix_residuals_equal_a_forward_per_prompt(arch):
    """The prefix a group of prompts shares runs once (TransformerLens's frozen key/value cache): every pool reads
    what one unpadded forward pass per prompt reads, positions inside the prefix included."""
    from trace_circuits.activations import residuals_at_layers, shared_prefix_groups
    from trace_circuits.prompts import EncodedPrompts

    tl, _, _ = tiny.pair(arch, n_layers=3)
    g = torch.Generator().manual_seed(0)
    head_a, head_b = torch.randint(3, 90, (12,), generator=g).tolist(), torch.randint(3, 90, (9,), generator=g).tolist()
    seqs = [head_a + torch.randint(3, 90, (n,), generator=g).tolist() for n in (1, 4, 9, 2, 7)]
    seqs += [head_b + torch.randint(3, 90, (n,), generator=g).tolist() for n in (5, 3)]
    seqs += [torch.randint(3, 90, (n,), generator=g).tolist() for n in (6, 15)]
    enc = EncodedPrompts([""] * len(seqs), seqs, [(0, len(q)) for q in seqs], pad_token_id=0)
    labels = ["a"] * 5 + ["b"] * 2 + ["c", "d"]
    plan = shared_prefix_groups(enc, labels)
    assert [(p, len(i)) for p, i in plan] == [(12, 5), (9, 2), (0, 1), (0, 1)]
    assert shared_prefix_groups(enc)[0][0] == 0  # no prefix all nine share
    positions = [len(q) - 1 if i % 3 else 5 for i, q in enumerate(seqs)]  # some read inside the prefix
    starts = [3 if i % 2 else -1 for i in range(len(seqs))]
    for pool in ("last", "mean", "turn"):
        got = residuals_at_layers(tl, enc, [1, 2], positions, batch_size=3, pool=pool, starts=starts,
                                  massive_norm_thresholds={1: 1e9}, prefix_labels=labels)
        one = [residuals_at_layers(tl, enc.select([i]), [1, 2], [positions[i]], pool=pool, starts=[starts[i]],
                                   massive_norm_thresholds={1: 1e9}) for i in range(len(seqs))]
        for layer in (1, 2):
            want = torch.cat([o[layer] for o in one])
            assert torch.allclose(got[layer], want, atol=1e-5), (pool, layer, (got[layer] - want).abs().max())


def test_message_span_max_is_the_best_span_mean_and_a_suffix_cannot_lower_it():
    """Both readings against a brute force over the kept positions (padding, a header and a sink left out), the
    span reading never under the prefix reading, and more kept positions appended never lower either."""
    from trace_circuits.activations import message_span_max

    g = torch.Generator().manual_seed(0)
    x, V = torch.randn(2, 9, 4, generator=g), torch.randn(4, 3, generator=g)
    q = torch.ones(2, 9, dtype=torch.bool)
    q[0, :2] = False  # padding / the turn's header
    q[1, 5] = False  # an attention sink
    short = q.clone()
    short[:, 7:] = False  # the same message without its last two tokens
    for L in (1, 3):
        spans, prefix = message_span_max(x, q, V, L), message_span_max(x, q, V, L, "prefix")
        for b in range(2):
            idx = q[b].nonzero()[:, 0].tolist()
            runs = [x[b, idx[:n]].mean(0) @ V for n in range(L, len(idx) + 1)]
            every = [x[b, idx[a:t]].mean(0) @ V for a in range(len(idx)) for t in range(a + L, len(idx) + 1)]
            assert torch.allclose(prefix[b], torch.stack(runs).max(0).values, atol=1e-5)
            assert torch.allclose(spans[b], torch.stack(every).max(0).values, atol=1e-5)
        assert (spans >= prefix - 1e-6).all()
        assert (spans >= message_span_max(x, short, V, L) - 1e-6).all()
        assert (prefix >= message_span_max(x, short, V, L, "prefix") - 1e-6).all()
    assert torch.isinf(message_span_max(x, q, V, min_tokens=99)).all()  # never that many tokens: -inf
    with pytest.raises(TraceCircuitsError, match="not one of span, prefix"):
        message_span_max(x, q, V, 2, "suffix")


def test_the_sentence_reading_is_the_best_run_of_whole_sentences():
    """The sentence reading against a brute force: spans from the message start or after a sentence mark to a mark or
    the message's last kept position, at least min(L, |Q|) kept positions; a mark outside Q (the header) or a sink
    changes nothing; a message shorter than L is read whole; no marks at all: the whole message; always at most the
    span reading; appended tokens do not lower it when the message ends on a mark."""
    from trace_circuits.activations import message_span_max

    g = torch.Generator().manual_seed(1)
    B, T = 4, 14
    x, V = torch.randn(B, T, 5, generator=g), torch.randn(5, 2, generator=g)
    q = torch.ones(B, T, dtype=torch.bool)
    q[0, :3] = False  # padding and a header
    q[1, 6] = False  # a sink
    q[2, :11] = False  # a 3-token message
    mark = torch.rand(B, T, generator=g) < 0.3
    mark[0, 2] = True  # the header's last token is a mark
    mark[3] = False  # no marks: the whole message
    for L in (1, 4):
        got = message_span_max(x, q, V, L, "sentence", mark)
        for b in range(B):
            Q = q[b].nonzero()[:, 0].tolist()
            starts = [a for a in range(T) if a == 0 or mark[b, a - 1] or a <= Q[0]]
            ends = [t for t in Q if mark[b, t] or t == Q[-1]]
            best = [x[b, S].mean(0) @ V for a in starts for t in ends
                    for S in [[i for i in Q if a <= i <= t]] if len(S) >= min(L, len(Q))]
            assert torch.allclose(got[b], torch.stack(best).max(0).values, atol=1e-5)
        assert (message_span_max(x, q, V, min(L, 3)) >= got - 1e-6).all()
    whole = [x[3].mean(0) @ V]
    assert torch.allclose(message_span_max(x, q, V, 4, "sentence", mark)[3], whole[0], atol=1e-5)
    ends_on_mark = q.clone()
    cut = 9
    ends_on_mark[:, cut + 1:] = False
    m2 = mark.clone()
    m2[:, cut] = True  # the shorter message ends a sentence; the longer one carries on after it
    assert (message_span_max(x, q, V, 2, "sentence", m2) >= message_span_max(x, ends_on_mark, V, 2, "sentence", m2)
            - 1e-6).all()


@pytest.mark.parametrize("reading", ["span", "prefix", "sentence"])
def test_the_message_reading_opens_the_gate_and_a_suffix_cannot_shut_it(planted, tmp_path, reading):
    """A turn gate with the message reading (every span, the running means from the start, or whole sentences):
    calibrated within the benign rate (both readings together), the runtime's message score equals the best span /
    running mean / run of sentences of the message computed by hand (TransformerLens and the transformers model), and
    appending tokens to a message that ends a sentence never lowers it, so where it opened it stays open."""
    from trace_circuits.evaluate.attacks import attack_texts
    from trace_circuits.gate import anchor_positions, gate_decisions, turn_start_positions
    from trace_circuits.hookset import HookSet, hookset_for

    tl, hf, tok, _ = planted
    h = encode_prompts(tl, builtin_prompts("harmful", "train")[:60])
    b = encode_prompts(tl, builtin_prompts("benign", "train")[:60])
    op, calib = fit_prompt_gate(tl, h, b, layer=2, benign_gate_rate=0.1, pool="turn", message_rate=0.05,
                                message_min_tokens=2, message_reading=reading)
    assert op.message_threshold == calib["message_threshold"] and op.message_min_tokens == 2
    assert op.message_reading == calib["message_reading"] == reading
    assert calib["gate_rate_benign"] <= 0.1 and calib["message_rate_benign"] <= 0.05
    assert calib["message_rate_harmful"] > 0.3, calib  # the planted words open it on their own
    with pytest.raises(TraceCircuitsError, match="message reading's rate"):
        fit_prompt_gate(tl, h, b, layer=2, pool="mean", message_rate=0.05)
    hs = hookset_for(tl, [op])
    back = HookSet.load(hs.save(tmp_path / "hs"))
    assert back.gate_operation.message_threshold == op.message_threshold
    assert back.gate_operation.message_reading == reading
    assert back.gate_operation.message_boundary == op.message_boundary and bool(op.message_boundary) == (
        reading == "sentence")
    if reading == "sentence":  # the ids whose text ends a sentence
        assert all(any(c in tok.decode([t]) for c in ".?!:\n") for t in op.message_boundary)
        assert tok.convert_tokens_to_ids("?") in op.message_boundary
    raw = list(builtin_prompts("harmful", "test"))[:8] + list(builtin_prompts("benign", "test"))[:4]
    suffix = " tell me a story about a cat and a dog please"
    texts = attack_texts(tok, raw, "direct") + attack_texts(tok, [p + suffix for p in raw], "direct")
    test = encode_prompts(tl, texts, chat=False)
    ends = anchor_positions(test, op.anchor)
    starts = turn_start_positions(test, op.opener, ends)
    want = []
    for i in range(len(test)):  # by hand: the message's spans (after the header, before the anchor)
        _, cache = tl.run_with_cache(torch.tensor([test.input_ids[i]]), names_filter="blocks.2.hook_resid_post")
        msg = cache["blocks.2.hook_resid_post"][0, starts[i] + 1:ends[i] + 1 - len(op.anchor)]
        firsts, lasts = (range(len(msg)) if reading == "span" else [0]), range(1, len(msg) + 1)
        if reading == "sentence":  # spans from the message start or after a sentence mark, to one or the end
            ids_ = test.input_ids[i][starts[i] + 1:ends[i] + 1 - len(op.anchor)]
            mark = [t in set(op.message_boundary) for t in ids_]
            firsts = [0] + [j + 1 for j in range(len(msg) - 1) if mark[j]]
            lasts = [j + 1 for j in range(len(msg)) if mark[j] or j == len(msg) - 1]
        runs = torch.stack([msg[a:t].mean(0) for a in firsts for t in lasts if t - a >= min(2, len(msg))])
        want.append(float(((runs - op.tensors["mu"]) @ op.tensors["r"]).max()) / op.gap)
    want = torch.tensor(want)
    with back.attach(tl) as rt, torch.no_grad():
        got, opened = [], []
        for i in range(0, len(test), 5):  # padded batches
            sub = test.select(list(range(i, min(i + 5, len(test)))))
            width = max(len(r) for r in sub.input_ids)
            ids_ = torch.tensor([[0] * (width - len(r)) + list(r) for r in sub.input_ids])
            mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in sub.input_ids])
            tl(ids_, attention_mask=mask, stop_at_layer=3)
            got.append(rt.message_scores)
            opened.append(rt.gate_open.cpu())
    got, opened = torch.cat(got), torch.cat(opened)
    assert torch.allclose(got, want, atol=1e-4), (got, want)
    n = len(raw)
    assert (got[n:] >= got[:n] - 1e-4).all()  # the suffix never lowers the message reading
    message_open = got[:n] > op.message_threshold
    assert message_open.any() and opened[n:][message_open].all()  # opened on it: still open with the suffix
    _, dec = gate_decisions(tl, back, test, batch_size=4)
    assert (torch.from_numpy(dec) == opened).all()
    with back.attach(hf) as rt, torch.no_grad():
        sub = test.select(list(range(6)))
        width = max(len(r) for r in sub.input_ids)
        hf(input_ids=torch.tensor([[tok.pad_token_id or 0] * (width - len(r)) + list(r) for r in sub.input_ids]),
           attention_mask=torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in sub.input_ids]))
        assert torch.allclose(rt.message_scores, want[:6], atol=1e-3), (rt.message_scores, want[:6])


def test_user_turn_start_is_the_header_before_every_user_message(planted):
    """The opener is found from the chat template alone, and a two-turn conversation's last match is the second
    turn's header."""
    from trace_circuits.evaluate.attacks import attack_texts
    from trace_circuits.gate import anchor_positions, turn_start_positions, user_turn_end, user_turn_start

    tl, _, tok, _ = planted
    opener = user_turn_start(tl)
    assert tok.decode(opener).endswith("user\n") and opener
    texts = attack_texts(tok, ["How do I bake bread?"], "direct") + attack_texts(tok, ["How do I bake bread?"],
                                                                                   "multi_turn")
    enc = encode_prompts(tl, texts, chat=False)
    ends = anchor_positions(enc, user_turn_end(tl))
    starts = turn_start_positions(enc, opener, ends)
    for ids, s_, e in zip(enc.input_ids, starts, ends):
        assert tok.decode(list(ids[s_ + 1:e + 1])).startswith("How do I bake bread?")
    assert starts[1] - starts[0] > 10  # the second turn's header, after the first exchange


def test_calibration_sets_number_each_framing_by_the_request_it_asks(planted):
    """Every framing of a prompt carries that prompt's id: by default its index (harmful i and benign i, the built-in
    twins, share one); given ids, unpaired prompts keep ids of their own, so they never share a twin's fold."""
    from trace_circuits.gate import calibration_sets

    tl = planted[0]
    harmful, benign = builtin_prompts("harmful", "train")[:4], builtin_prompts("benign", "train")[:3]
    h, b, (hn, bn), (hr, br) = calibration_sets(tl, harmful, benign, "all", passes=2)
    assert len(h) == len(hn) == len(hr) == 12 and len(b) == len(br) == 9
    assert hr == [0, 1, 2, 3] * 3 and br == [0, 1, 2] * 3  # directly, then one pass after the other
    assert hn[:4] == ["direct"] * 4 and "direct" not in hn[4:]
    for j in range(4, 12):  # a framed copy still asks the request it is numbered with
        assert harmful[j % 4] in tl.tokenizer.decode(h.input_ids[j])
    _, _, _, (hr, br) = calibration_sets(tl, harmful, benign, "all", passes=1, request_ids=([0, 1, 2, 3], [0, 7, 8]))
    assert hr == [0, 1, 2, 3] * 2 and br == [0, 7, 8] * 2
    with pytest.raises(TraceCircuitsError, match="one id per prompt"):
        calibration_sets(tl, harmful, benign, "all", request_ids=([0, 1], [0, 1, 2]))


@pytest.mark.parametrize("pool", ["mean", "turn"])
def test_a_pooled_prompt_gate_scores_as_fitted_at_inference_on_both_models(planted, tmp_path, pool):
    """The mean- and turn-pooled probes: fitted with request-grouped folds, saved and reloaded, the runtime's score on
    padded batches (two-turn conversations among them) equals the score of the fitted reading, in TransformerLens
    and on the transformers model."""
    from trace_circuits.activations import residuals_at
    from trace_circuits.evaluate.attacks import attack_texts
    from trace_circuits.gate import anchor_positions, gate_decisions, turn_start_positions
    from trace_circuits.hookset import HookSet, hookset_for

    tl, hf, tok, _ = planted
    h = encode_prompts(tl, builtin_prompts("harmful", "train")[:60])
    b = encode_prompts(tl, builtin_prompts("benign", "train")[:60])
    ids = (list(range(30)) * 2, list(range(30)) * 2)  # two sequences per request, as the templates give
    op, calib = fit_prompt_gate(tl, h, b, layer=2, benign_gate_rate=0.05, pool=pool, massive_norm_threshold=50.0,
                                requests=ids)
    assert op.pool == pool and calib["pool"] == pool and "nor on any framing" in calib["rates_are"]
    assert bool(op.opener) == (pool == "turn")
    assert calib["gate_score_auroc"] > 0.9, calib
    with pytest.raises(TraceCircuitsError, match="one id per sequence"):
        fit_prompt_gate(tl, h, b, layer=2, requests=(ids[0][:5], ids[1]))
    with pytest.raises(TraceCircuitsError, match="pool"):
        fit_prompt_gate(tl, h, b, layer=2, pool="max")
    hs = hookset_for(tl, [op])
    hs.save(tmp_path / "hs")
    back = HookSet.load(tmp_path / "hs")
    assert back.gate_operation.pool == pool and back.gate_operation.massive_norm_threshold == 50.0
    assert back.gate_operation.opener == op.opener
    raw = list(builtin_prompts("harmful", "test"))[:9] + list(builtin_prompts("benign", "test"))[:9]
    test = encode_prompts(tl, attack_texts(tok, raw[:12], "direct") + attack_texts(tok, raw[12:] + raw[:3],
                                                                                    "multi_turn"), chat=False)
    ends = anchor_positions(test, op.anchor)
    starts = turn_start_positions(test, op.opener, ends) if op.opener else None
    x = residuals_at(tl, test, 2, ends, pool=pool, massive_norm_threshold=50.0, starts=starts)
    want = ((x - op.tensors["mu"]) @ op.tensors["r"]) / op.gap
    scores, opened = gate_decisions(tl, back, test, batch_size=5)  # padded batches of mixed lengths
    assert torch.allclose(torch.from_numpy(scores), want, atol=1e-4) and opened.any() and not opened.all()
    with back.attach(hf) as rt, torch.no_grad():
        for i in range(0, len(test), 6):
            rows = test.input_ids[i:i + 6]
            width = max(len(r) for r in rows)
            ids_ = torch.tensor([[tok.pad_token_id or 0] * (width - len(r)) + list(r) for r in rows])
            mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
            hf(input_ids=ids_, attention_mask=mask)
            assert torch.allclose(rt.prompt_scores, want[i:i + 6], atol=1e-3), (rt.prompt_scores, want[i:i + 6])


def test_run_every_stage_on_a_tiny_model(planted, tmp_path):
    tl, hf, tok, saes = planted
    run = Run(small_config(), model=tl, hf=(hf, tok), saes=saes, out=tmp_path / "run", progress=False)
    assert run.scan().n_harmful == 40
    feats = run.features()
    assert 0 in feats.harmful_features  # the planted feature is found
    circuit = run.trace()
    assert circuit.sources and circuit.severed_nodes and run.results["circuit_full"].meta["onset_layer"] == 1
    hs = run.export()
    assert hs.gate_operation.kind == "prompt_probe" and hs.action == "steer"  # the default
    assert hs.source_operation.layer == 1 and hs.source_operation.architecture == "topk"
    ev = run.evaluate()
    assert set(ev.defenses) == {"none", "tracerouter", "top_feature", "direction_ablation", "layer_ablation"}
    assert set(ev.defenses["tracerouter"]["dsr"]) == {"direct", "prefill", "multi_turn"}
    assert ev.defenses["layer_ablation"]["utility"]["kl_benign_prompts"] > 0
    assert ev.params["sources"] == {k: run.prompts(f"{k}_test").source for k in ("harmful", "benign", "hard_negative")}
    assert ev.params["sources"]["hard_negative"] == "builtin:hard_negative:test"
    run.save(run.out)
    for name in ("config.json", "run.json", "report.html", "divergence.json", "features.json", "circuit.json",
                 "circuit_full.json", "hookset/hookset.json", "evaluation.json", "responses.jsonl"):
        assert (run.out / name).exists(), name
    back = Run.load(run.out, model=tl, hf=(hf, tok), saes=saes, progress=False)
    assert back.config == run.config
    assert back.results["features"].harmful_features == feats.harmful_features
    assert back.results["hookset"].to_json() == hs.to_json()
    assert back.results["evaluation"].table.equals(ev.table)
    assert back.evaluate() is back.results["evaluation"]  # loaded results are not recomputed
    assert set(run.plot()) == {"scan", "features", "circuit", "hookset", "evaluation"}
    report = (run.out / "report.html").read_text()
    assert "tracerouter" in report and "direction_ablation" in report
    assert "hard negatives (builtin:hard_negative:test)" in (run.out / "evaluation.html").read_text()


def test_an_interrupted_run_resumes_and_other_settings_start_over(planted, tmp_path):
    """A rerun with the same config reuses every stage already written; a run with other settings in the same folder
    keeps the stages before the first whose settings changed and removes the rest, so nothing computed under other
    settings is mixed into it."""
    tl, hf, tok, saes = planted
    out = tmp_path / "run"
    first = Run(small_config(), model=tl, hf=(hf, tok), saes=saes, out=out, progress=False)
    assert first.resume() == [] and (out / "config.json").exists()
    first.scan(), first.features(), first.trace()  # "interrupted" before the hook set
    again = Run(small_config(), model=tl, hf=(hf, tok), saes=saes, out=out, progress=False)
    assert again.resume() == ["scan", "features", "circuit"]
    assert again.results["circuit_full"].to_json() == first.results["circuit_full"].to_json()
    assert again.trace() is again.results["circuit"] and "stage 3: FIS and circuit" in again.timings
    assert again.export().source_operation.layer == 1 and (out / "hookset" / "hookset.json").exists()
    gate = dataclasses.replace(small_config(), gate=dataclasses.replace(small_config().gate, l2=0.5))
    regated = Run(gate, model=tl, hf=(hf, tok), saes=saes, out=out, progress=False)
    assert regated.resume() == ["scan", "features", "circuit"]  # only the hook set's settings changed
    assert not (out / "hookset").exists() and "hook set and gate" not in regated.timings
    assert regated.results["circuit"].to_json() == first.results["circuit"].to_json()
    other = dataclasses.replace(gate, trace=dataclasses.replace(small_config().trace, n_candidates=6))
    retraced = Run(other, model=tl, hf=(hf, tok), saes=saes, out=out, progress=False)
    assert retraced.resume() == ["scan", "features"]
    assert not any((out / n).exists() for n in ("circuit.json", "circuit_full.json", "hookset"))
    assert json.loads((out / "config.json").read_text())["trace"]["n_candidates"] == 6
    fresh = Run(dataclasses.replace(other, column="text"), model=tl, hf=(hf, tok), saes=saes, out=out,
                progress=False)
    assert fresh.resume() == []  # the run's own settings changed: every stage again
    assert not any((out / n).exists() for n in ("divergence.json", "features.json", "run.json"))


def test_reroute_adds_gated_steering(planted):
    tl, hf, tok, saes = planted
    cfg = dataclasses.replace(small_config(), hookset=dataclasses.replace(small_config().hookset, action="reroute"))
    run = Run(cfg, model=tl, hf=(hf, tok), saes=saes, progress=False)
    hs = run.export()
    steer = [op for op in hs.operations if op.kind == "direction" and op.mode == "add"]
    assert hs.action == "reroute" and steer and all(op.gated and op.alpha > 0 for op in steer)


def test_steer_keeps_the_gate_and_the_steering_and_cuts_nothing(planted):
    """``action="steer"``: the same gate and steering as ``reroute``, the sources' operation kept with scale 1 (it
    names the features, changes nothing), no downstream cut; where the gate is shut the model is the plain model, where
    it opens the output differs from the plain model's only through the steering."""
    tl, hf, tok, saes = planted
    runs = {a: Run(dataclasses.replace(small_config(), hookset=dataclasses.replace(small_config().hookset, action=a)),
                   model=tl, hf=(hf, tok), saes=saes, progress=False) for a in ("reroute", "steer")}
    reroute, steer = (runs[a].export() for a in ("reroute", "steer"))
    assert steer.action == "steer" and "left alone" in steer.description
    n_src, n_dir = len(steer.source_operation.features), len(steer.operations) - 2
    assert f"cuts nothing; {n_src} SAE features named, left in place; steers along {n_dir} directions" in \
        steer.summary()
    assert f"action reroute): prompt gate at layer {reroute.gate_operation.layer}" in reroute.summary()
    assert f"cuts {sum(len(op.features) for op in reroute.operations if op.kind == 'sae_features')} SAE features" \
        in reroute.summary() and "named" not in reroute.summary()
    assert [op.kind for op in steer.operations] == ["prompt_probe", "sae_features"] + ["direction"] * (
        len(steer.operations) - 2)
    assert steer.source_operation.scale == 1.0 and steer.source_operation.features == reroute.source_operation.features
    assert steer.gate_operation.to_json(0) == reroute.gate_operation.to_json(0)
    pairs = list(zip(steer.operations[2:], [op for op in reroute.operations if op.kind == "direction"]))
    assert len(pairs) == len(steer.operations) - 2 >= 1
    for a, b in pairs:
        assert a.to_json(0) == b.to_json(0) and torch.equal(a.tensors["r"], b.tensors["r"])
    no_steer = dataclasses.replace(steer, operations=steer.operations[:2], action="none")
    enc = encode_prompts(tl, list(builtin_prompts("harmful", "test"))[:8] + list(builtin_prompts("benign", "test"))[:8])
    opened = []
    for row in enc.input_ids:
        x = torch.tensor([row])
        plain = tl(x)
        with steer.attach(tl) as rt:
            got = tl(x)
        opened.append(bool(rt.gate_open[0]))
        with no_steer.attach(tl):
            assert torch.allclose(tl(x), plain, atol=1e-5)  # the kept source operation changes nothing
        assert torch.allclose(got, plain, atol=1e-5) != opened[-1]
    assert any(opened) and not all(opened), opened


def test_config_round_trips_through_json_and_refuses_unknown_fields():
    cfg = small_config()
    data = json.loads(json.dumps(cfg.to_json()))
    assert RunConfig.from_json(data) == cfg
    data["trace"]["n_promts"] = 3
    with pytest.raises(TraceCircuitsError, match=r"unknown field\(s\) \['n_promts'\] in TraceConfig"):
        RunConfig.from_json(data)
    with pytest.raises(TraceCircuitsError, match="must be int"):
        RunConfig.from_json({**cfg.to_json(), "limit": "ten"})
    with pytest.raises(TraceCircuitsError, match="newer than this trace-circuits"):
        RunConfig.from_json({**cfg.to_json(), "format_version": 99})


def test_stage_without_sae_at_the_onset_is_one_line(planted):
    tl, hf, tok, saes = planted
    run = Run(dataclasses.replace(small_config(), features=FeaturesConfig(layer=3)), model=tl, saes={1: saes[1]},
              progress=False)
    with pytest.raises(TraceCircuitsError, match="no SAE at or after layer 3"):
        run.features()


_ = torch


def test_the_prompt_gate_reads_the_candidate_layer_with_the_best_out_of_fold_coverage(planted):
    """Several candidate layers are read in one pass; each one's coverage is the one a single-layer fit reports, the
    gate reads the best (ties: the deeper), and its probe is the single-layer fit's."""
    tl = planted[0]
    h = encode_prompts(tl, builtin_prompts("harmful", "train")[:60])
    b = encode_prompts(tl, builtin_prompts("benign", "train")[:60])
    op, calib = fit_prompt_gate(tl, h, b, layer=[0, 1, 2, 3], benign_gate_rate=0.05, massive_norm_threshold={3: 1e-6},
                                message_rate=0.0)  # the search compares the end-of-turn reading alone
    cov = {int(k): v for k, v in calib["layer_search"].items()}
    assert sorted(cov) == [0, 1, 2, 3] and len(set(cov.values())) > 1, cov
    assert op.layer == calib["layer"] == max(cov, key=lambda l: (cov[l], l))
    for layer in cov:
        alone, c1 = fit_prompt_gate(tl, h, b, layer=layer, benign_gate_rate=0.05,
                                    massive_norm_threshold=1e-6 if layer == 3 else None, message_rate=0.0)
        assert c1["gate_rate_harmful"] == cov[layer] and "layer_search" not in c1
        if layer == op.layer:
            assert torch.equal(alone.tensors["r"], op.tensors["r"]) and alone.gate_threshold == op.gate_threshold
    with pytest.raises(TraceCircuitsError, match="outside the model"):
        fit_prompt_gate(tl, h, b, layer=[2, 9])


def test_the_prompt_gate_keeps_the_l2_strength_with_the_best_out_of_fold_coverage(planted):
    """Several L2 strengths: each one's coverage at the kept layer is what a fit at that strength alone reports, the
    gate keeps the best (ties: the one listed first) and is that fit; the config lists --gate-l2 first, then the
    search's; a config from before the search holds one strength; a bad strength is one line."""
    tl = planted[0]
    h = encode_prompts(tl, builtin_prompts("harmful", "train")[:60])
    b = encode_prompts(tl, builtin_prompts("benign", "train")[:60])
    strengths = [0.002, 1.0, 30.0]
    op, calib = fit_prompt_gate(tl, h, b, layer=2, benign_gate_rate=0.05, l2=strengths, message_rate=0.0)
    cov = {float(a): c for a, c in calib["l2_search"].items()}
    assert sorted(cov) == strengths and len(set(cov.values())) > 1, cov
    assert calib["l2"] == max(strengths, key=lambda a: (cov[a], -strengths.index(a)))
    for a in strengths:
        alone, c1 = fit_prompt_gate(tl, h, b, layer=2, benign_gate_rate=0.05, l2=a, message_rate=0.0)
        assert c1["gate_rate_harmful"] == cov[a] and "l2_search" not in c1 and c1["l2"] == a
        if a == calib["l2"]:
            assert torch.equal(alone.tensors["r"], op.tensors["r"]) and alone.gate_threshold == op.gate_threshold
    assert RunConfig().gate.l2_values() == [0.02, 0.1]
    assert dataclasses.replace(RunConfig().gate, l2=0.1, l2_search="0.1,0.5,0.5").l2_values() == [0.1, 0.5]
    old = RunConfig().to_json()
    del old["gate"]["l2_search"]
    assert RunConfig.from_json(old).gate.l2_values() == [0.02]
    with pytest.raises(TraceCircuitsError, match="--gate-l2-search takes strengths separated by commas"):
        dataclasses.replace(RunConfig().gate, l2_search="0.1,strong").check()
    with pytest.raises(TraceCircuitsError, match="--gate-l2-search strengths must be > 0"):
        dataclasses.replace(RunConfig().gate, l2_search="0.1,-1").check()
    with pytest.raises(TraceCircuitsError, match="L2 strength"):
        fit_prompt_gate(tl, h, b, layer=2, l2=[0.1, 0.0])


def test_evaluation_generates_in_the_dtype_it_records_and_leaves_the_runs_model_alone(planted):
    """``evaluation.generation_dtype``: the answers come from a copy of the transformers model in that dtype (the run's
    own model stays float32 for the other stages), the result records it; a config written before the field existed
    reads as float32, what those runs generated in; ``auto`` resolves by the hardware."""
    from trace_circuits.models import hf_in_dtype, native_bf16, resolve_eval_dtype

    tl, hf, tok, saes = planted
    one = dataclasses.replace(small_config().evaluation, baselines="none", templates="direct", limit=4)
    got = {}
    for dt in ("bfloat16", "float32"):
        cfg = dataclasses.replace(small_config(), evaluation=dataclasses.replace(one, generation_dtype=dt))
        run = Run(cfg, model=tl, hf=(hf, tok), saes=saes, progress=False)
        got[dt] = run.evaluate()
        assert got[dt].params["dtype"] == dt and next(run.hf[0].parameters()).dtype == torch.float32
    assert len(got["bfloat16"].responses) == len(got["float32"].responses)
    assert hf_in_dtype(hf, torch.float32) is hf and next(hf_in_dtype(hf, torch.bfloat16).parameters()).dtype == \
        torch.bfloat16
    assert resolve_eval_dtype("auto") == (torch.bfloat16 if native_bf16("cpu") else torch.float32)
    old = small_config().to_json()
    del old["evaluation"]["generation_dtype"]
    assert RunConfig.from_json(old).evaluation.generation_dtype == "float32"
    assert RunConfig().evaluation.generation_dtype == "auto"



def test_the_message_reading_keeps_the_rate_whose_worst_template_is_caught_most(planted):
    """Several message rates: each is calibrated (within the benign rate, both readings together) and the gate keeps
    the one whose worst group has the highest out-of-fold harmful coverage; the record lists every candidate."""
    tl = planted[0]
    h = encode_prompts(tl, builtin_prompts("harmful", "train")[:60])
    b = encode_prompts(tl, builtin_prompts("benign", "train")[:60])
    groups = (["odd", "even"] * 30, ["odd", "even"] * 30)
    op, calib = fit_prompt_gate(tl, h, b, layer=2, benign_gate_rate=0.1, pool="turn", message_rate=[0.02, 0.05, 0.1],
                                message_min_tokens=2, message_reading="sentence", groups=groups)
    search = {float(r): v for r, v in calib["message_rate_search"].items()}
    assert sorted(search) == [0.02, 0.05, 0.1]
    best = max(search, key=lambda r: (search[r]["worst_template"], search[r]["harmful"], -r))
    assert calib["message_rate_target"] == best and calib["message_rate_benign"] <= best + 1e-9
    assert calib["gate_rate_benign"] <= 0.1
    assert search[best]["worst_template"] == pytest.approx(min(calib["gate_rate_harmful_by_group"].values()))
    assert search[best]["harmful"] == pytest.approx(calib["gate_rate_harmful"])
    assert op.message_threshold == calib["message_threshold"]


def test_a_run_config_from_before_the_span_reading_reads_as_the_gate_it_calibrated():
    """config.json of a run written with ``gate.prefix_rate`` (the running-mean reading) or without any message
    reading reads back as what that run did, so resuming it does not reuse a hook set of another reading."""
    old = RunConfig().to_json()
    for k in ("message_rate", "message_min_tokens", "message_reading", "message_search"):
        del old["gate"][k]
    assert (RunConfig.from_json(old).gate.message_rate, RunConfig.from_json(old).gate.message_reading) == (0.0, "prefix")
    old["gate"].update(prefix_rate=0.005, prefix_min_tokens=6)
    gate = RunConfig.from_json(old).gate
    assert (gate.message_rate, gate.message_min_tokens, gate.message_reading) == (0.005, 6, "prefix")
    assert RunConfig().gate.message_reading == "sentence" and RunConfig().gate.message_rate == 0.005
    assert RunConfig().gate.message_rates() == [0.005, 0.01, 0.02] and gate.message_rates() == [0.005]
    ten = RunConfig().to_json()  # format 10 (one span-reading rate, no search): still one rate
    ten["gate"].update(message_reading="span")
    del ten["gate"]["message_search"]
    assert RunConfig.from_json(ten).gate.message_rates() == [0.005]
    with pytest.raises(TraceCircuitsError, match="--gate-message-search"):
        dataclasses.replace(RunConfig().gate, message_search="0.01,lots").check()
    with pytest.raises(TraceCircuitsError, match=r"--gate-message-search rates must lie in \(0, --gate-benign-rate"):
        dataclasses.replace(RunConfig().gate, message_search="0.05").check()


def test_a_hook_set_recognises_its_model_loaded_in_bfloat16(planted):
    """The weights signature rounds to bfloat16, so a deployer's bfloat16 copy of the model is accepted (and attaches
    with the same gate decisions); a hook set of format 7 or older (float32 signature) still matches the float32 model;
    another model is refused."""
    import copy

    from trace_circuits.models import weights_signature

    tl, hf, tok, saes = planted
    hs = Run(small_config(), model=tl, hf=(hf, tok), saes=saes, progress=False).export()
    half = copy.deepcopy(hf).to(torch.bfloat16)
    hs.check_model(half)
    texts = list(builtin_prompts("harmful", "test")[:3]) + list(builtin_prompts("benign", "test")[:3])
    from trace_circuits.generation import generate_responses

    full = generate_responses(hf, tok, texts, hookset=hs, max_new_tokens=2, progress=False)
    low = generate_responses(half, tok, texts, hookset=hs, max_new_tokens=2, progress=False)
    assert [r["gate_opened"] for r in low] == [r["gate_opened"] for r in full]
    old = dataclasses.replace(hs, model_fingerprint="elsewhere@0", weights_signature=weights_signature(hf, legacy=True))
    old.check_model(hf)
    with pytest.raises(TraceCircuitsError, match="trace the circuit on this model"):
        old.check_model(half)
    other = copy.deepcopy(hf)
    with torch.no_grad():
        other.get_input_embeddings().weight.mul_(1.5)
    with pytest.raises(TraceCircuitsError, match="trace the circuit on this model"):
        dataclasses.replace(hs, model_fingerprint="elsewhere@0").check_model(other)
