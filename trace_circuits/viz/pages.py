"""One self-contained HTML page per result (plotly.js inlined), written next to its JSON."""

from __future__ import annotations

import html
from pathlib import Path

from trace_circuits._io import write_text_atomic


def page(title: str, body: str) -> str:
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title></head><body>"
            f"<h1>{html.escape(title)}</h1>{body}</body></html>")


def figure_html(fig, include_plotlyjs: bool = True) -> str:
    return fig.to_html(full_html=False, include_plotlyjs=include_plotlyjs)


def write_page(result, folder: str | Path, **kwargs) -> Path:
    """Write ``<name>.html`` for a result object into ``folder`` (the name of its JSON file)."""
    from trace_circuits.viz import circuit, divergence, evaluation, features

    kind = getattr(result, "KIND", "")
    if kind == "trace-circuits circuit":
        html_text = circuit.circuit_page(result, **kwargs)  # the viewer is a page of its own
    else:
        title, body = {
            "trace-circuits divergence": lambda: (f"Attention divergence: {result.model}",
                                                  divergence.divergence_body(result, **kwargs)),
            "trace-circuits features": lambda: (f"Harmful SAE features: {result.model} {result.hook_name}",
                                                features.features_body(result)),
            "trace-circuits evaluation": lambda: (f"Defense evaluation: {result.model}",
                                                  evaluation.evaluation_body(result)),
        }[kind]()
        html_text = page(title, body)
    name = Path(result.FILE).with_suffix(".html").name
    return write_text_atomic(Path(folder) / name, html_text)
