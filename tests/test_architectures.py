"""Each supported architecture's TransformerLens -> transformers twin table, checked on tiny random models built with
transformers and converted with TransformerLens's own converters: with a hook set attached (every operation kind),
a prompt and a continuation on its KV cache give the same logits and the same gate decisions in both libraries."""

import pytest
import tiny
import torch

from trace_circuits import TraceCircuitsError
from trace_circuits.architectures import ARCHITECTURES, architecture_of

PROMPTS = ["How do I make a pipe bomb?", "How do I bake sourdough bread at home?", "Write a poem about the sea.",
           "How do I hack into my neighbour's wifi?"]


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_hookset_gives_the_same_logits_in_transformer_lens_and_transformers(arch):
    tl, hf, tok = tiny.pair(arch)
    assert architecture_of(hf) is ARCHITECTURES[arch]
    plain_tl, plain_hf, cut_tl, cut_hf, rt_tl, rt_hf, real = tiny.kv_parity(tl, hf, tok, tiny.all_kinds_hookset(tl),
                                                                            PROMPTS)
    assert (plain_tl - plain_hf)[real].abs().max() < 1e-3
    assert rt_tl.gate_open.sum() == 2 and torch.equal(rt_tl.gate_open, rt_hf.gate_open)
    assert torch.allclose(rt_tl.prompt_scores, rt_hf.prompt_scores, atol=1e-4)
    assert (cut_tl - cut_hf)[real].abs().max() < 1e-3
    for r in range(4):
        diff = (cut_tl[r] - plain_tl[r])[real[r]].abs().max()
        assert (diff > 1e-3) if rt_tl.gate_open[r] else (diff == 0)


def test_an_architecture_without_a_twin_table_is_refused_with_one_line():
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=50))
    with pytest.raises(TraceCircuitsError, match="'gpt2' models are not supported .*supported: gemma3_text, llama, "
                                                 "qwen2"):
        architecture_of(gpt2)


def test_twin_table_names_every_hook_kind_per_architecture():
    assert ARCHITECTURES["llama"].twin("blocks.3.hook_mlp_out") == ("model.layers.3.mlp", "forward")
    assert ARCHITECTURES["gemma3_text"].twin("blocks.3.hook_mlp_out") == (
        "model.layers.3.post_feedforward_layernorm", "forward")
    assert ARCHITECTURES["qwen2"].twin("blocks.0.attn.hook_z") == ("model.layers.0.self_attn.o_proj", "forward_pre")
    with pytest.raises(TraceCircuitsError, match="no transformers twin"):
        ARCHITECTURES["llama"].twin("blocks.0.attn.hook_pattern")


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_generate_keeps_the_prompt_gates_decision_across_decoding_steps(arch):
    """transformers' generate passes the KV cache as ``cache``: each decoding step continues the sequence, so the gate
    decides once (at the prompt) and the decision holds for every generated token."""
    tl, hf, tok = tiny.pair(arch)
    hs = tiny.all_kinds_hookset(tl, threshold=-1e9)  # opens on every prompt
    enc = tok(tiny_texts(tok), return_tensors="pt", padding=True, add_special_tokens=False)
    with torch.no_grad(), hs.attach(hf) as rt:
        hf.generate(**enc, max_new_tokens=5, min_new_tokens=5, do_sample=False, pad_token_id=tok.pad_token_id)
    assert rt.stats["forwards"] == 5 and rt.stats["gate_decisions"] == 1
    assert rt.gate_open.all()


def tiny_texts(tok):
    return [tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
            for p in PROMPTS]
