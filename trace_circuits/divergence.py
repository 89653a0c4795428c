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

Onset rule: the sensitive onset layer is the first layer l with q[l] < alpha and
D[l] >= onset_fraction * max_l D[l] (defaults alpha = 0.05, onset_fraction = 0.5): the first layer where the
split is both real (not sampling noise) and large (a sizable part of the strongest split). ``None`` if no
layer qualifies.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Optional, Sequence

import numpy as np
import torch
from jaxtyping import Float
from tqdm.auto import tqdm

from trace_circuits._io import atomic_path
from trace_circuits.errors import TraceCircuitsError
from trace_circuits.models import model_info
from trace_circuits.prompts import EncodedPrompts, PromptSet, as_prompt_list, encode_prompts, iter_batches
from trace_circuits.results import Result

FORMAT_VERSION = 1
METRIC = "jsd_segment_attention"


def segment_names(n_content_bins: int) -> list[str]:
    return ["sink", "prefix"] + [f"content_{i + 1}" for i in range(n_content_bins)] + ["suffix"]


def segment_ids(encoded: EncodedPrompts, indices: Sequence[int], width: int, n_content_bins: int) -> torch.Tensor:
    """Segment index of every key position of a left-padded batch; padding gets index S (dropped later)."""
    S = n_content_bins + 3
    seg = torch.full((len(indices), width), S, dtype=torch.long)
    for row, i in enumerate(indices):
        n = len(encoded.input_ids[i])
        start, end = encoded.content_spans[i]
        pos = torch.arange(n)
        s = torch.full((n,), S - 1, dtype=torch.long)  # suffix by default
        s[pos < start] = 1
        s[0] = 0
        inside = (pos >= start) & (pos < end)
        rel = (pos[inside] - start).float() / max(end - start, 1)
        s[inside] = 2 + torch.clamp((rel * n_content_bins).long(), max=n_content_bins - 1)
        seg[row, width - n :] = s
    return seg


def collect_attention_profiles(
    model,
    encoded: EncodedPrompts,
    batch_size: int = 16,
    n_content_bins: int = 8,
    query_positions: int = 1,
    progress: bool = True,
    desc: str = "attention scan",
    checkpoint: Optional[str | Path] = None,
    checkpoint_every: int = 4,
) -> Float[np.ndarray, "n_prompts n_layers n_heads n_segments"]:
    """Segment-attention profiles a_i[l, h, s] (see module docstring), from the pattern hooks only.

    With ``checkpoint`` (a ``.safetensors`` path) finished batches are saved every ``checkpoint_every`` batches
    and a rerun with the same model, prompts and settings resumes from there; the file is removed when done.
    """
    if query_positions < 1:
        raise TraceCircuitsError("query_positions must be at least 1")
    n_layers, n_heads = model.cfg.n_layers, model.cfg.n_heads
    S = n_content_bins + 3
    out = torch.zeros((len(encoded), n_layers, n_heads, S), dtype=torch.float32)
    device = next(model.parameters()).device
    current: dict = {}

    def make_hook(layer: int):
        def hook(pattern, hook):  # pattern: [batch, head, query, key]
            p = pattern[:, :, -query_positions:, :].float().mean(dim=2)
            seg = current["seg"]
            binned = torch.zeros((p.shape[0], p.shape[1], S + 1), dtype=p.dtype, device=p.device)
            binned.scatter_add_(2, seg[:, None, :].expand(-1, p.shape[1], -1), p)
            current["acc"][:, layer] = binned[:, :, :S].cpu()
            return None

        return hook

    hooks = [(f"blocks.{l}.attn.hook_pattern", make_hook(l)) for l in range(n_layers)]
    n_batches = (len(encoded) + batch_size - 1) // batch_size
    done = torch.zeros(len(encoded), dtype=torch.bool)
    key = None
    if checkpoint is not None:
        checkpoint = Path(checkpoint)
        key = _checkpoint_key(model, encoded, n_content_bins, query_positions)
        resumed = _read_checkpoint(checkpoint, key, out.shape)
        if resumed is not None:
            out, done = resumed
    since_save = 0
    with torch.inference_mode():
        bar = tqdm(iter_batches(encoded, batch_size, device), total=n_batches, desc=desc, disable=not progress)
        for batch in bar:
            if bool(done[batch.indices].all()):
                continue
            if min(len(encoded.input_ids[i]) for i in batch.indices) < query_positions:
                raise TraceCircuitsError(f"a prompt is shorter than query_positions={query_positions}")
            current["seg"] = segment_ids(encoded, batch.indices, batch.tokens.shape[1], n_content_bins).to(device)
            current["acc"] = torch.zeros((len(batch.indices), n_layers, n_heads, S))
            model.run_with_hooks(batch.tokens, attention_mask=batch.attention_mask, return_type=None, fwd_hooks=hooks)
            out[batch.indices] = current["acc"]
            done[batch.indices] = True
            since_save += 1
            if checkpoint is not None and since_save >= checkpoint_every:
                _write_checkpoint(checkpoint, key, out, done)
                since_save = 0
    if checkpoint is not None and checkpoint.exists():
        checkpoint.unlink()
    return out.numpy()


def _checkpoint_key(model, encoded: EncodedPrompts, n_content_bins: int, query_positions: int) -> str:
    from trace_circuits.models import model_fingerprint

    h = hashlib.sha256(json.dumps([model_fingerprint(model), encoded.input_ids, encoded.content_spans,
                                   n_content_bins, query_positions, FORMAT_VERSION]).encode())
    return h.hexdigest()


def _write_checkpoint(path: Path, key: str, out: torch.Tensor, done: torch.Tensor) -> None:
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        save_file({"profiles": out.contiguous(), "done": done.to(torch.uint8)}, str(tmp), metadata={"key": key})


def _read_checkpoint(path: Path, key: str, shape) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
    if not path.exists():
        return None
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            if (f.metadata() or {}).get("key") != key:
                warnings.warn(f"{path} was written for other prompts or settings; starting over", stacklevel=3)
                return None
            out, done = f.get_tensor("profiles"), f.get_tensor("done").bool()
    except Exception as err:  # a torn or foreign file: never trust it, never crash on it
        warnings.warn(f"ignoring unreadable checkpoint {path} ({type(err).__name__}); starting over", stacklevel=3)
        return None
    if tuple(out.shape) != tuple(shape):
        return None
    return out, done


def jsd_bits(p: np.ndarray, q: np.ndarray, axis: int = -1) -> np.ndarray:
    """Jensen-Shannon divergence in bits along ``axis``: 1/2 KL(p||m) + 1/2 KL(q||m), m = (p+q)/2."""
    m = 0.5 * (p + q)

    def kl(a, b):
        with np.errstate(divide="ignore", invalid="ignore"):
            t = np.where(a > 0, a * (np.log2(np.where(a > 0, a, 1.0)) - np.log2(np.where(b > 0, b, 1.0))), 0.0)
        return t.sum(axis=axis)

    return np.clip(0.5 * kl(p, m) + 0.5 * kl(q, m), 0.0, 1.0)


def _normalize(x: np.ndarray) -> np.ndarray:
    return x / np.clip(x.sum(-1, keepdims=True), 1e-12, None)


def _jsd_of_means(wh: np.ndarray, H: np.ndarray, wb: np.ndarray, B: np.ndarray, shape) -> np.ndarray:
    """JSD per (layer, head) between weighted set means; wh [k, nH], H [nH, F] -> [k, L, A]."""
    P = _normalize((wh @ H).reshape(-1, *shape))
    R = _normalize((wb @ B).reshape(-1, *shape))
    return jsd_bits(P, R)


def benjamini_hochberg(p: np.ndarray) -> np.ndarray:
    """BH-adjusted q-values (monotone, capped at 1)."""
    from scipy.stats import false_discovery_control

    return false_discovery_control(np.asarray(p, dtype=float), method="bh")


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

    @property
    def onset_rule(self) -> str:
        return (f"first layer with BH q < {self.params.get('alpha', 0.05)} (label-permutation test) and "
                f"D[l] >= {self.params.get('onset_fraction', 0.5)} * max_l D[l]")

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
        }

    @classmethod
    def _from_dict(cls, data: dict) -> "DivergenceResult":
        a = lambda k: np.asarray(data[k], dtype=float)  # noqa: E731
        return cls(model=data["model"], per_head=a("per_head"), per_layer=a("per_layer"),
                   per_layer_ci=a("per_layer_ci"), per_head_ci=a("per_head_ci"), null_threshold=a("null_threshold"),
                   p_values=a("p_values"), q_values=a("q_values"), onset_layer=data["onset_layer"],
                   n_harmful=data["n_harmful"], n_benign=data["n_benign"], segments=list(data["segments"]),
                   harmful_profile=a("harmful_profile"), benign_profile=a("benign_profile"),
                   params=dict(data.get("params", {})), metric=data.get("metric", METRIC))

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
    if isinstance(prompts, EncodedPrompts):
        return prompts, list(prompts.texts)
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
    chat: Optional[bool] = None,
    system: Optional[str] = None,
    seed: int = 0,
    progress: bool = True,
    checkpoint_dir: Optional[str | Path] = None,
) -> DivergenceResult:
    """Attention divergence per layer and head between ``harmful`` and ``benign`` prompts (see module docs).

    ``checkpoint_dir``: save progress there and resume an interrupted scan of the same prompts and settings.
    """
    if not 0 < alpha < 1:
        raise TraceCircuitsError("alpha must be between 0 and 1")
    if not 0 <= onset_fraction <= 1:
        raise TraceCircuitsError("onset_fraction must be between 0 and 1")
    enc_h, plist_h = _as_encoded(model, harmful, chat, system)
    enc_b, plist_b = _as_encoded(model, benign, chat, system)
    if len(enc_h) < 2 or len(enc_b) < 2:
        raise TraceCircuitsError("need at least 2 harmful and 2 benign prompts for a divergence with intervals")
    kw = dict(batch_size=batch_size, n_content_bins=n_content_bins, query_positions=query_positions, progress=progress)
    ck = (lambda name: Path(checkpoint_dir) / f"scan-{name}.safetensors") if checkpoint_dir else (lambda name: None)
    Hp = collect_attention_profiles(model, enc_h, desc="attention scan (harmful)", checkpoint=ck("harmful"), **kw)
    Bp = collect_attention_profiles(model, enc_b, desc="attention scan (benign)", checkpoint=ck("benign"), **kw)
    return divergence_from_profiles(
        Hp, Bp, model_name=model_info(model).name, n_bootstrap=n_bootstrap,
        n_permutations=n_permutations, alpha=alpha, onset_fraction=onset_fraction, seed=seed,
        params=dict(batch_size=batch_size, n_content_bins=n_content_bins, query_positions=query_positions,
                    chat=chat if chat is not None else model_info(model).chat,
                    system=system),
        harmful_prompts=plist_h, benign_prompts=plist_b)


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
