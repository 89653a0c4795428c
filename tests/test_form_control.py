"""The form-controlled onset rule of stage 1 on profiles with a planted harm layer and a planted form shift."""

import numpy as np

from trace_circuits import divergence_from_profiles
from trace_circuits import form_control as fc
from trace_circuits.stats import auroc, bootstrap_auroc

L, A, S = 4, 2, 5
HARM_LAYER = 2


def profiles(n, rng, harmful=False, form=False):
    """Segment profiles [n, L, A, S]: harm moves head 0 of layer 2 onto segment 3; form moves head 1 of every layer
    onto segment 1 (a different direction, and far larger)."""
    x = rng.dirichlet(np.full(S, 20.0), size=(n, L, A))
    if harmful:
        x[:, HARM_LAYER, 0, 3] += 0.15
    if form:
        x[:, :, 1, 1] += 0.6
    return x / x.sum(-1, keepdims=True)


def onset(ref_h, ref_b, user_h, user_b, controls, h_in=None, b_in=None):
    ref = divergence_from_profiles(ref_h, ref_b, n_bootstrap=0, n_permutations=200)
    t = fc.harm_transfer(ref_h, ref_b, user_h, user_b, harmful_in_ref=h_in or [-1] * len(user_h),
                         benign_in_ref=b_in or [-1] * len(user_b), controls=controls, n_bootstrap=300)
    cand = fc.candidate_layers(ref.per_layer, ref.q_values, 0.05, 0.5)
    return fc.first_layer(cand & fc.transfer_passes(t, 0.5)), t


def test_form_shift_moves_the_raw_onset_but_not_the_form_controlled_one():
    rng = np.random.default_rng(0)
    ref_h, ref_b = profiles(80, rng, harmful=True), profiles(80, rng)
    user_h, user_b = profiles(40, rng, harmful=True), profiles(40, rng, form=True)  # benign file of another form
    raw = divergence_from_profiles(user_h, user_b, n_bootstrap=0, n_permutations=200)
    assert raw.onset_layer == 0  # the form shift is the largest split and starts at layer 0
    controls = {"user benign vs ref benign": (user_b, ref_b, [-1] * 40, list(range(80)))}
    got, t = onset(ref_h, ref_b, user_h, user_b, controls)
    assert got == HARM_LAYER
    assert t.reference[HARM_LAYER] > 0.9 and t.user[HARM_LAYER] > 0.9 and t.form_control[HARM_LAYER] < 0.75


def test_two_benign_sets_of_different_form_have_no_onset():
    rng = np.random.default_rng(1)
    ref_h, ref_b = profiles(80, rng, harmful=True), profiles(80, rng)
    user_a, user_b = profiles(40, rng), profiles(40, rng, form=True)
    assert divergence_from_profiles(user_a, user_b, n_bootstrap=0, n_permutations=200).onset_layer is not None
    controls = {"user benign vs ref benign": (user_b, ref_b, [-1] * 40, list(range(80)))}
    got, t = onset(ref_h, ref_b, user_a, user_b, controls)
    assert got is None
    assert abs(t.user[HARM_LAYER] - 0.5) < 0.2


def test_reference_prompts_are_scored_out_of_fold():
    """The reference's own prompts given as the user's sets: scored by the fold model that did not see them, so
    the transfer equals the held-out reference AUROC (no leakage)."""
    rng = np.random.default_rng(2)
    ref_h, ref_b = profiles(60, rng, harmful=True), profiles(60, rng)
    idx = list(range(60))
    t = fc.harm_transfer(ref_h, ref_b, ref_h, ref_b, harmful_in_ref=idx, benign_in_ref=idx, controls={},
                         n_bootstrap=0)
    assert np.allclose(t.user, t.reference)
    assert np.all(t.reference[[0, 1, 3]] < 0.75)  # no harm there: held-out AUROC near chance
    assert fc.pair_index(["b", "x"], ["a", "b"]) == [1, -1]


def test_bootstrap_auroc_brackets_the_point_estimate():
    rng = np.random.default_rng(3)
    pos, neg = rng.normal(1, 1, 50), rng.normal(0, 1, 60)
    lo, hi = bootstrap_auroc(pos, neg, 500, 0.05, rng)
    assert lo < auroc(pos, neg) < hi and 0.6 < lo and hi < 0.95
