"""Stage 3 plot: the circuit graph (plotly), nodes layered by depth, severed links drawn distinctly."""

from __future__ import annotations

import html
from typing import Optional

import numpy as np

from trace_circuits.viz.pages import figure_html, page


_KIND_STYLE = {"source": ("circle", "crimson"), "feature": ("circle", "royalblue"), "head": ("square", "darkorange"),
               "mlp": ("diamond", "seagreen"), "readout": ("star", "gold")}


def _node_positions(circuit) -> dict[str, tuple[float, float]]:
    """x = depth in the forward pass (layer + offset per kind), y = spread evenly within each depth column."""
    cols: dict[float, list] = {}
    for n in circuit.nodes:
        cols.setdefault(n.depth, []).append(n)
    pos = {}
    for depth, group in cols.items():
        group.sort(key=lambda n: (-abs(n.scores.get("readout_effect") or 0.0), n.index))
        k = len(group)
        for j, n in enumerate(group):
            pos[n.id] = (depth, (j - (k - 1) / 2) if k > 1 else 0.0)
    return pos


def _node_hover(n) -> str:
    lines = [f"<b>{n.label or n.id}</b> ({n.kind}){' — suppressed' if n.severed else ''}"]
    for k, v in n.scores.items():
        if isinstance(v, (int, float)) and v is not None:
            lines.append(f"{k}: {v:.4g}")
    if n.top_tokens:
        toks = ", ".join(f"{t!r} ({a:.1f})" for t, a in n.top_tokens[:6])
        lines.append(f"top tokens: {toks}")
    return "<br>".join(lines)


def plot_circuit(circuit, threshold: Optional[float] = None, threshold_steps: int = 6):
    """Interactive circuit graph: nodes layered by depth (hover: top tokens and scores), links drawn with width by
    |weight|, severed links red and dashed, and a slider over link thresholds (starting at ``threshold``)."""
    import plotly.graph_objects as go

    pos = _node_positions(circuit)
    w = circuit.weights()
    if threshold is None:
        threshold = float(w.min()) if len(w) else 0.0
    levels = [threshold]
    if len(w) and threshold_steps > 1:
        above = np.sort(w[w >= threshold])
        if len(above):
            qs = np.quantile(above, np.linspace(0, 0.9, threshold_steps))
            levels = sorted({float(threshold), *[float(q) for q in qs[1:]]})
    wmax = float(w.max()) if len(w) else 1.0
    traces, groups = [], []
    for level in levels:
        idx = []
        for severed in (False, True):
            for lo, hi, width in ((0.0, 0.2, 1.0), (0.2, 0.5, 2.5), (0.5, 1.01, 5.0)):
                xs, ys = [], []
                for link in circuit.links:
                    a = abs(link.weight)
                    if link.severed != severed or a < level or not lo * wmax <= a < hi * wmax + 1e-12:
                        continue
                    (x0, y0), (x1, y1) = pos[link.source], pos[link.target]
                    xs += [x0, x1, None]
                    ys += [y0, y1, None]
                if not xs:
                    continue
                idx.append(len(traces))
                traces.append(go.Scatter(
                    x=xs, y=ys, mode="lines", hoverinfo="skip", showlegend=False, visible=level == levels[0],
                    line=dict(width=width, color="rgba(220,20,60,0.75)" if severed else "rgba(120,120,120,0.45)",
                              dash="dash" if severed else "solid")))
        mids = [(link, pos[link.source], pos[link.target]) for link in circuit.links if abs(link.weight) >= level]
        idx.append(len(traces))
        traces.append(go.Scatter(
            x=[(a[0] + b[0]) / 2 for _, a, b in mids], y=[(a[1] + b[1]) / 2 for _, a, b in mids], mode="markers",
            marker=dict(size=6, color=["crimson" if link.severed else "gray" for link, _, _ in mids], opacity=0.5),
            text=[f"{link.source} → {link.target}<br>weight {link.weight:+.4f}"
                  f"{'<br>severed' if link.severed else ''}" for link, _, _ in mids],
            hovertemplate="%{text}<extra></extra>", showlegend=False, visible=level == levels[0]))
        groups.append((level, idx, len(mids)))
    n_edge_traces = len(traces)
    for kind, (symbol, color) in _KIND_STYLE.items():
        ns = [n for n in circuit.nodes if n.kind == kind]
        if not ns:
            continue
        traces.append(go.Scatter(
            x=[pos[n.id][0] for n in ns], y=[pos[n.id][1] for n in ns], mode="markers+text", name=kind,
            text=[n.label or n.id for n in ns], textposition="top center", textfont=dict(size=9),
            hovertext=[_node_hover(n) for n in ns], hoverinfo="text",
            marker=dict(symbol=symbol, color=color, size=[12 + 30 * min(1.0, abs(n.scores.get("readout_effect") or 0)
                                                                       * 5) for n in ns],
                        line=dict(width=[3 if n.severed else 1 for n in ns],
                                  color=["black" if n.severed else "white" for n in ns]))))
    fig = go.Figure(traces)
    steps = []
    for level, idx, n_links in groups:
        visible = [False] * n_edge_traces + [True] * (len(traces) - n_edge_traces)
        for i in idx:
            visible[i] = True
        steps.append(dict(method="update", label=f"{level:.3g}", args=[{"visible": visible},
                                                                         {"title.text": _circuit_title(circuit, level,
                                                                                                       n_links)}]))
    layers = sorted({n.layer for n in circuit.nodes})
    fig.update_layout(
        title=_circuit_title(circuit, levels[0], groups[0][2] if groups else 0), height=650, width=1150,
        xaxis=dict(title="layer (heads, MLPs and residual features in forward order; readout last)",
                   tickmode="array", tickvals=layers),
        yaxis=dict(visible=False), plot_bgcolor="white", legend=dict(orientation="h", y=-0.12),
        sliders=[dict(active=0, currentvalue=dict(prefix="link threshold |w| >= "), pad=dict(t=50), steps=steps)])
    return fig


def _circuit_title(circuit, level: float, n_links: int) -> str:
    n_sev = sum(1 for n in circuit.nodes if n.severed)
    return (f"Harmful circuit of {circuit.meta.get('model', '')}: {len(circuit.nodes)} nodes, {n_links} links with "
            f"|w| >= {level:.3g}; {n_sev} nodes suppressed (black rim), severed links red dashed")


def links_table(circuit, limit: int = 40) -> str:
    rows = sorted(circuit.links, key=lambda link: -abs(link.weight))[:limit]
    body = "".join(f"<tr><td>{html.escape(r.source)}</td><td>{html.escape(r.target)}</td><td>{r.weight:+.4f}</td>"
                   f"<td>{'severed' if r.severed else ''}</td></tr>" for r in rows)
    return ("<table border='1' cellpadding='4' style='border-collapse:collapse'><tr><th>source</th><th>target"
            f"</th><th>weight</th><th></th></tr>{body}</table>")


def _summary_facts(meta: dict) -> list[tuple[str, object]]:
    keys = [("model", "model"), ("onset layer", "onset_layer"), ("readout", "readout_definition"),
            ("prompts (harmful) used for FIS", "n_prompts"), ("attribution vs exact Spearman (top nodes)",
                                                               "attribution_spearman_top")]
    return [(label, meta[k]) for label, k in keys if k in meta]


def circuit_body(circuit) -> str:
    sev = circuit.severed_nodes
    facts = "".join(f"<li>{html.escape(str(k))}: {html.escape(str(v))}</li>" for k, v in _summary_facts(circuit.meta))
    return (f"<p>{len(circuit.nodes)} nodes, {len(circuit.links)} links; {len(sev)} nodes suppressed by the hook set, "
            f"{sum(link.severed for link in circuit.links)} links severed (red dashes). Drag the slider to change "
            f"the link threshold; hover a node for its top tokens and scores.</p><ul>{facts}</ul>"
            f"{figure_html(circuit.plot())}<h2>Strongest links</h2>{links_table(circuit)}")


def circuit_page(circuit) -> str:
    """The whole ``circuit.html`` page."""
    return page(f"Harmful circuit of {circuit.meta.get('model', '')}", circuit_body(circuit))
