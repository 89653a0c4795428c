import json

import numpy as np
import pytest
import torch
from conftest import tiny_model

from trace_circuits import DivergenceResult, TraceCircuitsError, divergence_from_profiles, scan_attention_divergence
from trace_circuits.attention_profiles import collect_attention_profiles, segment_ids
from trace_circuits.stats import jsd_bits
from trace_circuits.prompts import EncodedPrompts

TRIGGER, NEUTRAL = 1, 2


def encoded(seqs, spans=None):
    spans = spans or [(1, len(s) - 1) for s in seqs]
    return EncodedPrompts([str(s) for s in seqs], [list(s) for s in seqs], spans, pad_token_id=0)


def planted_model(layer: int = 2):
    """Uniform attention everywhere except head 0 of ``layer``, which attends to the TRIGGER token.

    All W_Q/b_Q are zero (scores 0, so causal-uniform attention) and W_O = 0 (the residual stream is just the
    token embedding). TRIGGER's embedding is e_0 and every other token's has no e_0 component; in ``layer``
    head 0 the key reads e_0 and the query bias is large, so that head looks at TRIGGER tokens.
    """
    model = tiny_model(positional="standard", normalization=None, n_layers=4)
    with torch.no_grad():
        for blk in model.blocks:
            blk.attn.W_Q.zero_()
            blk.attn.b_Q.zero_()
            blk.attn.W_O.zero_()
            blk.mlp.W_out.zero_()
            blk.mlp.b_out.zero_()
        model.pos_embed.W_pos.zero_()
        model.embed.W_E[:, 0] = 0.0
        model.embed.W_E[TRIGGER] = 0.0
        model.embed.W_E[TRIGGER, 0] = 1.0
        attn = model.blocks[layer].attn
        attn.W_K[0].zero_()
        attn.W_K[0, 0, 0] = 1.0
        attn.b_K[0].zero_()
        attn.b_Q[0, 0] = 20.0
    return model


def make_sets(n=12, seed=0, vary_length=False):
    rng = np.random.default_rng(seed)
    harmful, benign = [], []
    for i in range(n):
        length = int(rng.integers(8, 16)) if vary_length else 12
        seq = rng.integers(3, 40, size=length).tolist()
        pos = int(rng.integers(2, length - 2))
        h = list(seq)
        h[pos] = TRIGGER
        b = list(seq)
        b[pos] = NEUTRAL
        harmful.append(h)
        benign.append(b)
    return encoded(harmful), encoded(benign)


def test_jsd_bits_properties():
    p = np.array([0.5, 0.5, 0.0])
    q = np.array([0.0, 0.5, 0.5])
    assert jsd_bits(p, p) == pytest.approx(0.0)
    assert jsd_bits(p, q) == pytest.approx(jsd_bits(q, p))
    assert jsd_bits(np.array([1.0, 0.0]), np.array([0.0, 1.0])) == pytest.approx(1.0)
    assert 0 < jsd_bits(p, q) < 1


def test_identical_sets_have_zero_divergence_and_no_onset():
    model = tiny_model()
    h, _ = make_sets()
    res = scan_attention_divergence(model, h, h, n_bootstrap=50, n_permutations=50, progress=False, contrast="raw")
    assert np.all(res.per_head == 0.0)
    assert np.all(res.per_layer == 0.0)
    assert res.onset_layer is None


def test_planted_difference_is_found_in_its_layer():
    model = planted_model(layer=2)
    h, b = make_sets(n=40)
    res = scan_attention_divergence(model, h, b, n_bootstrap=200, n_permutations=500, progress=False, contrast="raw")
    assert res.per_layer[2] > 0.01
    assert np.allclose(res.per_layer[[0, 1, 3]], 0.0, atol=1e-9)
    assert int(np.argmax(res.per_head[2])) == 0 and np.allclose(res.per_head[2, 1:], 0.0, atol=1e-9)
    assert res.onset_layer == 2
    assert res.q_values[2] < 0.05 and res.per_layer_ci[2, 0] > 0
    # benign attention stays causal-uniform (10 of 12 tokens are content); harmful moves onto the trigger
    c = [i for i, s in enumerate(res.segments) if s.startswith("content")]
    assert res.benign_profile[2, 0, c].sum() == pytest.approx(10 / 12, abs=1e-5)
    assert res.harmful_profile[2, 0, c].sum() > 0.95


def test_onset_is_the_first_layer_of_a_split_that_persists():
    model = planted_model(layer=1)
    with torch.no_grad():  # a second, stronger copy of the trigger head in layer 3
        for name in ("W_K", "b_K", "b_Q"):
            getattr(model.blocks[3].attn, name).copy_(getattr(model.blocks[1].attn, name))
    h, b = make_sets(n=40)
    res = scan_attention_divergence(model, h, b, n_bootstrap=100, n_permutations=500, progress=False, contrast="raw")
    assert res.per_layer[1] > 0 and res.per_layer[3] > 0
    assert res.onset_layer == 1


@pytest.mark.parametrize("positional,norm", [("rotary", "RMS"), ("standard", "LN")])
def test_padding_and_batching_do_not_change_profiles(positional, norm):
    model = tiny_model(positional=positional, normalization=norm)
    h, _ = make_sets(n=10, vary_length=True, seed=3)
    assert len(set(map(len, h.input_ids))) > 3
    one = collect_attention_profiles(model, h, batch_size=1, progress=False)
    many = collect_attention_profiles(model, h, batch_size=10, progress=False)
    assert np.allclose(one, many, atol=1e-5)
    assert np.allclose(one.sum(-1), 1.0, atol=1e-5)  # each profile is a distribution over segments


def test_segments_cover_template_and_content():
    enc = encoded([[9, 9, 9, 5, 6, 7, 8, 9, 9]], spans=[(3, 7)])
    seg = segment_ids(enc, [0], width=11, n_content_bins=2)[0].tolist()
    # 2 padding, sink, 2 prefix, content_1 x2, content_2 x2, suffix x2
    assert seg == [5, 5, 0, 1, 1, 2, 2, 3, 3, 4, 4]


def test_result_json_round_trip_and_plot(tmp_path):
    rng = np.random.default_rng(0)
    H = rng.dirichlet(np.ones(11), size=(6, 3, 2))
    B = rng.dirichlet(np.ones(11), size=(7, 3, 2))
    res = divergence_from_profiles(H, B, model_name="toy", n_bootstrap=20, n_permutations=20)
    data = json.loads(json.dumps(res.to_json()))
    for key in ("model", "metric", "per_layer", "per_head", "onset_layer", "n_harmful", "n_benign"):
        assert key in data
    back = DivergenceResult.from_json(data)
    assert np.allclose(back.per_head, res.per_head) and back.onset_layer == res.onset_layer
    fig = res.plot()
    assert {t.type for t in fig.data} >= {"heatmap", "scatter", "bar"}
    paths = res.save(tmp_path)
    assert json.loads(paths["json"].read_text())["n_harmful"] == 6
    assert "plotly" in paths["html"].read_text()
    with pytest.raises(TraceCircuitsError, match="newer"):
        DivergenceResult.from_json({**data, "format_version": 99})


def test_paired_form_controlled_scan_finds_the_planted_layer_and_round_trips(tmp_path):
    """Twins (paired=True) are their own reference: the planted layer is a candidate and the harm probe fitted on
    the pairs separates them there (held out), so the form-controlled onset is the planted layer."""
    model = planted_model(layer=2)
    h, b = make_sets(n=40)
    res = scan_attention_divergence(model, h, b, n_bootstrap=200, n_permutations=300, progress=False, paired=True,
                                    form_control_prompts=0)
    assert res.contrast == "form_controlled" and res.onset_layer == 2 and res.raw_onset_layer == 2
    assert res.reference["source"] == "your paired sets" and res.reference["n_pairs"] == 40
    assert res.transfer["user"][2] > 0.9 and res.transfer["passes"][2]
    assert "paired" in res.onset_source
    back = DivergenceResult.load(res.save(tmp_path, html=False)["json"].parent)
    assert back.contrast == "form_controlled" and back.transfer["user"] == res.transfer["user"]
    kinds = {t.name for t in back.plot().data}
    assert any("harm transfer" in (k or "") for k in kinds) and any("form control" in (k or "") for k in kinds)


def test_form_controlled_scan_without_a_tokenizer_is_one_line():
    model = planted_model(layer=2)
    h, b = make_sets(n=6)
    with pytest.raises(TraceCircuitsError, match="contrast='raw'"):
        scan_attention_divergence(model, h, b, progress=False)
    with pytest.raises(TraceCircuitsError, match="equal size"):
        scan_attention_divergence(model, h, encoded(b.input_ids[:4]), progress=False, paired=True, form_control_prompts=0)


def test_version_1_scan_files_load_as_raw_contrast():
    rng = np.random.default_rng(0)
    res = divergence_from_profiles(rng.dirichlet(np.ones(11), size=(6, 3, 2)), rng.dirichlet(np.ones(11), size=(7, 3, 2)),
                                   n_bootstrap=10, n_permutations=10)
    data = res.to_json()
    for key in ("contrast", "raw_onset_layer", "reference", "transfer", "form_ratio", "onset_source"):
        data.pop(key)
    back = DivergenceResult.from_json({**data, "format_version": 1})
    assert back.contrast == "raw" and back.raw_onset_layer == res.onset_layer and "raw contrast" in back.onset_source


def test_scan_rejects_too_few_prompts():
    model = tiny_model()
    h, b = make_sets(n=3)
    with pytest.raises(TraceCircuitsError, match="at least 2"):
        scan_attention_divergence(model, encoded(h.input_ids[:1]), b, progress=False)


def test_interrupted_scan_resumes_from_its_checkpoint(tmp_path):
    model = tiny_model()
    h, _ = make_sets(n=12, vary_length=True, seed=5)
    full = collect_attention_profiles(model, h, batch_size=2, progress=False)
    ck = tmp_path / "scan.safetensors"
    calls = {"n": 0}

    def crash_after_four(act, hook):
        calls["n"] += 1
        if calls["n"] > 4:
            raise KeyboardInterrupt
        return None

    model.add_hook("hook_embed", crash_after_four)
    with pytest.raises(KeyboardInterrupt):
        collect_attention_profiles(model, h, batch_size=2, progress=False, checkpoint=ck, checkpoint_every=2)
    model.reset_hooks(including_permanent=True)
    assert ck.exists()
    counter = {"n": 0}
    model.add_hook("hook_embed", lambda act, hook: counter.__setitem__("n", counter["n"] + 1))
    resumed = collect_attention_profiles(model, h, batch_size=2, progress=False, checkpoint=ck, checkpoint_every=2)
    model.reset_hooks(including_permanent=True)
    assert counter["n"] == 6 - 4  # only the batches not yet saved were run again
    assert np.allclose(resumed, full, atol=1e-6)
    assert not ck.exists()  # removed once complete


def test_checkpoint_of_other_prompts_is_not_reused(tmp_path):
    model = tiny_model()
    h, b = make_sets(n=6, seed=1)
    ck = tmp_path / "scan.safetensors"
    from trace_circuits.attention_profiles import _checkpoint_key, _write_checkpoint

    _write_checkpoint(ck, _checkpoint_key(model, b, 8, 1), torch.ones(6, 4, 4, 11), torch.ones(6, dtype=torch.bool))
    with pytest.warns(UserWarning, match="other prompts"):
        out = collect_attention_profiles(model, h, batch_size=3, progress=False, checkpoint=ck)
    assert np.allclose(out.sum(-1), 1.0, atol=1e-5)  # recomputed, not the planted ones
    ck.write_bytes(b"not a safetensors file")
    with pytest.warns(UserWarning, match="unreadable"):
        collect_attention_profiles(model, h, batch_size=3, progress=False, checkpoint=ck)


def test_builtin_twins_are_recognised_in_any_selection():
    from trace_circuits import builtin_prompts
    from trace_circuits.divergence import _builtin_twins

    h, b = builtin_prompts("harmful", "test"), builtin_prompts("benign", "test")
    assert _builtin_twins(h.prompts[:7], b.prompts[:7])
    assert not _builtin_twins(h.prompts[:7], b.prompts[1:8])  # shifted: not twins
    assert not _builtin_twins(h.prompts[:7], builtin_prompts("everyday", "test").prompts[:7])
