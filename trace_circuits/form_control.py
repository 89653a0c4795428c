"""Form control for stage 1: an onset layer that follows harmfulness, not the form of the prompt files.

Why: the label-permutation test of :mod:`trace_circuits.divergence` calls *any* systematic difference between two
prompt sets significant. On SmolLM2 the built-in benign requests against everyday instructions of another form
(two benign sets) give D up to 0.039 bits, ten times the harmful-vs-benign divergence on matched pairs (0.005), and
an "onset" at layer 4. With unmatched sets harm and form are confounded: no statistic of the two sets alone can
separate them. What separates them is a contrast in which form is held fixed: form-matched pairs.

Definition (``contrast="form_controlled"``, the default of :func:`~trace_circuits.divergence.scan_attention_divergence`)
---------------------------------------------------------------------------------------------------------------------
*Reference*: form-matched harmful/benign pairs: the built-in matched pairs (train split) or, with ``paired=True``, the
user's own two sets (index i of one is the twin of index i of the other).

1. **Where** (candidate layers): the divergence D_ref[l] of the reference pairs (the JSD of
   :mod:`trace_circuits.divergence`) with its permutation q-values; layer l is a candidate when q_ref[l] < alpha and
   D_ref[l] >= onset_fraction * max_l D_ref[l] (today's rule, on pairs where form cannot produce it).
2. **Whether** (harm transfer): per layer, a harm probe is fitted on the reference: logistic regression (L2,
   C = :data:`PROBE_C`) on z_i[l] = standardized log(a_i[l, h, s] + 1e-4) over heads x segments, cross-fitted over
   K = :data:`N_FOLDS` folds of pairs. T_ref[l] = its held-out AUROC on the reference. T[l] = the AUROC of the same
   probe between the user's harmful and benign prompts (a prompt that is also a reference prompt is scored by the
   fold model that did not see it; any other by the mean of the K models), with a percentile bootstrap CI over
   the user's prompts. The form control F[l] = max over form-only contrasts c (two *benign* sets of different form:
   the built-in benign requests vs everyday instructions, and the user's benign set vs the reference benign set) of
   max(AUROC_c[l], 1 - AUROC_c[l]): how far form alone moves the probe. Layer l passes when the lower CI bound of
   T[l] exceeds F[l] and T[l] - 0.5 >= transfer_fraction * (T_ref[l] - 0.5).

Onset: the first candidate layer that passes; ``None`` when none does (e.g. two benign sets).
``contrast="raw"`` keeps the earlier definition: the rule of step 1 applied to the user's own two sets.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
from jaxtyping import Float

from trace_circuits.stats import auroc, bootstrap_auroc, jsd_bits, normalize_last

PROBE_C = 0.05
N_FOLDS = 5
#: layers whose divergence measures form (the first three: on matched pairs they carry almost none)
FORM_LAYERS = 3


def _features(profiles: np.ndarray, layer: int) -> np.ndarray:
    return np.log(profiles[:, layer].reshape(len(profiles), -1) + 1e-4)


@dataclass
class HarmTransfer:
    """Per-layer harm-probe AUROCs: reference (held out), user's sets (with CI), and the form control."""

    reference: np.ndarray  # [L] T_ref
    user: np.ndarray  # [L] T
    user_ci: np.ndarray  # [L, 2]
    form_control: np.ndarray  # [L] F
    controls: dict  # name -> [L] AUROC of each form-only contrast


def harm_transfer(
    ref_harmful: Float[np.ndarray, "n L A S"], ref_benign: Float[np.ndarray, "n L A S"],
    harmful: Float[np.ndarray, "nh L A S"], benign: Float[np.ndarray, "nb L A S"],
    *, harmful_in_ref: Sequence[int], benign_in_ref: Sequence[int],
    controls: dict, n_bootstrap: int = 1000, alpha: float = 0.05, seed: int = 0,
) -> HarmTransfer:
    """The harm probe of step 2 (module docstring), layer by layer.

    ``harmful_in_ref[i]`` is the reference pair index of user harmful prompt i (-1 if it is not a reference prompt),
    likewise ``benign_in_ref``. ``controls``: name -> (set_a, set_b, a_in_ref, b_in_ref), two benign sets.
    """
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    n, L = len(ref_harmful), ref_harmful.shape[1]
    folds = np.arange(n) % N_FOLDS if n >= 2 * N_FOLDS else np.arange(n) % 2
    k = int(folds.max()) + 1
    rng = np.random.default_rng(seed)

    def scores(models, x: np.ndarray, in_ref: Sequence[int], layer: int) -> np.ndarray:
        z = _features(x, layer)
        all_scores = np.stack([m.decision_function(z) for m in models])  # [k, m]
        idx = np.asarray(in_ref, dtype=int)
        out = all_scores.mean(0)
        own = idx >= 0
        out[own] = all_scores[folds[idx[own]], np.nonzero(own)[0]]
        return out

    T_ref, T, T_ci, F = np.zeros(L), np.zeros(L), np.zeros((L, 2)), np.zeros(L)
    per_control = {name: np.zeros(L) for name in controls}
    for layer in range(L):
        models = []
        ref_scores_h, ref_scores_b = np.zeros(n), np.zeros(n)
        for f in range(k):
            tr = folds != f
            X = np.concatenate([_features(ref_harmful[tr], layer), _features(ref_benign[tr], layer)])
            y = np.r_[np.ones(tr.sum()), np.zeros(tr.sum())]
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", ConvergenceWarning)
                m = make_pipeline(StandardScaler(), LogisticRegression(C=PROBE_C, max_iter=2000)).fit(X, y)
            models.append(m)
            ref_scores_h[~tr] = m.decision_function(_features(ref_harmful[~tr], layer))
            ref_scores_b[~tr] = m.decision_function(_features(ref_benign[~tr], layer))
        T_ref[layer] = auroc(ref_scores_h, ref_scores_b)
        sh = scores(models, harmful, harmful_in_ref, layer)
        sb = scores(models, benign, benign_in_ref, layer)
        T[layer] = auroc(sh, sb)
        T_ci[layer] = bootstrap_auroc(sh, sb, n_bootstrap, alpha, rng)
        for name, (a, b, a_in, b_in) in controls.items():
            per_control[name][layer] = auroc(scores(models, a, a_in, layer), scores(models, b, b_in, layer))
    for auc in per_control.values():
        F = np.maximum(F, np.maximum(auc, 1 - auc))
    if not per_control:
        F[:] = 0.5
    return HarmTransfer(reference=T_ref, user=T, user_ci=T_ci, form_control=F, controls=per_control)


def transfer_passes(t: HarmTransfer, transfer_fraction: float) -> np.ndarray:
    """[L] bool: lower CI of T above the form control and T - 0.5 >= transfer_fraction * (T_ref - 0.5)."""
    return (t.user_ci[:, 0] > t.form_control) & (t.user - 0.5 >= transfer_fraction * (t.reference - 0.5))


def candidate_layers(per_layer: np.ndarray, q_values: np.ndarray, alpha: float, onset_fraction: float) -> np.ndarray:
    """[L] bool: q < alpha and D >= onset_fraction * max D (the rule of step 1)."""
    if per_layer.max() <= 0:
        return np.zeros(len(per_layer), dtype=bool)
    return (q_values < alpha) & (per_layer >= onset_fraction * per_layer.max())


def first_layer(mask: np.ndarray) -> Optional[int]:
    hits = np.nonzero(mask)[0]
    return int(hits[0]) if len(hits) else None


def form_ratio(user_per_layer: np.ndarray, ref_per_layer: np.ndarray) -> float:
    """How much more the user's two sets differ in form than the reference pairs: mean D over the first
    :data:`FORM_LAYERS` layers (where matched pairs carry almost no divergence), user / reference."""
    ref = float(np.mean(ref_per_layer[:FORM_LAYERS]))
    return float(np.mean(user_per_layer[:FORM_LAYERS])) / max(ref, 1e-6)


def pair_index(prompts: Sequence[str], reference: Sequence[str]) -> list[int]:
    """Index of each prompt in ``reference`` (-1 if absent): reference prompts are scored out of fold."""
    where = {p: i for i, p in enumerate(reference)}
    return [where.get(p, -1) for p in prompts]


def form_warning(result, enc_h, enc_b) -> str:
    """One line: the two sets differ in form far more than matched pairs, and what the onset is based on."""
    def mean_len(enc):
        return float(np.mean([e - s for s, e in enc.content_spans]))

    return (f"your two prompt sets differ in form {result.form_ratio:.0f}x more than the matched reference pairs "
            f"(divergence over the first {FORM_LAYERS} layers; mean length {mean_len(enc_h):.1f} vs "
            f"{mean_len(enc_b):.1f} tokens): their raw divergence measures form (raw onset: "
            f"{result.raw_onset_layer}); the onset is located on {result.reference.get('source')}. Pass --paired if "
            "your files are form twins, or --contrast raw for the uncontrolled curve")


def mean_divergence(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """D[l] between two sets of profiles (no statistics): the form-only control curve of the plot."""
    P, R = normalize_last(a.mean(0)), normalize_last(b.mean(0))
    return jsd_bits(P, R).mean(-1)
