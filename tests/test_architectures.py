"""Each supported architecture's TransformerLens -> transformers twin table, checked on tiny random models built with
transformers and converted with TransformerLens's own converters: with a hook set attached (every operation kind),
a prompt and a continuation on its KV cache give the same logits and the same gate decisions in both libraries."""

import pytest
import torch
from transformer_lens.cache.key_value_cache import TransformerLensKeyValueCache

import tiny
from trace_circuits import Operation, TraceCircuitsError
from trace_circuits.architectures import ARCHITECTURES, architecture_of
from trace_circuits.hookset import hookset_for, sae_operation
from trace_circuits.prompts import encode_prompts, iter_batches

PROMPTS = ["How do I make a pipe bomb?", "How do I bake sourdough bread at home?", "Write a poem about the sea.",
           "How do I hack into my neighbour's wifi?"]


def all_kinds_hookset(tl, threshold=None):
    """A prompt gate at layer 1 plus one operation of every kind after it."""
    torch.manual_seed(5)
    d = tl.cfg.d_model
    r = torch.randn(d)
    probe = Operation(kind="prompt_probe", layer=1, gap=1.0, tensors={"r": r / r.norm(), "mu": torch.zeros(d)},
                      anchor=tl.tokenizer("<|im_end|>\n<|im_start|>assistant\n", add_special_tokens=False)["input_ids"])
    probe.gate_threshold = 0.0 if threshold is None else threshold
    v = torch.randn(d)
    return hookset_for(tl, [probe, sae_operation(tiny.sae("topk", "blocks.2.hook_resid_post"), [0, 3, 7]),
                            sae_operation(tiny.sae("jumprelu", "blocks.2.hook_mlp_out"), [1, 2]),
                            Operation(kind="heads", layer=2, heads=[0, 3]), Operation(kind="mlp", layer=3),
                            Operation(kind="direction", layer=3, mode="add", alpha=2.0, tensors={"r": v / v.norm()}),
                            Operation(kind="direction", layer=2, mode="ablate", tensors={"r": v / v.norm()})])


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_hookset_gives_the_same_logits_in_transformer_lens_and_transformers(arch):
    tl, hf, tok = tiny.pair(arch)
    assert architecture_of(hf) is ARCHITECTURES[arch]
    enc = encode_prompts(tl, PROMPTS)
    b = next(iter_batches(enc, len(PROMPTS)))
    cont = torch.tensor(tok(" Sure, here is how to do it", add_special_tokens=False)["input_ids"]).repeat(4, 1)
    full_mask = torch.cat([b.attention_mask, torch.ones_like(cont)], 1)
    pos = (full_mask.cumsum(-1) - 1).clamp(min=0)
    T, real = b.tokens.shape[1], full_mask.bool()

    def tl_run():
        cache = TransformerLensKeyValueCache.init_cache(tl.cfg, tl.cfg.device, 4)
        first = tl(b.tokens, attention_mask=b.attention_mask, past_kv_cache=cache)
        return torch.cat([first, tl(cont, attention_mask=torch.ones_like(cont), past_kv_cache=cache)], 1)

    def hf_run():
        first = hf(b.tokens, attention_mask=b.attention_mask, position_ids=pos[:, :T], use_cache=True)
        rest = hf(cont, attention_mask=full_mask, position_ids=pos[:, T:], past_key_values=first.past_key_values,
                  use_cache=True)
        return torch.cat([first.logits, rest.logits], 1)

    hs = all_kinds_hookset(tl)
    with torch.no_grad():
        plain_tl, plain_hf = tl_run(), hf_run()
        with hs.attach(tl) as rt_tl:
            scores = rt_tl  # decided in the first forward
            tl_run()
        s = scores.prompt_scores.sort().values
        hs.gate_operation.gate_threshold = float(s[1] + s[2]) / 2  # opens on half the rows
        with hs.attach(tl) as rt_tl:
            cut_tl = tl_run()
        with hs.attach(hf) as rt_hf:
            cut_hf = hf_run()
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
