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
