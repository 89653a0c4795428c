"""Every notebook runs top to bottom on the real model, and what it computes is checked: each notebook's last cell
prints ``CHECK {json}`` with its key results."""

import json
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

pytestmark = [pytest.mark.slow, pytest.mark.notebook]

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))


def check(nb) -> dict:
    text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
                   if o.output_type == "stream")
    lines = [line for line in text.splitlines() if line.startswith("CHECK ")]
    assert lines, "the notebook printed no CHECK line"
    return json.loads(lines[-1][len("CHECK "):])


EXPECT = {
    "01_attention_divergence.ipynb": lambda c: c["n_layers"] == 30 and c["onset_layer"] is not None and c["max_D"] > 0
    and c["unmatched_onset"] is not None and abs(c["unmatched_onset"] - c["onset_layer"]) <= 3
    and c["unmatched_raw_onset"] < c["onset_layer"] - 3 and c["benign_only_onset"] is None,
    "02_sae_features.ipynb": lambda c: c["n_harmful_features"] >= 5 and c["auroc"] >= 0.85,
    "03_trace_and_sever.ipynb": lambda c: c["tl_hf_max_diff"] < 1e-3 and c["same_gate"] and c["n_severed"] >= 2,
    "04_evaluate.ipynb": lambda c: {"none", "tracerouter", "direction_ablation"} <= set(c["defenses"])
    and 0 <= c["dsr_direct"] <= 1 and c["kl_text"] >= 0,
    # the undefended Qwen refuses only some held-out requests (3 of the first 10; README), and the hook set's steering
    # only turns answers into refusals where its gate opens
    # (its 60-pair scan finds no significant onset on Qwen, so the SAE layer is set to the full scan's 15)
    "05_second_model.ipynb": lambda c: c["model"] == "qwen2.5-coder-0.5b-instruct"
    and 0 < c["dsr_direct_none"] < 1 and c["dsr_direct"] >= c["dsr_direct_none"],
}


# notebooks that run the whole pipeline on another model need that model's SAEs in saes/<model>/
NEEDS_SAES = {"05_second_model.ipynb": "qwen2.5-coder-0.5b-instruct"}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_executes_and_computes_what_it_says(path, tmp_path):
    from trace_circuits import list_saes

    model = NEEDS_SAES.get(path.name)
    if model and not [s for s in list_saes(model) if not s["broken"]]:
        pytest.skip(f"no SAEs shipped for {model} yet (train them with `trace-circuits train-sae --model {model}`)")
    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(nb, timeout=1800, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}})
    client.execute()
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.output_type == "error"]
    assert not errors
    assert all(c.get("execution_count") for c in nb.cells if c.cell_type == "code")
    result = check(nb)
    assert EXPECT[path.name](result), result
