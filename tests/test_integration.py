"""Stage 1 on the real model with the built-in prompts: harmful and benign attention really split."""

import numpy as np
import pytest

from trace_circuits import builtin_prompts, scan_attention_divergence

pytestmark = pytest.mark.slow


def test_real_model_has_a_significant_onset_layer(real_model):
    harmful, benign = builtin_prompts("harmful", "train"), builtin_prompts("benign", "train")
    res = scan_attention_divergence(real_model, harmful, benign, n_bootstrap=300, n_permutations=300,
                                    progress=False)
    assert res.n_harmful == res.n_benign == len(harmful) >= 140
    assert res.onset_layer is not None
    l = res.onset_layer
    assert res.q_values[l] < 0.05
    assert res.per_layer[l] > res.null_threshold[l]  # above what shuffled labels give
    assert res.per_layer_ci[l, 0] > 0
    # the split is absent in the first layers and builds up with depth
    assert res.per_layer[:3].max() < res.per_layer.max() / 4
    assert np.all(np.isfinite(res.per_head)) and (res.per_head >= 0).all()


def _scan(model, harmful, benign, **kw):
    import warnings

    from trace_circuits.errors import FormWarning

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FormWarning)
        return scan_attention_divergence(model, harmful, benign, n_bootstrap=300, n_permutations=300, progress=False,
                                         **kw)


def test_form_controlled_onset_survives_unmatched_prompt_sets(real_model):
    """Issue 15's validation: (a) the built-in matched pairs, (b) built-in harmful vs everyday instructions (benign,
    another form), (d) rephrased harmful requests (another form) vs built-in benign, (e) the rephrased twins as their
    own pairs all give onsets within 3 layers; (c) two benign sets of different form give none, where the raw rule
    finds an early "onset" in every unmatched case."""
    b = builtin_prompts
    a = _scan(real_model, b("harmful", "train"), b("benign", "train"))
    assert a.onset_layer is not None and a.onset_layer == a.raw_onset_layer  # matched: the two rules agree
    cases = {"b": _scan(real_model, b("harmful", "test"), b("everyday", "test")),
             "d": _scan(real_model, b("rephrased_harmful", "all"), b("benign", "test")),
             "e": _scan(real_model, b("rephrased_harmful", "all"), b("rephrased_benign", "all"), paired=True)}
    for name, res in cases.items():
        assert res.onset_layer is not None and abs(res.onset_layer - a.onset_layer) <= 3, (name, res.onset_layer)
    for name in ("b", "d"):  # unmatched: the raw rule follows form to an early layer, and the user is warned
        res = cases[name]
        assert res.raw_onset_layer is not None and res.raw_onset_layer < a.onset_layer - 3, name
        assert res.form_ratio > 10 and "differ in form" in res.params["form_warning"]
    for harmful, benign in ((b("benign", "test"), b("everyday", "test")),
                            (b("rephrased_benign", "all"), b("everyday", "test"))):
        c = _scan(real_model, harmful, benign)
        assert c.onset_layer is None and c.raw_onset_layer is not None
        l = a.onset_layer
        assert c.transfer["user"][l] - 0.5 < c.transfer["transfer_fraction"] * (c.transfer["reference"][l] - 0.5)
