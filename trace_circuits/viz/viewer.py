"""The circuit viewer: one self-contained HTML page (d3 and the viewer's JS inlined, the circuit as JSON inside).

Nodes are laid out in columns by depth (forward order: head, MLP, residual feature per layer, readout last), stacked
with a fixed pitch and wrapped into sub-columns when a column holds more than ``max_rows`` nodes, so boxes (label
included) never overlap. Click a node for its side panel (scores, top-activating prompts with per-token
activations, incoming and outgoing links), shift-click or "pin" to compare nodes, hover a link for its weight, prune
by cumulative influence or link threshold (the same rules as :meth:`Circuit.prune`), show the graph with the hook
set's cut applied, search by id or token, export SVG/PNG.

The page's data is ``circuit.json`` plus a ``view`` block computed here: node and link influence
(:meth:`Circuit.influence`) and each link's share of its target's incoming ``|w|``.
"""

from __future__ import annotations

import html
import json
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Optional

from trace_circuits._io import write_text_atomic
from trace_circuits.errors import TraceCircuitsError

LINK_CUMULATIVE = 0.98  # Circuit.prune's default: the link share kept once nodes are chosen by cumulative influence


@lru_cache(maxsize=None)
def asset(name: str) -> str:
    """The text of a file in ``trace_circuits/viz/assets`` (vendored d3, the viewer's and report's JS and CSS)."""
    return resources.files("trace_circuits.viz").joinpath("assets", name).read_text(encoding="utf-8")


def script_json(obj) -> str:
    """JSON safe to put inside ``<script type="application/json">`` (no ``</script>``, no NaN)."""
    text = json.dumps(obj, allow_nan=False, separators=(",", ":"))
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def inline_script(js: str) -> str:
    return "<script>" + js.replace("</script", "<\\/script") + "</script>"


def _require_nodes(circuit) -> None:
    if not circuit.nodes:
        raise TraceCircuitsError("the circuit has no nodes, nothing to show; trace again with more prompts or prune "
                                 "less (a lower --prune-threshold or higher --prune-cumulative)")


def viewer_data(circuit, title: Optional[str] = None, max_rows: int = 24) -> dict:
    """``circuit.json`` plus the viewer's ``view`` block (influence, link shares, layout settings)."""
    _require_nodes(circuit)
    data = circuit.to_json()
    infl, link_infl = circuit.influence()
    incoming: dict[str, float] = {}
    for link in circuit.links:
        incoming[link.target] = incoming.get(link.target, 0.0) + abs(link.weight)
    share = [abs(link.weight) / incoming[link.target] if incoming[link.target] > 0 else 0.0 for link in circuit.links]
    model = circuit.meta.get("model", "")
    data["view"] = {"title": title or f"Harmful circuit{' of ' + model if model else ''}",
                    "influence": {k: float(v) for k, v in infl.items()},
                    "link_influence": [float(v) for v in link_infl], "link_share": [float(v) for v in share],
                    "link_cumulative": LINK_CUMULATIVE, "max_rows": int(max_rows)}
    return data


def viewer_page(circuit, title: Optional[str] = None, max_rows: int = 24) -> str:
    """The whole viewer page (self-contained HTML)."""
    data = viewer_data(circuit, title, max_rows)
    t = html.escape(data["view"]["title"])
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>{t}</title><style>{asset("viewer.css")}</style><style id="tc-svg-style">{asset("viewer-svg.css")}</style>
</head><body class="tc-viewer">
<header id="tc-bar">
  <div class="tc-title"><b>{t}</b> <span id="tc-status" class="tc-muted"></span></div>
  <div class="tc-controls">
    <label title="Keep the most influential nodes holding this fraction of the total influence on the readout, as
Circuit.prune(cumulative=...); 1.00 turns this rule off">cumulative influence
      <input id="tc-cum" type="range" min="0.3" max="1" step="0.01" value="1"><output id="tc-cum-val">1.00 (off)</output></label>
    <label title="Keep links with |weight| at or above this value, as Circuit.prune(threshold=...)">link threshold |w| &ge;
      <input id="tc-thr" type="range" min="0" max="0" step="1" value="0"><output id="tc-thr-val"></output></label>
    <label title="Remove the links a cutting hook set (action zero or reroute) severs and grey out what no unsuppressed source reaches any more">
      <input id="tc-cut" type="checkbox"> apply the cut</label>
    <span class="tc-search"><input id="tc-search" type="search" placeholder="search id or token (Enter: go)"
      list="tc-ids" autocomplete="off"><datalist id="tc-ids"></datalist><span id="tc-search-n" class="tc-muted"></span></span>
    <button id="tc-fit" type="button" title="Fit the graph to the window">fit</button>
    <button id="tc-about" type="button" title="What the circuit is and how to read this view">about</button>
    <button id="tc-svg-btn" type="button" title="Download the graph as it is shown (pruning, cut, selection) as SVG">SVG</button>
    <button id="tc-png-btn" type="button" title="Download the graph as it is shown as PNG (2x)">PNG</button>
  </div>
</header>
<main id="tc-main">
  <div id="tc-graph"><svg id="tc-svg" xmlns="http://www.w3.org/2000/svg"></svg><div id="tc-tip" hidden></div><div id="tc-banner" hidden></div>
    <div id="tc-legend"></div></div>
  <aside id="tc-panel" class="closed"><button id="tc-close" type="button" title="close (Esc)">&#x2715;</button>
    <div id="tc-detail"></div><div id="tc-pins"></div></aside>
</main>
<script type="application/json" id="tc-data">{script_json(data)}</script>
{inline_script(asset("d3.min.js"))}
{inline_script(asset("viewer-graph.js"))}
{inline_script(asset("viewer.js"))}
</body></html>"""


class CircuitView:
    """The interactive viewer of a circuit: renders in Jupyter (an iframe holding the page), ``to_html()`` is the
    page, ``save(path)`` writes it."""

    def __init__(self, circuit, title: Optional[str] = None, height: int = 760, max_rows: int = 24):
        _require_nodes(circuit)  # one error line now, not when the notebook renders it
        self.circuit, self.title, self.height, self.max_rows = circuit, title, int(height), int(max_rows)

    def to_html(self) -> str:
        return viewer_page(self.circuit, self.title, self.max_rows)

    def save(self, path: str | Path) -> Path:
        return write_text_atomic(path, self.to_html())

    def _repr_html_(self) -> str:
        return (f'<iframe class="tc-viewer-frame" srcdoc="{html.escape(self.to_html(), quote=True)}" '
                f'style="width:100%;height:{self.height}px;border:1px solid #d0d7de;border-radius:4px"></iframe>')

    def __repr__(self) -> str:
        return f"<CircuitView of {self.circuit!r}>"
