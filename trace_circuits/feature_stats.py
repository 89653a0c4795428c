"""Stage 2 statistics: differential activation analysis of SAE features, harmful vs benign prompts (pure numpy/scipy).

Input (what :func:`differential_feature_stats` takes)
-----------------------------------------------------
Two matrices ``H`` [n_H, F] and ``B`` [n_B, F]: one row per prompt, one column per SAE feature, each entry the
feature's activation on that prompt aggregated over the prompt's tokens (the caller picks the aggregation,
e.g. max or mean over the content tokens). No model is needed here: this is pure numpy/scipy.

Statistics (one row per feature f)
----------------------------------
    mean_harmful      = mean_i H[i, f]                 mean_benign = mean_j B[j, f]
    mean_diff         = mean_harmful - mean_benign
    fire_rate_harmful = fraction of harmful prompts with H[i, f] > theta_f              (same for benign)
                        theta_f = max(fire_threshold, relative_fire_threshold * max over all prompts of A[:, f])
                        (relative_fire_threshold is off by default here; find_harmful_features uses 0.2: a
                        feature "fires" on a prompt when it reaches a fifth of its strongest activation, since a
                        TopK SAE's max over a prompt's tokens is almost never exactly 0)
    fire_rate_diff    = fire_rate_harmful - fire_rate_benign
    effect_size       = Cohen's d = mean_diff / s_pooled,
                        s_pooled = sqrt(((n_H - 1) s_H^2 + (n_B - 1) s_B^2) / (n_H + n_B - 2))
                        (s^2 the unbiased sample variances); where s_pooled = 0, d = 0 if mean_diff = 0 else
                        +-inf; d is then clipped to [-1e6, 1e6] so that JSON stays finite
    p_value           = one-sided Mann-Whitney U test of "harmful > benign" (asymptotic normal approximation
                        with tie and continuity correction when scipy picks it); p = 1 for a feature that is
                        constant over all n_H + n_B prompts (e.g. a dead feature)
    q_value           = Benjamini-Hochberg adjusted p-value over ALL F features
    rejected_benign   = fire_rate_benign > max_benign_fire_rate

Selection rule
--------------
A feature carries harmful semantics ("harmful") when all of these hold:

    q_value < alpha  AND  mean_diff > 0  AND  effect_size >= min_effect_size
    AND  fire_rate_benign <= max_benign_fire_rate

(defaults alpha = 0.05, min_effect_size = 0.5, max_benign_fire_rate = 0.2, fire_threshold = 0,
relative_fire_threshold = None; find_harmful_features passes relative_fire_threshold = 0.2): more active
on harmful prompts, beyond what sampling noise explains over all features tested, by a sizable amount, and not
a generic feature that fires often on benign prompts too.

``status`` names the first test a feature fails, checked in this order (or "harmful" when it passes all):
"constant" (same value on every prompt), "weaker on harmful" (mean_diff < 0), "no difference"
(mean_diff = 0), "not significant" (q_value >= alpha), "small effect" (effect_size < min_effect_size),
"rejected: fires on benign" (fire_rate_benign > max_benign_fire_rate).
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Optional, Sequence

import numpy as np
import pandas as pd

from trace_circuits.errors import TraceCircuitsError
from trace_circuits.stats import benjamini_hochberg

FORMAT_VERSION = 1
EFFECT_SIZE_CLIP = 1e6
N_OTHER_FEATURES_SAVED = 50

STATUS_HARMFUL = "harmful"
STATUS_BENIGN = "rejected: fires on benign"
STATUS_SMALL = "small effect"
STATUS_NOT_SIGNIFICANT = "not significant"
STATUS_NO_DIFFERENCE = "no difference"
STATUS_WEAKER = "weaker on harmful"
STATUS_CONSTANT = "constant"
STATUSES = (STATUS_HARMFUL, STATUS_BENIGN, STATUS_SMALL, STATUS_NOT_SIGNIFICANT, STATUS_NO_DIFFERENCE,
            STATUS_WEAKER, STATUS_CONSTANT)

COLUMNS = ["feature", "mean_harmful", "mean_benign", "mean_diff", "fire_rate_harmful", "fire_rate_benign",
           "fire_rate_diff", "effect_size", "p_value", "q_value", "rejected_benign", "harmful", "status"]
_FLOAT_COLUMNS = COLUMNS[1:10]
_BOOL_COLUMNS = ["rejected_benign", "harmful"]


def _as_matrix(x: Any, name: str) -> np.ndarray:
    if hasattr(x, "detach"):  # a torch tensor, without importing torch here
        x = x.detach().float().cpu().numpy()
    try:
        a = np.asarray(x, dtype=np.float64)
    except (TypeError, ValueError):
        raise TraceCircuitsError(f"{name} activations must be numeric; pass a float array [n_prompts, n_features]")
    if a.ndim != 2:
        raise TraceCircuitsError(
            f"{name} activations must be a 2-D array [n_prompts, n_features], got shape {tuple(a.shape)}; "
            f"aggregate each prompt's tokens first (e.g. max over tokens)")
    if a.shape[0] < 2:
        raise TraceCircuitsError(f"need at least 2 {name} prompts, got {a.shape[0]}; add {name} prompts")
    if not np.isfinite(a).all():
        raise TraceCircuitsError(f"{name} activations contain NaN or inf; check the SAE encoding (dtype overflow?) "
                                 f"or drop those prompts")
    return a


def _check_params(fire_threshold: float, alpha: float, max_benign_fire_rate: float, min_effect_size: float) -> None:
    def num(v):
        return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool) and math.isfinite(v)

    if not num(fire_threshold) or fire_threshold < 0:
        raise TraceCircuitsError(f"fire_threshold must be a number >= 0, got {fire_threshold!r}")
    if not num(alpha) or not 0 < alpha < 1:
        raise TraceCircuitsError(f"alpha must be strictly between 0 and 1 (e.g. 0.05), got {alpha!r}")
    if not num(max_benign_fire_rate) or not 0 <= max_benign_fire_rate <= 1:
        raise TraceCircuitsError(f"max_benign_fire_rate must be between 0 and 1 (e.g. 0.2), got {max_benign_fire_rate!r}")
    if not num(min_effect_size) or min_effect_size < 0:
        raise TraceCircuitsError(f"min_effect_size must be a number >= 0 (e.g. 0.5), got {min_effect_size!r}")


def _set_moments(X: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean and unbiased variance per column; columns constant within X get their value and variance 0 exactly."""
    const = X.max(0) == X.min(0)
    mean = X.mean(0)
    var = X.var(0, ddof=1)
    mean[const] = X[0, const]
    var[const] = 0.0
    return mean, var, const


def differential_feature_stats(
    harmful,
    benign,
    *,
    fire_threshold: float = 0.0,
    relative_fire_threshold: Optional[float] = None,
    alpha: float = 0.05,
    max_benign_fire_rate: float = 0.2,
    min_effect_size: float = 0.5,
    feature_ids: Optional[Sequence[int]] = None,
) -> pd.DataFrame:
    """Per-feature differential statistics and the harmful-feature selection (see the module docstring).

    ``harmful`` [n_H, F] and ``benign`` [n_B, F]: each feature's activation per prompt, aggregated over the
    prompt's tokens. ``feature_ids`` (optional, length F) names the columns when they are a subset of the SAE.

    Columns: feature, mean_harmful, mean_benign, mean_diff = mean_harmful - mean_benign, fire_rate_harmful,
    fire_rate_benign (fraction of prompts with activation > fire_threshold), fire_rate_diff, effect_size
    (Cohen's d with the pooled SD, clipped to +-1e6), p_value (one-sided Mann-Whitney U, harmful > benign; 1 for
    constant features), q_value (Benjamini-Hochberg over all F features), rejected_benign
    (fire_rate_benign > max_benign_fire_rate), harmful (q_value < alpha and mean_diff > 0 and
    effect_size >= min_effect_size and not rejected_benign), status.

    Rows are indexed by feature id and sorted: harmful features first, then by effect_size descending (ties by
    feature id). The parameters are kept in ``table.attrs["params"]``.
    """
    _check_params(fire_threshold, alpha, max_benign_fire_rate, min_effect_size)
    H = _as_matrix(harmful, "harmful")
    B = _as_matrix(benign, "benign")
    if H.shape[1] != B.shape[1]:
        raise TraceCircuitsError(f"harmful has {H.shape[1]} features but benign has {B.shape[1]}; "
                                 f"encode both prompt sets with the same SAE and feature subset")
    F = H.shape[1]
    if F == 0:
        raise TraceCircuitsError("the activation matrices have no feature columns; pass at least one SAE feature")
    if feature_ids is None:
        ids = np.arange(F, dtype=np.int64)
    else:
        ids = np.asarray(feature_ids).astype(np.int64).reshape(-1)
        if len(ids) != F or len(np.unique(ids)) != F:
            raise TraceCircuitsError(f"feature_ids must be {F} distinct ids, one per activation column")
    nH, nB = H.shape[0], B.shape[0]

    mean_h, var_h, const_h = _set_moments(H)
    mean_b, var_b, const_b = _set_moments(B)
    mean_diff = mean_h - mean_b
    pooled = np.sqrt(((nH - 1) * var_h + (nB - 1) * var_b) / (nH + nB - 2))
    with np.errstate(divide="ignore", invalid="ignore"):
        d = np.where(pooled > 0, mean_diff / np.where(pooled > 0, pooled, 1.0),
                     np.where(mean_diff == 0, 0.0, np.sign(mean_diff) * np.inf))
    d = np.clip(d, -EFFECT_SIZE_CLIP, EFFECT_SIZE_CLIP)

    if relative_fire_threshold is not None and not 0 <= relative_fire_threshold < 1:
        raise TraceCircuitsError(f"relative_fire_threshold must be in [0, 1), got {relative_fire_threshold!r}")
    theta = np.full(F, float(fire_threshold))
    if relative_fire_threshold:
        theta = np.maximum(theta, relative_fire_threshold * np.maximum(H.max(0), B.max(0)))
    fire_h = (H > theta).mean(0)
    fire_b = (B > theta).mean(0)

    constant = const_h & const_b & (mean_diff == 0)
    p = np.ones(F)
    live = ~constant
    if live.any():
        from scipy.stats import mannwhitneyu

        with warnings.catch_warnings(), np.errstate(all="ignore"):
            warnings.simplefilter("ignore", RuntimeWarning)
            p[live] = mannwhitneyu(H[:, live], B[:, live], alternative="greater", axis=0).pvalue
    p = np.clip(np.nan_to_num(p, nan=1.0), 0.0, 1.0)
    q = benjamini_hochberg(p)

    rejected = fire_b > max_benign_fire_rate
    is_harmful = (q < alpha) & (mean_diff > 0) & (d >= min_effect_size) & ~rejected
    status = np.full(F, STATUS_HARMFUL, dtype=object)
    # Assigned from the last test to the first, so the first failed test wins.
    status[rejected] = STATUS_BENIGN
    status[d < min_effect_size] = STATUS_SMALL
    status[q >= alpha] = STATUS_NOT_SIGNIFICANT
    status[mean_diff == 0] = STATUS_NO_DIFFERENCE
    status[mean_diff < 0] = STATUS_WEAKER
    status[constant] = STATUS_CONSTANT

    table = pd.DataFrame({
        "feature": ids, "mean_harmful": mean_h, "mean_benign": mean_b, "mean_diff": mean_diff,
        "fire_rate_harmful": fire_h, "fire_rate_benign": fire_b, "fire_rate_diff": fire_h - fire_b,
        "effect_size": d, "p_value": p, "q_value": q, "rejected_benign": rejected, "harmful": is_harmful,
        "status": status.astype(str),
    }, columns=COLUMNS)
    table = _sorted(table)
    table.attrs["params"] = dict(fire_threshold=float(fire_threshold),
                                 relative_fire_threshold=None if relative_fire_threshold is None
                                 else float(relative_fire_threshold), alpha=float(alpha),
                                 max_benign_fire_rate=float(max_benign_fire_rate),
                                 min_effect_size=float(min_effect_size), n_features=int(F))
    return table


def _sorted(table: pd.DataFrame) -> pd.DataFrame:
    order = np.lexsort((table["feature"].to_numpy(), -table["effect_size"].to_numpy(),
                        ~table["harmful"].to_numpy(dtype=bool)))
    out = table.iloc[order].copy()
    out.index = pd.Index(out["feature"].to_numpy(dtype=np.int64))
    return out


def selection_rule(params: dict) -> str:
    """The selection rule as one sentence, with the thresholds in ``params``."""
    g = lambda k, v: params.get(k, v)  # noqa: E731
    n = params.get("n_features")
    over = f"all {n} features" if n is not None else "all features"
    r = params.get("relative_fire_threshold")
    rel = f" and above {r} x its largest activation over all prompts" if r else ""
    return (f"A feature is harmful when its Benjamini-Hochberg q-value (one-sided Mann-Whitney U test, harmful > "
            f"benign, corrected over {over}) is < {g('alpha', 0.05)}, its mean activation is higher on harmful "
            f"than on benign prompts, its Cohen's d is >= {g('min_effect_size', 0.5)}, and it fires (activation > "
            f"{g('fire_threshold', 0.0)}{rel}) on at most {g('max_benign_fire_rate', 0.2)} of benign prompts.")


def _row_dict(row: pd.Series) -> dict:
    out = {"feature": int(row["feature"])}
    for c in _FLOAT_COLUMNS:
        out[c] = float(row[c])
    for c in _BOOL_COLUMNS:
        out[c] = bool(row[c])
    out["status"] = str(row["status"])
    return out


def _jsonable_examples(ex: dict) -> dict:
    out = {}
    for k in ("top_tokens", "top_prompts"):
        if k in ex and ex[k] is not None:
            out[k] = [[str(t), float(a)] for t, a in ex[k]]
    for k, v in ex.items():
        if k not in out and k not in ("top_tokens", "top_prompts"):
            out[k] = v
    return out
