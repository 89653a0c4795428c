"""The statistics used across stages, each in one place (scipy / scikit-learn where they already do the job)."""

from __future__ import annotations

import math
from typing import Optional, Sequence

import numpy as np


def auroc(positive: Sequence[float], negative: Sequence[float]) -> float:
    """Area under the ROC curve of scores separating ``positive`` from ``negative``:
    ``P(s_pos > s_neg) + 1/2 P(s_pos = s_neg)`` (scikit-learn's ``roc_auc_score``)."""
    from sklearn.metrics import roc_auc_score

    pos, neg = np.asarray(positive, dtype=float).ravel(), np.asarray(negative, dtype=float).ravel()
    if len(pos) == 0 or len(neg) == 0:
        return float("nan")
    return float(roc_auc_score(np.r_[np.ones(len(pos)), np.zeros(len(neg))], np.r_[pos, neg]))


def bootstrap_auroc(positive: Sequence[float], negative: Sequence[float], n_bootstrap: int, alpha: float,
                    rng: np.random.Generator) -> tuple[float, float]:
    """Percentile bootstrap CI of :func:`auroc` (both sets resampled): with G[i, j] = 1[pos_i > neg_j] + 1/2 1[=],
    a resample with count weights w_p, w_n has AUROC = w_p^T G w_n / (n_p n_n), all resamples in one product."""
    pos, neg = np.asarray(positive, dtype=float).ravel(), np.asarray(negative, dtype=float).ravel()
    d = pos[:, None] - neg[None, :]
    G = (d > 0) + 0.5 * (d == 0)
    if n_bootstrap <= 0:
        return float(G.mean()), float(G.mean())
    wp = rng.multinomial(len(pos), np.full(len(pos), 1 / len(pos)), size=n_bootstrap) / len(pos)
    wn = rng.multinomial(len(neg), np.full(len(neg), 1 / len(neg)), size=n_bootstrap) / len(neg)
    boot = ((wp @ G) * wn).sum(1)
    return float(np.percentile(boot, 100 * alpha / 2)), float(np.percentile(boot, 100 * (1 - alpha / 2)))


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a proportion k/n."""
    if n == 0:
        return (float("nan"), float("nan"))
    p = k / n
    d = 1 + z * z / n
    c = (p + z * z / (2 * n)) / d
    h = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return (max(0.0, c - h), min(1.0, c + h))


def rate(flags) -> dict:
    """``{"rate", "k", "n", "ci"}`` of a boolean array, with its Wilson interval."""
    k, n = int(np.sum(flags)), len(flags)
    return {"rate": k / n if n else float("nan"), "k": k, "n": n, "ci": list(wilson(k, n))}


def benjamini_hochberg(p: Sequence[float]) -> np.ndarray:
    """BH-adjusted q-values (monotone, capped at 1), scipy's ``false_discovery_control``."""
    from scipy.stats import false_discovery_control

    return false_discovery_control(np.asarray(p, dtype=float), method="bh")


def spearman(a: Sequence[float], b: Sequence[float]) -> Optional[float]:
    """Spearman rank correlation (None with fewer than 3 pairs or a constant side)."""
    from scipy.stats import spearmanr

    if len(a) < 3:
        return None
    rho = spearmanr(a, b).statistic
    return None if not np.isfinite(rho) else float(rho)


def jsd_bits(p: np.ndarray, q: np.ndarray, axis: int = -1) -> np.ndarray:
    """Jensen-Shannon divergence in bits along ``axis``: 1/2 KL(p||m) + 1/2 KL(q||m), m = (p+q)/2."""
    m = 0.5 * (p + q)

    def kl(a, b):
        with np.errstate(divide="ignore", invalid="ignore"):
            t = np.where(a > 0, a * (np.log2(np.where(a > 0, a, 1.0)) - np.log2(np.where(b > 0, b, 1.0))), 0.0)
        return t.sum(axis=axis)

    return np.clip(0.5 * kl(p, m) + 0.5 * kl(q, m), 0.0, 1.0)


def normalize_last(x: np.ndarray) -> np.ndarray:
    """x / sum over the last axis (distributions from non-negative masses)."""
    return x / np.clip(x.sum(-1, keepdims=True), 1e-12, None)
