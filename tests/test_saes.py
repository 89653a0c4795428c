"""SAE training (SAE-Lens), checkpoint/resume, evaluation, save/load round trip and fit checks, on a tiny model."""

import json

import pytest
import torch
from conftest import tiny_model

from trace_circuits import TraceCircuitsError
from trace_circuits.saes import (
    ActivationBatches,
    SAETrainingConfig,
    check_sae_fits,
    collect_activations,
    evaluate_sae,
    list_saes,
    load_sae,
    save_sae,
    train_sae,
)
from trace_circuits.saes import training as training_mod

HOOK = "blocks.1.hook_resid_post"


def chunks(n=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 40, (int(torch.randint(10, 24, (1,), generator=g)),), generator=g).tolist()
            for _ in range(n)]


@pytest.fixture
def model():
    return tiny_model(n_layers=3)


def small_cfg(**kw):
    base = dict(model="tiny", hooks=[HOOK], d_sae=64, k=4, training_samples=128 * 24, batch_size=128, lr=3e-3,
                n_checkpoints=3, seed=0)
    base.update(kw)
    return SAETrainingConfig(**base)


def test_config_round_trips_through_json():
    cfg = small_cfg()
    assert SAETrainingConfig.from_json(json.loads(json.dumps(cfg.to_json()))) == cfg
    with pytest.raises(TraceCircuitsError, match="newer"):
        SAETrainingConfig.from_json({**cfg.to_json(), "format_version": 99})


def test_activations_are_collected_once_per_shard_and_resumed(model, tmp_path):
    cs = chunks()
    acts = collect_activations(model, cs, [HOOK, "blocks.0.hook_resid_post"], tmp_path, batch_size=8,
                               shard_tokens=200, progress=False)
    n = sum(len(c) - 1 for c in cs)
    assert acts[HOOK].shape == (n, 32) and acts[HOOK].dtype == torch.float16
    shards = sorted(tmp_path.glob("shard_*.safetensors"))
    assert len(shards) > 2
    # the stored values are the model's own, positions 1.. (right padding does not change them)
    one = collect_activations(model, cs[:1], [HOOK], tmp_path / "one", progress=False)[HOOK]
    _, cache = model.run_with_cache(torch.tensor([cs[0]]), names_filter=[HOOK])
    assert torch.allclose(one.float(), cache[HOOK][0, 1:], atol=1e-2)
    assert any(torch.allclose(acts[HOOK][i : i + len(one)].float(), one.float()) for i in range(n - len(one) + 1))
    shards[-1].unlink()  # an interrupted run: one shard missing
    calls = {"n": 0}
    model.add_hook("hook_embed", lambda a, hook: calls.__setitem__("n", calls["n"] + 1))
    again = collect_activations(model, cs, [HOOK, "blocks.0.hook_resid_post"], tmp_path, batch_size=8,
                                shard_tokens=200, progress=False)
    model.reset_hooks(including_permanent=True)
    assert 0 < calls["n"] <= 3  # only the missing shard's batches ran
    assert torch.equal(again[HOOK], acts[HOOK])


def test_a_run_at_some_hooks_reuses_an_earlier_collection_of_more(model, tmp_path):
    """`train-sae --layers 19,21` after a run at 15,17,19,21 in the same folder reuses its activations; a cache
    collected with other settings (its folder name is their key) or without the hook is not reused."""
    both = [HOOK, "blocks.0.hook_resid_post"]

    def key(hooks):
        return training_mod._key(["tiny", "corpus-sha", sorted(hooks)])

    collect_activations(model, chunks(), both, tmp_path / key(both), shard_tokens=200, progress=False)
    assert training_mod._cached_hooks(tmp_path, [HOOK], key) == sorted(both)
    assert training_mod._cached_hooks(tmp_path, ["blocks.2.hook_resid_post"], key) is None
    assert training_mod._cached_hooks(tmp_path, [HOOK], lambda h: training_mod._key(["tiny", "other", sorted(h)])) \
        is None
    (tmp_path / "000000000000").mkdir()  # sorts first: unreadable, skipped
    (tmp_path / "000000000000" / "shard_00000.safetensors").write_bytes(b"not a safetensors file")
    assert training_mod._cached_hooks(tmp_path, [HOOK], key) == sorted(both)


def test_collect_refuses_unknown_hook(model, tmp_path):
    with pytest.raises(TraceCircuitsError, match="no hook 'blocks.9.hook_resid_post'"):
        collect_activations(model, chunks(4), ["blocks.9.hook_resid_post"], tmp_path, progress=False)


def test_activation_batches_resume_at_the_same_position():
    acts = torch.arange(50, dtype=torch.float16)[:, None].repeat(1, 3)
    a = ActivationBatches(acts, 8, seed=1)
    seq = [next(a) for _ in range(10)]
    b = ActivationBatches(acts, 8, seed=1, position=8 * 6)
    assert torch.equal(next(b), seq[6])
    assert all(x.dtype == torch.float32 and x.shape == (8, 3) for x in seq)


def test_training_learns_saves_loads_and_resumes(model, tmp_path, monkeypatch):
    cs = chunks(60)
    acts = collect_activations(model, cs, [HOOK], tmp_path / "acts", progress=False)[HOOK]

    calls = {"n": 0}
    real_next = ActivationBatches.__next__

    def interrupted(self):
        calls["n"] += 1
        if calls["n"] > 60:  # norm estimate (50 batches) + a few training steps, then "Ctrl-C"
            raise KeyboardInterrupt
        return real_next(self)

    monkeypatch.setattr(ActivationBatches, "__next__", interrupted)
    cfg_short = small_cfg(n_checkpoints=23)  # a checkpoint every step
    with pytest.raises(KeyboardInterrupt):
        train_sae(acts, HOOK, cfg_short, tmp_path / "run", model_name="tiny", progress=False)
    monkeypatch.setattr(ActivationBatches, "__next__", real_next)
    ckpt = training_mod._latest_checkpoint(tmp_path / "run" / "checkpoints")
    assert ckpt is not None and int(ckpt.name) > 0
    sae = train_sae(acts, HOOK, cfg_short, tmp_path / "run", model_name="tiny", progress=False)
    assert sae.cfg.d_in == 32 and sae.cfg.d_sae == 64
    metrics = evaluate_sae(model, sae, HOOK, cs[:10])
    assert metrics["l0"] <= 4 + 1e-6
    assert 0.0 < metrics["explained_variance"] <= 1.0
    assert metrics["ce_zero_ablation"] > metrics["ce_clean"]
    root = tmp_path / "saes"
    out = save_sae(sae, root / "tiny" / HOOK, {"hook_name": HOOK, "metrics": metrics})
    assert (out / "cfg.json").exists() and (out / "sae_weights.safetensors").exists()
    assert json.loads((out / "cfg.json").read_text())["metadata"]["metrics"] == metrics  # SAE-Lens's own metadata
    loaded = load_sae(HOOK, model_name="tiny", root=root)
    assert loaded.cfg.metadata.metrics == metrics and loaded.cfg.metadata.hook_name == HOOK
    assert loaded.cfg.d_in == 32 and loaded.cfg.d_sae == 64
    x = acts[:16].float()
    assert torch.allclose(loaded.encode(x), sae.encode(x), atol=0.05, rtol=0.05)
    assert [s["hook_name"] for s in list_saes("tiny", root=root)] == [HOOK]
    check_sae_fits(loaded, model, HOOK)
    with pytest.raises(TraceCircuitsError, match="trained at blocks.1.hook_resid_post, not blocks.0"):
        check_sae_fits(loaded, model, "blocks.0.hook_resid_post")
    other = tiny_model(n_layers=3)
    other.cfg.d_model = 48
    with pytest.raises(TraceCircuitsError, match="d_in 32 does not fit"):
        check_sae_fits(loaded, other, HOOK)
    loaded.cfg.metadata.model_fingerprint = "some-other-model@123"
    with pytest.raises(TraceCircuitsError, match="trained on model some-other-model@123"):
        check_sae_fits(loaded, model, HOOK)


def test_missing_sae_lists_what_is_available(tmp_path):
    with pytest.raises(TraceCircuitsError, match="no SAE for smollm2-135m-instruct at blocks.3.hook_resid_post"):
        load_sae("blocks.3.hook_resid_post", model_name="smollm2-135m-instruct", root=tmp_path)
