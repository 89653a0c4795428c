"""The hook set as a deployable artifact: a folder with ``hookset.json`` (format version, the model's identity, every
operation with its hook point, transformers twin, parameters and tensor shapes, what happens when the gate opens,
provenance) and ``tensors.safetensors`` (keys ``ops.{i}.{name}``).

Loading reads JSON and safetensors only (nothing is unpickled) and validates everything before the hook set can be
attached: a NaN threshold or a misspelt key must never switch the defense off silently. Each fault is one
``error:`` line naming the file and the field.

Format versions: 1 (feature gate, TopK SAEs), 2 (+ prompt gate), 3 (+ any SAE architecture, ``action``, strict
validation). Older files load unchanged.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, ClassVar, Optional

import torch

from trace_circuits._io import replace_dir, write_json_atomic
from trace_circuits.errors import TraceCircuitsError
from trace_circuits.hookset.operations import Operation
from trace_circuits.results import check_format, read_json

FORMAT_VERSION = 3
HOOKSET_FILE = "hookset.json"
TENSORS_FILE = "tensors.safetensors"
KIND = "trace-circuits hook set"
#: What a hook set does once its gate opens (recorded as ``action``): ``zero`` severs the traced chains (the
#: paper's operation); ``reroute`` also steers the residual stream toward the model's own refusal; ``none`` for
#: baselines that are not TraceRouter hook sets.
ACTIONS = ("zero", "reroute", "none")
_TOP_KEYS = {"format_version", "kind", "model", "model_fingerprint", "weights_signature", "architecture", "d_model",
             "n_layers", "n_heads", "d_head", "description", "semantics", "action", "operations", "provenance"}


@dataclass
class HookSet:
    """A pruned set of interventions for one model; attach it to a HookedTransformer or a transformers model."""

    KIND: ClassVar[str] = KIND
    FILE: ClassVar[str] = HOOKSET_FILE

    model: str
    model_fingerprint: str
    weights_signature: str
    d_model: int
    n_layers: int
    n_heads: int
    d_head: int
    operations: list[Operation]
    provenance: dict = field(default_factory=dict)
    description: str = ""
    action: str = "zero"
    architecture: str = ""  # transformers model_type of the model it was made for ("" = unknown)

    def __post_init__(self):
        self.validate()

    # -- checks -------------------------------------------------------------------------------------------------

    def validate(self, where: str = "hook set") -> None:
        """Every operation's parameters and tensors, one gate at most, gated operations after a feature gate."""
        if not self.operations:
            raise TraceCircuitsError(f"{where}: a hook set needs at least one operation")
        if self.action not in ACTIONS:
            raise TraceCircuitsError(f"{where}: action {self.action!r} is not one of {', '.join(ACTIONS)}")
        for name in ("d_model", "n_layers", "n_heads", "d_head"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise TraceCircuitsError(f"{where}: field '{name}' must be a positive integer, got {v!r}")
        feature_gates = [op.layer for op in self.operations if op.gate_source and op.kind == "sae_features"]
        probes = [op for op in self.operations if op.kind == "prompt_probe"]
        if probes and (len(probes) > 1 or feature_gates) or len(feature_gates) > 1:
            raise TraceCircuitsError(f"{where}: a hook set has one gate: one prompt_probe or one gate-source SAE "
                                     "operation")
        for i, op in enumerate(self.operations):
            at = f"{where}, operation {i} ({op.kind})"
            op.check(self.d_model, self.n_layers, self.n_heads, at)
            if op.gated and not op.gate_source and feature_gates and op.layer <= feature_gates[0]:
                raise TraceCircuitsError(f"{at}: a gated operation at layer {op.layer} must come after the gate layer "
                                         f"{feature_gates[0]}; set gated=False or move it")
            if op.kind == "prompt_probe":
                op.gate_source, op.gated = True, False
            elif op.gated and not feature_gates and not probes:
                op.gated = False  # no gate at all: the operation acts everywhere (documented)

    def check_model(self, model) -> None:
        """Refuse a model other than the one the hook set was made for (shape first, then identity)."""
        from trace_circuits.models import model_fingerprint, weights_signature

        dims = _model_dims(model)
        mine = (self.d_model, self.n_layers, self.n_heads, self.d_head)
        if dims != mine:
            raise TraceCircuitsError(f"hook set was made for {self.model} (d_model, layers, heads, d_head = {mine}), "
                                     f"but this model has {dims}; trace the circuit on this model")
        if model_fingerprint(model) == self.model_fingerprint:
            return
        if weights_signature(model) != self.weights_signature:
            raise TraceCircuitsError(f"hook set was made for model {self.model_fingerprint}, not "
                                     f"{model_fingerprint(model)}; trace the circuit on this model")

    @property
    def gate_operation(self) -> Optional[Operation]:
        """The operation that opens the gate (a ``prompt_probe`` or a gate-source SAE operation), if any."""
        return next((op for op in self.operations if op.gate_source), None)

    @property
    def source_operation(self) -> Optional[Operation]:
        """The SAE operation on the circuit's source features: the feature gate's source, else the lowest-layer
        ``sae_features`` operation (None if there is none)."""
        sae_ops = [op for op in self.operations if op.kind == "sae_features"]
        return next((op for op in sae_ops if op.gate_source), min(sae_ops, key=lambda o: o.layer, default=None))

    # -- attaching ----------------------------------------------------------------------------------------------

    def attach(self, model):
        """Context manager: the hook set on a HookedTransformer or a transformers causal LM for the ``with`` block
        (generation included: the gate state is carried across KV-cache steps and reset per prompt). Yields the
        runtime (``.gate_open``, ``.prompt_scores``, ``.stats``)."""
        from trace_circuits.hookset.runtime import attached

        return attached(self, model)

    def fwd_hooks(self, model=None) -> list[tuple[str, Callable]]:
        """``[(hook_name, fn)]`` for ``run_with_hooks`` / ``model.hooks(fwd_hooks=...)`` (each forward pass a new
        sequence)."""
        from trace_circuits.hookset.runtime import fwd_hooks

        return fwd_hooks(self, model)

    # -- persistence --------------------------------------------------------------------------------------------

    def to_json(self) -> dict:
        from trace_circuits.architectures import ARCHITECTURES

        twin = ARCHITECTURES.get(self.architecture)
        return {"format_version": FORMAT_VERSION, "kind": KIND, "model": self.model,
                "model_fingerprint": self.model_fingerprint, "weights_signature": self.weights_signature,
                "architecture": self.architecture, "d_model": self.d_model, "n_layers": self.n_layers,
                "n_heads": self.n_heads, "d_head": self.d_head, "description": self.description,
                "action": self.action,
                "semantics": "see trace_circuits.hookset.operations (what each operation computes) and "
                             "trace_circuits.hookset.runtime (when gated operations act)",
                "operations": [op.to_json(i, twin) for i, op in enumerate(self.operations)],
                "provenance": self.provenance}

    @classmethod
    def from_json(cls, meta: dict, tensors: dict[str, torch.Tensor], where: str = HOOKSET_FILE) -> "HookSet":
        """Rebuild from ``hookset.json`` and its tensors, validating every field (module docstring)."""
        check_format(meta, KIND, FORMAT_VERSION, where, "re-export the hook set")
        if meta.get("kind") != KIND:
            raise TraceCircuitsError(f"{where} is not a trace-circuits hook set; re-export it")
        unknown = set(meta) - _TOP_KEYS
        if unknown:
            raise TraceCircuitsError(f"{where}: unknown field(s) {sorted(unknown)} (misspelt?); remove them or "
                                     "re-export the hook set")
        ops_json = meta.get("operations")
        if not isinstance(ops_json, list):
            raise TraceCircuitsError(f"{where}: field 'operations' must be a list, got {ops_json!r}")
        for key in ("model", "model_fingerprint", "weights_signature"):
            if not isinstance(meta.get(key), str):
                raise TraceCircuitsError(f"{where}: field '{key}' must be a string; re-export the hook set")
        ops = []
        for i, d in enumerate(ops_json):
            at = f"{where}, operation {i}"
            own = {}
            for name, spec in (d.get("tensors", {}) if isinstance(d, dict) else {}).items():
                key = spec.get("key") if isinstance(spec, dict) else None
                if key not in tensors:
                    raise TraceCircuitsError(f"{at}: tensor {key} is missing from {TENSORS_FILE}; re-export the hook "
                                             "set")
                if list(tensors[key].shape) != list(spec.get("shape", [])):
                    raise TraceCircuitsError(f"{at}: tensor {key} has shape {list(tensors[key].shape)} but "
                                             f"{HOOKSET_FILE} says {spec.get('shape')}; re-export the hook set")
                own[name] = tensors[key].float()
            ops.append(Operation.from_json(d, own, at))
        prov = meta.get("provenance", {})
        try:
            return cls(model=meta["model"], model_fingerprint=meta["model_fingerprint"],
                       weights_signature=meta["weights_signature"], d_model=meta.get("d_model"),
                       n_layers=meta.get("n_layers"), n_heads=meta.get("n_heads"), d_head=meta.get("d_head"),
                       operations=ops, provenance=prov if isinstance(prov, dict) else {},
                       description=str(meta.get("description", "")), action=meta.get("action", "zero"),
                       architecture=str(meta.get("architecture", "") or ""))
        except TraceCircuitsError as err:
            raise TraceCircuitsError(str(err).replace("hook set:", f"{where}:", 1)) from None

    def save(self, out_dir: str | Path) -> Path:
        """Write ``hookset.json`` + ``tensors.safetensors`` into ``out_dir``: the folder is built beside it, flushed
        to disk, then renamed into place; an old hook set there is removed only once the new one is in place."""
        from safetensors.torch import save_file

        out = Path(out_dir)
        tmp = out.with_name(out.name + f".tmp{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        tensors = {f"ops.{i}.{name}": t.detach().float().cpu().contiguous()
                   for i, op in enumerate(self.operations) for name, t in op.tensors.items()}
        save_file(tensors, str(tmp / TENSORS_FILE), metadata={"format": KIND, "format_version": str(FORMAT_VERSION)})
        write_json_atomic(tmp / HOOKSET_FILE, self.to_json())
        return replace_dir(tmp, out)

    @classmethod
    def load(cls, path: str | Path) -> "HookSet":
        return load_hookset(path)

    def plot(self):
        from trace_circuits.viz import plot_hookset

        return plot_hookset(self)

    def summary(self) -> str:
        n_feat = sum(len(op.features) for op in self.operations if op.kind == "sae_features")
        n_heads = sum(len(op.heads) for op in self.operations if op.kind == "heads")
        n_mlp = sum(op.kind == "mlp" for op in self.operations)
        n_dir = sum(op.kind == "direction" for op in self.operations)
        g = self.gate_operation
        gate = ("" if g is None else f"; prompt gate at layer {g.layer}" if g.kind == "prompt_probe"
                else f"; feature gate at layer {g.layer}")
        return (f"HookSet for {self.model}: {len(self.operations)} operations ({n_feat} SAE features, {n_heads} heads, "
                f"{n_mlp} MLPs" + (f", {n_dir} directions" if n_dir else "") + gate +
                (f"; action {self.action}" if self.action != "none" else "") + ")")

    def __repr__(self) -> str:
        return f"<{self.summary()}>"


def load_hookset(path: str | Path) -> HookSet:
    """Load a hook set folder written by :meth:`HookSet.save`, with one-line errors for anything wrong."""
    folder = Path(path)
    if folder.is_file() and folder.name == HOOKSET_FILE:
        folder = folder.parent
    meta_path, tensor_path = folder / HOOKSET_FILE, folder / TENSORS_FILE
    if not meta_path.exists():
        raise TraceCircuitsError(f"{folder} is not a hook set folder (no {HOOKSET_FILE}); export one with "
                                 "`trace-circuits trace`")
    meta = read_json(meta_path, "hook set", "re-export the hook set")
    check_format(meta, KIND, FORMAT_VERSION, str(meta_path), "re-export the hook set")
    if not tensor_path.exists():
        raise TraceCircuitsError(f"{tensor_path} is missing; copy the whole hook set folder")
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(tensor_path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise TraceCircuitsError(f"{tensor_path} is not a readable safetensors file ({str(err)[:60]}); re-export the "
                                 "hook set") from None
    return HookSet.from_json(meta, tensors, where=str(meta_path))


def _model_dims(model) -> tuple[int, int, int, int]:
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


def hookset_for(model, operations: list[Operation], *, description: str = "", action: str = "none",
                provenance: Optional[dict] = None) -> HookSet:
    """A hook set for ``model`` (a HookedTransformer): its identity, dimensions and architecture filled in."""
    from trace_circuits.architectures import model_type_of
    from trace_circuits.models import model_fingerprint, model_info, weights_signature

    c = model.cfg
    arch = model_type_of(model)
    return HookSet(model=model_info(model).name, model_fingerprint=model_fingerprint(model),
                   weights_signature=weights_signature(model), d_model=c.d_model, n_layers=c.n_layers,
                   n_heads=c.n_heads, d_head=c.d_head, operations=operations, description=description, action=action,
                   provenance=dict(provenance or {}), architecture=arch)

