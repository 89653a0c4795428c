"""Stage 2 on the real model: the shipped SAEs meet the quality bar, harmful features generalise to held-out
prompts, and the train-sae / features commands work end to end."""

import json

import pytest

from trace_circuits import builtin_prompts, find_harmful_features, list_saes, load_sae
from trace_circuits.cli import main
from trace_circuits.features import heldout_auroc
from trace_circuits.saes import sae_root

pytestmark = pytest.mark.slow
MODEL = "smollm2-135m-instruct"


def shipped():
    return list_saes(MODEL)


# (model, the scan's onset on the built-in pairs, SAEs shipped). Qwen: 15, 16, 17, 19 (layer 21 reached EV 0.795 with
# 3584 latents, below the bar, so it is not shipped: saes/README.md)
@pytest.mark.parametrize("model,onset,n_saes", [(MODEL, 21, 4), ("qwen2.5-coder-0.5b-instruct", 15, 4)])
def test_shipped_saes_meet_the_quality_bar(model, onset, n_saes):
    """On held-out text: EV >= 0.80, L0 <= 64, CE-loss recovered >= 0.85; one SAE at the scan's onset layer on the
    built-in pairs and the rest after it (stage 3's downstream features), each listed in saes/README.md."""
    saes = list_saes(model)
    assert not [s for s in saes if s["broken"]]
    layers = sorted(int(s["hook_name"].split(".")[1]) for s in saes)
    assert layers[0] == onset and len(layers) >= n_saes, layers
    for s in saes:
        assert s["explained_variance"] >= 0.80, s
        assert s["l0"] <= 64, s
        assert s["ce_loss_recovered"] >= 0.85, s
    assert (sae_root() / "README.md").read_text().count(f"| {model} |") == len(saes)


@pytest.fixture(scope="module")
def onset_sae(real_model):
    hook = min((s["hook_name"] for s in shipped()), key=lambda h: int(h.split(".")[1]))
    return hook, load_sae(hook, model=real_model)


def test_harmful_features_generalise_to_the_test_split(real_model, onset_sae):
    hook, sae = onset_sae
    res = find_harmful_features(real_model, sae, builtin_prompts("harmful", "train"),
                                builtin_prompts("benign", "train"), progress=False)
    feats = res.harmful_features
    assert len(feats) >= 5
    t = res.table.loc[feats]
    assert (t["fire_rate_benign"] <= 0.2).all() and (t["q_value"] < 0.05).all()
    assert all(res.examples[f]["top_tokens"] for f in feats[:5])
    auroc = heldout_auroc(real_model, sae, feats[:10], builtin_prompts("harmful", "test"),
                          builtin_prompts("benign", "test"))
    assert auroc >= 0.9


def test_features_command_writes_json_and_html(tmp_path, capsys, real_model):
    out = tmp_path / "f"
    assert main(["features", "--limit", "40", "--out", str(out)]) == 0
    data = json.loads((out / "features.json").read_text())
    assert data["n_harmful"] == data["n_benign"] == 40 and data["hook_name"].startswith("blocks.")
    assert "plotly" in (out / "features.html").read_text().lower()
    # a user's SAE-Lens folder works the same way
    sae_dir = shipped()[0]["path"]
    assert main(["features", "--limit", "12", "--sae", sae_dir, "--layer", "21", "--out", str(out / "own")]) == 0
    assert json.loads((out / "own" / "features.json").read_text())["sae_id"] == sae_dir
    assert "harmful features at" in capsys.readouterr().out


def test_mismatched_sae_is_refused(real_model, capsys, tmp_path):
    hook = shipped()[0]["hook_name"]
    other = "blocks.3.hook_resid_post"
    assert main(["features", "--sae", other, "--limit", "4", "--out", str(tmp_path)]) == 2
    assert "no SAE for smollm2-135m-instruct at blocks.3.hook_resid_post" in capsys.readouterr().err
    sae = load_sae(hook, model_name=MODEL)
    from trace_circuits import TraceCircuitsError
    from trace_circuits.saes import check_sae_fits

    with pytest.raises(TraceCircuitsError, match=f"trained at {hook}"):
        check_sae_fits(sae, real_model, other)


def test_train_sae_command_end_to_end_on_a_tiny_budget(tmp_path, capsys, real_model):
    code = main(["train-sae", "--layers", "2", "--max-corpus-tokens", "1500", "--training-samples", "8192",
                 "--batch-size", "512", "--d-sae", "256", "--k", "8", "--run-dir", str(tmp_path / "run"),
                 "--out-root", str(tmp_path / "saes")])
    assert code == 0
    sae = load_sae("blocks.2.hook_resid_post", model=real_model, root=tmp_path / "saes")
    assert sae.cfg.d_sae == 256
    meta = json.loads((tmp_path / "saes" / MODEL / "blocks.2.hook_resid_post" / "cfg.json").read_text())["metadata"]
    assert meta["metrics"]["l0"] <= 8 + 1e-6 and meta["provenance"]["corpus_sha256"]
    assert "blocks.2.hook_resid_post" in (tmp_path / "saes" / "README.md").read_text()
