"""The circuit graph as plain data: pruning, severing, JSON round trip and the interactive plot."""

import json

import pytest

from trace_circuits import Circuit, TraceCircuitsError
from trace_circuits.circuit import Link, Node


def small_circuit() -> Circuit:
    nodes = [Node("L2.F1", "source", 2, 1), Node("L2.F5", "source", 2, 5),
             Node("L3.H0", "head", 3, 0, scores={"readout_effect": 0.2}),
             Node("L3.F7", "feature", 3, 7, scores={"readout_effect": 0.004}, top_tokens=[["bomb", 3.5]]),
             Node("L4.MLP", "mlp", 4, scores={"readout_effect": -0.05}),
             Node("readout", "readout", 6)]
    links = [Link("L2.F1", "L3.H0", 0.5), Link("L3.H0", "readout", 0.3, "chain"),
             Link("L2.F1", "L3.F7", 0.05), Link("L3.F7", "readout", 0.02, "chain"),
             Link("L2.F5", "L4.MLP", 0.4), Link("L2.F1", "readout", 0.1)]  # L4.MLP has no path to the readout
    return Circuit(nodes, links, {"model": "toy"})


def test_threshold_pruning_keeps_strong_links_on_source_to_readout_paths():
    c = small_circuit().prune(threshold=0.1)
    ids = {n.id for n in c.nodes}
    assert "L3.H0" in ids and "L3.F7" not in ids  # weak path dropped
    assert "L4.MLP" not in ids  # strong link, but a dead end: not on a path to the readout
    assert {(l.source, l.target) for l in c.links} == {("L2.F1", "L3.H0"), ("L3.H0", "readout"), ("L2.F1", "readout")}
    assert all(abs(l.weight) >= 0.1 for l in c.links)
    assert c.meta["pruning"]["links_before"] == 6
    assert len(small_circuit().links) == 6  # pruning returns a new circuit, the original is untouched


def test_influence_normalises_per_target_and_follows_paths():
    infl, link_infl = small_circuit().influence()
    # readout's incoming |w|: 0.3 (head) + 0.02 (feature) + 0.1 (source) = 0.42
    assert infl["L3.H0"] == pytest.approx(0.3 / 0.42)
    assert infl["L3.F7"] == pytest.approx(0.02 / 0.42)
    assert infl["L2.F1"] == pytest.approx(1.0)  # every path to the readout starts at F1
    assert infl["L2.F5"] == 0 and infl["L4.MLP"] == 0  # dead end
    assert link_infl[0] == pytest.approx(0.3 / 0.42)  # F1 -> H0: all of H0's input, times H0's influence


def test_cumulative_pruning_keeps_the_most_influential_nodes():
    full = small_circuit()
    c = full.prune(cumulative=0.8)  # H0 alone holds 0.714 / 0.762 of the inner nodes' influence
    assert {n.id for n in c.nodes} == {"L2.F1", "L2.F5", "L3.H0", "readout"}
    assert {(l.source, l.target) for l in c.links} == {("L2.F1", "L3.H0"), ("L3.H0", "readout"), ("L2.F1", "readout")}
    c = full.prune(cumulative=0.99)
    assert "L3.F7" in {n.id for n in c.nodes}


def test_prune_needs_exactly_one_rule():
    with pytest.raises(TraceCircuitsError, match="exactly one"):
        small_circuit().prune()
    with pytest.raises(TraceCircuitsError, match="cumulative"):
        small_circuit().prune(cumulative=1.5)


def test_sever_marks_links_out_of_suppressed_nodes():
    c = small_circuit()
    chosen = c.harmful_path_nodes(min_readout_effect=0.01)
    assert chosen == ["L2.F1", "L2.F5", "L3.H0"]  # sources + the head; the feature's effect is too small
    cut = c.sever(chosen)
    assert not any(l.severed for l in c.links)  # sever returns a new circuit; the original is unchanged
    assert {(l.source, l.target) for l in cut.links if l.severed} == {
        ("L2.F1", "L3.H0"), ("L3.H0", "readout"), ("L2.F1", "L3.F7"), ("L2.F5", "L4.MLP"), ("L2.F1", "readout")}
    with pytest.raises(TraceCircuitsError, match="unknown"):
        c.sever(["L9.F9"])


def test_links_must_name_known_nodes():
    with pytest.raises(TraceCircuitsError, match="not in the circuit"):
        Circuit([Node("readout", "readout", 3)], [Link("L1.F1", "readout", 1.0)])


def test_json_round_trip_and_files(tmp_path):
    c = small_circuit().sever(["L2.F1"])
    data = json.loads(json.dumps(c.to_json()))
    assert set(data) >= {"nodes", "links", "format_version"}
    assert {"source", "target", "weight", "severed"} <= set(data["links"][0])
    back = Circuit.from_json(data)
    assert [vars(n) for n in back.nodes] == [vars(n) for n in c.nodes]
    assert [vars(l) for l in back.links] == [vars(l) for l in c.links]
    paths = c.save(tmp_path)
    assert Circuit.load(tmp_path).to_json() == c.to_json()
    html = paths["html"].read_text()
    assert "tc-viewer" in html and "link threshold" in html
    with pytest.raises(TraceCircuitsError, match="newer than this trace-circuits"):
        Circuit.from_json({**data, "format_version": 99})
    with pytest.raises(TraceCircuitsError, match="not a trace-circuits circuit"):
        Circuit.from_json({**data, "kind": "trace-circuits hook set"})


def test_plot_has_a_threshold_slider_and_distinct_severed_links():
    c = small_circuit().sever(["L2.F1"])
    view = c.plot()
    page = view.to_html()
    assert "<iframe" in view._repr_html_()  # renders in Jupyter
    assert 'id="tc-thr"' in page and "link threshold" in page and 'id="tc-cut"' in page
    data = json.loads(page.split('<script type="application/json" id="tc-data">', 1)[1].split("</script>", 1)[0])
    severed = {(l["source"], l["target"]) for l in data["links"] if l["severed"]}
    assert severed == {(l.source, l.target) for l in c.links if l.severed} and severed
    nodes = {n["id"]: n for n in data["nodes"]}
    assert nodes["L2.F1"]["severed"] and nodes["L3.F7"]["top_tokens"] == [["bomb", 3.5]]
    assert nodes["L3.H0"]["scores"]["readout_effect"] == 0.2
    assert data["view"]["influence"]["L2.F1"] == pytest.approx(1.0)  # the cumulative slider's numbers
