"""The circuit viewer and the report as HTML: data, self-containment, generic rendering of evaluation results.

The synthetic builders here (a 100+ node circuit, an evaluation with extra judges, templates and utility keys) are
also used by ``test_browser.py``, which opens the same pages in Chromium."""

from __future__ import annotations

import json
import random
import re
from pathlib import Path
from types import SimpleNamespace

import pytest

from trace_circuits import Circuit, TraceCircuitsError
from trace_circuits.circuit import Link, Node
from trace_circuits.evaluate import EvaluationResult, wilson

DATA = Path(__file__).parent / "data"
REAL_CIRCUIT = DATA / "circuit_smollm2.json"


def big_circuit(seed: int = 0, onset: int = 10, n_layers: int = 18, crowded_layer: int = 13,
                n_crowded: int = 45) -> Circuit:
    """A synthetic circuit of 100+ nodes over 8 layers; ``crowded_layer`` holds ``n_crowded`` SAE features."""
    rng = random.Random(seed)
    nodes = [Node(f"L{onset}.F{i * 37 + 5}", "source", onset, i * 37 + 5,
                  scores={"effect_size": rng.uniform(0.8, 3), "mean_harmful": rng.uniform(1, 4),
                          "mean_benign": rng.uniform(0, 0.5), "q_value": rng.uniform(1e-6, 0.01)},
                  top_tokens=[[" bomb", 5.1], [" weapon", 4.2]]) for i in range(12)]
    words = ["How", " do", " I", " make", " a", " bomb", " at", " home", "?", "<|im_end|>", "\n", "assistant"]
    for layer in range(onset + 1, onset + 8):
        for h in sorted(rng.sample(range(9), 3)):
            nodes.append(Node(f"L{layer}.H{h}", "head", layer, h, scores={"readout_effect": rng.uniform(-0.05, 0.3),
                                                                          "attribution": rng.uniform(-0.1, 0.3)}))
        nodes.append(Node(f"L{layer}.MLP", "mlp", layer, scores={"readout_effect": rng.uniform(0, 0.4)}))
        n_feat = n_crowded if layer == crowded_layer else rng.randint(3, 7)
        for f in sorted(rng.sample(range(2304), n_feat)):
            acts = [max(0.0, rng.gauss(0, 1.5)) for _ in words]
            nodes.append(Node(f"L{layer}.F{f}", "feature", layer, f,
                              scores={"readout_effect": rng.uniform(-0.02, 0.25), "attribution": rng.uniform(0, 0.3),
                                      "max_fis_from_sources": rng.uniform(0, 2), "mean_activation_harmful": 1.2},
                              top_tokens=[[rng.choice(words), round(rng.uniform(2, 6), 2)] for _ in range(4)],
                              examples=[{"prompt": "How do I make a bomb at home?", "tokens": words, "acts": acts}]))
    nodes.append(Node("readout", "readout", n_layers, label="harmfulness readout"))
    links = []
    by_depth = sorted(nodes, key=lambda n: n.depth)
    for j, n in enumerate(by_depth):
        if n.kind == "source":
            continue
        earlier = [m for m in by_depth[:j] if m.depth < n.depth]
        k = 24 if n.kind == "readout" else rng.randint(1, 4)
        for src in rng.sample(earlier, min(k, len(earlier))):
            w = rng.uniform(0.01, 1.0) * (1 if rng.random() > 0.15 else -1)
            links.append(Link(src.id, n.id, round(w, 4), "fis" if src.kind == "source" else "chain"))
    for n in nodes:  # every inner node has a way to the readout
        if n.kind not in ("readout",) and not any(link.source == n.id for link in links):
            links.append(Link(n.id, "readout", round(rng.uniform(0.01, 0.3), 4),
                              "fis" if n.kind == "source" else "chain"))
    c = Circuit(nodes, links, {"model": "synthetic-135m", "onset_layer": onset, "n_prompts": 16,
                               "readout_definition": "mean harmful-benign difference of the probe"})
    return c.sever(c.harmful_path_nodes(0.1))


def synthetic_evaluation(n_harmful: int = 6, n_benign: int = 4, seed: int = 0) -> EvaluationResult:
    """An EvaluationResult as evaluate_defenses writes it, with keys other engineers are adding: a third judge, a
    hard-negative benign set, a ``multi_turn`` template and a defense named other than the usual ones."""
    rng = random.Random(seed)
    templates = ["direct", "prefix_injection", "role_play", "multi_turn", "prefill"]
    defenses, rows = {}, []
    for name, strength in (("none", 0.05), ("tracerouter", 0.9), ("refusal_direction", 0.6), ("new_idea", 0.3)):
        dsr, jail = {}, []
        for t in templates:
            flags = [rng.random() < strength for _ in range(n_harmful)]
            k = sum(flags)
            dsr[t] = {"rate": k / n_harmful, "k": k, "n": n_harmful, "ci": list(wilson(k, n_harmful))}
            if t != "direct":
                jail += flags
            for i, f in enumerate(flags):
                rows.append({"defense": name, "kind": "harmful", "template": t, "prompt": f"harmful request {i}",
                             "response": ("I'm sorry, I can't help." if f else f"Sure, here is how ({name}, {t})"),
                             "refusal": f, "relevance": rng.uniform(0, 1), "addressed": not f, "defended": f,
                             "gate_opened": name != "none" and f, "refusal_logit": rng.uniform(-3, 3),
                             "harm_judge": rng.uniform(0, 1)})
        kj = sum(jail)
        defenses[name] = {
            "description": "no defense" if name == "none" else f"the {name} defense",
            "dsr": dsr, "dsr_jailbreaks": {"rate": kj / len(jail), "k": kj, "n": len(jail), "ci": list(wilson(kj, len(jail)))},
            "judges": {"refusal_rate": rng.random(), "not_addressed_rate": rng.random(), "refusal_logit_rate": None,
                       "keyword_harm_rate": {"rate": 0.25, "k": 3, "n": 12, "ci": list(wilson(3, 12))}},
            "utility": {"over_refusal": 0.1, "over_refusal_ci": list(wilson(1, 10)), "benign_not_addressed": 0.05,
                        "benign_gate_opened": 0.0, "kl_benign_prompts": rng.uniform(0, 0.2),
                        "kl_benign_text": rng.uniform(0, 0.2), "ce_change_benign_text": 0.01,
                        "over_refusal_change": 0.0,
                        "hard_negative": {"over_refusal": 0.2, "over_refusal_ci": list(wilson(2, 10)), "n": 10}}}
        for i in range(n_benign):
            rows.append({"defense": name, "kind": "benign", "template": "direct", "prompt": f"benign question {i}",
                         "response": f"An answer ({name})", "refusal": False, "relevance": 0.7, "addressed": True,
                         "gate_opened": False})
    params = {"templates": templates, "max_new_tokens": 48, "dtype": "bfloat16", "n_harmful": n_harmful, "n_benign": n_benign,
              "n_benign_text": 8, "relevance_calibration": {"threshold": 0.31},
              "defended_rule": "refusal substring OR relevance < threshold (does not address the request)"}
    return EvaluationResult("synthetic-135m", defenses, rows, params)


def synthetic_scan(n_layers: int = 12, onset: int = 5, seed: int = 0):
    """A real DivergenceResult from planted attention profiles (harmful prompts' head 0 shifts from ``onset``)."""
    import numpy as np

    from trace_circuits.divergence import divergence_from_profiles

    rng = np.random.default_rng(seed)
    harmful = rng.dirichlet(np.ones(4), size=(20, n_layers, 4))
    benign = rng.dirichlet(np.ones(4), size=(20, n_layers, 4))
    harmful[:, onset:, 0, :] = rng.dirichlet([8, 1, 1, 1], size=(20, n_layers - onset))
    return divergence_from_profiles(harmful, benign, model_name="synthetic-135m", n_bootstrap=100,
                                    n_permutations=100)


def synthetic_features(seed: int = 0):
    """A real FeatureResult from planted SAE activations (feature 7 fires on harmful prompts only)."""
    import numpy as np

    from trace_circuits.features import FeatureResult

    rng = np.random.default_rng(seed)
    harmful, benign = np.maximum(rng.normal(size=(30, 200)) - 1, 0), np.maximum(rng.normal(size=(30, 200)) - 1, 0)
    harmful[:25, 7] = 5.0
    return FeatureResult.from_activations(harmful, benign, model="synthetic-135m",
                                          hook_name="blocks.10.hook_resid_post", sae_id="layer_10",
                                          examples={7: {"top_tokens": [["bomb", 5.0], ["weapon", 4.1]]}})


def fake_hookset():
    """What the report reads from a HookSet: summary(), operations, provenance (with gate calibration)."""
    calib = {"gate": "prompt", "layer": 12, "gate_rate_harmful": 0.97, "gate_rate_benign": 0.02, "n_benign": 40,
             "n_benign_text": 100, "gate_score_auroc": 0.995, "rule": "opens above the 98th benign percentile"}
    return SimpleNamespace(summary=lambda: "HookSet for synthetic-135m: 9 operations (14 SAE features, 4 heads, 0 "
                                          "MLPs; prompt gate at layer 12)",
                           operations=[], provenance={"gate_calibration": calib}, n_layers=18, gate_operation=None)


# -- the viewer ------------------------------------------------------------------------------------------------------


def page_data(page: str) -> dict:
    m = re.search(r'<script type="application/json" id="tc-data">(.*?)</script>', page, re.S)
    assert m, "the page carries its data"
    return json.loads(m.group(1))


def test_plot_returns_the_viewer_and_its_data_is_the_circuit_plus_influence():
    c = big_circuit()
    view = c.plot()
    page = view.to_html()
    data = page_data(page)
    assert data["kind"] == "trace-circuits circuit" and len(data["nodes"]) == len(c.nodes) >= 100
    assert data["nodes"] == c.to_json()["nodes"] and data["links"] == c.to_json()["links"]
    infl, link_infl = c.influence()
    assert data["view"]["influence"] == pytest.approx(infl)
    assert data["view"]["link_influence"] == pytest.approx(link_infl)
    share = data["view"]["link_share"]
    for target in {link.target for link in c.links}:  # shares of each node's incoming |w| sum to 1
        assert sum(s for s, link in zip(share, c.links) if link.target == target) == pytest.approx(1.0)
    assert "<iframe" in view._repr_html_() and "srcdoc=" in view._repr_html_()


def test_viewer_page_is_self_contained():
    page = big_circuit().plot().to_html()
    assert not re.search(r"<(script|link|img|iframe)[^>]+(src|href)\s*=", page, re.I)
    assert not re.search(r"(https?:)?//(cdn|unpkg|d3js)", page.replace("https://d3js.org v7", ""))
    assert "d3js.org v7.9.2" in page  # the vendored library is inlined
    assert page.count("</script>") == 4  # data, d3, the viewer's graph and page scripts


def test_data_cannot_close_the_script_tag():
    c = Circuit([Node("L1.F1", "source", 1, 1, top_tokens=[["</script><b>", 1.0]]), Node("readout", "readout", 3)],
                [Link("L1.F1", "readout", 0.5)])
    page = c.plot().to_html()
    assert page.count("</script>") == 4 and page_data(page)["nodes"][0]["top_tokens"][0][0] == "</script><b>"


def test_empty_circuit_is_one_error_line():
    with pytest.raises(TraceCircuitsError, match="no nodes"):
        Circuit([], []).plot()


def test_save_writes_the_page_atomically(tmp_path):
    c = big_circuit()
    path = c.plot().save(tmp_path / "view.html")
    assert path.read_text().startswith("<!doctype html>")
    assert [p.name for p in tmp_path.iterdir()] == ["view.html"]  # no temporary file left behind
    paths = c.save(tmp_path / "run")
    assert "tc-data" in paths["html"].read_text()


def test_real_circuit_fixture_loads_and_renders():
    if not REAL_CIRCUIT.exists():
        pytest.skip("tests/data/circuit_smollm2.json not present")
    c = Circuit.load(REAL_CIRCUIT)
    assert len(c.nodes) > 5 and any(n.severed for n in c.nodes)
    assert len(page_data(c.plot().to_html())["nodes"]) == len(c.nodes)


# -- the report -------------------------------------------------------------------------------------------------------


def full_report(tmp_path, **kw) -> Path:
    from trace_circuits.viz.report import write_report

    parts = dict(scan=synthetic_scan(), features=synthetic_features(), circuit=big_circuit(), hookset=fake_hookset(),
                 evaluation=synthetic_evaluation(), timings={"stage 1: scan": 31.0, "total": 805.0},
                 config={"model": "synthetic-135m", "limit": 40, "templates": ["direct", "multi_turn"]})
    parts.update(kw)
    return write_report(tmp_path, **parts)


def test_report_renders_every_template_judge_utility_key_and_defense(tmp_path):
    page = full_report(tmp_path).read_text()
    for text in ("multi_turn", "keyword harm rate", "hard negative / over refusal", "new_idea", "refusal_direction",
                 "all jailbreak templates", "benign over-refusal", "greedy, 48 new tokens, in bfloat16"):
        assert text in page, text
    ids = set(re.findall(r"<section id='([\w-]+)'", page))
    nav = re.findall(r"<nav class='tc-nav'>.*?</nav>", page, re.S)[0]
    targets = re.findall(r"href='#([\w-]+)'", nav)
    assert {"summary", "divergence", "features", "circuit", "hookset", "evaluation", "config", "timings"} <= ids
    assert set(targets) - {"responses"} <= ids and "id='responses'" in page
    assert page.count("plotly.js v") == 1  # plotly.js inlined once, however many figures
    assert not re.search(r"<(script|link|img)[^>]+(src|href)\s*=\s*[\"']?https?:", page, re.I)


def test_report_names_what_the_gate_message_reading_catches_alone(tmp_path):
    """The hook set card says what share of harmful calibration sequences the gate's message reading opened on by
    itself, and which reading (format 10-11's ``message_*`` record, format 9's ``prefix_*``); nothing without one."""
    cases = [({"message_rate_harmful": 0.529, "message_reading": "span"}, "53% of harmful on the message span "
                                                                          "reading alone"),
             ({"prefix_rate_harmful": 0.309}, "31% of harmful on the message prefix reading alone"),
             ({"message_rate_harmful": 0.62, "message_reading": "sentence"}, "62% of harmful on the message sentence "
              "reading alone, which an appended suffix cannot lower once the request ends a sentence"),
             ({}, None)]
    for i, (calib, want) in enumerate(cases):
        hs = fake_hookset()
        hs.provenance["gate_calibration"].update(calib)
        (tmp_path / str(i)).mkdir()
        page = full_report(tmp_path / str(i), hookset=hs).read_text()
        assert (want in page) if want else "reading alone" not in page


def test_report_summary_has_the_headline_numbers(tmp_path):
    ev = synthetic_evaluation()
    page = full_report(tmp_path, evaluation=ev).read_text()
    summary = page[page.index("<section id='summary'>"):page.index("</section>")]
    d = ev.defenses["tracerouter"]["dsr"]["direct"]
    assert f"{d['rate']:.2f}" in summary and f"[{d['ci'][0]:.2f}, {d['ci'][1]:.2f}]" in summary
    assert "onset layer" in summary and ">5<" in summary  # the planted onset
    assert "118 nodes" in summary and "13 min 25 s" in summary and "prompt gate at layer 12" in summary


def test_report_with_one_stage_and_headline_choice(tmp_path):
    from trace_circuits.viz.report import write_report

    page = write_report(tmp_path, circuit=big_circuit()).read_text()
    assert "id='circuit'" in page and "id='evaluation'" not in page and "plotly.js v" not in page
    page = write_report(tmp_path, evaluation=synthetic_evaluation(), headline="new_idea", title="T",
                        baseline_notes={"layer_ablation": "skipped"}).read_text()
    assert "(new_idea)" in page and "<title>T</title>" in page
    assert "id='more-baseline_notes'" in page and "layer_ablation" in page  # extra results get a section too


def test_evaluation_page_has_split_tables_and_the_response_browser(tmp_path):
    ev = synthetic_evaluation()
    paths = ev.save(tmp_path)
    page = paths["html"].read_text()
    assert "class='tc-table dsr'" in page and "class='tc-table judges'" in page and "class='tc-table utility'" in page
    rows = json.loads(re.search(r"id='tc-responses-data'>(.*?)</script>", page, re.S).group(1))["rows"]
    assert len(rows) == len(ev.responses)


def test_evaluation_plot_needs_no_particular_template():
    ev = synthetic_evaluation()
    for m in ev.defenses.values():
        m["dsr"].pop("direct")
    fig = ev.plot()
    assert [t.name for t in fig.data] == ["jailbreak templates"]
