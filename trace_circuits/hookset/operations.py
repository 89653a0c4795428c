"""One intervention at one hook point: what a hook set is made of.

Kinds (TransformerLens hook points; the transformers twin of each comes from :mod:`trace_circuits.architectures`):

``sae_features`` at ``hook`` (default ``blocks.{l}.hook_resid_post``)
    Remove chosen SAE features' decoder contributions, keeping the SAE's error term:
    ``x' = x - (1 - scale) sum_f [a_f(x) > zero_threshold_f] a_f(x) D_f s(x)`` with ``a_f`` SAE-Lens's own ``encode``
    for the SAE's architecture (standard, JumpReLU, TopK; :class:`~trace_circuits.saes.encoding.FeatureEncoder`).
    Positions whose residual norm exceeds ``massive_norm_threshold`` (attention sinks) are left alone. With
    ``gate_source`` the summed ``a_f / s_f`` (``gate_scales``) opens the feature gate where it passes
    ``gate_threshold``.
``heads`` at ``blocks.{l}.attn.hook_z``
    ``z[:, :, h] <- scale * z[:, :, h]`` for the chosen heads (the head's output is removed before ``W_O``).
``mlp`` at ``blocks.{l}.hook_mlp_out``
    ``mlp_out <- scale * mlp_out``.
``direction`` at ``blocks.{l}.hook_resid_post``
    ``mode="ablate"``: ``x <- x - <x, r> r`` (Arditi et al. 2024); ``mode="add"``: ``x <- x + alpha r``, the
    steering a ``reroute`` or ``steer`` hook set adds once its gate opens (``r`` the model's refusal direction).
``prompt_probe`` at ``blocks.{l}.hook_resid_post`` (the prompt gate; changes nothing)
    Once per sequence, at the end of the user's turn ``p`` (the last position where the token ids ``anchor`` end,
    else the last real position): ``s = <h - mu, r> / gap``; the gate opens for the rest of the sequence if
    ``s > gate_threshold``. ``pool="last"``: ``h = x[p]``; ``pool="mean"``: ``h = mean_{q in Q} x[q]`` over the
    prompt up to ``p``, ``Q = {q : first real < q <= p, |x[q]| <= massive_norm_threshold}`` (the first token and
    attention-sink positions left out), so the probe reads the whole request, not only where its framing ends;
    ``pool="turn"``: the same mean over the last user turn only (``q`` after the last match of the token ids
    ``opener`` that ends before ``p``; the whole prompt where none is found), so neither the system prompt nor
    earlier turns of a conversation dilute the request.
    With ``message_threshold`` (``pool="turn"`` only) it also opens if some stretch of the user's message alone
    passes that threshold: ``m = max_{a < t} <mean_{q in M, a < q <= t} x[q] - mu, r> / gap`` over ``t in M`` and
    spans of at least ``message_min_tokens`` positions of ``M`` (``message_reading="span"``; ``"prefix"``, hook sets
    of format 9: running means from the message's start only), ``M`` the turn's positions before the ``anchor``
    match (:func:`~trace_circuits.activations.message_span_max`); tokens appended to a message cannot lower ``m``
    (causal attention), so an adversarial suffix cannot shut this reading, and a span can skip a preamble.
    ``message_reading="sentence"`` (format 11): whole sentences only, spans that start at ``M``'s start or after a
    token in ``message_boundary`` (ids whose text holds ``. ? ! :`` or a newline) and end at one or at ``M``'s last
    position, at least ``min(message_min_tokens, |M|)`` long; a few candidates per message, so the benign threshold
    sits lower and a request behind a preamble of rules or a role is read on its own; a suffix cannot lower it once
    the message ends a sentence (the spans up to that mark stay candidates).
    With ``perplexity_window`` (format 12) it also opens, from the sequence's next forward pass on, if the model's own
    surprisal of the message passes ``perplexity_threshold`` (:mod:`trace_circuits.perplexity`); format 13 records
    ``perplexity_tokens``, ``"novel"`` to score the message's first occurrences only (older files: ``"all"``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from trace_circuits.activations import MESSAGE_READINGS
from trace_circuits.errors import TraceCircuitsError
from trace_circuits.names import hook_name as make_hook_name
from trace_circuits.perplexity import SCORED_TOKENS
from trace_circuits.names import parse_hook
from trace_circuits.hookset.fields import REQUIRED, FieldReader
from trace_circuits.saes.encoding import ARCHITECTURES, NORMALIZATIONS, FeatureEncoder

OP_KINDS = ("sae_features", "heads", "mlp", "direction", "prompt_probe")
DIRECTION_MODES = ("ablate", "add")
PROBE_POOLS = ("last", "mean", "turn")  # prompt_probe: what it reads (module docstring)
_SAE_TENSORS = {"standard": ("W_enc", "b_enc", "b_dec", "D"), "jumprelu": ("W_enc", "b_enc", "b_dec", "D",
                                                                          "threshold"),
                "topk": ("W_enc", "b_enc", "b_dec", "dec_norm", "D")}
#: JSON fields each kind may carry (beyond kind, layer, gated, scale, hook_name and the descriptive ones).
_FIELDS = {
    "sae_features": {"features", "zero_thresholds", "gate_source", "gate_scales", "gate_threshold", "k",
                     "architecture", "normalize", "massive_norm_threshold", "sae"},
    "heads": {"heads"}, "mlp": set(), "direction": {"mode", "alpha"},
    "prompt_probe": {"gate_source", "gate_threshold", "gap", "anchor", "score", "pool", "massive_norm_threshold",
                     "opener", "message_threshold", "message_min_tokens",
                     "message_reading", "message_boundary", "prefix_threshold", "prefix_min_tokens",
                     "perplexity_window", "perplexity_threshold", "perplexity_tokens"},
}
_COMMON = {"kind", "layer", "hook_name", "gated", "scale", "positions", "hf_module", "hf_hook", "tensors"}
#: Tensors each kind carries (``sae_features``: per architecture, :data:`_SAE_TENSORS`).
_TENSORS = {"heads": (), "mlp": (), "direction": ("r",), "prompt_probe": ("r", "mu")}
#: Hook points an SAE operation may act at (``blocks.L.hook_<kind>``).
SAE_HOOK_KINDS = ("resid_post", "resid_pre", "resid_mid", "mlp_out", "attn_out")
#: ``direction`` / ``prompt_probe`` vectors are unit vectors (the formulas assume it); this much off is damage.
UNIT_TOLERANCE = 1e-3
#: The largest steering step |alpha r|: float16's largest finite number (a model may run in float16).
MAX_STEP = 65504.0


@dataclass
class Operation:
    """One intervention at one hook point (formulas in the module docstring)."""

    kind: str
    layer: int
    gated: bool = True
    scale: float = 0.0  # 0 = zero-out; 1 = no change
    features: list[int] = field(default_factory=list)  # sae_features: SAE latent ids
    zero_thresholds: list[float] = field(default_factory=list)  # sae_features: act where a_f > this
    gate_source: bool = False  # feature gate (sae_features) or prompt gate (prompt_probe)
    gate_scales: list[float] = field(default_factory=list)  # feature gate: s_f per feature
    gate_threshold: float = 0.0  # the gate opens where its score passes this
    gap: float = 1.0  # prompt_probe: scores are divided by it
    anchor: list[int] = field(default_factory=list)  # prompt_probe: token ids that end the user turn
    pool: str = "last"  # prompt_probe: "last" (x[p]), "mean" (the prompt's mean up to p) or "turn" (its last turn's)
    opener: list[int] = field(default_factory=list)  # prompt_probe "turn": token ids that open a user turn
    message_threshold: Optional[float] = None  # prompt_probe "turn": also open if a span of the message passes it
    message_min_tokens: int = 1  # prompt_probe: spans of at least this many message tokens
    message_reading: str = "span"  # prompt_probe: "span" (any stretch), "prefix" (format 9) or "sentence"
    message_boundary: list[int] = field(default_factory=list)  # prompt_probe "sentence": ids that end a sentence
    perplexity_window: int = 0  # prompt_probe: the fluency reading's window (0: no fluency reading)
    perplexity_threshold: Optional[float] = None  # prompt_probe: open if the message's surprisal passes it
    perplexity_tokens: str = "novel"  # prompt_probe: the message positions it scores, "all" or "novel" (format 13)
    heads: list[int] = field(default_factory=list)  # heads: head indices
    mode: str = "ablate"  # direction: "ablate" or "add"
    alpha: float = 0.0  # direction "add": how far along r
    architecture: str = "topk"  # sae_features: the SAE's inference architecture
    k: int = 0  # sae_features (topk): active latents per token
    normalize: str = "none"  # sae_features: the SAE's input normalisation
    massive_norm_threshold: Optional[float] = None
    sae: str = ""  # which SAE (provenance)
    hook: str = ""  # sae_features: the hook point the SAE reads (default blocks.{layer}.hook_resid_post)
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def hook_name(self) -> str:
        if self.kind == "sae_features" and self.hook:
            return self.hook
        return make_hook_name({"heads": "z", "mlp": "mlp_out"}.get(self.kind, "resid_post"), self.layer)

    @property
    def encoder(self) -> FeatureEncoder:
        return FeatureEncoder(self.architecture, self.features, self.tensors, self.k, self.normalize)

    @property
    def label(self) -> str:
        return {"sae_features": f"L{self.layer} SAE features {self.features}", "heads": f"L{self.layer} heads "
                f"{self.heads}", "direction": f"L{self.layer} direction {self.mode}", "prompt_probe":
                f"L{self.layer} prompt gate", "mlp": f"L{self.layer} MLP"}.get(self.kind, self.kind)

    def to_json(self, index: int, twin=None) -> dict:
        """The operation as JSON; its tensors are referenced by key (``ops.{index}.{name}``). ``twin`` (an
        :class:`~trace_circuits.architectures.Architecture`) adds the transformers module it attaches to."""
        positions = "gate-open positions" if self.gated else "every real position"
        if self.kind == "prompt_probe":
            positions = {"last": "reads the end of the user's turn", "mean": "reads the prompt up to the end of the "
                         "user's turn", "turn": "reads the last user turn up to its end"}.get(self.pool, self.pool) \
                + " once per sequence; changes nothing"
        d: dict[str, Any] = {"kind": self.kind, "layer": self.layer, "hook_name": self.hook_name,
                             "gated": self.gated, "scale": self.scale, "positions": positions}
        if twin is not None:
            d["hf_module"], d["hf_hook"] = twin.twin(self.hook_name)
        if self.kind == "sae_features":
            d.update(features=self.features, zero_thresholds=self.zero_thresholds, gate_source=self.gate_source,
                     gate_scales=self.gate_scales, gate_threshold=self.gate_threshold, architecture=self.architecture,
                     k=self.k, normalize=self.normalize, massive_norm_threshold=self.massive_norm_threshold,
                     sae=self.sae)
        elif self.kind == "heads":
            d["heads"] = self.heads
        elif self.kind == "direction":
            d.update(mode=self.mode, alpha=self.alpha)
        elif self.kind == "prompt_probe":
            h = "x[p]" if self.pool == "last" else ("the mean of x[q] over first real < q <= p with |x[q]| <= "
                                                    "massive_norm_threshold") + (
                ", q also after the last opener match before p" if self.pool == "turn" else "")
            d.update(gate_source=True, gate_threshold=self.gate_threshold, gap=self.gap, anchor=self.anchor,
                     pool=self.pool, massive_norm_threshold=self.massive_norm_threshold,
                     **({"opener": self.opener} if self.pool == "turn" else {}),
                     **({"message_threshold": self.message_threshold, "message_min_tokens": self.message_min_tokens,
                         "message_reading": self.message_reading} if self.message_threshold is not None else {}),
                     **({"message_boundary": self.message_boundary} if self.message_threshold is not None
                        and self.message_reading == "sentence" else {}),
                     **({"perplexity_window": self.perplexity_window, "perplexity_threshold":
                         self.perplexity_threshold, "perplexity_tokens": self.perplexity_tokens}
                        if self.perplexity_window else {}),
                     score=f"s = <h - mu, r> / gap, h = {h}, p = the end of the last anchor match (else the last "
                           "real position); the gate opens if s > gate_threshold" + (
                               "; or if m > message_threshold, m = max of <mean of x[q] - mu, r> / gap over "
                               + {"span": "spans a < q <= t", "prefix": "running means q <= t",
                                  "sentence": "whole sentences a < q <= t (a the message's start or a "
                                              "message_boundary token, t one or its last position)"}.get(
                                   self.message_reading, self.message_reading)
                               + " of the last user turn's message positions (before the anchor) holding at least "
                               "message_min_tokens of them" if self.message_threshold is not None else "") + (
                               "; from the next forward pass on, also if u > perplexity_threshold, u = the highest "
                               "mean of -log p(t_q | t_<q) over perplexity_window consecutive message tokens" + (
                                   " (the tokens that do not occur earlier in the message only)"
                                   if self.perplexity_tokens == "novel" else "") if
                               self.perplexity_window else ""))
        d["tensors"] = {name: {"key": f"ops.{index}.{name}", "shape": list(t.shape), "dtype": "float32"}
                        for name, t in self.tensors.items()}
        return d

    @classmethod
    def from_json(cls, d: dict, tensors: dict[str, torch.Tensor], where: str = "operation") -> "Operation":
        """Rebuild from JSON, checking every field's type, that the fields the operation's effect depends on are
        present (a deleted ``scale`` or ``gate_threshold`` must not fall back to a default), that no unknown field is
        present, and that the descriptive fields agree with the operation (``hook_name``)."""
        if not isinstance(d, dict):
            raise TraceCircuitsError(f"{where} is not a JSON object; re-export the hook set")
        kind = d.get("kind")
        if kind not in OP_KINDS:
            raise TraceCircuitsError(f"{where}: unknown kind {kind!r}; expected one of {', '.join(OP_KINDS)}")
        unknown = set(d) - _COMMON - _FIELDS[kind]
        if unknown:
            raise TraceCircuitsError(f"{where}: unknown field(s) {sorted(unknown)} for a {kind} operation (misspelt?); "
                                     "remove them or re-export the hook set")
        g = FieldReader(d, where)
        for key in ("positions", "hf_module", "hf_hook", "score"):
            g.str(key, "")  # descriptive, but of the right type
        kw = dict(kind=kind, layer=g.int("layer"), gated=g.bool("gated", REQUIRED), scale=g.num("scale", REQUIRED),
                  tensors=tensors)
        hook = g.str("hook_name", "")
        if kind == "sae_features":
            gate_source = g.bool("gate_source", False)
            kw.update(features=g.ints("features"), zero_thresholds=g.nums("zero_thresholds", REQUIRED),
                      gate_source=gate_source, gate_scales=g.nums("gate_scales", []),
                      gate_threshold=g.num("gate_threshold", REQUIRED if gate_source else 0.0), k=g.int("k", 0),
                      architecture=g.str("architecture", "topk"),  # format versions 1-2 held TopK SAEs only
                      normalize=g.str("normalize", "none"), sae=g.str("sae", ""),
                      massive_norm_threshold=g.num("massive_norm_threshold", None, optional=True),
                      hook="" if hook == make_hook_name("resid_post", kw["layer"]) else hook)
        elif kind == "heads":
            kw["heads"] = g.ints("heads")
        elif kind == "direction":
            mode = g.str("mode", REQUIRED)
            kw.update(mode=mode, alpha=g.num("alpha", REQUIRED if mode == "add" else 0.0))
        elif kind == "prompt_probe":
            if not g.bool("gate_source", True):
                raise g.bad("gate_source", "true (a prompt_probe is the gate)")
            kw.update(gate_source=True, gate_threshold=g.num("gate_threshold", REQUIRED), gap=g.num("gap", REQUIRED),
                      anchor=g.ints("anchor", []), gated=False, pool=g.str("pool", "last"),  # format <= 4: last
                      opener=g.ints("opener", []),
                      **_message_reading(g), perplexity_window=g.int("perplexity_window", 0),
                      perplexity_threshold=g.num("perplexity_threshold", None, optional=True),
                      perplexity_tokens=g.str("perplexity_tokens", "all"),  # format <= 12: every message token
                      massive_norm_threshold=g.num("massive_norm_threshold", None, optional=True))
        op = cls(**kw)
        if hook and hook != op.hook_name:
            raise TraceCircuitsError(f"{where}: field 'hook_name' is {hook!r} but field 'layer' is {op.layer} (a {kind} "
                                     f"operation there acts at {op.hook_name}); fix or re-export the hook set")
        return op

    def check(self, d_model: int, n_layers: int, n_heads: int, where: str) -> None:
        """Every parameter in range and every tensor finite and of its shape (one error line naming the field)."""
        if not 0 <= self.layer < n_layers:
            raise TraceCircuitsError(f"{where}: layer {self.layer} is outside the model (0..{n_layers - 1})")
        if not (math.isfinite(self.scale) and 0.0 <= self.scale <= 1.0):
            raise TraceCircuitsError(f"{where}: scale {self.scale} must be a number in [0, 1]")
        if not math.isfinite(self.gate_threshold):
            raise TraceCircuitsError(f"{where}: gate_threshold {self.gate_threshold} must be a finite number")
        allowed = _TENSORS[self.kind] if self.kind != "sae_features" else _SAE_TENSORS.get(self.architecture)
        extra = sorted(set(self.tensors) - set(allowed)) if allowed is not None else []
        if extra:
            raise TraceCircuitsError(f"{where}: tensor(s) {extra} have no meaning for this {self.kind} operation "
                                     f"(expected {list(allowed) or 'none'}); re-export the hook set")
        for name, t in self.tensors.items():
            if t.dtype not in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
                raise TraceCircuitsError(f"{where}: tensor {name} has dtype {t.dtype}, expected float32")
            if not torch.isfinite(t).all():
                raise TraceCircuitsError(f"{where}: tensor {name} holds NaN or inf; re-export the hook set")
        if self.kind == "heads":
            if not self.heads or any(not 0 <= h < n_heads for h in self.heads):
                raise TraceCircuitsError(f"{where}: head ids {self.heads} must be in 0..{n_heads - 1}")
            if len(set(self.heads)) != len(self.heads):
                raise TraceCircuitsError(f"{where}: head ids {self.heads} repeat a head")
        elif self.kind == "sae_features":
            self._check_sae(d_model, where)
        elif self.kind == "direction":
            if self.mode not in DIRECTION_MODES:
                raise TraceCircuitsError(f"{where}: mode must be 'ablate' or 'add', not {self.mode!r}")
            _vector(self, "r", d_model, where, unit=self.mode == "ablate")  # x - <x, r> r projects only if |r| = 1
            step = abs(self.alpha) * float(self.tensors["r"].double().norm())
            if not (math.isfinite(self.alpha) and step <= MAX_STEP):
                raise TraceCircuitsError(f"{where}: alpha {self.alpha} must be a finite number with |alpha r| at most "
                                         f"{MAX_STEP:g} (float16's largest; a larger step overflows the residual "
                                         "stream)")
        elif self.kind == "prompt_probe":
            _vector(self, "r", d_model, where, unit=True)
            _vector(self, "mu", d_model, where)
            if not (math.isfinite(self.gap) and self.gap > 0):
                raise TraceCircuitsError(f"{where}: gap must be a finite number > 0, got {self.gap}")
            for name, ids in (("anchor", self.anchor), ("opener", self.opener)):
                if any(t < 0 for t in ids):
                    raise TraceCircuitsError(f"{where}: {name} token ids {ids} must be >= 0")
            if self.pool not in PROBE_POOLS:
                raise TraceCircuitsError(f"{where}: pool must be one of {', '.join(PROBE_POOLS)}, not {self.pool!r}")
            t = self.massive_norm_threshold
            if t is not None and not (math.isfinite(t) and t > 0):
                raise TraceCircuitsError(f"{where}: massive_norm_threshold must be a finite number > 0 or absent, "
                                         f"got {t}")
            if self.message_threshold is not None:
                if self.pool != "turn" or not math.isfinite(self.message_threshold):
                    raise TraceCircuitsError(f"{where}: message_threshold must be a finite number and needs pool "
                                             f"'turn' (got {self.message_threshold} with pool {self.pool!r})")
                if self.message_min_tokens < 1:
                    raise TraceCircuitsError(f"{where}: message_min_tokens must be >= 1, got {self.message_min_tokens}")
                if self.message_reading not in MESSAGE_READINGS:
                    raise TraceCircuitsError(f"{where}: message_reading must be one of {', '.join(MESSAGE_READINGS)}, "
                                             f"got {self.message_reading!r}")
                if self.message_reading == "sentence" and (not self.message_boundary or any(
                        t < 0 for t in self.message_boundary)):
                    raise TraceCircuitsError(f"{where}: the sentence reading needs message_boundary, the token ids (>= "
                                             "0) that end a sentence; re-export the hook set")
            u = self.perplexity_threshold
            if self.perplexity_window < 0 or (self.perplexity_window and (u is None or not math.isfinite(u))):
                raise TraceCircuitsError(f"{where}: perplexity_window must be >= 0 and, when > 0, perplexity_threshold "
                                         f"a finite number (got {self.perplexity_window}, {u}); re-export the hook set")
            if self.perplexity_tokens not in SCORED_TOKENS:
                raise TraceCircuitsError(f"{where}: perplexity_tokens must be "
                                         f"{' or '.join(map(repr, SCORED_TOKENS))}, got {self.perplexity_tokens!r}; "
                                         "re-export the hook set")

    def _check_sae(self, d_model: int, where: str) -> None:
        if self.architecture not in ARCHITECTURES:
            raise TraceCircuitsError(f"{where}: architecture {self.architecture!r} is not one of "
                                     f"{', '.join(ARCHITECTURES)}")
        if self.normalize not in NORMALIZATIONS:
            raise TraceCircuitsError(f"{where}: normalize {self.normalize!r} is not one of {', '.join(NORMALIZATIONS)}")
        missing = [n for n in _SAE_TENSORS[self.architecture] if n not in self.tensors]
        if missing:
            raise TraceCircuitsError(f"{where}: tensors {missing} are missing; re-export the hook set")
        n = len(self.features)
        if n == 0 or len(self.zero_thresholds) != n or (self.gate_source and len(self.gate_scales) != n):
            raise TraceCircuitsError(f"{where}: needs at least one feature and one zero threshold (and gate scale) per "
                                     "feature")
        if any(not math.isfinite(v) for v in self.zero_thresholds + self.gate_scales):
            raise TraceCircuitsError(f"{where}: zero thresholds and gate scales must be finite numbers")
        if self.gate_source and any(not v > 0 for v in self.gate_scales):
            raise TraceCircuitsError(f"{where}: gate scales must be > 0")
        m = self.massive_norm_threshold
        if m is not None and not (math.isfinite(m) and m > 0):
            raise TraceCircuitsError(f"{where}: massive_norm_threshold must be a finite number > 0 or null, got {m}")
        if len(set(self.features)) != len(self.features):
            raise TraceCircuitsError(f"{where}: feature ids {self.features} repeat a feature (its contribution would be "
                                     "removed twice)")
        hook_kind, hook_layer = parse_hook(self.hook_name)
        if hook_kind not in SAE_HOOK_KINDS:
            raise TraceCircuitsError(f"{where}: hook {self.hook_name} is not a residual-stream or sublayer-output hook "
                                     f"({', '.join('blocks.L.hook_' + k for k in SAE_HOOK_KINDS)})")
        if hook_layer != self.layer:
            raise TraceCircuitsError(f"{where}: hook {self.hook_name} is not in layer {self.layer}")
        if self.architecture != "topk" and any(f < 0 for f in self.features):
            raise TraceCircuitsError(f"{where}: feature ids must be >= 0")
        self.encoder.check(d_model, where)


def _vector(op: Operation, name: str, d_model: int, where: str, unit: bool = False) -> None:
    v = op.tensors.get(name)
    if v is None or tuple(v.shape) != (d_model,):
        raise TraceCircuitsError(f"{where}: needs a tensor {name} of shape ({d_model},); re-export the hook set")
    if unit and torch.isfinite(v).all() and abs(float(v.double().norm()) - 1.0) > UNIT_TOLERANCE:
        raise TraceCircuitsError(f"{where}: tensor {name} must be a unit vector (norm {float(v.double().norm()):.4g}); "
                                 "the file is damaged, re-export the hook set")




def _message_reading(g: FieldReader) -> dict:
    """The probe's message reading: format 10 writes ``message_*`` (11: also ``message_boundary``); format 9 wrote
    ``prefix_threshold`` and ``prefix_min_tokens`` for running means from the message's start (read as
    ``message_reading="prefix"``); format <= 8: none."""
    if "prefix_threshold" in g.d:
        if "message_threshold" in g.d:
            raise g.bad("prefix_threshold", "absent where message_threshold is given (one reading per gate)")
        return dict(message_threshold=g.num("prefix_threshold", None, optional=True),
                    message_min_tokens=g.int("prefix_min_tokens", 1), message_reading="prefix")
    return dict(message_threshold=g.num("message_threshold", None, optional=True),
                message_min_tokens=g.int("message_min_tokens", 1),
                message_reading=g.str("message_reading", "span"), message_boundary=g.ints("message_boundary", []))
