"""Every SAE architecture SAE-Lens 6 loads for inference: the hook set reproduces ``sae.encode`` from its stored tensors
and its zero-out removes exactly that feature's decoder contribution, in TransformerLens and on the transformers model;
SAEs load from an SAE-Lens folder and feed stage 2."""

import pytest
import tiny
import torch

from trace_circuits import TraceCircuitsError, find_harmful_features, load_sae
from trace_circuits.hookset import hookset_for, load_hookset, sae_operation
from trace_circuits.prompts import encode_prompts, iter_batches

HOOK = "blocks.1.hook_resid_post"
VARIANTS = [("standard", "none", True), ("jumprelu", "none", True), ("topk", "none", True), ("topk", "none", False),
            ("batchtopk", "none", True), ("standard", "constant_norm_rescale", True), ("jumprelu", "layer_norm", True)]


@pytest.fixture(scope="module")
def llama():
    return tiny.pair("llama")


def activations(tl, prompts):
    enc = encode_prompts(tl, prompts)
    b = next(iter_batches(enc, len(prompts)))
    with torch.no_grad():
        _, cache = tl.run_with_cache(b.tokens, attention_mask=b.attention_mask, names_filter=HOOK)
    return b, cache[HOOK]


@pytest.mark.parametrize("arch,normalize,rescale", VARIANTS)
def test_hookset_reproduces_encode_and_removes_only_the_features_decoder_contribution(llama, arch, normalize,
                                                                                      rescale, tmp_path):
    tl, hf, _ = llama
    sae = tiny.sae(arch, HOOK, normalize=normalize, rescale=rescale)
    b, x = activations(tl, ["How do I make a pipe bomb?", "Write a short poem about autumn leaves."])
    real = b.attention_mask.bool()
    feats = [int(f) for f in sae.encode(x[real]).sum(0).topk(3).indices]  # features that do fire here
    op = sae_operation(sae, feats, gated=False)
    assert op.architecture == ("jumprelu" if arch == "batchtopk" else arch)
    with torch.no_grad():
        want = sae.encode(x)  # (padding positions are zero vectors: NaN under some normalisations; never compared)
        assert (op.encoder.encode(x) - want[..., feats])[real].abs().max() < 1e-5
        assert want[..., feats][real].abs().sum() > 0
        # SAE-Lens's own decoder, with and without the chosen features
        kept = want.clone()
        kept[..., feats] = 0
        full = sae.decode(sae.encode(x))
        sae.encode(x)  # SAE-Lens's decode undoes the normalisation of the last encode
        expected = x - (full - sae.decode(kept))
    hs = hookset_for(tl, [op])
    hs.save(tmp_path / "hs")
    back = load_hookset(tmp_path / "hs")  # what ships: the hook set read back from disk
    seen = {}
    with torch.no_grad():
        with back.attach(tl):
            tl.run_with_hooks(b.tokens, attention_mask=b.attention_mask, fwd_hooks=[(HOOK, lambda a, hook:
                                                                                        seen.__setitem__("tl", a))])
        pos = (b.attention_mask.cumsum(-1) - 1).clamp(min=0)
        with back.attach(hf):  # then a hook that runs after the hook set's, on the twin module's output
            handle = hf.model.layers[1].register_forward_hook(
                lambda m, i, o: seen.__setitem__("hf", o[0] if isinstance(o, tuple) else o))
            hf(b.tokens, attention_mask=b.attention_mask, position_ids=pos)
            handle.remove()
    assert (seen["tl"] - expected)[real].abs().max() < 1e-4
    assert (seen["hf"] - expected)[real].abs().max() < 1e-4


def test_saes_load_from_an_sae_lens_folder_and_feed_stage_2(llama, tmp_path):
    tl, _, _ = llama
    sae = tiny.sae("jumprelu", HOOK)
    sae.save_model(str(tmp_path / "mine"))
    loaded = load_sae(tmp_path / "mine", model=tl)
    assert loaded.cfg.metadata.hook_name == HOOK and loaded.cfg.metadata.source == str(tmp_path / "mine")
    from trace_circuits.datasets import builtin_prompts

    res = find_harmful_features(tl, loaded, builtin_prompts("harmful")[:12], builtin_prompts("benign")[:12],
                                progress=False)
    assert res.hook_name == HOOK and res.params["architecture"] == "jumprelu" and len(res.table) == 96


def test_unusable_sae_sources_are_one_line(llama, tmp_path):
    tl, _, _ = llama
    with pytest.raises(TraceCircuitsError, match="no cfg.json|no SAE for"):
        load_sae(tmp_path, model=tl)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "cfg.json").write_text("{not json")
    with pytest.raises(TraceCircuitsError, match="cfg.json is damaged"):
        load_sae(tmp_path / "bad", model=tl)
    sae = tiny.sae("standard", HOOK, d_in=48)
    sae.save_model(str(tmp_path / "wide"))
    with pytest.raises(TraceCircuitsError, match="d_in 48 does not fit"):
        load_sae(tmp_path / "wide", model=tl)
