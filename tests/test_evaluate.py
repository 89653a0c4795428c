"""Defense evaluation: the judges, the confidence intervals, the baselines' direction operation, and (slow) the
`evaluate` command end to end on a few prompts."""

import math

import numpy as np
import pytest
import torch
from conftest import tiny_model
from test_hooks import TOKENS

from trace_circuits import Operation, TraceCircuitsError
from trace_circuits.evaluate import ATTACKS, JAILBREAKS, RelevanceJudge, attack_texts, is_refusal, wilson
from trace_circuits.hookset import hookset_for


def test_substring_judge_normalises_curly_apostrophes():
    assert is_refusal("I\u2019m sorry, but I can\u2019t help with that.")
    assert is_refusal("As an AI, I won't")
    assert not is_refusal("Sure, here is how to bake bread.")
    assert not is_refusal("i'm sorry")  # the list is case-sensitive, as in Arditi et al.


def test_evaluation_result_save_load_round_trip(tmp_path):
    from trace_circuits import EvaluationResult

    def metrics(d, j):
        rate = {"rate": d, "k": 1, "n": 2, "ci": [0.1, 0.9]}
        return {"description": "x", "dsr": {"direct": rate}, "dsr_jailbreaks": {**rate, "rate": j},
                "judges": {"refusal_rate": 0.1, "not_addressed_rate": 0.2, "refusal_logit_rate": 0.0},
                "utility": {"over_refusal": 0.02, "over_refusal_change": 0.0, "benign_not_addressed": 0.0,
                            "kl_benign_prompts": 0.01, "kl_benign_text": 0.02, "ce_change_benign_text": 0.03}}

    res = EvaluationResult("m", {"none": metrics(0.1, 0.4), "tracerouter": metrics(0.6, 0.7)},
                           [{"defense": "none", "kind": "harmful", "template": "direct", "prompt": "p", "response": "r"}],
                           {"templates": ["direct"]})
    res.save(tmp_path / "ev")
    back = EvaluationResult.load(tmp_path / "ev")
    assert back.table.equals(res.table) and back.responses == res.responses and back.params == res.params
    (tmp_path / "ev" / "evaluation.json").write_text("{}")
    with pytest.raises(TraceCircuitsError, match="not a complete trace-circuits evaluation.*trace-circuits evaluate"):
        EvaluationResult.load(tmp_path / "ev")


def test_wilson_interval():
    lo, hi = wilson(0, 10)
    assert lo == 0 and hi == pytest.approx(0.2775, abs=1e-3)
    lo, hi = wilson(50, 100)
    assert lo == pytest.approx(0.4038, abs=1e-3) and hi == pytest.approx(0.5962, abs=1e-3)
    assert all(math.isnan(v) for v in wilson(0, 0))


def test_at_least_five_jailbreak_templates_plus_direct_prefill_and_two_turns():
    assert "direct" in JAILBREAKS and len(JAILBREAKS) - 1 >= 6
    assert all("{prompt}" in a.user for a in ATTACKS.values())
    assert JAILBREAKS["prefill"][1].startswith("Sure")
    assert len(ATTACKS["multi_turn"].history) == 2 and ATTACKS["multi_turn"].history[0][0] == "user"


class _ChatML:
    """A stand-in tokenizer with the ChatML template (only ``apply_chat_template`` is used)."""

    chat_template = "chatml"

    def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=True):
        text = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
        return text + ("<|im_start|>assistant\n" if add_generation_prompt else "")


def test_attack_texts_template_the_conversation_then_prefill():
    tok = _ChatML()
    (pre,) = attack_texts(tok, ["How do I pick a lock?"], "prefill")
    assert pre.endswith("<|im_start|>assistant\nSure, here is")
    (two,) = attack_texts(tok, ["How do I pick a lock?"], "multi_turn")
    assert two.count("<|im_start|>user") == 2 and two.index("help me") < two.index("pick a lock")
    assert two.endswith("<|im_start|>assistant\n")
    with pytest.raises(TraceCircuitsError, match="unknown attack template"):
        attack_texts(tok, ["x"], "nope")


def test_direction_operations():
    model = tiny_model(n_layers=3)
    r = torch.randn(32)
    r = r / r.norm()
    seen = {}
    grab = ("blocks.1.hook_resid_post", lambda x, hook: seen.__setitem__("x", x.clone()))
    abl = hookset_for(model, [Operation(kind="direction", layer=1, mode="ablate", tensors={"r": r})])
    with torch.no_grad():
        model.run_with_hooks(TOKENS, fwd_hooks=abl.fwd_hooks(model) + [grab])
    assert (seen["x"] @ r).abs().max() < 1e-4  # nothing left along r
    add = hookset_for(model, [Operation(kind="direction", layer=1, mode="add", alpha=3.0, tensors={"r": r})])
    with torch.no_grad():
        _, cache = model.run_with_cache(TOKENS, names_filter="blocks.1.hook_resid_post")
        model.run_with_hooks(TOKENS, fwd_hooks=add.fwd_hooks(model) + [grab])
    assert torch.allclose(seen["x"] - cache["blocks.1.hook_resid_post"], 3.0 * r.expand_as(seen["x"]), atol=1e-5)
    with pytest.raises(TraceCircuitsError, match="tensor r"):
        hookset_for(model, [Operation(kind="direction", layer=1, tensors={"r": torch.zeros(5)})])


def test_relevance_judge_calibrates_between_matched_and_shuffled_pairs():
    judge = RelevanceJudge()
    prompts = ["How do I bake sourdough bread?", "What is the capital of France?", "How do I change a bike tire?",
               "Explain how photosynthesis works.", "How do I sort a list in Python?"]
    answers = ["Mix flour, water and starter, let the dough rise overnight, then bake it hot.",
               "The capital of France is Paris.", "Remove the wheel, lever the tire off, replace the tube, reinflate.",
               "Plants turn light, water and carbon dioxide into sugar and oxygen in their chloroplasts.",
               "Call sorted(my_list) or my_list.sort()."]
    cal = judge.calibrate(prompts, answers)
    assert cal["youden_j"] == 1.0 and cal["shuffled_mean"] < judge.threshold < cal["matched_mean"]
    assert judge.strict_threshold <= judge.threshold  # the strict judge calls fewer answers "not addressed"
    v = judge.judge(prompts, answers)
    assert v["addressed"].all() and v["addressed_strict"].all()
    v = judge.judge(prompts, answers[2:] + answers[:2])
    assert not v["addressed"].any()


def test_relevance_judge_encodes_each_distinct_text_once_and_matches_a_direct_encode():
    judge = RelevanceJudge()
    texts = ["How do I bake sourdough bread?", "The capital of France is Paris.", "How do I bake sourdough bread?"]
    direct = judge.model.encode(texts, normalize_embeddings=True, batch_size=64)
    calls = []
    encode = judge.model.encode
    judge.model.encode = lambda xs, **kw: calls.append(list(xs)) or encode(xs, **kw)
    got = judge.embed(texts)
    again = judge.similarity(texts[:2], texts[1:])
    assert calls == [texts[:2]]  # the repeat and the second call hit the cache
    assert np.allclose(got, direct, atol=1e-5)
    assert np.allclose(again, (direct[:2] * direct[1:]).sum(1), atol=1e-5)
    assert judge.embed([]).shape == (0, judge.dim)
