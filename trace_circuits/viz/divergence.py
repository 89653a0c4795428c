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
    """Layers x heads heatmap of D[l,h]; per-layer D[l] with bootstrap CI band, permutation null, onset marked, and
    (form-controlled scans) the matched reference pairs' D[l] and the form-control band (D of two benign sets of
    different form); the harm-probe transfer per layer against its form control; the mean segment-attention of both
    sets at the onset layer (where the attention moved)."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    L, A = result.per_head.shape
    onset = result.onset_layer
    show_layer = onset if onset is not None else int(np.argmax(result.per_layer))
    controlled = result.contrast == "form_controlled" and bool(result.transfer)
    fig = make_subplots(
        rows=2, cols=2, column_widths=[0.42, 0.58], row_heights=[0.58, 0.42],
        specs=[[{}, {}], [{}, {}] if controlled else [{"colspan": 2}, None]],
        subplot_titles=("D[layer, head] (JSD, bits)", "D[layer] = mean over heads, 95% bootstrap CI",
                        f"Mean attention of the last query position by segment, layer {show_layer}",
                        "Harm probe (fitted on matched pairs): AUROC per layer" if controlled else ""),
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
    if controlled:
        _add_form_control(fig, result, layers)
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
    fig.update_layout(height=900, width=1150, barmode="group",
                      title=f"Attention divergence, harmful ({result.n_harmful}) vs benign ({result.n_benign}): "
                            f"{result.model}", legend=dict(orientation="h", y=-0.08))
    return fig


def _add_form_control(fig, result, layers: np.ndarray) -> None:
    """Form-controlled scans: the reference pairs' D[l] and the form-control band on the D panel; the harm transfer
    T[l] (CI band), the reference's T_ref[l] and the form control F[l] (grey band from 0.5) on the AUROC panel."""
    import plotly.graph_objects as go

    ref, t = result.reference, result.transfer
    curves = list(t.get("control_divergence", {}).values())
    if curves:
        top = np.max(np.asarray(curves), axis=0)
        fig.add_trace(go.Scatter(x=np.concatenate([layers, layers[::-1]]), y=np.concatenate([top, 0 * top]),
                                 fill="toself", fillcolor="rgba(128,128,128,0.18)", line=dict(width=0),
                                 name="form control: D of benign vs benign of another form",
                                 hoverinfo="skip"), row=1, col=2)
    if ref.get("per_layer") is not None and not ref.get("is_input"):
        fig.add_trace(go.Scatter(x=layers, y=ref["per_layer"], mode="lines+markers", marker=dict(size=5),
                                 name=f"D[layer], matched reference pairs ({ref.get('n_pairs')})",
                                 line=dict(color="darkorange")), row=1, col=2)
    lo, hi = np.asarray(t["user_ci"])[:, 0], np.asarray(t["user_ci"])[:, 1]
    F = np.asarray(t["form_control"])
    fig.add_trace(go.Scatter(x=np.concatenate([layers, layers[::-1]]), y=np.concatenate([F, 0.5 + 0 * F]),
                             fill="toself", fillcolor="rgba(128,128,128,0.25)", line=dict(width=0),
                             name="form control (probe AUROC of two benign sets)", hoverinfo="skip"), row=2, col=2)
    fig.add_trace(go.Scatter(x=np.concatenate([layers, layers[::-1]]), y=np.concatenate([hi, lo[::-1]]),
                             fill="toself", fillcolor="rgba(214,39,40,0.15)", line=dict(width=0), hoverinfo="skip",
                             showlegend=False), row=2, col=2)
    fig.add_trace(go.Scatter(x=layers, y=t["user"], mode="lines+markers", name="harm transfer: your sets",
                             line=dict(color="crimson"), customdata=np.stack([lo, hi, F], -1),
                             hovertemplate="layer %{x}: AUROC %{y:.2f} [%{customdata[0]:.2f}, %{customdata[1]:.2f}]"
                                           "<br>form control %{customdata[2]:.2f}<extra></extra>"), row=2, col=2)
    fig.add_trace(go.Scatter(x=layers, y=t["reference"], mode="lines", name="harm probe on held-out reference pairs",
                             line=dict(color="darkorange", dash="dot")), row=2, col=2)
    fig.update_xaxes(title_text="layer", row=2, col=2)
    fig.update_yaxes(title_text="AUROC", range=[0.3, 1.0], row=2, col=2)


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
    warn = result.params.get("form_warning")
    warn = f"<p><b>Warning:</b> {html.escape(warn)}</p>" if warn else ""
    return (f"<p>Onset layer: <b>{result.onset_layer}</b> ({html.escape(result.onset_rule)}). {result.n_harmful} "
            f"harmful vs {result.n_benign} benign prompts. Onset from: {html.escape(result.onset_source)}.</p>{warn}"
            f"{figure_html(result.plot())}{extra}")
