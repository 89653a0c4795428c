"""Stage 2 of TraceRouter: SAE features that carry harmful semantics, by differential activation analysis.

A prompt's activation of feature f is its maximum over the user's text and the generation prompt (never the shared
system prompt, never a massive-activation sink position):

    A[i, f] = max_{t >= content start} SAE.encode(x_i[t])[f]

computed for every prompt of each set with the SAE's own ``encode`` (any SAE-Lens architecture), then the
statistics and selection rule of :mod:`trace_circuits.feature_stats` (Mann-Whitney U with Benjamini-Hochberg,
Cohen's d, benign firing rate).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Optional, Sequence

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from trace_circuits.errors import TraceCircuitsError
from trace_circuits.feature_stats import (
    _BOOL_COLUMNS,
    _FLOAT_COLUMNS,
    COLUMNS,
    FORMAT_VERSION,
    N_OTHER_FEATURES_SAVED,
    _jsonable_examples,
    _row_dict,
    _sorted,
    differential_feature_stats,
    selection_rule,
)
from trace_circuits.models import model_info
from trace_circuits.prompts import EncodedPrompts, as_prompt_list, encode_prompts, iter_batches
from trace_circuits.results import Result
from trace_circuits.saes.encoding import massive_limit
from trace_circuits.saes.sources import check_sae_fits, sae_hook
from trace_circuits.stats import auroc


@dataclass
class FeatureResult(Result):
    """Stage 2 result: differential statistics of one SAE's features, harmful vs benign prompts."""

    KIND: ClassVar[str] = "trace-circuits features"
    FORMAT_VERSION: ClassVar[int] = FORMAT_VERSION
    FILE: ClassVar[str] = "features.json"
    FIX: ClassVar[str] = "run `trace-circuits features` to write a new one"

    model: str
    hook_name: str
    sae_id: str
    table: pd.DataFrame
    params: dict
    n_harmful: int
    n_benign: int
    examples: dict = field(default_factory=dict)  # feature id -> {"top_tokens": [[tok, act]], "top_prompts": ...}
    # per-prompt activations A[i, f] of the last run (not saved): what stage 3 and the held-out check reuse
    harmful_activations: Optional[np.ndarray] = field(default=None, repr=False)
    benign_activations: Optional[np.ndarray] = field(default=None, repr=False)

    @classmethod
    def from_activations(cls, harmful, benign, *, model: str = "", hook_name: str = "", sae_id: str = "",
                         examples: Optional[dict] = None, params: Optional[dict] = None,
                         **stat_kwargs) -> "FeatureResult":
        """Run :func:`differential_feature_stats` on the two matrices and wrap the table (extra ``params`` are
        recorded alongside the statistical thresholds)."""
        table = differential_feature_stats(harmful, benign, **stat_kwargs)
        p = dict(params or {})
        p.update(table.attrs.get("params", {}))
        return cls(model=model, hook_name=hook_name, sae_id=sae_id, table=table, params=p,
                   n_harmful=int(np.shape(harmful)[0]), n_benign=int(np.shape(benign)[0]),
                   examples=dict(examples or {}))

    @property
    def harmful_features(self) -> list[int]:
        """Ids of the features selected as harmful, in table order (strongest effect first)."""
        t = self.table
        return [int(f) for f in t.loc[t["harmful"].to_numpy(dtype=bool), "feature"]]

    @property
    def rule(self) -> str:
        return selection_rule(self.params)

    def _example(self, fid: int) -> Optional[dict]:
        ex = self.examples.get(fid, self.examples.get(str(fid)))
        return ex or None

    def _to_dict(self) -> dict:
        """All harmful features plus the top 50 other features by effect size (each with its examples)."""
        t = self.table
        mask = t["harmful"].to_numpy(dtype=bool)
        kept = pd.concat([t[mask], t[~mask].head(N_OTHER_FEATURES_SAVED)])
        rows = []
        for _, row in kept.iterrows():
            r = _row_dict(row)
            ex = self._example(r["feature"])
            if ex:
                r["examples"] = _jsonable_examples(ex)
            rows.append(r)
        return {
            "model": self.model,
            "hook_name": self.hook_name,
            "sae_id": self.sae_id,
            "n_harmful": int(self.n_harmful),
            "n_benign": int(self.n_benign),
            "n_features": self.params.get("n_features", int(len(t))),
            "params": self.params,
            "rule": self.rule,
            "harmful_features": self.harmful_features,
            "features": rows,
        }

    @classmethod
    def _from_dict(cls, data: dict) -> "FeatureResult":
        """Rebuild from :meth:`to_json` output (the table holds only the rows that were saved)."""
        rows = data.get("features", [])
        examples = {int(r["feature"]): r["examples"] for r in rows if r.get("examples")}
        table = pd.DataFrame([{c: r[c] for c in COLUMNS} for r in rows], columns=COLUMNS)
        table = table.astype({"feature": np.int64, **{c: np.float64 for c in _FLOAT_COLUMNS},
                              **{c: bool for c in _BOOL_COLUMNS}})
        table["status"] = table["status"].astype(str)
        table = _sorted(table)
        return cls(model=data.get("model", ""), hook_name=data.get("hook_name", ""), sae_id=data.get("sae_id", ""),
                   table=table, params=dict(data.get("params", {})), n_harmful=int(data["n_harmful"]),
                   n_benign=int(data["n_benign"]), examples=examples)


def as_encoded(model, prompts, chat: Optional[bool] = None) -> EncodedPrompts:
    """Prompts as :class:`EncodedPrompts` (already-encoded ones pass through: the pipeline encodes each set once)."""
    return prompts if isinstance(prompts, EncodedPrompts) else encode_prompts(model, as_prompt_list(prompts), chat=chat)


@torch.inference_mode()
def collect_prompt_features(model, sae, encoded: EncodedPrompts, batch_size: int = 16, progress: bool = True,
                            desc: str = "SAE features") -> tuple[np.ndarray, np.ndarray]:
    """``A [n, F]`` (module docstring) and the position each maximum sits at (an index into the prompt's tokens)."""
    from trace_circuits.names import parse_hook

    hook = sae_hook(sae)
    device = next(model.parameters()).device
    sae = sae.to(device)
    n, F = len(encoded), int(sae.cfg.d_sae)
    acts = np.zeros((n, F), dtype=np.float32)
    where = np.zeros((n, F), dtype=np.int32)
    layer = parse_hook(hook)[1]
    stop = layer + 1 if layer is not None else None
    limit = massive_limit(sae)
    n_batches = (n + batch_size - 1) // batch_size
    for batch in tqdm(iter_batches(encoded, batch_size, device), total=n_batches, desc=desc, disable=not progress):
        _, cache = model.run_with_cache(batch.tokens, attention_mask=batch.attention_mask, names_filter=[hook],
                                        stop_at_layer=stop)
        x = cache[hook].float()
        feats = sae.encode(x) * (x.norm(dim=-1) <= limit)[..., None]
        for r, i in enumerate(batch.indices):
            start = encoded.content_spans[i][0]
            m, a = feats[r, batch.n_pad[r] + start:].max(dim=0)
            acts[i] = m.cpu().numpy()
            where[i] = (a + start).cpu().numpy()
    return acts, where


def feature_examples(model, encoded: EncodedPrompts, acts: np.ndarray, where: np.ndarray, prompts: Sequence[str],
                     features: Sequence[int], k: int = 5) -> dict:
    """For each feature: the ``k`` prompts where it is most active, and the token it peaks on in each."""
    tok = model.tokenizer
    out = {}
    for f in features:
        top_prompts, top_tokens = [], []
        for i in np.argsort(-acts[:, f])[:k]:
            if acts[i, f] <= 0:
                break
            t = encoded.input_ids[i][int(where[i, f])]
            top_prompts.append([prompts[i], float(acts[i, f])])
            top_tokens.append([tok.decode([t]), float(acts[i, f])])
        out[int(f)] = {"top_tokens": top_tokens, "top_prompts": top_prompts}
    return out


def find_harmful_features(model, sae, harmful, benign, *, batch_size: int = 16, chat: Optional[bool] = None,
                          progress: bool = True, n_examples: int = 5, relative_fire_threshold: Optional[float] = 0.2,
                          **stat_kwargs) -> FeatureResult:
    """Stage 2 on one SAE (any SAE-Lens architecture) at the hook its ``cfg.metadata.hook_name`` names.

    ``harmful`` / ``benign``: prompt sets, lists of strings, or :class:`EncodedPrompts`; ``stat_kwargs`` go to
    :func:`~trace_circuits.feature_stats.differential_feature_stats` (alpha, min_effect_size, ...)."""
    from trace_circuits.models import model_fingerprint

    hook = sae_hook(sae)
    check_sae_fits(sae, model, hook)
    enc_h, enc_b = as_encoded(model, harmful, chat), as_encoded(model, benign, chat)
    Ha, Hw = collect_prompt_features(model, sae, enc_h, batch_size, progress, "SAE features (harmful)")
    Ba, Bw = collect_prompt_features(model, sae, enc_b, batch_size, progress, "SAE features (benign)")
    name = model_info(model).name
    source = sae.cfg.metadata.get("source") or f"{name}/{hook}"
    result = FeatureResult.from_activations(
        Ha, Ba, model=name, hook_name=hook, sae_id=str(source),
        params={"aggregation": "max over content and generation-prompt tokens", "model_fingerprint":
                model_fingerprint(model), "d_sae": int(sae.cfg.d_sae), "architecture": sae.cfg.architecture()},
        relative_fire_threshold=relative_fire_threshold, **stat_kwargs)
    chosen = set(result.harmful_features)
    shown = result.harmful_features + [int(f) for f in result.table["feature"].head(N_OTHER_FEATURES_SAVED)
                                        if int(f) not in chosen]
    both = enc_h + enc_b
    result.examples = feature_examples(model, both, np.concatenate([Ha, Ba]), np.concatenate([Hw, Bw]),
                                       [both.prompt(i) for i in range(len(both))], shown[:200], k=n_examples)
    result.harmful_activations, result.benign_activations = Ha, Ba
    return result


def heldout_auroc(model, sae, features: Sequence[int], harmful, benign, batch_size: int = 16,
                  progress: bool = False) -> float:
    """How well the summed activations of ``features`` separate new harmful from benign prompts:
    AUROC of ``s_i = sum_{f in features} A[i, f]``."""
    feats = list(features)
    if not feats:
        raise TraceCircuitsError("no features to score; the analysis selected none")
    H, _ = collect_prompt_features(model, sae, as_encoded(model, harmful), batch_size, progress, "held-out (harmful)")
    B, _ = collect_prompt_features(model, sae, as_encoded(model, benign), batch_size, progress, "held-out (benign)")
    return auroc(H[:, feats].sum(1), B[:, feats].sum(1))
