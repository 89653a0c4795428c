"""Where SAEs come from: the shipped ``saes/<model>/<hook>/``, any SAE-Lens folder, or an SAE-Lens pretrained release.

``load_sae(source, model=...)`` takes

* a hook point (``blocks.21.hook_resid_post``): the SAE shipped for the model at that hook;
* a folder (``path/to/sae``): anything SAE-Lens's ``SAE.load_from_disk`` reads (``cfg.json`` + weights), e.g. one you
  trained or downloaded, of any architecture SAE-Lens loads for inference;
* ``RELEASE:SAE_ID`` (e.g. ``gemma-scope-2b-pt-res-canonical:layer_12/width_16k/canonical``): ``SAE.from_pretrained``
  (needs the hub, or the files in the local Hugging Face cache).

What trace-circuits records about an SAE lives in SAE-Lens's own ``sae.cfg.metadata``: ``hook_name`` and
``model_name`` (SAE-Lens's fields), ``massive_norm_threshold`` (positions above it are attention-sink 'massive
activations' the SAE was not trained on), ``model_fingerprint``, ``metrics`` (held-out quality) and ``source``.
Shipped SAEs keep them in ``cfg.json``'s ``metadata``; older shipped folders kept them in ``trace_circuits.json``,
which is still read.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Optional

from trace_circuits.errors import TraceCircuitsError
from trace_circuits.names import layer_of, parse_hook

FORMAT_VERSION = 1
LEGACY_META_FILE = "trace_circuits.json"
WEIGHT_FILES = ("sae_weights.safetensors",)


def sae_root() -> Path:
    """Where shipped SAEs live: ``$TRACE_CIRCUITS_SAES`` or the repository's ``saes/`` folder."""
    env = os.environ.get("TRACE_CIRCUITS_SAES")
    return Path(env) if env else Path(__file__).resolve().parent.parent.parent / "saes"


def hook_dirname(hook_name: str) -> str:
    return hook_name.replace("/", "_")


def _read_folder_meta(folder: Path) -> tuple[dict, dict]:
    """``(cfg.json, our metadata)`` of an SAE folder; one error line naming the damaged file and the fix."""
    from trace_circuits.results import loads_json

    cfg_path = folder / "cfg.json"
    fix = f"re-train or re-download the SAE (delete {folder} first)"
    try:
        cfg = loads_json(cfg_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise TraceCircuitsError(f"{folder} is not an SAE folder (no cfg.json); pass an SAE-Lens folder, a hook point "
                                 "of a shipped SAE, or RELEASE:SAE_ID") from None
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as err:
        raise TraceCircuitsError(f"{cfg_path} is damaged ({type(err).__name__}: {str(err)[:60]}); {fix}") from None
    if not isinstance(cfg, dict) or any(isinstance(cfg.get(k), bool) or not isinstance(cfg.get(k), int)
                                        or cfg.get(k) < 1 for k in ("d_in", "d_sae")):
        raise TraceCircuitsError(f"{cfg_path} lacks positive integer d_in / d_sae; {fix}")
    if not isinstance(cfg.get("metadata") or {}, dict):
        raise TraceCircuitsError(f"{cfg_path}: field 'metadata' must be a JSON object; {fix}")
    meta = dict(cfg.get("metadata") or {})
    legacy = folder / LEGACY_META_FILE
    if legacy.exists():
        try:
            old = loads_json(legacy.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError, RecursionError):
            raise TraceCircuitsError(f"{legacy} is damaged; {fix}") from None
        if not isinstance(old, dict):
            raise TraceCircuitsError(f"{legacy} is not a JSON object; {fix}")
        version = old.get("format_version", 0)
        if not isinstance(version, int) or version > FORMAT_VERSION:
            raise TraceCircuitsError(f"{legacy} was written by a newer trace-circuits (format {version!r}); upgrade it")
        meta.setdefault("hook_name", old.get("hook_name"))
        for k in ("model_fingerprint", "massive_norm_threshold", "metrics"):
            if k in old:
                meta.setdefault(k, old[k])
        meta.setdefault("provenance", {k: v for k, v in old.items() if k not in meta and k != "format_version"})
    return cfg, meta


def _check_weights(folder: Path, cfg: dict) -> None:
    """The weights file exists, is a readable safetensors file whose tensors agree with cfg.json's d_in / d_sae and
    architecture, and holds only finite numbers; for TopK, ``k`` is an integer in 1..d_sae."""
    import torch
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = folder / WEIGHT_FILES[0]
    fix = "re-train or re-download the SAE"
    if not path.exists():
        raise TraceCircuitsError(f"{path} is missing; {fix}")
    try:
        weights = load_file(str(path))  # reads every byte: a truncated or corrupt file fails here
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise TraceCircuitsError(f"{path} is not a readable safetensors file ({str(err)[:60]}); {fix}") from None
    d_in, d_sae, arch = cfg["d_in"], cfg["d_sae"], cfg.get("architecture", "standard")
    from trace_circuits.saes.encoding import ARCHITECTURES

    if arch not in ARCHITECTURES:
        hint = " (a training SAE: save it with sae.save_inference_model(path))" if arch == "batchtopk" else ""
        raise TraceCircuitsError(f"{folder / 'cfg.json'}: SAE architecture {arch!r} is not one trace-circuits runs "
                                 f"({', '.join(ARCHITECTURES)}){hint}; use another SAE")
    shapes = {"W_enc": (d_in, d_sae), "W_dec": (d_sae, d_in), "b_enc": (d_sae,), "b_dec": (d_in,),
              "threshold": (d_sae,)}
    for name in list(shapes)[:5 if arch == "jumprelu" else 4]:
        if name not in weights:
            raise TraceCircuitsError(f"{path} has no tensor {name} (a {arch} SAE needs it); {fix}")
    for name, t in weights.items():
        if name in shapes and tuple(t.shape) != shapes[name]:
            raise TraceCircuitsError(f"{path} holds {name} of shape {list(t.shape)} but {folder / 'cfg.json'} says "
                                     f"d_in {d_in}, d_sae {d_sae} (so {list(shapes[name])}); {fix}")
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise TraceCircuitsError(f"{path}: tensor {name} holds NaN or inf (a damaged file); {fix}")
    k = cfg.get("k")
    if arch == "topk" and (isinstance(k, bool) or not isinstance(k, int) or not 0 < k <= d_sae):
        raise TraceCircuitsError(f"{folder / 'cfg.json'}: TopK k {k!r} must be an integer in 1..{d_sae}; {fix}")


def list_saes(model_name: Optional[str] = None, root: Optional[str | Path] = None) -> list[dict]:
    """Shipped SAEs ``[{"model", "hook_name", "path", "d_in", "d_sae", "architecture", metrics..., "broken"}]``;
    a damaged folder (unreadable or missing ``cfg.json`` or weights, or the two disagreeing) is listed with
    ``broken`` set to the reason instead of being hidden, and so is the previous version an interrupted save left
    beside its folder."""
    from trace_circuits._io import leftover_dirs

    root = Path(root) if root else sae_root()
    out = []
    for folder in sorted(p for p in root.glob(f"{model_name or '*'}/*") if p.is_dir() and not p.name.startswith(".")):
        if not any((folder / f).exists() for f in ("cfg.json", *WEIGHT_FILES)):
            continue  # not an SAE folder (e.g. saes/corpus)
        row = {"model": folder.parent.name, "hook_name": folder.name, "path": str(folder), "broken": None}
        try:
            cfg, meta = _read_folder_meta(folder)
            _check_weights(folder, cfg)
            metrics = meta.get("metrics") if isinstance(meta.get("metrics"), dict) else {}
            row.update(hook_name=str(meta.get("hook_name") or folder.name), d_in=cfg["d_in"], d_sae=cfg["d_sae"],
                       architecture=cfg.get("architecture"),
                       **{k: metrics.get(k) for k in ("explained_variance", "l0", "ce_loss_recovered")})
        except TraceCircuitsError as err:
            row["broken"] = str(err)
        except Exception as err:  # noqa: BLE001 - a listing must show every folder, whatever is wrong with it
            row["broken"] = f"{folder} cannot be read ({type(err).__name__}: {str(err)[:80]}); re-train the SAE"
        out.append(row)
    for model_dir in sorted(p for p in root.glob(model_name or "*") if p.is_dir()):
        for name in sorted({p.name.split(".")[1] for p in model_dir.glob(".*.old")}):
            if (model_dir / name).exists():
                continue  # the new version is in place; the old one is only waiting to be removed
            for left in leftover_dirs(model_dir / name)[-1:]:
                out.append({"model": model_dir.name, "hook_name": name, "path": str(left),
                            "broken": f"an interrupted save left the previous SAE in {left}; rename it to "
                                      f"{model_dir / name} or re-train the SAE"})
    return sorted(out, key=lambda r: (r["model"], _layer_or_zero(r["hook_name"])))


def _layer_or_zero(hook: str) -> int:
    return parse_hook(hook)[1] or 0


def _load_folder(folder: Path, device: str, dtype: str):
    from sae_lens import SAE

    cfg, meta = _read_folder_meta(folder)
    _check_weights(folder, cfg)
    try:
        sae = SAE.load_from_disk(str(folder), device=device, dtype=dtype)
    except (OSError, ValueError, KeyError, RuntimeError, TypeError, AttributeError) as err:
        raise TraceCircuitsError(f"SAE-Lens cannot load {folder} ({type(err).__name__}: {str(err)[:80]}); re-train or "
                                 "re-download the SAE") from None
    check_sae_values(sae, str(folder))
    for k, v in meta.items():
        if k not in sae.cfg.metadata or sae.cfg.metadata.get(k) is None:
            sae.cfg.metadata[k] = v
    sae.cfg.metadata["source"] = str(folder)
    return sae


def _load_release(spec: str, device: str, dtype: str):
    """``SAE.from_pretrained`` from the local Hugging Face cache, or the hub if the user allowed it
    (:func:`trace_circuits.model_files.from_hub`)."""
    from sae_lens import SAE

    from trace_circuits.model_files import from_hub

    release, sae_id = spec.split(":", 1)
    fix = ("download it on a connected machine (SAE.from_pretrained) and copy ~/.cache/huggingface, or save it with "
           "sae.save_model(DIR) and pass that folder")
    try:
        sae = from_hub(lambda: SAE.from_pretrained(release, sae_id, device=device, dtype=dtype),
                       f"SAE-Lens release {spec}", fix)
    except TraceCircuitsError:
        raise
    except Exception as err:  # the hub client raises many types; the message says which
        msg = str(err).strip().splitlines()[0][:100] if str(err).strip() else type(err).__name__
        raise TraceCircuitsError(f"SAE-Lens cannot load {release}:{sae_id} ({msg}); check the release and SAE id "
                                 "in SAE-Lens's pretrained_saes.yaml") from None
    sae = sae[0] if isinstance(sae, tuple) else sae
    check_sae_values(sae, spec)
    sae.cfg.metadata["source"] = spec
    return sae


def check_sae_values(sae, where: str) -> None:
    """Every weight finite, and a TopK SAE's ``k`` an integer in 1..d_sae (one error line naming the SAE)."""
    import torch

    for name, p in sae.state_dict().items():
        if p.is_floating_point() and not torch.isfinite(p).all():
            raise TraceCircuitsError(f"{where}: SAE weight {name} holds NaN or inf (a damaged file); re-train or "
                                     "re-download the SAE")
    k = getattr(sae.cfg, "k", None)
    if k is not None and (isinstance(k, bool) or not isinstance(k, int) or not 0 < k <= sae.cfg.d_sae):
        raise TraceCircuitsError(f"{where}: TopK k {k!r} must be an integer in 1..{sae.cfg.d_sae}; re-train or "
                                 "re-download the SAE")


def load_sae(source: str | Path, model=None, *, model_name: Optional[str] = None, root: Optional[str | Path] = None,
             device: str = "cpu", dtype: str = "float32"):
    """Load an SAE from a hook point of a shipped SAE, an SAE-Lens folder, or ``RELEASE:SAE_ID`` (module docstring).

    With ``model`` (a HookedTransformer) the SAE is checked to fit it (:func:`check_sae_fits`); the shipped SAEs of
    ``model_name`` (default: the model's) are searched for a hook point."""
    from trace_circuits.models import canonical_name, model_info

    text = str(source)
    path = Path(text)
    if path.is_dir():
        sae = _load_folder(path, device, dtype)
    elif ":" in text and not text.startswith("blocks.") and not path.exists():
        sae = _load_release(text, device, dtype)
    else:
        name = canonical_name(model_name or (model_info(model).name if model is not None else ""))
        if not name:
            raise TraceCircuitsError(f"to load the shipped SAE at {text}, pass the model (or model_name=...)")
        base = Path(root) if root else sae_root()
        folder = base / name / hook_dirname(text)
        if not (folder / "cfg.json").exists():
            have = [f"{s['model']}:{s['hook_name']}" for s in list_saes(root=base) if not s["broken"]]
            raise TraceCircuitsError(f"no SAE for {name} at {text} in {base}; available: {', '.join(have) or 'none'}; "
                                     f"pass an SAE-Lens folder or RELEASE:SAE_ID, or train one with `trace-circuits "
                                     f"train-sae --model {name} --hook {text}`")
        sae = _load_folder(folder, device, dtype)
    from trace_circuits.saes.encoding import architecture

    architecture(sae)  # refuse what we cannot reproduce, now rather than mid-run
    if model is not None:
        check_sae_fits(sae, model)
    return sae


def sae_hook(sae) -> str:
    """The hook point an SAE reads (SAE-Lens's ``cfg.metadata.hook_name``), or one error line."""
    hook = sae.cfg.metadata.get("hook_name")
    if not hook:
        raise TraceCircuitsError(f"the SAE from {sae.cfg.metadata.get('source')} records no hook point; set "
                                 "sae.cfg.metadata.hook_name = 'blocks.L.hook_resid_post'")
    return hook


def check_sae_fits(sae, model, hook_name: Optional[str] = None) -> None:
    """Refuse an SAE made for another model, hook or width, with one line that says which."""
    from trace_circuits.models import model_fingerprint

    sae_hook_name = sae.cfg.metadata.get("hook_name")
    hook_name = hook_name or sae_hook(sae)
    if hook_name not in model.hook_dict:
        raise TraceCircuitsError(f"model has no hook '{hook_name}'; pick a hook such as blocks.0.hook_resid_post")
    if sae_hook_name and sae_hook_name != hook_name:
        raise TraceCircuitsError(f"SAE was trained at {sae_hook_name}, not {hook_name}; load the SAE for {hook_name}")
    d_model = model.cfg.d_model
    if sae.cfg.d_in != d_model:
        raise TraceCircuitsError(f"SAE d_in {sae.cfg.d_in} does not fit this model's d_model {d_model} at "
                                 f"{hook_name}; use an SAE trained for this model")
    fp = sae.cfg.metadata.get("model_fingerprint")
    if fp and fp != model_fingerprint(model):
        raise TraceCircuitsError(f"SAE was trained on model {fp}, not {model_fingerprint(model)}; "
                                 "use an SAE trained for this model")


def save_sae(sae, out_dir: str | Path, metadata: Optional[dict] = None, float16: bool = True) -> Path:
    """Write an SAE in SAE-Lens format (training SAEs as their inference SAE), ``metadata`` merged into
    ``cfg.metadata``; the folder is built beside ``out_dir``, every file flushed to disk, then renamed into place,
    and an old SAE there is only removed once the new one is in place (:func:`trace_circuits._io.replace_dir`)."""
    import torch
    from safetensors.torch import load_file, save_file

    from trace_circuits._io import replace_dir, staging_dir, write_json_atomic

    out_dir = Path(out_dir)
    tmp = staging_dir(out_dir)
    try:
        for k, v in (metadata or {}).items():
            sae.cfg.metadata[k] = v
        save = sae.save_inference_model if hasattr(sae, "save_inference_model") else sae.save_model
        save(str(tmp))
        wpath = tmp / WEIGHT_FILES[0]
        cfg = json.loads((tmp / "cfg.json").read_text())
        cfg["metadata"] = {**cfg.get("metadata", {}), **(metadata or {})}
        if float16:
            weights = load_file(str(wpath))
            save_file({k: v.to(torch.float16).contiguous() for k, v in weights.items()}, str(wpath))
            cfg["dtype"] = "float16"
        write_json_atomic(tmp / "cfg.json", cfg)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return replace_dir(tmp, out_dir)


def by_layer(saes) -> dict[int, object]:
    """``{layer: SAE}`` from SAEs (a list, or a dict keyed by anything), each at a ``blocks.L.hook_resid_post``."""
    items = saes.values() if isinstance(saes, dict) else saes
    out = {}
    for sae in items:
        hook = sae_hook(sae)
        kind, layer = parse_hook(hook)
        if kind != "resid_post":
            raise TraceCircuitsError(f"tracing needs residual-stream SAEs at blocks.L.hook_resid_post; {hook} is not "
                                     "one (stage 2 alone takes any hook)")
        if layer in out:
            raise TraceCircuitsError(f"two SAEs at layer {layer}; pass one SAE per layer")
        out[layer_of(hook)] = sae
    return dict(sorted(out.items()))


def update_metadata(folder: str | Path, **fields) -> None:
    """Merge ``fields`` into the ``metadata`` of an SAE folder's ``cfg.json`` (written atomically)."""
    from trace_circuits._io import write_json_atomic

    cfg, _ = _read_folder_meta(Path(folder))
    cfg["metadata"] = {**(cfg.get("metadata") or {}), **fields}
    write_json_atomic(Path(folder) / "cfg.json", cfg)


def shipped_saes(model, from_layer: int = 0, model_name: Optional[str] = None,
                 root: Optional[str | Path] = None) -> dict:
    """The shipped residual-stream SAEs of the model at ``from_layer`` and every later layer, ``{layer: SAE}``."""
    from trace_circuits.models import model_info

    name = model_name or model_info(model).name
    out = {}
    for s in list_saes(name, root=root):
        kind, layer = parse_hook(s["hook_name"])
        if s["broken"] or kind != "resid_post" or layer is None or layer < from_layer:
            continue
        out[layer] = load_sae(s["hook_name"], model=model, model_name=name, root=root)
    return dict(sorted(out.items()))
