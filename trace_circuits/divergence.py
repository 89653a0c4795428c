"""Stage 1 of TraceRouter: attention divergence between harmful and benign prompts, and the sensitive onset layer.

Definition (what :func:`scan_attention_divergence` computes)
------------------------------------------------------------
Attention rows of different prompts cover different tokens, so each row is first mapped onto a fixed set
of S *segments* of the templated prompt: ``sink`` (the first token), ``prefix`` (other template tokens before
the user's text: system prompt, role markers), ``content_1 .. content_K`` (the user's text cut into K equal
slices by relative position), and ``suffix`` (template tokens after it, i.e. the generation prompt,
including the query position itself). For prompt i, layer l, head h:

    a_i[l, h, s] = mean over the last Q query positions q of  sum_{k in segment s} A_i[l, h, q, k]

(A is ``blocks.{l}.attn.hook_pattern``; padding keys are excluded; each a_i[l, h] sums to 1). With the
set means  P = mean_{i in harmful} a_i  and  R = mean_{j in benign} a_j,

    D[l, h] = JSD(P[l, h] || R[l, h]) = 1/2 KL(P || M) + 1/2 KL(R || M),  M = (P + R) / 2   (bits, in [0, 1])
    D[l]    = mean_h D[l, h]

D is exactly 0 when the two sets are the same. Confidence intervals: percentile bootstrap over prompts
(each set resampled with replacement). Significance: a permutation test that shuffles the harmful/benign
labels over the pooled prompts; p-values are corrected over layers by Benjamini-Hochberg (q-values).

Raw onset rule (``contrast="raw"``): the first layer l with q[l] < alpha and D[l] >= onset_fraction * max_l D[l]
(defaults alpha = 0.05, onset_fraction = 0.5): the first layer where the split is both real (not sampling noise)
and large. It is only about harm when the two sets differ in nothing else: on unmatched sets it follows form.

Default onset rule (``contrast="form_controlled"``): the raw rule applied to form-matched reference pairs (the
built-in pairs, or the user's own sets with ``paired=True``) locates candidate layers, and a harm probe fitted on
those pairs must separate the user's sets there by more than form alone separates two benign sets
(:mod:`trace_circuits.form_control` states it in full). ``None`` if no layer qualifies, e.g. for two benign sets.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Optional, Sequence

import numpy as np

from trace_circuits import form_control as fc
from trace_circuits.attention_profiles import collect_attention_profiles, segment_ids, segment_names  # noqa: F401
from trace_circuits.errors import FormWarning, TraceCircuitsError
from trace_circuits.models import model_info
from trace_circuits.datasets import builtin_prompts
from trace_circuits.prompts import EncodedPrompts, PromptSet, as_prompt_list, encode_prompts
from trace_circuits.results import Result
from trace_circuits.stats import benjamini_hochberg, jsd_bits, normalize_last

FORMAT_VERSION = 2  # 2: form-controlled onset (contrast, reference, transfer); version-1 files load as contrast "raw"
CONTRASTS = ("form_controlled", "raw")
#: a warning is printed when the user's two sets differ in form this many times more than the reference pairs
FORM_WARN_RATIO = 10.0
METRIC = "jsd_segment_attention"


def _jsd_of_means(wh: np.ndarray, H: np.ndarray, wb: np.ndarray, B: np.ndarray, shape) -> np.ndarray:
    """JSD per (layer, head) between weighted set means; wh [k, nH], H [nH, F] -> [k, L, A]."""
    P = normalize_last((wh @ H).reshape(-1, *shape))
    R = normalize_last((wb @ B).reshape(-1, *shape))
    return jsd_bits(P, R)


@dataclass
class DivergenceResult(Result):
    """Layer x head attention divergence between harmful and benign prompts, with the onset layer."""

    KIND: ClassVar[str] = "trace-circuits divergence"
    FORMAT_VERSION: ClassVar[int] = FORMAT_VERSION
    FILE: ClassVar[str] = "divergence.json"
    FIX: ClassVar[str] = "run `trace-circuits scan` to write a new one"

    model: str
    per_head: np.ndarray  # [L, A]
    per_layer: np.ndarray  # [L]
    per_layer_ci: np.ndarray  # [L, 2]
    per_head_ci: np.ndarray  # [L, A, 2]
    null_threshold: np.ndarray  # [L] permutation (1 - alpha) quantile of D[l]
    p_values: np.ndarray  # [L]
    q_values: np.ndarray  # [L]
    onset_layer: Optional[int]
    n_harmful: int
    n_benign: int
    segments: list[str]
    harmful_profile: np.ndarray  # [L, A, S] mean over harmful prompts
    benign_profile: np.ndarray  # [L, A, S]
    params: dict = field(default_factory=dict)
    harmful_prompts: list[str] = field(default_factory=list, repr=False)
    benign_prompts: list[str] = field(default_factory=list, repr=False)
    metric: str = METRIC
    contrast: str = "raw"  # "form_controlled" (onset from reference pairs + harm transfer) or "raw"
    raw_onset_layer: Optional[int] = None  # the raw rule on the user's own sets
    reference: dict = field(default_factory=dict)  # source, n_pairs, per_layer, per_layer_ci, q_values, onset_layer
    transfer: dict = field(default_factory=dict)  # reference, user, user_ci, form_control, controls, passes, ...
    form_ratio: Optional[float] = None  # early-layer D of the user's sets / of the reference pairs

    @property
    def onset_rule(self) -> str:
        raw = (f"first layer with BH q < {self.params.get('alpha', 0.05)} (label-permutation test) and "
               f"D[l] >= {self.params.get('onset_fraction', 0.5)} * max_l D[l]")
        if self.contrast == "raw":
            return raw
        return (f"{raw} on the form-matched reference pairs ({self.reference.get('source', '?')}), where a harm "
                f"probe fitted on those pairs separates these sets (AUROC lower CI bound) above the form control "
                f"and by >= {self.transfer.get('transfer_fraction', 0.75)} of its separation of the reference")

    def onset_divergence(self) -> Optional[tuple[float, float, float, float]]:
        """(D, CI low, CI high, q) at the onset, from the contrast that located it (the reference pairs when
        form-controlled); None without an onset."""
        l = self.onset_layer
        if l is None:
            return None
        if self.contrast == "form_controlled" and self.reference:
            r = self.reference
            return float(r["per_layer"][l]), float(r["per_layer_ci"][l][0]), float(r["per_layer_ci"][l][1]), \
                float(r["q_values"][l])
        return (float(self.per_layer[l]), float(self.per_layer_ci[l, 0]), float(self.per_layer_ci[l, 1]),
                float(self.q_values[l]))

    @property
    def onset_source(self) -> str:
        """Which contrast the onset came from, in words (printed by the CLI)."""
        if self.contrast == "raw":
            return f"your two sets ({self.n_harmful} vs {self.n_benign} prompts), raw contrast (no form control)"
        src = f"form-matched pairs: {self.reference.get('source', '?')} ({self.reference.get('n_pairs', '?')} pairs)"
        l = self.onset_layer
        if l is None or not self.transfer:
            return src
        t = self.transfer
        return (f"{src}; harm transfer to your sets at layer {l}: AUROC {t['user'][l]:.2f} "
                f"[{t['user_ci'][l][0]:.2f}, {t['user_ci'][l][1]:.2f}] vs form control {t['form_control'][l]:.2f} "
                f"(reference {t['reference'][l]:.2f})")

    @property
    def top_heads(self) -> list[tuple[int, int, float]]:
        """(layer, head, D) sorted by divergence, strongest first."""
        order = np.argsort(-self.per_head, axis=None)
        L, A = self.per_head.shape
        return [(int(i // A), int(i % A), float(self.per_head.flat[i])) for i in order]

    def _to_dict(self) -> dict:
        return {
            "model": self.model,
            "metric": self.metric,
            "metric_definition": "D[l,h] = JSD(mean harmful segment-attention || mean benign segment-attention) "
                                 "in bits, at the last query positions; D[l] = mean_h D[l,h]",
            "onset_layer": self.onset_layer,
            "onset_rule": self.onset_rule,
            "n_harmful": self.n_harmful,
            "n_benign": self.n_benign,
            "per_layer": self.per_layer.tolist(),
            "per_layer_ci": self.per_layer_ci.tolist(),
            "per_head": self.per_head.tolist(),
            "per_head_ci": self.per_head_ci.tolist(),
            "null_threshold": self.null_threshold.tolist(),
            "p_values": self.p_values.tolist(),
            "q_values": self.q_values.tolist(),
            "segments": self.segments,
            "harmful_profile": self.harmful_profile.tolist(),
            "benign_profile": self.benign_profile.tolist(),
            "top_heads": [list(t) for t in self.top_heads[:10]],
            "params": self.params,
            "contrast": self.contrast,
            "raw_onset_layer": self.raw_onset_layer,
            "onset_source": self.onset_source,
            "reference": self.reference,
            "transfer": self.transfer,
            "form_ratio": self.form_ratio,
        }

    @classmethod
    def _from_dict(cls, data: dict) -> "DivergenceResult":
        a = lambda k: np.asarray(data[k], dtype=float)  # noqa: E731
        return cls(model=data["model"], per_head=a("per_head"), per_layer=a("per_layer"),
                   per_layer_ci=a("per_layer_ci"), per_head_ci=a("per_head_ci"), null_threshold=a("null_threshold"),
                   p_values=a("p_values"), q_values=a("q_values"), onset_layer=data["onset_layer"],
                   n_harmful=data["n_harmful"], n_benign=data["n_benign"], segments=list(data["segments"]),
                   harmful_profile=a("harmful_profile"), benign_profile=a("benign_profile"),
                   params=dict(data.get("params", {})), metric=data.get("metric", METRIC),
                   contrast=data.get("contrast", "raw"),
                   raw_onset_layer=data.get("raw_onset_layer", data["onset_layer"] if "contrast" not in data else None),
                   reference=dict(data.get("reference", {})), transfer=dict(data.get("transfer", {})),
                   form_ratio=data.get("form_ratio"))

    def attention_view(self, model, harmful_index: int = 0, benign_index: int = 0, layer: Optional[int] = None):
        """circuitsvis view of one harmful and one benign prompt's attention heads at ``layer`` (default: onset)."""
        from trace_circuits.viz.divergence import attention_pair_view

        if not self.harmful_prompts or not self.benign_prompts:
            raise TraceCircuitsError("this result carries no prompts (loaded from JSON?); call viz.attention_pair_view")
        layer = self.onset_layer if layer is None else layer
        layer = int(np.argmax(self.per_layer)) if layer is None else layer
        return attention_pair_view(model, self.harmful_prompts[harmful_index], self.benign_prompts[benign_index],
                                   layer, chat=self.params.get("chat"))


def _as_encoded(model, prompts, chat, system) -> tuple[EncodedPrompts, list[str]]:
    if isinstance(prompts, EncodedPrompts):  # the user's text of each prompt (reference matching, attention views)
        return prompts, [prompts.prompt(i) for i in range(len(prompts))]
    plist = as_prompt_list(prompts)
    return encode_prompts(model, plist, chat=chat, system=system), plist


def scan_attention_divergence(
    model,
    harmful: PromptSet | Sequence[str] | EncodedPrompts,
    benign: PromptSet | Sequence[str] | EncodedPrompts,
    *,
    batch_size: int = 16,
    n_content_bins: int = 8,
    query_positions: int = 1,
    n_bootstrap: int = 1000,
    n_permutations: int = 1000,
    alpha: float = 0.05,
    onset_fraction: float = 0.5,
    contrast: str = "form_controlled",
    paired: bool = False,
    transfer_fraction: float = 0.75,
    form_control_prompts: int = 100,
    chat: Optional[bool] = None,
    system: Optional[str] = None,
    seed: int = 0,
    progress: bool = True,
    checkpoint_dir: Optional[str | Path] = None,
) -> DivergenceResult:
    """Attention divergence per layer and head between ``harmful`` and ``benign`` prompts, and the onset layer.

    ``contrast="form_controlled"`` (default): onset by the form-controlled rule (module docstring and
    :mod:`trace_circuits.form_control`), with the built-in matched pairs (train split) as reference, or the two sets
    themselves with ``paired=True`` (index i of one is the form twin of index i of the other); ``form_control_prompts``
    everyday instructions form the benign form control. ``contrast="raw"``: the raw rule on the two sets.
    ``checkpoint_dir``: save progress there and resume an interrupted scan of the same prompts and settings.
    """
    if not 0 < alpha < 1:
        raise TraceCircuitsError("alpha must be between 0 and 1")
    if not 0 <= onset_fraction <= 1:
        raise TraceCircuitsError("onset_fraction must be between 0 and 1")
    if contrast not in CONTRASTS:
        raise TraceCircuitsError(f"contrast must be one of {', '.join(CONTRASTS)}, not '{contrast}'")
    enc_h, plist_h = _as_encoded(model, harmful, chat, system)
    enc_b, plist_b = _as_encoded(model, benign, chat, system)
    if len(enc_h) < 2 or len(enc_b) < 2:
        raise TraceCircuitsError("need at least 2 harmful and 2 benign prompts for a divergence with intervals")
    if paired and len(enc_h) != len(enc_b):
        raise TraceCircuitsError(f"--paired needs twin sets of equal size, not {len(enc_h)} harmful and {len(enc_b)} "
                                 "benign prompts; drop --paired to use the built-in matched pairs as reference")
    if contrast == "form_controlled" and getattr(model, "tokenizer", None) is None and (
            not paired or form_control_prompts > 0):
        raise TraceCircuitsError("the form-controlled scan encodes the built-in reference pairs and form-control "
                                 "prompts, which needs the model's tokenizer; pass contrast='raw' (--contrast raw), or "
                                 "paired=True with form_control_prompts=0")
    info = model_info(model)
    if chat is None and enc_h.chat is not None:  # reference and control prompts templated as the scanned ones
        chat = enc_h.chat
    kw = dict(batch_size=batch_size, n_content_bins=n_content_bins, query_positions=query_positions, progress=progress)
    ck = (lambda name: Path(checkpoint_dir) / f"scan-{name}.safetensors") if checkpoint_dir else (lambda name: None)
    Hp = collect_attention_profiles(model, enc_h, desc="attention scan (harmful)", checkpoint=ck("harmful"), **kw)
    Bp = collect_attention_profiles(model, enc_b, desc="attention scan (benign)", checkpoint=ck("benign"), **kw)
    stats = dict(n_bootstrap=n_bootstrap, n_permutations=n_permutations, alpha=alpha, onset_fraction=onset_fraction,
                 seed=seed)
    params = dict(batch_size=batch_size, n_content_bins=n_content_bins, query_positions=query_positions,
                  chat=chat if chat is not None else info.chat, system=system, contrast=contrast, paired=paired,
                  transfer_fraction=transfer_fraction, form_control_prompts=form_control_prompts)
    result = divergence_from_profiles(Hp, Bp, model_name=info.name, params=params, harmful_prompts=plist_h,
                                      benign_prompts=plist_b, **stats)
    result.raw_onset_layer = result.onset_layer
    if contrast == "raw":
        return result

    # Reference pairs (form-matched) and the benign form control, scanned only when they are not the inputs.
    twins = not paired and _builtin_twins(plist_h, plist_b)
    if paired or twins:
        source = "the scanned sets, built-in twins" if twins else "your paired sets"
        ref_h, ref_b, ref_H, ref_B = plist_h, plist_b, Hp, Bp
    else:
        ref_h = builtin_prompts("harmful", "train").prompts
        ref_b = builtin_prompts("benign", "train").prompts
        source = "built-in matched pairs, train split"
        ref_H = Hp if ref_h == plist_h else collect_attention_profiles(
            model, encode_prompts(model, ref_h, chat=chat, system=system), desc="attention scan (reference harmful)",
            checkpoint=ck("reference-harmful"), memo=True, **kw)
        ref_B = Bp if ref_b == plist_b else collect_attention_profiles(
            model, encode_prompts(model, ref_b, chat=chat, system=system), desc="attention scan (reference benign)",
            checkpoint=ck("reference-benign"), memo=True, **kw)
    ref = result if ref_H is Hp and ref_B is Bp else divergence_from_profiles(ref_H, ref_B, **stats)
    ref_b_set = set(ref_b)
    everyday = [p for p in builtin_prompts("everyday", "train").prompts if p not in ref_b_set][:form_control_prompts]
    controls = {}
    control_divergence = {}
    if len(everyday) >= 2:
        E = collect_attention_profiles(model, encode_prompts(model, everyday, chat=chat, system=system),
                                       desc="attention scan (form control)", checkpoint=ck("control"), memo=True, **kw)
        name = "reference benign vs everyday instructions"
        controls[name] = (ref_B, E, list(range(len(ref_b))), [-1] * len(everyday))
        control_divergence[name] = fc.mean_divergence(ref_B, E)
    if plist_b != ref_b:
        name = "your benign vs reference benign"
        controls[name] = (Bp, ref_B, fc.pair_index(plist_b, ref_b), list(range(len(ref_b))))
        control_divergence[name] = fc.mean_divergence(Bp, ref_B)
    t = fc.harm_transfer(ref_H, ref_B, Hp, Bp, harmful_in_ref=fc.pair_index(plist_h, ref_h),
                         benign_in_ref=fc.pair_index(plist_b, ref_b), controls=controls,
                         n_bootstrap=n_bootstrap, alpha=alpha, seed=seed)
    passes = fc.transfer_passes(t, transfer_fraction)
    candidates = fc.candidate_layers(ref.per_layer, ref.q_values, alpha, onset_fraction)
    result.onset_layer = fc.first_layer(candidates & passes)
    result.contrast = "form_controlled"
    result.reference = {"source": source, "n_pairs": len(ref_h), "onset_layer": ref.onset_layer,
                        "is_input": ref_H is Hp and ref_B is Bp,
                        "per_layer": ref.per_layer.tolist(), "per_layer_ci": ref.per_layer_ci.tolist(),
                        "q_values": ref.q_values.tolist(), "candidates": candidates.tolist()}
    result.transfer = {"reference": t.reference.tolist(), "user": t.user.tolist(), "user_ci": t.user_ci.tolist(),
                       "form_control": t.form_control.tolist(), "passes": passes.tolist(),
                       "controls": {k: v.tolist() for k, v in t.controls.items()},
                       "control_divergence": {k: v.tolist() for k, v in control_divergence.items()},
                       "transfer_fraction": transfer_fraction, "probe": f"logistic regression, C={fc.PROBE_C}, "
                       f"{fc.N_FOLDS}-fold cross-fitted on the reference pairs"}
    result.form_ratio = fc.form_ratio(result.per_layer, ref.per_layer)
    if not (paired or twins) and result.form_ratio > FORM_WARN_RATIO:
        result.params["form_warning"] = fc.form_warning(result, enc_h, enc_b)
        warnings.warn(result.params["form_warning"], FormWarning, stacklevel=2)
    return result


def _builtin_twins(harmful: list[str], benign: list[str]) -> bool:
    """Whether harmful[i] and benign[i] are one built-in matched pair for every i (then they are their own reference)."""
    twin = {}
    for h, b in (("harmful", "benign"), ("rephrased_harmful", "rephrased_benign")):
        twin.update(zip(builtin_prompts(h, "all").prompts, builtin_prompts(b, "all").prompts))
    return len(harmful) == len(benign) and all(twin.get(h) == b for h, b in zip(harmful, benign))


def divergence_from_profiles(
    harmful_profiles: np.ndarray,
    benign_profiles: np.ndarray,
    model_name: str = "",
    n_bootstrap: int = 1000,
    n_permutations: int = 1000,
    alpha: float = 0.05,
    onset_fraction: float = 0.5,
    seed: int = 0,
    params: Optional[dict] = None,
    harmful_prompts: Optional[list[str]] = None,
    benign_prompts: Optional[list[str]] = None,
) -> DivergenceResult:
    """Statistics of stage 1 from per-prompt segment-attention profiles [n, L, A, S] of each set."""
    H = np.asarray(harmful_profiles, dtype=np.float64)
    B = np.asarray(benign_profiles, dtype=np.float64)
    if H.ndim != 4 or H.shape[1:] != B.shape[1:]:
        raise TraceCircuitsError("harmful and benign profiles must both be [n, layers, heads, segments]")
    nH, nB = H.shape[0], B.shape[0]
    L, A, S = H.shape[1:]
    rng = np.random.default_rng(seed)
    Hf, Bf = H.reshape(nH, -1), B.reshape(nB, -1)
    mean_h, mean_b = np.full((1, nH), 1.0 / nH), np.full((1, nB), 1.0 / nB)
    per_head = _jsd_of_means(mean_h, Hf, mean_b, Bf, (L, A, S))[0]
    per_layer = per_head.mean(-1)

    # Percentile bootstrap: resample prompts within each set.
    def counts(n, k):
        return rng.multinomial(n, np.full(n, 1.0 / n), size=k) / n

    boot = np.concatenate([
        _jsd_of_means(counts(nH, c), Hf, counts(nB, c), Bf, (L, A, S))
        for c in _chunks(n_bootstrap, 250)
    ]) if n_bootstrap > 0 else per_head[None]
    lo, hi = 100 * alpha / 2, 100 * (1 - alpha / 2)
    per_head_ci = np.stack([np.percentile(boot, lo, axis=0), np.percentile(boot, hi, axis=0)], -1)
    boot_layer = boot.mean(-1)
    per_layer_ci = np.stack([np.percentile(boot_layer, lo, axis=0), np.percentile(boot_layer, hi, axis=0)], -1)

    # Permutation test of the label: shuffle harmful/benign over the pooled prompts.
    X = np.concatenate([Hf, Bf])
    null_layers = []
    for c in _chunks(n_permutations, 250):
        wh = np.zeros((c, nH + nB))
        wb = np.zeros((c, nH + nB))
        for r in range(c):
            perm = rng.permutation(nH + nB)
            wh[r, perm[:nH]] = 1.0 / nH
            wb[r, perm[nH:]] = 1.0 / nB
        null_layers.append(_jsd_of_means(wh, X, wb, X, (L, A, S)).mean(-1))
    null = np.concatenate(null_layers) if null_layers else np.zeros((0, L))
    if len(null):
        p_values = (1.0 + (null >= per_layer[None] - 1e-12).sum(0)) / (1.0 + len(null))
        null_threshold = np.quantile(null, 1 - alpha, axis=0)
    else:
        p_values, null_threshold = np.ones(L), np.zeros(L)
    q_values = benjamini_hochberg(p_values)

    onset = None
    if per_layer.max() > 0:
        for l in range(L):
            if q_values[l] < alpha and per_layer[l] >= onset_fraction * per_layer.max():
                onset = l
                break
    p = dict(params or {})
    p.update(n_bootstrap=n_bootstrap, n_permutations=n_permutations, alpha=alpha, onset_fraction=onset_fraction,
             seed=seed)
    return DivergenceResult(
        model=model_name, per_head=per_head, per_layer=per_layer, per_layer_ci=per_layer_ci, per_head_ci=per_head_ci,
        null_threshold=null_threshold, p_values=p_values, q_values=q_values, onset_layer=onset, n_harmful=nH,
        n_benign=nB, segments=segment_names(S - 3), harmful_profile=H.mean(0), benign_profile=B.mean(0), params=p,
        harmful_prompts=list(harmful_prompts or []), benign_prompts=list(benign_prompts or []))


def _chunks(total: int, size: int):
    while total > 0:
        yield min(size, total)
        total -= size
