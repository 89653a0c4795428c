"""One self-contained HTML page per result (plotly.js inlined), written next to its JSON."""

from __future__ import annotations

import html
from pathlib import Path

import numpy as np

from trace_circuits._io import write_text_atomic


def page(title: str, body: str) -> str:
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title></head><body>"
            f"<h1>{html.escape(title)}</h1>{body}</body></html>")


def figure_html(fig, include_plotlyjs: bool = True) -> str:
    return fig.to_html(full_html=False, include_plotlyjs=include_plotlyjs)


def divergence_body(result, model=None) -> str:
    extra = ""
    if model is not None and result.harmful_prompts and result.benign_prompts:
        view = result.attention_view(model)
        layer = result.onset_layer if result.onset_layer is not None else int(np.argmax(result.per_layer))
        extra = (f"<h2>Attention at layer {layer}: first harmful vs first benign prompt</h2>"
                 f"<div>{view.local_src}</div>")
    return (f"<p>Onset layer: <b>{result.onset_layer}</b> ({html.escape(result.onset_rule)}). {result.n_harmful} "
            f"harmful vs {result.n_benign} benign prompts.</p>{figure_html(result.plot())}{extra}")


def features_body(result) -> str:
    from trace_circuits.viz.features import features_table

    n = len(result.harmful_features)
    return (f"<p><b>{n}</b> harmful feature{'' if n == 1 else 's'} out of "
            f"{result.params.get('n_features', len(result.table))}; {result.n_harmful} harmful vs {result.n_benign} "
            f"benign prompts.</p><p>{html.escape(result.rule)}</p>{figure_html(result.plot())}"
            f"<h2>{'Harmful features' if n else 'Top features by effect size'}</h2>{features_table(result)}")


def circuit_body(circuit) -> str:
    from trace_circuits.viz.circuit import _summary_facts, links_table

    sev = circuit.severed_nodes
    facts = "".join(f"<li>{html.escape(str(k))}: {html.escape(str(v))}</li>" for k, v in _summary_facts(circuit.meta))
    return (f"<p>{len(circuit.nodes)} nodes, {len(circuit.links)} links; {len(sev)} nodes suppressed by the hook set, "
            f"{sum(link.severed for link in circuit.links)} links severed (red dashes). Drag the slider to change "
            f"the link threshold; hover a node for its top tokens and scores.</p><ul>{facts}</ul>"
            f"{figure_html(circuit.plot())}<h2>Strongest links</h2>{links_table(circuit)}")


def evaluation_body(result) -> str:
    return (f"{result.table.to_html(float_format=lambda v: f'{v:.3f}')}"
            f"{figure_html(result.plot())}")


def write_page(result, folder: str | Path, **kwargs) -> Path:
    """Write ``<name>.html`` for a result object into ``folder`` (the name of its JSON file)."""
    kind = getattr(result, "KIND", "")
    title, body = {
        "trace-circuits divergence": (lambda: (f"Attention divergence: {result.model}", divergence_body(result, **kwargs))),
        "trace-circuits features": (lambda: (f"Harmful SAE features: {result.model} {result.hook_name}",
                                             features_body(result))),
        "trace-circuits circuit": (lambda: (f"Harmful circuit of {result.meta.get('model', '')}", circuit_body(result))),
        "trace-circuits evaluation": (lambda: (f"Defense evaluation: {result.model}", evaluation_body(result))),
    }[kind]()
    name = Path(result.FILE).with_suffix(".html").name
    return write_text_atomic(Path(folder) / name, page(title, body))
