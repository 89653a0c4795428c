"""HookSet: what it changes at inference, gating across KV-cache steps, and the export format's guard rails.

Fast tests use a small random HookedTransformer with a real SAE-Lens TopK SAE; the real-model tests check the
Hugging Face twin against TransformerLens."""

import json

import pytest
import torch
from conftest import tiny_model
from safetensors.torch import load_file, save_file

from trace_circuits import Operation, TraceCircuitsError, load_hookset
from trace_circuits.hookset import FORMAT_VERSION, hookset_for, sae_operation
from trace_circuits.models import model_fingerprint


def tiny_sae(d_in=32, d_sae=64, k=4, seed=1, layer=1):
    from sae_lens.saes.topk_sae import TopKSAE, TopKSAEConfig

    torch.manual_seed(seed)
    sae = TopKSAE(TopKSAEConfig(d_in=d_in, d_sae=d_sae, k=k, rescale_acts_by_decoder_norm=True))
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.1)
        sae.b_dec.normal_(0, 0.1)
    sae.cfg.metadata.hook_name = f"blocks.{layer}.hook_resid_post"
    return sae


def sae_feature_acts(op, x):
    return op.encoder.encode(x)


TOKENS = torch.tensor([[1, 5, 9, 3, 7, 2, 11, 4], [6, 2, 8, 8, 1, 3, 5, 12]])


@pytest.fixture(scope="module")
def model():
    return tiny_model(n_layers=4)


def test_sae_feature_acts_match_sae_lens_encode():
    sae = tiny_sae()
    op = sae_operation(sae, [0, 5, 17, 40])
    x = torch.randn(3, 7, 32)
    assert torch.allclose(sae_feature_acts(op, x), sae.encode(x)[..., [0, 5, 17, 40]], atol=1e-5)


def test_zeroing_features_removes_exactly_their_decoder_contribution(model):
    sae = tiny_sae()
    feats = list(range(64))
    hs = hookset_for(model, [sae_operation(sae, feats, gated=False)])
    seen = {}

    def grab(act, hook):
        seen[hook.name] = act.clone()

    with torch.no_grad():
        _, cache = model.run_with_cache(TOKENS, names_filter="blocks.1.hook_resid_post")
        model.run_with_hooks(TOKENS, fwd_hooks=hs.fwd_hooks(model) + [("blocks.1.hook_resid_post", grab)])
    x = cache["blocks.1.hook_resid_post"]
    # every feature zeroed: what is left is x - (decode(encode(x)) - b_dec) = error term + b_dec
    expected = x - (sae.decode(sae.encode(x)) - sae.b_dec)
    assert torch.allclose(seen["blocks.1.hook_resid_post"], expected, atol=1e-4)


def test_gate_decides_whether_downstream_operations_act(model):
    tiny_sae()
    with torch.no_grad():
        plain = model(TOKENS)
    shut = hookset_for(model, [sae_operation(tiny_sae(layer=0), [3], gate_source=True, gate_threshold=1e9),
                               Operation(kind="heads", layer=2, heads=[1]), Operation(kind="mlp", layer=3)])
    with torch.no_grad(), shut.attach(model) as rt:
        out = model(TOKENS)
    assert torch.equal(out, plain)  # gate never opens: nothing changes (the source is gated too)
    assert rt.gate_open.tolist() == [False, False]
    always = hookset_for(model, [sae_operation(tiny_sae(layer=0), [3], gate_source=True, gate_threshold=-1.0),
                                 Operation(kind="heads", layer=2, heads=[1]), Operation(kind="mlp", layer=3)])
    with torch.no_grad(), always.attach(model) as rt:
        out = model(TOKENS)
    assert rt.gate_open.tolist() == [True, True]
    assert (out - plain).abs().max() > 1e-3
    # the same as zeroing head 1 of layer 2 and MLP 3 (and the feature) by hand
    zero_head = lambda z, hook: torch.cat([z[:, :, :1], torch.zeros_like(z[:, :, 1:2]), z[:, :, 2:]], 2)  # noqa: E731
    by_hand = model.run_with_hooks(TOKENS, fwd_hooks=[
        ("blocks.0.hook_resid_post", lambda x, hook: x - sae_feature_acts(always.operations[0], x) @
         always.operations[0].tensors["D"]),
        ("blocks.2.attn.hook_z", zero_head), ("blocks.3.hook_mlp_out", lambda m, hook: torch.zeros_like(m))])
    assert torch.allclose(out, by_hand, atol=1e-5)


def test_gate_state_carries_across_kv_cache_steps(model):
    """Incremental decoding with a KV cache under the hook set equals one full forward pass under it."""
    from transformer_lens.cache.key_value_cache import TransformerLensKeyValueCache

    tiny_sae()
    # feature 13 of this SAE fires on row 0 only at position 2: the gate opens at the first decoding step, and
    # only the carried state keeps it open for the later steps
    op = sae_operation(tiny_sae(layer=0), [13], gate_source=True, gate_threshold=0.0)
    with torch.no_grad():
        fired = sae_feature_acts(op, model(TOKENS, stop_at_layer=1))[0, :, 0] > 0
    assert fired.tolist() == [False, False, True, False, False, False, False, False]
    hs = hookset_for(model, [op, Operation(kind="mlp", layer=2)])
    with torch.no_grad(), hs.attach(model):
        full = model(TOKENS)
    cache = TransformerLensKeyValueCache.init_cache(model.cfg, model.cfg.device, TOKENS.shape[0])
    with torch.no_grad(), hs.attach(model) as rt:
        ones = torch.ones_like(TOKENS)
        model(TOKENS[:, :2], attention_mask=ones[:, :2], past_kv_cache=cache)
        steps = [model(TOKENS[:, t:t + 1], attention_mask=ones[:, t:t + 1], past_kv_cache=cache)[:, -1]
                 for t in range(2, TOKENS.shape[1])]
    assert rt.gate_open[0]
    assert torch.allclose(torch.stack(steps, 1), full[:, 2:], atol=1e-4)


def probe_op(model, layer, seed=3):
    torch.manual_seed(seed)
    r = torch.randn(model.cfg.d_model)
    return Operation(kind="prompt_probe", layer=layer, gap=2.0,
                     tensors={"r": r / r.norm(), "mu": torch.randn(model.cfg.d_model) * 0.1})


def test_prompt_gate_decides_at_the_end_of_the_prompt_and_cuts_the_continuation(model):
    """Prefill: nothing changes before the probe's decision, then only its last position past the probe layer;
    decoding steps of an opened row are cut at every layer, a shut row is never touched."""
    from transformer_lens.cache.key_value_cache import TransformerLensKeyValueCache

    probe = probe_op(model, 1)
    prompt, cont = TOKENS[:, :5], TOKENS[:, 5:]
    with torch.no_grad():
        x = model(prompt, stop_at_layer=2)[:, -1]
    score = ((x - probe.tensors["mu"]) @ probe.tensors["r"]) / probe.gap
    probe.gate_threshold = float(score.mean())  # opens on exactly one of the two rows
    opened = (score > probe.gate_threshold).tolist()
    assert sorted(opened) == [False, True]
    # an MLP before the probe (acts from the next forward on) and one after it (acts at the decision already)
    hs = hookset_for(model, [probe, Operation(kind="mlp", layer=0), Operation(kind="mlp", layer=3)])
    assert hs.gate_operation is probe and all(op.gated for op in hs.operations[1:])
    with torch.no_grad():
        plain = model(TOKENS)
    cache = TransformerLensKeyValueCache.init_cache(model.cfg, model.cfg.device, 2)
    ones = torch.ones_like(TOKENS)
    with torch.no_grad(), hs.attach(model) as rt:
        pre = model(prompt, attention_mask=ones[:, :5], past_kv_cache=cache)
        steps = torch.cat([model(cont[:, t:t + 1], attention_mask=ones[:, :1], past_kv_cache=cache)
                           for t in range(cont.shape[1])], 1)
    assert rt.gate_open.tolist() == opened
    assert torch.allclose(rt.prompt_scores, score, atol=1e-5)
    assert torch.allclose(pre[:, :-1], plain[:, :4], atol=1e-5)  # before the decision nothing changes

    def by_hand(row):
        def mlp0(m, hook):
            m = m.clone()
            m[row, 5:] = 0  # the continuation
            return m

        def mlp3(m, hook):
            m = m.clone()
            m[row, 4:] = 0  # the decision position (after the probe's layer) and the continuation
            return m

        return model.run_with_hooks(TOKENS, fwd_hooks=[("blocks.0.hook_mlp_out", mlp0), ("blocks.3.hook_mlp_out", mlp3)])

    with torch.no_grad():
        want = by_hand(opened.index(True))
    got = torch.cat([pre, steps], 1)
    assert torch.allclose(got, want, atol=1e-4)
    shut = opened.index(False)
    assert torch.allclose(got[shut], plain[shut], atol=1e-4)
    assert (got[opened.index(True), 4:] - plain[opened.index(True), 4:]).abs().max() > 1e-3


def test_prompt_gate_decides_at_the_end_of_the_user_turn(model):
    """With anchor ids (the chat template's assistant header) the decision sits where they end, so a prefilled
    answer after them does not move it; rows without a match decide at their last position."""
    probe = probe_op(model, 1)
    probe.anchor = [9, 3]  # ends at position 3 of row 0; row 1 has no match
    probe.gate_threshold = -1e9
    hs = hookset_for(model, [probe, Operation(kind="mlp", layer=3)])
    with torch.no_grad():
        plain, cache = model.run_with_cache(TOKENS, names_filter="blocks.1.hook_resid_post")
        with hs.attach(model) as rt:
            out = model(TOKENS)
    x = cache["blocks.1.hook_resid_post"]
    want = torch.stack([x[0, 3], x[1, 7]]) - probe.tensors["mu"]
    assert torch.allclose(rt.prompt_scores, (want @ probe.tensors["r"]) / probe.gap, atol=1e-5)
    changed = (out - plain).abs().amax(-1) > 1e-4
    assert changed[0].tolist() == [False] * 3 + [True] * 5
    assert changed[1].tolist() == [False] * 7 + [True]
    saved = json.loads(json.dumps(probe.to_json(0)))
    assert Operation.from_json(saved, probe.tensors).anchor == [9, 3]


def test_prompt_gate_round_trip_and_one_gate_per_hookset(model, tmp_path):
    probe = probe_op(model, 2)
    probe.gate_threshold = -1e9
    hs = hookset_for(model, [probe, sae_operation(tiny_sae(layer=1), [2, 9]), Operation(kind="heads", layer=3, heads=[0])])
    hs.save(tmp_path / "hs")
    meta = json.loads((tmp_path / "hs" / "hookset.json").read_text())
    assert meta["operations"][0]["kind"] == "prompt_probe" and meta["operations"][0]["gate_source"]
    back = load_hookset(tmp_path / "hs")
    assert back.gate_operation.kind == "prompt_probe" and back.source_operation.layer == 1
    with torch.no_grad():
        a = model.run_with_hooks(TOKENS, fwd_hooks=hs.fwd_hooks(model))
        b = model.run_with_hooks(TOKENS, fwd_hooks=back.fwd_hooks(model))
    assert torch.equal(a, b)
    with pytest.raises(TraceCircuitsError, match="one gate"):
        hookset_for(model, [probe, sae_operation(tiny_sae(layer=1), [2], gate_source=True)])
    bad = probe_op(model, 2)
    bad.tensors["r"] = torch.zeros(5)
    with pytest.raises(TraceCircuitsError, match="tensor r"):
        hookset_for(model, [bad])


def test_save_load_round_trip_gives_identical_logits(model, tmp_path):
    sae = tiny_sae()
    hs = hookset_for(model, [sae_operation(sae, [2, 9, 30], gate_source=True, gate_threshold=0.0),
                             Operation(kind="heads", layer=2, heads=[0, 3]), Operation(kind="mlp", layer=3)])
    hs.save(tmp_path / "hs")
    meta = json.loads((tmp_path / "hs" / "hookset.json").read_text())
    assert meta["format_version"] == FORMAT_VERSION and meta["model_fingerprint"] == model_fingerprint(model)
    assert [op["hook_name"] for op in meta["operations"]] == ["blocks.1.hook_resid_post", "blocks.2.attn.hook_z",
                                                             "blocks.3.hook_mlp_out"]
    back = load_hookset(tmp_path / "hs")
    with torch.no_grad():
        a = model.run_with_hooks(TOKENS, fwd_hooks=hs.fwd_hooks(model))
        b = model.run_with_hooks(TOKENS, fwd_hooks=back.fwd_hooks(model))
    assert torch.equal(a, b)


@pytest.fixture()
def saved(model, tmp_path):
    hs = hookset_for(model, [sae_operation(tiny_sae(layer=1), [2, 9], gate_source=True)])
    return hs.save(tmp_path / "hs")


def test_hookset_for_another_model_is_refused(saved):
    other = tiny_model(n_layers=4, seed=7)
    with pytest.raises(TraceCircuitsError, match="made for model"):
        load_hookset(saved).attach(other).__enter__()
    with pytest.raises(TraceCircuitsError, match="layers"):
        load_hookset(saved).check_model(tiny_model(n_layers=2))


def test_newer_format_version_is_refused(saved):
    p = saved / "hookset.json"
    p.write_text(json.dumps({**json.loads(p.read_text()), "format_version": FORMAT_VERSION + 1}))
    with pytest.raises(TraceCircuitsError, match="newer"):
        load_hookset(saved)


def test_missing_or_wrong_shaped_tensors_are_refused(saved):
    t = load_file(str(saved / "tensors.safetensors"))
    save_file({k: v for k, v in t.items() if k != "ops.0.W_enc"}, str(saved / "tensors.safetensors"))
    with pytest.raises(TraceCircuitsError, match="ops.0.W_enc is missing"):
        load_hookset(saved)
    t["ops.0.W_enc"] = torch.zeros(5, 5)
    save_file(t, str(saved / "tensors.safetensors"))
    with pytest.raises(TraceCircuitsError, match="shape"):
        load_hookset(saved)


def test_not_a_hookset_and_pickles_are_refused(tmp_path, saved):
    with pytest.raises(TraceCircuitsError, match="not a hook set folder"):
        load_hookset(tmp_path / "nothing")
    torch.save({"x": torch.zeros(2)}, saved / "tensors.safetensors")  # a pickle in disguise is never unpickled
    with pytest.raises(TraceCircuitsError, match="not a readable safetensors"):
        load_hookset(saved)


def test_invalid_operations_are_refused(model):
    with pytest.raises(TraceCircuitsError, match="head ids"):
        hookset_for(model, [Operation(kind="heads", layer=1, heads=[9])])
    with pytest.raises(TraceCircuitsError, match="outside the model"):
        hookset_for(model, [Operation(kind="mlp", layer=7)])
    with pytest.raises(TraceCircuitsError, match="must come after the gate"):
        hookset_for(model, [sae_operation(tiny_sae(layer=2), [1], gate_source=True), Operation(kind="mlp", layer=1)])
