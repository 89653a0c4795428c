"""Tiny real models for the fast tests: a byte-level BPE tokenizer with a ChatML template trained on the built-in
prompts, random transformers models of each supported architecture, their TransformerLens twins (converted with
TransformerLens's own converters, as for the real models), and SAE-Lens SAEs of every architecture.

``pair(..., plant=True)`` makes a model where harmful prompts really differ: the embeddings of the tokens that occur in
built-in harmful prompts and never in benign ones carry a component along a direction ``v``, and ``sae(...,
plant=True)`` has a feature (0) reading ``v``."""

from __future__ import annotations

import functools

import torch

CHATML = ("{% for m in messages %}{{'<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n'}}{% endfor %}"
          "{% if add_generation_prompt %}{{'<|im_start|>assistant\\n'}}{% endif %}")


def tokenizer():
    """A fresh tokenizer object (TransformerLens's ``set_tokenizer`` changes the one it is given)."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    fast = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(_trained()), eos_token="<|im_end|>",
                                   pad_token="<|endoftext|>")
    fast.chat_template = CHATML
    fast.padding_side = "left"
    return fast


@functools.lru_cache(maxsize=1)
def _trained() -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from trace_circuits.corpus import generated_prompts
    from trace_circuits.datasets import builtin_prompts

    texts = [p for k in ("harmful", "benign", "hard_negative") for p in builtin_prompts(k, "all")]
    texts += generated_prompts(300) + ["Sure, here is how to do it. I'm sorry, but I can't help with that."]
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=3000, special_tokens=[
        "<|endoftext|>", "<|im_start|>", "<|im_end|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return tok.to_str()


def hf_model(arch: str = "llama", n_layers: int = 4, seed: int = 0):
    """A random transformers causal LM of ``arch`` (llama or qwen2): d_model 64, 4 heads (2 KV heads), vocab of the
    tiny tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    kw = dict(vocab_size=len(tokenizer()), hidden_size=64, intermediate_size=128, num_hidden_layers=n_layers,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-6,
              pad_token_id=tokenizer().pad_token_id, eos_token_id=tokenizer().eos_token_id, bos_token_id=None,
              tie_word_embeddings=False)
    model = (LlamaForCausalLM(LlamaConfig(**kw)) if arch == "llama" else
             Qwen2ForCausalLM(Qwen2Config(**kw, use_sliding_window=False)))
    with torch.no_grad():  # larger random weights than the default init, so that layers matter
        for name, p in model.named_parameters():
            if p.dim() == 2 and "embed" not in name:
                p.normal_(0, 0.08)
            elif "bias" in name:
                p.normal_(0, 0.02)
    return model.eval()


def tl_twin(hf):
    """The HookedTransformer of a transformers model, unprocessed weights (hooks equal the twin modules)."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    from trace_circuits.architectures import convert_weights

    kwargs, state = convert_weights(hf, f"tiny-{hf.config.model_type}", 256)
    model = HookedTransformer(HookedTransformerConfig(**{**kwargs, "init_weights": False, "device": "cpu"}),
                              move_to_device=False)
    model.load_state_dict(state, strict=False, assign=True)
    model.set_tokenizer(tokenizer(), default_padding_side="left")
    return model.eval()


def pair(arch: str = "llama", n_layers: int = 4, seed: int = 0, plant: bool = False):
    """``(HookedTransformer, transformers model, tokenizer)`` twins; ``plant`` writes the harm direction into the
    embeddings of :data:`HARM_WORDS` (see :func:`harm_direction`)."""
    hf = hf_model(arch, n_layers, seed)
    tok = tokenizer()
    if plant:
        v = harm_direction(hf.config.hidden_size)
        with torch.no_grad():
            emb = hf.get_input_embeddings().weight
            for t in harm_tokens(tok):
                emb[t] += 3.0 * v
    return tl_twin(hf), hf, tok


def harm_tokens(tok) -> set[int]:
    """Tokens of the built-in harmful prompts that no built-in benign prompt (nor the chat template) has."""
    from trace_circuits.datasets import builtin_prompts

    ids = lambda kind: {t for p in builtin_prompts(kind, "all") for t in tok(p, add_special_tokens=False)["input_ids"]}  # noqa
    template = tok.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False, add_generation_prompt=True)
    return ids("harmful") - ids("benign") - set(tok(template, add_special_tokens=False)["input_ids"])


def harm_direction(d: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(123)
    v = torch.randn(d, generator=g)
    return v / v.norm()


def sae(arch: str, hook: str, d_in: int = 64, d_sae: int = 96, k: int = 6, seed: int = 1, normalize: str = "none",
        rescale: bool = True, plant: bool = False):
    """An SAE-Lens inference SAE of ``arch`` (standard, jumprelu, topk, batchtopk: trained for a few steps and saved
    for inference, which SAE-Lens does as JumpReLU), random but non-trivial weights, ``hook_name`` set."""
    import tempfile

    from sae_lens import SAE, JumpReLUSAE, JumpReLUSAEConfig, StandardSAE, StandardSAEConfig, TopKSAE, TopKSAEConfig

    torch.manual_seed(seed)
    common = dict(d_in=d_in, d_sae=d_sae, normalize_activations=normalize)
    if arch == "batchtopk":
        from sae_lens import BatchTopKTrainingSAE, BatchTopKTrainingSAEConfig

        train = BatchTopKTrainingSAE(BatchTopKTrainingSAEConfig(d_in=d_in, d_sae=d_sae, k=k))
        with torch.no_grad():
            _randomise(train, d_in)
            train.topk_threshold.fill_(0.05)
        train.cfg.metadata.hook_name = hook
        with tempfile.TemporaryDirectory() as tmp:
            train.save_inference_model(tmp)
            out = SAE.load_from_disk(tmp)
        out.cfg.metadata.hook_name = hook
        return out
    cls = {"standard": (StandardSAE, StandardSAEConfig, {}), "jumprelu": (JumpReLUSAE, JumpReLUSAEConfig, {}),
           "topk": (TopKSAE, TopKSAEConfig, {"k": k, "rescale_acts_by_decoder_norm": rescale})}[arch]
    out = cls[0](cls[1](**common, **cls[2]))
    with torch.no_grad():
        _randomise(out, d_in)
        if arch == "jumprelu":
            out.threshold.uniform_(0.0, 0.1)
        if plant:
            v = harm_direction(d_in)
            out.W_enc[:, 0] = 3.0 * v
            out.b_enc[0] = -3.0
            out.W_dec[0] = v
    out.cfg.metadata.hook_name = hook
    return out


def _randomise(sae, d_in: int) -> None:
    sae.W_enc.normal_(0, 1.0 / d_in ** 0.5)
    sae.W_dec.normal_(0, 1.0 / d_in ** 0.5)
    sae.b_enc.normal_(0, 0.05)
    sae.b_dec.normal_(0, 0.05)


def kv_parity(tl, hf, tok, hs, prompts, continuation: str = " Sure, here is how to do it"):
    """A prompt (prefill) and a continuation on its KV cache, as in generation, in both libraries, plain and with the
    hook set ``hs`` attached (its prompt gate set to open on half the rows). Returns
    ``(plain_tl, plain_hf, cut_tl, cut_hf, gate_tl, gate_hf, real)``."""
    from transformer_lens.cache.key_value_cache import TransformerLensKeyValueCache

    from trace_circuits.prompts import encode_prompts, iter_batches

    n = len(prompts)
    enc = encode_prompts(tl, prompts)
    b = next(iter_batches(enc, n))
    cont = torch.tensor(tok(continuation, add_special_tokens=False)["input_ids"]).repeat(n, 1)
    full_mask = torch.cat([b.attention_mask, torch.ones_like(cont)], 1)
    pos = (full_mask.cumsum(-1) - 1).clamp(min=0)
    T = b.tokens.shape[1]

    def tl_run():
        cache = TransformerLensKeyValueCache.init_cache(tl.cfg, tl.cfg.device, n)
        first = tl(b.tokens, attention_mask=b.attention_mask, past_kv_cache=cache)
        return torch.cat([first, tl(cont, attention_mask=torch.ones_like(cont), past_kv_cache=cache)], 1)

    def hf_run():
        first = hf(b.tokens, attention_mask=b.attention_mask, position_ids=pos[:, :T], use_cache=True)
        rest = hf(cont, attention_mask=full_mask, position_ids=pos[:, T:], past_key_values=first.past_key_values,
                  use_cache=True)
        return torch.cat([first.logits, rest.logits], 1)

    with torch.no_grad():
        plain_tl, plain_hf = tl_run(), hf_run()
        with hs.attach(tl) as rt:
            tl_run()
        s = rt.prompt_scores.sort().values
        hs.gate_operation.gate_threshold = float(s[n // 2 - 1] + s[n // 2]) / 2  # opens on half the rows
        with hs.attach(tl) as rt_tl:
            cut_tl = tl_run()
        with hs.attach(hf) as rt_hf:
            cut_hf = hf_run()
    return plain_tl, plain_hf, cut_tl, cut_hf, rt_tl, rt_hf, full_mask.bool()


def all_kinds_hookset(tl, sae_layer: int = 2, threshold: float = 0.0):
    """A prompt gate at layer 1 and, after it, one operation of every kind (SAE features of two architectures)."""
    from trace_circuits import Operation
    from trace_circuits.gate import user_turn_end
    from trace_circuits.hookset import hookset_for, sae_operation

    torch.manual_seed(5)
    d, L = tl.cfg.d_model, tl.cfg.n_layers
    r, v = torch.randn(d), torch.randn(d)
    probe = Operation(kind="prompt_probe", layer=1, gap=1.0, anchor=user_turn_end(tl), gate_threshold=threshold,
                      tensors={"r": r / r.norm(), "mu": torch.zeros(d)})
    return hookset_for(tl, [probe, sae_operation(sae("topk", f"blocks.{sae_layer}.hook_resid_post", d_in=d), [0, 3, 7]),
                            sae_operation(sae("jumprelu", f"blocks.{sae_layer}.hook_mlp_out", d_in=d), [1, 2]),
                            Operation(kind="heads", layer=sae_layer, heads=[0, 3]), Operation(kind="mlp", layer=L - 1),
                            Operation(kind="direction", layer=L - 1, mode="add", alpha=2.0, tensors={"r": v / v.norm()}),
                            Operation(kind="direction", layer=sae_layer, mode="ablate", tensors={"r": v / v.norm()})])
