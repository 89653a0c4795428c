"""Stage 3 output: a :class:`HookSet` that severs the traced chains at inference, and its export format.

What it does at inference
-------------------------
A hook set is a list of operations, each on one hook point (TransformerLens names; the Hugging Face twin in
brackets, for Llama-architecture models such as SmolLM2):

``sae_features`` at ``blocks.{l}.hook_resid_post`` [output of ``model.layers[l]``]
    Zero out chosen SAE features, keeping the SAE's error term: with the SAE's encoder
    ``a(x) = TopK_k(((x - b_dec) W_enc + b_enc) * ||W_dec||)`` (SAE-Lens TopK with decoder-norm rescaling),
    ``x' = x - (1 - scale) * sum_f [a_f(x) > zero_threshold_f] a_f(x) D_f``,  ``D_f = W_dec[f] / ||W_dec[f]||``.
    Only the feature's own decoder contribution leaves the residual stream; nothing else changes. Positions whose
    residual norm exceeds the SAE's ``massive_norm_threshold`` (attention-sink tokens) are left alone, as in
    training. A ``gate_source`` operation also opens the gate (below) where its gate score
    ``g(x) = sum_f a_f(x) / s_f`` exceeds ``gate_threshold`` (``s_f`` the feature's typical activation on
    harmful prompts, ``gate_scales``).
``heads`` at ``blocks.{l}.attn.hook_z`` [input of ``model.layers[l].self_attn.o_proj``]
    ``z[:, :, h] <- scale * z[:, :, h]`` for the chosen heads (the head's output is removed before ``W_O``).
``mlp`` at ``blocks.{l}.hook_mlp_out`` [output of ``model.layers[l].mlp``]
    ``mlp_out <- scale * mlp_out``.
``direction`` at ``blocks.{l}.hook_resid_post`` [output of ``model.layers[l]``] (used by the baselines)
    ``mode="ablate"``: ``x <- x - <x, r> r`` (r a unit vector, Arditi et al. 2024 direction ablation);
    ``mode="add"``: ``x <- x + alpha r``.
``prompt_probe`` at ``blocks.{l}.hook_resid_post`` [output of ``model.layers[l]``] (a gate, changes nothing)
    At the end of each prompt it scores the request, ``s = <x[p] - mu, r> / gap`` (a linear probe, see
    :mod:`trace_circuits.gate`), and opens the gate for the rest of the sequence if ``s > gate_threshold``. ``p`` is
    the end of the user's turn: the last position where the token ids ``anchor`` (the chat template's assistant
    header) end, so an answer prefilled after the header does not move the decision; without a match, or where the
    token ids are not seen (TransformerLens ``generate`` and ``fwd_hooks``), the last real position.

Positions and gating
--------------------
There are two kinds of gate. The *prompt gate* (a ``prompt_probe`` operation, the default since format version 2)
decides once per sequence, in the first forward pass (the prompt, i.e. the prefill of a generation) at the end of
the user's turn ``p_b`` (normally its last position): gated operations after the probe's layer act from ``p_b`` on,
and every gated operation acts at every position of the later forward passes of the sequence (the generated tokens,
or a continuation fed with the KV cache)::

    gate[b, p] = s_b > gate_threshold   for p >= p_b (layers after the probe) and every later position

With the *feature gate* (a ``gate_source`` SAE operation) a gated operation acts at position ``p`` of a sequence
only once some gate-source feature (the harmful features at the onset layer) has fired, i.e. the gate score passed
``gate_threshold`` at a real (non-padding, non-massive) position ``<= p`` of that sequence, counting earlier
generation steps; gated operations must then sit after the gate's layer. Downstream operations are always gated;
the source features are gated too by default (``gated=False`` makes them zero wherever they are active, as the
influence scores measured):

    gate[b, p] = fired_before[b]  OR  any_{p' <= p} ( sum_f a_f(x[b, p']) / s_f > gate_threshold )

With either gate, where it stays shut the hook set changes nothing; once it opens, the chain is cut for the rest
of the sequence, generated tokens included. The gate state (``fired_before``) is carried
across the decoding steps of one generation (KV cache) and reset on each new prompt (a forward pass with an
empty cache); with :meth:`HookSet.fwd_hooks` (no cache) every forward pass is a new sequence.

Export format
-------------
A folder with ``hookset.json`` (format version, model fingerprint and weight signature, every operation with its
hook point, parameters and tensor shapes, provenance) and ``tensors.safetensors`` (keys ``ops.{i}.{name}``).
Loading reads JSON and safetensors only; nothing is unpickled.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

import torch
from jaxtyping import Bool, Float

from trace_circuits._io import write_json_atomic
from trace_circuits.errors import TraceCircuitsError
from trace_circuits.models import model_info

FORMAT_VERSION = 2  # 2: the prompt_probe gate
HOOKSET_FILE = "hookset.json"
TENSORS_FILE = "tensors.safetensors"
OP_KINDS = ("sae_features", "heads", "mlp", "direction", "prompt_probe")
_SAE_TENSORS = ("W_enc", "b_enc", "b_dec", "dec_norm", "D")


# ----------------------------------------------------------------------------------------------------------
# Operations


@dataclass
class Operation:
    """One intervention at one hook point (see the module docstring for the formulas)."""

    kind: str  # one of OP_KINDS
    layer: int
    gated: bool = True
    scale: float = 0.0  # 0 = zero-out; 1 = no change
    features: list[int] = field(default_factory=list)  # sae_features: SAE latent ids
    zero_thresholds: list[float] = field(default_factory=list)  # sae_features: act where a_f > this
    gate_source: bool = False  # sae_features: firing opens the gate
    gate_scales: list[float] = field(default_factory=list)  # gate source: s_f per feature
    gate_threshold: float = 0.0  # gate source: open where sum_f a_f / s_f (prompt_probe: s) > this
    gap: float = 1.0  # prompt_probe: the harmful-benign mean gap along r (scores are divided by it)
    anchor: list[int] = field(default_factory=list)  # prompt_probe: token ids that end the user turn (see docstring)
    heads: list[int] = field(default_factory=list)  # heads: head indices
    mode: str = "ablate"  # direction: "ablate" or "add"
    alpha: float = 0.0  # direction, mode "add": how far along r
    k: int = 0  # sae_features: the SAE's TopK k
    massive_norm_threshold: Optional[float] = None
    sae: str = ""  # which SAE (provenance)
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def hook_name(self) -> str:
        if self.kind == "heads":
            return f"blocks.{self.layer}.attn.hook_z"
        return f"blocks.{self.layer}.hook_mlp_out" if self.kind == "mlp" else f"blocks.{self.layer}.hook_resid_post"

    @property
    def hf_module(self) -> str:
        if self.kind == "heads":
            return f"model.layers.{self.layer}.self_attn.o_proj"
        return f"model.layers.{self.layer}.mlp" if self.kind == "mlp" else f"model.layers.{self.layer}"

    @property
    def hf_hook(self) -> str:
        return "forward_pre" if self.kind == "heads" else "forward"

    @property
    def label(self) -> str:
        if self.kind == "sae_features":
            return f"L{self.layer} SAE features {self.features}"
        if self.kind == "heads":
            return f"L{self.layer} heads {self.heads}"
        if self.kind == "direction":
            return f"L{self.layer} direction {self.mode}"
        if self.kind == "prompt_probe":
            return f"L{self.layer} prompt gate"
        return f"L{self.layer} MLP"

    def to_json(self, index: int) -> dict:
        positions = ("gate-open positions" if self.gated else
                     "every position where a feature is active (massive-norm positions excluded)")
        if self.kind == "prompt_probe":
            positions = "reads the last prompt position once per sequence; changes nothing"
        d: dict[str, Any] = {"kind": self.kind, "layer": self.layer, "hook_name": self.hook_name,
                             "hf_module": self.hf_module, "hf_hook": self.hf_hook, "gated": self.gated,
                             "scale": self.scale, "positions": positions}
        if self.kind == "sae_features":
            d.update(features=self.features, zero_thresholds=self.zero_thresholds, gate_source=self.gate_source,
                     gate_scales=self.gate_scales, gate_threshold=self.gate_threshold, k=self.k,
                     massive_norm_threshold=self.massive_norm_threshold, sae=self.sae)
        if self.kind == "heads":
            d["heads"] = self.heads
        if self.kind == "direction":
            d.update(mode=self.mode, alpha=self.alpha)
        if self.kind == "prompt_probe":
            d.update(gate_source=True, gate_threshold=self.gate_threshold, gap=self.gap, anchor=self.anchor,
                     score="s = <x[p] - mu, r> / gap at p = the end of the last anchor match (else the last real "
                           "position); the gate opens if s > gate_threshold")
        d["tensors"] = {name: {"key": f"ops.{index}.{name}", "shape": list(t.shape)}
                        for name, t in self.tensors.items()}
        return d

    @classmethod
    def from_json(cls, d: dict, tensors: dict[str, torch.Tensor]) -> "Operation":
        return cls(kind=d["kind"], layer=int(d["layer"]), gated=bool(d.get("gated", True)),
                   scale=float(d.get("scale", 0.0)), features=[int(f) for f in d.get("features", [])],
                   zero_thresholds=[float(t) for t in d.get("zero_thresholds", [])],
                   gate_source=bool(d.get("gate_source", False)),
                   gate_scales=[float(t) for t in d.get("gate_scales", [])],
                   gate_threshold=float(d.get("gate_threshold", 0.0)),
                   heads=[int(h) for h in d.get("heads", [])], k=int(d.get("k", 0)),
                   mode=str(d.get("mode", "ablate")), alpha=float(d.get("alpha", 0.0)),
                   gap=float(d.get("gap", 1.0)), anchor=[int(t) for t in d.get("anchor", [])],
                   massive_norm_threshold=d.get("massive_norm_threshold"), sae=str(d.get("sae", "")),
                   tensors=tensors)


def sae_operation(sae, layer: int, features: Sequence[int], *, gate_source: bool = False, gated: bool = True,
                  zero_thresholds: Optional[Sequence[float]] = None, gate_scales: Optional[Sequence[float]] = None,
                  gate_threshold: float = 1.0,
                  scale: float = 0.0, sae_id: str = "") -> Operation:
    """A ``sae_features`` operation built from an SAE-Lens TopK SAE (encoder copied, decoder rows of ``features``)."""
    arch = getattr(sae.cfg, "architecture", lambda: "")
    arch = arch() if callable(arch) else arch
    if arch != "topk":
        raise TraceCircuitsError(f"hook sets support TopK SAEs (this one is {arch!r}); train one with "
                                 "`trace-circuits train-sae`")
    feats = [int(f) for f in features]
    if not feats:
        raise TraceCircuitsError("an SAE operation needs at least one feature")
    d_sae = int(sae.cfg.d_sae)
    bad = [f for f in feats if not 0 <= f < d_sae]
    if bad:
        raise TraceCircuitsError(f"feature ids {bad} are outside this SAE (0..{d_sae - 1})")
    W_dec = sae.W_dec.detach().float().cpu()
    norm = W_dec.norm(dim=-1)
    rescale = bool(getattr(sae.cfg, "rescale_acts_by_decoder_norm", False))
    apply_b_dec = bool(getattr(sae.cfg, "apply_b_dec_to_input", True))
    b_dec = sae.b_dec.detach().float().cpu()
    D = W_dec[feats] / norm[feats, None] if rescale else W_dec[feats]
    meta = getattr(sae, "trace_circuits_meta", None) or {}
    n = len(feats)
    tensors = {"W_enc": sae.W_enc.detach().float().cpu().contiguous(), "b_enc": sae.b_enc.detach().float().cpu(),
               "b_dec": (b_dec if apply_b_dec else torch.zeros_like(b_dec)).contiguous(),
               "dec_norm": (norm if rescale else torch.ones_like(norm)).contiguous(), "D": D.contiguous()}
    return Operation(kind="sae_features", layer=int(layer), gated=gated, scale=float(scale),
                     features=feats, zero_thresholds=[float(t) for t in (zero_thresholds or [0.0] * n)],
                     gate_source=gate_source, gate_scales=[float(t) for t in (gate_scales or [1.0] * n)]
                     if gate_source else [], gate_threshold=float(gate_threshold), k=int(sae.cfg.k), sae=sae_id,
                     massive_norm_threshold=meta.get("massive_norm_threshold"), tensors=tensors)


def sae_feature_acts(op: Operation, x: Float[torch.Tensor, "... d_model"]) -> Float[torch.Tensor, "... n_features"]:
    """``a_f(x)`` for the operation's features: SAE-Lens TopK encoding, ``relu(pre_f)`` if ``f`` is in the top k."""
    t = op.tensors
    pre = ((x.float() - t["b_dec"]) @ t["W_enc"] + t["b_enc"]) * t["dec_norm"]
    kth = pre.topk(op.k, dim=-1).values[..., -1:]
    sel = pre[..., op.features]
    return torch.where(sel >= kth, sel.relu(), torch.zeros_like(sel))


# ----------------------------------------------------------------------------------------------------------
# The runtime shared by the TransformerLens and the Hugging Face attachment


class _Runtime:
    """Per-forward state: the valid-position mask, the gate, and whether a gate fired earlier in the sequence."""

    def __init__(self, hookset: "HookSet"):
        self.hookset = hookset
        self.has_gate = any(op.gate_source for op in hookset.operations)
        self.fired_before: Optional[torch.Tensor] = None  # [batch] bool
        self.valid: Optional[torch.Tensor] = None  # [batch, pos] bool or None (all valid)
        self.gate: Optional[torch.Tensor] = None  # [batch, pos] bool
        self.stats = {"forwards": 0, "gate_open_positions": 0, "positions": 0}
        self.started_by_call = False
        self.new_sequence = True  # the current forward pass starts a sequence (the prompt gate decides in it)
        self.input_ids: Optional[torch.Tensor] = None  # [batch, pos] token ids of this forward, when seen
        self.prompt_scores: Optional[torch.Tensor] = None  # [batch] the prompt gate's scores of this sequence

    def start(self, attention_mask: Optional[torch.Tensor], new_sequence: bool,
              input_ids: Optional[torch.Tensor] = None) -> None:
        self.stats["forwards"] += 1
        self.gate = None
        self.input_ids = input_ids if isinstance(input_ids, torch.Tensor) and input_ids.dim() == 2 else None
        self.valid = None if attention_mask is None else attention_mask.bool()
        self.new_sequence = new_sequence
        if new_sequence:
            self.fired_before = None
            self.prompt_scores = None

    def _valid_for(self, x: torch.Tensor) -> torch.Tensor:
        B, T = x.shape[:2]
        if self.valid is not None and self.valid.shape[0] == B and self.valid.shape[1] >= T:
            return self.valid[:, -T:].to(x.device)
        return torch.ones(B, T, dtype=torch.bool, device=x.device)

    def _gate_for(self, x: torch.Tensor) -> torch.Tensor:
        B, T = x.shape[:2]
        if not self.has_gate:
            return torch.ones(B, T, dtype=torch.bool, device=x.device)
        if self.gate is None or self.gate.shape != (B, T):
            before = self.fired_before
            if before is None or before.shape[0] != B:
                before = torch.zeros(B, dtype=torch.bool, device=x.device)
            self.gate = before[:, None].expand(B, T).clone()
        return self.gate

    def open_gate(self, fired: Bool[torch.Tensor, "batch pos"]) -> None:
        gate = self._gate_for(fired) | (fired.long().cumsum(1) > 0)
        self.gate = gate
        self.fired_before = gate[:, -1].clone()
        self.stats["gate_open_positions"] += int(gate.sum())
        self.stats["positions"] += int(gate.numel())

    @property
    def gate_open(self) -> Optional[torch.Tensor]:
        """Per sequence of the current batch: has the gate opened so far (None before any forward)."""
        return self.fired_before

    def _where(self, op: Operation, act: torch.Tensor) -> torch.Tensor:
        """[batch, pos] positions where a head / MLP / direction operation acts: the open gate, or everywhere."""
        if op.gated:
            return self._gate_for(act)
        return torch.ones(act.shape[:2], dtype=torch.bool, device=act.device)

    # The operations; each maps a hooked activation to its replacement.

    def sae_features(self, op: Operation, x: torch.Tensor) -> torch.Tensor:
        if op.gated and not op.gate_source and not self._gate_for(x).any():
            return x  # gate shut everywhere: nothing to do (and nothing to compute)
        acts = sae_feature_acts(op, x)  # [B, T, n]
        ok = self._valid_for(x)
        if op.massive_norm_threshold is not None:
            ok = ok & (x.float().norm(dim=-1) <= op.massive_norm_threshold)
        dev = x.device
        if op.gate_source:
            score = (acts / torch.tensor(op.gate_scales, device=dev)).sum(-1)
            self.open_gate((score > op.gate_threshold) & ok)
        act_mask = (acts > torch.tensor(op.zero_thresholds, device=dev)) & ok[..., None]
        if op.gated:
            act_mask = act_mask & self._gate_for(x)[..., None]
        removed = (acts * act_mask) @ op.tensors["D"]
        return (x.float() - (1.0 - op.scale) * removed).to(x.dtype)

    def heads(self, op: Operation, z: torch.Tensor) -> torch.Tensor:
        where = self._where(op, z)
        if not where.any():
            return z
        z = z.clone()
        h = list(op.heads)
        z[:, :, h] = torch.where(where[:, :, None, None], z[:, :, h] * op.scale, z[:, :, h])
        return z

    def mlp(self, op: Operation, m: torch.Tensor) -> torch.Tensor:
        where = self._where(op, m)
        if not where.any():
            return m
        return torch.where(where[..., None], m * op.scale, m)

    def direction(self, op: Operation, x: torch.Tensor) -> torch.Tensor:
        where = self._where(op, x)
        if not where.any():
            return x
        r = op.tensors["r"].to(x.device, torch.float32)
        xf = x.float()
        new = xf - (xf @ r)[..., None] * r if op.mode == "ablate" else xf + op.alpha * r
        return torch.where(where[..., None], new, xf).to(x.dtype)

    def prompt_probe(self, op: Operation, x: torch.Tensor) -> torch.Tensor:
        """Decide the gate once per sequence from the last real prompt position; returns ``x`` unchanged."""
        if not self.new_sequence:
            return x  # later forward passes of the sequence keep the decision
        B, T = x.shape[:2]
        valid = self._valid_for(x)
        pos = torch.arange(T, device=x.device)
        last = torch.where(valid, pos, torch.full_like(pos, -1)).max(1).values.clamp(min=0)  # [B]
        ids, n = self.input_ids, len(op.anchor)
        if n and ids is not None and tuple(ids.shape) == (B, T) and T >= n:
            windows = ids.to(x.device).unfold(1, n, 1)  # [B, T - n + 1, n]
            hit = (windows == torch.tensor(op.anchor, device=x.device)).all(-1) & valid[:, n - 1:]
            end = torch.where(hit, pos[n - 1:], torch.full_like(pos[n - 1:], -1)).max(1).values
            last = torch.where(end >= 0, end, last)
        t = op.tensors
        h = x[torch.arange(B, device=x.device), last].float()
        score = ((h - t["mu"].to(x.device)) @ t["r"].to(x.device)) / op.gap
        fired = score > op.gate_threshold
        self.gate = (pos[None, :] >= last[:, None]) & fired[:, None]
        self.fired_before = fired.clone()
        self.prompt_scores = score.detach().cpu()
        self.new_sequence = False
        self.stats["gate_open_positions"] += int(self.gate.sum())
        self.stats["positions"] += B * T
        return x

    def apply(self, op: Operation, act: torch.Tensor) -> torch.Tensor:
        return getattr(self, op.kind)(op, act)


# ----------------------------------------------------------------------------------------------------------
# The hook set


@dataclass
class HookSet:
    """A pruned set of interventions for one model; attach it to a HookedTransformer or a transformers model."""

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

    def __post_init__(self):
        self.validate()

    # -- checks ------------------------------------------------------------------------------------------

    def validate(self) -> None:
        """Shapes and parameters of every operation; gated operations must come after every gate source."""
        if not self.operations:
            raise TraceCircuitsError("a hook set needs at least one operation")
        gate_layers = [op.layer for op in self.operations if op.gate_source and op.kind == "sae_features"]
        probes = [op for op in self.operations if op.kind == "prompt_probe"]
        if probes and (len(probes) > 1 or gate_layers):
            raise TraceCircuitsError("a hook set has one gate: either one prompt_probe or gate-source SAE features")
        if probes:
            gate_layers = []  # the prompt gate decides before the generated tokens: gated operations may sit anywhere
        for i, op in enumerate(self.operations):
            where = f"operation {i} ({op.kind})"
            if op.kind not in OP_KINDS:
                raise TraceCircuitsError(f"{where}: unknown kind; expected one of {', '.join(OP_KINDS)}")
            if not 0 <= op.layer < self.n_layers:
                raise TraceCircuitsError(f"{where}: layer {op.layer} is outside the model (0..{self.n_layers - 1})")
            if op.gated and not op.gate_source and gate_layers and op.layer <= max(gate_layers):
                raise TraceCircuitsError(f"{where}: a gated operation at layer {op.layer} must come after the gate "
                                         f"layer {max(gate_layers)}; set gated=False or move it")
            if op.gated and not gate_layers and not probes:
                op.gated = False  # no gate source: the operation acts everywhere (documented)
            if op.kind == "heads":
                if not op.heads or any(not 0 <= h < self.n_heads for h in op.heads):
                    raise TraceCircuitsError(f"{where}: head ids {op.heads} must be in 0..{self.n_heads - 1}")
            if op.kind == "sae_features":
                self._check_sae_tensors(op, where)
            if op.kind == "direction":
                r = op.tensors.get("r")
                if r is None or tuple(r.shape) != (self.d_model,):
                    raise TraceCircuitsError(f"{where}: needs a tensor r of shape ({self.d_model},); re-export it")
                if op.mode not in ("ablate", "add"):
                    raise TraceCircuitsError(f"{where}: mode must be 'ablate' or 'add', not {op.mode!r}")
            if op.kind == "prompt_probe":
                op.gate_source, op.gated = True, False
                for name in ("r", "mu"):
                    v = op.tensors.get(name)
                    if v is None or tuple(v.shape) != (self.d_model,):
                        raise TraceCircuitsError(f"{where}: needs a tensor {name} of shape ({self.d_model},); "
                                                 "re-export the hook set")
                if not op.gap > 0:
                    raise TraceCircuitsError(f"{where}: gap must be > 0, got {op.gap}")

    def _check_sae_tensors(self, op: Operation, where: str) -> None:
        missing = [n for n in _SAE_TENSORS if n not in op.tensors]
        if missing:
            raise TraceCircuitsError(f"{where}: tensors {missing} are missing from {TENSORS_FILE}; re-export the "
                                     "hook set")
        d_sae = op.tensors["W_enc"].shape[-1]
        n = len(op.features)
        expect = {"W_enc": (self.d_model, d_sae), "b_enc": (d_sae,), "b_dec": (self.d_model,),
                  "dec_norm": (d_sae,), "D": (n, self.d_model)}
        for name, shape in expect.items():
            if tuple(op.tensors[name].shape) != shape:
                raise TraceCircuitsError(f"{where}: tensor {name} has shape {tuple(op.tensors[name].shape)}, "
                                         f"expected {shape}; the file is damaged or made for another model")
        if n == 0 or len(op.zero_thresholds) != n or (op.gate_source and len(op.gate_scales) != n):
            raise TraceCircuitsError(f"{where}: needs one zero threshold (and gate scale) per feature")
        if op.gate_source and any(not v > 0 for v in op.gate_scales):
            raise TraceCircuitsError(f"{where}: gate scales must be > 0")
        if any(not 0 <= f < d_sae for f in op.features):
            raise TraceCircuitsError(f"{where}: feature ids must be in 0..{d_sae - 1}")
        if not 0 < op.k <= d_sae:
            raise TraceCircuitsError(f"{where}: k={op.k} must be in 1..{d_sae}")

    def check_model(self, model) -> None:
        """Refuse a model other than the one the hook set was made for (shape first, then identity)."""
        from trace_circuits.models import model_fingerprint, weights_signature

        dims = _model_dims(model)
        mine = (self.d_model, self.n_layers, self.n_heads, self.d_head)
        if dims != mine:
            raise TraceCircuitsError(
                f"hook set was made for {self.model} (d_model, layers, heads, d_head = {mine}), but this model has "
                f"{dims}; trace the circuit on this model")
        fp = model_fingerprint(model)
        if fp is not None and fp == self.model_fingerprint:
            return
        if weights_signature(model) != self.weights_signature:
            raise TraceCircuitsError(f"hook set was made for model {self.model_fingerprint}, not "
                                     f"{fp or 'this model'}; trace the circuit on this model")

    @property
    def source_operation(self) -> Optional[Operation]:
        """The SAE operation on the circuit's source features: the feature gate's source, else the lowest-layer
        ``sae_features`` operation (None if there is none)."""
        sae_ops = [op for op in self.operations if op.kind == "sae_features"]
        return next((op for op in sae_ops if op.gate_source), min(sae_ops, key=lambda o: o.layer, default=None))

    @property
    def gate_operation(self) -> Optional[Operation]:
        """The operation that opens the gate (a ``prompt_probe`` or a gate-source SAE operation), if any."""
        return next((op for op in self.operations if op.gate_source), None)

    # -- attaching ---------------------------------------------------------------------------------------

    def fwd_hooks(self, model=None) -> list[tuple[str, Callable]]:
        """``[(hook_name, fn)]`` for ``HookedTransformer.run_with_hooks`` / ``model.hooks(fwd_hooks=...)``.

        Each forward pass is a new sequence (use :meth:`attach` for generation with a KV cache).
        """
        if model is not None:
            self.check_model(model)
        rt = _Runtime(self)

        def reset(act, hook):
            rt.start(None, new_sequence=True)
            return None

        hooks: list[tuple[str, Callable]] = [("hook_embed", reset)]
        for op in self.operations:
            hooks.append((op.hook_name, lambda act, hook, op=op: rt.apply(op, act)))
        return hooks

    @contextlib.contextmanager
    def attach(self, model) -> Iterator["_Runtime"]:
        """Attach to a ``HookedTransformer`` or a transformers causal LM for the ``with`` block.

        Works with generation: the gate state is carried across KV-cache decoding steps and reset per prompt.
        Yields the runtime (``.stats`` counts forwards and gate-open positions).
        """
        self.check_model(model)
        rt = _Runtime(self)
        handles = []
        with contextlib.ExitStack() as stack:
            stack.callback(lambda: [h.remove() for h in handles])
            if _is_hooked_transformer(model):
                # TransformerLens's own context manager adds the hooks and removes exactly these on exit.
                handles.append(model.register_forward_pre_hook(_tl_start(rt), with_kwargs=True))
                fwd = [("hook_embed", _tl_embed_start(rt))]
                fwd += [(op.hook_name, lambda act, hook, op=op: rt.apply(op, act)) for op in self.operations]
                stack.enter_context(model.hooks(fwd_hooks=fwd))
            else:
                _check_hf_arch(model)
                handles.append(model.register_forward_pre_hook(_hf_start(rt), with_kwargs=True))
                for op in self.operations:
                    module = model.get_submodule(op.hf_module)
                    if op.hf_hook == "forward_pre":
                        handles.append(module.register_forward_pre_hook(_hf_pre(rt, op, self.n_heads, self.d_head)))
                    else:
                        handles.append(module.register_forward_hook(_hf_post(rt, op)))
            yield rt

    # -- persistence -------------------------------------------------------------------------------------

    def to_json(self) -> dict:
        return {"format_version": FORMAT_VERSION, "kind": "trace-circuits hook set", "model": self.model,
                "model_fingerprint": self.model_fingerprint, "weights_signature": self.weights_signature,
                "d_model": self.d_model, "n_layers": self.n_layers, "n_heads": self.n_heads, "d_head": self.d_head,
                "description": self.description,
                "semantics": "see trace_circuits.hooks module docstring: sae_features subtract a_f(x) D_f; heads "
                             "and mlp multiply by scale; gated operations act once a gate-source feature fired "
                             "earlier in the sequence",
                "operations": [op.to_json(i) for i, op in enumerate(self.operations)],
                "provenance": self.provenance}

    def save(self, out_dir: str | Path) -> Path:
        """Write ``hookset.json`` + ``tensors.safetensors`` into ``out_dir`` (replaced as a whole, atomically)."""
        from safetensors.torch import save_file

        out = Path(out_dir)
        tmp = out.with_name(out.name + f".tmp{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        tensors = {f"ops.{i}.{name}": t.detach().float().cpu().contiguous()
                   for i, op in enumerate(self.operations) for name, t in op.tensors.items()}
        save_file(tensors, str(tmp / TENSORS_FILE), metadata={"format": "trace-circuits hook set",
                                                              "format_version": str(FORMAT_VERSION)})
        write_json_atomic(tmp / HOOKSET_FILE, self.to_json())
        if out.exists():
            old = out.with_name(out.name + f".old{os.getpid()}")
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            out.parent.mkdir(parents=True, exist_ok=True)
            os.replace(tmp, out)
        return out

    @classmethod
    def load(cls, path: str | Path) -> "HookSet":
        """Read a hook set folder (JSON + safetensors; never unpickles)."""
        return load_hookset(path)

    def summary(self) -> str:
        n_feat = sum(len(op.features) for op in self.operations if op.kind == "sae_features")
        n_heads = sum(len(op.heads) for op in self.operations if op.kind == "heads")
        n_mlp = sum(op.kind == "mlp" for op in self.operations)
        n_dir = sum(op.kind == "direction" for op in self.operations)
        g = self.gate_operation
        gate = ("" if g is None else f"; prompt gate at layer {g.layer}" if g.kind == "prompt_probe"
                else f"; feature gate at layer {g.layer}")
        return (f"HookSet for {self.model}: {len(self.operations)} operations ({n_feat} SAE features, {n_heads} "
                f"heads, {n_mlp} MLPs" + (f", {n_dir} directions" if n_dir else "") + gate + ")")

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
    try:
        meta = json.loads(meta_path.read_text())
    except ValueError as err:
        raise TraceCircuitsError(f"{meta_path} is not valid JSON ({err}); re-export the hook set")
    if not isinstance(meta, dict) or meta.get("kind") != "trace-circuits hook set":
        raise TraceCircuitsError(f"{meta_path} is not a trace-circuits hook set; re-export it")
    version = meta.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise TraceCircuitsError(f"{meta_path} has format version {version!r}, newer than this trace-circuits "
                                 f"reads ({FORMAT_VERSION}); upgrade trace-circuits")
    if not tensor_path.exists():
        raise TraceCircuitsError(f"{tensor_path} is missing; copy the whole hook set folder")
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(tensor_path))
    except (SafetensorError, OSError, ValueError) as err:
        raise TraceCircuitsError(f"{tensor_path} is not a readable safetensors file ({err}); re-export the hook set")
    try:
        ops = []
        for i, d in enumerate(meta["operations"]):
            own = {}
            for name, spec in d.get("tensors", {}).items():
                key = spec["key"]
                if key not in tensors:
                    raise TraceCircuitsError(f"tensor {key} is missing from {tensor_path}; re-export the hook set")
                if list(tensors[key].shape) != list(spec["shape"]):
                    raise TraceCircuitsError(f"tensor {key} has shape {list(tensors[key].shape)} but "
                                             f"{HOOKSET_FILE} says {spec['shape']}; re-export the hook set")
                own[name] = tensors[key].float()
            ops.append(Operation.from_json(d, own))
        return HookSet(model=meta["model"], model_fingerprint=meta["model_fingerprint"],
                       weights_signature=meta["weights_signature"], d_model=int(meta["d_model"]),
                       n_layers=int(meta["n_layers"]), n_heads=int(meta["n_heads"]), d_head=int(meta["d_head"]),
                       operations=ops, provenance=meta.get("provenance", {}), description=meta.get("description", ""))
    except KeyError as err:
        raise TraceCircuitsError(f"{meta_path} lacks the field {err}; re-export the hook set")


# ----------------------------------------------------------------------------------------------------------
# Attachment helpers


def _is_hooked_transformer(model) -> bool:
    return hasattr(model, "hook_dict") and hasattr(model, "cfg") and hasattr(model, "blocks")


def _model_dims(model) -> tuple[int, int, int, int]:
    if _is_hooked_transformer(model):
        c = model.cfg
        return (int(c.d_model), int(c.n_layers), int(c.n_heads), int(c.d_head))
    c = getattr(model, "config", None)
    if c is None:
        raise TraceCircuitsError("attach a hook set to a HookedTransformer or a transformers causal LM")
    n_heads = int(c.num_attention_heads)
    d_head = int(getattr(c, "head_dim", None) or c.hidden_size // n_heads)
    return (int(c.hidden_size), int(c.num_hidden_layers), n_heads, d_head)


def _check_hf_arch(model) -> None:
    from trace_circuits.architectures import architecture_of

    architecture_of(model)


def _tl_start(rt: _Runtime):
    """Module pre-hook: sees the call's arguments (KV cache, attention mask) when the model is called."""

    def pre(module, args, kwargs):
        cache = kwargs.get("past_kv_cache")
        new = cache is None or cache.entries[0].past_keys.shape[1] == 0
        tokens = args[0] if args else kwargs.get("input")
        rt.start(kwargs.get("attention_mask"), new_sequence=new, input_ids=tokens)
        rt.started_by_call = kwargs.get("start_at_layer") is None  # hook_embed runs only from the embedding
        return None

    return pre


def _tl_embed_start(rt: _Runtime):
    """``hook_embed``: TransformerLens's ``generate`` calls ``forward`` directly (no module pre-hook); then a
    forward over more than one position (or a new batch size) starts a new sequence and a single position
    continues the previous one (a KV-cache decoding step)."""

    def hook(act, hook):
        if rt.started_by_call:
            rt.started_by_call = False
            return None
        before = rt.fired_before
        rt.start(None, new_sequence=act.shape[1] > 1 or before is None or before.shape[0] != act.shape[0])
        return None

    return hook


def _hf_start(rt: _Runtime):
    def pre(module, args, kwargs):
        cache = kwargs.get("past_key_values")
        new = cache is None or cache.get_seq_length() == 0
        ids = kwargs.get("input_ids", args[0] if args else None)
        rt.start(kwargs.get("attention_mask"), new_sequence=new, input_ids=ids)
        return None

    return pre


def _hf_post(rt: _Runtime, op: Operation):
    def post(module, args, output):
        if isinstance(output, tuple):
            return (rt.apply(op, output[0]),) + tuple(output[1:])
        return rt.apply(op, output)

    return post


def _hf_pre(rt: _Runtime, op: Operation, n_heads: int, d_head: int):
    def pre(module, args):
        x = args[0]
        z = x.reshape(*x.shape[:-1], n_heads, d_head)
        return (rt.apply(op, z).reshape(x.shape),) + tuple(args[1:])

    return pre


# ----------------------------------------------------------------------------------------------------------
# From a traced circuit to a hook set


@torch.inference_mode()
def prompt_feature_acts(model, op: Operation, prompts, batch_size: int = 16, chat: Optional[bool] = None,
                        progress: bool = False) -> list[torch.Tensor]:
    """``a_f(x[p])`` of a ``sae_features`` operation's features at every real position of each templated prompt
    (what the gate sees at inference; massive-norm positions are 0). One [n_positions, n_features] per prompt."""
    from tqdm.auto import tqdm

    from trace_circuits.prompts import encode_prompts, iter_batches

    enc = encode_prompts(model, prompts, chat=chat)
    device = next(model.parameters()).device
    op_dev = Operation(**{**vars(op), "tensors": {k: v.to(device) for k, v in op.tensors.items()}})
    out: list = [None] * len(enc)
    limit = op.massive_norm_threshold if op.massive_norm_threshold is not None else float("inf")
    n_batches = (len(enc) + batch_size - 1) // batch_size
    for b in tqdm(iter_batches(enc, batch_size, device), total=n_batches, desc="gate calibration",
                  disable=not progress):
        x = model(b.tokens, attention_mask=b.attention_mask, stop_at_layer=op.layer + 1).float()
        ok = b.attention_mask.bool() & (x.norm(dim=-1) <= limit)
        acts = (sae_feature_acts(op_dev, x) * ok[..., None]).cpu()
        for r, i in enumerate(b.indices):
            out[i] = acts[r, b.n_pad[r]:]
    return out


def gate_scores(acts: Sequence[torch.Tensor], scales: Sequence[float]) -> torch.Tensor:
    """A prompt's gate score ``max_p sum_f a_f(x[p]) / s_f`` (the gate opens on it when this exceeds the threshold)."""
    s = torch.tensor(list(scales))
    return torch.stack([(a / s).sum(-1).max() for a in acts])


def calibrate_gate(model, op: Operation, harmful, benign, benign_gate_rate: float = 0.02, batch_size: int = 16,
                   chat: Optional[bool] = None, progress: bool = False, benign_text: Optional[Sequence[str]] = None
                   ) -> dict:
    """Set a gate-source operation's ``gate_scales`` and ``gate_threshold`` (in place) from prompts.

    ``s_f`` = mean over harmful prompts of ``max_p a_f`` (features silent on every harmful prompt get their
    largest activation anywhere); ``gate_threshold`` = the smallest benign gate score that leaves the gate shut on
    all but ``benign_gate_rate`` of the benign sequences: the benign prompts plus any ``benign_text`` (raw text such
    as documents or answers, read without the chat template; the gate also sees generated text). Returns the rates
    measured on these sequences.
    """
    if not 0 <= benign_gate_rate < 1:
        raise TraceCircuitsError(f"benign_gate_rate must be in [0, 1), got {benign_gate_rate!r}")
    Ha = prompt_feature_acts(model, op, harmful, batch_size, chat, progress)
    Ba = prompt_feature_acts(model, op, benign, batch_size, chat, progress)
    n_text = 0
    if benign_text:
        Ta = prompt_feature_acts(model, op, list(benign_text), batch_size, False, progress)
        n_text = len(Ta)
        Ba = Ba + Ta
    Hm = torch.stack([a.max(0).values for a in Ha])
    Bm = torch.stack([a.max(0).values for a in Ba])
    s = Hm.mean(0)
    s = torch.where(s > 0, s, torch.maximum(Hm.max(0).values, Bm.max(0).values).clamp_min(1e-6))
    op.gate_scales = [float(v) for v in s]
    h_score, b_score = gate_scores(Ha, op.gate_scales), gate_scores(Ba, op.gate_scales)
    q = torch.quantile(b_score, 1.0 - benign_gate_rate, interpolation="higher") if benign_gate_rate > 0 \
        else b_score.max()
    op.gate_threshold = float(max(q.item(), 1e-6))
    auroc = float((h_score[:, None] > b_score[None, :]).float().mean()
                  + 0.5 * (h_score[:, None] == b_score[None, :]).float().mean())
    return {"benign_gate_rate_target": benign_gate_rate, "gate_threshold": op.gate_threshold,
            "gate_rate_harmful": float((h_score > op.gate_threshold).float().mean()),
            "gate_rate_benign": float((b_score > op.gate_threshold).float().mean()),
            "gate_score_auroc": auroc, "n_harmful": len(Ha), "n_benign": len(Ba) - n_text, "n_benign_text": n_text,
            "rule": "the gate opens at the first position p with sum_f a_f(x[p]) / s_f > gate_threshold; s_f = mean "
                    "over harmful prompts of max_p a_f; gate_threshold = the (1 - rate) quantile of the benign "
                    "prompts' max_p sum_f a_f / s_f"}


def hookset_from_circuit(circuit, model, saes: dict, harmful, benign, *, nodes: Optional[Sequence[str]] = None,
                         benign_gate_rate: float = 0.02, gated_sources: bool = True, chat: Optional[bool] = None,
                         progress: bool = False, provenance: Optional[dict] = None,
                         benign_text: Optional[Sequence[str]] = None, gate: str = "prompt",
                         gate_layer: Optional[int] = None) -> HookSet:
    """The hook set that suppresses ``nodes`` (default: the circuit's severed nodes) of a traced circuit.

    Source features become one ``sae_features`` operation at the onset layer; downstream SAE features, heads and
    MLPs become gated operations grouped per layer. ``saes`` maps layer -> SAE (as used for tracing).
    The gate, calibrated on ``harmful``/``benign`` prompts plus ``benign_text`` to open on at most
    ``benign_gate_rate`` of the benign ones: ``gate="prompt"`` (default) a ``prompt_probe`` at ``gate_layer``
    (default: the onset layer) that decides at the end of the prompt (:func:`trace_circuits.gate.fit_prompt_gate`); ``gate="features"`` the source features themselves, at every position
    (:func:`calibrate_gate`).
    """
    if gate not in ("prompt", "features"):
        raise TraceCircuitsError(f"gate must be 'prompt' or 'features', not {gate!r}")
    from trace_circuits.models import model_fingerprint, weights_signature

    nmap = circuit.node_map
    chosen = list(nodes) if nodes is not None else [n.id for n in circuit.severed_nodes]
    unknown = [k for k in chosen if k not in nmap]
    if unknown:
        raise TraceCircuitsError(f"nodes {unknown[:5]} are not in the circuit")
    picked = [nmap[k] for k in chosen if nmap[k].kind != "readout"]
    srcs = [n for n in picked if n.kind == "source"]
    if not srcs:
        raise TraceCircuitsError("a hook set needs at least one source feature (the gate); sever the sources")
    onset = srcs[0].layer
    ops: list[Operation] = []

    def sae_for(layer):
        if layer not in saes:
            raise TraceCircuitsError(f"no SAE for layer {layer}; pass saes={{{layer}: SAE, ...}}")
        return saes[layer]

    name = model_info(model).name
    by_feature_gate = gate == "features"
    src_op = sae_operation(sae_for(onset), onset, [n.index for n in srcs], gate_source=by_feature_gate,
                           gated=gated_sources, sae_id=f"{name}/blocks.{onset}.hook_resid_post")
    if by_feature_gate:
        calib = calibrate_gate(model, src_op, harmful, benign, benign_gate_rate, chat=chat, progress=progress,
                               benign_text=benign_text)
        calib["gate"] = "features"
    else:
        if gate_layer is None:
            gate_layer = onset  # the sensitive onset layer, where harmful and benign prompts split
        from trace_circuits.gate import fit_prompt_gate

        probe, calib = fit_prompt_gate(model, harmful, benign, gate_layer, benign_gate_rate, chat=chat,
                                       benign_text=benign_text, progress=progress)
        ops.append(probe)
    ops.append(src_op)
    by_layer: dict[tuple[str, int], list] = {}
    for n in picked:
        if n.kind != "source":
            by_layer.setdefault((n.kind, n.layer), []).append(n)
    for (kind, layer), group in sorted(by_layer.items(), key=lambda kv: (kv[0][1], kv[0][0])):  # probe first
        if kind == "feature":
            ops.append(sae_operation(sae_for(layer), layer, [n.index for n in group], gated=True,
                                     sae_id=f"{name}/blocks.{layer}.hook_resid_post"))
        elif kind == "head":
            ops.append(Operation(kind="heads", layer=layer, heads=sorted(n.index for n in group)))
        else:
            ops.append(Operation(kind="mlp", layer=layer))
    prov = {"circuit_nodes": [n.id for n in picked], "gate_calibration": calib,
            "onset_layer": onset, **{k: circuit.meta.get(k) for k in ("model", "readout_definition", "n_prompts")},
            **(provenance or {})}
    c = model.cfg
    return HookSet(model=name, model_fingerprint=model_fingerprint(model), weights_signature=weights_signature(model),
                   d_model=c.d_model, n_layers=c.n_layers, n_heads=c.n_heads, d_head=c.d_head, operations=ops,
                   provenance=prov, description=f"TraceRouter suppression of {len(picked)} circuit nodes")
