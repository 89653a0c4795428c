"""Stage 2 statistics: differential SAE-feature activation (pure numpy/scipy, no model)."""

import json

import numpy as np
import pytest

from trace_circuits import TraceCircuitsError
from trace_circuits.features import FORMAT_VERSION, FeatureResult, differential_feature_stats

N_H, N_B, N_F = 40, 40, 300


def sparse_noise(rng, n, f, offset=1.0):
    """SAE-like noise: rectified normal, fires on ~16% of prompts, many exact zeros (ties)."""
    return np.maximum(rng.normal(size=(n, f)) - offset, 0.0)


def planted_sets(seed=0):
    rng = np.random.default_rng(seed)
    H = sparse_noise(rng, N_H, N_F)
    B = sparse_noise(rng, N_B, N_F)
    # Feature 17: fires at ~5 on 36 of 40 harmful prompts, never on benign ones.
    H[:, 17] = 0.0
    H[:36, 17] = 5.0 + 0.1 * rng.normal(size=36)
    B[:, 17] = 0.0
    # Feature 42: the same distribution on both sets (fires on half of each).
    H[:, 42] = np.where(np.arange(N_H) % 2 == 0, 3.0 + rng.random(N_H), 0.0)
    B[:, 42] = np.where(np.arange(N_B) % 2 == 0, 3.0 + rng.random(N_B), 0.0)
    # Feature 99: much stronger on harmful, but also fires on 30% of benign prompts.
    H[:, 99] = 6.0 + rng.random(N_H)
    B[:, 99] = 0.0
    B[:12, 99] = 1.0 + rng.random(12)
    # Feature 123: higher on benign.
    H[:, 123] = 0.0
    B[:, 123] = 4.0 + rng.random(N_B)
    # Feature 200: dead.
    H[:, 200] = 0.0
    B[:, 200] = 0.0
    return H, B


@pytest.fixture(scope="module")
def planted_table():
    H, B = planted_sets()
    return H, B, differential_feature_stats(H, B)


def test_planted_feature_flagged_first(planted_table):
    H, B, t = planted_table
    assert t.iloc[0]["feature"] == 17 and t.index[0] == 17
    row = t.loc[17]
    assert bool(row["harmful"]) and row["status"] == "harmful"
    assert row["fire_rate_harmful"] == pytest.approx(36 / 40)
    assert row["fire_rate_benign"] == 0.0
    assert row["fire_rate_diff"] == pytest.approx(36 / 40)
    h, b = H[:, 17], B[:, 17]
    pooled = np.sqrt(((N_H - 1) * h.var(ddof=1) + (N_B - 1) * b.var(ddof=1)) / (N_H + N_B - 2))
    assert row["mean_diff"] == pytest.approx(h.mean() - b.mean())
    assert row["effect_size"] == pytest.approx((h.mean() - b.mean()) / pooled)
    assert row["effect_size"] > 2.5
    assert row["q_value"] < 1e-6
    # The planted feature is the only harmful one among the noise features (99 is rejected, see below).
    assert set(t.index[t["harmful"]]) == {17}


def test_sorting_harmful_first_then_effect_size(planted_table):
    _, _, t = planted_table
    flags = t["harmful"].to_numpy()
    assert not np.any(~flags[:-1] & flags[1:])  # no harmful row after a non-harmful one
    rest = t[~t["harmful"]]["effect_size"].to_numpy()
    assert np.all(np.diff(rest) <= 0)


def test_equal_distribution_not_flagged(planted_table):
    _, _, t = planted_table
    row = t.loc[42]
    assert not row["harmful"]
    assert row["fire_rate_harmful"] == row["fire_rate_benign"] == 0.5
    assert abs(row["effect_size"]) < 0.5 and row["q_value"] > 0.05


def test_fires_on_benign_rejected(planted_table):
    _, _, t = planted_table
    row = t.loc[99]
    assert row["fire_rate_benign"] == pytest.approx(0.3)
    assert row["q_value"] < 1e-6 and row["effect_size"] > 0.5 and row["mean_diff"] > 0
    assert bool(row["rejected_benign"]) and not bool(row["harmful"])
    assert "benign" in row["status"]
    # With a looser benign rule the same feature is accepted.
    t2 = differential_feature_stats(*planted_sets()[:2], max_benign_fire_rate=0.5)
    assert bool(t2.loc[99, "harmful"]) and not bool(t2.loc[99, "rejected_benign"])


def test_higher_on_benign_not_flagged(planted_table):
    _, _, t = planted_table
    row = t.loc[123]
    assert not row["harmful"] and row["mean_diff"] < 0 and row["effect_size"] < 0
    assert row["p_value"] > 0.99
    assert row["status"] == "weaker on harmful"


def test_dead_feature_and_no_nans(planted_table):
    _, _, t = planted_table
    row = t.loc[200]
    assert row["p_value"] == 1.0 and row["q_value"] == 1.0 and row["effect_size"] == 0.0
    assert not row["harmful"] and row["status"] == "constant"
    numeric = t.drop(columns=["status"]).to_numpy(dtype=float)
    assert np.isfinite(numeric).all()
    assert len(t) == N_F and sorted(t["feature"]) == list(range(N_F))


def test_global_null_controls_false_discoveries():
    rng = np.random.default_rng(1234)
    H = sparse_noise(rng, 30, 2000, offset=0.0)
    B = sparse_noise(rng, 30, 2000, offset=0.0)
    t = differential_feature_stats(H, B)
    assert int(t["harmful"].sum()) <= 2
    assert int((t["q_value"] < 0.05).sum()) <= 2
    # Uncorrected p-values are roughly uniform under the null: a few percent fall below 0.05.
    frac = float((t["p_value"] < 0.05).mean())
    assert 0.01 < frac < 0.1


def test_zero_pooled_sd_is_finite_and_clipped():
    H = np.ones((5, 2))
    B = np.zeros((5, 2))
    H[:, 1] = 0.0
    B[:, 1] = 1.0
    t = differential_feature_stats(H, B)
    assert t.loc[0, "effect_size"] == 1e6 and t.loc[1, "effect_size"] == -1e6
    assert t.loc[0, "p_value"] < 0.01 and bool(t.loc[0, "harmful"])


def test_cohens_d_by_hand():
    H = np.array([[1.0], [2.0], [3.0]])
    B = np.array([[0.0], [0.0], [1.0]])
    t = differential_feature_stats(H, B)
    expected = (2.0 - 1.0 / 3.0) / np.sqrt((2 * 1.0 + 2 * (1.0 / 3.0)) / 4)
    assert t.loc[0, "effect_size"] == pytest.approx(expected)
    assert t.loc[0, "fire_rate_benign"] == pytest.approx(1 / 3)


@pytest.mark.parametrize("harmful, benign, kwargs, words", [
    (np.zeros(5), np.zeros((5, 1)), {}, "2-D"),
    (np.zeros((5, 3)), np.zeros((5, 4)), {}, "same SAE"),
    (np.zeros((1, 3)), np.zeros((5, 3)), {}, "at least 2"),
    (np.full((5, 3), np.nan), np.zeros((5, 3)), {}, "NaN"),
    (np.zeros((5, 3)), np.full((5, 3), np.inf), {}, "NaN or inf"),
    (np.zeros((5, 3)), np.zeros((5, 3)), {"fire_threshold": -1.0}, "fire_threshold"),
    (np.zeros((5, 3)), np.zeros((5, 3)), {"alpha": 1.5}, "alpha"),
    (np.zeros((5, 3)), np.zeros((5, 3)), {"alpha": 0.0}, "alpha"),
    (np.zeros((5, 3)), np.zeros((5, 3)), {"min_effect_size": -0.1}, "min_effect_size"),
    (np.zeros((5, 3)), np.zeros((5, 3)), {"max_benign_fire_rate": 2.0}, "max_benign_fire_rate"),
])
def test_bad_input_one_line_error(harmful, benign, kwargs, words):
    with pytest.raises(TraceCircuitsError) as err:
        differential_feature_stats(harmful, benign, **kwargs)
    msg = str(err.value)
    assert words in msg and "\n" not in msg


def test_realistic_size_of_pure_noise_flags_almost_nothing():
    rng = np.random.default_rng(0)
    H = sparse_noise(rng, 150, 4608)
    B = sparse_noise(rng, 150, 4608)
    t = differential_feature_stats(H, B)
    assert len(t) == 4608 and t["harmful"].sum() <= 0.01 * 4608  # BH keeps false discoveries rare


def make_result():
    H, B = planted_sets()
    examples = {17: {"top_tokens": [["bomb", 5.2], ["weapon", 4.9]], "top_prompts": [["How do I build a bomb", 5.2]]}}
    return FeatureResult.from_activations(H, B, model="tiny", hook_name="blocks.3.hook_resid_post",
                                          sae_id="layer_3", examples=examples, params={"aggregation": "max"})


def test_json_round_trip():
    res = make_result()
    assert res.harmful_features == [17]
    data = json.loads(json.dumps(res.to_json(), allow_nan=False))
    assert data["format_version"] == FORMAT_VERSION
    assert data["harmful_features"] == [17]
    assert "0.05" in data["rule"] and "0.5" in data["rule"] and "0.2" in data["rule"]
    assert data["params"]["aggregation"] == "max" and data["params"]["n_features"] == N_F
    assert len(data["features"]) == 1 + 50  # the harmful one plus the top 50 others
    assert data["features"][0]["examples"]["top_tokens"][0] == ["bomb", 5.2]
    back = FeatureResult.from_json(data)
    assert back.harmful_features == [17]
    assert (back.model, back.hook_name, back.sae_id, back.n_harmful, back.n_benign) == (
        "tiny", "blocks.3.hook_resid_post", "layer_3", N_H, N_B)
    orig = res.table.loc[back.table.index]
    for col in ["effect_size", "q_value", "p_value", "mean_diff", "fire_rate_benign"]:
        np.testing.assert_allclose(back.table[col].to_numpy(), orig[col].to_numpy())
    assert list(back.table["status"]) == list(orig["status"])
    assert back.examples[17]["top_tokens"][1] == ["weapon", 4.9]
    assert back.to_json()["features"] == data["features"]


def test_newer_format_refused():
    data = make_result().to_json()
    data["format_version"] = FORMAT_VERSION + 1
    with pytest.raises(TraceCircuitsError, match="upgrade trace-circuits"):
        FeatureResult.from_json(data)


def test_plot_and_save(tmp_path):
    res = make_result()
    fig = res.plot()
    types = {tr.type for tr in fig.data}
    assert {"scatter", "bar"} <= types
    bars = [tr for tr in fig.data if tr.type == "bar"]
    assert list(bars[0].x) == ["f17"]
    hover = [tr for tr in fig.data if tr.type == "scatter" and tr.name == "harmful"][0]
    assert "bomb" in str(hover.customdata[0][5])
    paths = res.save(tmp_path / "out")
    assert set(paths) == {"json", "html"}
    assert json.loads(paths["json"].read_text())["harmful_features"] == [17]
    page = paths["html"].read_text()
    assert paths["html"].name == "features.html" and "plotly" in page.lower() and "bomb" in page


def test_relative_fire_threshold_ignores_faint_benign_activity():
    """A feature strong on harmful prompts and only faintly active on every benign prompt (a TopK SAE's max over
    tokens is rarely exactly zero) is rejected by the absolute rule but kept by the relative one."""
    rng = np.random.default_rng(0)
    H = rng.uniform(0.0, 0.05, size=(60, 5))
    B = rng.uniform(0.0, 0.05, size=(60, 5))
    H[:, 2] = rng.uniform(5.0, 10.0, size=60)
    B[:, 2] = rng.uniform(0.05, 0.3, size=60)
    absolute = differential_feature_stats(H, B)
    assert not absolute.loc[2, "harmful"] and absolute.loc[2, "status"] == "rejected: fires on benign"
    relative = differential_feature_stats(H, B, relative_fire_threshold=0.2)
    assert relative.loc[2, "harmful"] and relative.loc[2, "fire_rate_benign"] == 0.0
    assert relative.attrs["params"]["relative_fire_threshold"] == 0.2
    with pytest.raises(TraceCircuitsError, match="relative_fire_threshold"):
        differential_feature_stats(H, B, relative_fire_threshold=1.5)
