"""The checks a hook set passes when it is read (:func:`trace_circuits.hookset.format.load_hookset`) and attached:
each operation's tensors against their declared keys, shapes and dtypes, the transformers twins, the gate against
its calibration record, and the model's dimensions. Each fault is one ``error:`` line naming the file and field."""

from __future__ import annotations

import math

import torch

from trace_circuits.errors import TraceCircuitsError
from trace_circuits.hookset.operations import Operation

HOOKSET_FILE = "hookset.json"
TENSORS_FILE = "tensors.safetensors"
_SPEC_KEYS = {"key", "shape", "dtype"}


def architecture_names() -> list[str]:
    from trace_circuits.architectures import ARCHITECTURES

    return sorted(ARCHITECTURES)


def op_tensors(i: int, d, tensors: dict[str, torch.Tensor], at: str, claimed: set[str]) -> dict[str, torch.Tensor]:
    """Operation ``i``'s tensors, each named in ``hookset.json`` as ``{"key": "ops.{i}.{name}", "shape": [...],
    "dtype": "float32"}`` and stored under that key with that shape and dtype (one error line otherwise)."""
    specs = d.get("tensors", {}) if isinstance(d, dict) else {}
    if not isinstance(specs, dict):
        raise TraceCircuitsError(f"{at}: field 'tensors' must be a JSON object, got {specs!r}; re-export the hook set")
    own = {}
    for name, spec in specs.items():
        field_ = f"tensors.{name}"
        if not isinstance(spec, dict) or set(spec) - _SPEC_KEYS:
            extra = sorted(set(spec) - _SPEC_KEYS) if isinstance(spec, dict) else None
            raise TraceCircuitsError(f"{at}: field '{field_}' must be an object with key, shape and dtype"
                                     + (f" (unknown: {extra})" if extra else f", got {spec!r}") +
                                     "; re-export the hook set")
        key, shape, dtype = spec.get("key"), spec.get("shape"), spec.get("dtype", "float32")
        if key != f"ops.{i}.{name}":
            raise TraceCircuitsError(f"{at}: field '{field_}.key' is {key!r}, not 'ops.{i}.{name}'; re-export the "
                                     "hook set")
        if key not in tensors:
            raise TraceCircuitsError(f"{at}: tensor {key} is missing from {TENSORS_FILE}; re-export the hook set")
        if not isinstance(shape, list) or any(isinstance(n, bool) or not isinstance(n, int) for n in shape):
            raise TraceCircuitsError(f"{at}: field '{field_}.shape' must be a list of integers, got {shape!r}")
        t = tensors[key]
        if list(t.shape) != shape:
            raise TraceCircuitsError(f"{at}: tensor {key} has shape {list(t.shape)} but {HOOKSET_FILE} says {shape}; "
                                     "re-export the hook set")
        if dtype != "float32" or t.dtype != torch.float32:
            raise TraceCircuitsError(f"{at}: tensor {key} is stored as {str(t.dtype).replace('torch.', '')} and "
                                     f"declared {dtype!r}; a hook set's tensors are float32; re-export the hook set")
        claimed.add(key)
        own[name] = t
    return own


def check_twin(op: Operation, d: dict, arch: str, at: str) -> None:
    """``hf_module`` / ``hf_hook`` (what a deployer attaches by hand) must name the operation's transformers twin."""
    if not arch or ("hf_module" not in d and "hf_hook" not in d):
        return
    from trace_circuits.architectures import ARCHITECTURES

    try:
        module, how = ARCHITECTURES[arch].twin(op.hook_name)
    except TraceCircuitsError:
        return  # a hook point without a twin is reported by the operation's own check
    for key, want in (("hf_module", module), ("hf_hook", how)):
        if key in d and d[key] != want:
            raise TraceCircuitsError(f"{at}: field '{key}' is {d[key]!r} but {op.hook_name} of a {arch} model is "
                                     f"{want!r}; fix or re-export the hook set")


def check_calibration(hs, where: str) -> None:
    """The gate must be the one recorded in ``provenance.gate_calibration`` (kind, layer, threshold): a gate removed,
    moved or given another threshold after calibration could keep the defense off without a word."""
    calib = hs.provenance.get("gate_calibration")
    if calib is None:
        return
    if not isinstance(calib, dict):
        raise TraceCircuitsError(f"{where}: field 'provenance.gate_calibration' must be a JSON object")
    gate = hs.gate_operation
    kind = {"prompt": "prompt_probe", "features": "sae_features"}.get(calib.get("gate"))
    if kind is not None and (gate is None or gate.kind != kind):
        raise TraceCircuitsError(f"{where}: provenance.gate_calibration records a {calib.get('gate')} gate but the "
                                 f"hook set's gate is {gate.kind if gate else 'missing'}; re-export the hook set")
    if gate is None:
        return
    layer, t = calib.get("layer"), calib.get("gate_threshold")
    if layer is not None and layer != gate.layer:
        raise TraceCircuitsError(f"{where}: the gate is at layer {gate.layer} but provenance.gate_calibration.layer is "
                                 f"{layer!r}; re-export the hook set")
    if isinstance(t, (int, float)) and not isinstance(t, bool) and not math.isclose(t, gate.gate_threshold,
                                                                                    rel_tol=1e-6, abs_tol=1e-9):
        raise TraceCircuitsError(
            f"{where}: the gate's gate_threshold {gate.gate_threshold:g} is not the calibrated "
            f"provenance.gate_calibration.gate_threshold {t:g} (a changed threshold can keep the gate shut); "
            "re-export the hook set, or set both if the change is deliberate")
    tp = calib.get("message_threshold", calib.get("prefix_threshold"))  # format 9 wrote prefix_threshold
    if gate.kind == "prompt_probe" and (tp is not None or gate.message_threshold is not None) and not (
            isinstance(tp, (int, float)) and gate.message_threshold is not None
            and math.isclose(tp, gate.message_threshold, rel_tol=1e-6, abs_tol=1e-9)):
        raise TraceCircuitsError(
            f"{where}: the gate's message_threshold {gate.message_threshold} is not the calibrated "
            f"provenance.gate_calibration.message_threshold {tp} (a changed threshold can keep the gate shut); "
            "re-export the hook set, or set both if the change is deliberate")
    reading = calib.get("message_reading", "prefix" if "prefix_threshold" in calib else None)
    if gate.kind == "prompt_probe" and gate.message_threshold is not None and reading != gate.message_reading:
        raise TraceCircuitsError(
            f"{where}: the gate's message_reading {gate.message_reading!r} is not the calibrated "
            f"provenance.gate_calibration.message_reading {reading!r} (its threshold was set for that reading); "
            "re-export the hook set")


def model_dims(model) -> tuple[int, int, int, int]:
    from trace_circuits.hookset.runtime import is_hooked_transformer

    if is_hooked_transformer(model):
        c = model.cfg
        return (int(c.d_model), int(c.n_layers), int(c.n_heads), int(c.d_head))
    c = getattr(model, "config", None)
    if c is None:
        raise TraceCircuitsError("attach a hook set to a HookedTransformer or a transformers causal LM")
    n_heads = int(c.num_attention_heads)
    d_head = int(getattr(c, "head_dim", None) or c.hidden_size // n_heads)
    return (int(c.hidden_size), int(c.num_hidden_layers), n_heads, d_head)
