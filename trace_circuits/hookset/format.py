"""The hook set as a deployable artifact: a folder with ``hookset.json`` (format version, the model's identity, every
operation with its hook point, transformers twin, parameters and tensor shapes, what happens when the gate opens,
provenance) and ``tensors.safetensors`` (keys ``ops.{i}.{name}``).

Loading reads JSON and safetensors only (nothing is unpickled) and validates everything before the hook set can be
attached: a NaN threshold or a misspelt key must never switch the defense off silently. Each fault is one
``error:`` line naming the file and the field.

Format versions: 1 (feature gate, TopK SAEs), 2 (+ prompt gate), 3 (+ any SAE architecture, ``action``, strict
validation), 4 (+ ``tensors_sha256``: the SHA-256 of ``tensors.safetensors``, so the two files of one export stay
together), 5 (+ the prompt probe's ``pool``: ``mean`` reads the prompt's mean residual; older probes read ``last``),
6 (+ ``pool="turn"`` and the probe's ``opener``), 7 (+ ``action="steer"``), 8 (``weights_signature`` hashes the
embedding rows rounded to bfloat16, so a float32 and a bfloat16 copy of the same weights are both recognised; older
files keep the float32 signature, which the float32 model still matches), 9 (+ the probe's ``prefix_threshold`` and
``prefix_min_tokens``: a second reading of the user's message, its running means, that a suffix cannot lower; older
probes have none), 10 (the same as ``message_threshold``, ``message_min_tokens`` and ``message_reading``: ``span``
reads every stretch of the message, ``prefix`` what format 9 read), 11 (+ ``message_reading="sentence"`` and its
``message_boundary`` token ids: whole sentences of the message).
Older files load unchanged, under the same checks.

What loading refuses, each with one ``error:`` line naming the file and the field: a file that is not a JSON object,
names a key twice or a key this version does not know; a field of the wrong type; an operation of an unknown kind,
with an unknown field, or without a field its effect depends on (``gated``, ``scale``, a gate's ``gate_threshold``,
a probe's ``gap``, a direction's ``mode``); a NaN or infinite number, a ``scale`` outside [0, 1], a layer, head or
feature id outside the model or SAE, a repeated head or feature; a ``hook_name``, ``hf_module`` or ``hf_hook`` that
is not where the operation acts; a tensor missing, of another shape or dtype than declared, not finite, not under
its own key ``ops.{i}.{name}``, meaningless for its operation, or in the file without an operation naming it; a
``direction`` (ablate) or probe vector that is not a unit vector; a steering step beyond float16's range; a gate
other than the one ``provenance.gate_calibration`` records (kind, layer, threshold); a tensors file whose SHA-256
is not the recorded one.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, ClassVar, Optional

import torch

from trace_circuits._io import leftover_dirs, replace_dir, staging_dir, write_json_atomic
from trace_circuits.errors import TraceCircuitsError
from trace_circuits.hookset.checks import (
    HOOKSET_FILE,
    TENSORS_FILE,
    architecture_names,
    check_calibration,
    check_twin,
    model_dims,
    op_tensors,
)
from trace_circuits.hookset.operations import Operation
from trace_circuits.model_files import file_sha256
from trace_circuits.results import check_format, read_json

FORMAT_VERSION = 13
KIND = "trace-circuits hook set"
#: What a hook set does once its gate opens (recorded as ``action``): ``zero`` severs the traced chains (the
#: paper's operation); ``reroute`` also steers the residual stream toward the model's own refusal; ``steer`` only
#: steers (the circuit gives the gate's and the steering's layers, nothing is cut); ``none`` for baselines that are
#: not TraceRouter hook sets.
ACTIONS = ("zero", "reroute", "steer", "none")
_TOP_KEYS = {"format_version", "kind", "model", "model_fingerprint", "weights_signature", "architecture", "d_model",
             "n_layers", "n_heads", "d_head", "description", "semantics", "action", "operations", "provenance",
             "tensors_sha256"}


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
        if self.action != "none" and all(op.kind == "prompt_probe" or (op.kind != "direction" and op.scale == 1.0)
                                         for op in self.operations):
            raise TraceCircuitsError(f"{where}: every operation has scale 1 (leaves its activations unchanged), so this "
                                     f"'{self.action}' hook set would change nothing; re-export the hook set")

    def check_model(self, model) -> None:
        """Refuse a model other than the one the hook set was made for (shape first, then identity)."""
        from trace_circuits.models import model_fingerprint, weights_signature

        dims = model_dims(model)
        mine = (self.d_model, self.n_layers, self.n_heads, self.d_head)
        if dims != mine:
            raise TraceCircuitsError(f"hook set was made for {self.model} (d_model, layers, heads, d_head = {mine}), "
                                     f"but this model has {dims}; trace the circuit on this model")
        if model_fingerprint(model) == self.model_fingerprint:
            return
        if self.weights_signature not in (weights_signature(model), weights_signature(model, legacy=True)):
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

        self.validate()  # again: a field changed since loading (a NaN threshold) must not switch the defense off
        return attached(self, model)

    def fwd_hooks(self, model=None) -> list[tuple[str, Callable]]:
        """``[(hook_name, fn)]`` for ``run_with_hooks`` / ``model.hooks(fwd_hooks=...)`` (each forward pass a new
        sequence)."""
        from trace_circuits.hookset.runtime import fwd_hooks

        self.validate()
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

    def behaviour_sha256(self) -> str:
        """SHA-256 of what the hook set computes: each operation's parameters (not its descriptive text) and tensors,
        and the action; unchanged by a new format version, the description or the provenance (a resume key)."""
        h = hashlib.sha256(self.action.encode())
        for i, op in enumerate(self.operations):
            d = {k: v for k, v in op.to_json(i).items() if k not in ("positions", "score")}
            h.update(json.dumps(d, sort_keys=True, default=str).encode())
            for name in sorted(op.tensors):
                h.update(name.encode() + op.tensors[name].detach().float().cpu().contiguous().numpy().tobytes())
        return h.hexdigest()

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
        for key in ("description", "architecture", "semantics", "action"):
            if key in meta and not isinstance(meta[key], str):
                raise TraceCircuitsError(f"{where}: field '{key}' must be a string, got {meta[key]!r}; fix or "
                                         "re-export the hook set")
        arch = meta.get("architecture", "")
        if arch and arch not in architecture_names():
            raise TraceCircuitsError(f"{where}: field 'architecture' is {arch!r}, not one of "
                                     f"{', '.join(architecture_names())} (or empty); fix or re-export the hook set")
        prov = meta.get("provenance", {})
        if not isinstance(prov, dict):
            raise TraceCircuitsError(f"{where}: field 'provenance' must be a JSON object, got {prov!r}; fix or "
                                     "re-export the hook set")
        claimed: set[str] = set()
        ops = []
        for i, d in enumerate(ops_json):
            at = f"{where}, operation {i}"
            own = op_tensors(i, d, tensors, at, claimed)
            ops.append(Operation.from_json(d, own, at))
        try:
            hs = cls(model=meta["model"], model_fingerprint=meta["model_fingerprint"],
                     weights_signature=meta["weights_signature"], d_model=meta.get("d_model"),
                     n_layers=meta.get("n_layers"), n_heads=meta.get("n_heads"), d_head=meta.get("d_head"),
                     operations=ops, provenance=prov, description=meta.get("description", ""),
                     action=meta.get("action", "zero"), architecture=arch)
        except TraceCircuitsError as err:
            msg = str(err)
            raise TraceCircuitsError(where + msg[len("hook set"):] if msg.startswith("hook set") else msg) from None
        for i, (op, d) in enumerate(zip(ops, ops_json)):
            check_twin(op, d, arch, f"{where}, operation {i}")
        unclaimed = sorted(set(tensors) - claimed)
        if unclaimed:
            raise TraceCircuitsError(f"{where}: {TENSORS_FILE} holds tensor(s) {unclaimed[:5]} that no operation "
                                     "names (from another export?); re-export the hook set")
        check_calibration(hs, where)
        return hs

    def save(self, out_dir: str | Path) -> Path:
        """Write ``hookset.json`` + ``tensors.safetensors`` into ``out_dir``: the folder is built beside it, every file
        flushed to disk, then renamed into place; an old hook set there is removed only once the new one is in place.
        ``hookset.json`` records the SHA-256 of the tensors file, so the two files of one export stay together."""
        from safetensors.torch import save_file

        out = Path(out_dir)
        tmp = staging_dir(out)
        try:
            tensors = {f"ops.{i}.{name}": t.detach().float().cpu().contiguous()
                       for i, op in enumerate(self.operations) for name, t in op.tensors.items()}
            save_file(tensors, str(tmp / TENSORS_FILE), metadata={"format": KIND,
                                                                  "format_version": str(FORMAT_VERSION)})
            meta = {**self.to_json(), "tensors_sha256": file_sha256(tmp / TENSORS_FILE)}
            write_json_atomic(tmp / HOOKSET_FILE, meta)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return replace_dir(tmp, out)

    @classmethod
    def load(cls, path: str | Path) -> "HookSet":
        return load_hookset(path)

    def plot(self):
        from trace_circuits.viz import plot_hookset

        return plot_hookset(self)

    def summary(self) -> str:
        n_feat = sum(len(op.features) for op in self.operations if op.kind == "sae_features" and op.scale != 1.0)
        n_read = sum(len(op.features) for op in self.operations if op.kind == "sae_features" and op.scale == 1.0)
        n_heads = sum(len(op.heads) for op in self.operations if op.kind == "heads")
        n_mlp = sum(op.kind == "mlp" for op in self.operations)
        n_dir = sum(op.kind == "direction" for op in self.operations)
        g = self.gate_operation
        mean = {"mean": " (prompt mean)", "turn": " (last user turn mean" + (
            f", and every {g.message_reading} of its message)" if g.message_threshold is not None else ")")}.get(
            g.pool, "") \
            if g is not None else ""
        novel = " (novel tokens)" if g is not None and g.perplexity_tokens == "novel" else ""
        fluency = f", and the model's surprisal of the message{novel}" if g is not None and g.perplexity_window else ""
        parts = [] if g is None else [f"prompt gate at layer {g.layer}{mean}{fluency}" if g.kind == "prompt_probe"
                                      else f"feature gate at layer {g.layer}"]
        cut = [f"{n} {what}" for n, what in ((n_feat, "SAE features"), (n_heads, "heads"), (n_mlp, "MLPs")) if n]
        parts.append("cuts " + ", ".join(cut) if cut else "cuts nothing")
        if n_read:
            parts.append(f"{n_read} SAE features named, left in place")
        if n_dir:
            parts.append(f"steers along {n_dir} directions")
        action = f", action {self.action}" if self.action != "none" else ""
        return f"HookSet for {self.model} ({len(self.operations)} operations{action}): " + "; ".join(parts)

    def __repr__(self) -> str:
        return f"<{self.summary()}>"


def message_coverage(calibration: Optional[dict]) -> str:
    """What a prompt gate's message reading and its fluency reading each caught alone at calibration
    (``provenance["gate_calibration"]``), one phrase; "" where it has neither."""
    g = calibration or {}
    rate = g.get("message_rate_harmful", g.get("prefix_rate_harmful"))  # format 9 wrote prefix_*
    reading = g.get("message_reading", "prefix")
    u = g.get("perplexity") or {}
    fluency = (f"the fluency reading opens past {u['threshold']:.2f} nats of surprisal over {u['window']} "
               f"{'novel ' if u.get('tokens') == 'novel' else ''}message tokens "
               f"({'the benign maximum' if not u.get('rate') else 'its benign rate'}; benign median "
               f"{u['benign_median']:.2f})") if u else ""
    message = "" if rate is None else (f"{rate:.0%} of harmful on the message {reading} reading alone, which an "
                                       "appended suffix cannot lower" + (" once the request ends a sentence"
                                                                         if reading == "sentence" else ""))
    return "; ".join(p for p in (message, fluency) if p)


def load_hookset(path: str | Path) -> HookSet:
    """Load a hook set folder written by :meth:`HookSet.save`, with one-line errors for anything wrong."""
    folder = Path(path)
    if folder.is_file() and folder.name == HOOKSET_FILE:
        folder = folder.parent
    meta_path, tensor_path = folder / HOOKSET_FILE, folder / TENSORS_FILE
    if not meta_path.exists():
        left = leftover_dirs(folder) if not folder.exists() else []
        if left:
            raise TraceCircuitsError(f"{folder} is missing but an interrupted save left the previous hook set in "
                                     f"{left[-1]}; rename it to {folder} or export the hook set again")
        raise TraceCircuitsError(f"{folder} is not a hook set folder (no {HOOKSET_FILE}); export one with "
                                 "`trace-circuits trace`")
    meta = read_json(meta_path, "hook set", "re-export the hook set")
    check_format(meta, KIND, FORMAT_VERSION, str(meta_path), "re-export the hook set")
    if not tensor_path.exists():
        raise TraceCircuitsError(f"{tensor_path} is missing; copy the whole hook set folder")
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    try:
        with safe_open(str(tensor_path), framework="pt") as f:
            header = f.metadata() or {}
        tensors = load_file(str(tensor_path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise TraceCircuitsError(f"{tensor_path} is not a readable safetensors file ({str(err)[:60]}); re-export the "
                                 "hook set") from None
    if header.get("format", KIND) != KIND:
        raise TraceCircuitsError(f"{tensor_path} holds {header['format']!r} tensors, not a hook set's; copy the whole "
                                 "hook set folder of one export")
    hs = HookSet.from_json(meta, tensors, where=str(meta_path))
    want = meta.get("tensors_sha256")
    if want is None and meta.get("format_version", 0) >= 4:
        raise TraceCircuitsError(f"{meta_path}: field 'tensors_sha256' is missing; re-export the hook set")
    if want is not None and (not isinstance(want, str) or file_sha256(tensor_path) != want):
        raise TraceCircuitsError(f"{tensor_path} does not match {meta_path} (its SHA-256 is not the recorded "
                                 "tensors_sha256: the tensors were changed or come from another export); copy both "
                                 "files of one export or re-export the hook set")
    return hs
