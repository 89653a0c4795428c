"""Stage 3 view: the circuit viewer (:mod:`trace_circuits.viz.viewer`) and the circuit's tables.

``Circuit.plot()`` returns a :class:`~trace_circuits.viz.viewer.CircuitView` (renders in Jupyter; ``.to_html()``,
``.save(path)``); ``circuit.html`` is the same viewer as a page of its own.
"""

from __future__ import annotations

import html
from typing import Optional

from trace_circuits.viz.viewer import CircuitView, viewer_page


def plot_circuit(circuit, title: Optional[str] = None, height: int = 760, max_rows: int = 24) -> CircuitView:
    """The interactive circuit viewer: layered graph, node panel, pruning sliders, cut toggle, search, export.

    ``max_rows``: a column holding more nodes wraps into sub-columns of at most this many."""
    return CircuitView(circuit, title=title, height=height, max_rows=max_rows)


def circuit_page(circuit, title: Optional[str] = None, max_rows: int = 24) -> str:
    """The whole ``circuit.html`` page: the viewer, self-contained."""
    return viewer_page(circuit, title=title, max_rows=max_rows)


def links_table(circuit, limit: int = 40) -> str:
    """The ``limit`` strongest links by ``|w|`` as a narrow HTML table."""
    rows = sorted(circuit.links, key=lambda link: -abs(link.weight))[:limit]
    body = "".join(f"<tr><td>{html.escape(r.source)}</td><td>{html.escape(r.target)}</td><td>{r.kind}</td>"
                   f"<td class='num'>{r.weight:+.4f}</td><td>{'&#9986; severed' if r.severed else ''}</td></tr>"
                   for r in rows)
    return ("<table class='tc-table'><thead><tr><th>source</th><th>target</th><th>kind</th><th>weight</th><th></th>"
            f"</tr></thead><tbody>{body}</tbody></table>")
