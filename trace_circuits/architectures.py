"""One table per model architecture: how a transformers model becomes a HookedTransformer, and which transformers
module is the twin of each TransformerLens hook point.

Weights are converted *unprocessed* (no LayerNorm folding, no centering), so each hook point carries exactly the
values of its twin module: a hook set built on the HookedTransformer attaches to the transformers model unchanged.
An architecture missing from :data:`ARCHITECTURES` is refused with one line (:func:`architecture_of`).

Twins (``{l}`` the layer; ``forward`` = the module's output, ``forward_pre`` = its first input):

    hook point                    Llama / Qwen2                         Gemma 3
    blocks.{l}.hook_resid_pre     model.layers.{l}        forward_pre   (same)
    blocks.{l}.hook_resid_post    model.layers.{l}        forward       (same)
    blocks.{l}.attn.hook_z        model.layers.{l}.self_attn.o_proj  forward_pre  (same; [.., n_heads * d_head])
    blocks.{l}.hook_attn_out      model.layers.{l}.self_attn.o_proj  forward      model.layers.{l}.post_attention_layernorm
    blocks.{l}.hook_mlp_out       model.layers.{l}.mlp    forward       model.layers.{l}.post_feedforward_layernorm

(Gemma 3 normalises each sublayer's output before adding it to the residual stream, and TransformerLens's
``hook_attn_out`` / ``hook_mlp_out`` sit after that norm.) Each row is checked by a TL-vs-transformers parity test
with a hook set attached.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from trace_circuits.errors import TraceCircuitsError
from trace_circuits.names import parse_hook

_LLAMA_TWINS = {
    "resid_pre": ("model.layers.{l}", "forward_pre"),
    "resid_post": ("model.layers.{l}", "forward"),
    "z": ("model.layers.{l}.self_attn.o_proj", "forward_pre"),
    "attn_out": ("model.layers.{l}.self_attn.o_proj", "forward"),
    "mlp_out": ("model.layers.{l}.mlp", "forward"),
}
_GEMMA3_TWINS = {
    **_LLAMA_TWINS,
    "attn_out": ("model.layers.{l}.post_attention_layernorm", "forward"),
    "mlp_out": ("model.layers.{l}.post_feedforward_layernorm", "forward"),
}


@dataclass(frozen=True)
class Architecture:
    """What trace-circuits knows about one transformers ``model_type``."""

    model_type: str  # transformers config.model_type
    tl_architecture: str  # HookedTransformerConfig.original_architecture
    twins: dict = field(default_factory=dict)  # hook kind -> (module path template, "forward" | "forward_pre")
    converter: str = ""  # name of TransformerLens's weight converter in transformer_lens.pretrained.weight_conversions
    tl_official_name: str = ""  # or: a TransformerLens built-in config that covers this model

    def twin(self, hook_name: str) -> tuple[str, str]:
        """``(module path, hook type)`` of the transformers module that carries ``hook_name``'s values."""
        kind, layer = parse_hook(hook_name)
        if kind not in self.twins or layer is None:
            raise TraceCircuitsError(f"hook point {hook_name} has no transformers twin for {self.model_type} models; "
                                     f"use one of {', '.join(sorted(self.twins))} hooks")
        path, how = self.twins[kind]
        return path.format(l=layer), how


ARCHITECTURES: dict[str, Architecture] = {
    "llama": Architecture("llama", "LlamaForCausalLM", _LLAMA_TWINS, converter="convert_llama_weights"),
    "qwen2": Architecture("qwen2", "Qwen2ForCausalLM", _LLAMA_TWINS, converter="convert_qwen2_weights"),
    "gemma3_text": Architecture("gemma3_text", "Gemma3ForCausalLM", _GEMMA3_TWINS,
                                tl_official_name="google/gemma-3-270m"),
}


def architecture_of(model) -> Architecture:
    """The table row for a transformers model (or its config), or one error line naming the supported ones."""
    config = getattr(model, "config", model)
    model_type = getattr(config, "model_type", None)
    if model_type not in ARCHITECTURES:
        raise TraceCircuitsError(f"transformers '{model_type}' models are not supported for hook sets (supported: "
                                 f"{', '.join(sorted(ARCHITECTURES))}); use the HookedTransformer, or add the "
                                 "architecture's row to trace_circuits.architectures.ARCHITECTURES")
    return ARCHITECTURES[model_type]


def model_type_of(model) -> str:
    """The transformers ``model_type`` a HookedTransformer (or transformers model) corresponds to, "" if unknown."""
    config = getattr(model, "config", None)
    if config is not None and getattr(config, "model_type", None):
        return str(config.model_type)
    tl_arch = getattr(getattr(model, "cfg", None), "original_architecture", "")
    return next((a.model_type for a in ARCHITECTURES.values() if a.tl_architecture == tl_arch), "")


def tl_config_kwargs(hf_config, name: str, n_ctx: int) -> dict[str, Any]:
    """HookedTransformerConfig fields for a Llama-family decoder (Llama, Qwen2): rotary, RMSNorm, gated MLP."""
    arch = architecture_of(hf_config)
    n_heads = hf_config.num_attention_heads
    n_kv = hf_config.num_key_value_heads
    d_head = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // n_heads
    rope = getattr(hf_config, "rope_parameters", None) or {}
    rope_theta = rope.get("rope_theta", getattr(hf_config, "rope_theta", 10000.0))
    return dict(
        d_model=hf_config.hidden_size, d_head=d_head, n_heads=n_heads, d_mlp=hf_config.intermediate_size,
        n_layers=hf_config.num_hidden_layers, n_ctx=min(n_ctx, hf_config.max_position_embeddings),
        eps=float(hf_config.rms_norm_eps), d_vocab=hf_config.vocab_size, act_fn=hf_config.hidden_act,
        n_key_value_heads=n_kv if n_kv != n_heads else None, normalization_type="RMS",
        positional_embedding_type="rotary", rotary_adjacent_pairs=False, rotary_dim=d_head,
        rotary_base=float(rope_theta), final_rms=True, gated_mlp=True, original_architecture=arch.tl_architecture,
        model_name=name, default_prepend_bos=False,  # the chat template already starts with its own special token
        tokenizer_prepends_bos=False)


def convert_weights(hf_model, name: str, n_ctx: int) -> tuple[dict[str, Any], dict]:
    """``(HookedTransformerConfig kwargs, state dict)`` of a transformers model, with TransformerLens's own converter
    for its architecture (or its built-in config, for Gemma 3)."""
    import torch
    from transformer_lens import HookedTransformerConfig

    arch = architecture_of(hf_model)
    if arch.tl_official_name:
        from transformer_lens.loading_from_pretrained import get_pretrained_model_config, get_pretrained_state_dict

        cfg = get_pretrained_model_config(arch.tl_official_name, hf_cfg=hf_model.config.to_dict(),
                                          dtype=torch.float32, fold_ln=False, device="cpu", n_devices=1,
                                          default_prepend_bos=None)
        kwargs = {k: v for k, v in cfg.to_dict().items() if _jsonable(v)}
        kwargs["n_ctx"] = min(kwargs.get("n_ctx", n_ctx), n_ctx)
        kwargs["model_name"] = name
        state = get_pretrained_state_dict(arch.tl_official_name, cfg, hf_model=hf_model, dtype=torch.float32)
    else:
        from transformer_lens.pretrained import weight_conversions

        convert: Callable = getattr(weight_conversions, arch.converter)
        kwargs = tl_config_kwargs(hf_model.config, name, n_ctx)
        state = convert(hf_model, HookedTransformerConfig(**kwargs, dtype=torch.float32, device="cpu"))
    return kwargs, {k: v.detach().to(torch.float32).contiguous().clone() for k, v in state.items()}


def _jsonable(v: Any) -> bool:
    import json

    try:
        json.dumps(v)
        return True
    except TypeError:
        return False


def decoder_layers(model):
    """A transformers model's list of decoder layers (the module ``blocks.{l}.hook_resid_pre`` twins to, per layer)."""
    path, _ = architecture_of(model).twin("blocks.0.hook_resid_pre")
    return model.get_submodule(path.rsplit(".", 1)[0])
