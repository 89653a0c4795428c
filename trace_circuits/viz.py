"""Plots (plotly: interactive in Jupyter, exported to HTML) and attention views (circuitsvis)."""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch

from trace_circuits.errors import TraceCircuitsError


def plot_divergence(result):
    """Layers x heads heatmap of D[l,h]; per-layer D[l] with bootstrap CI band, permutation null, onset marked;
    and the mean segment-attention of both sets at the onset layer (where the attention moved)."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    L, A = result.per_head.shape
    onset = result.onset_layer
    show_layer = onset if onset is not None else int(np.argmax(result.per_layer))
    fig = make_subplots(
        rows=2, cols=2, column_widths=[0.42, 0.58], row_heights=[0.62, 0.38],
        specs=[[{}, {}], [{"colspan": 2}, None]],
        subplot_titles=("D[layer, head] (JSD, bits)", "D[layer] = mean over heads, 95% bootstrap CI",
                        f"Mean attention of the last query position by segment, layer {show_layer}"),
        vertical_spacing=0.14, horizontal_spacing=0.1)
    fig.add_trace(go.Heatmap(
        z=result.per_head, x=[f"H{h}" for h in range(A)], y=list(range(L)), colorscale="Viridis",
        colorbar=dict(title="JSD", len=0.55, y=0.75),
        hovertemplate="layer %{y}, head %{x}<br>D = %{z:.4f} bits<extra></extra>"), row=1, col=1)
    layers = np.arange(L)
    lo, hi = result.per_layer_ci[:, 0], result.per_layer_ci[:, 1]
    fig.add_trace(go.Scatter(x=np.concatenate([layers, layers[::-1]]), y=np.concatenate([hi, lo[::-1]]),
                             fill="toself", fillcolor="rgba(31,119,180,0.2)", line=dict(width=0), hoverinfo="skip",
                             name="95% CI"), row=1, col=2)
    fig.add_trace(go.Scatter(x=layers, y=result.per_layer, mode="lines+markers", name="D[layer]",
                             line=dict(color="rgb(31,119,180)"),
                             customdata=np.stack([lo, hi, result.q_values], -1),
                             hovertemplate="layer %{x}: D = %{y:.4f} [%{customdata[0]:.4f}, %{customdata[1]:.4f}]"
                                           "<br>q = %{customdata[2]:.3g}<extra></extra>"), row=1, col=2)
    fig.add_trace(go.Scatter(x=layers, y=result.null_threshold, mode="lines", name="permutation null (95%)",
                             line=dict(color="gray", dash="dot")), row=1, col=2)
    if onset is not None:
        fig.add_trace(go.Scatter(x=[onset], y=[result.per_layer[onset]], mode="markers+text", name="onset layer",
                                 marker=dict(size=14, color="crimson", symbol="star"), text=[f"onset {onset}"],
                                 textposition="top center"), row=1, col=2)
        fig.add_vline(x=onset, line=dict(color="crimson", dash="dash"), row=1, col=2)
    fig.add_trace(go.Bar(x=result.segments, y=result.harmful_profile[show_layer].mean(0), name="harmful",
                         marker_color="crimson"), row=2, col=1)
    fig.add_trace(go.Bar(x=result.segments, y=result.benign_profile[show_layer].mean(0), name="benign",
                         marker_color="seagreen"), row=2, col=1)
    fig.update_xaxes(title_text="head", row=1, col=1)
    fig.update_yaxes(title_text="layer", autorange="reversed", row=1, col=1)
    fig.update_xaxes(title_text="layer", row=1, col=2)
    fig.update_yaxes(title_text="JSD (bits)", row=1, col=2)
    fig.update_yaxes(title_text="attention mass", row=2, col=1)
    fig.update_layout(height=850, width=1150, barmode="group",
                      title=f"Attention divergence, harmful ({result.n_harmful}) vs benign ({result.n_benign}): "
                            f"{result.model}", legend=dict(orientation="h", y=-0.08))
    return fig


class PairView:
    """Two circuitsvis attention views side by side; renders in Jupyter, ``.local_src`` is offline HTML."""

    def __init__(self, parts: list[tuple[str, object]]):
        self.parts = parts

    @property
    def local_src(self) -> str:
        return "".join(f"<h3>{title}</h3>{view.local_src}" for title, view in self.parts)

    def _repr_html_(self) -> str:
        return "".join(f"<h3>{title}</h3>{view._repr_html_()}" for title, view in self.parts)


def attention_pattern(model, prompt: str, layer: int, chat: Optional[bool] = None) -> tuple[torch.Tensor, list[str]]:
    """``blocks.{layer}.attn.hook_pattern`` for one (templated) prompt: [head, query, key] and its token strings."""
    from trace_circuits.prompts import encode_prompts

    if not 0 <= layer < model.cfg.n_layers:
        raise TraceCircuitsError(f"layer {layer} is out of range; the model has layers 0..{model.cfg.n_layers - 1}")
    enc = encode_prompts(model, [prompt], chat=chat)
    tokens = torch.tensor([enc.input_ids[0]], device=next(model.parameters()).device)
    name = f"blocks.{layer}.attn.hook_pattern"
    with torch.inference_mode():
        _, cache = model.run_with_cache(tokens, names_filter=name, return_type=None)
    strs = [model.tokenizer.decode([t]) for t in enc.input_ids[0]]
    return cache[name][0].float().cpu(), strs


def attention_pair_view(model, harmful: str, benign: str, layer: int, chat: Optional[bool] = None) -> PairView:
    """circuitsvis attention-heads views of a harmful and a benign prompt at ``layer``."""
    import circuitsvis as cv

    parts = []
    for title, prompt in (("harmful", harmful), ("benign", benign)):
        pattern, strs = attention_pattern(model, prompt, layer, chat=chat)
        view = cv.attention.attention_heads(attention=pattern, tokens=strs,
                                            attention_head_names=[f"L{layer}H{h}" for h in range(pattern.shape[0])])
        parts.append((f"{title}: {prompt}", view))
    return PairView(parts)


def feature_token_view(model, sae, hook_name: str, prompts: list[str], features: list[int],
                       chat: Optional[bool] = None) -> PairView:
    """circuitsvis token-level activations of SAE ``features`` on each prompt (one colored-tokens view a prompt)."""
    import circuitsvis as cv

    from trace_circuits.prompts import encode_prompts

    if not features:
        raise TraceCircuitsError("no features to show; pass feature ids, e.g. result.harmful_features[:5]")
    enc = encode_prompts(model, prompts, chat=chat)
    device = next(model.parameters()).device
    parts = []
    for i, prompt in enumerate(prompts):
        tokens = torch.tensor([enc.input_ids[i]], device=device)
        with torch.inference_mode():
            _, cache = model.run_with_cache(tokens, names_filter=[hook_name])
            acts = sae.to(device).encode(cache[hook_name][0].float())[:, features].cpu()
        s = enc.content_spans[i][0]
        strs = [model.tokenizer.decode([t]) for t in enc.input_ids[i]][s:]
        view = cv.tokens.colored_tokens_multi(tokens=strs, values=acts[s:], labels=[f"F{f}" for f in features])
        parts.append((prompt, view))
    return PairView(parts)


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
