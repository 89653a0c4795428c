"""Stage 1 plots: the per-layer / per-head attention divergence, and circuitsvis attention views."""

from __future__ import annotations

import html
from typing import Optional

import numpy as np
import torch

from trace_circuits.errors import TraceCircuitsError
from trace_circuits.viz.pages import figure_html
from trace_circuits.viz.views import PairView


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


def divergence_body(result, model=None) -> str:
    extra = ""
    if model is not None and result.harmful_prompts and result.benign_prompts:
        view = result.attention_view(model)
        layer = result.onset_layer if result.onset_layer is not None else int(np.argmax(result.per_layer))
        extra = (f"<h2>Attention at layer {layer}: first harmful vs first benign prompt</h2>"
                 f"<div>{view.local_src}</div>")
    return (f"<p>Onset layer: <b>{result.onset_layer}</b> ({html.escape(result.onset_rule)}). {result.n_harmful} "
            f"harmful vs {result.n_benign} benign prompts.</p>{figure_html(result.plot())}{extra}")
